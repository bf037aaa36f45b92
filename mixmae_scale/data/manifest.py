"""Reading a shard set's manifest (`dataset.json`): which tars a split has, where they live, their counts.

A shard set is a folder or an s3:// prefix holding `dataset.json` and one index per shard. The tars sit
beside them (shards made by `mixmae shards`) or wherever the manifest's `base` points (shards adopted
from another tool, left where they are, possibly read-only or remote). Reading a split touches only
the manifest: no tar is stat'ed and no index parsed here, so a rank's start-up does not grow with the
number of shards. Each rank checks the files it reads when it reads them (data/shard_reader.py).

The manifest format, version 2 (version 1, written before `base` existed, reads the same way):
    {"format": "mixmae-scale-shards", "version": 2,
     "base": "s3://bucket/prefix/" | "/absolute/folder" (optional; default: the manifest's own folder),
     "classes": [{"index": 0, "wnid": ..., "name": ...}, ...],            (empty: unlabeled)
     "mask_classes": ["background", ...],   (optional: the segmentation masks' class names, index order)
     "splits": {"train": {"samples": N, "labeled": true, "masks": true (optional: every sample has seg.png),
                          "shards": [{"name": "<tar, relative to base>", "index": "<idx, relative to
                                      the manifest's folder>", "samples": n, "bytes": b, "sha256": ...}]}}}
(A name or index may also be an absolute path or URL: a subset's manifest points into the full set.)
An index is DALI's wds2idx text: "v1.2 N", then one line per sample that training may read, listing
"ext data_offset size member_name" for each of its members, in tar order.

This module is the one place `dataset.json` is parsed and written (`Manifest.from_dict`, `load_manifest`,
`write_manifest`), so a key renamed or added changes here and nowhere else, and a damaged manifest fails
with the file and the key at fault instead of a KeyError deep inside a loader.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain
from pathlib import Path
from typing import Any

from mixmae_scale.data import storage
from mixmae_scale.data.errors import DataError, plural
from mixmae_scale.data.image_names import is_image_name

__all__ = ["DataError", "MANIFEST", "Manifest", "ShardEntry", "SplitEntry", "SplitShards", "load_manifest",
           "load_split", "read_manifest", "write_manifest"]

MANIFEST = "dataset.json"
FORMAT = "mixmae-scale-shards"
VERSION = 2


@dataclass(frozen=True)
class ShardEntry:
    """One tar of a split: `name` relative to the set's base, `index` relative to the manifest's folder (either
    may be an absolute path or URL)."""

    name: str
    index: str
    samples: int
    bytes: int = 0
    sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "index": self.index, "samples": self.samples, "bytes": self.bytes,
                "sha256": self.sha256}


@dataclass(frozen=True)
class SplitEntry:
    """One split: what training reads (`shards`, `samples`, `labeled`) and the builder's account of how it was
    made (`counts`: found, rejected, adopted_from, ... as each source reports them), kept as written so that a
    summary can be printed from the manifest alone."""

    samples: int
    labeled: bool
    shards: tuple[ShardEntry, ...]
    counts: dict[str, Any] = field(default_factory=dict)
    masks: bool = False  # every sample has a segmentation mask (`seg.png`, shards/masks.py)

    def to_dict(self) -> dict[str, Any]:
        return {**self.counts, "samples": self.samples, "labeled": self.labeled,
                **({"masks": True} if self.masks else {}), "shards": [s.to_dict() for s in self.shards]}

    @property
    def adopted(self) -> bool:
        """Indexed where another tool wrote it (`mixmae shards adopt`), not converted here."""
        return "adopted_from" in self.counts


@dataclass(frozen=True)
class Manifest:
    """A shard set's `dataset.json`. `base` (adopted sets) is where tar names resolve; None: beside the manifest.
    `options` (converted sets) are the conversion's options, which a resume must match."""

    splits: dict[str, SplitEntry]
    classes: list[dict[str, Any]] = field(default_factory=list)
    base: str | None = None
    options: dict[str, Any] | None = None
    tool_version: str | None = None
    version: int = VERSION
    mask_classes: list[str] = field(default_factory=list)  # the masks' class names; empty: unknown or no masks

    def to_dict(self) -> dict[str, Any]:
        head: dict[str, Any] = {"format": FORMAT, "version": self.version}
        if self.tool_version is not None:
            head["tool_version"] = self.tool_version
        if self.base is not None:
            head["base"] = self.base
        if self.options is not None:
            head["options"] = self.options
        masks = {"mask_classes": self.mask_classes} if self.mask_classes else {}
        return {**head, "classes": self.classes, **masks,
                "splits": {k: v.to_dict() for k, v in self.splits.items()}}

    @classmethod
    def from_dict(cls, data: Any, path: str) -> Manifest:
        """The typed manifest; a key missing or of the wrong type raises DataError naming `path` and the key."""
        if not isinstance(data, dict) or data.get("format", FORMAT) != FORMAT:
            raise DataError(f"{path}: not a mixmae-scale shard manifest (format "
                            f"{data.get('format') if isinstance(data, dict) else type(data).__name__!r})")
        splits = _typed(data, "splits", dict, path, {})
        if not splits:
            raise DataError(f"{path}: lists no splits (no 'splits' with a train or val entry): {_REBUILD}")
        classes = _typed(data, "classes", list, path, [])
        return cls(splits={name: _split(info, f"splits.{name}", path, bool(classes)) for name, info in splits.items()},
                   classes=classes, base=_typed(data, "base", str, path, None) or None,
                   options=_typed(data, "options", dict, path, None),
                   tool_version=_typed(data, "tool_version", str, path, None),
                   version=_typed(data, "version", int, path, 1),
                   mask_classes=[str(n) for n in _typed(data, "mask_classes", list, path, [])])


_MISSING = object()
_REBUILD = "rebuild the set with `mixmae shards` (or adopt the tars again with `mixmae shards adopt`)"


def _bad_key(path: str, key: str, problem: str) -> DataError:
    return DataError(f"{path}: key '{key}' {problem}; {_REBUILD}")


def _typed(data: dict, key: str, kind: type, path: str, default: Any = _MISSING, where: str = "") -> Any:
    """data[key] checked against `kind` (an int may stand for a whole float), or `default` when absent."""
    name = f"{where}.{key}" if where else key
    if key not in data or data[key] is None and default is not _MISSING:
        if default is _MISSING:
            raise _bad_key(path, name, "is missing")
        return default
    value = data[key]
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _bad_key(path, name, f"is {type(value).__name__} {value!r:.60}, expected {kind.__name__}")
    return value


def _split(info: Any, where: str, path: str, labeled: bool) -> SplitEntry:
    """One split; `labeled` is the default for a manifest written before splits said so (it had classes)."""
    if not isinstance(info, dict):
        raise _bad_key(path, where, f"is {type(info).__name__}, expected an object with 'shards'")
    entries = _typed(info, "shards", list, path, [], where)
    shards = []
    for number, entry in enumerate(entries):
        at = f"{where}.shards[{number}]"
        if not isinstance(entry, dict):
            raise _bad_key(path, at, f"is {type(entry).__name__}, expected an object with name, index and samples")
        shards.append(ShardEntry(
            _typed(entry, "name", str, path, where=at), _typed(entry, "index", str, path, where=at),
            _typed(entry, "samples", int, path, where=at), _typed(entry, "bytes", int, path, 0, at),
            _typed(entry, "sha256", str, path, "", at)))
    counted = sum(s.samples for s in shards)
    counts = {k: v for k, v in info.items() if k not in ("samples", "labeled", "shards", "masks")}
    return SplitEntry(_typed(info, "samples", int, path, counted, where),
                      _typed(info, "labeled", bool, path, labeled, where), tuple(shards), counts,
                      _typed(info, "masks", bool, path, False, where))


@dataclass(frozen=True)
class SplitShards:
    """One split of a shard set. Names are kept relative; URLs are made on demand (100,000 shards)."""

    split: str
    location: str  # the folder or s3:// prefix holding dataset.json and the indexes
    base: str  # the folder or s3:// prefix the tar names are relative to
    names: tuple[str, ...]
    index_names: tuple[str, ...]
    samples_per_shard: tuple[int, ...]
    bytes_per_shard: tuple[int, ...]
    samples: int
    labeled: bool
    num_classes: int
    # A part of a split (a train split's held-out tail, data/heldout.py): shard i holds lines first_line[i] ..
    # first_line[i] + samples_per_shard[i] - 1 of its index, which has index_lines[i] lines in all. Empty: whole.
    first_line: tuple[int, ...] = ()
    index_lines: tuple[int, ...] = ()
    masks: bool = False  # every sample has a segmentation mask
    mask_classes: int = 0  # how many classes the masks label (0: the manifest does not say)
    sha256: tuple[str, ...] = ()  # each tar's, as the manifest records it ("" where it does not); empty: none read

    def first_line_of(self, shard: int) -> int:
        return self.first_line[shard] if self.first_line else 0

    def index_lines_of(self, shard: int) -> int:
        return self.index_lines[shard] if self.index_lines else self.samples_per_shard[shard]

    def tar_url(self, shard: int) -> str:
        return storage.join(self.base, self.names[shard])

    def index_url(self, shard: int) -> str:
        return storage.join(self.location, self.index_names[shard])

    @cached_property
    def tars(self) -> tuple[str, ...]:
        return tuple(self.tar_url(i) for i in range(len(self.names)))

    @cached_property
    def indexes(self) -> tuple[str, ...]:
        return tuple(self.index_url(i) for i in range(len(self.index_names)))


def _display(location: str | Path) -> str:
    return str(location) if storage.is_remote(location) else str(Path(location).resolve())


def _holds_images(folder: Path, depth: int = 1) -> bool:
    """Whether `folder` (or a subfolder, `depth` levels down) holds a file named like an image; stops at the first."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_file() and is_image_name(entry.name):
                return True
            if depth and entry.is_dir() and _holds_images(Path(entry.path), depth - 1):
                return True
    return False


def _unfinished_build(folder: Path, location: str) -> str:
    """What a folder that `mixmae shards` began and did not finish is, and how to finish it; "" for any other.
    Its progress records (shards/writer.py's and shards/adopt.py's PROGRESS_DIR, `.progress/`) say so: a
    conversion stopped above --max-rejected, killed, or out of disk keeps its shards and writes the manifest last."""
    progress = folder / ".progress"
    rejected = _display(folder / "rejected.jsonl")
    why = (f"if it stopped above --max-rejected, {rejected} names each rejected file"
           if (folder / "rejected.jsonl").is_file() else "finished shards are kept")
    if (progress / "options.json").is_file():
        try:
            layout = json.loads((progress / "options.json").read_text()).get("layout", "imagenet|folder")
            src = json.loads((progress / "source.json").read_text()).get("src", "SRC")
        except (OSError, json.JSONDecodeError, AttributeError):
            layout, src = "imagenet|folder", "SRC"
        return (f"it holds an unfinished conversion of {src}: run the `mixmae shards {layout}` command again "
                f"(`mixmae shards {layout} --src {src} --out {location}` with the same options) to finish it; {why}")
    if (progress / "adopt").is_dir():
        return (f"it holds an unfinished adoption (`mixmae shards adopt ... --out {location}`): run that command "
                f"again to finish it; {why}")
    return ""


def _not_a_shard_set(folder: Path, location: str) -> str:
    """What a folder without a manifest holds instead, and the command that makes a shard set of it."""
    head = f"{_display(folder)} is not a shard set (it has no {MANIFEST})"
    unfinished = _unfinished_build(folder, location)
    if unfinished:
        return f"{head}: {unfinished}"
    # One level of subfolders too: a download laid out as train/*.tar and val/*.tar was said to hold no .tar files
    # and sent to `mixmae shards folder`, though adoption lists recursively and finds them.
    # Not in a hidden folder either (a drive's .Trash-1000/): adoption skips those, so offering them sent the user to
    # a command that finds nothing.
    tars = sorted(name for name in (p.relative_to(folder).as_posix()
                                    for p in chain(folder.glob("*.tar"), folder.glob("*/*.tar")))
                  if not any(part.startswith(".") for part in name.split("/")))
    if tars:
        shown = ", ".join(tars[:2]) + (", ..." if len(tars) > 2 else "")
        val = any(re.search(r"(^|[-_./])(val|valid|validation)([-_./\d]|$)", name.lower()) for name in tars)
        return (f"{head}: {plural(len(tars), '.tar file')} {'is' if len(tars) == 1 else 'are'} there ({shown}): "
                f"`mixmae shards adopt {location} --out DIR` indexes {'it' if len(tars) == 1 else 'them'} without "
                "rewriting"
                + (f" (the tars named for val: a second `mixmae shards adopt {location} --out DIR --split val`)"
                   if val else ""))
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    location = location.rstrip("/") or location
    out = location + "-shards"
    then = f", then use {out} as the shard set (data.shards={out}, or --data {out})"
    classes = [p for p in entries if p.is_dir() and _holds_images(p)]
    if (folder / "train").is_dir() and _holds_images(folder / "train"):
        return (f"{head}: it is an ImageNet-style image tree (train/ with a folder per class); convert it first: "
                f"`mixmae shards imagenet --src {location} --out {out}`{then}")
    images = sum(1 for p in entries if p.is_file() and is_image_name(p.name))
    if images and not classes:
        return (f"{head}: it is a folder of {plural(images, 'image')}; convert it first: `mixmae shards folder --src "
                f"{location} --out {out}`{then}")
    if classes:
        shown = ", ".join(f"{p.name}/" for p in classes[:3]) + (", ..." if len(classes) > 3 else "")
        return (f"{head}: it holds {plural(len(classes), 'folder')} of images ({shown}); convert them first: "
                f"`mixmae shards folder --src {location} --out {out}` (add --val-fraction 0.1 for the val split "
                f"that fine-tuning and eval need){then}")
    if not entries:
        return f"{head}: the folder is empty; build shards with `mixmae shards folder` or `mixmae shards imagenet`"
    return (f"{head}: it holds no shards, .tar files or images ({', '.join(p.name for p in entries[:5])}); build "
            "shards with `mixmae shards folder` or `mixmae shards imagenet`")


def _not_a_stored_shard_set(location: str) -> str:
    """What an s3:// prefix without a manifest holds, from one LIST page, and the command that makes a shard set of
    it, as `_not_a_shard_set` says for a folder: `verify` or `data.shards=` over the tars of a download not yet
    adopted said only `GET failed: no such object`, which names neither the tars nor `mixmae shards adopt`."""
    location = location.rstrip("/")
    head = f"{location} is not a shard set (it has no {MANIFEST})"
    try:
        files = storage.list_files(location, pages=1)
    except storage.StorageError as exc:
        return f"{head}; listing it failed too: {exc}"
    if not files:
        return (f"{head}: nothing is stored under it; check the bucket and prefix, or build shards there with "
                f"`mixmae shards folder|imagenet ... --out {location}`")
    if any(f.name.startswith(".progress/adopt/") for f in files):
        return (f"{head}: it holds an unfinished adoption (`mixmae shards adopt ... --out {location}`): run that "
                "command again to finish it")
    if any(f.name.startswith(".progress/") for f in files):
        return (f"{head}: it holds an unfinished conversion: run the `mixmae shards` command that wrote it (--out "
                f"{location}, the same options) again to finish it")
    # Hidden tars (macOS's `._x.tar`, a `.Trash-1000/`) are left out as adoption leaves them out.
    tars = [f.name for f in files if f.name.lower().endswith(".tar")
            and not any(part.startswith(".") for part in f.name.split("/"))]
    if tars:
        many = len(files) >= 1000  # one LIST page: there may be more
        shown = ", ".join(tars[:2]) + (", ..." if len(tars) > 2 else "")
        are, them = ("is", "it") if len(tars) == 1 else ("are", "them")
        return (f"{head}: {'at least ' if many else ''}{plural(len(tars), '.tar file')} {are} there ({shown}): "
                f"`mixmae shards adopt {location} --out {location}-index` indexes {'them' if many else them} without "
                f"rewriting; then use {location}-index as the shard set")
    names = ", ".join(f.name for f in files[:5]) + (", ..." if len(files) > 5 else "")
    return (f"{head}: it holds no shards or .tar files ({names}); build shards with `mixmae shards folder|imagenet "
            f"... --out {location}`")


def _read_json(location: str) -> tuple[Any, str]:
    """The parsed JSON of a set's manifest and its displayed path, with one-line errors naming the path or URL."""
    path = storage.join(location, MANIFEST)
    if not storage.is_remote(location):
        folder = Path(location)
        if folder.is_file():
            raise DataError(f"{_display(folder)} is a file, not a shard folder (data.shards): name the folder that "
                            "holds dataset.json")
        if not folder.is_dir():
            raise DataError(f"shard folder {_display(folder)} does not exist (data.shards); build shards with "
                            "`mixmae shards`, or adopt existing ones with `mixmae shards adopt`")
        if not Path(path).exists():
            raise DataError(_not_a_shard_set(folder, location))
    try:
        text = storage.read_text(path)
    except storage.StorageError as exc:
        if storage.is_remote(location) and str(exc).endswith(": no such object"):
            raise DataError(_not_a_stored_shard_set(location)) from exc
        raise DataError(f"{exc} (the shard set's manifest; data.shards={location})") from exc
    try:
        return json.loads(text), _display(path)
    except json.JSONDecodeError as exc:
        raise DataError(f"{_display(path)}: not valid JSON: {exc}") from exc


def load_manifest(location: str | Path) -> Manifest:
    """The typed manifest of a shard set (a folder or an s3:// prefix)."""
    data, path = _read_json(str(location))
    return Manifest.from_dict(data, path)


def read_manifest(location: str | Path) -> dict:
    """The manifest as written, checked as `load_manifest` checks it: for a caller that digests its exact keys."""
    data, path = _read_json(str(location))
    Manifest.from_dict(data, path)
    return data


def manifest_exists(location: str | Path) -> bool:
    """Whether a set (or a set begun by an earlier run) has a manifest, without reading it."""
    return storage.exists(storage.join(str(location), MANIFEST))


def write_manifest(location: str | Path, manifest: Manifest) -> str:
    """Writes `dataset.json` atomically (temp file and rename locally, one PUT on S3); returns its path or URL."""
    path = storage.join(str(location), MANIFEST)
    storage.write_text(path, json.dumps(manifest.to_dict(), indent=1))
    return path


CONVERT_WITH_VAL = ("convert the images again with a validation split into a new folder (`mixmae shards folder --src "
                    "SRC --out NEW --val-fraction 0.05`)")


def way_to_add_split(location: str, splits: dict, split: str) -> str:
    """How a set gets a validation split it lacks, for every refusal that needs one: an adopted set takes one more
    adoption; a converted one a new conversion (it takes no adopted split, and `--val-fraction` draws only when a
    conversion starts). Empty where a conversion cannot make `split` (it names its held-out split 'val'): a name
    the set does not have is then a typo, which the list of its splits answers."""
    if any(info.adopted for info in splits.values()):
        return f"adopt a validation split into the set (`mixmae shards adopt SRC --out {location} --split {split}`)"
    if split != "val":
        return ""
    return CONVERT_WITH_VAL


def load_split(location: str | Path, split: str, world_size: int = 1) -> SplitShards:
    """`world_size` is accepted for the callers that pass it; a split reads the same on any world size."""
    location = str(location)
    manifest = load_manifest(location)
    path = _display(storage.join(location, MANIFEST))
    if split not in manifest.splits:
        way = way_to_add_split(location, manifest.splits, split)
        raise DataError(f"{path}: no split '{split}'; it has {sorted(manifest.splits)}{'; ' * bool(way)}{way}")
    info = manifest.splits[split]
    if not info.shards:
        raise DataError(f"{path}: split '{split}' has no shards")
    counts = tuple(s.samples for s in info.shards)
    if sum(counts) != info.samples:
        raise DataError(f"{path}: split '{split}' says {info.samples} samples, its shards hold {sum(counts)}")
    return SplitShards(split, location, manifest.base or location, tuple(s.name for s in info.shards),
                       tuple(s.index for s in info.shards), counts, tuple(s.bytes for s in info.shards), sum(counts),
                       info.labeled, len(manifest.classes), masks=info.masks,
                       mask_classes=len(manifest.mask_classes), sha256=tuple(s.sha256 for s in info.shards))
