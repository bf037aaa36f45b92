"""engine/step.py: what an attempt at an optimizer step came to; and the loop's wait for each micro-batch."""

from __future__ import annotations

import pytest

from mixmae_scale.engine.step import SIGNAL, StepOutcome


def test_any_stop_vote_makes_the_step_outcome_a_signal_stop():
    """The mapping from the all-reduced count of ranks asking to stop to the outcome: one vote or more is a stop
    by signal, none is no stop. That the vote of one rank reaches every rank (`step_decision`'s all-reduce) is
    checked with two real ranks in tests/integration/test_faults.py."""
    assert StepOutcome.of(True, stop_votes=1).stop == SIGNAL
    assert StepOutcome.of(False, stop_votes=2).stop == SIGNAL
    assert StepOutcome.of(True, stop_votes=0).stop is None


@pytest.mark.parametrize("waited, warned", [(400.0, True), (300.0, False)])
def test_a_batch_that_takes_longer_than_data_stall_s_is_reported_with_the_rank_and_the_limit(
        monkeypatch, caplog, waited, warned):
    """A stalled reader shows in the log, not only as a throughput drop: a wait above `faults.data_stall_s` (300 s
    by default) is a warning naming the rank, the wait and the limit; a wait at the limit is not. Either way the wait
    is counted in the window's data-wait share. The loop's method runs on a stand-in for its state and a fake clock
    (no ranks, no sleeping)."""
    import logging
    from types import SimpleNamespace

    import torch

    from mixmae_scale.config import load_config
    from mixmae_scale.engine import loop
    from mixmae_scale.engine.step import LogWindow

    clock = iter([10.0, 10.0 + waited])
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    config, _ = load_config("tiny")
    assert config.faults.data_stall_s == 300.0
    state = SimpleNamespace(config=config, ctx=SimpleNamespace(rank=3))
    window = LogWindow(torch.zeros(()))
    window.throughput.data_wait = 1.0
    with caplog.at_level(logging.WARNING, logger="mixmae.loop"):
        assert loop.TrainingLoop._next_batch(state, iter(["the batch"]), window) == "the batch"
    assert window.throughput.data_wait == 1.0 + waited
    said = [r.getMessage() for r in caplog.records if r.name == "mixmae.loop"]
    assert said == (["rank 3 waited 400 s for a batch (faults.data_stall_s=300)"] if warned else [])


class _ZeroOptimizer:
    """What the loop reads of DeepSpeed's ZeRO optimizers: the scaler, and the scale as `loss_scale`."""

    def __init__(self, scaler) -> None:
        self.loss_scaler = scaler

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.cur_scale


def test_fp16_overflow_at_the_minimum_scale_counts_toward_the_limit_instead_of_deepspeeds_bare_exception(tmp_path):
    """DeepSpeed's own dynamic loss scaler with the profiles' fp16 settings (initial scale 2^16, hysteresis 2,
    minimum 1): overflowing on every step, it raised a bare Exception at the 18th skip, which ended the run with a
    traceback and no checkpoint. Now it skips on, the skips above the minimum stay the scaler's search (not
    counted), and those at the minimum count, so the limit stops the run with a checkpoint as for bf16 or fp32."""
    from types import SimpleNamespace

    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from mixmae_scale.config.deepspeed_config import MIN_LOSS_SCALE
    from mixmae_scale.engine.faults import NonFiniteGuard
    from mixmae_scale.engine.step import at_the_minimum_loss_scale, keep_skipping_at_the_minimum_loss_scale

    def scaler() -> DynamicLossScaler:
        return DynamicLossScaler(init_scale=2**16, scale_window=1000, min_scale=MIN_LOSS_SCALE, delayed_shift=2,
                                 consecutive_hysteresis=False)

    from mixmae_scale.engine.distributed import skip_shm_allreduce_op

    # as every run does: without it init_distributed compiled DeepSpeed's shared-memory op on a machine's first use
    # (68 s of a CI run on an empty TORCH_EXTENSIONS_DIR, for a test that reduces nothing)
    skip_shm_allreduce_op()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    deepspeed.init_distributed("gloo")  # the scaler logs through deepspeed.comm's rank
    try:
        untouched = scaler()
        with pytest.raises(Exception, match="cannot decrease scale anymore"):  # noqa: B017 - DeepSpeed's bare one
            for _ in range(100):
                untouched.update_scale(True)
        assert untouched.cur_iter == 17  # 17 skips, the 18th raised
        engine = SimpleNamespace(optimizer=_ZeroOptimizer(scaler()))
        keep_skipping_at_the_minimum_loss_scale(engine)
        guard = NonFiniteGuard(limit=5)
        for _ in range(3):  # a short search (the start of a run): skipped, not counted, and a good step resets
            engine.optimizer.loss_scaler.update_scale(True)
            guard.step_not_applied(True, at_the_minimum_loss_scale(engine))
        guard.succeeded()
        assert (guard.loss_scale_skips, guard.gradients, guard.exhausted) == (3, 0, False)
        skips = 0
        while not guard.exhausted and skips < 100:
            engine.optimizer.loss_scaler.update_scale(True)
            guard.step_not_applied(True, at_the_minimum_loss_scale(engine))
            skips += 1
        assert guard.exhausted and guard.gradients == guard.in_a_row == 6 and engine.optimizer.loss_scale == 1
        assert guard.loss_scale_skips == 3 + skips - 6
    finally:
        dist.destroy_process_group()
