"""How a failed job says so: one line for a user's mistake, a traceback only for a bug, said once.

Every rank reads the same profile and the same paths, so a mistake in them fails every rank at once, and
each would print the same traceback. Two things keep the report to one readable line:

- the first rank on a node to fail claims a marker file (created with O_EXCL, so exactly one rank wins)
  and is the only one there to report; the others, and the ranks that stop only because a peer died, stay
  silent. The marker's name carries the launcher's process id and the rendezvous, so jobs do not share it;
- the report goes to the terminal in one write(), so that lines of two processes never run together;
- under a relay (`mixmae launch`, the sbatch script: cluster/signal_relay.py) the report is handed to the relay
  (MIXMAE_FAILURE_REPORT), which prints it once DeepSpeed's launcher has exited. The launcher answers any
  non-zero exit of a rank with "Killing subprocess ..." and "... exits with return code = 1" lines, whatever
  the exit code, so only printing after it makes the refusal the last thing the user sees.

A user's mistake is an exception whose message already says what to do (the USER_ERRORS below); any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from mixmae_scale.cluster.signal_relay import REPORT_ENV

MARKER_PREFIX = "mixmae-failed"

# DALI is an extra (one build per CUDA major version, see pyproject.toml), so a plain install lacks it.
NO_DALI = ("NVIDIA DALI, the default loader (data.loader=dali, --loader dali), is not installed: pip install "
           "'mixmae-scale[cuda12]' on a CUDA 12 driver or 'mixmae-scale[cuda13]' on CUDA 13 (nvidia-smi shows the "
           "driver's CUDA version), or use the PyTorch loader: --set data.loader=torch, or --loader torch")


def missing_dali(exc: BaseException) -> bool:
    """DALI's import failed: the extra is not installed (its wheels are `nvidia.dali`, under `nvidia`)."""
    name = getattr(exc, "name", None) or ""
    return isinstance(exc, ModuleNotFoundError) and (name == "nvidia" or name.startswith("nvidia.dali"))
STALE_S = 3600


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message names the file, key or option and the way out."""
    from mixmae_scale.config import ConfigError
    from mixmae_scale.data.manifest import DataError
    from mixmae_scale.engine.checkpointing.store import NoSpaceForCheckpoint, ResumeError
    from mixmae_scale.models.convert_official import WeightsError
    from mixmae_scale.shards.builder import PoolError
    from mixmae_scale.shards.sources import SourceError

    return (ConfigError, DataError, ResumeError, WeightsError, SourceError, FileNotFoundError, NoSpaceForCheckpoint,
            PoolError)


def is_user_mistake(exc: BaseException) -> bool:
    """Said in one line: the message names the file, key or option and the way out."""
    return isinstance(exc, user_errors()) or missing_dali(exc)


def is_refused_input(exc: BaseException) -> bool:
    """Exit code 2: the project refused the input, and the same command fails the same way again. A file not
    found is said in one line but exits 1, as a failure: mid-run, a shared file system's hiccup raises it too, and
    a resubmitting script should retry that; nor a resume's conversion killed by a signal (the checkpoint is fine),
    nor a save that found the disk full (the same command succeeds once there is room), nor a pool worker that
    died (killed for memory, most often: the work done is kept, and a rerun with fewer workers goes on)."""
    from mixmae_scale.engine.checkpointing.store import NoSpaceForCheckpoint
    from mixmae_scale.engine.checkpointing.universal import ConversionInterrupted
    from mixmae_scale.shards.builder import PoolError

    return is_user_mistake(exc) and not isinstance(exc, FileNotFoundError | ConversionInterrupted |
                                                    NoSpaceForCheckpoint | PoolError)


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def write_stderr(text: str) -> None:
    """One write() for the whole text: a pipe or terminal never interleaves it with another process's."""
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), text.encode(errors="replace"))


def deliver(text: str, alone: bool = False) -> None:
    """The report to the relay that started the launcher, if one did (see the module docstring), else to stderr."""
    path = os.environ.get(REPORT_ENV)
    if path and not alone:
        try:
            handle = os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600)
            try:
                os.write(handle, text.encode(errors="replace"))
            finally:
                os.close(handle)
            return
        except OSError:
            pass  # no relay to read it after all: said here
    write_stderr(text)


def _marker() -> Path:
    key = "-".join(str(part) for part in (os.getuid(), os.getppid(), os.environ.get("MASTER_ADDR", ""),
                                          os.environ.get("MASTER_PORT", "")))
    return Path(tempfile.gettempdir()) / f"{MARKER_PREFIX}-{key}"


def claim_report() -> bool:
    """True for the first failing rank of this job on this node: it reports, the others do not."""
    folder = Path(tempfile.gettempdir())
    now = time.time()
    for old in folder.glob(f"{MARKER_PREFIX}-{os.getuid()}-*"):
        try:
            if now - old.stat().st_mtime > STALE_S:
                old.unlink()
        except OSError:
            pass
    try:
        os.close(os.open(_marker(), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:  # no writable temp folder: better twice than never
        return True
    return True


def report_failure(rank: int, exc: BaseException, alone: bool = False) -> None:
    """The report of a rank that is about to exit because of `exc` (see the module docstring). `alone`: a
    world of one, started without a launcher, which has nobody to agree with."""
    mistake = is_user_mistake(exc)
    if mistake and rank and not alone:
        time.sleep(0.5)  # every rank usually makes the same mistake at once: rank 0 is the one expected to say it
    if not alone and not claim_report():
        return
    where = f" (rank {rank})" if rank else ""
    if mistake:
        deliver(f"mixmae: error{where}: {NO_DALI if missing_dali(exc) else one_line(exc)}\n", alone)
        return
    if is_peer_failure(exc):
        deliver(f"mixmae: rank {rank} stopped: another rank failed ({type(exc).__name__}: "
                f"{one_line(exc)[:300]})\n", alone)
        return
    text = f"mixmae: rank {rank} failed:\n" + "".join(traceback.format_exception(exc))
    if "out of memory" in str(exc).lower():
        text += ("mixmae: out of memory. Size the run with `mixmae plan PROFILE --gpus N --recommend`; lower "
                 "batch.micro (the global batch is kept by accumulation), turn on activation checkpointing "
                 "(model.checkpoint_every=1) or shard more (zero.stage=3)\n")
    deliver(text, alone)


def is_peer_failure(exc: BaseException) -> bool:
    """An error that only says another rank went away (its own report says why)."""
    import torch.distributed as dist

    kinds = tuple(k for k in (getattr(dist, "DistBackendError", None), getattr(dist, "DistNetworkError", None)) if k)
    text = str(exc)
    return isinstance(exc, kinds) or any(s in text for s in ("Connection closed by peer", "Connection reset by peer",
                                                             "NCCL communicator was aborted", "Broken pipe"))
