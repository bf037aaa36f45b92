"""Deciding, cheaply, whether an image file can go into a shard byte for byte.

GPU JPEG decoders want baseline RGB (3-component YCbCr) JPEG. Reading the marker segments up to the
frame header answers that without decoding, so the common case (a good ImageNet JPEG) costs a
header scan; only files that fail it are decoded with Pillow, then converted or rejected.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

BASELINE_SOF = {0xC0, 0xC1}  # baseline and extended sequential Huffman
OTHER_SOF = {0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass(frozen=True)
class JpegHeader:
    sof: int
    components: int
    width: int
    height: int
    adobe_transform: int | None


def scan_jpeg(data: bytes) -> JpegHeader | None:
    """The frame header of a JPEG, or None when the bytes are not a parseable JPEG stream."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos, adobe = 2, None
    n = len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2 or pos + 2 + length > n:
            return None
        segment = data[pos + 4:pos + 2 + length]
        if marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe = segment[11]
        if marker in BASELINE_SOF or marker in OTHER_SOF:
            if len(segment) < 6:
                return None
            height = int.from_bytes(segment[1:3], "big")
            width = int.from_bytes(segment[3:5], "big")
            return JpegHeader(marker, segment[5], width, height, adobe)
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + length
    return None


def _ends_with_eoi(data: bytes) -> bool:
    tail = data[-64:].rstrip(b"\x00")  # a few encoders pad after the end marker
    return tail.endswith(b"\xff\xd9")


@dataclass(frozen=True)
class Prepared:
    data: bytes | None  # None when rejected
    width: int
    height: int
    action: str  # copied | converted:<why> | resized | rejected
    reason: str = ""


def _encode_rgb(image: Image.Image, quality: int, resize_shorter: int | None) -> tuple[bytes, int, int]:
    image = image.convert("RGB")
    if resize_shorter and min(image.size) > resize_shorter:
        scale = resize_shorter / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality, optimize=False, progressive=False, subsampling="4:2:0")
    return out.getvalue(), image.width, image.height


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES stays False)
    return image


def prepare_image(data: bytes, quality: int = 95, resize_shorter: int | None = None) -> Prepared:
    """Bytes ready for a shard: the original JPEG when it is baseline RGB, else a converted copy."""
    if not data:
        return Prepared(None, 0, 0, "rejected", "zero-byte file")
    header = scan_jpeg(data)
    why = None
    if header is None:
        why = "not a JPEG stream"
    elif header.sof not in BASELINE_SOF:
        why = "progressive or non-baseline JPEG"
    elif header.components == 1:
        why = "grayscale JPEG"
    elif header.components == 4:
        why = "CMYK/YCCK JPEG"
    elif header.components != 3 or header.adobe_transform == 0:
        why = f"{header.components}-component JPEG without YCbCr transform"
    elif not _ends_with_eoi(data):
        why = "no end-of-image marker"
    if why is None and resize_shorter is None:
        return Prepared(data, header.width, header.height, "copied")
    try:
        image = _decode(data)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        reason = "truncated or corrupt image" if header is not None else "not an image"
        return Prepared(None, 0, 0, "rejected", f"{reason} ({why}): {exc}")
    if why is None:  # a good JPEG that only needs resizing
        encoded, width, height = _encode_rgb(image, quality, resize_shorter)
        return Prepared(encoded, width, height, "resized")
    if why == "no end-of-image marker":
        # Pillow decoded it in full, so only the trailer is unusual: keep the original bytes.
        return Prepared(data, header.width, header.height, "copied")
    encoded, width, height = _encode_rgb(image, quality, resize_shorter)
    return Prepared(encoded, width, height, f"converted:{why} ({image.format} {image.mode})")
