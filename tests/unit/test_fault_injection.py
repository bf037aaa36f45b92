"""engine/fault_injection.py: test faults wrap a job from outside the loop; without them the job runs as is."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mixmae_scale.config.schema import FaultConfig
from mixmae_scale.engine.fault_injection import injected_loss, with_injected_faults


class RecordingJob:
    loader, flops_per_image, compiled_blocks = None, 123.0, 2

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def loss(self, loop, batch, step, micro):
        return torch.tensor(2.0, requires_grad=True)

    def after_step(self, loop, step, last):
        self.calls.append(("after_step", step, last))

    def state(self):
        return {"best": 1}


def _loop(batches_consumed: int, rank: int = 0):
    return SimpleNamespace(loader=SimpleNamespace(batches_consumed=batches_consumed), ctx=SimpleNamespace(rank=rank))


def test_without_faults_the_job_itself_runs():
    job = RecordingJob()
    assert with_injected_faults(job, FaultConfig()) is job


def test_the_named_micro_batch_gets_a_nan_loss_and_the_others_the_jobs_own():
    job = with_injected_faults(RecordingJob(), FaultConfig(inject_nan_loss_at_batches=[3]))
    assert torch.isnan(job.loss(_loop(batches_consumed=4), None, 0, 0))  # the 4th batch read has index 3
    assert job.loss(_loop(batches_consumed=3), None, 0, 0).item() == 2.0


def test_nan_gradients_keep_the_loss_finite():
    loss = injected_loss(torch.tensor(2.0, requires_grad=True), 5, FaultConfig(inject_nan_grad_at_batches=[5]))
    assert torch.isfinite(loss)  # the NaN comes in the backward only
    leaf = torch.tensor(2.0, requires_grad=True)
    injected_loss(leaf * 1.0, 5, FaultConfig(inject_nan_grad_at_batches=[5])).backward()
    assert torch.isnan(leaf.grad)


def test_the_exception_is_raised_on_its_rank_after_its_step_before_the_jobs_own_hook():
    inner = RecordingJob()
    job = with_injected_faults(inner, FaultConfig(inject_exception_at=[1, 3]))
    job.after_step(_loop(0, rank=0), 3, False)
    job.after_step(_loop(0, rank=1), 2, False)
    with pytest.raises(RuntimeError, match="injected fault on rank 1 after step 3"):
        job.after_step(_loop(0, rank=1), 3, False)
    assert inner.calls == [("after_step", 3, False), ("after_step", 2, False)]


def test_the_wrapped_job_keeps_the_jobs_attributes_and_saved_state():
    job = with_injected_faults(RecordingJob(), FaultConfig(inject_nan_loss_at_batches=[0]))
    assert (job.flops_per_image, job.compiled_blocks, job.state()) == (123.0, 2, {"best": 1})
