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


def _seeds_drawing(mixture: ShardMixture, enough: bool, need: int) -> int:
    """The first run.seed whose epoch 0 draws at least `need` samples (`enough`) or fewer."""
    return next(seed for seed in range(200) if (mixture.visits(seed, 0).samples >= need) == enough)


def test_a_mixture_too_small_for_a_batch_in_some_epochs_is_refused_whatever_the_seed_draws_first():
    """Weight 0.5 of three shards of 4 draws one or two of them per epoch: 4 or 8 samples for a batch of 8 on one rank.
    Whether the loader refused it hung on what epoch 0 drew, so one run.seed was refused and another started. Now
    the smallest epoch any seed can draw decides, and the refusal names the source, its counts, the batch and the
    way out."""
    from mixmae_scale.data.loader import ShardLoader
    from mixmae_scale.data.spec import PipelineSpec

    mixture = _mixture(4, 4, 4, weight=0.5)
    lucky, unlucky = _seeds_drawing(mixture, True, 8), _seeds_drawing(mixture, False, 8)
    messages = []
    for seed in (lucky, unlucky):
        with pytest.raises(DataError) as refused:
            ShardLoader(mixture, "train", PipelineSpec(mode="pretrain", img_size=32, batch_size=8, order_seed=seed),
                        "torch")
        messages.append(str(refused.value))
    assert messages[0] == messages[1], messages
    assert messages[0].startswith("data.sources: an epoch can draw as few as 4 samples (whichever run.seed): tiny at "
                                  "weight 0.5 draws at least 1 of its 3 shards (4 of its 12 samples)"), messages[0]
    assert "fewer than one batch (a micro-batch of 8 on each of 1 rank: 8 samples)" in messages[0]
    assert "a weight of at least 0.667 for tiny" in messages[0] and "batch.micro" in messages[0]
    # a weight that guarantees two shards, or a batch that one shard fills, is not refused, whatever the seed
    for seed in (lucky, unlucky):
        ShardLoader(_mixture(4, 4, 4, weight=0.667), "train",
                    PipelineSpec(mode="pretrain", img_size=32, batch_size=8, order_seed=seed), "torch")
        ShardLoader(mixture, "train", PipelineSpec(mode="pretrain", img_size=32, batch_size=4, order_seed=seed),
                    "torch")


def test_a_set_of_whole_weights_below_one_batch_is_refused_naming_it_and_the_way_out():
    from mixmae_scale.data.loader import ShardLoader
    from mixmae_scale.data.spec import PipelineSpec

    with pytest.raises(DataError) as refused:
        ShardLoader(_mixture(3, 2), "train", PipelineSpec(mode="pretrain", img_size=32, batch_size=4, num_shards=2),
                    "torch")
    assert str(refused.value).startswith("tiny: split 'train' has 5 samples, fewer than one batch (a micro-batch of 4 "
                                         "on each of 2 ranks: 8 samples)"), refused.value
    assert "fewer ranks" in str(refused.value) and "batch.micro" in str(refused.value)


def test_a_set_below_one_batch_at_a_weight_other_than_1_is_not_said_to_have_its_epoch_s_samples():
    """Weight 0.5 of four shards of 4 draws exactly two every epoch (8 samples): below a batch of 16, refused, but
    the refusal said the split 'has 8 samples' (it has 16) and offered no higher weight."""
    from mixmae_scale.data.loader import ShardLoader
    from mixmae_scale.data.spec import PipelineSpec

    with pytest.raises(DataError) as refused:
        ShardLoader(_mixture(4, 4, 4, 4, weight=0.5), "train",
                    PipelineSpec(mode="pretrain", img_size=32, batch_size=16), "torch")
    assert "has 8 samples" not in str(refused.value), refused.value
    assert str(refused.value).startswith("tiny: an epoch reads 8 samples of split 'train' (its 16 at weight 0.5)"), \
        refused.value
    assert "a higher weight" in str(refused.value), refused.value


def test_a_fractional_weight_above_1_too_small_for_a_batch_does_not_draw_more_shards_than_it_has():
    """Weight 1.5 of two shards of 2 reads both and one more: 'draws at least 3 of its 2 shards' named a count
    above the set's shards; the shards read an epoch are said as visits of its shards."""
    from mixmae_scale.data.loader import ShardLoader
    from mixmae_scale.data.spec import PipelineSpec

    with pytest.raises(DataError) as refused:
        ShardLoader(_mixture(2, 4, weight=1.5), "train", PipelineSpec(mode="pretrain", img_size=32, batch_size=16),
                    "torch")
    assert "3 of its 2 shards" not in str(refused.value), refused.value
    assert ("tiny at weight 1.5 reads at least 3 shards an epoch (its 2 shards once each and 1 more: 8 samples, 9 "
            "on average)") in str(refused.value), refused.value
