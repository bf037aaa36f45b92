"""The data a sweep's run reads: the first whole shards of each training set for its data fraction (a subset folder
whose manifest points into the set), checked against the fraction asked for, and what a row records of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from pathlib import Path

from mixmae_scale.atomic_file import write_text
from mixmae_scale.config import ConfigError
from mixmae_scale.data.errors import plural
from mixmae_scale.data.manifest import MANIFEST, DataError, load_split
from mixmae_scale.scaling.spec import SweepSpec


def subset_shards(shards: str | Path, fraction: float, out: Path, split: str | None = None) -> Path:
    """A folder whose manifest lists the first ceil(fraction x n) training shards and every validation shard,
    pointing into the full set wherever it lives (a folder, adopted shards, s3://): nothing is copied or linked,
    and data fractions are nested, so larger ones see a superset. Whole shards are rarely the fraction asked for:
    `run_data` refuses one too far off and rows record what was read.

    Keyed on what the set is (its manifest as written, less where its tars lie, and the split), not where it is: a
    sweep or set moved to another mount keeps its subset's name, which its run folders' config.yaml compare, and
    the manifest is written again to point at the set where it is now. Tar names stay relative to the set's base,
    as in the set's own manifest, so a run's data identity (what a checkpoint's resume compares) is the same shards'
    wherever they lie."""
    from mixmae_scale.data import storage
    from mixmae_scale.data.manifest import load_manifest, read_manifest, write_manifest

    replace = dataclasses.replace
    location = str(shards) if storage.is_remote(shards) else str(Path(shards).resolve())
    written = read_manifest(location)
    legacy = out / _subset_name(fraction, [location, split or "train", written])
    if (legacy / MANIFEST).exists():  # made before subsets were keyed on the set alone: its runs' checkpoints
        return legacy  # recorded its absolute tar names; here, at the set's same location, it still holds
    # Another set, or this one converted again, has another manifest: a subset made for it is never taken for this.
    folder = out / _subset_name(fraction, [split or "train", {k: v for k, v in written.items() if k != "base"}])
    manifest = load_manifest(location)
    splits = {name: replace(entry, shards=tuple(replace(s, index=storage.join(location, s.index))
                                                for s in entry.shards))
              for name, entry in manifest.splits.items()}
    train = splits[split or "train"]  # a mixture's source may train on another split: it becomes train
    # 0.6 x 5 is 3.0000000000000004 in floating point: its ceil, 4 shards, was 0.8 of the set
    keep = train.shards[: max(1, math.ceil(fraction * len(train.shards) - 1e-9))]
    splits["train"] = replace(train, shards=keep, samples=sum(s.samples for s in keep))
    subset = replace(manifest, splits=splits, base=storage.join(location, manifest.base or ""))
    if (folder / MANIFEST).exists() and read_manifest(folder) == json.loads(json.dumps(subset.to_dict())):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "classes.json", json.dumps(manifest.classes, indent=1))
    write_manifest(folder, subset)
    return folder


def _subset_name(fraction: float, key: list) -> str:
    return f"fraction-{fraction:g}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}"


FRACTION_TOLERANCE = 0.1  # whole shards may read this much more (or less) of a set than its data fraction


def run_data(spec: SweepSpec, fraction: float, out: Path) -> tuple[list[str], int]:
    """The overrides that point a run at its data fraction (of the one set, or of every set of a mixture) and the
    samples per epoch they give (a mixture: each set's subset times its weight)."""
    sets, samples, _, _ = _fraction_sets(spec, fraction, out)
    return sets, samples


def data_read(spec: SweepSpec, fraction: float, out: Path) -> dict:
    """What a row records of the data its run read: the share of the training samples its whole shards hold (of the
    weighted mixture), their count per epoch, and its subsets' folders under OUT (`data_subsets`: their names say
    which sets, splits and fraction, not where the sets lie, so a row is judged on them after a move). The fraction
    asked for is `data_fraction`: with 4 shards, 0.1 read 0.25 of the set and was recorded as 0.1."""
    _, samples, share, folders = _fraction_sets(spec, fraction, out)
    return {"data_fraction_read": round(share, 6), "train_samples_read": samples,
            "data_subsets": [folder.relative_to(out).as_posix() for folder in folders]}


def _fraction_sets(spec: SweepSpec, fraction: float, out: Path) -> tuple[list[str], int, float, list[Path]]:
    """(overrides, samples per epoch, share of the training samples read, the subset folders). With a mixture,
    `shards` gives only the held-out images: its subset is not checked against the fraction."""
    subset = subset_shards(spec.shards, fraction, out / "data")
    if not spec.sources:
        kept, full = _whole_shards(spec, spec.shards, None, subset, fraction)
        return [f"data.shards={subset}"], kept, kept / full, [subset]
    mixture, samples, total, folders = [], 0.0, 0.0, [subset]
    for number, source in enumerate(spec.sources):
        part = subset_shards(source["shards"], fraction, out / "data" / f"source{number}", source.get("split"))
        kept, full = _whole_shards(spec, source["shards"], source.get("split"), part, fraction)
        mixture.append({"shards": str(part), "weight": source["weight"], "split": "train"})
        samples, total = samples + source["weight"] * kept, total + source["weight"] * full
        folders.append(part)
    return ([f"data.shards={subset}", f"data.sources={json.dumps(mixture)}"], max(1, round(samples)),
            samples / total, folders)


def _whole_shards(spec: SweepSpec, shards: str, split: str | None, part: Path, fraction: float) -> tuple[int, int]:
    """(samples of the subset, samples of the set); refused when the subset is more than FRACTION_TOLERANCE off."""
    full, kept = load_split(shards, split or "train"), load_split(part, "train")
    share = kept.samples / full.samples
    if abs(share / fraction - 1) <= FRACTION_TOLERANCE:
        return kept.samples, full.samples
    shares = list(itertools.accumulate(full.samples_per_shard))
    near = sorted(range(len(shares)), key=lambda k: abs(shares[k] / full.samples - fraction))[:3]
    options = ", ".join(f"{shares[k] / full.samples:.3g} ({plural(k + 1, 'shard')})" for k in sorted(near))
    raise ConfigError(f"{spec.file or 'the sweep spec'}: data_fractions {fraction:g} of {shards} ('{split or 'train'}':"
                      f" {plural(len(shares), 'shard')}, {full.samples} samples) is "
                      f"{plural(len(kept.names), 'whole shard')}, "
                      f"{kept.samples} samples: {share:.3g} of the set, {share / fraction:.2f}x the fraction (more "
                      f"than {FRACTION_TOLERANCE:.0%} off). Whole shards give {options}: give one of those")


def whole_sets(spec: SweepSpec, fraction: float, train_samples: int,
               unread: DataError | None = None) -> tuple[list[str], int]:
    """`run_data` where the sets' manifests cannot be read (lines emitted for a cluster's shards): the data overrides
    and samples per epoch a run here would get. At fraction 1 its subsets hold every training shard of each set, so
    the sets themselves stand for them (a mixture with its weights and splits) and `train_samples` (the split's
    count, a mixture's weighted one) for their samples. A smaller fraction's whole shards and their samples are in
    the manifests alone: the lines named the whole set with 'fraction x train_samples' for an epoch, and a 0.6 run
    trained on all of it, so that is refused, naming what is missing."""
    if fraction != 1.0:
        manifests = ", ".join(dict.fromkeys(_manifest_path(s) for s in [spec.shards, *(s["shards"] for s in
                                                                                      spec.sources)]))
        raise ConfigError(f"{spec.file or 'the sweep spec'}: data_fractions {fraction:g}: a run reads the first whole "
                          f"shards of each training set for it, and which those are and how many samples they hold "
                          f"(its epochs) is in the manifest ({manifests}), which cannot be read here ({unread}). Write "
                          "the commands where the manifests can be read (the images are not read), or plan "
                          "data_fractions: [1.0] here and the other fractions where they can be read")
    data = [f"data.shards={spec.shards}"]
    if spec.sources:  # as `_fraction_sets` gives them: each set's own split, read as its training split
        data.append("data.sources=" + json.dumps([{"shards": s["shards"], "weight": s["weight"],
                                                   "split": s.get("split") or "train"} for s in spec.sources]))
    return data, train_samples


def _manifest_path(location: str) -> str:
    from mixmae_scale.data import storage
    from mixmae_scale.data.manifest import MANIFEST

    return storage.join(location, MANIFEST)
