"""The segmentation model of a configuration, its optimizer groups and its FLOPs.

The encoder comes from `segment.init` (an export, a run folder, an official .pth: its shape is read off the
weights), or is drawn at random in the shape of `model.*` for `segment.init=random`, the
baseline that shows what pretraining is worth. The encoder's blocks learn at layer-decayed rates, exactly the
classifier's groups (finetune/layer_decay.py); the head, new and randomly initialised, at the full rate times
`segment.head_lr_scale` (1 in the published recipe).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mixmae_scale.config.schema import RANDOM_INIT, Config
from mixmae_scale.engine.optimizer import exempt_from_decay
from mixmae_scale.finetune.layer_decay import param_groups_layer_decay
from mixmae_scale.finetune.pretrained import Pretrained, load_pretrained
from mixmae_scale.models.backbone import SwinBackbone, backbone_from_weights, backbone_shape
from mixmae_scale.models.convert_official import WeightsError
from mixmae_scale.models.flops import encoder_macs
from mixmae_scale.models.mixmae import swin_shape
from mixmae_scale.models.segmentation_head import SegmentationModel, UperHead

log = logging.getLogger("mixmae.segment")


def require_segment_init(init: str | None, option: str = "--init ") -> None:
    """`segment.init` unset is refused by `mixmae segment` and by a launch of it (cli/cluster_commands.py), before
    any rank starts: ranks that each refused it after the launch said it once per rank, late. `option` is how the
    command at hand sets it (`--init ` for `mixmae segment`, `--set segment.init=` for `mixmae launch`)."""
    if not init:
        raise WeightsError(f"segment.init is not set: name the encoder to start from ({option}RUN_FOLDER, an "
                           f"exported .safetensors or an official MixMIM .pth), or {option}random for a randomly "
                           "initialised encoder (the baseline)")


def check_init(config: Config, resuming: bool = False) -> None:
    """`segment.init` names weights that exist, or "random"; said before any process group starts. A run that
    resumes from its own checkpoint (`resuming`: run_folder.resumes) needs nothing of them: the checkpoint holds
    every weight, and the encoder's shape is read off it (`build_backbone`)."""
    init = config.segment.init
    require_segment_init(init)
    if init != RANDOM_INIT and not resuming and not Path(init).exists():
        raise FileNotFoundError(f"segment.init={init}: not found (tried {Path(init).absolute()}); name a run folder, "
                                "an exported .safetensors, an official .pth, or 'random'")


def build_backbone(config: Config, resumed: Path | None = None, pretrained: Pretrained | None = None
                   ) -> SwinBackbone:
    """The encoder of `segment.init`, in its shape. `resumed`: the run's own checkpoint it is about to load, which
    gives the shape (the backbone's tensors in it) without reading `segment.init`, which may be gone since.
    `pretrained`: segment.init's weights, where the caller has loaded them (`load_pretrained`)."""
    checkpoint_blocks = config.model.checkpoint_every > 0
    if config.segment.init == RANDOM_INIT:
        return SwinBackbone(swin_shape(config.model), drop_path=config.model.drop_path,
                            checkpoint_blocks=checkpoint_blocks)
    if resumed is not None:
        from mixmae_scale.engine.export import tensor_shapes

        saved = {key.removeprefix("backbone."): torch.empty(shape, device="meta")
                 for key, shape in tensor_shapes(resumed).items() if key.startswith("backbone.")}
        try:
            shape = backbone_shape(saved)
        except WeightsError as exc:
            raise WeightsError(f"{resumed}: not a segmentation run's checkpoint: its backbone {exc}") from exc
        return SwinBackbone(shape, drop_path=config.model.drop_path, checkpoint_blocks=checkpoint_blocks)
    # load_pretrained gathers a run folder's ZeRO shards when it has no export yet, and names the option in its errors.
    pretrained = pretrained or load_pretrained(config.segment.init, option="segment.init")
    try:
        return backbone_from_weights(pretrained.state, drop_path=config.model.drop_path,
                                     checkpoint_blocks=checkpoint_blocks)
    except WeightsError as exc:
        raise WeightsError(f"segment.init={config.segment.init}: {exc}") from exc


def build_segmenter(config: Config, resumed: Path | None = None, pretrained: Pretrained | None = None
                    ) -> SegmentationModel:
    """`resumed`: the run's checkpoint it will load; `pretrained`: segment.init's weights (`build_backbone`)."""
    seg = config.segment
    backbone = build_backbone(config, resumed, pretrained)
    head = UperHead(backbone.out_channels, seg.head_channels, seg.num_classes, seg.pool_scales, seg.head_dropout)
    return SegmentationModel(backbone, head)


def param_groups(model: SegmentationModel, base_lr: float, weight_decay: float, layer_decay: float,
                 exempt_tables: bool = False, head_lr_scale: float = 1.0) -> list[dict]:
    """The encoder's layer-decayed groups, then the head's two (with and without weight decay) at `base_lr` x
    `head_lr_scale` (`segment.head_lr_scale`: a new head may learn faster than the encoder it reads)."""
    groups = param_groups_layer_decay(model.backbone, model.backbone.depths, base_lr, weight_decay, layer_decay,
                                      exempt_tables)
    for group in groups:  # named as in the whole model, as the head's are
        group["names"] = [f"backbone.{name}" for name in group["names"]]
    head: dict[bool, dict] = {}
    head_id = sum(model.backbone.depths) + 1  # past the last block's id: the head is not decayed
    for name, param in model.decode_head.named_parameters():
        no_wd = exempt_from_decay(name, param, exempt_tables)
        group = head.setdefault(no_wd, {"params": [], "names": [], "weight_decay": 0.0 if no_wd else weight_decay,
                                        "lr_scale": head_lr_scale, "lr": base_lr * head_lr_scale,
                                        "layer_id": head_id})
        group["params"].append(param)
        group["names"].append(f"decode_head.{name}")
    return groups + [head[key] for key in sorted(head)]


def training_flops_per_image(model: SegmentationModel, crop_size: int) -> float:
    """Forward and backward (3 x 2 x forward MACs) of one crop; padded window tokens are not counted."""
    shape = replace(model.backbone.shape, img_size=crop_size)
    return 6.0 * (encoder_macs(shape) + model.decode_head.macs(crop_size, crop_size, model.backbone.strides))


def optimizer_groups_without_names(groups: list[dict]) -> list[dict]:
    """What torch's optimizers accept: the groups without the names kept for tests and logs."""
    return [{k: v for k, v in g.items() if k != "names"} for g in groups]


def segment_start(config: Config, resumed: bool) -> Pretrained | None:
    """segment.init's weights, or None for `segment.init=random` and for a resume (its checkpoint holds them)."""
    if resumed or config.segment.init == RANDOM_INIT:
        return None
    return load_pretrained(config.segment.init, option="segment.init")


def started_from(config: Config, pretrained: Pretrained | None) -> dict[str, Any] | None:
    """run.json's "init" (engine/run_record.py): where the encoder came from, with the checkpoint and step of a run
    folder; None for a resume, which read none (the record keeps what the run's first launch wrote)."""
    if pretrained is not None:
        return pretrained.record("segment.init")
    return {"key": "segment.init", "path": RANDOM_INIT} if config.segment.init == RANDOM_INIT else None


def describe(model: SegmentationModel, config: Config) -> str:
    shape = model.backbone.shape
    params = sum(p.numel() for p in model.parameters()) / 1e6
    head = sum(p.numel() for p in model.decode_head.parameters()) / 1e6
    return (f"segmentation model: {config.segment.init} encoder (embed {shape.embed_dim}, depths {list(shape.depths)}),"
            f" UperNet head of {config.segment.head_channels} channels, {model.num_classes} classes; "
            f"{params:.2f}M parameters ({head:.2f}M in the head)")



def is_segmenter_file(source: str | Path) -> bool:
    """A `mixmae export` of a segmentation run (its metadata says so), not an encoder or a classifier."""
    from mixmae_scale.models.convert_official import read_metadata

    path = Path(source)
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    try:
        return read_metadata(path).get("kind") == "segment"
    except WeightsError:  # not readable: the classifier's loader says so, with the option's name
        return False


def load_segmenter(source: str | Path, option: str = "--init") -> tuple[SegmentationModel, dict]:
    """The segmentation model of a `mixmae export` of a segmentation run, and its settings (classes, ignore index,
    crop size), for evaluation."""
    from mixmae_scale.models.convert_official import load_weights

    path = Path(source)
    if not is_segmenter_file(path):
        raise WeightsError(f"{option} {source}: not a segmentation model; export a `mixmae segment` run with "
                           f"`mixmae export RUN` (it writes RUN/segmenter.safetensors) and evaluate that")
    state, arch = load_weights(path)
    settings = arch["segment"]
    backbone = backbone_from_weights({k.removeprefix("backbone."): v for k, v in state.items()
                                      if k.startswith("backbone.")})
    head = UperHead(backbone.out_channels, settings["head_channels"], settings["num_classes"],
                    settings["pool_scales"])
    head.load_state_dict({k.removeprefix("decode_head."): v for k, v in state.items()
                          if k.startswith("decode_head.")})
    return SegmentationModel(backbone, head), settings
