"""Image folders to WebDataset shards: plan, write in parallel with progress, reconcile, manifest.

Every source file ends in exactly one place: a shard, or `rejected.jsonl` with its reason; the
summary checks found = written + rejected for each split and fails loudly if it does not hold. The
plan (which file goes to which shard) is saved before the first shard, so a resumed conversion writes
each file once even if the source folder changed in between (saved_plan.py). More rejections than
--max-rejected allows end the run with a non-zero exit and the counts (rejection_limit.py). The output
is a folder, or an s3:// prefix that shards are uploaded to one by one from a local staging folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from mixmae_scale import __version__
from mixmae_scale.data import storage
from mixmae_scale.shards.jpeg_check import DEFAULT_MAX_PIXELS, Oversize
from mixmae_scale.shards.rejection_limit import DEFAULT_MAX_REJECTED, check_every_split
from mixmae_scale.shards.saved_plan import resume_plan
from mixmae_scale.shards.sources import (
    SourceError,
    SourceImage,
    folder_images,
    hold_out,
    ignored_note,
    imagenet_split,
    read_class_names,
)
from mixmae_scale.shards.writer import (
    PROGRESS_DIR,
    ShardPlan,
    ShardRecord,
    WriteOptions,
    finished_records,
    plan_shards,
    write_shard,
)

MANIFEST = "dataset.json"
# Options that do not change what is written: a resume may change them.
RUN_ONLY_OPTIONS = ("workers", "max_rejected", "staging")


@dataclass(frozen=True)
class ConvertOptions:
    layout: str  # imagenet | folder
    splits: tuple[str, ...] = ("train", "val")
    seed: int = 0
    samples_per_shard: int | None = None
    shard_bytes: int | None = 1_000_000_000
    quality: int = 95
    resize_shorter: int | None = None
    strict: bool = False
    workers: int = 1
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # None: no limit (decompression bombs are still rejected)
    oversize: Oversize = "downscale"
    max_rejected: float = DEFAULT_MAX_REJECTED
    staging: str | None = None  # local folder for shards on their way to an s3:// output
    val_fraction: float = 0.0  # folder layout: hold out this share of each class as the 'val' split


def parse_size(text: str) -> int:
    """'1GB', '500MB', '64k' or a plain byte count."""
    units = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    raw = text.strip().upper()
    number = raw.rstrip("KMGIB")
    unit = raw[len(number):]
    try:
        if unit not in units:
            raise ValueError(unit)
        return int(float(number) * units[unit])
    except ValueError:
        raise ValueError(f"shard size '{text}' is not a size like 1GB, 500MB or 1000000") from None


def _check_output(src: Path, out: str) -> None:
    if storage.is_remote(out):
        return
    src_r, out_r = src.resolve(), Path(out).resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise SourceError(f"output folder {out} is inside the source folder {src}: it would be read as input")


def _check_disk(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise SourceError(f"not enough free disk in {folder}: about {needed / 1e9:.1f} GB needed for the "
                          f"remaining shards, {free / 1e9:.1f} GB free")


def _written_options(options: ConvertOptions) -> dict:
    written = {k: v for k, v in asdict(options).items() if k not in RUN_ONLY_OPTIONS}
    written["splits"] = list(written["splits"])
    return written


def _check_same_options(out: str, options: ConvertOptions) -> None:
    """Resuming with other options would mix two datasets in one folder: refuse."""
    url = storage.join(out, f"{PROGRESS_DIR}/options.json")
    current = _written_options(options)
    if storage.exists(url):
        # A folder written before an option existed was written with that option's default.
        previous = {**_written_options(ConvertOptions(layout=options.layout)), **json.loads(storage.read_text(url))}
        previous = {k: v for k, v in previous.items() if k not in RUN_ONLY_OPTIONS}
        previous["splits"] = list(previous["splits"])
        if previous != current:
            changed = sorted(k for k in current if previous.get(k) != current[k])
            raise SourceError(f"{out} holds shards made with other options ({', '.join(changed)}); "
                              "use the same options to resume, or a new output folder")
    else:
        storage.write_text(url, json.dumps(current, sort_keys=True))


def _split_root(src: Path, split: str, options: ConvertOptions) -> Path:
    """The folder a split's relative file names start from (--val-fraction: both splits come from `src`)."""
    return src if options.layout == "imagenet" or split == "train" or options.val_fraction else src / split


@dataclass(frozen=True)
class Discovered:
    """One split's source: its images, its class list, and the files skipped because their names are not images."""

    images: list[SourceImage]
    classes: list[str]
    ignored: list[str]


def _discover(src: Path, split: str, options: ConvertOptions) -> Discovered:
    ignored: list[str] = []
    if options.layout == "imagenet":
        return Discovered(*imagenet_split(src, split, ignored), ignored)
    if options.val_fraction:  # both splits from the one folder, the same draw for each
        images, classes = folder_images(src, ignored)
        train, val = hold_out(images, options.val_fraction, options.seed)
        return Discovered(train if split == "train" else val, classes, ignored if split == "train" else [])
    return Discovered(*folder_images(_split_root(src, split, options), ignored), ignored)


def discover_splits(src: Path, options: ConvertOptions) -> dict[str, Discovered]:
    """Every split's files before any shard is written, so that one run names the problems of all splits."""
    found: dict[str, Discovered] = {}
    problems: list[str] = []
    for split in options.splits:
        try:
            found[split] = _discover(src, split, options)
        except SourceError as exc:
            if str(exc) not in problems:
                problems.append(str(exc))
    classes = next((d.classes for d in found.values() if d.classes), [])
    problems += [f"{src / split}: its class folders differ from the first split's" for split, d in found.items()
                 if d.classes and d.classes != classes]
    if problems:
        raise SourceError("; ".join(problems))
    for split, discovered in found.items():
        if discovered.ignored:
            tqdm.write(f"{split}: {ignored_note(discovered.ignored)}")
    return found


def check_options(options: ConvertOptions) -> None:
    if options.val_fraction and (options.layout != "folder" or set(options.splits) != {"train", "val"}):
        raise SourceError("--val-fraction holds out part of a folder as 'val': it goes with `mixmae shards folder` "
                          "and the splits train,val (leave out --split)")
    if not 0 <= options.val_fraction < 1:
        raise SourceError(f"--val-fraction {options.val_fraction:g}: must lie in [0, 1), e.g. 0.1 for a tenth of "
                          "each class")


def _staging(out: str, options: ConvertOptions) -> Path | None:
    if not storage.is_remote(out):
        return None
    if options.staging:
        return Path(options.staging)
    return Path(tempfile.gettempdir()) / f"mixmae-staging-{hashlib.sha1(out.encode()).hexdigest()[:12]}"


def _run_plans(plans: list[ShardPlan], out: str, options: WriteOptions, workers: int, total_images: int,
               desc: str, staging: Path | None) -> list[ShardRecord]:
    start = time.perf_counter()
    records: list[ShardRecord] = []
    with tqdm(total=total_images, unit="img", desc=desc, dynamic_ncols=True) as bar:
        written_bytes = 0

        def done(record: ShardRecord) -> None:
            nonlocal written_bytes
            records.append(record)
            written_bytes += record.bytes
            bar.update(record.samples + len(record.rejected))
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(shard=record.name, MBps=f"{written_bytes / 1e6 / elapsed:.1f}")

        if workers <= 1:
            for plan in plans:
                done(write_shard(plan, out, options, staging))
            return records
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(write_shard, plan, out, options, staging) for plan in plans]
            for future in as_completed(futures):
                done(future.result())
    return records


def convert(src: Path, out: str | Path, options: ConvertOptions) -> dict:
    src = Path(src)
    out = str(out).rstrip("/") if storage.is_remote(out) else str(out)
    check_options(options)
    if not src.is_dir():
        raise SourceError(f"--src {src}: not found (tried {src.absolute()})")
    _check_output(src, out)
    staging = _staging(out, options)
    if staging is None:
        Path(out).mkdir(parents=True, exist_ok=True)
    _check_same_options(out, options)
    write_options = WriteOptions(options.quality, options.resize_shorter, options.strict, options.max_pixels,
                                 options.oversize)
    manifest: dict = {"format": "mixmae-scale-shards", "version": 2, "tool_version": __version__,
                      "options": _written_options(options), "splits": {}}
    rejected_lines: list[str] = []
    limits: list[tuple[str, int, list[str]]] = []
    discovered = discover_splits(src, options)
    classes = next((d.classes for d in discovered.values() if d.classes), [])
    for split in options.splits:
        images, split_classes, ignored = (discovered[split].images, discovered[split].classes,
                                          discovered[split].ignored)
        labeled = bool(split_classes)

        def make_plans(todo: list[SourceImage], first_index: int, first_sample: int,
                       split: str = split, labeled: bool = labeled) -> list[ShardPlan]:
            return plan_shards(todo, split, options.seed, options.samples_per_shard, options.shard_bytes, labeled,
                               first_index, first_sample)

        plans, changes = resume_plan(out, split, _split_root(src, split, options), images, split_classes,
                                     make_plans, started=_has_shards(out, split))
        if message := changes.describe(split):
            tqdm.write(f"WARNING {message}", file=sys.stderr)
        records = finished_records(out, [p.name for p in plans])
        todo = [p for p in plans if p.name not in records]
        needed = [sum(im.size for im in p.images) for p in todo]
        if staging is None:
            _check_disk(Path(out), int(1.1 * sum(needed)))
        elif todo:
            staging.mkdir(parents=True, exist_ok=True)
            _check_disk(staging, int(1.1 * max(needed) * max(options.workers, 1)))
        skipped = len(plans) - len(todo)
        desc = f"{split}: {len(todo)} shard(s) to write" + (f", {skipped} done earlier" if skipped else "")
        for record in _run_plans(todo, out, write_options, options.workers, sum(len(p.images) for p in todo), desc,
                                 staging):
            records[record.name] = record
        if any(p.name not in records for p in plans):
            raise RuntimeError(f"{split}: some shards have no completion record after writing")
        ordered = [records[p.name] for p in plans]
        found = sum(len(p.images) for p in plans)
        written = sum(r.samples for r in ordered)
        rejected = sum(len(r.rejected) for r in ordered)
        if written + rejected != found:
            raise RuntimeError(f"{split}: planned {found} files but wrote {written} and rejected {rejected}")
        converted: dict[str, int] = {}
        for r in ordered:
            for kind, count in r.converted.items():
                converted[kind] = converted.get(kind, 0) + count
            rejected_lines += [json.dumps({"split": split, "shard": r.name, **item}, sort_keys=True)
                               for item in r.rejected]
        limits.append((split, found, [item["reason"] for r in ordered for item in r.rejected]))
        manifest["splits"][split] = {
            "found": found, "samples": written, "rejected": rejected, "copied": sum(r.copied for r in ordered),
            "ignored_not_images": len(ignored), "ignored_examples": ignored[:5],
            "converted": converted, "labeled": labeled, "transient": sum(r.transient for r in ordered),
            "source_changes": {"vanished": len(changes.vanished), "appeared": len(changes.appeared)},
            **({"held_out_of_each_class": options.val_fraction} if options.val_fraction and split == "val" else {}),
            "shards": [{"name": f"{r.name}.tar", "index": f"{r.name}.idx", "samples": r.samples, "bytes": r.bytes,
                        "sha256": r.sha256} for r in ordered if r.samples],
        }
    names = read_class_names(src)
    manifest["classes"] = [{"index": i, "wnid": w, **({"name": names[w]} if w in names else {})}
                           for i, w in enumerate(classes)]
    storage.write_text(storage.join(out, "classes.json"), json.dumps(manifest["classes"], indent=1))
    rejections = storage.join(out, "rejected.jsonl")
    storage.write_text(rejections, "".join(line + "\n" for line in rejected_lines))
    check_every_split(limits, options.max_rejected, rejections)
    storage.write_text(storage.join(out, MANIFEST), json.dumps(manifest, indent=1))
    if staging is not None and staging.is_dir() and not any(staging.iterdir()):
        staging.rmdir()
    return manifest


def _has_shards(out: str, split: str) -> bool:
    """Whether a conversion of this split began here (any shard record), before plans were saved."""
    progress = storage.join(out, PROGRESS_DIR)
    if not storage.is_remote(out) and not Path(progress).is_dir():
        return False
    return any(f.name.startswith(f"{split}-") for f in storage.list_files(progress, ".json"))


def summary_lines(manifest: dict) -> list[str]:
    """One line per split a person can read: counts that reconcile, conversions by kind, shards."""
    lines = []
    for split, info in manifest["splits"].items():
        kinds = ", ".join(f"{_kind_name(kind)}: {count}" for kind, count in sorted(info["converted"].items()))
        held = (f" (held out: {info['held_out_of_each_class']:.0%} of each class)"
                if "held_out_of_each_class" in info else "")
        lines.append(f"{split}{held}: found {info['found']} = written {info['samples']} + rejected {info['rejected']}; "
                     f"{info['copied']} copied as they are, {sum(info['converted'].values())} converted"
                     + (f" ({kinds})" if kinds else "") + f"; {len(info['shards'])} shard(s)"
                     + (f"; ignored {info['ignored_not_images']} not named like an image"
                        if info.get("ignored_not_images") else ""))
        if info.get("transient"):
            lines.append(f"{split}: {info['transient']} of the rejections were I/O errors that may pass (EIO, ESTALE, "
                         "timeouts; retried with backoff): run the same command again to retry them")
    return lines


def _kind_name(kind: str) -> str:
    """'converted:PNG' -> 'PNG', 'converted:grayscale JPEG' -> 'grayscale JPEG', 'resized' -> 'resized'."""
    return kind.removeprefix("converted:")
