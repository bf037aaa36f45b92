"""What a checkpoint holds besides DeepSpeed's weights and optimizer, as types: the only code that knows the
keys of the client state, of each rank's file and of a non-finite stop's marker record.

Three records, because they live in three places and are read at three moments:
- `RunState`, DeepSpeed's client state (the same on every rank): the step, the job's own state, the samples
  skipped by earlier resumes. Read when DeepSpeed loads the tag.
- `RankState`, each rank's `rank_N.json`: its data position and generators, and the `RunIdentity` a resume
  must match (model, global batch, optimizer layout, the weights a fine-tuning started from). Rank 0's is read
  before anything is loaded, to plan.
- `StopRecord`, in a non-finite stop's marker: where the data stood after the failed attempts, so that the
  resume can skip past them without loading the stop's files first.

The keys are those earlier checkpoints were written with, so those resume unchanged; a key they lack reads as
its value at the time (the job's state at the top level, no identity fields).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixmae_scale.config.schema import RANDOM_INIT
from mixmae_scale.data.loader import LoaderPosition, ShardLoader
from mixmae_scale.engine.checkpointing import store
from mixmae_scale.engine.rng import rng_state

# ds_to_universal reads this from the client state to convert a checkpoint for another layout (universal.py).
UNIVERSAL_INFO = {"universal_checkpoint_version": 0.4}


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must share with the run resuming it: the model (its digest changes exactly when the
    tensors would not load), the global batch (the step counter and schedule count batches of it), the
    optimizer layout (a change goes through the universal checkpoint) and the weights the run started from
    (`init_sources`: a fine-tuning from other weights is another run, though its tensors would load). None: not
    recorded by an older run."""

    model_digest: str | None
    model_shape: dict[str, Any] | None
    global_batch: int | None
    optimizer_layout: dict[str, Any] | None
    init: dict[str, dict[str, Any]] | None = None

    @classmethod
    def of(cls, resolved, layout: dict[str, Any]) -> RunIdentity:
        """`resolved`: config.ResolvedConfig; `layout`: universal.optimizer_layout of the DeepSpeed config."""
        return cls(resolved.model_digest(), resolved.model_shape(), resolved.derived.global_batch, layout,
                   init_sources(resolved.config))


def init_sources(config) -> dict[str, dict[str, Any]]:
    """The weights a job starts from (`finetune.init`, `segment.init`), by key: the path, resolved, and for a file a
    digest of its content, so that the same file moved is the same start and other weights at the same path are
    not. A run folder is recorded by its path alone: the run it names may save newer checkpoints meanwhile, and a
    fine-tuning resumed after that is still the same run."""
    sources = {}
    for key, value in (("finetune.init", config.finetune.init), ("segment.init", config.segment.init)):
        if value:
            path = Path(value)
            if value == RANDOM_INIT:
                sources[key] = {"path": str(value)}
            elif not path.exists():  # gone since the run started: a resume reads nothing of it (`init_changes`)
                sources[key] = {"path": str(path.resolve()), "missing": True}
            elif path.is_dir():
                sources[key] = {"path": str(path.resolve())}
            else:
                sources[key] = {"path": str(path.resolve()), "digest": sampled_digest(path)}
    return sources


def sampled_digest(path: Path, samples: int = 16, chunk: int = 1 << 16) -> str:
    """sha256 of a file's size and of `samples` chunks spread over it (the whole of a file up to that size): read at
    every start on every rank, so it reads 1 MiB of a checkpoint of gigabytes. Weights trained further differ in
    every chunk of their tensors."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        if size <= samples * chunk:
            digest.update(handle.read())
        else:
            for index in range(samples):
                handle.seek(index * (size - chunk) // (samples - 1))
                digest.update(handle.read(chunk))
    return digest.hexdigest()[:16]


def init_changes(saved: dict[str, dict[str, Any]] | None, current: dict[str, dict[str, Any]] | None) -> list[str]:
    """Each start key whose weights differ, said for a refusal; none where either side was not recorded (a
    checkpoint written before the key was). A file gone from the path it was named by (now, or when the checkpoint
    was saved) is the same start: a resume reads its weights from the checkpoint, not from the file, and a killed
    fine-tuning whose init file was cleaned up since was refused, naming a "digest None"."""
    if saved is None or current is None:
        return []
    changes = []
    for key in sorted(saved.keys() | current.keys()):
        old, new = saved.get(key) or {}, current.get(key) or {}
        if old == new or (old.get("digest") and old.get("digest") == new.get("digest")):
            continue  # the same file, perhaps moved
        if (old.get("missing") or new.get("missing")) and old.get("path") == new.get("path"):
            continue  # the same path, its file gone: nothing named now would be ignored
        if old.get("path") and old.get("path") == new.get("path"):
            changes.append(f"{key}={new['path']} holds other weights than when the run started (digest "
                           f"{old.get('digest')} -> {new.get('digest')})")
        else:
            changes.append(f"{key} {old.get('path', 'unset')} -> {new.get('path', 'unset')}")
    return changes


@dataclass
class RunState:
    """DeepSpeed's client state: the same on every rank."""

    step: int
    job: dict[str, Any]
    model_digest: str | None
    world_size: int
    skipped_samples: int = 0  # by resumes after non-finite stops, over the run's life

    def to_client(self) -> dict[str, Any]:
        return {"step": self.step, "job": self.job, "model_digest": self.model_digest, "world_size": self.world_size,
                "skipped_samples": self.skipped_samples, "universal_checkpoint_info": dict(UNIVERSAL_INFO)}

    @classmethod
    def from_client(cls, client: dict[str, Any]) -> RunState:
        return cls(int(client["step"]), client.get("job", client), client.get("model_digest"),
                   int(client.get("world_size", 0)), int(client.get("skipped_samples", 0)))


@dataclass(frozen=True)
class RankPosition:
    """One rank's place in the run: the data position and every generator a step draws from."""

    loader: LoaderPosition
    rng: dict[str, Any] | str

    @classmethod
    def capture(cls, loader: ShardLoader, with_generators: bool = True) -> RankPosition:
        """Without DALI's generators it is cheap enough for every step's start (what a non-finite stop stores)."""
        return cls(loader.position(with_generators), rng_state())


@dataclass(frozen=True)
class RankState:
    """A rank's `rank_N.json`."""

    position: RankPosition
    identity: RunIdentity

    def to_dict(self) -> dict[str, Any]:
        identity = self.identity
        return {"loader": self.position.loader.to_dict(), "rng": self.position.rng,
                "model_digest": identity.model_digest, "model_shape": identity.model_shape,
                "optimizer_layout": identity.optimizer_layout, "global_batch": identity.global_batch,
                "init": identity.init}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> RankState:
        identity = RunIdentity(state.get("model_digest"), state.get("model_shape"), state.get("global_batch"),
                               state.get("optimizer_layout"), state.get("init"))
        return cls(RankPosition(LoaderPosition.from_dict(state["loader"]), state.get("rng", {})), identity)

    @classmethod
    def read(cls, ckpt_dir: Path, tag: str, rank: int) -> RankState:
        return cls.from_dict(json.loads(store.rank_file(ckpt_dir / tag, rank).read_text()))


@dataclass(frozen=True)
class StopRecord:
    """A non-finite stop's marker entry: the step it stopped at and where the data stood after the failed
    attempts (without DALI's generators: the resume restarts them or loads the tag's own)."""

    step: int
    loader_after: LoaderPosition

    def marker_extra(self) -> dict[str, Any]:
        return {"nonfinite_stop": {"step": self.step,
                                   "loader_after": self.loader_after.without_generators().to_dict()}}

    @classmethod
    def of_tag(cls, ckpt_dir: Path, tag: str) -> StopRecord | None:
        """The tag's record, or None for a checkpoint that no non-finite stop wrote."""
        record = store.marker(ckpt_dir, tag).get("nonfinite_stop")
        if record is None:
            return None
        return cls(int(record["step"]), LoaderPosition.from_dict(record["loader_after"]))
