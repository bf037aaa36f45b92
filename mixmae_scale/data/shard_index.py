"""One shard's index: where each sample's image, label and metadata bytes sit inside its tar.

The index is DALI's wds2idx text ("v1.2 N", then per sample "ext data_offset size member_name" for each
member), written by `mixmae shards` and `mixmae shards adopt` for exactly the samples training may read.
With it a rank reads a run of samples as one byte range (one request on object storage) and slices
the members out of the stream, instead of asking for each member separately.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from mixmae_scale.data import storage
from mixmae_scale.data.errors import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TAR_HEADER = 512  # the header block right before a member's data: a reader checks it (tar_header_holds)
MASK_EXTENSION = "seg.png"  # the segmentation mask (shards/masks.py)


@dataclass(frozen=True)
class ShardIndex:
    """Per sample (arrays of one length): the image's data offset and size, the label member's (size 0: none),
    the metadata (`json`) member's and the segmentation mask's (`seg.png`); `keys` names each sample as the tar
    does."""

    url: str
    keys: tuple[str, ...]
    image_offset: np.ndarray
    image_size: np.ndarray
    label_offset: np.ndarray
    label_size: np.ndarray
    meta_offset: np.ndarray
    meta_size: np.ndarray
    mask_offset: np.ndarray
    mask_size: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def span(self, first: int, stop: int) -> tuple[int, int]:
        """The byte range [start, end) of the tar that holds every member samples first..stop-1 need, with the
        header block of each image."""
        starts = [self.image_offset[first:stop] - TAR_HEADER]
        ends = [self.image_offset[first:stop] + self.image_size[first:stop]]
        for offset, size in ((self.label_offset, self.label_size), (self.meta_offset, self.meta_size),
                             (self.mask_offset, self.mask_size)):
            present = size[first:stop] > 0
            starts.append(offset[first:stop][present])
            ends.append((offset + size)[first:stop][present])
        return int(min(s.min() for s in starts if len(s))), int(max(e.max() for e in ends if len(e)))


def tar_header_holds(header: bytes, size: int) -> bool:
    """Whether `header` is a tar header block (its checksum holds) for a member of `size` bytes. Read right before
    an image's data, it tells a shard rewritten since it was indexed (at the same size: a rerun of a writer, a
    reshuffle) from the one indexed, where a read by offsets alone would hand out other bytes as this image."""
    if len(header) != TAR_HEADER:
        return False
    try:
        stored = int(header[148:156].replace(b"\0", b" ").strip() or b"-1", 8)
        if header[124] & 0x80:  # GNU base-256 for sizes past 8 GiB
            declared = int.from_bytes(header[125:136], "big")
        else:
            declared = int(header[124:136].replace(b"\0", b" ").strip() or b"-1", 8)
    except ValueError:
        return False
    return declared == size and stored == sum(header[:148]) + 8 * 32 + sum(header[156:])


def _unsafe(name: str) -> bool:
    return name.startswith("/") or ".." in PurePosixPath(name).parts


def parse_index(text: str, where: str) -> ShardIndex:
    """`where` names the index in errors (its path or URL)."""
    lines = text.splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or not header[0].startswith("v") or not header[1].isdigit():
        raise DataError(f"{where}: not a wds2idx index (first line {lines[0] if lines else ''!r})")
    count = int(header[1])
    rows = lines[1:1 + count]
    if len(rows) != count:
        raise DataError(f"{where}: the header says {count} samples, the file lists {len(rows)}")
    keys: list[str] = []
    columns = np.zeros((8, count), dtype=np.int64)
    for number, line in enumerate(rows):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise DataError(f"{where}:{number + 2}: expected 'ext offset size name' per member, got {line!r}")
        key = None
        for ext, offset, size, name in zip(fields[0::4], fields[1::4], fields[2::4], fields[3::4], strict=True):
            if _unsafe(name):
                raise DataError(f"{where}:{number + 2}: member name {name!r} is absolute or contains '..'; refusing a "
                                "shard that could write outside its folder")
            ext = ext.lower()
            slot = {"cls": 2, "json": 4, MASK_EXTENSION: 6}.get(ext, 0 if ext in IMAGE_EXTENSIONS else None)
            if slot is not None and columns[slot + 1, number] == 0:
                columns[slot, number], columns[slot + 1, number] = int(offset), int(size)
            if key is None:
                key = name[: len(name) - len(ext) - 1] if name.lower().endswith("." + ext) else name
        if columns[1, number] == 0:
            raise DataError(f"{where}:{number + 2}: sample {key} has no image member ({', '.join(IMAGE_EXTENSIONS)})")
        keys.append(key or "")
    return ShardIndex(where, tuple(keys), *columns)


def read_index(url: str) -> ShardIndex:
    try:
        text = storage.read_text(url)
    except storage.StorageError as exc:
        raise DataError(f"{exc}: the shard's index (rebuild it with `mixmae shards adopt` or `mixmae shards`)") \
            from exc
    return parse_index(text, url)
