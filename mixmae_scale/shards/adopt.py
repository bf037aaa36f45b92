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
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from mixmae_scale import __version__
from mixmae_scale.data import storage
from mixmae_scale.data.manifest import FORMAT, MANIFEST
from mixmae_scale.shards.rejection_limit import DEFAULT_MAX_REJECTED, check_rejections
from mixmae_scale.shards.sources import SourceError
from mixmae_scale.shards.tar_index import TarIndex, index_tar
from mixmae_scale.shards.transient import retrying

PROGRESS_DIR = ".progress/adopt"
SORTED_SHARE = 0.9  # a shard whose most frequent class holds this share of it holds "one class"


@dataclass(frozen=True)
class AdoptOptions:
    split: str = "train"
    decode: bool = False
    workers: int = 1
    max_rejected: float = DEFAULT_MAX_REJECTED


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


@dataclass(frozen=True)
class _Job:
    name: str
    url: str
    size: int
    out: str
    split: str
    decode: bool


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
        rejected=found.rejected, ignored=found.ignored, problem=found.problem, decoded=job.decode,
        labeled_samples=len(labels), max_label=max(labels, default=-1),
        top_class_share=top[0][1] / len(labels) if top else 0.0)
    if found.samples:
        record.index = index_name(job.split, job.name)
        storage.write_text(storage.join(job.out, record.index), found.index_text())
    storage.write_text(storage.join(job.out, record_name(job.split, job.name)), json.dumps(asdict(record)))
    return record


def _read_records(out: str, split: str) -> dict[str, AdoptedShard]:
    folder = storage.join(out, f"{PROGRESS_DIR}/{split}")
    if not storage.is_remote(folder) and not Path(folder).is_dir():
        return {}
    files = storage.list_files(folder, ".json")
    with ThreadPoolExecutor(16) as pool:  # one GET each on S3: overlap them
        texts = list(pool.map(lambda f: storage.read_text(storage.join(folder, f.name)), files))
    records = {}
    for text in texts:
        record = AdoptedShard(**json.loads(text))
        records[record.name] = record
    return records


def _existing_indexes(out: str, split: str) -> set[str]:
    folder = storage.join(out, split)
    if not storage.is_remote(folder) and not Path(folder).is_dir():
        return set()
    return {f"{split}/{f.name}" for f in storage.list_files(folder, ".idx")}


def _run(jobs: list[_Job], workers: int, desc: str) -> tuple[list[AdoptedShard], list[str]]:
    records: list[AdoptedShard] = []
    failures: list[str] = []
    samples = rejected = 0
    with tqdm(total=sum(j.size for j in jobs), unit="B", unit_scale=True, desc=desc, dynamic_ncols=True) as bar:

        def done(job: _Job, result: AdoptedShard | str) -> None:
            nonlocal samples, rejected
            if isinstance(result, str):
                failures.append(result)
            else:
                records.append(result)
                samples += result.samples
                rejected += len(result.rejected)
            bar.update(job.size)
            bar.set_postfix(samples=samples, rejected=rejected, failed=len(failures))

        if workers <= 1:
            for job in jobs:
                done(job, index_shard(job))
            return records, failures
        with ProcessPoolExecutor(max_workers=workers) as pool:
            # A bounded number in flight: 100,000 submitted futures would hold 100,000 jobs at once.
            pending: dict[Future, _Job] = {}
            queue = iter(jobs)
            for job in queue:
                pending[pool.submit(index_shard, job)] = job
                if len(pending) >= 4 * workers:
                    break
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    done(pending.pop(future), future.result())
                    job = next(queue, None)
                    if job is not None:
                        pending[pool.submit(index_shard, job)] = job
    return records, failures


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


def _place(manifest: dict | None, src: str, split: str) -> tuple[str, dict, str]:
    """Where this split's tars are named from: (the manifest's base, the other splits with their tar
    names made relative to that base, the prefix that turns a name relative to SRC into one relative to
    the base). A second split from another folder moves the base up to the folder both share."""
    others = {k: v for k, v in (manifest or {}).get("splits", {}).items() if k != split}
    if not others:
        return src, {}, ""
    old_base = manifest.get("base")
    unadopted = [k for k, v in others.items() if "adopted_from" not in v]
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
        shards = [{**s, "name": s["name"] if storage.is_remote(s["name"])
                   else _relative(storage.join(old_base, s["name"]), base)} for s in info["shards"]]
        renamed[name] = {**info, "shards": shards}
    return base, renamed, (_relative(src, base) + "/" if src != base else "")


def _read_manifest(out: str) -> dict | None:
    path = storage.join(out, MANIFEST)
    if not storage.exists(path):
        return None
    manifest = json.loads(storage.read_text(path))
    if manifest.get("format", FORMAT) != FORMAT:
        raise SourceError(f"{path}: not a mixmae-scale manifest; adopt into another folder")
    return manifest


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
        return name.startswith(".progress/") or name.endswith(".idx") or name in (MANIFEST, "classes.json",
                                                                                     "rejected.jsonl")
    return (out + "/").startswith(src + "/") and name.startswith(_relative(out, src) + "/")


def adopt(src: str | Path, out: str | Path, options: AdoptOptions) -> dict:
    """Indexes SRC's tars into OUT and writes the manifest; returns it, with `warnings` (not stored)."""
    src, out = _location(src), _location(out)
    split = options.split
    listing = [f for f in storage.list_files(src) if not _written_here(f.name, src, out)]
    tars = [f for f in listing if f.name.lower().endswith(".tar") and not f.name.rsplit("/", 1)[-1].startswith(".")]
    others = Counter(Path(f.name).suffix.lower() or f.name for f in listing if f not in tars)
    if not tars:
        raise SourceError(f"{src}: no .tar files found (searched recursively"
                          + (f"; it holds {dict(others)}" if others else "; it is empty") + ")")
    manifest = _read_manifest(out)
    base, other_splits, prefix = _place(manifest, src, split)
    records = _read_records(out, split)
    indexes = _existing_indexes(out, split)
    jobs = []
    for tar in tars:
        url = storage.join(src, tar.name)
        record = records.get(tar.name)
        fresh = (record is not None and record.source == url and record.size == tar.size
                 and (record.decoded or not options.decode) and (not record.index or record.index in indexes))
        if not fresh:
            jobs.append(_Job(tar.name, url, tar.size, out, split, options.decode))
    done_before = len(tars) - len(jobs)
    desc = f"{split}: {len(jobs)} tar(s) to index" + (f", {done_before} done earlier" if done_before else "")
    new_records, failures = _run(jobs, options.workers, desc)
    records.update({r.name: r for r in new_records})
    if failures:
        raise SourceError(f"{len(failures)} of {len(tars)} tar(s) could not be read: {failures[0]}"
                          + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else "")
                          + f". Run the same command again to retry them; the {len(tars) - len(failures)} indexed "
                          "tar(s) are kept")
    shards = [records[t.name] for t in tars]
    return _write_set(src, out, options, manifest, base, other_splits, prefix, shards, others, len(jobs))


def _write_set(src: str, out: str, options: AdoptOptions, manifest: dict | None, base: str, other_splits: dict,
               prefix: str, shards: list[AdoptedShard], others: Counter, indexed_now: int) -> dict:
    split = options.split
    found = sum(s.found for s in shards)
    samples = sum(s.samples for s in shards)
    rejected = sum(len(s.rejected) for s in shards)
    members = sum(s.members for s in shards)
    accounted = sum(s.indexed_members + sum(len(r["members"]) for r in s.rejected) + len(s.ignored) for s in shards)
    if found != samples + rejected or members != accounted:
        raise RuntimeError(f"{split}: counts do not reconcile: {found} samples found, {samples} indexed, {rejected} "
                           f"rejected; {members} members, {accounted} accounted for")
    labeled_samples = sum(s.labeled_samples for s in shards)
    labeled = samples > 0 and labeled_samples == samples
    warnings = []
    if 0 < labeled_samples < samples:
        warnings.append(f"{split}: {samples - labeled_samples} of {samples} indexed samples have no cls, so the split "
                        "is unlabeled: pretraining reads it, fine-tuning and probes need labels")
    old_classes = (manifest or {}).get("classes", [])
    max_label = max([s.max_label for s in shards] if labeled else [-1])
    classes = old_classes + [{"index": i} for i in range(len(old_classes), max_label + 1)]
    if labeled and (warning := _sorted_warning(split, shards, max_label + 1)):
        warnings.append(warning)
    bad_tars = [s for s in shards if s.problem and not s.found]
    lines = [json.dumps({"split": split, "shard": s.name, "problem": s.problem}) for s in shards if s.problem]
    lines += [json.dumps({"split": split, "shard": s.name, **r}) for s in shards for r in s.rejected]
    lines += [json.dumps({"split": split, "shard": s.name, **r}) for s in shards for r in s.ignored]
    rejections = storage.join(out, "rejected.jsonl")
    kept = []
    if storage.exists(rejections):
        kept = [line for line in storage.read_text(rejections).splitlines() if json.loads(line).get("split") != split]
    storage.write_text(rejections, "".join(line + "\n" for line in kept + lines))
    reasons = [r["reason"] for s in shards for r in s.rejected] + [s.problem for s in bad_tars]
    check_rejections(split, found + len(bad_tars), reasons, options.max_rejected, rejections,
                     unit="samples (and unreadable tars)")
    info = {
        "adopted_from": src, "found": found, "samples": samples, "rejected": rejected, "members": members,
        "ignored_members": sum(len(s.ignored) for s in shards), "problem_tars": sum(bool(s.problem) for s in shards),
        "labeled": labeled, "decoded": options.decode, "ignored_files": dict(others),
        "shards": [{"name": prefix + s.name, "index": s.index, "samples": s.samples, "bytes": s.size,
                    "sha256": s.sha256} for s in shards if s.samples],
    }
    if not info["shards"]:
        raise SourceError(f"{src}: no sample of its {len(shards)} tar(s) can be read; see {rejections}")
    manifest = {"format": FORMAT, "version": 2, "tool_version": __version__, "base": base, "classes": classes,
                "splits": {**other_splits, split: info}}
    if classes:
        storage.write_text(storage.join(out, "classes.json"), json.dumps(classes, indent=1))
    storage.write_text(storage.join(out, MANIFEST), json.dumps(manifest, indent=1))
    for warning in warnings:
        print(f"WARNING {warning}", file=sys.stderr)
    return {**manifest, "warnings": warnings, "indexed_now": indexed_now}


def summary_lines(manifest: dict, split: str) -> list[str]:
    info = manifest["splits"][split]
    classes = f"labeled, {len(manifest['classes'])} classes" if info["labeled"] else "unlabeled"
    ignored = f"; ignored files beside the tars: {info['ignored_files']}" if info["ignored_files"] else ""
    problems = f"; {info['problem_tars']} tar(s) cut or unreadable (see rejected.jsonl)" if info["problem_tars"] else ""
    return [f"{split}: {len(info['shards'])} shard(s) ({manifest['indexed_now']} indexed now); samples found "
            f"{info['found']} = indexed {info['samples']} + rejected {info['rejected']}; members {info['members']} "
            f"(ignored {info['ignored_members']}); {classes}{problems}{ignored}"]
