"""What a fit's data and bootstrap support: a 5-95% range per parameter, and whether it is identified.

Every fit in the scaling report (L(C) and L(N, D) on a grid or iso-FLOP sweep, N*(C), D*(C), L*(C)) is judged
by one function, `judge`, so that no law is called identified on weaker evidence than another:
- too few points: a law with P parameters needs P + 1 distinct points (configurations, budgets); through P
  points any curve passes, and the residual that would say whether it is the law is zero;
- too few points for an interval: a law whose intervals, measured on exact-law sweeps, miss the truth well beyond
  their nominal rate at P + 1 points asks for more (`Support.needs`): L(N, D) (`fit.ND_INTERVAL_POINTS`);
- one seed: a point measured once says nothing of the seeds' noise apart from the law's misfit. The seed-drawing
  bootstrap this project used first had nothing to draw from one run (resampling runs instead only reshuffled the
  same few values: a 4-run grid gave 19 identical refits and a zero-width "interval"); the parametric bootstrap
  of every fit now (`fit.parametric_resamples`) keeps the rule;
- too few resamples: a round that could not produce a value (the law diverged, a budget's minimum left the
  sizes trained) is a value with no bound, not a round to forget: when more than 5% of the rounds gave none,
  or fewer than MIN_RESAMPLES gave one, there is no interval;
- resamples that did not differ, or a point estimate outside its own interval, do not identify a parameter:
  the interval then measures the resampling, not the law;
- an interval that reaches zero, or is wider than IDENTIFIED_FACTOR, does not identify its parameter;
  one wider than UNBOUNDED_FACTOR is said to be unbounded instead of printed as a number like 5.9e+80;
- an exponent (EXPONENTS) is judged by its sign and its width as well: a ratio alone called (0.26, 0.74)
  identified (2.85x), though C^0.26 and C^0.74 differ 9x over two decades of C, and called the narrow
  (-0.62, -0.58) "reaches zero". An exponent is identified when its interval keeps one sign, is at most
  EXPONENT_WIDTH wide, and, as every parameter, at most IDENTIFIED_FACTOR from end to end (in absolute value);
- a loss law whose decay exponent (DECAY_EXPONENTS: alpha, beta) is estimated at or below zero identifies no
  parameter at all: its loss does not fall with N, D or C, so it is no scaling law, and the other terms' narrow
  intervals describe a curve that absorbs the wrong sign (a 12-run study fitted alpha < 0 and had E, B and beta
  "identified"). The fit is not bounded to positive exponents: a bound would hide the sign at 0, where A trades
  with E; the estimate is kept in fit.json, the verdicts give the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

IDENTIFIED_FACTOR = 3.0  # a 5-95% interval wider than this factor (high / low) does not identify its parameter
# An exponent a scales a law by C^a: an interval this wide leaves the law's factor uncertain by 10^0.3 = 2x over
# each decade of C (from the exponent alone, N*(C) a decade past the budgets spans at most 2x).
EXPONENT_WIDTH = 0.3
EXPONENTS = frozenset({"alpha", "beta", "exponent"})  # the parameters judged as exponents, in every law
# The exponents by which a loss law's terms fall (L(C), L(N, D), L*(C)); N*(C) = k C^a's `exponent` may have either
# sign: it is a measurement, not the law's claim.
DECAY_EXPONENTS = frozenset({"alpha", "beta"})
UNBOUNDED = "1e3"  # ... and one wider than this is unbounded for every practical purpose
UNBOUNDED_FACTOR = float(UNBOUNDED)
MAX_LOST_SHARE = 0.05  # rounds without a value beyond this share leave the 5th or 95th percentile unbounded
MIN_RESAMPLES = 20  # fewer refitted resamples put the 5th and 95th percentiles on the extreme draws

Interval = tuple[float, float]


@dataclass(frozen=True)
class Support:
    """What a fit rests on. `once`: points measured by a single run; `rounds`: bootstrap resamples asked for;
    `lost`: why a round gives no value (said when too many do); `unit`: how `once` reads in a sentence, for 1 and
    for more (the verb agrees with the count: "1 of 5 points was run once", not "were")."""

    points: int
    parameters: int
    once: int = 0
    rounds: int = 0
    lost: str = "the refit failed"
    unit: tuple[str, str] = ("points was run once", "points were run once")
    needs: int = 0  # the fewest points an interval needs, where a law's measured coverage asks for more than P + 1


@dataclass
class Judgement:
    """`refitted`: rounds that gave every parameter a value; `distinct`: how many different values they gave
    (of the first parameter; 1 means every resample refitted to the same law)."""

    intervals: dict[str, Interval | None] = field(default_factory=dict)
    verdicts: dict[str, str] = field(default_factory=dict)
    rounds: int = 0
    refitted: int = 0
    distinct: int = 0
    missing: str = ""  # why there is no interval, when there is none
    not_a_law: str = ""  # a decay exponent at or below zero: why the law is no scaling law (empty when none is)

    @property
    def identified(self) -> bool:
        return bool(self.verdicts) and all(v == "identified" for v in self.verdicts.values())

    def resamples(self) -> str:
        """One line for the report: how many resamples refitted and whether they differ."""
        if not self.rounds:
            return f"no bootstrap resample was drawn ({self.missing or 'no bootstrap'})"
        differ = ("; they differ" if self.distinct > 1 else "; every one gave the same values" if self.refitted
                  else "")
        return f"{self.refitted} of {self.rounds} bootstrap resamples refitted{differ}"


def too_few_points(law: str, points: int, parameters: int,
                   what: tuple[str, str] = ("distinct point", "distinct points")) -> str | None:
    """Why `law` cannot be fitted through `points` distinct points (`what` they are: one, several), or None when it
    can. Counted in words: a one-budget sweep read "the runs give 1 compute levels"."""
    if points >= parameters + 1:
        return None
    return (f"{law} has {parameters} parameters and the runs give {points} {what[0] if points == 1 else what[1]}; "
            f"it needs at least {parameters + 1}")


def judge(estimates: Mapping[str, float], draws: Mapping[str, Sequence[float]], support: Support) -> Judgement:
    """Every parameter's interval and verdict under the module's rules; `draws` holds a value per refitted round."""
    refitted = min((len(draws.get(name, ())) for name in estimates), default=0)
    first = next(iter(estimates), None)
    distinct = len(np.unique(np.asarray(draws.get(first, ()), float))) if first else 0
    missing = _missing(support, refitted)
    short = too_few_points("", support.points, support.parameters) or support.points < support.needs
    drawn = 0 if support.once or short else support.rounds
    not_a_law = non_positive_exponents(estimates)
    judgement = Judgement(rounds=drawn, refitted=refitted, distinct=distinct, missing=missing or "",
                          not_a_law=not_a_law)
    for name, estimate in estimates.items():
        interval = None if missing else _percentiles(draws[name])
        judgement.verdicts[name] = (f"not identified ({missing})" if missing
                                    else f"not identified ({not_a_law})" if not_a_law
                                    else _verdict(estimate, interval, name in EXPONENTS))
        # A zero-width range measures the resampling, not the law: not printed as an interval ("a - a").
        judgement.intervals[name] = None if interval and interval[0] == interval[1] else interval
    return judgement


def non_positive_exponents(estimates: Mapping[str, float]) -> str:
    """Why a loss law is no scaling law (its decay exponents at or below zero), or "" when it may be one."""
    bad = [f"{name} = {estimates[name]:.3g}" for name in estimates
           if name in DECAY_EXPONENTS and not estimates[name] > 0]
    if not bad:
        return ""
    return (f"{' and '.join(bad)} <= 0: the loss this term describes does not fall as its variable grows"
            if len(bad) == 1 else
            f"{' and '.join(bad)} <= 0: the losses these terms describe do not fall as their variables grow")


def _missing(support: Support, refitted: int) -> str | None:
    """Why the fit has no interval at all, or None when its bootstrap can give one."""
    few = too_few_points("the law", support.points, support.parameters)
    if few:
        return f"{support.points} points for {support.parameters} parameters"
    if support.points < support.needs:
        dof = support.points - support.parameters
        return (f"{support.points} points for {support.parameters} parameters: {dof} degree{'' if dof == 1 else 's'} "
                f"of freedom about the law {'is' if dof == 1 else 'are'} too few for its interval; it needs "
                f"{support.needs} points")
    if support.once:
        return f"one seed: {support.once} of {support.points} {support.unit[0 if support.once == 1 else 1]}"
    if not support.rounds:
        return "no bootstrap"
    if refitted < (1 - MAX_LOST_SHARE) * support.rounds:
        return lost_rounds(refitted, support.rounds, support.lost)
    if refitted < MIN_RESAMPLES:
        return f"{refitted} resamples refitted; an interval needs {MIN_RESAMPLES}"
    return None


def _percentiles(values: Sequence[float]) -> Interval:
    low, high = np.percentile(np.asarray(values, float), [5, 95])
    return float(low), float(high)


def _verdict(estimate: float, interval: Interval, exponent: bool = False) -> str:
    low, high = interval
    if high == low:
        return "not identified (the resamples did not differ)"
    if not low <= estimate <= high:
        return f"not identified (the estimate {estimate:.4g} lies outside its interval)"
    return verdict(interval, "", exponent)


def bootstrap_interval(draws: Sequence[float], rounds: int) -> Interval | None:
    """5-95% of `draws` out of `rounds` attempted; None when too many rounds gave no value (see the module), or
    when the draws did not differ (seeds with equal losses: a zero-width range is no interval)."""
    if rounds == 0 or len(draws) < (1 - MAX_LOST_SHARE) * rounds:
        return None
    low, high = _percentiles(draws)
    return None if low == high else (low, high)


def lost_rounds(draws: int, rounds: int, why: str) -> str:
    """The reason for a missing interval when the bootstrap ran but too many rounds gave no value."""
    return f"{why} in {rounds - draws} of {rounds} resamples"


def verdict(interval: Interval | None, missing: str, exponent: bool = False) -> str:
    """'identified', or 'not identified (why)' judged on the interval's width alone; `missing` says why there is
    no interval when there is none. `exponent`: judged as an exponent (see the module), whose sign is data too."""
    if interval is None:
        return f"not identified ({missing})"
    low, high = interval
    if exponent:
        if low <= 0 <= high:
            return "not identified (reaches zero)"
        if high - low > EXPONENT_WIDTH:
            return f"not identified (wider than {EXPONENT_WIDTH:g} in the exponent)"
        low, high = sorted((abs(low), abs(high)))
    if low <= 0:
        return "not identified (reaches zero)"
    if high / low > UNBOUNDED_FACTOR:
        return f"not identified (spans > {UNBOUNDED}x)"
    if high / low > IDENTIFIED_FACTOR:
        return f"not identified (wider than {IDENTIFIED_FACTOR:g}x)"
    return "identified"


def identified(interval: Interval | None, exponent: bool = False) -> bool:
    return verdict(interval, "", exponent) == "identified"


def format_interval(interval: Interval | None, digits: int = 4) -> str:
    """For a table cell: the two ends, or what stands in for them."""
    if interval is None:
        return "-"
    low, high = interval
    if low > 0 and high / low > UNBOUNDED_FACTOR:
        return f"unbounded (> {UNBOUNDED}x)"
    return f"{low:.{digits}g}{' - ' if low >= 0 else ' to '}{high:.{digits}g}"  # "-0.5 - 1.5" reads as a sum
