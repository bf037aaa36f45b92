"""The MixMAE encoder as a dense backbone: four feature maps at strides 4, 8, 16 and 32 for detection and
segmentation heads (FPN, UperNet), on images of any height and width divisible by 32.

No existing Swin backbone can hold a MixMAE encoder: mmdet's and torchvision's Swin shift their windows and
use one window size, while MixMAE's blocks never shift and use windows 14/14/14/7. So the encoder's own blocks
run here, with two things a dense input needs that pretraining never did:
- a stage whose grid is not a multiple of its window is padded to one, and the padded tokens are masked out
  as keys (the official Swin detection code attends to zero padding; masking keeps a token's features the
  same whether or not its window was padded);
- the fixed sin-cos position embedding is made for the input's grid, in the channel layout of the loaded
  weights (the official code's, or timm's, which a model of ours made from scratch has).
At the pretraining size nothing is padded and the maps are the stage outputs the official fine-tuning model
computes (a test holds that against the official code's outputs).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed
from torch import nn
from torch.utils.checkpoint import checkpoint

from mixmae_scale.models.convert_official import (
    OFFICIAL_SUFFIXES,
    WeightsError,
    infer_architecture,
    load_weights,
    map_official_keys,
    read_metadata,
    read_official,
)
from mixmae_scale.models.swin import SwinBlock, SwinEncoder, SwinShape
from mixmae_scale.models.window_attention import window_partition, window_reverse

# What `mixmae export RUN` writes in a run folder, by the run's kind (engine/export.py's DEFAULT_NAMES): a pretraining
# run's encoder (with its decoder: --with-decoder), a fine-tuning run's classifier, a segmentation run's segmenter.
# Each holds the encoder, under `backbone.` in a segmenter.
EXPORTED_NAMES = ("encoder.safetensors", "encoder_decoder.safetensors", "classifier.safetensors",
                  "segmenter.safetensors")
# Input sizes whose position embedding is kept (per device and dtype): detection feeds hundreds of sizes.
POSITION_CACHE_SIZES = 8


def official_sincos(h: int, w: int, dim: int) -> torch.Tensor:
    """(h * w, dim) in the layout of MAE's `get_2d_sincos_pos_embed`, which the official MixMIM code uses: the
    first half of the channels encodes the column, the second the row, each as [sin, cos]."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for coord in (cols, rows):
        angles = coord.reshape(-1, 1) * omega[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


Layout = Callable[[int, int, int], torch.Tensor]  # (h, w, dim) -> (h * w, dim), built on the CPU


def timm_sincos(h: int, w: int, dim: int) -> torch.Tensor:
    """timm's layout, which a model of ours made from scratch has (models/swin.py)."""
    return build_sincos2d_pos_embed([h, w], dim)


def embedding_layout(stored: torch.Tensor) -> Layout | None:
    """Which sin-cos formula `stored` (1, L, C) holds, or None (an embedding resized for another resolution).
    Compared on a CPU copy, so that it reads the same wherever the buffer lives (a GPU, or `meta`: then nothing
    can be read and the answer is None)."""
    if stored.device.type == "meta":
        return None
    side, dim = int(round(stored.shape[1] ** 0.5)), stored.shape[-1]
    values = stored[0].detach().float().cpu()
    # An embedding stored in bf16 or fp16 (a module cast whole) is the formula to within its rounding, 2^-8 of
    # values in [-1, 1]; a resized embedding differs from it by far more.
    tolerance = 1e-5 if stored.dtype == torch.float32 else 1e-2
    for formula in (official_sincos, timm_sincos):
        if torch.allclose(formula(side, side, dim), values, atol=tolerance):
            return formula
    return None


def continued_embedding(stored: torch.Tensor, layout: Layout | None, h: int, w: int) -> torch.Tensor:
    """The (1, h * w, C) embedding for an (h, w) grid that continues `stored` (1, L, C), on its device in its dtype:
    the formula of its `layout`, else a bicubic resize of it."""
    side, dim = int(round(stored.shape[1] ** 0.5)), stored.shape[-1]
    if layout is not None:
        return layout(h, w, dim)[None].to(device=stored.device, dtype=stored.dtype)
    grid = stored.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(stored.dtype)


def position_embedding_for(stored: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The embedding for an (h, w) token grid that continues `stored` (1, L, C): the same sin-cos formula when
    `stored` is one of the two known layouts, else (an embedding resized for another resolution) a bicubic
    resize of it. On `stored`'s device, in its dtype."""
    return continued_embedding(stored, embedding_layout(stored), h, w)


def padding_key_mask(h: int, w: int, window: int, device: torch.device) -> torch.Tensor | None:
    """Additive (nW, 1, N, N) mask hiding the tokens padded onto an (h, w) grid, or None when it needs none.
    Every window holds at least one real token (the padding is shorter than a window), so no row is empty."""
    ph, pw = (-h) % window, (-w) % window
    if not ph and not pw:
        return None
    real = torch.zeros(h + ph, w + pw, device=device, dtype=torch.bool)
    real[:h, :w] = True
    keys = window_partition(real[None, :, :, None].float(), window)[..., 0] > 0  # (nW, N)
    mask = torch.zeros(keys.shape[0], 1, keys.shape[1], keys.shape[1], device=device)
    return mask.masked_fill(~keys[:, None, None, :], float("-inf"))


def run_block_padded(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """A Swin block on an (B, H, W, C) grid of any size: the normed tokens are padded to whole windows, padded
    keys are masked, and the padding is cut off again before the residual."""
    b, h, w, c = x.shape
    window = block.window
    ph, pw = (-h) % window, (-w) % window
    normed = F.pad(block.norm1(x), (0, 0, 0, pw, 0, ph)) if ph or pw else block.norm1(x)
    mask = padding_key_mask(h, w, window, x.device)
    if mask is not None:
        mask = mask.to(normed.dtype)
    attended = block.attn(window_partition(normed, window), mask)
    attended = window_reverse(attended, window, h + ph, w + pw)[:, :h, :w]
    x = x + block.drop_path(attended)
    return x + block.drop_path(block.mlp(block.norm2(x)))


class SwinBackbone(nn.Module):
    """Feature maps `[B, C_i, H / s, W / s]` for s = 4, 8, 16, 32 (`out_channels` lists the C_i): each stage's
    tokens after its last block, before patch merging, as the official code computes them: no final norm and no
    per-stage norm. torchvision's FPN normalises nothing it reads (`norm_layer=None`): `SwinFPN`
    (models/detection.py) adds a LayerNorm per map, as mmdet's and the official Swin detection backbones do
    (`norm{i}`); the UperNet head (models/segmentation_head.py) normalises after each lateral convolution."""

    def __init__(self, shape: SwinShape, drop_path: float = 0.0, checkpoint_blocks: bool = False) -> None:
        super().__init__()
        self.shape = shape
        self.checkpoint_blocks = checkpoint_blocks
        self.encoder = SwinEncoder(shape, drop_path=drop_path)
        self.encoder.patch_embed.strict_img_size = False  # any size divisible by the patch; checked below
        # The maps are read before the final norm, so it would be a parameter without gradients (which DDP and
        # DeepSpeed refuse by default); what reads the maps normalises them (see the class docstring).
        self.encoder.norm = nn.Identity()
        self.out_channels = list(shape.stage_dims)
        self.strides = [shape.patch_size * 2**s for s in range(len(shape.depths))]
        self._position_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        # Which formula the stored embedding holds, read off its values once per load (not per forward, and
        # before the buffer may move to a device): models/backbone.py's `embedding_layout`.
        self._layout = embedding_layout(self.encoder.absolute_pos_embed)
        self.register_load_state_dict_post_hook(SwinBackbone._weights_loaded)

    @property
    def depths(self) -> tuple[int, ...]:
        """For the layer-decay groups (`finetune.layer_decay.param_groups_layer_decay(backbone, backbone.depths,
        ...)`): the parameter names are the encoder's, so the official layer ids apply unchanged."""
        return self.shape.depths

    def position(self, h: int, w: int, device: torch.device | None = None, dtype: torch.dtype | None = None
                 ) -> torch.Tensor:
        """The (1, h * w, C) embedding of an (h, w) grid on `device` in `dtype` (default: the buffer's). The last
        POSITION_CACHE_SIZES sizes are kept where they are used, so a forward copies nothing between devices."""
        stored = self.encoder.absolute_pos_embed
        key = (h, w, torch.device(device) if device is not None else stored.device, dtype or stored.dtype)
        if key in self._position_cache:
            self._position_cache.move_to_end(key)
            return self._position_cache[key]
        embedding = continued_embedding(stored, self._layout, h, w).to(device=key[2], dtype=key[3])
        self._position_cache[key] = embedding
        if len(self._position_cache) > POSITION_CACHE_SIZES:
            self._position_cache.popitem(last=False)
        return embedding

    @staticmethod
    def _weights_loaded(module: SwinBackbone, incompatible) -> None:
        """After any load, also through a parent module's (a segmentation model's, a checkpoint's): the embedding
        follows the weights' layout."""
        module._position_cache.clear()
        module._layout = embedding_layout(module.encoder.absolute_pos_embed)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        multiple = self.strides[-1]
        height, width = images.shape[-2:]
        if height % multiple or width % multiple:
            raise ValueError(f"SwinBackbone: input {height}x{width} is not divisible by {multiple} (the last stage's "
                             f"stride); pad or resize the images to a multiple of {multiple}")
        x = self.encoder.embed(images)
        b, h, w, c = x.shape
        x = x + self.position(h, w, x.device, x.dtype).view(1, h, w, c)
        maps = []
        for stage in self.encoder.layers:
            for block in stage.blocks:
                if self.checkpoint_blocks and torch.is_grad_enabled():
                    x = checkpoint(run_block_padded, block, x, use_reentrant=False)
                else:
                    x = run_block_padded(block, x)
            maps.append(x.permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None:
                x = stage.downsample(x)
        return maps


def _weights_from(source: Path) -> dict[str, torch.Tensor]:
    if source.is_dir():
        return _exported_weights(source)
    if source.suffix == ".safetensors":
        return _encoder_keys(load_weights(source)[0])
    if source.suffix in OFFICIAL_SUFFIXES:
        official = read_official(source)  # its own errors name the file
        try:  # the key mapping's do not: said with the file, as finetune.init's and --init's are
            return map_official_keys(official)
        except WeightsError as exc:
            raise WeightsError(f"{source.absolute()}: {exc}") from exc
    raise WeightsError(f"{source.absolute()}: expected a .safetensors file (`mixmae export`), a run folder or an "
                       "official MixMIM .pth")


def _encoder_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A segmenter's encoder is under `backbone.encoder.`: the same names as everywhere else, one level down."""
    if any(k.startswith("backbone.encoder.") for k in state):
        return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.encoder.")}
    return state


def _exported_weights(run: Path) -> dict[str, torch.Tensor]:
    """The encoder of a run folder's export; an export older than the run's newest checkpoint is used, and said."""
    found = [run / name for name in EXPORTED_NAMES if (run / name).is_file()]
    if not found and (run / "COMPLETE").is_file() and _checkpoint_folder_of(run) is None:  # copied out of its run
        raise WeightsError(f"{run.absolute()}: a checkpoint folder, not a run folder; load_backbone reads an export: "
                           f"`mixmae export {run} --out FILE.safetensors` writes these weights to a file to name here")
    if not found and _checkpoint_folder_of(run) is not None:
        owner = _checkpoint_folder_of(run)
        raise WeightsError(f"{run.absolute()}: a checkpoint folder of the run {owner}, not a run folder; load_backbone "
                           f"reads a run's export: `mixmae export {run} --out FILE.safetensors` writes these weights "
                           f"to a file to name here, or `mixmae export {owner}` its newest checkpoint's into the run "
                           "folder, then name the run folder")
    if not found:
        raise WeightsError(_no_export(run))
    exported = found[0]
    step, newest = read_metadata(exported).get("step"), _newest_checkpoint_step(run)
    if step is not None and step.isdigit() and newest is not None and newest > int(step):
        logging.getLogger("mixmae.backbone").warning(
            "mixmae: %s holds step %s of the run; its newest complete checkpoint is step %d: `mixmae export %s` "
            "again to use it", exported.absolute(), step, newest, run)
    return _encoder_keys(load_weights(exported)[0])


def _no_export(folder: Path) -> str:
    """Why a folder gives no weights, and what to name instead. A folder that is not a run folder (no checkpoints/
    and no config.yaml: a folder of downloaded checkpoints, the official fixtures) was called "a run folder without an
    export" and sent to `mixmae export` it, which refuses it as not a run folder; the weights files in it are named.
    A run folder whose only export is another name (`mixmae export RUN --best`'s classifier-best.safetensors, an
    --out or --format official file beside it) was told it had none: those files are named too."""
    suffixes = (".safetensors", *OFFICIAL_SUFFIXES)
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in suffixes)
    shown = ", ".join(files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
    held = f"; it holds {shown}: name one of them (a file of ours or an official MixMIM checkpoint)" if files else ""
    if not (folder / "checkpoints").is_dir() and not (folder / "config.yaml").is_file():
        way = held or "; name the weights file: an exported .safetensors or an official MixMIM .pth"
        return (f"{folder.absolute()}: not a run folder (no checkpoints/ or config.yaml in it), and load_backbone "
                f"reads a folder only as a run folder's export ({', '.join(EXPORTED_NAMES)}){way}")
    return (f"{folder.absolute()}: a run folder without an export under the name load_backbone reads "
            f"({', '.join(EXPORTED_NAMES)}){held}; or write one with `mixmae export {folder}` (encoder.safetensors "
            "for a pretraining run, classifier.safetensors for a fine-tuning run, segmenter.safetensors for a "
            "segmentation run)")


def _checkpoint_folder_of(path: Path) -> Path | None:
    """The run folder of `path` when it is one of the run's checkpoints (RUN/checkpoints/stepN, RUN/best/stepN: a
    COMPLETE marker) or RUN/checkpoints or RUN/best (complete checkpoints in it), which finetune.init and --init take;
    else None. By name, as `_newest_checkpoint_step` reads them."""
    if (path / "COMPLETE").is_file():  # a step folder outside checkpoints/ or best/ (copied alone) has no run
        return path.parent.parent.absolute() if path.parent.name in ("checkpoints", "best") else None
    if path.name in ("checkpoints", "best") and any((child / "COMPLETE").is_file() for child in path.iterdir()):
        return path.parent.absolute()
    return None


def _newest_checkpoint_step(run: Path) -> int | None:
    """The step of the run's newest complete regular checkpoint (RUN/checkpoints/stepNNNNNNNN with its COMPLETE
    marker, not a non-finite stop's), or None. The names are engine/checkpointing/store.py's, read here by name
    because the model library imports no training code (tests/unit/test_layering.py); a test writes them through
    the store's own functions, so a change there fails it."""
    folder = run / "checkpoints"
    if not folder.is_dir():
        return None
    steps = [int(p.name[4:12]) for p in folder.iterdir()
             if p.name.startswith("step") and p.name[4:12].isdigit() and "-nonfinite" not in p.name
             and ".partial" not in p.name and ".universal" not in p.name and (p / "COMPLETE").is_file()]
    return max(steps, default=None)


def load_backbone(source: str | Path, drop_path: float = 0.0, checkpoint_blocks: bool = False) -> SwinBackbone:
    """A dense backbone with the encoder weights of an exported `.safetensors` (an encoder, a classifier or a
    segmenter), a run folder (its export: EXPORTED_NAMES) or an official MixMIM `.pth` (pretraining or
    fine-tuning). Decoder, heads and the final norm (the maps come before it) are left out."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{source}: not found (tried {path.absolute()})")
    state = _weights_from(path)
    try:
        return backbone_from_weights(state, drop_path, checkpoint_blocks)
    except WeightsError as exc:
        raise WeightsError(f"{path.absolute()}: {exc}") from exc


def backbone_encoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `encoder.*` tensors of `state` (our key names) a dense backbone holds: all but the final norm."""
    return {k: v for k, v in state.items() if k.startswith("encoder.") and not k.startswith("encoder.norm.")}


def backbone_shape(state: dict[str, torch.Tensor]) -> SwinShape:
    """The encoder shape of a backbone for `state`, read off the tensors' shapes alone (meta tensors will do)."""
    arch = infer_architecture(backbone_encoder(state))
    return SwinShape(arch["img_size"], arch["patch_size"], arch["embed_dim"], tuple(arch["depths"]),
                     tuple(arch["num_heads"]), tuple(arch["window_size"]), arch["mlp_ratio"])


def backbone_from_weights(state: dict[str, torch.Tensor], drop_path: float = 0.0,
                          checkpoint_blocks: bool = False) -> SwinBackbone:
    """A dense backbone in the shape of the `encoder.*` tensors of `state` (our key names), holding them."""
    backbone = SwinBackbone(backbone_shape(state), drop_path=drop_path, checkpoint_blocks=checkpoint_blocks)
    backbone.load_state_dict(backbone_encoder(state), strict=True)
    return backbone
