"""Real shard sets of a few images, converted by `mixmae shards folder` from JPEGs written here: the sets a user with
a tiny, odd image folder makes (one class, a validation split of an image or two, no validation split at all)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def tiny_set(root: Path, per_class: dict[str, int], val_fraction: float = 0.0, size: int = 32) -> Path:
    """`root`/shards, converted from a folder of `per_class[name]` JPEGs per class folder (distinct colours), with
    `val_fraction` of each class held out as 'val' (0: a train split only)."""
    from mixmae_scale.shards.convert import ConvertOptions, convert

    images = root / "images"
    for c, (name, count) in enumerate(per_class.items()):
        (images / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (size, size), (40 * c % 256, 7 * i % 256, 90)).save(images / name / f"{i:03d}.jpg")
    splits = ("train", "val") if val_fraction else ("train",)
    convert(images, root / "shards", ConvertOptions(layout="folder", splits=splits, shard_bytes=None,
                                                     val_fraction=val_fraction))
    return root / "shards"
