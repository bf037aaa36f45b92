"""What each rank reads: one shard set or a weighted mixture, in an order that does not depend on the
number of ranks, cut into equal contiguous parts per rank.

An epoch is a list of shard *visits*, shuffled with (seed, epoch): every shard of a set once per unit of
its weight (open_clip's upsampling factors: weight 2 visits each shard twice, 0.5 visits half of them,
a different half each epoch). Shards are read whole, so a fraction f of a set's n shards is floor(f x n) shards
plus one more with probability f x n - floor(f x n), drawn per (seed, epoch, set): over epochs each set is read
by its weight exactly, where rounding f x n never read one shard at 0.5 or four at 0.1, and read three at 0.5
as two (round half to even). Laid end to end, the visits number the epoch's samples 0..N-1: a global
order that is the same on 8 GPUs or 256. A `Layout` gives rank r the r-th of `world` equal contiguous
runs of that order (the few samples that do not fill a batch on every rank are left out, as a
drop-last loader does), so a rank opens only its own shards, and its position is one number: the
micro-batches it has consumed.

When a run resumes on another world size in the middle of an epoch, the samples not yet read become
the intervals of a new layout over the new ranks (`Layout.remaining`), so the epoch goes on instead of
starting over. Ranks shuffle within windows of `window` samples of their run (bounded memory, as DALI's
shuffle buffer); a window that was partly read when the run stopped is read again whole, so the resumed
epoch repeats at most the consumed part of one window per old rank and skips nothing.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from mixmae_scale.data.errors import DataError, plural
from mixmae_scale.data.manifest import SplitShards
from mixmae_scale.seeds import stream_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightedSet:
    shards: SplitShards
    weight: float = 1.0
    name: str = ""

    def __post_init__(self) -> None:
        if not self.weight > 0 or not math.isfinite(self.weight):
            raise DataError(f"data.sources: weight {self.weight} of {self.name or self.shards.location} must be a "
                            "positive number")


@dataclass(frozen=True)
class Visits:
    """One epoch's shard visits in order: arrays of (set, shard, samples) and each visit's first position."""

    epoch: int
    source: np.ndarray
    shard: np.ndarray
    count: np.ndarray
    start: np.ndarray  # start[k] = position of visit k's first sample; start[-1] = N

    @property
    def samples(self) -> int:
        return int(self.start[-1])

    def locate(self, position: int) -> tuple[int, int]:
        """(visit, sample within the visit's shard) of a position in the epoch's order."""
        visit = int(np.searchsorted(self.start, position, side="right")) - 1
        return visit, position - int(self.start[visit])


class ShardMixture:
    """One or several shard sets (each a split of a manifest) and their weights."""

    def __init__(self, sets: list[WeightedSet]) -> None:
        if not sets:
            raise DataError("data.sources: no shard set given")
        self.sets = tuple(sets)
        self._visits: dict[tuple[int, int], Visits] = {}
        for entry in self.sets:
            count = len(entry.shards.samples_per_shard)
            fraction = entry.weight % 1.0
            if 1e-9 < fraction * count < 1 - 1e-9:
                name = entry.name or entry.shards.location
                if entry.weight < 1:
                    remedy = f"a weight of at least {1 / count:g} reads some of it every epoch"
                else:
                    remedy = f"a whole weight ({math.floor(entry.weight)} or {math.ceil(entry.weight)}) reads it evenly"
                log.warning("data.sources: %s has %s at weight %g: its fractional part is %.2f of a shard per "
                            "epoch, and shards are read whole, so %s in %.0f%% of epochs, drawn per epoch (its share "
                            "holds on average over epochs, not in each); %s", name, plural(count, "shard"),
                            entry.weight, fraction * count,
                            "it is read (one shard)" if entry.weight < 1 else "one more shard is read",
                            100 * fraction * count, remedy)

    @property
    def labeled(self) -> bool:
        return all(s.shards.labeled for s in self.sets)

    @property
    def num_classes(self) -> int:
        return max(s.shards.num_classes for s in self.sets)

    @cached_property
    def expected_samples(self) -> int:
        """Samples per epoch (exact for whole weights; the mean over epochs for fractional ones: each shard is
        equally likely to be drawn, and floor(f x n) + Bernoulli(remainder) shards are, so f x samples)."""
        return round(sum(s.weight * s.shards.samples for s in self.sets))

    def largest_epoch_samples(self) -> int:
        """The most samples any epoch can draw: each set's whole weights of its shards, plus its largest shards for a
        fractional part (`fractional_shards` draws at most ceil(f x n), any of them). Below one micro-batch on every
        rank, no epoch ever gives a rank a batch (shard_reader.RankStream refuses to wait for one)."""
        total = 0
        for entry in self.sets:
            counts = entry.shards.samples_per_shard
            whole, fraction = divmod(entry.weight, 1.0)
            expected = fraction * len(counts)
            most = math.floor(expected + 1e-9) + int(expected - math.floor(expected + 1e-9) > 1e-9)
            total += int(whole) * sum(counts) + sum(sorted(counts, reverse=True)[:most])
        return total

    def smallest_epoch_samples(self) -> int:
        """The fewest samples any epoch can draw, whatever the seed: each set's whole weights of its shards, plus its
        smallest shards for a fractional part (`fractional_shards` draws at least floor(f x n), any of them). What a
        refusal of a too-small mixture is decided from: epoch 0's draw made it hang on run.seed."""
        return sum(_guaranteed(entry.shards.samples_per_shard, entry.weight) for entry in self.sets)

    def too_small(self, split: str, world: int, micro: int) -> str | None:
        """Why some epoch can give a rank no whole micro-batch (`smallest_epoch_samples` below world x micro), naming
        the sets whose fractional weight draws short and a weight that would not; None where every epoch gives one."""
        need, smallest = world * micro, self.smallest_epoch_samples()
        if smallest >= need:
            return None
        batch = f"fewer than one batch (a micro-batch of {micro} on each of {plural(world, 'rank')}: {need} samples)"
        smaller = "use a smaller batch.micro or fewer ranks"
        short = [number for number, entry in enumerate(self.sets)
                 if _guaranteed(entry.shards.samples_per_shard, entry.weight) < entry.weight * entry.shards.samples]
        if not short:
            names = ", ".join(entry.name or entry.shards.location for entry in self.sets)
            if len(self.sets) == 1 and self.sets[0].weight == 1:
                return f"{names}: split '{split}' has {plural(smallest, 'sample')}, {batch}; {smaller}, or more data"
            # An epoch's samples are the weights' share, not what the split has (weight 0.5 of 16 is 8 an epoch).
            each = "; ".join(("" if len(self.sets) == 1 else f"{entry.name or entry.shards.location}: ")
                             + f"its {entry.shards.samples} at weight {entry.weight:g}" for entry in self.sets)
            return (f"{names}: an epoch reads {plural(smallest, 'sample')} of split '{split}' ({each}), {batch}; "
                    f"{smaller}, a higher weight, or more data")
        parts = []
        for number in short:
            entry = self.sets[number]
            counts = entry.shards.samples_per_shard
            whole, extra = int(entry.weight // 1), math.floor(entry.weight % 1.0 * len(counts) + 1e-9)
            name = f"{entry.name or entry.shards.location} at weight {entry.weight:g}"
            if not whole:
                parts.append(f"{name} draws at least {extra} of its {plural(len(counts), 'shard')} "
                             f"({_guaranteed(counts, entry.weight)} of its {plural(sum(counts), 'sample')})")
                continue
            # Above 1 the shards read are visits, more than the set has: "at least 3 of its 2 shards" said otherwise.
            times = "once each" if whole == 1 else f"{whole} times each"
            parts.append(f"{name} reads at least {plural(whole * len(counts) + extra, 'shard')} an epoch (its "
                         f"{plural(len(counts), 'shard')} {times} and {extra} more: "
                         f"{plural(_guaranteed(counts, entry.weight), 'sample')}, "
                         f"{entry.weight * sum(counts):g} on average)")
        first = self.sets[short[0]]
        weight = self._weight_for(short[0], need - smallest + _guaranteed(first.shards.samples_per_shard, first.weight))
        return (f"data.sources: an epoch can draw as few as {plural(smallest, 'sample')} (whichever run.seed): "
                f"{'; '.join(parts)}, as shards are read whole: {batch} in some epochs; a weight of at least "
                f"{weight:g} for {first.name or first.shards.location} reads one in every epoch, or {smaller}")

    def _weight_for(self, number: int, samples: int) -> float:
        """The smallest weight (rounded up to 3 decimals) at which set `number` guarantees `samples` per epoch."""
        counts = self.sets[number].shards.samples_per_shard
        k = math.floor(self.sets[number].weight * len(counts) + 1e-9) + 1
        while _guaranteed(counts, k / len(counts)) < samples and sum(counts):
            k += 1
        return math.ceil(k / len(counts) * 1000 - 1e-6) / 1000

    def shares(self) -> list[tuple[str, float]]:
        """Each set's expected share of an epoch's samples, for the log (the mean over epochs, as
        expected_samples)."""
        total = sum(s.weight * s.shards.samples for s in self.sets)
        return [(s.name or s.shards.location, s.weight * s.shards.samples / total) for s in self.sets]

    def visits(self, seed: int, epoch: int) -> Visits:
        key = (seed, epoch)
        if key not in self._visits:
            self._visits = {key: self._plan(seed, epoch)}  # one epoch at a time: 100,000 shards stay cheap
        return self._visits[key]

    def _plan(self, seed: int, epoch: int) -> Visits:
        sources, shards = [], []
        for number, entry in enumerate(self.sets):
            count = len(entry.shards.samples_per_shard)
            whole, fraction = divmod(entry.weight, 1.0)
            picked = [np.arange(count)] * int(whole)
            if fraction > 1e-9:
                rng = np.random.default_rng(stream_seed("fraction", seed, epoch, number))
                order = rng.permutation(count)
                picked.append(np.sort(order[: fractional_shards(fraction * count, rng)]))
            chosen = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
            sources.append(np.full(len(chosen), number, dtype=np.int32))
            shards.append(chosen.astype(np.int64))
        source, shard = np.concatenate(sources), np.concatenate(shards)
        order = np.random.default_rng(stream_seed("epoch", seed, epoch)).permutation(len(source))
        source, shard = source[order], shard[order]
        per_set = [np.asarray(s.shards.samples_per_shard, dtype=np.int64) for s in self.sets]
        count = np.array([per_set[s][j] for s, j in zip(source, shard, strict=True)], dtype=np.int64) \
            if len(self.sets) > 1 else per_set[0][shard]
        return Visits(epoch, source, shard, count, np.concatenate([[0], np.cumsum(count)]))

    def in_order(self) -> Visits:
        """Every shard of a single set once, in manifest order: what evaluation reads."""
        if len(self.sets) != 1:
            raise DataError("evaluation reads one shard set, not a mixture")
        count = np.asarray(self.sets[0].shards.samples_per_shard, dtype=np.int64)
        return Visits(0, np.zeros(len(count), dtype=np.int32), np.arange(len(count)), count,
                      np.concatenate([[0], np.cumsum(count)]))


def _guaranteed(counts: tuple[int, ...], weight: float) -> int:
    """The fewest samples a set of shards of `counts` samples gives an epoch at `weight` (its smallest shards for the
    fractional part, which draws at least floor(f x n) of them)."""
    whole, fraction = divmod(weight, 1.0)
    least = math.floor(fraction * len(counts) + 1e-9)
    return int(whole) * sum(counts) + sum(sorted(counts)[:least])


def fractional_shards(expected: float, rng: np.random.Generator) -> int:
    """floor(expected) shards, plus one with probability equal to the remainder: `expected` on average, whole
    shards each epoch. The draw is always made, so the generator's use does not depend on the weight."""
    whole = math.floor(expected + 1e-9)  # 0.1 x 10 is 1.0000000000000002 or 0.9999999999999999
    draw = rng.random()
    remainder = expected - whole
    return whole + int(remainder > 1e-9 and draw < remainder)


Interval = tuple[int, int]


@dataclass(frozen=True)
class Layout:
    """Epoch `epoch`'s positions still to read (`intervals`, in order) split over `world` ranks in runs of
    `batches` micro-batches of `micro` samples each."""

    epoch: int
    intervals: tuple[Interval, ...]
    world: int
    micro: int

    @classmethod
    def whole_epoch(cls, epoch: int, samples: int, world: int, micro: int) -> Layout:
        return cls(epoch, ((0, samples),), world, micro)

    @property
    def length(self) -> int:
        return sum(b - a for a, b in self.intervals)

    @property
    def batches(self) -> int:
        """Micro-batches per rank: every rank gets the same number, the remainder (< world x micro) is left out."""
        return self.length // (self.world * self.micro)

    def rank_intervals(self, rank: int, first: int = 0, stop: int | None = None) -> list[Interval]:
        """Epoch positions of rank's samples first..stop-1 (offsets into its run), in order."""
        run = self.batches * self.micro
        stop = run if stop is None else stop
        return self._slice(rank * run + first, rank * run + stop)

    def _slice(self, lo: int, hi: int) -> list[Interval]:
        """Offsets lo..hi-1 of the concatenated intervals, as epoch positions."""
        out, offset = [], 0
        for a, b in self.intervals:
            length = b - a
            s, e = max(lo - offset, 0), min(hi - offset, length)
            if s < e:
                out.append((a + s, a + e))
            offset += length
            if offset >= hi:
                break
        return out

    def remaining(self, consumed_batches: int, window: int) -> tuple[Interval, ...]:
        """What a resume on another world size still has to read of this epoch: each rank's run from the start
        of the window it was in, and the remainder this layout left out."""
        run = self.batches * self.micro
        out: list[Interval] = []
        read = min(consumed_batches * self.micro, run)
        restart = read - read % window if window > 0 else read
        for rank in range(self.world):
            out += self._slice(rank * run + restart, (rank + 1) * run)
        out += self._slice(self.world * run, self.length)
        return _merged(out)

    def repeated_on_relayout(self, consumed_batches: int, window: int) -> int:
        """Samples `remaining` hands out a second time: the consumed part of each rank's current window."""
        read = min(consumed_batches * self.micro, self.batches * self.micro)
        return self.world * (read % window if window > 0 else 0)

    def progress(self, consumed_batches: int, epoch_samples: int) -> float:
        """How far into the run the data is, in epochs: `epoch` plus the share of its `epoch_samples` read, where the
        unread ones are this layout's not yet consumed. Not steps over steps per epoch: a re-laid epoch (a resume on
        another number of ranks) re-reads part of a window per old rank and lays its rest out anew, and an epoch of
        a fractional weight draws another size, so the step count drifts from the epoch the loader is in. A layout
        read to its end is the next epoch's start (its left-out remainder is not read)."""
        if consumed_batches >= self.batches:
            return float(self.epoch + 1)
        unread = self.length - consumed_batches * self.micro * self.world
        return self.epoch + max(epoch_samples - unread, 0) / max(epoch_samples, 1)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "intervals": [list(i) for i in self.intervals], "world": self.world,
                "micro": self.micro}

    @classmethod
    def from_dict(cls, state: dict) -> Layout:
        return cls(int(state["epoch"]), tuple((int(a), int(b)) for a, b in state["intervals"]), int(state["world"]),
                   int(state["micro"]))


def _merged(intervals: list[Interval]) -> tuple[Interval, ...]:
    out: list[Interval] = []
    for a, b in intervals:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        elif b > a:
            out.append((a, b))
    return tuple(out)


def training_mixture(shards: str, split: str, sources: list[tuple[str, float, str | None]]) -> ShardMixture:
    """`data.sources` as (location, weight, split or None) when given, else the one set at `shards`."""
    from mixmae_scale.data.manifest import load_split

    if not sources:
        return ShardMixture([WeightedSet(load_split(shards, split), 1.0, str(shards))])
    return ShardMixture([WeightedSet(load_split(location, own_split or split), weight, str(location))
                         for location, weight, own_split in sources])
