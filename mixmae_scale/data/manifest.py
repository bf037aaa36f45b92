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
     "splits": {"train": {"samples": N, "labeled": true,
                          "shards": [{"name": "<tar, relative to base>", "index": "<idx, relative to
                                      the manifest's folder>", "samples": n, "bytes": b, "sha256": ...}]}}}
(A name or index may also be an absolute path or URL: a subset's manifest points into the full set.)
An index is DALI's wds2idx text: "v1.2 N", then one line per sample that training may read, listing
"ext data_offset size member_name" for each of its members, in tar order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from mixmae_scale.data import storage
from mixmae_scale.data.errors import DataError

__all__ = ["DataError", "MANIFEST", "SplitShards", "load_split", "read_manifest"]

MANIFEST = "dataset.json"
FORMAT = "mixmae-scale-shards"


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
    from mixmae_scale.shards.sources import IMAGE_SUFFIXES

    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES):
                return True
            if depth and entry.is_dir() and _holds_images(Path(entry.path), depth - 1):
                return True
    return False


def _not_a_shard_set(folder: Path, location: str) -> str:
    """What a folder without a manifest holds instead, and the command that makes a shard set of it."""
    from mixmae_scale.shards.sources import IMAGE_SUFFIXES

    head = f"{_display(folder)} is not a shard set (it has no {MANIFEST})"
    tars = list(folder.glob("*.tar"))
    if tars:
        return (f"{head}: {len(tars)} .tar files are there: `mixmae shards adopt {location} --out DIR` indexes "
                "them without rewriting")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    location = location.rstrip("/") or location
    out = location + "-shards"
    then = f", then use {out} as the shard set (data.shards={out}, or --data {out})"
    classes = [p for p in entries if p.is_dir() and _holds_images(p)]
    if (folder / "train").is_dir() and _holds_images(folder / "train"):
        return (f"{head}: it is an ImageNet-style image tree (train/ with a folder per class); convert it first: "
                f"`mixmae shards imagenet --src {location} --out {out}`{then}")
    images = sum(1 for p in entries if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
    if images and not classes:
        return (f"{head}: it is a folder of {images} image(s); convert it first: `mixmae shards folder --src "
                f"{location} --out {out}`{then}")
    if classes:
        shown = ", ".join(f"{p.name}/" for p in classes[:3]) + (", ..." if len(classes) > 3 else "")
        return (f"{head}: it holds {len(classes)} folder(s) of images ({shown}); convert them first: `mixmae shards "
                f"folder --src {location} --out {out}` (add --val-fraction 0.1 for the val split that fine-tuning "
                f"and eval need){then}")
    if not entries:
        return f"{head}: the folder is empty; build shards with `mixmae shards folder` or `mixmae shards imagenet`"
    return (f"{head}: it holds no shards, .tar files or images ({', '.join(p.name for p in entries[:5])}); build "
            "shards with `mixmae shards folder` or `mixmae shards imagenet`")


def read_manifest(location: str | Path) -> dict:
    """The parsed manifest of a shard set, with one-line errors that name the absolute path or URL."""
    location = str(location)
    path = storage.join(location, MANIFEST)
    if not storage.is_remote(location):
        folder = Path(location)
        if not folder.is_dir():
            raise DataError(f"shard folder {_display(folder)} does not exist (data.shards); build shards with "
                            "`mixmae shards`, or adopt existing ones with `mixmae shards adopt`")
        if not Path(path).exists():
            raise DataError(_not_a_shard_set(folder, location))
    try:
        text = storage.read_text(path)
    except storage.StorageError as exc:
        raise DataError(f"{exc} (the shard set's manifest; data.shards={location})") from exc
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{_display(path)}: not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format", FORMAT) != FORMAT:
        raise DataError(f"{_display(path)}: not a mixmae-scale shard manifest (format "
                        f"{manifest.get('format') if isinstance(manifest, dict) else type(manifest).__name__!r})")
    return manifest


def load_split(location: str | Path, split: str, world_size: int = 1) -> SplitShards:
    """`world_size` is accepted for the callers that pass it; a split reads the same on any world size."""
    location = str(location)
    manifest = read_manifest(location)
    path = _display(storage.join(location, MANIFEST))
    splits = manifest.get("splits", {})
    if split not in splits:
        raise DataError(f"{path}: no split '{split}'; it has {sorted(splits)}")
    info = splits[split]
    shards = info.get("shards") or []
    if not shards:
        raise DataError(f"{path}: split '{split}' has no shards")
    try:
        names = tuple(s["name"] for s in shards)
        indexes = tuple(s["index"] for s in shards)
        counts = tuple(int(s["samples"]) for s in shards)
        sizes = tuple(int(s.get("bytes", 0)) for s in shards)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: split '{split}' has a shard entry without name, index or samples ({exc})") from None
    if sum(counts) != int(info.get("samples", sum(counts))):
        raise DataError(f"{path}: split '{split}' says {info['samples']} samples, its shards hold {sum(counts)}")
    base = manifest.get("base") or location
    return SplitShards(split, location, str(base), names, indexes, counts, sizes, sum(counts),
                       bool(info.get("labeled", bool(manifest.get("classes")))), len(manifest.get("classes", [])))
