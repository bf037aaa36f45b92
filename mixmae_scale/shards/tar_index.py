"""Indexing a WebDataset tar in one pass over its bytes: DALI's index for the samples training can read,
and a reason for every sample and member it cannot.

One pass because the tar may be an object in a store that bills per request: the bytes come from one
stream (one GET), tarfile reads its headers in stream mode, and the same pass hashes the file and, with
`decode`, decodes the images. Samples follow webdataset and DALI: a member's key is its folder plus its
basename up to the first dot, the extension is the rest; consecutive members with one key form a sample;
hidden names (a basename starting with a dot) belong to no sample. A sample that training could not use,
or could not use unambiguously, is left out of the index with its reason:
- a member name that is absolute or has '..', or that DALI's space-separated index cannot hold (whitespace,
  bytes that are not UTF-8);
- a key that appears again later in the tar (two runs of members for one key: which is the sample?);
- no image member (jpg, jpeg, png or webp, in any case), or more than one: we reject rather than keep
  the first, so that the sample trained on never depends on member order;
- an empty image, a `cls` that is not a class index (data/labels.py), an image that does not decode or is in
  a format DALI's decoder does not read, such as a GIF renamed .jpg (with `decode`);
- the tar ends inside the sample or right after it without the end-of-archive marker: the samples before
  the cut are complete and are kept, the one at the cut may have lost members.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import warnings
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from mixmae_scale.data.labels import UNLABELED, parse_cls
from mixmae_scale.shards.jpeg_check import BOMB_PIXELS, LFS_POINTER, OTHER_SIGNATURES

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTENSION = "cls"
MASK_EXTENSION = "seg.png"  # a segmentation mask (shards/masks.py): not an image member, so one per sample is fine
INDEX_VERSION = "v1.2"
KEY_APART = "times apart in this tar"  # in the reason of a key whose members are not consecutive
KEY_APART_REMEDY = ("a tar written in directory order, `tar cf x.tar .`, splits them: re-tar sorted by name, "
                    "`tar --sort=name -cf x.tar -C folder .`")
# The formats DALI's decoders.image reads (its documentation: JPEG, JPEG 2000, TIFF, PNG, BMP, PNM (PPM, PGM, PBM),
# WebP), as Pillow names them; MPO is a camera JPEG with extra frames, read as its first JPEG. Pillow decodes many
# more (GIF, TGA, ICO, ...): a sample that only Pillow reads would pass --decode and stop training under DALI.
DALI_FORMATS = ("JPEG", "MPO", "JPEG2000", "TIFF", "PNG", "BMP", "PPM", "WEBP")
_BLOCK = 512
_WHITESPACE = re.compile(r"\s")
_NOT_UTF8 = re.compile(r"[\ud800-\udfff]")  # tarfile turns bytes that are not UTF-8 into surrogates
NAME_WHITESPACE = "has whitespace"  # in the reason of a sample rejected for it (adopt.py gathers them in one line)
NAME_REMEDY = ("extract the tar and convert its images with `mixmae shards folder` (it names the samples itself), or "
               "rename the members without whitespace (e.g. spaces to '_') and write the tar again")
_CHUNK = 1 << 20  # bytes per read when draining the stream
_HISTORY = 1 << 16  # bytes kept behind the read position: more than tarfile's buffer reads ahead


def split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) as webdataset's base_plus_ext and DALI's wds2idx split them; None for a name that
    belongs to no sample (hidden, or without an extension)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash or dot == len(name) - 1:
        return None
    return name[:dot], name[dot + 1:]


def unsafe_name(name: str) -> bool:
    return name.startswith("/") or ".." in name.split("/")


@dataclass(frozen=True)
class Member:
    name: str
    ext: str
    offset: int  # of the data, from the start of the tar
    size: int


@dataclass
class _Sample:
    key: str
    members: list[Member] = field(default_factory=list)
    label: int | None = None
    image: str = ""  # "JPEG RGB": the decoded image's format and mode (with `decode`)
    problem: str = ""  # found while streaming (cls, decoding); checked with the others at the end


@dataclass
class TarIndex:
    """What one pass over a tar found. Every non-folder entry is in exactly one of: an indexed sample, a
    rejected sample, or `ignored`."""

    lines: list[str] = field(default_factory=list)  # DALI index lines of the samples training may read
    keys: list[str] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)  # each indexed sample's cls, None without one
    images: list[str] = field(default_factory=list)  # each indexed sample's "FORMAT MODE" ('' without decode)
    masked: int = 0  # indexed samples with a segmentation mask member (seg.png)
    rejected: list[dict] = field(default_factory=list)  # {"key", "reason", "members"}
    ignored: list[dict] = field(default_factory=list)  # {"member", "reason"}: entries that are no sample's
    members: int = 0  # every entry but folders
    indexed_members: int = 0
    folders: int = 0
    sha256: str = ""
    bytes_read: int = 0
    problem: str = ""  # the tar as a whole: not a tar, cut, an unreadable header

    @property
    def samples(self) -> int:
        return len(self.lines)

    @property
    def found(self) -> int:
        return len(self.lines) + len(self.rejected)

    def index_text(self) -> str:
        """DALI's wds2idx format: 'v1.2 N', then per sample 'ext data_offset size name' per member."""
        return f"{INDEX_VERSION} {len(self.lines)}\n" + "".join(line + "\n" for line in self.lines)

    def check(self) -> None:
        members = self.indexed_members + sum(len(r["members"]) for r in self.rejected) + len(self.ignored)
        if members != self.members:
            raise RuntimeError(f"tar index does not reconcile: {self.members} members, {members} accounted for")


class _HashingReader:
    """The stream tarfile reads, hashed as it goes, with the last bytes kept: after tarfile stops, the
    block where it stopped tells a clean end-of-archive from a cut or a damaged header. (tarfile's stream
    mode at its default 10 KB buffer: a larger buffer made it slower here, as it copies the buffer's
    rest on every header it reads.)"""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0
        self.recent: deque[bytes] = deque()  # the last chunks read (no copies), ending at bytes_read
        self.recent_bytes = 0

    def read(self, size: int) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        self.bytes_read += len(data)
        self.recent.append(data)
        self.recent_bytes += len(data)
        while self.recent_bytes - len(self.recent[0]) >= _HISTORY:
            self.recent_bytes -= len(self.recent.popleft())
        return data

    def bytes_at(self, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of the stream, if not yet read or still kept (else b'')."""
        while self.bytes_read < start + length and self.read(min(start + length - self.bytes_read, _CHUNK)):
            pass
        low = start - (self.bytes_read - self.recent_bytes)
        return b"".join(self.recent)[low:low + length] if low >= 0 else b""

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


COMPRESSED = ((b"\x1f\x8b", "gzip", ".gz", "gunzip"), (b"BZh", "bzip2", ".bz2", "bunzip2"),
              (b"\xfd7zXZ\x00", "xz", ".xz", "unxz"), (b"\x28\xb5\x2f\xfd", "zstd", ".zst", "unzstd"))


def not_a_tar(head: bytes, error: str) -> str:
    """What a file named .tar that tarfile cannot open is, by its first bytes, and how to get the tar. A Hugging Face
    webdataset cloned without git-lfs holds 130-byte pointer files named 00000.tar, a failed download may be an HTML
    page, webdataset's TarWriter(compress=True) writes gzip: all were 'not a tar archive (truncated header)', which
    sends no one to `git lfs pull`. The reason's first words name the kind, which the rejection summary groups by."""
    if head.startswith(LFS_POINTER):
        return ("a Git LFS pointer file, not the tar: the repository was cloned without its LFS objects (a Hugging "
                "Face dataset cloned without git-lfs); fetch them (`git lfs install && git lfs pull` in the clone) and "
                "run the same command again")
    for magic, kind, suffix, tool in COMPRESSED:
        if head.startswith(magic):
            return (f"{kind}-compressed data named .tar, not a plain tar: training reads byte ranges of plain tars; "
                    f"decompress it in place (`mv x.tar x.tar{suffix} && {tool} x.tar{suffix}`) and run the same "
                    "command again")
    start = head.lstrip().lower()
    if start.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return (f"an HTML page, not a tar (it starts {head.lstrip()[:40]!r}): a download that got an error or login "
                "page instead of the file; download it again and run the same command again")
    other = next((name for magic, name in OTHER_SIGNATURES if head.startswith(magic)), None)
    if other is not None:
        return f"{other}, not a tar: put its images into a tar, or convert them with `mixmae shards folder`"
    return f"not a tar archive ({error}; it starts {head[:16]!r})"


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _decode(data: bytes) -> tuple[str, str]:
    """(format and mode, '') for an image that decodes, ('', the reason) for one that does not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > BOMB_PIXELS:
                    return "", f"{image.width}x{image.height} pixels: a decompression bomb, not decoded"
                if image.format not in DALI_FORMATS:
                    return "", (f"image is {image.format or 'of an unknown format'}, which DALI's decoder does not "
                                f"read (it reads {', '.join(DALI_FORMATS)}): convert it, e.g. to JPEG, and re-adopt")
                image.load()
                return f"{image.format} {image.mode}", ""
    except UnidentifiedImageError:
        return "", "image does not decode: not a format Pillow can identify"
    except Exception as exc:  # noqa: BLE001 - whatever one image does, it is a rejection with its reason
        return "", " ".join(f"image does not decode: {type(exc).__name__}: {exc}".split())


def _label(data: bytes, key: str) -> tuple[int | None, str]:
    """(class index or None for -1, '') or (None, the reason naming the key; the rejection row names the tar)."""
    try:
        value = parse_cls(data)
    except ValueError as exc:
        return None, f"sample {key!r}: {exc}"
    return (None if value == UNLABELED else value), ""  # -1 is `mixmae shards`' own mark for an unlabeled image


def _sample_problem(sample: _Sample, key_runs: Counter[str]) -> str:
    for member in sample.members:
        if unsafe_name(member.name):
            return f"unsafe member name {member.name!r} (absolute or with '..')"
        # DALI's index line is `ext offset size name` per member, split at spaces: its own wds2idx writes such a
        # name as it is, and the reader then takes the name's second word for the next member's extension.
        if _WHITESPACE.search(member.name):
            return (f"member name {member.name!r} {NAME_WHITESPACE}: DALI's index separates its fields by spaces "
                    f"and cannot hold it; {NAME_REMEDY}")
        if _NOT_UTF8.search(member.name):
            return (f"member name {member.name!r} is not UTF-8 (its bytes that are not are shown escaped), which a "
                    "DALI index cannot hold: rename the members in UTF-8 and write the tar again")
    if key_runs[sample.key] > 1:
        return (f"key {sample.key!r} appears {key_runs[sample.key]} times apart in this tar (a sample's members "
                f"must be consecutive; {KEY_APART_REMEDY})")
    if len(sample.members) > 1 and len({m.name for m in sample.members}) < len(sample.members):
        repeated = next(m.name for i, m in enumerate(sample.members) if m.name in {n.name for n in sample.members[:i]})
        return f"member {repeated!r} appears twice"
    exts = [m.ext for m in sample.members]
    images = [m for m in sample.members if m.ext.lower() in IMAGE_EXTENSIONS]
    dotted = image_like_members(sample)
    if len(dotted) > 1 and not images:
        return (f"{len(dotted)} images share the key {sample.key!r} ({dotted[0].name}, ...): a key is the name up to "
                "its first dot (webdataset's rule), so names with a dot before the extension make one sample of "
                "many; rename them without it (e.g. clip7_f0001.jpg)")
    if not images:
        return f"no image member (jpg, jpeg, png or webp); it has {', '.join(exts)}"
    if len(images) > 1:
        return (f"more than one image ({len(images)} images: {', '.join(m.ext for m in images)}): one per sample, "
                "so that which one trains never depends on member order")
    if images[0].size == 0:
        return f"image member {images[0].name!r} is empty (0 bytes)"
    return sample.problem


def image_like_members(sample: _Sample) -> list[Member]:
    """Members whose names end like an image (`f0001.jpg` as well as `jpg`), segmentation masks aside. A rejected
    sample made only of such names (video frames `clip7.f0001.jpg` ... under one dotted key) is counted by the
    rejection ceiling as the images it held, not as one sample."""
    return [m for m in sample.members
            if m.ext.lower() != MASK_EXTENSION and m.ext.lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS]


@dataclass
class _Cursor:
    """Where the last entry whose header tarfile read ends, and its name (kept when a read fails)."""

    end: int = 0
    name: str = ""


def index_tar(stream: BinaryIO, decode: bool = False) -> TarIndex:
    """Reads `stream` (a whole tar) to its end exactly once. Never raises for what is in the bytes;
    errors of the stream itself (I/O, network) propagate, for the caller to retry."""
    result = TarIndex()
    reader = _HashingReader(stream)
    samples: list[_Sample] = []
    cursor = _Cursor()
    try:
        tar = tarfile.open(fileobj=reader, mode="r|")  # noqa: SIM115 - closed below
    except tarfile.ReadError as exc:
        result.problem = not_a_tar(reader.bytes_at(0, _BLOCK), str(exc))
    else:
        try:
            _read_members(tar, result, samples, cursor, decode)
        except (tarfile.ReadError, tarfile.StreamError, EOFError) as exc:
            reader.drain()
            result.problem = (f"the tar is cut: it cannot be read past byte {reader.bytes_read} ({exc}); the last "
                              f"entry read was {cursor.name!r}")
        else:
            # tarfile stops quietly at a zero block (the end marker), at the end of the data, and at a
            # header it cannot parse; only the first is a complete tar.
            end_block = reader.bytes_at(cursor.end, _BLOCK)
            if len(end_block) < _BLOCK:
                result.problem = (f"the tar is cut: it ends at byte {reader.bytes_read}, after {cursor.name!r}, "
                                  "without the end-of-archive marker")
            elif end_block.count(0) != _BLOCK:
                result.problem = f"unreadable header at byte {cursor.end}: the rest of the tar cannot be read"
        finally:
            tar.close()
    reader.drain()
    result.sha256, result.bytes_read = reader.sha256.hexdigest(), reader.bytes_read
    _finish(samples, result)
    return result


def _read_members(tar: tarfile.TarFile, result: TarIndex, samples: list[_Sample], cursor: _Cursor,
                  decode: bool) -> None:
    current: _Sample | None = None
    while (info := tar.next()) is not None:
        tar.members.clear()  # stream mode keeps every TarInfo otherwise; a shard can hold 10^5 members
        cursor.end = info.offset_data + (_padded(info.size) if info.isreg() else 0)
        cursor.name = info.name
        if info.isdir():
            result.folders += 1
            continue
        result.members += 1
        if not info.isreg():
            kind = "symlink" if info.issym() else "hard link" if info.islnk() else f"entry of type {info.type!r}"
            result.ignored.append({"member": info.name, "reason": f"a {kind}, not a file"})
            continue
        parts = split_name(info.name)
        if parts is None:
            base = info.name.rsplit("/", 1)[-1]
            why = "a hidden file" if base.startswith(".") else "no extension"
            result.ignored.append({"member": info.name, "reason": f"{why}: belongs to no sample"})
            continue
        key, ext = parts
        if current is None or current.key != key:
            current = _Sample(key)
            samples.append(current)
        current.members.append(Member(info.name, ext, info.offset_data, info.size))
        lower = ext.lower()
        if lower == LABEL_EXTENSION or (decode and lower in IMAGE_EXTENSIONS):
            data = tar.extractfile(info).read()
            if lower == LABEL_EXTENSION:
                label, problem = _label(data, current.key)
                current.label = label if current.label is None else current.label
            else:
                current.image, problem = _decode(data)
            current.problem = current.problem or problem


def _finish(samples: list[_Sample], result: TarIndex) -> None:
    """Index lines for the good samples, one rejection per bad key. A key whose members are apart (a tar made in
    directory order, `tar cf x.tar .`) is one rejected sample holding every member of every run: counted per run,
    20 images were '40 of 40 samples rejected'."""
    runs = Counter(s.key for s in samples)
    apart: dict[str, dict] = {}  # key -> its one rejection, for keys in several runs
    for position, sample in enumerate(samples):
        if sample.key in apart:
            apart[sample.key]["members"] += [m.name for m in sample.members]
            continue
        if result.problem and position == len(samples) - 1:
            problem = f"{result.problem}; the sample at the cut may have lost members"
        else:
            problem = _sample_problem(sample, runs)
        if problem:
            dotted = image_like_members(sample)
            lost = len(dotted) if not any(m.ext.lower() in IMAGE_EXTENSIONS for m in sample.members) else 1
            result.rejected.append({"key": sample.key, "reason": problem, "members": [m.name for m in sample.members],
                                    **({"images": lost} if lost > 1 else {})})
            if runs[sample.key] > 1:
                apart[sample.key] = result.rejected[-1]
            continue
        result.lines.append(" ".join(f"{m.ext} {m.offset} {m.size} {m.name}" for m in sample.members))
        result.keys.append(sample.key)
        result.labels.append(sample.label)
        result.images.append(sample.image)
        result.masked += any(m.ext.lower() == MASK_EXTENSION for m in sample.members)
        result.indexed_members += len(sample.members)
    result.check()
