"""What a job (pretraining, fine-tuning) must give the shared training loop, written down once.

The loop (engine/loop.py) owns everything jobs share: the DeepSpeed step, resume, non-finite steps, signals,
logging, MFU and checkpoints. A job owns its model's step loss, its training batches, its share of the saved
state and what happens between steps (evaluations, pictures). The methods with a body are optional hooks: a
job subclasses `Job` to inherit them, or implements them itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from mixmae_scale.config.derive import Derived
    from mixmae_scale.data.loader import Batch, ShardLoader


class RunPlace(Protocol):
    """What a job reads of the run's context (engine/loop.py's RunContext)."""

    rank: int
    world: int


class Loop(Protocol):
    """What a job may use of the loop that runs it (engine/loop.py's TrainingLoop): the DeepSpeed engine, its
    device and precision, this rank, the steps done, the loader, and a checkpoint of its own (a job's `best/`)."""

    engine: Any
    device: torch.device
    derived: Derived
    ctx: RunPlace
    step: int
    loader: ShardLoader

    def save(self, at_step: int, directory: Path | None = None, keep: int | None = None) -> Path:
        """Collective: a checkpoint of the run as it stands; rotation in `directory` keeps `keep` tags (0: all)."""
        ...


class Job(Protocol):
    # What the run is ("pretrain", "finetune", "segment"): run.json's "job", the command that ran, not the profile.
    kind: str
    # Micro-batches of this rank's share of the training data; its position is saved with each checkpoint.
    loader: ShardLoader
    # Training FLOPs of one image (forward and backward) for MFU; None where they are not counted.
    flops_per_image: float | None
    # Blocks compiled on first use: the first step's time then includes compiling, and the log says so.
    compiled_blocks: int
    # Where the weights the model started from came from (fine-tuning's `finetune.init`, segmentation's
    # `segment.init`: the path, and for a run folder the checkpoint and step gathered): run.json's "init". None for
    # pretraining, and for a resume, which reads no such weights (the record keeps its first launch's).
    started_from: dict[str, Any] | None = None

    def loss(self, loop: Loop, batch: Batch, step: int, micro: int) -> torch.Tensor:
        """The loss of one micro-batch, not yet backpropagated (the loop checks it is finite first)."""
        ...

    def on_start(self, loop: Loop) -> None:
        """After set-up and resume, before the first step (every rank)."""

    def after_step(self, loop: Loop, step: int, last: bool) -> None:
        """After each applied optimizer step, once it is logged (every rank): evaluation, pictures."""

    def after_checkpoint(self, loop: Loop, step: int) -> None:
        """After each checkpoint the loop saves in the run's checkpoints/ (every rank): what a resume may now start
        from has moved on, so a job's own checkpoints older than it may go (fine-tuning's best/)."""

    def summary(self, loop: Loop) -> dict[str, Any]:
        """Collective, after the last step (or a stop): the job's entries of the run's summary (pretraining's final
        held-out loss). They are measured before the run's records close, so run.json and W&B hold them too."""
        return {}

    def state(self) -> dict[str, Any]:
        """The job's part of the checkpoint's client state (the same on every rank)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """On resume: the state `state()` returned when the checkpoint was saved."""

    def close(self) -> None:
        """After the run, or its failure: the loaders' reading threads end (a sweep's worker goes on to its next
        run in the same process)."""
        self.loader.close()

    def truncate_logs(self, step: int) -> None:
        """Rank 0, on resume or a fresh start: drop the job's own log lines written after `step`, so that its
        logs keep one line per step through crashes."""
