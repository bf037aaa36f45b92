"""Reading a shard folder's manifest and checking that the files it names are there."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """Shards that cannot be read as configured; the message names the file or key."""


@dataclass(frozen=True)
class SplitShards:
    split: str
    tars: tuple[str, ...]
    indexes: tuple[str, ...]
    samples: int
    samples_per_shard: tuple[int, ...]
    num_classes: int


def load_split(folder: str | Path, split: str, world_size: int = 1) -> SplitShards:
    folder = Path(folder)
    manifest_path = folder / "dataset.json"
    if not folder.is_dir():
        raise DataError(f"shard folder {folder} does not exist (data.shards; tried {folder.absolute()}); build "
                        "shards with `mixmae shards`")
    if not manifest_path.exists():
        tars = list(folder.glob("*.tar"))
        hint = f" ({len(tars)} .tar files are there, but no manifest)" if tars else " (the folder is empty)"
        raise DataError(f"{manifest_path.absolute()} not found{hint}; shards must come from `mixmae shards`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{manifest_path}: not valid JSON: {exc}") from exc
    if split not in manifest.get("splits", {}):
        raise DataError(f"{manifest_path}: no split '{split}'; it has {sorted(manifest.get('splits', {}))}")
    info = manifest["splits"][split]
    shards = info["shards"]
    if not shards:
        raise DataError(f"{manifest_path}: split '{split}' has no shards")
    tars, indexes = [], []
    for shard in shards:
        tar, idx = folder / shard["name"], folder / shard["index"]
        for path in (tar, idx):
            if not path.exists():
                raise DataError(f"{path} is named in {manifest_path} but missing")
        if tar.stat().st_size != shard["bytes"]:
            raise DataError(f"{tar}: {tar.stat().st_size} bytes, the manifest says {shard['bytes']}: the files "
                            "do not match the manifest (run `mixmae shards verify`)")
        _check_member_names(idx)
        tars.append(str(tar))
        indexes.append(str(idx))
    return SplitShards(split, tuple(tars), tuple(indexes), int(info["samples"]),
                       tuple(int(s["samples"]) for s in shards), len(manifest.get("classes", [])))


def _check_member_names(idx: Path) -> None:
    """Shards are data: a member named with an absolute path or '..' marks a crafted archive."""
    for number, line in enumerate(idx.read_text().splitlines()[1:], start=2):
        fields = line.split()
        for name in fields[3::4]:  # each component is "ext offset size name"
            if name.startswith("/") or ".." in Path(name).parts:
                raise DataError(f"{idx}:{number}: member name {name!r} is absolute or contains '..'; "
                                "refusing a shard that could write outside its folder")
