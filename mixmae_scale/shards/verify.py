"""Checking a shard set against its manifest: a local folder, an adopted set (tars elsewhere) or an
s3:// set, all read through data/storage.py.

Each tar is streamed once (one GET on S3) and indexed again from its bytes; the stored index must name
exactly those members at those offsets, with the counts the manifest gives. A sample the stored index
lists but the tar does not hold as a usable sample is reported with the reason (cut, no image, does
not decode with --decode, ...). Sets converted here are held to more: every sample of the tar is
indexed, has jpg, cls and json, and (with --decode) is a baseline RGB JPEG. Adopted sets may hold
samples that adoption rejected; those are simply not in their index.

Tars are read through the builder's bounded pool (`--workers`, as conversion and adoption): a set of 1,000 tars in a
store was read one tar after another, each waiting on its GET. Each tar's problems are kept with its place in the
manifest and reported in that order, so the report is the same whatever the worker count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mixmae_scale.data import storage
from mixmae_scale.data.errors import plural
from mixmae_scale.data.manifest import DataError, ShardEntry, load_manifest, load_split
from mixmae_scale.shards.builder import bounded_pool
from mixmae_scale.shards.tar_index import INDEX_VERSION, TarIndex, index_tar, split_name

REQUIRED_FIELDS = ("jpg", "cls", "json")  # what `mixmae shards` writes per sample
CHANGED = "the manifest says {size}: the tar changed since it was indexed"


def _stored_index(url: str, samples: int, errors: list[str]) -> list[str] | None:
    try:
        text = storage.read_text(url)
    except storage.StorageError as exc:
        errors.append(f"{exc} (the shard's DALI index)")
        return None
    if not text.strip():
        errors.append(f"{url}: empty (the shard's DALI index); rebuild it with `mixmae shards adopt` or `wds2idx`")
        return None
    head, *lines = text.splitlines()
    parts = head.split()
    if len(parts) != 2 or parts[0] != INDEX_VERSION or not parts[1].isdigit() or int(parts[1]) != len(lines):
        errors.append(f"{url}: not a {INDEX_VERSION} index of {len(lines)} samples (first line {head!r})")
        return None
    if len(lines) != samples:
        errors.append(f"{url}: {len(lines)} samples, the manifest says {samples}")
    return lines


def _scan(url: str, entry: ShardEntry, decode: bool, errors: list[str]) -> TarIndex | None:
    size = entry.bytes
    if not storage.is_remote(url):
        path = Path(url)
        if not path.is_file():
            errors.append(f"{path.resolve()}: missing")
            return None
        if size and path.stat().st_size != size:
            errors.append(f"{url}: {path.stat().st_size} bytes, {CHANGED.format(size=size)}")
            return None
        size = path.stat().st_size
    try:
        if not size:  # a manifest may leave out `bytes` (0): the file says its size, as a store's HEAD does
            size = storage.size(url)
        if not size:
            errors.append(f"{url}: empty (0 bytes), not a tar")
            return None
        with storage.open_range(url, 0, size) as stream:
            # An object rewritten at another size is one line, as a file is: its samples past the old offsets
            # would each be a line of their own. The store says the object's size with the first range it sends.
            if size and stream.total is not None and stream.total != size:
                errors.append(f"{url}: {stream.total} bytes, {CHANGED.format(size=size)}")
                return None
            found = index_tar(stream, decode)
    except storage.StorageError as exc:
        errors.append(str(exc))
        return None
    if found.bytes_read != size:
        errors.append(f"{url}: {found.bytes_read} bytes read, the manifest says {size}")
    if entry.sha256 and found.sha256 != entry.sha256:
        errors.append(f"{url}: sha256 differs from the manifest (the tar changed since it was indexed)")
    return found


def _key(line: str) -> str:
    """The sample key of an index line, from its first member's name."""
    fields = line.split(" ")
    parts = split_name(fields[3]) if len(fields) >= 4 else None
    return parts[0] if parts else line[:40]


def _compare(tar: str, idx: str, stored: list[str], found: TarIndex, adopted: bool, labeled: bool, decode: bool,
             errors: list[str]) -> None:
    position = {line: i for i, line in enumerate(found.lines)}
    reasons = {r["key"]: r["reason"] for r in found.rejected}
    for number, line in enumerate(stored, start=2):
        if line not in position:
            key = _key(line)
            why = reasons.get(key, "the tar does not hold these members at these offsets and sizes")
            errors.append(f"{tar}: sample {key} (line {number} of {idx}): {why}")
            continue
        i = position[line]
        if labeled and found.labels[i] is None:
            errors.append(f"{tar}: sample {found.keys[i]} has no cls, but its split is labeled")
        if adopted:
            continue
        exts = set(line.split(" ")[0::4])  # 'ext offset size name' per member
        missing = [f for f in REQUIRED_FIELDS if f not in exts]
        if missing:
            errors.append(f"{tar}: sample {found.keys[i]} lacks {', '.join(missing)}")
        if decode and found.images[i] != "JPEG RGB":
            errors.append(f"{tar}: sample {found.keys[i]}: {found.images[i]}, expected JPEG RGB")
    if not adopted:  # a set converted here indexes every sample its tars hold
        stored_lines = set(stored)
        extra = [found.keys[i] for i, line in enumerate(found.lines) if line not in stored_lines]
        extra += [r["key"] for r in found.rejected if r["key"] not in {_key(line) for line in stored}]
        if extra:
            errors.append(f"{tar}: {plural(len(extra), 'sample')} not in its index, first {extra[0]}")
        if found.problem:
            errors.append(f"{tar}: {found.problem}")
        errors.extend(f"{tar}: {item['member']}: {item['reason']}" for item in found.ignored)


@dataclass(frozen=True)
class _Shard:
    """One tar of a split and what checking it needs: a unit of the pool, sent to a worker process as it is."""

    number: int
    tar: str
    idx: str
    entry: ShardEntry
    adopted: bool
    labeled: bool
    decode: bool


def _check(unit: _Shard) -> tuple[int, list[str]]:
    """(samples in the tar's readable index, the tar's problems in the order they are found)."""
    errors: list[str] = []
    stored = _stored_index(unit.idx, unit.entry.samples, errors)
    found = _scan(unit.tar, unit.entry, unit.decode, errors)
    if stored is None or found is None:
        return 0, errors
    _compare(unit.tar, unit.idx, stored, found, unit.adopted, unit.labeled, unit.decode, errors)
    return len(stored), errors


def verify(location: str | Path, decode: bool = False, workers: int = 1) -> dict:
    """Report: {"folder", "splits": {split: {"samples", "shards", "decoded"}}, "errors": [...], "ok"}. `workers`
    processes read tars at once (the builder's bounded pool); the report is the same for any count: each tar's
    problems are listed in the manifest's tar order."""
    location = str(location)
    manifest = load_manifest(location)
    errors: list[str] = []
    report = {"folder": location, "splits": {}, "errors": errors}
    for split, info in manifest.splits.items():
        try:
            shards = load_split(location, split)
        except DataError as exc:
            errors.append(str(exc))
            continue
        units = [_Shard(i, shards.tar_url(i), shards.index_url(i), entry, info.adopted, shards.labeled, decode)
                 for i, entry in enumerate(info.shards)]
        checked = {unit.number: result for unit, result in bounded_pool(_check, units, workers)}
        seen = decoded = 0
        for unit in units:  # the manifest's order, whatever order the workers finished in
            samples, problems = checked[unit.number]
            errors.extend(problems)
            seen += samples
            decoded += samples if decode else 0
        if seen != info.samples:
            errors.append(f"split {split}: {seen} samples in readable shards, the manifest says {info.samples}")
        report["splits"][split] = {"samples": seen, "shards": len(info.shards),
                                   "decoded": decoded if decode else None}
    report["ok"] = not errors
    return report
