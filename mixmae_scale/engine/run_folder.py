"""A run folder holds one run: what may start in it, and how `--overwrite` moves an earlier run aside.

Two runs in one folder would mix: the second's checkpoints would be rotated away by the first run's
higher-numbered ones, `config.yaml` and `summary.json` overwritten and `metrics.csv` would hold both. So a
start is refused when the folder holds another run (checkpoints of another model, or `checkpoint.resume=none`
over checkpoints, or a finished run with no checkpoint to resume), with the two safe ways out: a new
`--run-dir`, or `--overwrite`, which renames the whole folder to `<run>.old-<n>` (one atomic rename; nothing
is deleted) and starts the new run in an empty one. The run the folder holds may always resume.

Rank 0 decides and acts; every rank gets the same outcome (`agree_on_run_folder`), so no rank starts alone. Before
any of it, rank 0 takes the folder's lock (`agree_on_lock`, engine/run_lock.py): a second live run is refused; and
every rank must see the folder rank 0 sees (`agree_on_shared_folder`).
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import yaml

from mixmae_scale.atomic_file import fsync_path, write_text
from mixmae_scale.config.derive import BatchSplitError
from mixmae_scale.config.load import ConfigError
from mixmae_scale.data.errors import plural
from mixmae_scale.engine import run_lock
from mixmae_scale.engine.checkpointing import store

ASIDE = ".old-"  # <run>.old-<n>: where --overwrite moves an earlier run
BRANCH = "branched-from.json"  # in checkpoints/: the tag a named resume last went on from (`continuation`)
SHOWN_KEYS = 4  # differing keys named in one refusal line; the rest are counted
PROBE = ".shared-probe-"  # <run>/.shared-probe-<token>: written by rank 0 at start, read by every rank, removed


def aside_path(root: Path) -> Path:
    """The first free `<run>.old-<n>` next to the run folder."""
    number = 1
    while root.with_name(f"{root.name}{ASIDE}{number}").exists():
        number += 1
    return root.with_name(f"{root.name}{ASIDE}{number}")


def way_out(root: Path) -> str:
    return (f"start it in a new --run-dir (run.name with `mixmae launch`), or add --overwrite to move the earlier run "
            f"to {aside_path(root)} first")


def unsplittable_resume(root: Path, error: BatchSplitError, overwrite: bool) -> ConfigError:
    """The refusal of a world size that cannot split the global batch, for this run folder. A folder whose newest
    checkpoint was trained at that global batch is resumed, not started: `error`'s way out (another global batch)
    would only meet the next refusal (resume.py: the step counter and the schedule count batches of it), so the
    GPU counts that take it are named instead. Anything else (no checkpoint, `--overwrite`, a checkpoint at another
    global batch, which resume.py names on its own) keeps `error` as it is."""
    ckpt_dir = root / "checkpoints"
    tags = [] if overwrite else store.complete_tags(ckpt_dir)
    if not tags:
        return error
    from mixmae_scale.engine.checkpointing.state import RankState

    try:
        saved = RankState.read(ckpt_dir, tags[-1], 0).identity.global_batch
    except (OSError, ValueError, KeyError):
        return error
    if saved != error.global_batch:
        return error
    gpus = f"resume it on {error.gpus} GPU{'s' * (error.gpus != '1')}" if error.gpus else "no GPU count takes it"
    return ConfigError(
        f"{(ckpt_dir / tags[-1]).resolve()} was trained at batch.global_batch={saved}, which "
        f"{plural(error.world, 'GPU')} cannot split (each GPU needs an even number of images: MixMAE pairs them): "
        f"{gpus}, where the step counter and the learning-rate schedule go on in batches of {saved}; another global "
        "batch is another run: "
        f"{way_out(root)}")


def holds_files(root: Path) -> bool:
    """Anything but the lock file this start has just taken (a new folder holds that alone)."""
    return root.is_dir() and any(path.name != run_lock.LOCK for path in root.iterdir())


JOB_WORDS = {"pretrain": "pretraining", "finetune": "fine-tuning", "segment": "segmentation"}  # run.json's "job"


def recorded_job(root: Path) -> str | None:
    """The job of the run the folder holds, as its run.json (engine/run_record.py) says it; None without one. A
    record written before d1f7f66 said "pretrain" for a segmentation run, and it stays so until the run's next start:
    the folder's config.yaml naming segment.init (which every segmentation needs, and no pretraining sets) tells that
    run apart, so that it resumes instead of being refused as a pretraining."""
    try:
        job = json.loads((root / "run.json").read_text()).get("job")
    except (OSError, ValueError, AttributeError):
        return None
    if job == "pretrain":
        try:
            segment = (yaml.safe_load((root / "config.yaml").read_text()) or {}).get("segment") or {}
        except (OSError, yaml.YAMLError, AttributeError):
            segment = {}
        if isinstance(segment, dict) and segment.get("init"):
            return "segment"
    return job if isinstance(job, str) else None


def refusal(root: Path, resume: str, overwrite: bool, job: str | None = None) -> str | None:
    """Why this start may not go ahead in `root` (before any checkpoint is read), or None. `job`: this start's
    ("pretrain", "finetune", "segment"); a folder holding another job's run is refused as that. The model digest reads
    the encoder's shape alone, the same for a pretraining and a fine-tuning of one size, so a fine-tuning in a
    pretraining run's folder met the refusals of a resume (another global batch, other weights) whose advice led to
    resuming the pretraining as a fine-tuning."""
    if overwrite:
        if resume not in ("auto", "none"):
            return (f"--overwrite starts a new run in {root}, checkpoint.resume={resume} resumes one of its "
                    "checkpoints: drop one of the two")
        return None
    tags = store.complete_tags(root / "checkpoints")
    theirs = recorded_job(root) if job is not None else None
    if theirs is not None and theirs != job and (tags or resume != "none"):
        # Without checkpoints (that run stopped before its first) there is nothing to go on from: its files are hit.
        newest, would = ((f", newest checkpoint {tags[-1]}", "go on from that run's checkpoints") if tags else
                         (", no checkpoint yet", "write over that run's files"))
        mine = JOB_WORDS.get(job, job)
        return (f"{root} holds a {JOB_WORDS.get(theirs, theirs)} run (run.json: job {theirs}{newest}), not a {mine}: "
                f"a {mine} started there would {would}; {way_out(root)}")
    if resume == "none" and tags:
        return (f"{root} holds checkpoints of an earlier run (newest {tags[-1]}); checkpoint.resume=none would start "
                f"another run over them: {way_out(root)}")
    if not tags and (root / "summary.json").exists():
        unsealed = store.unsealed_tags(root / "checkpoints")
        why = f" ({store.unsealed_note(root / 'checkpoints', unsealed)})" if unsealed else ""
        return (f"{root} holds a finished run (summary.json) with no checkpoint to resume{why}: starting again there "
                f"would overwrite it; {way_out(root)}")
    return None


def resumes(root: Path, resume: str, overwrite: bool) -> bool:
    """Whether a start in `root` goes on from a checkpoint of its own, told before any process group from what the
    plan (checkpointing/resume.py) decides from: `--overwrite` moves the folder's run aside and
    `checkpoint.resume=none` starts over (or is refused over checkpoints, `refusal`); otherwise a folder with a
    complete checkpoint resumes one, or is refused (every one damaged, a tag it does not hold). A resuming job needs
    nothing of the weights it started from (`finetune.init`, `segment.init`): its checkpoint holds every weight, so a
    killed fine-tuning whose init file has gone since resumes all the same."""
    return not overwrite and resume != "none" and bool(store.complete_tags(root / "checkpoints"))


def move_aside(root: Path) -> Path:
    """Rename the run folder to `<run>.old-<n>` (atomic, flushed) and point its summary at the moved checkpoint."""
    target = aside_path(root)
    root.rename(target)
    fsync_path(target.parent)
    summary = target / "summary.json"
    if summary.exists():
        record = json.loads(summary.read_text())
        named = record.get("checkpoint")
        if named and Path(named).is_relative_to(root):
            record["checkpoint"] = str(target / Path(named).relative_to(root))
            write_text(summary, json.dumps(record, indent=2))
    return target


def newer_than(tags: list[str], tag: str) -> list[str]:
    """The complete tags after `tag` in the run's order (`complete_tags` sorts them: by step, then kind)."""
    return tags[tags.index(tag) + 1:] if tag in tags else []


def continuation(root: Path, resume: str) -> tuple[str, str | None]:
    """The resume setting this start acts on, and a note. `checkpoint.resume=<tag>` branches the run once: the same
    command again (a preempted job resubmitted as it was) goes on with the branch, from its newest checkpoint, rather
    than moving the branch's own checkpoints aside and starting from the tag once more."""
    ckpt_dir, tag = root / "checkpoints", Path(resume).name
    if resume in ("auto", "none") or store.names_another_folder(ckpt_dir, resume) or not store.is_tag_name(tag):
        return resume, None  # the plan refuses the last two
    try:
        branched = json.loads((ckpt_dir / BRANCH).read_text()).get("from")
    except (OSError, json.JSONDecodeError, AttributeError):
        branched = None
    # The branch point itself may be gone (rotation keeps only the newest checkpoints of the branch).
    newer = [t for t in store.complete_tags(ckpt_dir) if store.tag_order(t) > store.tag_order(tag)]
    if branched != tag or not newer:
        return resume, None
    return "auto", (f"checkpoint.resume={resume}: this run already went on from {tag} ({', '.join(newer)} since), so "
                    f"it resumes from {newer[-1]}; to start from {tag} once more, move those out of {ckpt_dir}")


def set_aside_newer(root: Path, resume: str) -> str | None:
    """A resume from an explicit earlier tag trains another continuation of the run: the checkpoints after it
    would otherwise stay the newest (an automatic resume would pick them) and keep their step numbers from being
    written. They move, whole, to `<run>/superseded-<n>/`; `checkpoints/branched-from.json` records the tag, so
    that the same command run again continues this branch (`continuation`). Called once the plan is made: a start
    refused for the tag itself (damaged, another model) moves nothing."""
    if resume in ("auto", "none"):
        return None
    ckpt_dir, tag = root / "checkpoints", Path(resume).name
    newer = newer_than(store.complete_tags(ckpt_dir), tag)
    if not newer:
        write_text(ckpt_dir / BRANCH, json.dumps({"from": tag}))
        return None
    number = 1
    while (root / f"superseded-{number}").exists():
        number += 1
    target = root / f"superseded-{number}"
    target.mkdir()
    for path in sorted(ckpt_dir.iterdir()):
        if path.name.split(store.UNIVERSAL)[0] in newer:
            path.rename(target / path.name)
    fsync_path(target)
    fsync_path(ckpt_dir)
    write_text(ckpt_dir / BRANCH, json.dumps({"from": tag}))  # after the move: a crash between left no record
    return (f"checkpoint.resume={resume}: the later checkpoints ({', '.join(newer)}) belong to the run's earlier "
            f"continuation and were moved to {target}")


def prepare(root: Path, resume: str, overwrite: bool, job: str | None = None) -> str | None:
    """Rank 0: refuse (ResumeError) or move an earlier run aside; returns what to tell the user, if anything. `job`:
    this start's (`refusal`)."""
    problem = refusal(root, resume, overwrite, job)
    if problem:
        raise store.ResumeError(problem)
    if overwrite and holds_files(root):
        try:
            target = move_aside(root)
        except OSError as exc:
            raise store.ResumeError(f"--overwrite could not move {root} aside ({exc}); move it yourself or start in a "
                                   "new --run-dir") from None
        run_lock.moved(root, target)  # the lock went with the old run: this one holds the new folder
        return f"--overwrite: the earlier run in {root} was moved to {target}; this run starts in an empty {root}"
    return None


def agree_on_lock(root: Path) -> list[str]:
    """Collective, before anything in the folder is read, moved or written: rank 0 takes the folder's lock (kept
    until the work ends, engine/runtime.py); a folder another run holds is refused on every rank. Holding it, rank 0
    removes the `.partial` folders crashed or failed saves left (store.remove_stale_partials): a save that filled
    the disk would otherwise leave this start no room for its first file. Never without the lock: a live run's save
    in progress is a `.partial` folder too (a file system without flock keeps them, the next save removes them).
    Returns the notes to log."""
    def decide() -> list[str]:
        lock = run_lock.take(root)
        removed = store.remove_stale_partials(root / "checkpoints") if lock is not None else []
        return [f"removed what failed or interrupted saves left in {root / 'checkpoints'}: {', '.join(removed)}"
                ] if removed else []

    return _agreed(decide)


def agree_on_shared_folder(root: Path) -> None:
    """Collective, after the lock: every rank reads a file rank 0 has just written in the run folder, so that a folder
    on node-local scratch is refused at the start rather than at the first checkpoint, after hours of training (each
    save checks the same: store.unshared). The file has a new name each time: no node's cache holds an answer for it
    (NFS keeps a lookup's "no such file" for a while)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1:
        return
    probe = [f"{PROBE}{uuid.uuid4().hex}" if rank == 0 else None]
    if rank == 0:
        for old in root.glob(f"{PROBE}*"):  # a crashed start's
            old.unlink(missing_ok=True)
        write_text(root / probe[0], probe[0])
    dist.broadcast_object_list(probe, src=0)
    try:
        seen = (root / probe[0]).read_text() == probe[0]
    except OSError:
        seen = False
    views: list[Any] = [None] * world
    dist.all_gather_object(views, (socket.gethostname(), seen))
    if rank == 0:
        (root / probe[0]).unlink(missing_ok=True)
    problem = unseen_probe(root, views)
    if problem:
        raise store.UnsharedRunFolder(problem)


def unseen_probe(root: Path, views: list[tuple[str, bool]]) -> str | None:
    """The refusal for the ranks (`views`: each one's host and whether it read rank 0's file) that did not see it."""
    unseen: dict[str, list[int]] = {}
    for rank, (host, seen) in enumerate(views):
        if not seen:
            unseen.setdefault(host, []).append(rank)
    if not unseen:
        return None
    who = "; ".join(f"{'rank' if len(ranks) == 1 else 'ranks'} {store.ranges(ranks)} on {host}"
                    for host, ranks in unseen.items())
    one = sum(len(ranks) for ranks in unseen.values()) == 1
    return store.UNSHARED.format(what=f"{who} {'does' if one else 'do'} not see the file rank 0 on "
                                      f"{views[0][0]} wrote in {root.absolute()}")


def agree_on_run_folder(root: Path, resume: str, overwrite: bool, job: str | None = None) -> tuple[str, list[str]]:
    """Collective: rank 0 prepares the folder and reads which continuation this start is; every rank gets the resume
    setting to plan with and the notes, or raises the same error. `job`: this start's (`refusal`)."""
    def decide() -> tuple[str, list[str]]:
        moved = prepare(root, resume, overwrite, job)
        acting, note = continuation(root, resume)
        return acting, [n for n in (moved, note) if n]

    return _agreed(decide)


COMPLETE_KEY = "complete_under_plan"  # in summary.json: the last step of a later start's plan it found reached


def note_complete(root: Path, step: int, last_step: int) -> None:
    """A start found the run complete (its newest checkpoint at `step`, the current plan ending at `last_step`)
    where summary.json still says a signal stopped it before its planned steps: a schedule shortened after the
    stop. Without a note the Slurm requeue check (cluster/requeue.py), which reads only summary.json, would
    requeue the job again on every such start, up to MIXMAE_MAX_REQUEUES. The note is one key added; the stop's
    own keys stay as they were, and the file is replaced atomically. Rank 0 only."""
    path = root / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # no summary (or not one to read): the requeue check does not requeue either
    planned = summary.get("planned_steps")
    if not summary.get("stopped_by_signal") or not isinstance(planned, int) or summary.get("steps", planned) >= planned:
        return  # a finished run's record: nothing to add
    summary[COMPLETE_KEY] = {"step": step, "planned_steps": last_step}
    write_text(path, json.dumps(summary, indent=2, default=str))


def agree_on_branch(root: Path, resume: str) -> str | None:
    """Collective, after the plan: rank 0 sets aside what a named resume supersedes (`set_aside_newer`)."""
    return _agreed(lambda: set_aside_newer(root, resume))


def _agreed(decide: Callable[[], Any]) -> Any:
    outcome: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = ("ok", decide())
        except store.ResumeError as exc:
            outcome[0] = ("error", str(exc))
        except OSError as exc:  # the other ranks wait in the broadcast: the same one-line end on every rank
            outcome[0] = ("error", f"the run folder could not be prepared: {exc}")
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0][0] == "error":
        raise store.ResumeError(outcome[0][1])
    return outcome[0][1]


def _shown(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def model_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`model.embed_dim 32 -> 16` for every model key whose value differs."""
    return [f"model.{key} {_shown(saved.get(key))} -> {_shown(value)}" for key, value in current.items()
            if _shown(saved.get(key)) != _shown(value)]


def saved_model_shape(root: Path, recorded: dict[str, Any] | None) -> dict[str, Any] | None:
    """The checkpoint's own record of its model keys; for checkpoints written before it was recorded, the run's
    config.yaml (written at each start of the run)."""
    if recorded:
        return recorded
    try:
        return yaml.safe_load((root / "config.yaml").read_text())["model"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None


def another_model(root: Path, tag: str, saved_shape: dict[str, Any] | None, saved_digest: str | None,
                  shape: dict[str, Any], digest: str) -> str:
    """The one-line refusal of a start whose model differs from the checkpoint's."""
    saved = saved_model_shape(root, saved_shape)
    keys = model_differences(saved, shape) if saved else []
    if keys:
        what = "; ".join(keys[:SHOWN_KEYS]) + (f"; {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")
    else:
        what = f"model digest {saved_digest} -> {digest}"
    return (f"{root} holds a run of another model ({what}), checkpoint {tag}; it cannot be resumed with this "
            f"configuration: {way_out(root)}")
