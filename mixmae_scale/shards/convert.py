"""Image folders to WebDataset shards: conversion as a source of the shard-set builder (builder.py).

What is conversion's own: the options and their check against a resumed output, discovering each split's
images (ImageNet layouts, class folders, a held-out val fraction), the plan of which file goes to which shard
(saved before the first shard, so a resumed conversion writes each file once even if the source folder
changed in between: saved_plan.py), the disk check, and counting a shard's record. The builder runs the
pool, reconciles found = written + rejected per split, writes `rejected.jsonl`, applies --max-rejected and
writes the manifest. The output is a folder, or an s3:// prefix that shards are uploaded to one by one from
a local staging folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mixmae_scale import __version__
from mixmae_scale.data import storage
from mixmae_scale.data.errors import plural
from mixmae_scale.data.manifest import Manifest, ShardEntry, SplitEntry, load_manifest, manifest_exists
from mixmae_scale.shards.builder import BuildResult, SplitOutcome, WorkList, build, reconcile, resume
from mixmae_scale.shards.jpeg_check import DEFAULT_MAX_PIXELS, Oversize
from mixmae_scale.shards.masks import MaskLayout, ade20k_layout, demo_layout
from mixmae_scale.shards.rejection_limit import DEFAULT_MAX_REJECTED
from mixmae_scale.shards.saved_plan import SourceChanges, planned_files, resume_plan
from mixmae_scale.shards.sources import (
    Duplicate,
    SourceError,
    SourceImage,
    ade20k_split,
    drop_duplicates,
    escaped,
    folder_images,
    hidden_folders,
    hold_out,
    ignored_note,
    imagenet_split,
    not_utf8,
    read_class_names,
    refuse_not_utf8,
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

# Options that do not change what is written: a resume may change them.
RUN_ONLY_OPTIONS = ("workers", "max_rejected", "staging")


@dataclass(frozen=True)
class ConvertOptions:
    layout: str  # imagenet | folder | ade20k
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
    masks: bool = False  # found beside the images (shards/masks.py): each sample gets its `seg.png`
    unlabeled: bool = False  # folder layout: every image unlabeled, subfolders not read as classes


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
    if Path(out).exists() and not Path(out).is_dir():  # mkdir failed 'File exists ... free space or fix the folder'
        raise SourceError(f"--out {out}: a file, not a folder; name a new or empty folder for the shards")
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


# Each written option as the command line gives it; `layout` is the subcommand, `masks` follows from it.
OPTION_FLAGS = {"seed": "--seed", "samples_per_shard": "--samples-per-shard", "shard_bytes": "--shard-size",
                "quality": "--quality", "resize_shorter": "--resize-shorter", "strict": "--strict",
                "max_pixels": "--max-megapixels", "oversize": "--oversize", "val_fraction": "--val-fraction",
                "unlabeled": "--unlabeled", "layout": "the subcommand (`mixmae shards LAYOUT`)",
                "masks": "segmentation masks"}


def _option_change(key: str, before: object, now: object) -> str:
    """'--quality 95 there, 90 now': the flag and both values, so that the refusal says what resuming needs (it said
    `other options (quality)`, naming neither the value the folder was begun with nor the flag that gives it)."""
    def shown(value: object) -> str:
        if key == "max_pixels":
            return "0 (no limit)" if not value else f"{value / 1e6:g}"
        if value is None:
            return "not given"
        return f"{value:g}" if isinstance(value, float) else str(value)

    flag = OPTION_FLAGS.get(key, key)
    if isinstance(before, bool) or isinstance(now, bool):
        return f"{flag}: {'given' if before else 'not given'} there, {'given' if now else 'not given'} now"
    return f"{flag} {shown(before)} there, {shown(now)} now"


def _check_same_options(out: str, options: ConvertOptions) -> None:
    """Resuming with other options would mix two datasets in one folder: refuse. `splits` may differ: a split
    converted later (`--split train`, then `--split val`) joins the set; the record keeps every split's name."""
    url = storage.join(out, f"{PROGRESS_DIR}/options.json")
    current = _written_options(options)
    if storage.exists(url):
        # A folder written before an option existed was written with that option's default.
        previous = {**_written_options(ConvertOptions(layout=options.layout)), **json.loads(storage.read_text(url))}
        previous = {k: v for k, v in previous.items() if k not in RUN_ONLY_OPTIONS}
        previous["splits"] = list(previous["splits"])
        changed = sorted(k for k in current if k != "splits" and previous.get(k) != current[k])
        if changed:
            said = "; ".join(_option_change(k, previous.get(k), current[k]) for k in changed)
            raise SourceError(f"{out} holds shards made with other options ({said}): resume with the options it was "
                              "begun with, or convert into a new output folder")
        every = previous["splits"] + [s for s in current["splits"] if s not in previous["splits"]]
        if every != previous["splits"]:
            storage.write_text(url, json.dumps({**previous, "splits": every}, sort_keys=True))
    else:
        storage.write_text(url, json.dumps(current, sort_keys=True))


def _check_no_adopted_splits(out: str) -> None:
    """A conversion writes a manifest of its own splits: one that held adopted splits lost them, unsaid."""
    if not manifest_exists(out):
        return
    adopted = [name for name, entry in load_manifest(out).splits.items() if entry.adopted]
    if adopted:
        raise SourceError(f"{out} holds {plural(len(adopted), 'split')} adopted with `mixmae shards adopt` "
                          f"({', '.join(adopted)}): a conversion writes a manifest of its own splits and would drop "
                          "them; convert into another folder")


SAMPLED_FOR_A_MOVE = 32  # planned files checked when --src names another folder than the one a conversion began


def _check_same_source(src: Path, out: str, options: ConvertOptions) -> str:
    """A conversion resumed from another --src mixed two datasets in one set (the plan took the new folder's
    files as files that appeared). Another path holding the planned files at their sizes is the same source
    moved (a mount point that differs between nodes): resumed, and said (returned as a warning). Otherwise
    refused."""
    url = storage.join(out, f"{PROGRESS_DIR}/source.json")
    here = str(src.resolve())
    before = json.loads(storage.read_text(url))["src"] if storage.exists(url) else None
    if before == here:
        return ""
    planned = [(split, rel, size) for split in options.splits
               for rel, size in list(planned_files(out, split).items())[:SAMPLED_FOR_A_MOVE]]
    if before is not None and planned:
        def same(split: str, rel: str, size: int) -> bool:
            path = _split_root(src, split, options) / rel
            return path.is_file() and path.stat().st_size == size

        missing = [rel for split, rel, size in planned if not same(split, rel, size)]
        if missing:
            raise SourceError(f"{out} holds a conversion of {before}, not of --src {src} ({len(missing)} of "
                              f"{len(planned)} planned files checked are not there at their sizes, e.g. "
                              f"{missing[0]}): convert into another folder, or resume with --src {before}")
    storage.write_text(url, json.dumps({"src": here}))
    return (f"{out}: this conversion began from {before}; --src {src} holds its planned files (checked "
            f"{len(planned)}), taken as the same folder moved") if before is not None and planned else ""


def _split_root(src: Path, split: str, options: ConvertOptions) -> Path:
    """The folder a split's relative file names start from (--val-fraction: both splits come from `src`)."""
    whole = options.layout in ("imagenet", "ade20k") or split == "train" or options.val_fraction
    return src if whole else src / split


@dataclass(frozen=True)
class Discovered:
    """One split's source: its images, its class list, the files skipped because their names are not images, and
    those skipped because the image they are is already in the set as another file (sources.drop_duplicates)."""

    images: list[SourceImage]
    classes: list[str]
    ignored: list[str]
    duplicates: list[Duplicate] = field(default_factory=list)

    def duplicates_note(self, split: str, shown: int = 3) -> str:
        """'train: skipped 1 file ...': the duplicates the summary counts as skipped, the first few by name."""
        first = "; ".join(f"{d.rel}: {d.reason()}" for d in self.duplicates[:shown])
        more = f"; and {len(self.duplicates) - shown} more" if len(self.duplicates) > shown else ""
        return f"{split}: skipped {plural(len(self.duplicates), 'file')} already in the set: {first}{more}"


def _discover(src: Path, split: str, options: ConvertOptions, kept: dict[str, str]) -> Discovered:
    ignored: list[str] = []
    if options.layout == "imagenet":
        return Discovered(*imagenet_split(src, split, ignored), ignored)
    if options.layout == "ade20k":
        return Discovered(*ade20k_split(src, split, ignored), ignored)
    if options.val_fraction:  # both splits from the one folder, the same draw for each
        images, classes = folder_images(src, ignored, options.unlabeled)
        # Before the draw: a link must not take a val place and then be left out, or put one image in both splits.
        unique, duplicates = drop_duplicates({"train": images})
        train, val = hold_out(unique["train"], options.val_fraction, options.seed, kept)
        return Discovered(train if split == "train" else val, classes, ignored if split == "train" else [],
                          duplicates["train"] if split == "train" else [])
    return Discovered(*folder_images(_split_root(src, split, options), ignored, options.unlabeled), ignored)


def discover_splits(src: Path, options: ConvertOptions, out: str | None = None) -> dict[str, Discovered]:
    """Every split's files before any shard is written, so that one run names the problems of all splits.
    `out`: a conversion resumed there keeps each file in the split its saved plan put it in (--val-fraction)."""
    kept = {rel: split for split in options.splits for rel in planned_files(out, split)} \
        if out is not None and options.val_fraction else {}
    found: dict[str, Discovered] = {}
    problems: list[str] = []
    for split in options.splits:
        try:
            found[split] = _discover(src, split, options, kept)
        except SourceError as exc:
            if str(exc) not in problems:
                problems.append(str(exc))
    classes = next((d.classes for d in found.values() if d.classes), [])
    problems += [f"{src / split}: its class folders differ from the first split's" for split, d in found.items()
                 if d.classes and d.classes != classes]
    if problems:
        raise SourceError("; ".join(problems))
    refuse_names_not_utf8(src, found)
    # What is skipped is only listed (summary, ignored_examples): its bytes that are not UTF-8 escaped, not refused.
    found = {split: replace(d, ignored=[escaped(name) for name in d.ignored]) for split, d in found.items()}
    unique, duplicates = drop_duplicates({split: d.images for split, d in found.items()})
    return {split: replace(d, images=unique[split], duplicates=d.duplicates + duplicates[split])
            for split, d in found.items()}


def refuse_names_not_utf8(src: Path, found: dict[str, Discovered], shown: int = 5) -> None:
    """Refuses a source whose images or class folders have names that are not UTF-8, naming them with those bytes
    escaped, before anything is written: each becomes text in the manifest and the samples, where its surrogate
    escapes were kept as lone surrogates (sources.not_utf8). Files skipped anyway (not images by name, hidden
    folders) are not refused for it: a stray Latin-1 note refused the whole set; they are listed escaped."""
    names = not_utf8([*(image.rel for d in found.values() for image in d.images),
                      *(f"{name}/" for d in found.values() for name in d.classes)])
    refuse_not_utf8(str(src), names, "name", "a name is written into dataset.json, classes.json and each sample's "
                    "json as text", shown)


def classes_left_out_of_val(discovered: dict[str, Discovered], fraction: float) -> str | None:
    """The classes --val-fraction held out no image of (round(fraction x n) is 0 for a small class, and each class
    keeps one for training), or None: the summary says `held out: 10% of each class`, and a top-1 on such a val
    split covers only some classes, which nothing else said."""
    if not fraction or "val" not in discovered or not discovered["val"].classes:
        return None
    classes = discovered["val"].classes
    held = {image.label for image in discovered["val"].images}
    sizes: dict[int, int] = {}
    for image in discovered["train"].images if "train" in discovered else []:
        sizes[image.label] = sizes.get(image.label, 0) + 1
    missing = [label for label in range(len(classes)) if label not in held]
    if not missing:
        return None
    names = ", ".join(classes[label] for label in missing[:5]) + (", ..." if len(missing) > 5 else "")
    counts = sorted({sizes.get(label, 0) for label in missing})
    return (f"val: {len(missing)} of {len(classes)} class{'es' * (len(classes) != 1)} "
            f"{'have' if len(missing) != 1 else 'has'} no image in it ({names}): --val-fraction {fraction:g} holds out "
            f"round({fraction:g} x a class's images), 0 for these ({'/'.join(map(str, counts))} "
            f"image{'s' * (counts != [1])}); a top-1 on 'val' does not cover them: raise --val-fraction (each class "
            "keeps one image for training)")


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


@dataclass
class _Throughput:
    """The bar's postfix: the last shard written and the MB/s written since the split began."""

    start: float = field(default_factory=time.perf_counter)
    written: int = 0

    def __call__(self, record: ShardRecord) -> dict:
        self.written += record.bytes
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"shard": record.name, "MBps": f"{self.written / 1e6 / elapsed:.1f}"}


@dataclass
class _Split:
    """What conversion keeps of a split between its stages."""

    plans: list[ShardPlan]
    changes: SourceChanges
    duplicates_note: str = ""  # planned files now skipped as already in the set (_skip_planned_duplicates)


class ConversionSource:
    """Image folders as a source of the builder: a unit of work is one planned shard, its record a ShardRecord."""

    unit = "files"
    classes_file = True  # a converted set always has classes.json, [] when unlabeled

    def __init__(self, src: Path, out: str, options: ConvertOptions, masks: MaskLayout | None = None) -> None:
        self.src, self.out, self.options, self.masks = src, out, options, masks
        self.splits, self.max_rejected, self.workers = options.splits, options.max_rejected, options.workers
        self.staging = _staging(out, options)
        self.write_options = WriteOptions(options.quality, options.resize_shorter, options.strict,
                                          options.max_pixels, options.oversize, masks)
        self.discovered: dict[str, Discovered] = {}
        self.state: dict[str, _Split] = {}
        self.other_splits: dict[str, SplitEntry] = {}  # see _keep_other_splits
        self.split_order: list[str] = []  # the splits of the manifest OUT held, in its order

    def discover(self) -> tuple[list[str], list[str]]:
        self.discovered = discover_splits(self.src, self.options, self.out)
        self._keep_other_splits()
        warnings = self._drop_earlier_duplicates()
        for split in self.splits:  # every split's plan saved before any shard: a resume finds the partition whole
            self.state[split] = self._plan(split)
        return ([f"{split}: {ignored_note(d.ignored)}" for split, d in self.discovered.items() if d.ignored]
                + [d.duplicates_note(split) for split, d in self.discovered.items() if d.duplicates]), warnings

    def _drop_earlier_duplicates(self) -> list[str]:
        """Files of this run's splits that are images of a split OUT holds from an earlier run (`--split val` after
        `--split train`): drop_duplicates sees one run's splits only, so a val/ of links into train/ kept training
        images in the held-out split. The earlier split's files are those its saved plan names (kept in OUT's
        progress folder); a split without one (converted by an older version) cannot be checked: said, not
        silent."""
        warnings: list[str] = []
        earlier: dict[str, tuple[str, str]] = {}  # real path -> (split, relative name) of each earlier file
        for other in self.other_splits:
            files = planned_files(self.out, other)
            if not files:
                warnings.append(f"{other}: converted earlier into {self.out} without a saved plan (an older "
                                f"version), so its files are not recorded: duplicates between {other} and "
                                f"{', '.join(self.splits)} (links into {other}'s images) cannot be found; to be "
                                "sure, convert every split in one run into a new folder")
                continue
            root = _split_root(self.src, other, self.options)
            for rel in files:
                earlier.setdefault(os.path.realpath(root / rel), (other, rel))
        if not earlier:
            return warnings
        for split in self.splits:
            found = self.discovered[split]
            kept, left_out = [], []
            for image in found.images:
                holder = earlier.get(os.path.realpath(image.path))
                if holder is None:
                    kept.append(image)
                else:
                    left_out.append(Duplicate(image.rel, holder[1], holder[0], os.path.islink(image.path)))
            if left_out:
                self.discovered[split] = replace(found, images=kept, duplicates=found.duplicates + left_out)
        return warnings

    def _keep_other_splits(self) -> None:
        """The splits OUT holds that this run does not convert (converted earlier by another --split) stay in the
        manifest; refused where their classes are not this run's, so that a label means one class in every split."""
        if not manifest_exists(self.out):
            return
        previous = load_manifest(self.out)
        self.split_order = list(previous.splits)
        others = {name: entry for name, entry in previous.splits.items() if name not in self.splits}
        if not others:
            return
        before = [c.get("wnid") for c in previous.classes]
        now = next((d.classes for d in self.discovered.values() if d.classes), [])
        if before != now:
            differ = next((i for i, (a, b) in enumerate(zip(before, now, strict=False)) if a != b),
                          min(len(before), len(now)))
            raise SourceError(f"{self.out} holds {', '.join(others)}, converted with other classes than {self.src} "
                              f"has now ({len(before)} then, {len(now)} now; class {differ} differs): a label would "
                              "mean another class in each split; convert every split into a new folder")
        self.other_splits = others

    def _plan(self, split: str) -> _Split:
        images, classes = self.discovered[split].images, self.discovered[split].classes
        options = self.options

        def make_plans(todo: list[SourceImage], first_index: int, first_sample: int) -> list[ShardPlan]:
            return plan_shards(todo, split, options.seed, options.samples_per_shard, options.shard_bytes,
                               bool(classes), first_index, first_sample)

        plans, changes = resume_plan(self.out, split, _split_root(self.src, split, options), images, classes,
                                     make_plans, started=_has_shards(self.out, split))
        plans, note = self._skip_planned_duplicates(split, plans, changes)
        plans, hidden_note = self._skip_planned_hidden(split, plans, changes)
        return _Split(plans, changes, "; ".join(n for n in (note, hidden_note) if n))

    def _skip_planned_hidden(self, split: str, plans: list[ShardPlan], changes: SourceChanges
                             ) -> tuple[list[ShardPlan], str]:
        """A plan saved before hidden folders were skipped names their images (`.thumbs/t.jpg`), which discovery
        now leaves out: the resume said they had vanished (they had not) and wrote them into the set all the same.
        In a shard still to write such an image is skipped; in one written earlier it stays, counted as written."""
        def in_hidden_folder(rel: str) -> bool:
            return any(part.startswith(".") for part in Path(rel).parts[:-1])

        planned = [im.rel for p in plans for im in p.images if in_hidden_folder(im.rel)]
        if not planned:
            return plans, ""
        done = set(finished_records(self.out, [p.name for p in plans]))
        kept = sum(in_hidden_folder(im.rel) for p in plans if p.name in done for im in p.images)
        plans = [p if p.name in done
                 else replace(p, images=tuple(im for im in p.images if not in_hidden_folder(im.rel))) for p in plans]
        changes.vanished = [rel for rel in changes.vanished if not in_hidden_folder(rel)]
        are = "is" if len(planned) == 1 else "are"
        return plans, (f"{split}: {plural(len(planned), 'planned file')} {are} in a hidden folder (first: "
                       f"{planned[0]}), which conversion skips; the plan was saved before hidden folders were "
                       f"skipped: {len(planned) - kept} skipped now, {kept} kept in shards written earlier")

    def _skip_planned_duplicates(self, split: str, plans: list[ShardPlan], changes: SourceChanges
                                 ) -> tuple[list[ShardPlan], str]:
        """A plan saved before linked duplicates were skipped (sources.drop_duplicates) names files discovery now
        leaves out: they were said to have vanished (they had not), written as planned and counted as skipped too.
        In a shard still to write such a file is skipped; in one written earlier it stays, counted as written."""
        found = self.discovered[split]
        skipped = {d.rel: d for d in found.duplicates}
        planned = [im.rel for p in plans for im in p.images if im.rel in skipped]
        if not planned:
            return plans, ""
        done = set(finished_records(self.out, [p.name for p in plans]))
        kept = {im.rel for p in plans if p.name in done for im in p.images if im.rel in skipped}
        plans = [p if p.name in done else replace(p, images=tuple(im for im in p.images if im.rel not in skipped))
                 for p in plans]
        changes.vanished = [rel for rel in changes.vanished if rel not in skipped]
        self.discovered[split] = replace(found, duplicates=[d for d in found.duplicates if d.rel not in kept])
        first = skipped[planned[0]]
        are = "is" if len(planned) == 1 else "are"
        return plans, (f"{split}: {plural(len(planned), 'planned file')} {are} already in the set as another file "
                       f"(first: {first.rel}: {first.reason().split(' (skipped')[0]}); the plan was saved before such "
                       f"files were skipped: {len(planned) - len(kept)} skipped now, {len(kept)} kept in shards "
                       "written earlier")

    def pending(self, split: str) -> tuple[WorkList, list[str]]:
        state = self.state[split]
        records = finished_records(self.out, [p.name for p in state.plans])
        todo, done = resume(state.plans, records, key=lambda plan: plan.name)
        needed = [sum(im.size for im in p.images) for p in todo]
        if self.staging is None:
            _check_disk(Path(self.out), int(1.1 * sum(needed)))
        elif todo:
            self.staging.mkdir(parents=True, exist_ok=True)
            _check_disk(self.staging, int(1.1 * max(needed) * max(self.workers, 1)))
        desc = f"{split}: {plural(len(todo), 'shard')} to write" + (f", {len(done)} done earlier" if done else "")
        work = WorkList(todo, done, write_shard, (self.out, self.write_options, self.staging), desc, "img",
                        size=lambda plan: len(plan.images), postfix=_Throughput())
        messages = [state.changes.describe(split), state.duplicates_note]
        return work, [message for message in messages if message]

    def account(self, split: str, results: list[ShardRecord]) -> SplitOutcome:
        plans, changes = self.state[split].plans, self.state[split].changes
        records = {r.name: r for r in results}
        if any(p.name not in records for p in plans):
            raise RuntimeError(f"{split}: some shards have no completion record after writing")
        ordered = [records[p.name] for p in plans]
        skipped = len(self.discovered[split].duplicates)
        found = sum(len(p.images) for p in plans) + skipped
        written, rejected = sum(r.samples for r in ordered), sum(len(r.rejected) for r in ordered)
        reconcile(split, ("found", found), ("written", written), ("rejected", rejected),
                  ("skipped as already in the set", skipped))
        # A split whose every file is another's image (a val/ of links into train/) would be an empty split.
        empty = (f"{split}: nothing to write: every one of its {plural(found, 'file')} is an image already in the "
                 f"set ({self.discovered[split].duplicates[0].reason()}, ...)" if skipped and skipped == found else "")
        # The ceiling is a share of the files read: the skipped ones were never read and do not dilute it.
        return SplitOutcome(self._entry(split, ordered, found, changes),
                            [{"shard": r.name, **item} for r in ordered for item in r.rejected], found - skipped,
                            [item["reason"] for r in ordered for item in r.rejected], empty_error=empty)

    def _entry(self, split: str, ordered: list[ShardRecord], found: int, changes: SourceChanges) -> SplitEntry:
        converted: dict[str, int] = {}
        for record in ordered:
            for kind, count in record.converted.items():
                converted[kind] = converted.get(kind, 0) + count
        ignored, labeled = self.discovered[split].ignored, bool(self.discovered[split].classes)
        duplicates = self.discovered[split].duplicates
        counts = {
            "found": found, "rejected": sum(len(r.rejected) for r in ordered), "copied": sum(r.copied for r in ordered),
            "ignored_not_images": len(ignored) - len(hidden_folders(ignored)),
            "ignored_examples": [name for name in ignored if not name.endswith("/")][:5], "converted": converted,
            "ignored_hidden_folders": len(hidden_folders(ignored)),
            **({"skipped_duplicates": len(duplicates),
                "skipped_examples": [{"source": d.rel, "reason": d.reason()} for d in duplicates[:5]]}
               if duplicates else {}),
            "transient": sum(r.transient for r in ordered),
            "source_changes": {"vanished": len(changes.vanished), "appeared": len(changes.appeared)},
            **({"held_out_of_each_class": self.options.val_fraction}
               if self.options.val_fraction and split == "val" else {}),
        }
        shards = tuple(ShardEntry(f"{r.name}.tar", f"{r.name}.idx", r.samples, r.bytes, r.sha256)
                       for r in ordered if r.samples)
        return SplitEntry(sum(r.samples for r in ordered), labeled, shards, counts, masks=self.masks is not None)

    def manifest(self, entries: dict[str, SplitEntry]) -> Manifest:
        classes = next((d.classes for d in self.discovered.values() if d.classes), [])
        names = read_class_names(self.src)
        listed = [{"index": i, "wnid": w, **({"name": names[w]} if w in names else {})} for i, w in enumerate(classes)]
        every = tuple(dict.fromkeys(s for s in (*self.split_order, *entries) if s in self.other_splits or s in entries))
        splits = {**self.other_splits, **entries}
        if self.options.val_fraction and {"train", "val"} <= splits.keys():
            val = splits["val"]
            splits["val"] = replace(val, counts={**val.counts, HELD_OUT: held_out_account(splits["train"], val)})
        return Manifest({name: splits[name] for name in every}, listed,
                        options=_written_options(replace(self.options, splits=every)), tool_version=__version__,
                        mask_classes=list(self.masks.class_names) if self.masks else [])


HELD_OUT = "held_out"  # in a --val-fraction set's val entry: what each split was drawn, wrote and rejected


def held_out_account(train: SplitEntry, val: SplitEntry) -> dict[str, Any]:
    """What --val-fraction held out, drawn and kept: the draw is made from the file list before any image is read, so
    the unreadable files it put in val are rejected while writing and val can end under the share drawn. Drawn is
    written + rejected (duplicates skipped before the draw are in neither)."""
    written = {"train": train.samples, "val": val.samples}
    rejected = {"train": int(train.counts.get("rejected", 0)), "val": int(val.counts.get("rejected", 0))}
    drawn = {split: written[split] + rejected[split] for split in written}
    return {"drawn": drawn, "written": written, "rejected": rejected,
            "share_drawn": round(drawn["val"] / max(sum(drawn.values()), 1), 4),
            "share_written": round(written["val"] / max(sum(written.values()), 1), 4)}


def _held_out_line(account: dict[str, Any]) -> str | None:
    """The summary's line of `held_out_account`, where rejections moved the share val holds (None otherwise)."""
    drawn, written, rejected = account["drawn"], account["written"], account["rejected"]
    if not any(rejected.values()):
        return None
    below = (", under the share drawn" if account["share_written"] < account["share_drawn"] else
             ", above the share drawn" if account["share_written"] > account["share_drawn"] else "")
    return (f"val: held out {drawn['val']} of the {sum(drawn.values())} images drawn ({account['share_drawn']:.1%}); "
            f"after the rejections (train {rejected['train']}, val {rejected['val']}) it holds {written['val']} of "
            f"the {sum(written.values())} images written ({account['share_written']:.1%}){below} (rejected.jsonl "
            "names the files)")


def convert(src: Path, out: str | Path, options: ConvertOptions) -> BuildResult:
    """Converts SRC's splits into shards in OUT (resuming what an earlier run of the same command began)."""
    src = Path(src)
    out = str(out).rstrip("/") if storage.is_remote(out) else str(out)
    check_options(options)
    if not src.is_dir():
        raise SourceError(f"--src {src}: " + ("a file; name the folder that holds the images" if src.exists()
                                              else f"not found (tried {src.absolute()})"))
    _check_output(src, out)
    masks = mask_layout(src, options.layout)
    options = replace(options, masks=masks is not None)
    source = ConversionSource(src, out, options, masks)
    fresh = source.staging is None and not Path(out).exists()
    if source.staging is None:
        Path(out).mkdir(parents=True, exist_ok=True)
    _check_no_adopted_splits(out)
    _check_same_options(out, options)
    try:
        moved = _check_same_source(src, out, options)
        result = build(source, out)
    except SourceError:
        if fresh:  # refused before a shard was written: no empty output folder is left behind
            _remove_if_empty(Path(out))
        raise
    if moved:
        result.warnings.insert(0, moved)
    left_out = classes_left_out_of_val(source.discovered, options.val_fraction)
    if left_out:
        result.warnings.append(left_out)
    if source.staging is not None and source.staging.is_dir() and not any(source.staging.iterdir()):
        source.staging.rmdir()
    return result


def _remove_if_empty(folder: Path) -> None:
    """`folder`, if it holds nothing but the options and source this command recorded on starting (no shard, no
    plan, no progress record: nothing a rerun would resume from)."""
    recorded = {folder / PROGRESS_DIR / "options.json", folder / PROGRESS_DIR / "source.json"}
    if folder.is_dir() and all(path in recorded for path in folder.rglob("*") if path.is_file()):
        shutil.rmtree(folder)


def mask_layout(src: Path, layout: str) -> MaskLayout | None:
    """The masks beside the images: ADE20K's annotations/, the demo tree's masks/, or None."""
    if layout == "ade20k":
        return ade20k_layout(src)
    return demo_layout(src) if layout == "imagenet" else None


def _has_shards(out: str, split: str) -> bool:
    """Whether a conversion of this split began here (any shard record), before plans were saved."""
    progress = storage.join(out, PROGRESS_DIR)
    if not storage.is_remote(out) and not Path(progress).is_dir():
        return False
    return any(f.name.startswith(f"{split}-") for f in storage.list_files(progress, ".json"))


def summary_lines(manifest: Manifest) -> list[str]:
    """One line per split a person can read: counts that reconcile, conversions by kind, shards."""
    lines = []
    for split, entry in manifest.splits.items():
        info = entry.to_dict()
        kinds = ", ".join(f"{_kind_name(kind)}: {count}" for kind, count in sorted(info["converted"].items()))
        held = (f" (held out: {info['held_out_of_each_class']:.0%} of each class)"
                if "held_out_of_each_class" in info else "")
        skipped = (f" + skipped {info['skipped_duplicates']} (already in the set)"
                   if info.get("skipped_duplicates") else "")
        lines.append(f"{split}{held}: found {info['found']} = written {info['samples']} + rejected {info['rejected']}"
                     f"{skipped}; "
                     f"{info['copied']} copied as they are, {sum(info['converted'].values())} converted"
                     + (f" ({kinds})" if kinds else "") + f"; {plural(len(info['shards']), 'shard')}"
                     + ("; with segmentation masks (seg.png)" if entry.masks else "")
                     + (f"; ignored {info['ignored_not_images']} not named like an image"
                        if info.get("ignored_not_images") else "")
                     + (f"; skipped {plural(info['ignored_hidden_folders'], 'hidden folder')}"
                        if info.get("ignored_hidden_folders") else ""))
        held_out = _held_out_line(info[HELD_OUT]) if isinstance(info.get(HELD_OUT), dict) else None
        if held_out:
            lines.append(held_out)
        if info.get("transient"):
            lines.append(f"{split}: {info['transient']} of the rejections were I/O errors that may pass (EIO, ESTALE, "
                         "timeouts; retried with backoff): run the same command again to retry them")
    return lines


def _kind_name(kind: str) -> str:
    """'converted:PNG' -> 'PNG', 'converted:grayscale JPEG' -> 'grayscale JPEG', 'resized' -> 'resized'."""
    return kind.removeprefix("converted:")
