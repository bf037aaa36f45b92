"""Faults on purpose, for tests: a NaN loss or NaN gradients on chosen micro-batches, an exception on one rank
after a chosen step (`faults.inject_*` in the profile). They wrap the job where it is built, so the training
loop has no test switches in its step and a run without them runs the job itself, unwrapped."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mixmae_scale.config.schema import FaultConfig

if TYPE_CHECKING:
    from mixmae_scale.data.loader import Batch
    from mixmae_scale.engine.job import Job, Loop


class _NaNGradients(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, value):  # noqa: D102
        return value.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad * float("nan")


def injected_loss(loss: torch.Tensor, batch_index: int, faults: FaultConfig) -> torch.Tensor:
    """`loss`, made NaN, or given NaN gradients, when the run's `batch_index`-th micro-batch is one of those
    named in `faults`."""
    if batch_index in faults.inject_nan_loss_at_batches:
        return loss * float("nan")
    if batch_index in faults.inject_nan_grad_at_batches:
        return _NaNGradients.apply(loss)
    return loss


def injected_exception(faults: FaultConfig, rank: int, step: int) -> RuntimeError | None:
    """The exception `faults.inject_exception_at=[rank, step]` asks this rank to raise after `step`, or None."""
    if faults.inject_exception_at == [rank, step]:
        return RuntimeError(f"injected fault on rank {rank} after step {step} (faults.inject_exception_at)")
    return None


def wants_faults(faults: FaultConfig) -> bool:
    return bool(faults.inject_nan_loss_at_batches or faults.inject_nan_grad_at_batches
                or faults.inject_exception_at)


class FaultyJob:
    """`job` with the faults of `faults` injected; everything else is the job's own (attributes included)."""

    def __init__(self, job: Job, faults: FaultConfig) -> None:
        self.job, self.faults = job, faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self.job, name)

    def loss(self, loop: Loop, batch: Batch, step: int, micro: int) -> torch.Tensor:
        # The loader has counted this micro-batch already: its index in the run is one less.
        return injected_loss(self.job.loss(loop, batch, step, micro), loop.loader.batches_consumed - 1, self.faults)

    def on_start(self, loop: Loop) -> None:
        self.job.on_start(loop)

    def after_step(self, loop: Loop, step: int, last: bool) -> None:
        error = injected_exception(self.faults, loop.ctx.rank, step)
        if error is not None:
            raise error
        self.job.after_step(loop, step, last)

    def after_checkpoint(self, loop: Loop, step: int) -> None:
        self.job.after_checkpoint(loop, step)

    def summary(self, loop: Loop) -> dict[str, Any]:
        return self.job.summary(loop)

    def state(self) -> dict[str, Any]:
        return self.job.state()

    def load_state(self, state: dict[str, Any]) -> None:
        self.job.load_state(state)

    def truncate_logs(self, step: int) -> None:
        self.job.truncate_logs(step)


def with_injected_faults(job: Job, faults: FaultConfig) -> Job:
    """`job` itself when no fault is asked for (the usual case), else `job` wrapped to inject them."""
    return FaultyJob(job, faults) if wants_faults(faults) else job
