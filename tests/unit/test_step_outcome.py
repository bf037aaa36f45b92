"""engine/step.py: what an attempt at an optimizer step came to."""

from __future__ import annotations

from mixmae_scale.engine.step import SIGNAL, StepOutcome


def test_one_rank_asking_to_stop_stops_every_rank():
    assert StepOutcome.of(True, stop_votes=1).stop == SIGNAL
    assert StepOutcome.of(True, stop_votes=0).stop is None
