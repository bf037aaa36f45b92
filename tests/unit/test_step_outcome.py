"""engine/step.py: what an attempt at an optimizer step came to, and whether a checkpoint follows it."""

from __future__ import annotations

from mixmae_scale.config.schema import CheckpointConfig
from mixmae_scale.engine.step import SIGNAL, StepOutcome, save_due

EVERY_4 = CheckpointConfig(every_steps=4, at_end=True)


def test_one_rank_asking_to_stop_stops_every_rank():
    assert StepOutcome.of(True, stop_votes=1).stop == SIGNAL
    assert StepOutcome.of(True, stop_votes=0).stop is None


def test_an_applied_step_saves_at_the_interval_and_at_the_last_step_only():
    applied = StepOutcome.of(True, 0)
    assert [s for s in range(1, 11) if save_due(applied, s, 10, EVERY_4)] == [4, 8, 10]
    no_end = CheckpointConfig(every_steps=4, at_end=False)
    assert [s for s in range(1, 11) if save_due(applied, s, 10, no_end)] == [4, 8]


def test_a_step_not_applied_saves_only_when_the_run_stops():
    assert not save_due(StepOutcome.of(False, 0), 4, 10, EVERY_4)  # step 4 is not done: no checkpoint of it yet
    assert save_due(StepOutcome.of(False, 1), 3, 10, EVERY_4)


def test_a_stop_saves_between_intervals():
    assert save_due(StepOutcome.of(True, 2), 3, 10, EVERY_4)
