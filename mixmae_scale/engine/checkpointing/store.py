"""The checkpoint store: tags a crash cannot corrupt: DeepSpeed's sharded save plus our per-rank state, written under a
temporary name and renamed into place once every rank's files are on the disk.

A tag folder (`step00000400`) appears only complete: every rank writes into `step00000400.partial`, flushes
what it wrote and tells rank 0 each file's size; rank 0 checks that it sees them all as written (a run folder on
node-local scratch would otherwise seal a tag without other nodes' shards and rotate the good ones away), writes
the `COMPLETE` marker listing every file with its size, flushes it and renames the folder. A crash at any point
leaves a `.partial` folder, which nothing reads and the next start removes once it holds the run's lock
(`remove_stale_partials`; the next save too). A save that fails for want of space says so (`NoSpaceForCheckpoint`).
A complete tag is never written into again: a save that would reuse a name takes a new one. On resume the sizes in
the marker are checked, so a file cut short afterwards (a full disk, a copy gone wrong) makes the run fall back to
the previous checkpoint instead of failing in torch.load.

Tags are ordered (`tag_order`): `step00000400` < `step00000400-relayout` (the same state saved again in a new
layout after a resume on another world size) < `step00000400-nonfinite` (a stop after non-finite steps, whose
state is that of the step's start) < `step00000401`. What the files hold is state.py's; this module knows
only folders, names and sizes.
"""

from __future__ import annotations

import errno
import json
import shutil
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
import yaml

from mixmae_scale.atomic_file import fsync_path, write_text

MARKER = "COMPLETE"
RECIPE = "config.yaml"  # the configuration the tag was trained with (recipe.py reads it)
PARTIAL = ".partial"
UNIVERSAL = ".universal"  # DeepSpeed's universal form of a tag, made when a run resumes on another layout
NONFINITE = "-nonfinite"
RELAYOUT = "-relayout"  # saved right after a resume across a layout change (checkpoint.save_after_layout_change)
DAMAGED = "damaged-"  # a damaged tag moved aside when its step is saved again (not a tag: does not start with "step")


class ResumeError(RuntimeError):
    """A checkpoint that this run must not resume from; the message says why and what to do."""


class UnsharedRunFolder(ResumeError):
    """Ranks see different run folders (node-local scratch): a refused input (exit 2), the same start fails again."""


class NoSpaceForCheckpoint(OSError):
    """A save failed and the run folder's file system is full (or the error says so): said in one line, exit 1 (the
    same command succeeds once there is room; cli/failure_report.py)."""


UNSHARED = ("the run folder is not shared by all nodes: {what}. Every node must see one run folder at the same path "
            "(a shared file system, not node-local scratch): give --run-dir on one")


def tag_for(step: int, kind: str = "") -> str:
    return f"step{step:08d}{kind}"


def step_of(tag: str) -> int:
    return int(tag[4:12])


def is_tag_name(name: str) -> bool:
    """`step` and eight digits first: what `tag_for` writes (a folder a user named "step-old" is not a tag)."""
    return name.startswith("step") and len(name) >= 12 and name[4:12].isdigit()


def is_regular(tag: str) -> bool:
    """A checkpoint of trained state at its step (not a non-finite stop's)."""
    return NONFINITE not in tag


KIND_ORDER = {"": 0, RELAYOUT: 1, NONFINITE: 2}


def tag_order(tag: str) -> tuple[int, int, int]:
    """Oldest first: by step, then regular < relayout < non-finite stop, then the number a repeated name takes
    (`-nonfinite-10` after `-nonfinite-2`, which names do not sort). A stop and a relayout tag of one step are
    ordered so because a relayout save retires every stop (`rotation_victims`): a stop still beside it came after."""
    rest = tag[12:]
    kind = next((k for k in (NONFINITE, RELAYOUT) if rest.startswith(k)), "")
    number = rest[len(kind) + 1:]
    return step_of(tag), KIND_ORDER[kind], int(number) if number.isdigit() else 1


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Training checkpoints whose every file was written (not `.partial`, not universal conversions), oldest
    first (`tag_order`)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p.name for p in ckpt_dir.iterdir() if is_tag_name(p.name) and PARTIAL not in p.name
                   and UNIVERSAL not in p.name and (p / MARKER).exists()), key=tag_order)


def unsealed_tags(ckpt_dir: Path) -> list[str]:
    """Folders named as checkpoints but without a `COMPLETE` marker, oldest first: never a save of this tool (it seals
    a `.partial` folder, then renames it), but a copy of the run folder cut short or made without the markers. Not
    read as checkpoints; a resume names them (`unsealed_note`)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p.name for p in ckpt_dir.iterdir() if is_tag_name(p.name) and PARTIAL not in p.name
                   and UNIVERSAL not in p.name and p.is_dir() and not (p / MARKER).exists()), key=tag_order)


def unsealed_note(ckpt_dir: Path, tags: list[str]) -> str:
    return (f"{', '.join(tags)} in {ckpt_dir.resolve()} {'have' if len(tags) > 1 else 'has'} no {MARKER} marker "
            "(never sealed: a save this tool did not finish is a .partial folder, so a copy of the run folder cut "
            "short or made without the markers): not read as a checkpoint")


def marker(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    return json.loads((ckpt_dir / tag / MARKER).read_text())


def damage(folder: Path) -> str | None:
    """Why a complete-looking folder cannot be trusted (a file missing or of another size than written), or None."""
    try:
        record = json.loads((folder / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"its {MARKER} marker cannot be read ({exc})"
    for name, size in record.get("files", {}).items():
        path = folder / name
        if not path.exists():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def names_another_folder(ckpt_dir: Path, resume: str) -> bool:
    """`checkpoint.resume` given as a path whose folder is not this run's checkpoints/."""
    folder = Path(resume).parent
    return folder != Path(".") and folder.resolve() != ckpt_dir.resolve()


def intact_newest_first(ckpt_dir: Path, tags: list[str]) -> tuple[list[str], list[str]]:
    """The complete tags whose files are as written, newest first, and a note for each damaged one passed over:
    what a resume and an export may read."""
    notes, intact = [], []
    for tag in reversed(tags):
        problem = damage(ckpt_dir / tag)
        if problem:
            notes.append(f"checkpoint {(ckpt_dir / tag).resolve()} is damaged ({problem}): falling back to an earlier "
                         "one")
        else:
            intact.append(tag)
    return intact, notes


def _written_files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER}


def seal(folder: Path, record: dict[str, Any], flushed: dict[str, int] | None = None) -> None:
    """Write the marker of a finished folder (flushed) listing its files; the caller renames it into place.
    `flushed`: the files the ranks wrote, flushed by their writers and reported (`save`), listed even where this
    process's listing of a shared folder lags; what else it sees (DeepSpeed's recovery scripts, the files of a
    conversion) it flushes itself."""
    flushed = flushed or {}
    seen = _written_files(folder)
    for name in seen.keys() - flushed.keys():
        fsync_path(folder / name)
    write_text(folder / MARKER, json.dumps({**record, "files": dict(sorted({**seen, **flushed}.items()))}))


@contextmanager
def recording_writes(engine) -> Iterator[list[str]]:
    """The paths DeepSpeed writes through its checkpoint engine during the `with` (every model and optimizer shard
    of a save goes through `checkpoint_engine.save`), so that the rank that wrote them flushes them: on NFS or Lustre
    another client's fsync does not flush this one's cache. An engine without one (a test's) records nothing."""
    written: list[str] = []
    writer = getattr(engine, "checkpoint_engine", None)
    save_file = getattr(writer, "save", None)
    if save_file is None:
        yield written
        return

    def recording(*args: Any, **kwargs: Any) -> Any:
        result = save_file(*args, **kwargs)
        path = kwargs.get("path", args[1] if len(args) > 1 else None)
        if path is not None:
            written.append(str(path))
        return result

    own = "save" in vars(writer)
    writer.save = recording
    try:
        yield written
    finally:
        if own:
            writer.save = save_file
        else:
            del writer.save


def flush_own(folder: Path, paths: Iterable[str | Path]) -> dict[str, int]:
    """Flush the files this rank wrote into `folder`; each one's name in the folder and size, for rank 0's check."""
    files = {}
    for path in map(Path, paths):
        if not path.is_relative_to(folder):
            continue  # nothing of the tag's (DeepSpeed writes a tag's files into its folder)
        fsync_path(path)
        files[str(path.relative_to(folder))] = path.stat().st_size
    return files


def unshared(folder: Path, reports: list[tuple[str, dict[str, int]]]) -> str | None:
    """Rank 0: why its view of `folder` differs from what the ranks wrote (`reports`: each rank's host and files), or
    None. Each file is looked up by name: a name not looked up before is not in a cache, where a listing of a folder
    that other clients write into may lag on NFS."""
    by_host: dict[str, tuple[list[int], str]] = {}
    for rank, (host, files) in enumerate(reports):
        problem = _first_difference(folder, files)
        if problem is not None:
            by_host.setdefault(host, ([], problem))[0].append(rank)
    if not by_host:
        return None
    parts = "; ".join(f"{'rank' if len(ranks) == 1 else 'ranks'} {ranges(ranks)} on {host} ({first})"
                      for host, (ranks, first) in by_host.items())
    return UNSHARED.format(what=f"rank 0 on {reports[0][0]} does not see in {folder} what {parts} wrote")


def _first_difference(folder: Path, files: dict[str, int]) -> str | None:
    for name, size in sorted(files.items()):
        try:
            seen = (folder / name).stat().st_size
        except FileNotFoundError:
            return f"{name} missing"
        if seen != size:
            return f"{name} has {seen} bytes, {size} were written"
    return None


def ranges(ranks: list[int]) -> str:
    """[2, 3, 4, 9] -> "2-4, 9"."""
    runs: list[list[int]] = []
    for rank in sorted(ranks):
        if runs and rank == runs[-1][-1] + 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


def publish(partial: Path, final: Path) -> None:
    """Rename a sealed `.partial` folder to its final name, flushed in its parent. A damaged tag of that name (the
    step retrained after a resume fell back past it) is moved aside first, kept for a look, never read again."""
    if final.exists():
        number, suffix = 2, ""
        while any(final.with_name(f"{DAMAGED}{final.name}{extra}{suffix}").exists() for extra in ("", UNIVERSAL)):
            number, suffix = number + 1, f"-{number}"
        for old in (final, final.with_name(f"{final.name}{UNIVERSAL}")):  # its conversion went with its files
            if old.exists():
                old.replace(old.with_name(f"{DAMAGED}{old.name}{suffix}"))
    partial.replace(final)
    fsync_path(final.parent)


@dataclass(frozen=True)
class SaveRequest:
    step: int
    kind: str = ""  # "" (regular) or NONFINITE
    keep_last: int = 3  # 0: rotation removes no regular tag
    marker_extra: dict[str, Any] | None = None  # what a resume must know before loading anything (state.py)
    recipe: dict[str, Any] | None = None  # the resolved configuration, recorded in the tag (recipe.py) by rank 0


def free_tag(ckpt_dir: Path, step: int, kind: str) -> str | None:
    """The name to save under: None when an intact regular tag of this step exists (nothing to redo; a damaged one
    is saved again, `publish` moves it aside); a stop tag never reuses a complete name."""
    tag = tag_for(step, kind)
    if not (ckpt_dir / tag / MARKER).exists() or (not kind and damage(ckpt_dir / tag)):
        return tag
    if not kind:
        return None
    number = 2
    while (ckpt_dir / f"{tag}-{number}" / MARKER).exists():
        number += 1
    return f"{tag}-{number}"


def save(engine, ckpt_dir: Path, request: SaveRequest, client_state: dict[str, Any], rank_state: dict[str, Any]
         ) -> Path:
    """Collective: every rank calls it at the same step. Returns the complete tag's folder."""
    rank, world = dist.get_rank(), dist.get_world_size()
    names = [free_tag(ckpt_dir, request.step, request.kind) if rank == 0 else None]
    dist.broadcast_object_list(names, src=0)  # one name for all ranks, whatever each one's view of the folder
    tag = names[0]
    if tag is None:
        return ckpt_dir / tag_for(request.step, request.kind)
    partial = ckpt_dir / f"{tag}{PARTIAL}"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # a crash's leftover of the same name
    dist.barrier()
    try:
        with recording_writes(engine) as written:
            engine.save_checkpoint(str(ckpt_dir), tag=partial.name, client_state=client_state, save_latest=False)
        own = [rank_file(partial, rank)]
        write_text(own[0], json.dumps(rank_state))
        if rank == 0 and request.recipe is not None:  # sealed with the tag: what a resume compares its recipe with
            own.append(partial / RECIPE)
            write_text(own[-1], yaml.safe_dump(request.recipe, sort_keys=False))
        files = flush_own(partial, [*written, *own])
    except (OSError, RuntimeError) as exc:
        problem = out_of_space(ckpt_dir, partial, exc, request.keep_last)
        if problem is None:
            raise
        code = next((c for c in errno_chain(exc) if c in SPACE_ERRORS), errno.ENOSPC)  # EDQUOT stays a quota's
        raise NoSpaceForCheckpoint(code, problem) from exc
    reports: list[Any] = [None] * world
    dist.all_gather_object(reports, (socket.gethostname(), files))
    refusal = [None]
    if rank == 0:
        refusal[0] = unshared(partial, reports)
        if refusal[0] is None:  # else nothing is sealed or rotated: the older tags stay
            flushed = {name: size for _, files in reports for name, size in files.items()}
            seal(partial, {"step": request.step, "world_size": world, "kind": request.kind or "regular",
                           **(request.marker_extra or {})}, flushed)
            publish(partial, ckpt_dir / tag)
            rotate(ckpt_dir, request.keep_last, just_written=tag)
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise UnsharedRunFolder(refusal[0])
    return ckpt_dir / tag


def rotation_victims(tags: list[str], keep_last: int, just_written: str | None = None,
                     damaged: frozenset[str] = frozenset()) -> set[str]:
    """Which complete tags rotation removes: all but the newest `keep_last` intact regular ones (a `damaged` tag
    does not count: kept among them it would leave fewer usable checkpoints than asked for; it goes once older than
    those kept; `keep_last` 0 keeps them all: fine-tuning's best/, which its job prunes), and stop tags once a newer
    regular one exists; never `just_written` (the checkpoint the run has just saved, even where older runs'
    higher-numbered tags would otherwise outrank it).

    Any tag just written, a stop's too, also retires every other stop tag, whatever its step: a stop is the last
    thing its process saves, so a later save comes from a run that resumed past it. Tags order by step, and a
    rollback moves the step back: kept, a stop at step 7 would outrank the regular tags a rollback to step 5 goes
    on to save (at 7, or at 6 by a signal), and the next resume would take the stop again and move the data back to
    where it stopped; a second stop after the rollback, at step 6, would sort before the first, and every later
    launch would roll back past the first stop's data only, read the batches that caused the second one again and
    stop there again. (A crash between a stop's rename and this rotation leaves both; the next stop retires them.)"""
    intact = [t for t in tags if is_regular(t) and t not in damaged]
    doomed = set(intact[:-keep_last]) if keep_last else set()
    if intact:
        oldest_kept = tag_order(intact[-keep_last:][0])
        doomed |= {t for t in damaged if tag_order(t) < oldest_kept}
    regular = [t for t in tags if is_regular(t)]
    if regular:
        doomed |= {t for t in tags if not is_regular(t) and step_of(t) < step_of(regular[-1])}
    if just_written is not None:
        doomed |= {t for t in tags if not is_regular(t)}
    return doomed - {just_written}


def rotate(ckpt_dir: Path, keep_last: int, just_written: str | None = None) -> None:
    """Remove `rotation_victims`, the universal conversions that go with them and crash leftovers (`.partial`)."""
    tags = complete_tags(ckpt_dir)
    damaged = frozenset(t for t in tags if damage(ckpt_dir / t))
    doomed = rotation_victims(tags, keep_last, just_written, damaged)
    for path in ckpt_dir.iterdir():
        base = path.name.split(UNIVERSAL)[0].split(PARTIAL)[0]
        if base in doomed or (PARTIAL in path.name and base not in tags):
            shutil.rmtree(path, ignore_errors=True)


def existing(checkpoint: Path | None) -> Path | None:
    """`checkpoint` if it is on disk, complete and intact, else None: what a summary may name."""
    if checkpoint is None or not (checkpoint / MARKER).exists() or damage(checkpoint):
        return None
    return checkpoint


def rank_file(folder: Path, rank: int) -> Path:
    """Each rank's own file beside DeepSpeed's: what state.py's RankState holds, as JSON."""
    return folder / f"rank_{rank}.json"


def remove_stale_partials(ckpt_dir: Path) -> list[str]:
    """Remove the `.partial` folders a crashed or failed save (or conversion) left; the names removed. Only for a
    process that holds the run folder's lock (engine/run_folder.agree_on_lock): a live run's save in progress is a
    `.partial` folder too. Called at each start before anything is written, so that a save that filled the disk does
    not leave the next start without room to write its first file."""
    removed = []
    if ckpt_dir.is_dir():
        for path in sorted(ckpt_dir.iterdir()):
            if path.name.endswith(PARTIAL):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
    return removed


SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT)


def errno_chain(exc: BaseException | None) -> list[int]:
    """The errno of `exc` and of every exception it was raised from or during."""
    found, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            found.append(exc.errno)
        exc = exc.__cause__ or exc.__context__
    return found


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def out_of_space(ckpt_dir: Path, partial: Path, exc: BaseException, keep_last: int) -> str | None:
    """Why a save failed, where the file system is out of room: ENOSPC or EDQUOT in the error's chain, or less free
    space than the last complete checkpoint takes (torch's writer reports a full disk as "[enforce fail at
    inline_container.cc] unexpected pos", with no errno). None: not a matter of space, the error stands as it is."""
    try:
        free = shutil.disk_usage(ckpt_dir).free
    except OSError:
        free = None
    tags = complete_tags(ckpt_dir)
    last = (tags[-1], folder_bytes(ckpt_dir / tags[-1])) if tags else None
    space_errno = any(code in SPACE_ERRORS for code in errno_chain(exc))
    if not space_errno and (free is None or last is None or free >= last[1]):
        return None
    what = " ".join(str(exc).split()) or type(exc).__name__
    size = (f"the last complete checkpoint ({last[0]}) takes {last[1]} bytes" if last
            else "no complete checkpoint yet to size the next one by")
    room = f"{free} bytes free" if free is not None else "its free space could not be read"
    keep = (f"; checkpoint.keep_last={keep_last} needs room for {keep_last + 1} checkpoints (the oldest is removed "
            "only once the new one is complete)" if keep_last else "")
    return (f"saving {partial} failed for want of space ({what}): the file system of {ckpt_dir} has {room}, {size}"
            f"{keep}. Free space there (or lower checkpoint.keep_last, or move the run folder to a larger file "
            f"system), then run the same command again: it removes {partial.name} and resumes from the last "
            "complete checkpoint")


def universal_folder(ckpt_dir: Path, tag: str) -> Path:
    return ckpt_dir / f"{tag}{UNIVERSAL}"
