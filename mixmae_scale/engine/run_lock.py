"""One run at a time in a run folder: an advisory lock on `<run>/.lock`, held by rank 0 for the run's life.

A job submitted twice (a requeue racing a manual resubmission, two sweeps naming one run) would otherwise resume
from the same tag in both, save into the same step folders, remove each other's partial saves and interleave
`metrics.csv`. Rank 0 takes `flock(LOCK_EX | LOCK_NB)` before anything in the folder is read for the plan, moved
or written (engine/loop.py `start_run`); a second start is refused in one line naming the holder (host, pid,
Slurm job, since when), which the lock file records.

The kernel drops a flock when the last descriptor of its open file goes, so a killed or crashed run frees the
folder by itself: no stale lock to clean up. A run that ends in order releases it (engine/runtime.py, after the
work: the next run of an in-process sweep may use the same folder) and removes the file, so a finished run's
folder holds what it did before. A taker checks that the file it locked is still the one at the path, so a
removal racing a take cannot leave two holders.

flock is local to a host on file systems that do not pass it on: NFS mounted with `local_lock=all`/`nolock`
makes it a no-op across hosts, and Lustre honours it across hosts only when mounted with `-o flock`. So two
jobs on one host are always stopped, two on different hosts only where the file system supports flock. A file
system that refuses flock outright (ENOLCK, EOPNOTSUPP) gets a warning and no lock, rather than no training.

A sweep's folder is held the same way under another name (`take(out, SWEEP_LOCK, ...)`, scaling/run.py): two
`mixmae scaling run` on one --out would both start its pending runs.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from mixmae_scale.engine.checkpointing.store import ResumeError

LOCK = ".lock"
TAKE_TRIES = 5  # a file removed or replaced between our open and our lock: open the path again
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)

log = logging.getLogger("mixmae.run_lock")


class RunFolderInUse(ResumeError):
    """Another live run holds the folder; a refused input (exit 2): the same start fails while that run lives."""


@dataclass
class RunLock:
    """A taken lock: the descriptor keeps it for as long as it is open."""

    root: Path
    fd: int
    created: bool  # the folder did not exist before the take: removed again at release if the run left it empty
    name: str = LOCK

    @property
    def path(self) -> Path:
        return self.root / self.name

    def release(self) -> None:
        """Remove the file, then unlock: LOCK_UN rather than close alone, since forked children (data workers)
        share the open file and would keep the lock until they exit."""
        _held.pop(_key(self.root, self.name), None)
        with suppress(OSError):
            self.path.unlink(missing_ok=True)
        with suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        with suppress(OSError):
            os.close(self.fd)
        if self.created:
            with suppress(OSError):  # only an empty folder goes: a refused start into a new one leaves nothing
                self.root.rmdir()


_held: dict[str, RunLock] = {}  # this process's locks, by file: released when the work ends (release_all)


def _key(root: Path, name: str = LOCK) -> str:
    return os.path.abspath(root if name == LOCK else Path(root) / name)  # a run folder's lock: by its folder


def holder_record() -> dict[str, str | int | None]:
    """Who holds the lock, as a second start names it."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID") or None,
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def describe_holder(text: str) -> str:
    """'host H, pid P, job J, since T' from the lock file's record; what is known of it if it is not readable
    (the holder took the lock and has not written yet, or a file from another version)."""
    try:
        record = json.loads(text)
        host, pid, job, since = (record[k] for k in ("host", "pid", "job", "since"))
    except (ValueError, TypeError, KeyError):
        return "holder not recorded yet"
    return f"host {host}, pid {pid}, {f'job {job}' if job else 'no Slurm job'}, since {since}"


def in_use(root: Path, holder: str) -> str:
    """The refusal. Where the holder's Slurm job is this process's own, the holder is this job before a requeue
    (Slurm keeps the job id): after a node crash the file system (NFS above all) can keep the dead node's lock
    until its lease or lock recovery ends, and "another run" would send the user looking for one that is not
    there."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and f", job {job}, " in f", {holder}":
        return (f"{root} is held by an earlier incarnation of this same job {job} ({holder}), most likely from before "
                "a requeue after its node failed, whose lock the file system still keeps: check that no process of "
                f"it is left (`squeue -j {job} -s`, that host's pid), then remove {root / LOCK} and requeue the job "
                f"(`scontrol requeue {job}`), or wait until the file system drops the lock (NFSv4: its lease time, "
                "about 90 s) and requeue")
    return (f"{root} is in use by another run ({holder}); two runs in one folder would save over and remove each "
            "other's checkpoints: wait for that run to end (or stop it), or start this one in a new --run-dir")


def take(root: Path, name: str = LOCK, refusal: Callable[[Path, str], str] = in_use) -> RunLock | None:
    """Lock `root/name` (creating the folder if needed) and record this process in it; RunFolderInUse, worded by
    `refusal(root, holder)`, if another process holds it. None (with a warning) where the file system refuses flock.
    This process's own lock on the same folder is refused too: a run holds its folder alone."""
    root = Path(root)
    for _ in range(TAKE_TRIES):
        created = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(root / name, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides, as for a run's files
        except FileNotFoundError:  # the folder went between mkdir and open (a releasing run removed it empty)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            text = _read(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderInUse(refusal(root, describe_holder(text))) from None
            if exc.errno in UNSUPPORTED:
                log.warning("%s cannot be locked on this file system (%s): a second run started in it would not be "
                            "stopped", root / name, os.strerror(exc.errno))
                return None
            raise
        if not _still_at_path(fd, root / name):  # removed (a release) or replaced between our open and our lock
            os.close(fd)
            continue
        lock = RunLock(root, fd, created, name)
        try:
            data = json.dumps(holder_record()).encode() + b"\n"
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError as exc:
            # A full disk: the lock holds without its record (a second start reads "holder not recorded yet"), so
            # that the start can clear what a save that filled the disk left (run_folder.agree_on_lock).
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                lock.release()
                raise
        _held[_key(root, name)] = lock
        return lock
    raise OSError(f"{root / name} kept changing while it was being locked")


def moved(root: Path, target: Path) -> None:
    """The folder this process holds was renamed to `target` (--overwrite): hold the new, empty `root` instead and
    let the moved run's folder go without its lock file. A run that takes `root` in between refuses this one."""
    old = _held.pop(_key(root), None)
    if old is None:  # not locked by this process (a file system without flock): nothing to carry over
        return
    try:
        take(root)
    finally:
        RunLock(target, old.fd, created=False).release()


def holds(root: Path) -> bool:
    """Whether this process holds `root`'s lock: where it does, no other launch in the folder is alive (run.json
    marks a launch still "running" there as ended, engine/run_record.py); unlocked (a file system without flock),
    nothing says so."""
    return _key(root) in _held


def release_all() -> None:
    """Every run folder this process holds: its work has ended."""
    for lock in list(_held.values()):
        lock.release()


def _still_at_path(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace")
    except OSError:
        return ""
