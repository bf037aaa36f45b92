"""One conversion of a decoded image to 8-bit RGB, the same for the shard converter and the torch loader, and
the same as DALI's decoder, so that an image reads alike whichever path it takes.

Pillow's `convert("RGB")` does not scale: it clips, so a 16-bit image (modes I;16, I;16B, I) comes out almost
white (a 0..65535 gradient at mean 254) and a float one (mode F) black, where DALI scales both to 0..255.
DALI's rules, measured on its CPU decoder (2.4): 16-bit values v -> round(v / 257) (65535 -> 255), floats
v -> round(clip(v, 0, 1) x 255).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class PixelError(ValueError):
    """The image's values have no faithful 8-bit form; the message names the mode and the range."""


def to_rgb8(image: Image.Image, strict: bool = True) -> Image.Image:
    """`image` as 8-bit RGB, scaled as DALI's decoder scales it.

    `strict` (the converter): values DALI would clip (a 32-bit integer image above 65535, a float image
    outside 0..1, NaN) raise PixelError instead, since the written JPEG would keep the clipped pixels for good.
    Not strict (the loader, reading what is already in a shard): clipped as DALI clips, so both loaders agree."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        if strict and values.size and (values.min() < 0 or values.max() > 65535):
            raise PixelError(f"mode {image.mode} (integer) values {values.min()}..{values.max()} do not fit 16 bits, "
                             "the range scaled to 0..255; save the image as 8- or 16-bit")
        gray = (np.clip(values, 0, 65535) + 128) // 257  # round(v / 257): integers never fall on a half
        return Image.fromarray(gray.astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if strict and values.size and (not np.isfinite(values).all() or values.min() < 0 or values.max() > 1):
            raise PixelError(f"mode F (32-bit float) values {np.nanmin(values):g}..{np.nanmax(values):g} are outside "
                             "0..1, the range DALI's decoder maps to 0..255 (it clips the rest to black or white); "
                             "rescale the image to 0..1 or save it as 8- or 16-bit")
        gray = np.round(np.clip(np.nan_to_num(values), 0.0, 1.0) * 255)
        return Image.fromarray(gray.astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")
