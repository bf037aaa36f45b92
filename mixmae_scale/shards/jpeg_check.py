"""Deciding, cheaply, whether an image file can go into a shard byte for byte.

GPU JPEG decoders want baseline RGB (3-component YCbCr) JPEG. Reading the marker segments up to the
frame header answers that without decoding, so the common case (a good ImageNet JPEG) costs a
header scan; only files that fail it are decoded with Pillow, then converted or rejected.

Pixel policy: the header (or Pillow's lazy open, which reads no pixels) gives the size first. Above
Pillow's decompression-bomb limit (2 x `Image.MAX_IMAGE_PIXELS`, about 179 MP) a file is rejected
without being decoded: a 31 KB PNG can claim 256 MP. Above `max_pixels` (40 MP by default) it is
downscaled to fit, JPEGs through Pillow's draft mode (the decoder itself scales by 1/2 to 1/8), or
rejected, by choice: a 9000 x 9000 JPEG copied as is costs 81 MP of decoding every epoch.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

from PIL import Image, UnidentifiedImageError

from mixmae_scale.data.pixels import PixelError, to_rgb8

BOMB_PIXELS = 2 * Image.MAX_IMAGE_PIXELS  # Pillow refuses to open anything larger
DEFAULT_MAX_PIXELS = 40_000_000
Oversize = Literal["downscale", "reject"]

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


ORIENTATION = 0x0112  # the EXIF orientation tag


def orientation_of(image: Image.Image) -> int | None:
    """The image's EXIF orientation tag (JPEG APP1, PNG eXIf, TIFF, WebP), or None."""
    try:
        value = image.getexif().get(ORIENTATION)
    except Exception:  # noqa: BLE001 - a damaged EXIF block only means no tag to carry
        return None
    return value if isinstance(value, int) and 1 <= value <= 8 else None


def _encode_rgb(image: Image.Image, quality: int, resize_shorter: int | None, max_pixels: int | None = None,
                orientation: int | None = None) -> tuple[bytes, int, int]:
    """JPEG bytes of `image`, resized as asked. `orientation` (the source's EXIF tag) is written into the new file,
    alone: a baseline JPEG is copied with its tag, so a re-encoded one (progressive, CMYK, gray, PNG, resized)
    dropping it trained some images of one set rotated by data.exif_orientation and others not. The pixels are
    resized as stored, so the tag still describes them."""
    image = to_rgb8(image)  # 16-bit and float images scaled as DALI scales them; convert("RGB") saturated them
    scale = 1.0
    if resize_shorter and min(image.size) > resize_shorter:
        scale = resize_shorter / min(image.size)
    if max_pixels and image.width * image.height * scale * scale > max_pixels:
        scale = math.sqrt(max_pixels / (image.width * image.height))
    if scale < 1.0:
        size = (max(1, math.floor(image.width * scale)), max(1, math.floor(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    tags = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        tags["exif"] = exif.tobytes()
    image.save(out, format="JPEG", quality=quality, optimize=False, progressive=False, subsampling="4:2:0", **tags)
    return out.getvalue(), image.width, image.height


def _open(data: bytes) -> Image.Image:
    """Header only: size, mode and format, no pixels. Pillow's own size warnings are ours to decide."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def _decode(data: bytes, fit_pixels: int | None = None) -> Image.Image:
    image = _open(data)
    if fit_pixels and image.format == "JPEG" and image.width * image.height > fit_pixels:
        scale = math.sqrt(fit_pixels / (image.width * image.height))
        image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES stays False)
    return image


def _pillow_reason(exc: BaseException) -> str:
    """Pillow's message without the in-memory stream it names ('cannot identify image file <_io.BytesIO object
    at 0x7f...>'), which tells the user nothing: the rejection already names the file."""
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc)).strip() or type(exc).__name__


# What a file's first bytes say it is. The reason a file is rejected names what it is (a text file named .png, a
# PDF named .jpg), not only what it is not: "not a JPEG stream" sent a user looking for a broken JPEG.
IMAGE_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
                    (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
OTHER_SIGNATURES = ((b"%PDF", "a PDF document"), (b"PK\x03\x04", "a ZIP archive (or a document made of one)"),
                    (b"\x1f\x8b", "gzip-compressed data"), (b"7z\xbc\xaf", "a 7-Zip archive"))
SIGNATURE_NAMES = "JPEG, PNG, GIF, WebP, BMP or TIFF"
LFS_POINTER = b"version https://git-lfs.github.com/spec/"  # what git leaves in place of a file it did not fetch


def _signature(data: bytes) -> str | None:
    """The image format whose signature `data` starts with, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"avif"):
        return "HEIC/AVIF"
    return next((name for magic, name in IMAGE_SIGNATURES if data.startswith(magic)), None)


def _as_text(head: bytes) -> str | None:
    """`head` (a file's first bytes) as UTF-8 text, or None. A byte-order mark, which editors and spreadsheets put
    before a UTF-8 CSV, is no character of the text; a character cut by the end of the window is still text, but a
    byte that is not UTF-8 anywhere before the end makes it not text (dropping such bytes called binary data text)."""
    head = head.removeprefix(b"\xef\xbb\xbf")
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason == "unexpected end of data" and exc.end == len(head) and len(head) - exc.start < 4:
            return head[:exc.start].decode("utf-8", "strict")
        return None


def what_the_bytes_are(data: bytes) -> str:
    """What a file Pillow could not open is, by its first bytes: an image format whose data is damaged (or one
    Pillow does not read), a known other kind of file, text, or unknown bytes. Text comes before the BMP and GIF
    signatures, which are printable ('BM', 'GIF89a'): a CSV whose first word starts with BM was said to be a
    damaged BMP."""
    image = _signature(data)
    if data.startswith(LFS_POINTER):  # text, but text that says where the image is
        return ("a Git LFS pointer file, not the image: the files were cloned without their LFS objects (a Hugging "
                "Face dataset cloned without git-lfs); fetch them (`git lfs install && git lfs pull` in the clone) and "
                "run the same command again")
    if image == "HEIC/AVIF":
        return "a HEIC/AVIF image, which Pillow does not read without a plugin: convert it to JPEG or PNG first"
    text = _as_text(data[:512])
    is_text = bool(text) and all(c.isprintable() or c in "\t\r\n" for c in text)
    if image is not None and not is_text:
        return f"a {image} signature, but the data after it is not a readable {image}"
    other = next((name for magic, name in OTHER_SIGNATURES if data.startswith(magic)), None)
    if other is not None:
        return other
    if is_text:
        if image is not None:
            return f"text, not a {image} (it starts {data[:8]!r}, whose first bytes a {image} also starts with)"
        return f"text (no {SIGNATURE_NAMES} signature)"
    return f"no {SIGNATURE_NAMES} signature (it starts {data[:8].hex(' ')})"


def _claimed(name: str) -> str:
    """', named .png': the format a file's name claims, said beside what its bytes are."""
    suffix = PurePosixPath(name).suffix
    return f", named {suffix}" if suffix else ""


def _megapixels(width: int, height: int) -> str:
    return f"{width} x {height} = {width * height / 1e6:.1f} MP"


def prepare_image(data: bytes, quality: int = 95, resize_shorter: int | None = None,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS, oversize: Oversize = "downscale",
                  name: str = "") -> Prepared:
    """Bytes ready for a shard: the original JPEG when it is baseline RGB and within the pixel limit, else
    a converted copy, or a rejection with its reason. `name`: the file's name, whose suffix a rejection of a file
    that is no image names beside what its bytes are."""
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
    if header is not None:
        width, height = header.width, header.height
    else:
        try:
            opened = _open(data)
        except Image.DecompressionBombError as exc:
            return Prepared(None, 0, 0, "rejected", f"decompression bomb, not decoded: {_pillow_reason(exc)}")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            return Prepared(None, 0, 0, "rejected",
                            f"not an image: {what_the_bytes_are(data)}{_claimed(name)}: {_pillow_reason(exc)}")
        width, height = opened.size
        why = opened.format or why  # a PNG (or WebP, ...) is converted, and counted as what it is
    if width * height > BOMB_PIXELS:
        return Prepared(None, width, height, "rejected", f"decompression bomb: {_megapixels(width, height)} is above "
                        f"Pillow's limit of {BOMB_PIXELS / 1e6:.0f} MP; not decoded")
    too_big = bool(max_pixels) and width * height > max_pixels
    if too_big and oversize == "reject":
        return Prepared(None, width, height, "rejected", f"{_megapixels(width, height)} is above the limit of "
                        f"{max_pixels / 1e6:g} MP (oversize=reject)")
    if why is None and resize_shorter is None and not too_big:
        return Prepared(data, width, height, "copied")
    try:
        image = _decode(data, max_pixels if too_big else None)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        reason = "truncated or corrupt image" if header is not None else "not an image"
        return Prepared(None, 0, 0, "rejected", f"{reason} ({why}): {_pillow_reason(exc)}")
    mode, source_format = image.mode, image.format  # to_rgb8 returns an image without a format
    orientation = orientation_of(image)
    try:
        image = to_rgb8(image)
    except PixelError as exc:
        return Prepared(None, width, height, "rejected", str(exc))
    if too_big:
        encoded, new_width, new_height = _encode_rgb(image, quality, resize_shorter, max_pixels, orientation)
        return Prepared(encoded, new_width, new_height,
                        f"converted:downscaled ({_megapixels(width, height)} > {max_pixels / 1e6:g} MP)")
    if why is None:  # a good JPEG that only needs resizing
        encoded, width, height = _encode_rgb(image, quality, resize_shorter, orientation=orientation)
        return Prepared(encoded, width, height, "resized")
    if why == "no end-of-image marker":
        # Pillow decoded it in full, so only the trailer is unusual: keep the original bytes.
        return Prepared(data, width, height, "copied")
    encoded, width, height = _encode_rgb(image, quality, resize_shorter, orientation=orientation)
    detail = mode if header is None else f"{source_format} {mode}"
    return Prepared(encoded, width, height, f"converted:{why} ({detail})")
