"""Reconstruction pictures: what the encoder saw and what each decoder stream made of it.

One row per image pair (i, B-1-i): the two originals, the mask, the mixed input, each stream's
reconstruction (de-normalised per patch with the target's own mean and variance, as norm-pix
training implies) and image i with its visible cells pasted back over the prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from mixmae_scale.atomic_file import replacing
from mixmae_scale.data.spec import IMAGENET_MEAN, IMAGENET_STD
from mixmae_scale.models.mixing import upsample_mask
from mixmae_scale.models.mixmae import MixMAE, patchify, unpatchify

PANELS = ("image i", "image B-1-i", "mask", "mixed input", "stream 1 (i)", "stream 2 (B-1-i)", "i, visible pasted")
GAP = 2
HEADER = 14


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


def grid(rec: Reconstruction, pairs: int | None = None) -> np.ndarray:
    """An (H, W, 3) uint8 picture: a header row of panel names, then one row per pair."""
    batch, _, size, _ = rec.originals.shape
    pairs = min(pairs or batch // 2, batch // 2)
    width = len(PANELS) * size + (len(PANELS) + 1) * GAP
    height = HEADER + pairs * size + (pairs + 1) * GAP
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    mask_rgb = rec.mask_image[None].repeat(3, 1, 1)
    for row in range(pairs):
        panels = [rec.originals[row], rec.originals[batch - 1 - row], mask_rgb, rec.mixed[row], rec.stream1[row],
                  rec.stream2[row], rec.pasted[row]]
        top = HEADER + GAP + row * (size + GAP)
        for col, panel in enumerate(panels):
            left = GAP + col * (size + GAP)
            canvas[top:top + size, left:left + size] = (panel.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for col, name in enumerate(PANELS):
        draw.text((GAP + col * (size + GAP), 1), name[: max(4, size // 6)], fill=(0, 0, 0))
    return np.asarray(image)


def save_png(picture: np.ndarray, path) -> None:
    with replacing(path) as tmp:
        Image.fromarray(picture).save(tmp)


def first_images(shards: str, split: str, count: int, img_size: int, backend: str = "dali") -> torch.Tensor:
    """The first `count` images of a split, evaluation view (resize, centre crop), normalised."""
    from mixmae_scale.data.loader import ShardLoader
    from mixmae_scale.data.spec import PipelineSpec

    spec = PipelineSpec(mode="eval", img_size=img_size, batch_size=count, num_threads=1)
    batch, valid = next(ShardLoader(shards, split, spec, backend, 1).eval_batches())
    if valid < count:
        raise ValueError(f"split '{split}' of {shards} has fewer than {count} images")
    return batch.images[:count]


def visualize(source: str, shards: str, out, pairs: int = 4, split: str = "val", seed: int = 0,
              backend: str = "dali") -> dict:
    """The grid for weights from a run folder, an exported encoder+decoder file or an official checkpoint."""
    from mixmae_scale.finetune.pretrained import load_encoder
    from mixmae_scale.models.convert_official import build_from_architecture

    state, arch = load_encoder(source)
    if "decoder_dim" not in arch:
        raise ValueError(f"{source}: no decoder weights; export with --with-decoder or use the run folder")
    model = build_from_architecture(arch).eval()
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")}, strict=True)
    images = first_images(shards, split, 2 * pairs, arch["img_size"], backend)
    mask = model.sample_mask(torch.Generator().manual_seed(seed))
    picture = grid(reconstruct(model, images, mask), pairs)
    save_png(picture, out)
    return {"source": str(source), "out": str(out), "pairs": pairs, "size": list(picture.shape)}
