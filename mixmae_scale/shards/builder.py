"""The stages every shard-set build runs, whatever its source: discover -> progress records -> a bounded process
pool -> counts reconciled -> `rejected.jsonl` -> the rejection ceiling -> the typed manifest.

Conversion (convert.py: image folders written into new tars) and adoption (adopt.py: tars another tool wrote,
indexed where they are) differ only in what a unit of work is and how its result is counted; a `ShardSource`
says that, and `build()` runs the same stages for both, as open_clip's data.py chains small named stages into
one pipeline. Keeping the stages here means resume, reconciliation and the manifest behave the same for both
sources, and a fix to one (say, a bounded pool) reaches the other.

Guarantees the stages hold for every source:
- a unit's progress record is written after its output, so a unit with a record is done and a rerun after an
  interruption redoes only the units without one (`resume`);
- at most 4 x workers units are in flight, so 100,000 tars never sit in memory as submitted futures;
- every split's counts reconcile (found = kept + rejected) or the build stops before writing a manifest;
- `rejected.jsonl` names every rejection with its split, and keeps the lines of splits this build did not touch;
- the manifest is written last, through data/manifest.py: a set with a manifest is complete.
Library code prints nothing but the progress bar: warnings come back in `BuildResult.warnings`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from tqdm import tqdm

from mixmae_scale.data import storage
from mixmae_scale.data.manifest import Manifest, SplitEntry, write_manifest
from mixmae_scale.shards.rejection_limit import TooManyRejected, check_every_split
from mixmae_scale.shards.sources import SourceError

J = TypeVar("J")
R = TypeVar("R")
REJECTED = "rejected.jsonl"
CLASSES = "classes.json"
IN_FLIGHT_PER_WORKER = 4
# Workers start as fresh interpreters, not forks: a fork copies every lock as it stood, held by threads the child
# does not have (the logging lock, an allocator's, boto3's), and a forked `shards verify` worker died by SIGSEGV
# creating a boto3 client in a process that served moto from a thread. Spawn, not forkserver: a forkserver's
# children inherit its environment as it was when the server started, so an AWS_* variable set later in the same
# process (a test's S3 endpoint) would not reach them. Spawn costs about 0.28 s per pool of 2 workers on a 2-core
# machine (fork: 0.01 s; forkserver: 0.23 s for the first pool), against seconds per shard of work. So `work`
# must be a top-level function of an importable module, and it and its args must pickle.
START_METHOD = "spawn"
GUARD = ("if this runs from a script of your own, put its calls under `if __name__ == \"__main__\":` (each worker "
         "starts a fresh interpreter that imports the script, and an unguarded call there starts the work again), "
         "or pass workers=1")


class PoolError(RuntimeError):
    """The worker pool could not do its work. A script that calls convert/adopt/verify with workers > 1 outside an
    `if __name__ == "__main__":` guard got multiprocessing's 'bootstrapping phase' RuntimeError from every worker and
    then BrokenProcessPool, neither of which names the fix; a worker ended by the kernel's out-of-memory killer got
    the same BrokenProcessPool, which names neither the signal nor memory. `workers` and `exitcode` (the dead
    worker's, negative for a signal; None when unknown) let the CLI say it in its own terms (`--workers`)."""

    def __init__(self, message: str, workers: int = 0, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.workers, self.exitcode = workers, exitcode

    @property
    def death(self) -> str:
        """How the worker ended, for a sentence: 'was killed by SIGKILL (most likely out of memory: ...)'."""
        return how_it_ended(self.exitcode)


def how_it_ended(exitcode: int | None) -> str:
    if exitcode is None:
        return "stopped"
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    if -exitcode == signal.SIGKILL:  # what the kernel's out-of-memory killer sends; nothing in the pool does
        return (f"was killed by {name} (most likely out of memory: the kernel's out-of-memory killer sends it, and "
                "`dmesg` or the job's log names it)")
    return f"was killed by {name}"


@dataclass
class BuildResult:
    """What a build made and what the person running it should know; the CLI prints `notes` and `warnings`."""

    manifest: Manifest
    location: str  # the set's folder or s3:// prefix
    notes: list[str] = field(default_factory=list)  # worth a line on stdout (files ignored by name)
    warnings: list[str] = field(default_factory=list)  # worth a WARNING on stderr (the source changed, sorted set)
    done_now: int = 0  # units of work this run did; the others were done by an earlier run


@dataclass
class WorkList(Generic[J, R]):
    """One split's work: the units still to do, the results earlier runs recorded, and how the bar counts."""

    todo: list[J]
    done: list[R]
    work: Callable[..., R | str]  # work(unit, *args) in a worker: a result, or a one-line reason it failed
    args: tuple = ()
    desc: str = ""
    unit: str = "it"  # of the progress bar: "img", or "B" (scaled)
    size: Callable[[J], int] = lambda unit: 1
    postfix: Callable[[R | str], dict] = lambda result: {}


@dataclass
class SplitOutcome:
    """One split, accounted for: its manifest entry, its rejections, what the rejection ceiling divides by."""

    entry: SplitEntry
    rejected: list[dict] = field(default_factory=list)  # rows of rejected.jsonl, without "split" (added here)
    found: int = 0
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    empty_error: str = ""  # raised, after rejected.jsonl is written, when the split has no shard at all
    # More shares the ceiling checks, each (what, found, reasons, unit): adoption's tars with no readable sample
    extra_checks: list[tuple[str, int, list[str], str]] = field(default_factory=list)


class ShardSource(Protocol):
    """What conversion and adoption each supply to `build()`."""

    splits: tuple[str, ...]
    unit: str  # what the rejection ceiling counts: "files", "samples (and unreadable tars)"
    max_rejected: float
    workers: int
    classes_file: bool  # write classes.json even when the set has no classes

    def discover(self) -> tuple[list[str], list[str]]: ...  # (notes, warnings); raises SourceError

    def pending(self, split: str) -> tuple[WorkList, list[str]]: ...  # (work list, warnings)

    def account(self, split: str, results: list) -> SplitOutcome: ...

    def manifest(self, entries: dict[str, SplitEntry]) -> Manifest: ...


def build(source: ShardSource, out: str) -> BuildResult:
    """Runs every stage for `source` into `out` (a folder or an s3:// prefix) and returns the manifest written."""
    notes, warnings = source.discover()
    outcomes: dict[str, SplitOutcome] = {}
    done_now = 0
    for split in source.splits:
        work, found_warnings = source.pending(split)
        warnings += found_warnings
        results = run_pool(work, source.workers)
        done_now += len(work.todo)
        outcomes[split] = source.account(split, work.done + results)
        warnings += outcomes[split].warnings
    rejections = write_rejections(out, {split: o.rejected for split, o in outcomes.items()})
    try:
        check_every_split([(split, o.found, o.reasons) for split, o in outcomes.items()]
                          + [check for o in outcomes.values() for check in o.extra_checks], source.max_rejected,
                          rejections, source.unit)
    except TooManyRejected as exc:  # what a successful build would have warned of is said with the refusal
        if not warnings:
            raise
        raise TooManyRejected(f"{exc}. Also: {'; '.join(warnings)}") from None
    for split, outcome in outcomes.items():
        if not outcome.entry.shards and (outcome.empty_error or not outcome.found):
            raise SourceError(outcome.empty_error or f"{split}: nothing to write: no {source.unit} found")
    manifest = source.manifest({split: o.entry for split, o in outcomes.items()})
    publish(out, manifest, source.classes_file)
    return BuildResult(manifest, out, notes, warnings, done_now)


def write_record(url: str, record: Any) -> None:
    """A unit's progress record (a dataclass), written after the unit's output: its presence means done."""
    storage.write_text(url, json.dumps(asdict(record), sort_keys=True))


def read_records(folder: str, parse: Callable[[dict], R], wanted: Callable[[str], bool] = lambda name: True
                 ) -> list[R]:
    """The records under `folder` whose file names `wanted` accepts: one listing, then one read each (threads,
    since each read is one GET on S3)."""
    if not storage.is_remote(folder) and not Path(folder).is_dir():
        return []
    names = [f.name for f in storage.list_files(folder, ".json") if wanted(f.name)]
    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(lambda name: storage.read_text(storage.join(folder, name)), names))
    return [parse(json.loads(text)) for text in texts]


def resume(units: Sequence[J], records: dict[str, R], key: Callable[[J], str],
           fresh: Callable[[J, R], bool] = lambda unit, record: True) -> tuple[list[J], list[R]]:
    """(units to do, records of units done): a unit is done when it has a record that is still `fresh` for it
    (the tar it indexed has not changed, say). Records of units no longer asked for are left out."""
    todo, done = [], []
    for unit in units:
        record = records.get(key(unit))
        if record is not None and fresh(unit, record):
            done.append(record)
        else:
            todo.append(unit)
    return todo, done


def bounded_pool(work: Callable[..., R], units: Sequence[J], workers: int, args: tuple = ()
                 ) -> Iterator[tuple[J, R]]:
    """(unit, work(unit, *args)) as each finishes; in this process when workers <= 1 or there is one unit (a pool
    of fresh interpreters takes ~0.3 s to start), else in START_METHOD worker processes with at most
    IN_FLIGHT_PER_WORKER x workers units submitted at once."""
    if workers <= 1 or len(units) <= 1:
        for unit in units:
            yield unit, work(unit, *args)
        return
    if getattr(multiprocessing.current_process(), "_inheriting", False):  # a worker importing an unguarded script
        raise PoolError(f"a pool of {workers} workers was started while a worker imported the calling script: {GUARD}")
    processes: list = []  # the pool's, kept to read the dead worker's exit code once the pool has joined them
    try:
        yield from _pooled(work, units, workers, args, processes)
    except BrokenProcessPool as exc:
        exitcode = _dead_workers_code(processes)
        if exitcode == -signal.SIGKILL:
            advice = f"pass fewer workers (each holds its own share of the work in memory), e.g. workers={workers // 2}"
        elif exitcode is not None and exitcode < 0:  # a crash, say SIGSEGV in a decoder: not the guard (exit 1)
            advice = "workers=1 does the work in this process, where what ends it shows"
        elif exitcode is None:  # how it ended is unknown
            advice = f"{GUARD}; otherwise it was killed (out of memory?)"
        else:  # it exited, killed by nothing: an unguarded script's workers exit 1
            advice = f"{GUARD}; otherwise workers=1 does the work in this process, where what ends it shows"
        raise PoolError(f"a worker of the pool ({workers} workers) {how_it_ended(exitcode)} before its work was "
                        f"done: {advice}", workers, exitcode) from exc


def _dead_workers_code(processes: Sequence[multiprocessing.process.BaseProcess]) -> int | None:
    """The exit code of the worker whose death broke the pool. The pool then ends the others by SIGTERM, so a
    SIGTERM is the cause only where no worker ended otherwise."""
    codes = [p.exitcode for p in processes if p.exitcode is not None]
    return next((code for code in codes if code != -signal.SIGTERM), codes[0] if codes else None)


def die_with_parent(parent: int) -> None:
    """A pool worker's initializer: a daemon thread of the worker ends it by SIGKILL when the process that started it
    ends.

    A conversion ended by `kill PID` (SIGTERM, no handler: no cleanup runs) or by the out-of-memory killer choosing
    the main process left its workers running: they wrote the shards already handed to them into the output after
    the command had exited, racing a rerun started at once on the same temporary files, then waited for work for
    good. PR_SET_PDEATHSIG is not the way: it fires when the *thread* that spawned the worker ends, and a pool whose
    first units were submitted from a thread that then ended lost every worker, said as an out-of-memory kill. A
    pidfd (Linux 5.3+) turns readable when the parent process exits, whatever its threads do; elsewhere the thread
    polls the parent's id each second. A worker whose parent ended before this ran ends itself."""
    try:
        handle = os.pidfd_open(parent)
    except ProcessLookupError:
        handle = None  # gone already: the check below ends this worker
    except (AttributeError, OSError):  # no pidfd_open (not Linux, or a kernel before 5.3)
        handle = -1
    if handle is None or os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=_end_with_parent, args=(parent, handle), daemon=True, name="end-with-parent").start()


def _end_with_parent(parent: int, handle: int) -> None:
    if handle >= 0:
        select.select([handle], [], [])  # readable once the parent process has exited
    else:
        while os.getppid() == parent:
            time.sleep(1)
    os.kill(os.getpid(), signal.SIGKILL)


def _pooled(work: Callable[..., R], units: Sequence[J], workers: int, args: tuple, processes: list
            ) -> Iterator[tuple[J, R]]:
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(START_METHOD),
                             initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
        try:
            pending: dict[Future, J] = {}
            queue = iter(units)
            for unit in queue:
                pending[pool.submit(work, unit, *args)] = unit
                if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                    break
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield pending.pop(future), future.result()
                    unit = next(queue, None)
                    if unit is not None:
                        pending[pool.submit(work, unit, *args)] = unit
        finally:
            # The executor forgets its processes on shutdown; their exit codes are read after it has joined them
            # (read now, a dead worker's code may be mid-collection by the executor's own thread).
            processes += (getattr(pool, "_processes", None) or {}).values()


def run_pool(work: WorkList[J, R], workers: int) -> list[R | str]:
    """The work list's units through the pool, with one progress bar (on stderr) sized by `work.size`."""
    results: list[R | str] = []
    total = sum(work.size(unit) for unit in work.todo)
    with tqdm(total=total, unit=work.unit, unit_scale=work.unit == "B", desc=work.desc, dynamic_ncols=True) as bar:
        for unit, result in bounded_pool(work.work, work.todo, workers, work.args):
            results.append(result)
            bar.update(work.size(unit))
            bar.set_postfix(work.postfix(result))
    return results


def reconcile(split: str, found: tuple[str, int], *parts: tuple[str, int]) -> None:
    """Raises when `found` is not the sum of `parts`: a unit lost or counted twice is a bug, never a manifest."""
    if found[1] != sum(count for _, count in parts):
        raise RuntimeError(f"{split}: counts do not reconcile: {found[0]} {found[1]} != "
                           + " + ".join(f"{name} {count}" for name, count in parts))


def write_rejections(out: str, rows: dict[str, list[dict]]) -> str:
    """Writes `rejected.jsonl`: these splits' rows (each with its split), after the kept lines of other splits
    (adopting val into a set keeps train's rejections). Returns its path or URL."""
    url = storage.join(out, REJECTED)
    kept = []
    if storage.exists(url):
        kept = [line for line in storage.read_text(url).splitlines() if json.loads(line).get("split") not in rows]
    lines = [json.dumps({"split": split, **row}, sort_keys=True) for split, split_rows in rows.items()
             for row in split_rows]
    storage.write_text(url, "".join(line + "\n" for line in kept + lines))
    return url


def publish(out: str, manifest: Manifest, classes_file: bool) -> str:
    """classes.json (the class list alone, for tools that want only it), then the manifest, last."""
    if manifest.classes or classes_file:
        storage.write_text(storage.join(out, CLASSES), json.dumps(manifest.classes, indent=1))
    return write_manifest(out, manifest)
