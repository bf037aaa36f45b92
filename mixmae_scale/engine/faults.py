"""What a run does when a step goes non-finite, and which checkpoint a run can trust when it resumes.

Within a run (`NonFiniteGuard`): a non-finite loss is never backpropagated (its micro-batch is dropped,
its graph freed at once); a step whose gradients turn out non-finite is not applied by DeepSpeed (ZeRO 1-3
check the gradient norm; ZeRO-0 runs our `FiniteStepAdamW`, engine/optimizer.py) and is counted and
redone with the next data instead of being counted as done. After `faults.nonfinite_skip_limit` such
attempts in a row the run stops with a checkpoint under a new tag (`step...-nonfinite`, never over a
complete one) whose marker records where the data stood after the failed attempts.

On resume (`pick_checkpoint`): the newest complete checkpoint whose files are all there at their written
sizes, falling back past damaged ones with a warning; after a non-finite stop, `faults.on_nonfinite_stop`
decides: "rollback" (the default) loads the newest regular checkpoint before the stop and moves the data
past everything read since it, as PaLM and OPT recovered from divergence (going back to good weights and
skipping the batches that led to the failure); "skip" keeps the stop's weights and skips only the failed
attempts; "replay" re-reads them. The samples skipped are logged and reported in summary.json.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixmae_scale.engine import checkpoint as ckpt

log = logging.getLogger("mixmae.faults")


class NonFiniteStop(RuntimeError):
    """Too many non-finite attempts in a row; the run saved a checkpoint and stops."""


@dataclass
class NonFiniteGuard:
    limit: int
    losses: int = 0  # micro-batches whose loss was non-finite (dropped before the backward)
    gradients: int = 0  # steps whose gradients were non-finite (not applied)
    loss_scale_skips: int = 0  # fp16 steps the dynamic loss scaler skipped (normal at start and after a scale rise)
    in_a_row: int = 0

    def loss_skipped(self) -> None:
        self.losses += 1
        self.in_a_row += 1

    def step_not_applied(self, fp16: bool) -> None:
        if fp16:
            self.loss_scale_skips += 1
            return
        self.gradients += 1
        self.in_a_row += 1

    def succeeded(self) -> None:
        self.in_a_row = 0

    @property
    def exhausted(self) -> bool:
        return self.in_a_row > self.limit

    def summary(self) -> dict[str, int]:
        return {"skipped_nonfinite": self.losses + self.gradients, "skipped_nonfinite_losses": self.losses,
                "skipped_nonfinite_gradients": self.gradients, "fp16_loss_scale_skips": self.loss_scale_skips}


@dataclass
class ResumeChoice:
    tag: str
    loader_override: dict[str, Any] | None = None  # where the data resumes when it is not the tag's own position
    skipped_samples: int = 0
    notes: list[str] = field(default_factory=list)


def stop_record(loader_state: dict[str, Any], step: int) -> dict[str, Any]:
    """What a non-finite stop writes into its marker: where the data stood after the failed attempts."""
    return {"nonfinite_stop": {"step": step, "loader_after": {k: v for k, v in loader_state.items() if k != "dali"}}}


def _batches(state: dict[str, Any]) -> int:
    return int(state.get("batches_consumed", 0))


def _samples_between(before: dict[str, Any], after: dict[str, Any]) -> int:
    layout = after.get("layout", {})
    return max(_batches(after) - _batches(before), 0) * int(layout.get("micro", 0)) * int(layout.get("world", 0))


def pick_checkpoint(ckpt_dir: Path, resume: str, policy: str) -> ResumeChoice | None:
    """Rank 0's choice (engine/elastic.py broadcasts it). `resume`: auto | none | a tag or tag path."""
    if resume == "none":
        return None
    tags = ckpt.complete_tags(ckpt_dir)
    if resume != "auto":
        tag = Path(resume).name
        if tag not in tags:
            raise ckpt.ResumeError(f"checkpoint.resume={resume!r}: {(ckpt_dir / tag).resolve()} is not a complete "
                                   f"checkpoint (complete ones: {', '.join(tags) or 'none'})")
        problem = ckpt.damage(ckpt_dir / tag)
        if problem:
            raise ckpt.ResumeError(f"checkpoint.resume={resume!r}: {(ckpt_dir / tag).resolve()} is damaged: {problem}")
        return ResumeChoice(tag)
    notes, valid = [], []
    for tag in reversed(tags):
        problem = ckpt.damage(ckpt_dir / tag)
        if problem:
            notes.append(f"checkpoint {(ckpt_dir / tag).resolve()} is damaged ({problem}): falling back to an earlier "
                         "one")
        else:
            valid.append(tag)
    if not valid:
        if notes:
            raise ckpt.ResumeError(f"every checkpoint in {ckpt_dir.resolve()} is damaged: {'; '.join(notes)}; move "
                                   "them aside (or set checkpoint.resume=none) to start over")
        return None
    newest = valid[0]
    record = ckpt.marker(ckpt_dir, newest).get("nonfinite_stop")
    if record is None or policy == "replay":
        if record is not None:
            notes.append(f"{newest} was saved by a non-finite stop: replaying its step from the start "
                         "(faults.on_nonfinite_stop=replay)")
        return ResumeChoice(newest, notes=notes)
    after = record["loader_after"]
    target = newest
    if policy == "rollback":
        earlier = [t for t in valid[1:] if ckpt.is_regular(t) and ckpt.step_of(t) <= record["step"]]
        target = earlier[0] if earlier else newest
    before = ckpt.read_rank_state(ckpt_dir, target, 0)["loader"]
    skipped = _samples_between(before, after)
    how = (f"rolling back to {target} (step {ckpt.step_of(target)})" if target != newest
           else "resuming from its weights (no earlier checkpoint to roll back to)" if policy == "rollback"
           else "resuming from its weights")
    notes.append(f"{newest} was saved by a non-finite stop at step {record['step']}: {how} and skipping the "
                 f"{skipped} samples read since, so the batches that led to the failure are not read again "
                 f"(faults.on_nonfinite_stop={policy})")
    return ResumeChoice(target, after, skipped, notes)
