"""Adopting WebDataset shards that another tool wrote (img2dataset, webdataset's ShardWriter, a download):
DALI indexes, counts and a manifest in OUT, without rewriting or moving a byte of the tars.

SRC is a folder or an s3:// prefix, listed recursively; every `.tar` is a shard, other files (img2dataset's
parquet and _stats.json) are counted and ignored. Each tar is read once, as one stream (one GET on S3),
by tar_index.py. OUT (a folder or an s3:// prefix) receives:
    <split>/<tar path without .tar>.idx   DALI's index of the samples training may read
    dataset.json                          manifest version 2; `base` = SRC, where the tar names resolve
    classes.json                          when labeled: one entry per class index 0..max(cls)
    rejected.jsonl                        every rejected sample, ignored member and unreadable tar, with why
    .progress/adopt/<split>/<tar>.json    one record per indexed tar, written after its index
A rerun indexes only tars without a record, or whose size changed since; train and val are adopted into
one OUT by two calls (`--split`), and the manifest's base becomes the folder the two sources share.
Adoption is a source of the shard-set builder (builder.py), which runs the pool, the progress records, the
reconciliation, `rejected.jsonl`, --max-rejected and the manifest; what is adoption's own is here: listing the
tars, indexing one, where the tar names resolve, and the warnings about labels and class-sorted sets.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from mixmae_scale import __version__
from mixmae_scale.data import storage
from mixmae_scale.data.errors import plural
from mixmae_scale.data.manifest import MANIFEST, Manifest, ShardEntry, SplitEntry, load_manifest, manifest_exists
from mixmae_scale.shards.builder import (
    CLASSES,
    REJECTED,
    BuildResult,
    SplitOutcome,
    WorkList,
    build,
    read_records,
    reconcile,
    resume,
    write_record,
)
from mixmae_scale.shards.rejection_limit import DEFAULT_MAX_REJECTED
from mixmae_scale.shards.sources import SourceError, not_utf8, refuse_not_utf8
from mixmae_scale.shards.tar_index import NAME_REMEDY, NAME_WHITESPACE, TarIndex, index_tar
from mixmae_scale.shards.transient import retrying

PROGRESS_DIR = ".progress/adopt"
SORTED_SHARE = 0.9  # a shard whose most frequent class holds this share of it holds "one class"


# A cls past this is an id or a hash, not a class index: classes.json would list that many classes and a classifier
# head as many outputs (ImageNet-21k has 21,841 classes, JFT-3B about 30,000).
MAX_CLASSES = 1_000_000
HIDDEN_NAMED = 3  # hidden tars named in the summary; the rest are counted
COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar.zstd")


@dataclass(frozen=True)
class AdoptOptions:
    split: str = "train"
    decode: bool = False
    workers: int = 1
    max_rejected: float = DEFAULT_MAX_REJECTED
    unlabeled: bool = False  # ignore the tars' cls: pretraining needs no labels


@dataclass
class AdoptedShard:
    """The progress record of one tar. Written after its index, so a tar with a record is done."""

    name: str  # relative to SRC
    source: str  # the tar's full path or URL when it was indexed
    size: int
    sha256: str = ""
    index: str = ""  # relative to OUT; '' when no sample can be read
    samples: int = 0
    found: int = 0
    members: int = 0
    indexed_members: int = 0
    folders: int = 0
    rejected: list[dict] = field(default_factory=list)
    ignored: list[dict] = field(default_factory=list)
    problem: str = ""
    decoded: bool = False
    labeled_samples: int = 0  # indexed samples with a cls
    max_label: int = -1
    top_class_share: float = 0.0  # the most frequent class's share of the labeled samples
    masked_samples: int = 0  # indexed samples with a segmentation mask (seg.png)
    version: str = ""  # storage.StoredFile.version when indexed; "" in records written before it was kept


@dataclass(frozen=True)
class _Job:
    name: str
    url: str
    size: int
    out: str
    split: str
    decode: bool
    version: str = ""


class _ChangedWhileRead(OSError):
    pass


def _location(text: str | Path) -> str:
    return str(text).rstrip("/") if storage.is_remote(text) else str(Path(text).resolve())


def index_name(split: str, tar_name: str) -> str:
    return f"{split}/{tar_name[:-len('.tar')]}.idx"


def record_name(split: str, tar_name: str) -> str:
    return f"{PROGRESS_DIR}/{split}/{tar_name}.json"


def _read_tar(job: _Job) -> TarIndex:
    if job.size == 0:
        return TarIndex(problem="an empty file (0 bytes), not a tar")
    with storage.open_range(job.url, 0, job.size) as stream:
        found = index_tar(stream, job.decode)
    if found.bytes_read != job.size:
        raise _ChangedWhileRead(f"{job.url}: {found.bytes_read} bytes read, {job.size} listed: it changed while "
                                "being read")
    return found


def index_shard(job: _Job) -> AdoptedShard | str:
    """Indexes one tar and writes its index, then its record. Returns the record, or a one-line reason
    when the tar could not be read (after retries, for transient failures): it is tried again next run."""
    try:
        found = retrying(lambda: _read_tar(job))
    except (OSError, storage.StorageError) as exc:
        return " ".join(str(exc).split())
    except Exception as exc:  # noqa: BLE001 - a network library's own error: this tar is retried next run
        return f"{job.url}: {type(exc).__name__}: {' '.join(str(exc).split())}"
    labels = [label for label in found.labels if label is not None]
    top = Counter(labels).most_common(1)
    record = AdoptedShard(
        name=job.name, source=job.url, size=job.size, sha256=found.sha256, samples=found.samples, found=found.found,
        members=found.members, indexed_members=found.indexed_members, folders=found.folders,
        rejected=found.rejected, ignored=found.ignored, problem=found.problem, decoded=job.decode, version=job.version,
        labeled_samples=len(labels), max_label=max(labels, default=-1),
        top_class_share=top[0][1] / len(labels) if top else 0.0, masked_samples=found.masked)
    if found.samples:
        record.index = index_name(job.split, job.name)
        storage.write_text(storage.join(job.out, record.index), found.index_text())
    write_record(storage.join(job.out, record_name(job.split, job.name)), record)
    return record


def _existing_indexes(out: str, split: str) -> set[str]:
    folder = storage.join(out, split)
    if not storage.is_remote(folder) and not Path(folder).is_dir():
        return set()
    return {f"{split}/{f.name}" for f in storage.list_files(folder, ".idx")}


def _common_base(a: str, b: str) -> str | None:
    """The deepest folder or prefix holding both, or None (different buckets, or one local, one remote)."""
    if storage.is_remote(a) != storage.is_remote(b):
        return None
    if not storage.is_remote(a):
        return os.path.commonpath([a, b])
    (bucket_a, key_a), (bucket_b, key_b) = storage.split_url(a), storage.split_url(b)
    if bucket_a != bucket_b:
        return None
    shared = []
    for part_a, part_b in zip(key_a.split("/"), key_b.split("/"), strict=False):
        if part_a != part_b or not part_a:
            break
        shared.append(part_a)
    return f"s3://{bucket_a}" + "".join(f"/{part}" for part in shared)


def _relative(full: str, base: str) -> str:
    if storage.is_remote(full):
        return full[len(base.rstrip("/")) + 1:]
    return Path(full).relative_to(base).as_posix()


def _place(manifest: Manifest | None, src: str, split: str) -> tuple[str, dict[str, SplitEntry], str]:
    """Where this split's tars are named from: (the manifest's base, the other splits with their tar
    names made relative to that base, the prefix that turns a name relative to SRC into one relative to
    the base). A second split from another folder moves the base up to the folder both share."""
    splits = manifest.splits if manifest else {}
    if split in splits and not splits[split].adopted:  # adopting over it replaced it and kept its class names
        raise SourceError(f"the output already holds split '{split}' converted by `mixmae shards`: adopting would "
                          "replace it; adopt into another folder")
    others = {k: v for k, v in splits.items() if k != split}
    if not others:
        return src, {}, ""
    old_base = manifest.base
    unadopted = [k for k, v in others.items() if not v.adopted]
    if not old_base or unadopted:
        raise SourceError(f"the output already holds shards converted by `mixmae shards` ({', '.join(unadopted)}); "
                          "adopt into another folder")
    base = _common_base(old_base, src)
    if base is None:
        if not storage.is_remote(src):
            raise SourceError(f"{src}: local tars cannot join a set whose other splits live at {old_base}; adopt "
                              "into another folder")
        return old_base, others, src + "/"  # full URLs, which storage.join keeps as they are
    renamed = {}
    for name, info in others.items():
        shards = tuple(s if storage.is_remote(s.name)
                       else replace(s, name=_relative(storage.join(old_base, s.name), base)) for s in info.shards)
        renamed[name] = replace(info, shards=shards)
    return base, renamed, (_relative(src, base) + "/" if src != base else "")


SPLIT_WORDS = {"train": ("train", "training"), "val": ("val", "valid", "validation", "eval"), "test": ("test",)}


def _named_split(name: str) -> str | None:
    """The split a tar's path names as a word (`val-000.tar`, `imagenet-train-0001.tar`, `validation/0.tar`)."""
    for split, words in SPLIT_WORDS.items():
        if re.search(rf"(^|[-_./])({'|'.join(words)})([-_./\d]|$)", name.lower()):
            return split
    return None


def other_split_tars(split: str, names: list[str]) -> dict[str, list[str]]:
    """The tars whose names carry another split as a word, by that split: a download's folder often holds both
    (`imagenet1k-train-*.tar` beside `imagenet1k-validation-*.tar`), and adopting one split must not take the
    other's images into it. A split name of the set's own choosing (not train/val/test or their spellings) claims
    nothing, so nothing is left out."""
    own = _named_split(split)
    if own is None:
        return {}
    others: dict[str, list[str]] = {}
    for name in names:
        named = _named_split(name)
        if named is not None and named != own:
            others.setdefault(named, []).append(name)
    return others


def _sorted_warning(split: str, records: list[AdoptedShard], num_classes: int) -> str:
    """Training shuffles shard order and a bounded window of samples (DALI's way), so shards that each
    hold one class give batches of few classes."""
    labeled = [r for r in records if r.labeled_samples >= 2]
    one_class = sum(r.top_class_share >= SORTED_SHARE for r in labeled)
    if num_classes < 2 or len(labeled) < 2 or one_class * 2 < len(labeled):
        return ""
    return (f"{split}: {one_class} of {len(labeled)} shards hold one class (>= {SORTED_SHARE:.0%} of their samples): "
            "the set looks sorted by class. Training shuffles the shard order and a bounded window of samples, "
            "like DALI, so its batches would hold few classes; write the set shuffled instead (`mixmae shards "
            "folder|imagenet` shuffles globally)")


def _written_here(name: str, src: str, out: str) -> bool:
    """Whether a file listed under SRC is one of OUT's own (OUT inside SRC, or the same folder)."""
    if out == src:
        return name.startswith(".progress/") or name.endswith(".idx") or name in (MANIFEST, CLASSES, REJECTED)
    return (out + "/").startswith(src + "/") and name.startswith(_relative(out, src) + "/")


@dataclass
class _Tally:
    """The bar's postfix: samples indexed, rejected and tars failed so far."""

    samples: int = 0
    rejected: int = 0
    failed: int = 0

    def __call__(self, result: AdoptedShard | str) -> dict:
        if isinstance(result, str):
            self.failed += 1
        else:
            self.samples += result.samples
            self.rejected += len(result.rejected)
        return {"samples": self.samples, "rejected": self.rejected, "failed": self.failed}


class AdoptionSource:
    """Tars another tool wrote as a source of the builder: a unit of work is one tar, its record an AdoptedShard."""

    unit = "samples (and unreadable tars)"
    classes_file = False  # an unlabeled adopted set has no classes.json

    def __init__(self, src: str, out: str, options: AdoptOptions) -> None:
        self.src, self.out, self.options = src, out, options
        self.splits, self.max_rejected, self.workers = (options.split,), options.max_rejected, options.workers
        self.tars: list[storage.StoredFile] = []
        self.left_out: dict[str, list[str]] = {}  # tars named for another split, by that split
        self.others: Counter[str] = Counter()
        self.hidden: list[str] = []  # tars whose names start with a dot (macOS's AppleDouble ._* files)
        self.previous: Manifest | None = None  # the manifest OUT already holds (another split adopted before)
        self.base, self.other_splits, self.prefix = src, {}, ""  # see _place
        self.classes: list[dict] = []

    def discover(self) -> tuple[list[str], list[str]]:
        listing = [f for f in storage.list_files(self.src) if not _written_here(f.name, self.src, self.out)]
        tars = [f for f in listing if f.name.lower().endswith(".tar")]
        refuse_tar_names_not_utf8(self.src, [f.name for f in tars])
        self.tars = [f for f in tars if not _hidden(f.name)]
        self.hidden = [f.name for f in tars if _hidden(f.name)]
        tar_names = {f.name for f in tars}
        self.others = Counter(Path(f.name).suffix.lower() or f.name for f in listing if f.name not in tar_names)
        compressed = [f.name for f in listing if f.name.lower().endswith(COMPRESSED_TARS)]
        if not self.tars:
            raise SourceError(f"{self.src}: no .tar files found (searched recursively"
                              + (f"; it holds {dict(self.others)}" if self.others else "")
                              + ("; it is empty" if not self.others and not self.hidden else "") + ")"
                              + (f". {hidden_note(len(self.hidden), self.hidden)}" if self.hidden else "")
                              + (f". {_compressed_note(compressed)}" if compressed else ""))
        self.left_out = other_split_tars(self.options.split, [t.name for t in self.tars])
        left_out = {name for names in self.left_out.values() for name in names}
        if left_out and len(left_out) == len(self.tars):
            other, names = max(self.left_out.items(), key=lambda item: len(item[1]))
            are = "is" if len(self.tars) == 1 else "are"
            raise SourceError(f"{self.src}: its {plural(len(self.tars), 'tar')} {are} named for '{other}' (e.g. "
                              f"{names[0]}), not for --split {self.options.split}: add --split {other}")
        self.tars = [t for t in self.tars if t.name not in left_out]
        self.previous = load_manifest(self.out) if manifest_exists(self.out) else None
        self.base, self.other_splits, self.prefix = _place(self.previous, self.src, self.options.split)
        return [], [_compressed_note(compressed)] if compressed else []

    def pending(self, split: str) -> tuple[WorkList, list[str]]:
        records = {r.name: r for r in read_records(storage.join(self.out, f"{PROGRESS_DIR}/{split}"),
                                                   lambda data: AdoptedShard(**data))}
        indexes = _existing_indexes(self.out, split)
        decode = self.options.decode
        jobs = [_Job(t.name, storage.join(self.src, t.name), t.size, self.out, split, decode, t.version)
                for t in self.tars]

        def fresh(job: _Job, record: AdoptedShard) -> bool:
            # A tar rewritten in place at the same size (reshuffled) kept its old index: samples read at the old
            # offsets. Its mtime or ETag tells; a record from before versions were kept is taken as it is.
            rewritten = bool(record.version and job.version and record.version != job.version)
            return (record.source == job.url and record.size == job.size and not rewritten
                    and (record.decoded or not decode) and (not record.index or record.index in indexes))

        todo, done = resume(jobs, records, key=lambda job: job.name, fresh=fresh)
        desc = f"{split}: {plural(len(todo), 'tar')} to index" + (f", {len(done)} done earlier" if done else "")
        return (WorkList(todo, done, index_shard, (), desc, "B", size=lambda job: job.size, postfix=_Tally()),
                self._vanished(split))

    def _vanished(self, split: str) -> list[str]:
        """A warning when tars the manifest OUT holds for this split are no longer listed: the builder keeps the
        records of the tars asked for only, so the manifest shrank by their samples, said nowhere, with rc 0.
        Like a conversion whose source files vanished, the adoption goes on with what is there and says what
        left; said once, by the rerun that drops them from the manifest."""
        before = self.previous.splits.get(split) if self.previous else None
        if before is None:
            return []
        listed = {self.prefix + t.name for t in self.tars}
        # A tar of a hidden folder that an older version adopted is still there, skipped now: not 'no longer in'.
        skipped = {self.prefix + name for name in self.hidden}
        hidden = [e for e in before.shards if e.name not in listed and e.name in skipped]
        gone = [e for e in before.shards if e.name not in listed and e.name not in skipped]
        warnings = []

        def first(entries: list) -> str:
            more = f" and {len(entries) - 3} more" if len(entries) > 3 else ""
            return ", ".join(e.name for e in entries[:3]) + more

        if gone:
            are = "is" if len(gone) == 1 else "are"
            warnings.append(
                f"{split}: {plural(len(gone), 'tar')} of the manifest {are} no longer in {self.src} ({first(gone)}): "
                f"their {plural(sum(e.samples for e in gone), 'indexed sample')} leave it ({before.samples} before). "
                "If they moved or a mount is missing, put them back and run the same command again (the other tars are "
                "not read again); if they were deleted on purpose, the set is now smaller")
        if hidden:
            are = "is" if len(hidden) == 1 else "are"
            warnings.append(
                f"{split}: {plural(len(hidden), 'tar')} of the manifest {are} in a hidden folder ({first(hidden)}), "
                f"which adoption now skips (an older version adopted {'it' if len(hidden) == 1 else 'them'}): their "
                f"{plural(sum(e.samples for e in hidden), 'indexed sample')} leave the set ({before.samples} before); "
                "move a real shard out of the hidden folder and run the same command again to keep it")
        return warnings

    def account(self, split: str, results: list[AdoptedShard | str]) -> SplitOutcome:
        failures = [r for r in results if isinstance(r, str)]
        if failures:
            raise SourceError(f"{len(failures)} of {plural(len(self.tars), 'tar')} could not be read: {failures[0]}"
                              + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else "")
                              + f". Run the same command again to retry them; the "
                              f"{plural(len(self.tars) - len(failures), 'indexed tar')} are kept")
        records = {r.name: r for r in results}
        shards = [records[t.name] for t in self.tars]
        entry, warnings = self._entry(split, shards)
        bad_tars = [s for s in shards if s.problem and not s.found]
        rows = [{"shard": s.name, "problem": s.problem} for s in shards if s.problem]
        rows += [{"shard": s.name, **r} for s in shards for r in s.rejected]
        rows += [{"shard": s.name, **r} for s in shards for r in s.ignored]
        # A rejected sample weighs what it loses: 500 video frames that share a dotted key are 500 samples lost,
        # not one, in the ceiling's share (tar_index records them as "images").
        extra = [r["reason"] for s in shards for r in s.rejected for _ in range(r.get("images", 1) - 1)]
        reasons = [r["reason"] for s in shards for r in s.rejected] + extra + [s.problem for s in bad_tars]
        empty = (f"{self.src}: no sample of its {plural(len(shards), 'tar')} can be read; "
                 f"see {storage.join(self.out, REJECTED)}")
        # A tar with no readable sample (a Git LFS pointer, a failed download) may have held a tenth of the set, yet
        # weighed 1 of 2,001 samples: it is also a share of the split's tars, which the ceiling checks too.
        whole = ([(split, len(shards), [s.problem for s in bad_tars], "tars")]
                 if 0 < len(bad_tars) < len(shards) else [])  # all unreadable: the samples' share says it
        return SplitOutcome(entry, rows, entry.counts["found"] + len(extra) + len(bad_tars), reasons, warnings, empty,
                            whole)

    def _entry(self, split: str, shards: list[AdoptedShard]) -> tuple[SplitEntry, list[str]]:
        found, samples = sum(s.found for s in shards), sum(s.samples for s in shards)
        rejected, members = sum(len(s.rejected) for s in shards), sum(s.members for s in shards)
        reconcile(split, ("samples found", found), ("indexed", samples), ("rejected", rejected))
        reconcile(split, ("members", members), ("indexed", sum(s.indexed_members for s in shards)),
                  ("in rejected samples", sum(len(r["members"]) for s in shards for r in s.rejected)),
                  ("ignored", sum(len(s.ignored) for s in shards)))
        labeled_samples = 0 if self.options.unlabeled else sum(s.labeled_samples for s in shards)
        labeled = samples > 0 and labeled_samples == samples
        warnings = []
        if labeled and (largest := max(shards, key=lambda s: s.max_label)).max_label >= MAX_CLASSES:
            raise SourceError(f"{split}: cls reaches {largest.max_label} in {largest.name}: classes.json would list "
                              f"{largest.max_label + 1:,} classes and a classifier head as many outputs. cls must be a "
                              "class index 0..N-1, not an id or a hash: write the tars with indexes, or adopt them "
                              "with --unlabeled (pretraining needs no labels). The tars' indexes are kept: a rerun "
                              "reads none again")
        if 0 < labeled_samples < samples:
            warnings.append(f"{split}: {samples - labeled_samples} of {samples} indexed samples have no cls, so the "
                            "split is unlabeled: pretraining reads it, fine-tuning and probes need labels")
        old_classes = self.previous.classes if self.other_splits else []  # the set's other splits keep theirs
        max_label = max([s.max_label for s in shards] if labeled else [-1])
        self.classes = old_classes + [{"index": i} for i in range(len(old_classes), max_label + 1)]
        if labeled and (warning := _sorted_warning(split, shards, max_label + 1)):
            warnings.append(warning)
        for other, names in self.left_out.items():
            warnings.append(f"{split}: {plural(len(names), 'tar')} named for '{other}' (e.g. {names[0]}) left "
                            f"out; adopt them with --split {other}")
        if spaced := whitespace_names(split, shards):
            warnings.append(spaced)
        empty = [s.name for s in shards if not s.found and not s.problem]
        masked = sum(s.masked_samples for s in shards)
        if 0 < masked < samples:
            warnings.append(f"{split}: {samples - masked} of {samples} indexed samples have no seg.png, so the split "
                            "has no masks: segmentation needs every sample's")
        counts = {"adopted_from": self.src, "found": found, "rejected": rejected, "members": members,
                  "ignored_members": sum(len(s.ignored) for s in shards),
                  "problem_tars": sum(bool(s.problem) for s in shards), "decoded": self.options.decode,
                  "ignored_files": dict(self.others),
                  "hidden_tars": len(self.hidden), "hidden_tar_names": self.hidden[:HIDDEN_NAMED],
                  # Tars read whole that hold no member of any sample (img2dataset's shard whose downloads all failed):
                  # in no count above, so named here, else '2 shards (3 indexed now)' was all that told of them.
                  "empty_tars": len(empty), "empty_tar_names": empty[:HIDDEN_NAMED],
                  "left_out_tars": {other: len(names) for other, names in self.left_out.items()}}
        entries = tuple(ShardEntry(self.prefix + s.name, s.index, s.samples, s.size, s.sha256)
                        for s in shards if s.samples)
        return SplitEntry(samples, labeled, entries, counts, masks=samples > 0 and masked == samples), warnings

    def manifest(self, entries: dict[str, SplitEntry]) -> Manifest:
        mask_classes = self.previous.mask_classes if self.previous else []  # a tar does not say its mask classes
        return Manifest({**self.other_splits, **entries}, self.classes, base=self.base, tool_version=__version__,
                        mask_classes=mask_classes)


def _hidden(name: str) -> bool:
    """A tar whose name, or one of whose folders, starts with a dot: a drive's `.Trash-1000/files/old.tar` (a deleted
    shard) was adopted into the set, as conversion took the images of hidden folders."""
    return any(part.startswith(".") and part not in (".", "..") for part in name.split("/"))


def refuse_tar_names_not_utf8(src: str, names: list[str], shown: int = 5) -> None:
    """Refuses tars (or their folders) whose file names are not UTF-8, before anything is written, naming them with
    those bytes escaped: each name went into dataset.json as a lone surrogate (JSON strict readers refuse), and the
    loaders stopped on it in evaluation with a UnicodeEncodeError that named no file (inside DALI's pipeline, or
    the PyTorch loader's sample ids). Hidden tars too: the summary names them. An s3:// key is always UTF-8."""
    refuse_not_utf8(src, not_utf8(names), "tar name", "a tar's name is written into dataset.json as text, which "
                    "every loader reads it by", shown)


def hidden_note(count: int, names: list[str]) -> str:
    """Why tars named with a leading dot are skipped: macOS writes an AppleDouble `._x.tar` (its metadata, not a
    tar) beside every file it copies to a volume without its attributes, so a set copied from a Mac doubles its
    "tars". A summary's "ignored files beside the tars: {'.tar': 1}" said neither which nor why."""
    shown = ", ".join(names[:HIDDEN_NAMED]) + (f" and {count - HIDDEN_NAMED} more" if count > HIDDEN_NAMED else "")
    in_folder = any("/." in "/" + name.rsplit("/", 1)[0] for name in names if "/" in name)
    return (f"{plural(count, 'hidden tar')} skipped ({shown}): a name starting with '.' is a hidden file, such as the "
            "AppleDouble '._*' files macOS leaves beside copied files, not a shard; rename a real shard without the "
            "leading dot" + ("; a tar in a hidden folder (a drive's .Trash-1000/) is no shard either: move it out "
                             "to adopt it" if in_folder else ""))


def _compressed_note(names: list[str]) -> str:
    """Compressed tars are not shards: training reads byte ranges of each tar at the offsets its index gives, and
    a gzip (bz2, xz, zstd) stream has no such offsets. A summary's "ignored files: {'.gz': 1}" hid them."""
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (f"{plural(len(names), 'compressed tar')} ignored ({shown}): training reads byte ranges of plain tars, "
            "which a compressed stream has not; decompress them in place (`gunzip x.tar.gz` or `gunzip x.tgz` leaves "
            "x.tar; `unxz`, `bunzip2`, `unzstd` likewise) and run the same command again")


def adopt(src: str | Path, out: str | Path, options: AdoptOptions) -> BuildResult:
    """Indexes SRC's tars into OUT and writes the manifest; the result's warnings are for the person adopting."""
    src, out = _location(src), _location(out)
    if not storage.is_remote(src) and Path(src).is_file():  # a shard named alone: said only 'a file, not a folder'
        raise SourceError(f"{src}: a file, not a folder: adopt the folder that holds it (`mixmae shards adopt "
                          f"{Path(src).parent} --out DIR`); every .tar under it is a shard of the set")
    return build(AdoptionSource(src, out, options), out)


def whitespace_names(split: str, shards: list[AdoptedShard]) -> str | None:
    """The samples rejected for whitespace in their member names, with the first tar and member and the way out: the
    rejection ceiling groups reasons by their start alone, and a hand-made tar of `n01440764 1.jpg` names is every
    sample rejected for it."""
    spaced = [(s.name, r["members"]) for s in shards for r in s.rejected if NAME_WHITESPACE in r["reason"]]
    if not spaced:
        return None
    tar, members = spaced[0]
    member = next(name for name in members if any(c.isspace() for c in name))
    their = "their" if len(spaced) > 1 else "its"
    return (f"{split}: {plural(len(spaced), 'sample')} rejected for whitespace in {their} member names (e.g. "
            f"{member!r} in {tar}): DALI's index separates its fields by spaces and cannot hold them; {NAME_REMEDY}")


def summary_lines(result: BuildResult, split: str) -> list[str]:
    """The split's line a person reads: shards, counts that reconcile, labels, what was left aside."""
    manifest = result.manifest
    entry = manifest.splits[split]
    info = entry.counts
    classes = f"labeled, {plural(len(manifest.classes), 'class', 'classes')}" if entry.labeled else "unlabeled"
    ignored = f"; ignored files beside the tars: {info['ignored_files']}" if info["ignored_files"] else ""
    problems = (f"; {plural(info['problem_tars'], 'tar')} cut or unreadable (see rejected.jsonl)"
                if info["problem_tars"] else "")
    hidden = f"; {hidden_note(info['hidden_tars'], info['hidden_tar_names'])}" if info.get("hidden_tars") else ""
    masks = "; every sample has a segmentation mask (seg.png)" if entry.masks else ""
    if empty := info.get("empty_tars", 0):
        more = f" and {empty - HIDDEN_NAMED} more" if empty > HIDDEN_NAMED else ""
        names = ", ".join(info["empty_tar_names"]) + more
        problems += f"; {plural(empty, 'tar')} {'holds' if empty == 1 else 'hold'} no sample ({names})"
    return [f"{split}: {plural(len(entry.shards), 'shard')} ({result.done_now} indexed now); samples found "
            f"{info['found']} = indexed {entry.samples} + rejected {info['rejected']}; members {info['members']} "
            f"(ignored {info['ignored_members']}); {classes}{masks}{problems}{ignored}{hidden}"]
