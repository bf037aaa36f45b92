"""Image folders to WebDataset shards: plan, write in parallel with progress, reconcile, manifest.

Every source file ends in exactly one place: a shard, or `rejected.jsonl` with its reason; the
summary checks found = written + rejected for each split and fails loudly if it does not hold.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from mixmae_scale import __version__
from mixmae_scale.atomic_file import write_text
from mixmae_scale.shards.jpeg_check import DEFAULT_MAX_PIXELS, Oversize
from mixmae_scale.shards.sources import (
    SourceError,
    SourceImage,
    folder_images,
    hold_out,
    imagenet_split,
    read_class_names,
)
from mixmae_scale.shards.writer import (
    PROGRESS_DIR,
    ShardPlan,
    ShardRecord,
    WriteOptions,
    plan_shards,
    read_record,
    write_shard,
)

MANIFEST = "dataset.json"


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


def _check_output(src: Path, out: Path) -> None:
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise SourceError(f"output folder {out} is inside the source folder {src}: it would be read as input")


def _check_disk(out: Path, needed: int) -> None:
    free = shutil.disk_usage(out).free
    if needed > free:
        raise SourceError(f"not enough free disk in {out}: about {needed / 1e9:.1f} GB needed for the "
                          f"remaining shards, {free / 1e9:.1f} GB free")


def _check_same_options(out: Path, options: ConvertOptions) -> None:
    """Resuming with other options would mix two datasets in one folder: refuse."""
    path = out / PROGRESS_DIR / "options.json"
    current = {k: v for k, v in asdict(options).items() if k != "workers"}
    current["splits"] = list(current["splits"])
    if path.exists():
        # A folder written before an option existed was written with that option's default.
        defaults = {k: v for k, v in asdict(ConvertOptions(layout=options.layout)).items() if k != "workers"}
        previous = {**defaults, **json.loads(path.read_text())}
        previous["splits"] = list(previous["splits"])
        if previous != current:
            changed = sorted(k for k in current if previous.get(k) != current[k])
            raise SourceError(f"{out} holds shards made with other options ({', '.join(changed)}); "
                              "use the same options to resume, or a new output folder")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(current, sort_keys=True))


def _discover(src: Path, split: str, options: ConvertOptions) -> tuple[list[SourceImage], list[str]]:
    if options.layout == "imagenet":
        return imagenet_split(src, split)
    if options.val_fraction:  # both splits from the one folder, the same draw for each
        images, classes = folder_images(src)
        train, val = hold_out(images, options.val_fraction, options.seed)
        return (train if split == "train" else val), classes
    return folder_images(src if split == "train" else src / split)


def check_options(options: ConvertOptions) -> None:
    if options.val_fraction and (options.layout != "folder" or set(options.splits) != {"train", "val"}):
        raise SourceError("--val-fraction holds out part of a folder as 'val': it goes with `mixmae shards folder` "
                          "and the splits train,val (leave out --split)")
    if not 0 <= options.val_fraction < 1:
        raise SourceError(f"--val-fraction {options.val_fraction:g}: must lie in [0, 1), e.g. 0.1 for a tenth of "
                          "each class")


def _run_plans(plans: list[ShardPlan], out: Path, options: WriteOptions, workers: int, total_images: int,
               desc: str) -> None:
    start = time.perf_counter()
    with tqdm(total=total_images, unit="img", desc=desc, dynamic_ncols=True) as bar:
        written_bytes = 0

        def done(record: ShardRecord) -> None:
            nonlocal written_bytes
            written_bytes += record.bytes
            bar.update(record.samples + len(record.rejected))
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(shard=record.name, MBps=f"{written_bytes / 1e6 / elapsed:.1f}")

        if workers <= 1:
            for plan in plans:
                done(write_shard(plan, out, options))
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(write_shard, plan, out, options) for plan in plans]
            for future in as_completed(futures):
                done(future.result())


def convert(src: Path, out: Path, options: ConvertOptions) -> dict:
    src, out = Path(src), Path(out)
    check_options(options)
    if not src.is_dir():
        raise SourceError(f"--src {src}: not found (tried {src.absolute()})")
    _check_output(src, out)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_options(out, options)
    write_options = WriteOptions(options.quality, options.resize_shorter, options.strict, options.max_pixels,
                                 options.oversize)
    manifest: dict = {"format": "mixmae-scale-shards", "tool_version": __version__,
                      "options": {k: v for k, v in asdict(options).items() if k != "workers"}, "splits": {}}
    classes: list[str] = []
    rejected_lines: list[str] = []
    for split in options.splits:
        images, split_classes = _discover(src, split, options)
        if split_classes and classes and split_classes != classes:
            raise SourceError(f"{src / split}: its class folders differ from the first split's")
        classes = classes or split_classes
        labeled = bool(split_classes)
        plans = plan_shards(images, split, options.seed, options.samples_per_shard, options.shard_bytes, labeled)
        todo = [p for p in plans if read_record(out, p.name) is None]
        _check_disk(out, int(1.1 * sum(im.size for p in todo for im in p.images)))
        skipped = len(plans) - len(todo)
        desc = f"{split}: {len(todo)} shard(s) to write" + (f", {skipped} done earlier" if skipped else "")
        _run_plans(todo, out, write_options, options.workers, sum(len(p.images) for p in todo), desc)
        records = [read_record(out, p.name) for p in plans]
        if any(r is None for r in records):
            raise RuntimeError(f"{split}: some shards have no completion record after writing")
        written = sum(r.samples for r in records)
        rejected = sum(len(r.rejected) for r in records)
        if written + rejected != len(images):
            raise RuntimeError(f"{split}: found {len(images)} files but wrote {written} and rejected {rejected}")
        converted: dict[str, int] = {}
        for r in records:
            for kind, count in r.converted.items():
                converted[kind] = converted.get(kind, 0) + count
            rejected_lines += [json.dumps({"split": split, "shard": r.name, **item}, sort_keys=True)
                               for item in r.rejected]
        manifest["splits"][split] = {
            "found": len(images), "samples": written, "rejected": rejected, "copied": sum(r.copied for r in records),
            "converted": converted, "labeled": labeled,
            **({"held_out_of_each_class": options.val_fraction} if options.val_fraction and split == "val" else {}),
            "shards": [{"name": f"{r.name}.tar", "index": f"{r.name}.idx", "samples": r.samples, "bytes": r.bytes,
                        "sha256": r.sha256} for r in records if r.samples],
        }
    names = read_class_names(src)
    manifest["classes"] = [{"index": i, "wnid": w, **({"name": names[w]} if w in names else {})}
                           for i, w in enumerate(classes)]
    write_text(out / "classes.json", json.dumps(manifest["classes"], indent=1))
    write_text(out / "rejected.jsonl", "".join(line + "\n" for line in rejected_lines))
    write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def summary_lines(manifest: dict) -> list[str]:
    """One line per split a person can read: counts that reconcile, conversions by kind, shards."""
    lines = []
    for split, info in manifest["splits"].items():
        kinds = ", ".join(f"{_kind_name(kind)}: {count}" for kind, count in sorted(info["converted"].items()))
        held = (f" (held out: {info['held_out_of_each_class']:.0%} of each class)"
                if "held_out_of_each_class" in info else "")
        lines.append(f"{split}{held}: found {info['found']} = written {info['samples']} + rejected {info['rejected']}; "
                     f"{info['copied']} copied as they are, {sum(info['converted'].values())} converted"
                     + (f" ({kinds})" if kinds else "") + f"; {len(info['shards'])} shard(s)")
    return lines


def _kind_name(kind: str) -> str:
    """'converted:PNG' -> 'PNG', 'converted:grayscale JPEG' -> 'grayscale JPEG', 'resized' -> 'resized'."""
    return kind.removeprefix("converted:")
