"""What a bootstrap interval supports: a 5-95% range, and whether the parameter it belongs to is identified.

Every fit in the scaling report (L(C), L(N, D), N*(C), D*(C), L*(C)) judges its parameters by these rules,
so a report cannot call one law identified on weaker evidence than another:
- no interval without a real spread: a point measured once has nothing to resample;
- a bootstrap round that could not produce a value (the law diverged, a budget's minimum left the sizes
  trained) is a value with no bound, not a round to forget: when more than 5% of the rounds gave none, at
  least one end of the 5-95% interval is unbounded, and there is no interval;
- an interval that reaches zero, or is wider than IDENTIFIED_FACTOR, does not identify its parameter;
  one wider than UNBOUNDED_FACTOR is said to be unbounded instead of printed as a number like 5.9e+80.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IDENTIFIED_FACTOR = 3.0  # a 5-95% interval wider than this factor (high / low) does not identify its parameter
UNBOUNDED = "1e3"  # ... and one wider than this is unbounded for every practical purpose
UNBOUNDED_FACTOR = float(UNBOUNDED)
MAX_LOST_SHARE = 0.05  # rounds without a value beyond this share leave the 5th or 95th percentile unbounded

Interval = tuple[float, float]


def bootstrap_interval(draws: Sequence[float], rounds: int) -> Interval | None:
    """5-95% of `draws` out of `rounds` attempted; None when too many rounds gave no value (see the module)."""
    if rounds == 0 or len(draws) < (1 - MAX_LOST_SHARE) * rounds:
        return None
    low, high = np.percentile(np.asarray(draws, float), [5, 95])
    return float(low), float(high)


def lost_rounds(draws: int, rounds: int, why: str) -> str:
    """The reason for a missing interval when the bootstrap ran but too many rounds gave no value."""
    return f"{why} in {rounds - draws} of {rounds} resamples"


def verdict(interval: Interval | None, missing: str) -> str:
    """'identified', or 'not identified (why)'; `missing` says why there is no interval when there is none."""
    if interval is None:
        return f"not identified ({missing})"
    low, high = interval
    if low <= 0:
        return "not identified (reaches zero)"
    if high / low > UNBOUNDED_FACTOR:
        return f"not identified (spans > {UNBOUNDED}x)"
    if high / low > IDENTIFIED_FACTOR:
        return f"not identified (wider than {IDENTIFIED_FACTOR:g}x)"
    return "identified"


def identified(interval: Interval | None) -> bool:
    return verdict(interval, "") == "identified"


def format_interval(interval: Interval | None, digits: int = 4) -> str:
    """For a table cell: the two ends, or what stands in for them."""
    if interval is None:
        return "-"
    low, high = interval
    if low > 0 and high / low > UNBOUNDED_FACTOR:
        return f"unbounded (> {UNBOUNDED}x)"
    return f"{low:.{digits}g} - {high:.{digits}g}"
