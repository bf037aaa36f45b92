"""The random crop and flip each training sample gets, drawn from the sample's identity, not from a stream.

Both loaders apply the same windows (DALI decodes only the window, `decoders.image_slice`; the PyTorch
fallback crops with Pillow), so a sample's augmentation depends on (seed, epoch, visit, index) alone:
it is the same on any number of ranks, after any resume, and in either backend. The window follows
torchvision's RandomResizedCrop (10 tries at a random area and log-uniform aspect ratio, then a
centre crop at the nearest allowed ratio), in coordinates normalised to the image's size so that a
decoder that applies EXIF orientation still crops inside the image.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from mixmae_scale.seeds import stream_seed


def image_size(data: bytes | memoryview) -> tuple[int, int]:
    """(width, height) from the header alone (Pillow reads no pixels here)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def crop_window(rng: np.random.Generator, width: int, height: int, scale: tuple[float, float],
                ratio: tuple[float, float]) -> tuple[float, float, float, float]:
    """(x0, y0, w, h) as fractions of the image's width and height."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            return x0 / width, y0 / height, w / width, h / height
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2 / width, (height - h) // 2 / height, w / width, h / height


def sample_augmentation(seed: int, uid: tuple[int, ...], data: bytes | memoryview, scale: tuple[float, float],
                        ratio: tuple[float, float], hflip: float) -> tuple[tuple[float, float, float, float], bool]:
    """The crop window and the flip of the sample `uid` (epoch, visit, index) under `seed`."""
    rng = np.random.default_rng(stream_seed("augment", seed, *uid))
    width, height = image_size(data)
    window = crop_window(rng, width, height, scale, ratio)
    return window, bool(rng.uniform() < hflip)
