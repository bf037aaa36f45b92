"""data/shard_reader.py's RankStream on layouts that give a rank no whole micro-batch: refused when it is opened,
never a reader thread that steps from empty epoch to empty epoch while the training thread waits on it."""

from __future__ import annotations

import threading

import pytest

from mixmae_scale.data.errors import DataError
from mixmae_scale.data.manifest import SplitShards
from mixmae_scale.data.shard_reader import RankStream
from mixmae_scale.data.shard_sets import Layout, ShardMixture, WeightedSet


def _mixture(*sizes: int, weight: float = 1.0) -> ShardMixture:
    """Shards of `sizes` samples as a manifest describes them (nothing is read: no tar exists)."""
    names = tuple(f"{n}.tar" for n in range(len(sizes)))
    split = SplitShards("train", "/nowhere", "/nowhere", names, tuple(n.replace(".tar", ".idx") for n in names),
                        tuple(sizes), (0,) * len(sizes), sum(sizes), False, 0)
    return ShardMixture([WeightedSet(split, weight, "tiny")])


def _first_batch_or_timeout(mixture: ShardMixture, layout: Layout, seconds: float = 5.0):
    """What opening a stream and asking for its first batch comes to: the error raised, or "waited" where it had not
    come back after `seconds` (the stream is then closed, which ends its threads)."""
    outcome: list = []
    streams: list[RankStream] = []

    def ask() -> None:
        try:
            streams.append(RankStream(mixture, 0, layout, 0, 0, 4, None))
            outcome.append(streams[0].next())
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            outcome.append(exc)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for stream in streams:
            stream.close()
        return "waited"
    return outcome[0]


def test_more_ranks_than_whole_batches_in_every_epoch_is_refused_at_once_naming_the_counts():
    """3 samples on 2 ranks x 2: no epoch gives a rank a whole micro-batch. The fetch thread stepped from epoch to
    epoch without end (layout.batches 0 in each), and next() waited for a batch that could never come."""
    outcome = _first_batch_or_timeout(_mixture(3), Layout.whole_epoch(0, 3, 2, 2))
    assert isinstance(outcome, DataError), outcome
    assert "3 samples" in str(outcome) and "2 ranks" in str(outcome) and "micro-batch of 2" in str(outcome)


def test_a_fractional_weight_is_refused_only_where_even_its_largest_draw_holds_no_batch():
    """Weight 0.5 of shards of 1 and 3 samples draws one of them per epoch: 3 fill a batch of 2 on one rank (an epoch
    that draws the 1 is skipped and the next one read), while on 2 ranks no draw does."""
    assert _mixture(1, 3, weight=0.5).largest_epoch_samples() == 3
    assert _mixture(4, 4, 4, weight=1.5).largest_epoch_samples() == 12 + 4 * 2
    assert _mixture(5, 7, weight=2.0).largest_epoch_samples() == 24
    with pytest.raises(DataError, match="the largest epoch"):
        RankStream(_mixture(1, 3, weight=0.5), 0, Layout.whole_epoch(0, 1, 2, 2), 0, 0, 4, None)


def test_one_rank_whose_largest_fractional_draw_fills_a_batch_is_not_refused():
    """The other half of 'refused only where': on 1 rank x 2 the draw of the 3-sample shard fills a batch, so the
    stream opens (its reading then fails on the missing tars, which is not the refusal)."""
    outcome = _first_batch_or_timeout(_mixture(1, 3, weight=0.5), Layout.whole_epoch(0, 1, 1, 2), seconds=10.0)
    assert not (isinstance(outcome, DataError) and "the largest epoch" in str(outcome)), outcome
