"""Which file names are images: one list that conversion (shards/sources.py) and the manifest's hint for a folder
of images (data/manifest.py) share, so that `mixmae shards folder` and the error that suggests it agree."""

from __future__ import annotations

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)
