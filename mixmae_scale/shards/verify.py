"""Checking a shard folder against its manifest: checksums, counts, fields, safe names, decodability."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from mixmae_scale.shards.convert import MANIFEST

REQUIRED_FIELDS = ("jpg", "cls", "json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unsafe_member_name(name: str) -> bool:
    return name.startswith("/") or ".." in Path(name).parts


def verify(folder: Path, decode: bool = False) -> dict:
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path.absolute()}: not found; is {folder} a shard folder made by "
                                "`mixmae shards`?")
    manifest = json.loads(manifest_path.read_text())
    errors: list[str] = []
    report = {"folder": str(folder), "splits": {}, "errors": errors}
    for split, info in manifest["splits"].items():
        seen = decoded = 0
        for shard in info["shards"]:
            path = folder / shard["name"]
            if not path.exists():
                errors.append(f"{path}: missing")
                continue
            if _sha256(path) != shard["sha256"]:
                errors.append(f"{path}: sha256 differs from the manifest")
            idx = folder / shard["index"]
            if not idx.exists():
                errors.append(f"{idx}: DALI index missing")
            elif int(idx.read_text().split("\n", 1)[0].split()[1]) != shard["samples"]:
                errors.append(f"{idx}: sample count differs from the manifest")
            samples: dict[str, set[str]] = {}
            with tarfile.open(path) as tar:
                for member in tar:
                    if unsafe_member_name(member.name):
                        errors.append(f"{path}: unsafe member name {member.name!r}")
                        continue
                    key, _, ext = member.name.partition(".")
                    samples.setdefault(key, set()).add(ext)
                    if decode and ext == "jpg":
                        data = tar.extractfile(member).read()
                        try:
                            with Image.open(io.BytesIO(data)) as image:
                                image.load()
                                if image.format != "JPEG" or image.mode != "RGB":
                                    errors.append(f"{path}:{member.name}: {image.format} {image.mode}, expected "
                                                  "JPEG RGB")
                            decoded += 1
                        except OSError as exc:
                            errors.append(f"{path}:{member.name}: does not decode: {exc}")
            for key, fields in samples.items():
                missing = [f for f in REQUIRED_FIELDS if f not in fields]
                if missing:
                    errors.append(f"{path}: sample {key} lacks {', '.join(missing)}")
            if len(samples) != shard["samples"]:
                errors.append(f"{path}: {len(samples)} samples, manifest says {shard['samples']}")
            seen += len(samples)
        if seen != info["samples"]:
            errors.append(f"split {split}: {seen} samples in shards, manifest says {info['samples']}")
        report["splits"][split] = {"samples": seen, "shards": len(info["shards"]),
                                   "decoded": decoded if decode else None}
    report["ok"] = not errors
    return report
