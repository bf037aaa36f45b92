"""What a run does when a step goes non-finite.

A non-finite loss is never backpropagated (its micro-batch is dropped, its graph freed at once); a step whose
gradients turn out non-finite is not applied by DeepSpeed (ZeRO 1-3 check the gradient norm; ZeRO-0 runs our
`FiniteStepAdamW`, engine/optimizer.py) and is counted and redone with the next data instead of being
counted as done. After `faults.nonfinite_skip_limit` such attempts in a row the run stops with a checkpoint
under a new tag (`step...-nonfinite`, never over a complete one) whose marker records where the data stood
after the failed attempts; how the next launch resumes past them is engine/checkpointing/resume.py's.
"""

from __future__ import annotations

from dataclasses import dataclass


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

    def step_not_applied(self, fp16: bool, at_minimum_scale: bool = False) -> None:
        """fp16 skips are the loss scaler's search and do not count, until the scale is at its minimum."""
        if fp16 and not at_minimum_scale:
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
