"""Reconstruction pictures: what the encoder saw and what each decoder stream made of it.

One row per image pair: image A (image i of the batch) and its partner B (image B-1-i) are mixed
cell by cell; the encoder sees only the mixed input, and each decoder stream reconstructs one of the
two images. A stream's loss counts only the cells hidden from it, the partner's. Columns, in plain
words: the two originals, the mask (with a key), the mixed input, each reconstruction, and A with
its own pixels kept and only its hidden cells predicted. The title says which run and step; a note
under the grid says what to look for, since norm-pix training predicts each cell normalised and the
cells' colours are put back from the original.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mixmae_scale.atomic_file import replacing
from mixmae_scale.data.shard_sets import ShardMixture
from mixmae_scale.data.spec import IMAGENET_MEAN, IMAGENET_STD
from mixmae_scale.models.mixing import upsample_mask
from mixmae_scale.models.mixmae import MixMAE, patchify, unpatchify

PANELS = ("original A", "original B", "mask", "mixed input", "A reconstructed", "B reconstructed",
          "A: own pixels\n+ predicted")
FROM_A = np.array([0.95, 0.62, 0.25])  # mask colours: cells of A in the mixed input, and cells of B
FROM_B = np.array([0.25, 0.45, 0.75])
READING_NOTE = ("The encoder sees only the mixed input; each stream reconstructs one image, and its loss counts "
                "only the cells it did not see (the partner's). With norm-pix loss each cell is predicted "
                "normalised and shown with the original cell's mean and contrast, so judge shapes, not colours: "
                "at first the hidden cells are noise, then smooth blobs; edges and textures that continue across "
                "cell borders mean the model has learned.")


@dataclass
class Reconstruction:
    originals: torch.Tensor  # (B, 3, S, S) in [0, 1]
    mask_image: torch.Tensor  # (S, S): 1 where the partner's pixels were shown
    mixed: torch.Tensor  # (B, 3, S, S)
    stream1: torch.Tensor  # (B, 3, S, S): row i reconstructs image i
    stream2: torch.Tensor  # (B, 3, S, S): row i reconstructs image B-1-i
    pasted: torch.Tensor  # (B, 3, S, S): image i, visible cells original, hidden ones predicted


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float().cpu() * std + mean).clamp(0, 1)


def _denormalise(pred: torch.Tensor, images: torch.Tensor, cell: int, norm_pix: bool) -> torch.Tensor:
    """Predicted patches back to pixels, with each target patch's own mean and variance."""
    if norm_pix:
        target = patchify(images.float(), cell)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred.float() * (var + 1.0e-6) ** 0.5 + mean
    return unpatchify(pred.float(), cell)


@torch.no_grad()
def reconstruct(model: MixMAE, images: torch.Tensor, mask: torch.Tensor) -> Reconstruction:
    """`images` are normalised (B, 3, S, S) with B even. Under ZeRO-3 every rank must call this (the
    submodules gather their weights collectively)."""
    batch = images.shape[0]
    images = images.float()
    features = model.forward_encoder(images.to(next(model.parameters()).dtype), mask).flatten(1, 2)
    streams = model.decoder(features, mask)  # (2B, L, P)
    partner = images.flip(0)
    stream1 = _denormalise(streams[:batch], images, model.cell, model.norm_pix_loss)
    stream2 = _denormalise(streams[batch:], partner, model.cell, model.norm_pix_loss)
    m = upsample_mask(mask.float().cpu(), images.shape[-1])
    originals = _to_unit(images.float())
    mixed = originals * (1 - m) + originals.flip(0) * m
    pasted = originals * (1 - m) + _to_unit(stream1) * m
    return Reconstruction(originals, m, mixed, _to_unit(stream1), _to_unit(stream2), pasted)


def panels(rec: Reconstruction, row: int) -> list[np.ndarray]:
    """The (S, S, 3) float pictures of one row, in the order of PANELS; the mask in its key's colours."""
    batch = rec.originals.shape[0]
    mask = rec.mask_image.cpu().numpy()[..., None]
    coloured_mask = (1 - mask) * FROM_A + mask * FROM_B
    pictures = [rec.originals[row], rec.originals[batch - 1 - row], None, rec.mixed[row], rec.stream1[row],
                rec.stream2[row], rec.pasted[row]]
    return [coloured_mask if p is None else p.permute(1, 2, 0).cpu().numpy() for p in pictures]


def grid(rec: Reconstruction, pairs: int | None = None, title: str = "", note: str = READING_NOTE) -> np.ndarray:
    """An (H, W, 3) uint8 picture: the title, named columns, one row per pair, the mask's key and a note."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    batch, _, size, _ = rec.originals.shape
    pairs = min(pairs or batch // 2, batch // 2)
    cell_in = max(size, 128) / 100  # small images are drawn larger, so that the column names fit
    width = len(PANELS) * cell_in + 0.3
    note_lines = textwrap.wrap(note, width=int(width * 20)) if note else []
    foot_in = 0.35 + 0.16 * len(note_lines)
    head_in = 0.75
    fig = Figure(figsize=(width, head_in + pairs * cell_in + foot_in), dpi=100)
    FigureCanvasAgg(fig)
    height = head_in + pairs * cell_in + foot_in
    for row in range(pairs):
        for col, picture in enumerate(panels(rec, row)):
            ax = fig.add_axes((0.15 / width + col * cell_in / width, 1 - (head_in + (row + 1) * cell_in) / height,
                               0.96 * cell_in / width, 0.96 * cell_in / height))
            ax.imshow(np.clip(picture, 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(PANELS[col], fontsize=9)
    fig.suptitle(title or "reconstructions", fontsize=11, y=1 - 0.12 / height, va="top")
    fig.legend(handles=[Patch(color=FROM_A, label="mask: cell of A in the mixed input (hidden from B's stream)"),
                        Patch(color=FROM_B, label="cell of B (hidden from A's stream)")],
               loc="lower left", bbox_to_anchor=(0.1 / width, (0.05 + 0.16 * len(note_lines)) / height),
               ncol=2, fontsize=8, frameon=False, handlelength=1.2)
    if note_lines:
        fig.text(0.15 / width, 0.05 / height, "\n".join(note_lines), fontsize=7.5, color="0.25", va="bottom")
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_png(picture: np.ndarray, path) -> None:
    with replacing(path) as tmp:
        Image.fromarray(picture).save(tmp)


def first_images(shards: str | ShardMixture, split: str, count: int, img_size: int, backend: str = "dali",
                 at_least: int | None = None) -> torch.Tensor:
    """The first `count` images of a split (or of a part of one, a mixture of one set), evaluation view (resize,
    centre crop), normalised; fewer, down to `at_least` (default: `count`), where the split holds fewer."""
    from mixmae_scale.data.errors import DataError
    from mixmae_scale.data.loader import ShardLoader
    from mixmae_scale.data.loaders import eval_spec

    spec = eval_spec(img_size, count, 1)
    batch, valid = next(ShardLoader(shards, split, spec, backend, 1).eval_batches())
    need = count if at_least is None else at_least
    if valid < need:
        raise DataError(f"split '{split}' of {where(shards)} has {valid} image{'s' * (valid != 1)}, fewer than the "
                        f"{need} asked for")
    return batch.images[:min(valid, count)]


def where(shards: str | ShardMixture) -> str:
    """A shard set's location for a message (a mixture's repr is an object address)."""
    if isinstance(shards, ShardMixture):
        return ", ".join(str(entry.shards.location) for entry in shards.sets)
    return str(shards)


def describe_source(source: str | Path) -> str:
    """Where weights come from, for a title: the run and step of a run folder or of a file `mixmae export`
    wrote, else the file's name."""
    from mixmae_scale.engine.export import find_checkpoint, step_of
    from mixmae_scale.models.convert_official import read_metadata

    path = Path(source)
    if path.is_dir():
        folder, tag = find_checkpoint(path, option="source")
        return f"run {folder.parent.name}, step {step_of(tag)}"
    if path.suffix == ".safetensors":
        metadata = read_metadata(path)
        if "run" in metadata:
            return f"run {metadata['run']}, step {metadata.get('step', '?')} ({path.name})"
    return path.name


def visualize(source: str, shards: str, out, pairs: int = 4, split: str = "val", seed: int = 0,
              backend: str = "dali") -> dict:
    """The grid for weights from a run folder, an exported encoder+decoder file or an official checkpoint."""
    from mixmae_scale.finetune.evaluate import require_folder
    from mixmae_scale.finetune.pretrained import load_encoder
    from mixmae_scale.models.convert_official import WeightsError, build_from_architecture

    require_folder(shards, "--data")
    state, arch = load_encoder(source, "source")
    if "decoder_dim" not in arch:
        raise WeightsError(f"source {source}: no decoder weights; name the run folder, or export with "
                           "`mixmae export RUN --with-decoder`")
    model = build_from_architecture(arch).eval()
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")}, strict=True)
    images = first_images(shards, split, 2 * pairs, arch["img_size"], backend, at_least=0)
    if len(images) < 2 * pairs:  # a small folder's --val-fraction split: the way out is an option of this command
        from mixmae_scale.data.errors import DataError

        fit, other = len(images) // 2 * 2, "val" if split == "train" else "train"
        way = (f"ask for {fit} with --images {fit}, or show another split (--split {other})" if fit else
               f"show another split (--split {other}): a grid pairs images, 2 at the least")
        raise DataError(f"split '{split}' of {where(shards)} has {len(images)} image{'s' * (len(images) != 1)}, "
                        f"fewer than the {2 * pairs} asked for: {way}")
    mask = model.sample_mask(torch.Generator().manual_seed(seed))
    title = f"{describe_source(source)}: the first {2 * pairs} images of split '{split}', mask seed {seed}"
    picture = grid(reconstruct(model, images, mask), pairs, title=title)
    save_png(picture, out)
    return {"source": str(source), "title": title, "out": str(out), "pairs": pairs, "size": list(picture.shape)}
