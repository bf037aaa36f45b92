"""Held-out images for a shard set with only a train split (data/heldout.py): which samples are held out, that the
choice is the same on every world size and never read by training, and when it is refused."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mixmae_scale.atomic_file import write_text
from mixmae_scale.data.errors import DataError
from mixmae_scale.data.heldout import choose_heldout, heldout_count, split_tail
from mixmae_scale.data.manifest import SplitShards, load_split
from mixmae_scale.data.shard_reader import RankStream, ordered_samples
from mixmae_scale.data.shard_sets import Layout, ShardMixture, WeightedSet, training_mixture
from mixmae_scale.shards.writer import TarShardWriter

SHARD_SIZES = (7, 5, 9, 3)  # uneven, as adopted shards are: 24 samples


def write_set(folder: Path, sizes=SHARD_SIZES, with_val: bool = False) -> Path:
    """Real tars of tiny JPEGs with their indexes and a manifest: keys "s<shard>-<n>"."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(jpeg, "JPEG")
    splits = {}
    for split, counts in (("train", sizes), ("val", (4,))) if with_val else (("train", sizes),):
        entries = []
        for shard, count in enumerate(counts):
            name = f"{split}-{shard:03d}"
            writer = TarShardWriter(folder / f"{name}.tar")
            for n in range(count):
                writer.add(f"s{shard}-{n}", {"jpg": jpeg.getvalue()})
            writer.close()
            (folder / f"{name}.idx").write_text(writer.index_text())
            entries.append({"name": f"{name}.tar", "index": f"{name}.idx", "samples": count,
                            "bytes": (folder / f"{name}.tar").stat().st_size})
        splits[split] = {"samples": sum(counts), "labeled": False, "shards": entries}
    write_text(folder / "dataset.json", json.dumps({"format": "mixmae-scale-shards", "version": 2, "classes": [],
                                                    "splits": splits}))
    return folder


def keys(samples) -> list[str]:
    return [s.key.rsplit(":", 1)[1] for s in samples]


def training_keys(mixture: ShardMixture, world: int, micro: int = 2) -> list[str]:
    """Every key the ranks of `world` read in epoch 0."""
    layout = Layout.whole_epoch(0, mixture.visits(0, 0).samples, world, micro)
    out = []
    for rank in range(world):
        stream = RankStream(mixture, rank, layout, 0, 0, 4, None)
        try:
            for _ in range(layout.batches):
                out += keys(stream.next().samples)
        finally:
            stream.close()
    return out


def test_the_tail_split_holds_the_last_samples_in_manifest_order_and_the_rest_trains(tmp_path):
    folder = write_set(tmp_path / "set")
    train = load_split(folder, "train")
    kept, held = split_tail(train, 5)  # the last shard's 3 and the third shard's last 2
    assert (kept.samples, held.samples) == (19, 5)
    assert keys(ordered_samples(ShardMixture([WeightedSet(held)]), 0, 1)) == ["s2-7", "s2-8", "s3-0", "s3-1", "s3-2"]
    assert keys(ordered_samples(ShardMixture([WeightedSet(kept)]), 0, 1)) == \
        [f"s{shard}-{n}" for shard, count in enumerate((7, 5, 7)) for n in range(count)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_training_on_any_world_size_never_reads_a_held_out_sample(tmp_path, world):
    folder = write_set(tmp_path / "set")
    heldout = choose_heldout(str(folder), "train", "val", "auto", 8)
    held = set(keys(ordered_samples(heldout.mixture, 0, 1)))
    trained = training_keys(heldout.exclude_from(training_mixture(str(folder), "train", [])), world)
    assert len(held) == 8 and not held & set(trained)
    assert len(trained) == len(set(trained)) == 16 // (world * 2) * world * 2  # drop-last, as any epoch


def test_the_choice_is_the_same_however_often_and_wherever_it_is_made(tmp_path):
    """choose_heldout reads nothing of the rank (each rank makes the choice itself), so it is enough that it is the
    same on every call; what a rank then reads of it is the held-out loader's share, which must be the whole part
    from its start on every rank of every world size (ZeRO-3 forwards are collective: every rank scores the same
    batches). The control: a validation loader at the same places reads shares that differ."""
    from mixmae_scale.config import load_config
    from mixmae_scale.data.loaders import LoaderPlace, spec_for

    folder = write_set(tmp_path / "set")
    first = choose_heldout(str(folder), "train", "val", "auto", 6)
    again = choose_heldout(str(folder), "train", "val", "auto", 6)
    assert first == again and first.train_tail == 6 and first.train_samples == 24
    assert keys(ordered_samples(first.mixture, 0, 1)) == keys(ordered_samples(again.mixture, 0, 1))
    config, _ = load_config("tiny", None, [f"data.shards={folder}"])
    held_out = [f"s2-{n}" for n in range(6, 9)] + ["s3-0", "s3-1", "s3-2"]
    places = [LoaderPlace(rank, world) for world in (1, 2, 3) for rank in range(world)]
    for place in places:
        spec = spec_for(config, "heldout", 2, place)
        assert keys(ordered_samples(first.mixture, spec.shard_id, spec.num_shards)) == held_out, place
    val_shares = {tuple(keys(ordered_samples(first.mixture, spec.shard_id, spec.num_shards)))
                  for spec in (spec_for(config, "val", 2, place) for place in places)}
    assert len(val_shares) == 6  # the whole part at world 1, and five distinct shares at worlds 2 and 3


def test_a_validation_split_is_used_as_it_is_and_training_keeps_every_sample(tmp_path):
    folder = write_set(tmp_path / "set", with_val=True)
    heldout = choose_heldout(str(folder), "train", "val", "auto", 8)
    assert heldout.train_tail == 0 and heldout.images.split == "val" and heldout.images.samples == 4
    mixture = training_mixture(str(folder), "train", [])
    assert heldout.exclude_from(mixture) is mixture
    forced = choose_heldout(str(folder), "train", "val", "train", 8)
    assert forced.train_tail == 8 and forced.images.split == "train"


def test_a_mixture_loses_the_tail_only_from_the_held_out_set(tmp_path):
    folder, other = write_set(tmp_path / "set"), write_set(tmp_path / "other", sizes=(6,))
    heldout = choose_heldout(str(folder), "train", "val", "auto", 4)
    mixture = training_mixture("unused", "train", [(str(other), 1.0, None), (str(folder) + "/", 2.0, None)])
    cut = heldout.exclude_from(mixture)
    assert [s.shards.samples for s in cut.sets] == [6, 20] and [s.weight for s in cut.sets] == [1.0, 2.0]


def test_a_held_out_count_does_not_depend_on_the_world_size_and_covers_the_grids():
    assert heldout_count(4, 16) == 64
    assert heldout_count(1, 4) == 8  # the reconstruction grids' eight images


def write_adopted_set(folder, sizes=SHARD_SIZES):
    """A set whose train split says it was adopted (`mixmae shards adopt`), which changes the way out offered."""
    adopted = write_set(folder, sizes)
    manifest = json.loads((adopted / "dataset.json").read_text())
    manifest["splits"]["train"]["adopted_from"] = str(adopted)
    (adopted / "dataset.json").write_text(json.dumps(manifest))
    return adopted


def test_too_small_a_train_split_or_a_missing_required_split_is_refused_with_the_way_out(tmp_path):
    folder = write_set(tmp_path / "set")
    # A converted set cannot take an adopted split (`shards adopt` refuses it): the way out was a refused command.
    with pytest.raises(DataError, match=r"no split 'val', and 'train' has 24 samples, too few to hold out 13 .*convert "
                                         r"the images again .*--val-fraction.*logging.heldout_batches"):
        choose_heldout(str(folder), "train", "val", "auto", 13)
    adopted = write_adopted_set(tmp_path / "adopted")
    with pytest.raises(DataError, match=r"too few to hold out 13 .*adopt a validation split .*--out .*adopted "
                                         r"--split val"):
        choose_heldout(str(adopted), "train", "val", "auto", 13)
    with_val = write_set(tmp_path / "with-val", with_val=True)  # forced to the tail: the val split is not missing
    with pytest.raises(DataError, match=r"data.heldout=train holds out the end of 'train' \(the set's 'val' is not "
                                         r"read\), and 'train' has 24 samples, too few .*heldout=auto reads 'val'"):
        choose_heldout(str(with_val), "train", "val", "train", 13)
    with pytest.raises(DataError, match=r"no split 'val' \(data.val_split\); it has \['train'\]. data.heldout=auto"):
        choose_heldout(str(folder), "train", "val", "split", 8)
    with pytest.raises(DataError, match="data.heldout must be one of auto, split, train"):
        choose_heldout(str(folder), "train", "val", "tail", 8)


def test_a_refusal_at_the_grids_floor_names_the_floor_not_the_settings(tmp_path):
    """Asked for a tail (data.heldout=train: data.heldout=auto trains a set this small without one)."""
    folder = write_set(tmp_path / "set", sizes=(5, 4))  # 9 samples: too few to hold out 8 and train on as many
    count = heldout_count(1, 2)  # 2 by the settings, 8 by the grids' floor
    with pytest.raises(DataError) as refused:
        choose_heldout(str(folder), "train", "val", "train", count)
    message = str(refused.value)
    assert "too few to hold out 8 (the 8 images the reconstruction grids need at the least" in message
    assert "(logging.heldout_batches x batch.micro)" not in message and "lower logging.heldout_batches" not in message
    assert message.endswith("; or data.heldout=auto, which holds out nothing from a set this small and trains on all "
                            "9 without a held-out loss")


def test_a_set_below_16_images_without_a_validation_split_trains_on_all_of_them_without_a_held_out_loss(tmp_path):
    """A folder of 12 images without a validation split could not be pretrained at all: the refusal named
    --val-fraction, and at 0.05 that holds out no image below 16. data.heldout=auto now holds out nothing, says so,
    and the held-out loss is not measured (with that reason), never a number over no images."""
    from mixmae_scale.pretrain.heldout_loss import heldout_loss

    folder = write_set(tmp_path / "set", sizes=(7, 5))
    heldout = choose_heldout(str(folder), "train", "val", "auto", heldout_count(4, 16))
    assert heldout.images is None and heldout.train_tail == 0 and heldout.train_samples == 12
    assert heldout.none_because == (
        f"nothing held out: {folder}/dataset.json has no split 'val', and 'train' has 12 samples, fewer than the 16 "
        "a hold-out of its tail needs (the 8 images the reconstruction grids need at the least, and as many to train "
        "on)")
    assert heldout.describe() == (
        f"held-out: {heldout.none_because}; training reads all 12 samples, and no held-out loss or reconstruction "
        "grid is made; to measure one, give the set a 'val' split of at least batch.micro images: convert the images "
        "again with one (`mixmae shards folder --src SRC --out NEW --val-fraction F`, F large enough to hold out that "
        "many)")
    train = training_mixture(str(folder), "train", [])
    assert heldout.exclude_from(train) is train and len(training_keys(train, world=2)) == 12  # every image trains
    measured = heldout_loss(None, None, heldout, None, "fp32")  # nothing to read: no engine, loader or config used
    assert (measured.loss, measured.images, measured.reason) == (None, 0, heldout.none_because)
    assert heldout.summary() == {"split": None, "location": None, "samples": 0, "train_tail": 0,
                                 "none": heldout.none_because}
    with pytest.raises(DataError, match="no split 'val' \\(data.val_split\\)"):  # data.heldout=split still insists
        choose_heldout(str(folder), "train", "val", "split", 8)
    adopted = write_adopted_set(tmp_path / "adopted", sizes=(4, 3))  # the way to a val split is the adoption's
    assert choose_heldout(str(adopted), "train", "val", "auto", 8).describe().endswith(
        f"adopt a validation split into the set (`mixmae shards adopt SRC --out {adopted} --split val`)")


def test_an_index_that_does_not_match_the_manifest_is_still_caught_in_a_part(tmp_path):
    folder = write_set(tmp_path / "set")
    lines = (folder / "train-003.idx").read_text().splitlines()
    (folder / "train-003.idx").write_text("\n".join([lines[0].replace(" 3", " 2")] + lines[1:3]) + "\n")
    heldout = choose_heldout(str(folder), "train", "val", "auto", 5)
    with pytest.raises(DataError, match="train-003.idx: 2 samples, the manifest says 3"):
        list(ordered_samples(heldout.mixture, 0, 1))


def test_cut_parts_cover_every_sample_once_for_random_counts():
    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = tuple(int(n) for n in rng.integers(1, 9, size=rng.integers(1, 6)))
        total = sum(sizes)
        if total < 2:
            continue
        count = int(rng.integers(1, total))
        split = SplitShards("train", "/x", "/x", tuple(f"t{i}.tar" for i in range(len(sizes))),
                            tuple(f"t{i}.idx" for i in range(len(sizes))), sizes, (0,) * len(sizes), total, False, 0)
        kept, held = split_tail(split, count)
        lines = [(kept.names[i], kept.first_line_of(i) + n) for i in range(len(kept.names))
                 for n in range(kept.samples_per_shard[i])]
        lines += [(held.names[i], held.first_line_of(i) + n) for i in range(len(held.names))
                  for n in range(held.samples_per_shard[i])]
        assert lines == [(f"t{i}.tar", n) for i, size in enumerate(sizes) for n in range(size)]
        assert held.samples == count and all(held.index_lines_of(i) == sizes[int(held.names[i][1:-4])]
                                             for i in range(len(held.names)))


def test_the_heldout_loss_closes_its_loader_when_it_stops_early_or_scores_nothing(monkeypatch):
    """It broke out of the loader after `heldout_batches` and never closed it: the reader threads hold the loader,
    so two readers and pipelines per run stayed alive (more in an in-process sweep)."""
    from types import SimpleNamespace

    import torch

    from mixmae_scale.pretrain import heldout_loss as module

    closed = []

    class Loader:
        def __init__(self, length: int) -> None:
            self.layout = SimpleNamespace(length=length)

        def __iter__(self):
            while True:  # a stream that would go on: only the caller's break ends it
                yield SimpleNamespace(images=torch.zeros(2, 3, 8, 8))

        def close(self) -> None:
            closed.append(True)

    class Model(torch.nn.Module):
        def sample_mask(self, generator, device):
            return None

    model = Model()
    engine = lambda images, mask: SimpleNamespace(loss=torch.tensor(0.5))  # noqa: E731
    engine.module = model
    config = SimpleNamespace(batch=SimpleNamespace(micro=2), logging=SimpleNamespace(heldout_batches=3),
                             data=SimpleNamespace(val_split="val"), run=SimpleNamespace(seed=0))
    heldout = SimpleNamespace(mixture=None, images=SimpleNamespace(split="val"))
    monkeypatch.setattr(module, "spec_for", lambda *a, **k: None)
    for length, expected in ((10, 0.5), (1, None)):  # scored 3 batches and broke off; too few images to score
        monkeypatch.setattr(module, "open_loader", lambda *a, length=length: Loader(length))
        result = module.heldout_loss(engine, config, heldout, torch.device("cpu"), "fp32")
        assert result.loss == expected and closed.pop() and not closed


def _set_of(shards: int, weight: float, name: str) -> WeightedSet:
    """A set of `shards` shards of 10 samples, as its manifest describes it (nothing is read)."""
    split = SplitShards("train", name, name, tuple(f"{n}.tar" for n in range(shards)),
                        tuple(f"{n}.idx" for n in range(shards)), (10,) * shards, (1000,) * shards, 10 * shards,
                        False, 0)
    return WeightedSet(split, weight, name)


def test_fractional_weights_read_each_set_by_its_weight_over_epochs_and_each_epoch_the_same_twice(caplog):
    """round(f x shards) never read a set of one shard at 0.5 or four at 0.1 (rounded to 0), and read three at 0.5
    as two: the mean over epochs of the shards read per set is weight x shards, and the share the log reports."""
    cases = [(1, 0.5), (4, 0.1), (3, 0.5), (5, 0.5), (2, 1.25)]
    with caplog.at_level("WARNING"):
        mixture = ShardMixture([_set_of(count, weight, f"set{n}") for n, (count, weight) in enumerate(cases)])
    warned = caplog.text
    epochs = 2000
    read = np.zeros(len(cases))
    for epoch in range(epochs):
        visits = mixture.visits(7, epoch)
        read += np.bincount(visits.source, minlength=len(cases))
        assert visits.shard.size == ShardMixture(mixture.sets).visits(7, epoch).shard.size  # same epoch, same draw
        assert (mixture._plan(7, epoch).shard == visits.shard).all()
    expected = np.array([count * weight for count, weight in cases])
    assert np.allclose(read / epochs, expected, rtol=0.08), (read / epochs, expected)
    shares = dict(mixture.shares())
    total = read.sum()
    for n, share in enumerate(shares.values()):
        assert abs(read[n] / total - share) < 0.01
    assert "set0 has 1 shard at weight 0.5" in warned and "set1 has 4 shards at weight 0.1" in warned
    assert "set3" not in warned  # 2.5 shards: some of it is read every epoch


def test_a_train_split_below_twice_the_grids_floor_is_not_told_to_lower_the_settings(tmp_path):
    """A folder of 12 images without a validation split was told to lower logging.heldout_batches or batch.micro,
    and no value does: a hold-out is never below the grids' 8, which needs 16 images."""
    folder = write_set(tmp_path / "set", sizes=(7, 5))
    with pytest.raises(DataError) as refused:  # asked for a tail: data.heldout=auto trains it without one
        choose_heldout(str(folder), "train", "val", "train", heldout_count(4, 16))
    message = str(refused.value)
    assert "'train' has 12 samples, too few to hold out 64 (logging.heldout_batches x batch.micro)" in message
    assert "lower logging.heldout_batches" not in message and "--val-fraction" in message
    assert "no lower setting helps: a hold-out is never below the 8 images the reconstruction grids need, and 12 " \
           "samples cannot hold out 8 and train on as many" in message
    with_val = write_set(tmp_path / "with-val", sizes=(7, 5), with_val=True)  # a tail asked for over a val split
    message = str(pytest.raises(DataError, choose_heldout, str(with_val), "train", "val", "train", 64).value)
    assert "no lower setting helps" in message and "lower logging.heldout_batches or batch.micro" not in message
    assert "heldout=auto reads 'val' instead" in message and "holds out nothing" not in message
    assert "lower logging.heldout_batches or batch.micro" in str(  # 16 or more: lowering them does help
        pytest.raises(DataError, choose_heldout, str(write_set(tmp_path / "more", sizes=(9, 8))), "train", "val",
                      "auto", 64).value)


def test_a_missing_validation_split_names_the_way_to_add_one_wherever_it_is_asked_for(tmp_path):
    """Fine-tuning, `mixmae probe` and `mixmae eval` over a folder converted without --val-fraction said `no split
    'val'; it has ['train']` and no more; the held-out refusal named the way to add one."""
    from mixmae_scale.data.manifest import load_split

    folder = write_set(tmp_path / "set")
    with pytest.raises(DataError, match=r"no split 'val'; it has \['train'\]; convert the images again with a "
                                         r"validation split into a new folder \(`mixmae shards folder --src SRC "
                                         r"--out NEW --val-fraction 0.05`\)"):
        load_split(str(folder), "val")
    with pytest.raises(DataError, match=r"no split 'valid'; it has \['train'\]$"):  # a conversion makes 'val' only
        load_split(str(folder), "valid")
    adopted = write_adopted_set(tmp_path / "adopted")
    with pytest.raises(DataError, match=r"no split 'val'; it has \['train'\]; adopt a validation split into the set "
                                         r"\(`mixmae shards adopt SRC --out .*adopted --split val`\)"):
        load_split(str(adopted), "val")


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_the_heldout_loss_reads_only_the_window_its_batches_need(tmp_path, monkeypatch, backend):
    """Its loader read two windows ahead, epoch after epoch on a split smaller than a window, until the score closed
    it: one held-out batch of 16 read a 160-image validation split three times per rank, a GET per tar each time,
    at the start and the end of every launch (benchmarks/object_storage_resume.py). It now stops after the window
    that holds its batches and the decoder's prefetch: here one batch of one image, the split's one window."""
    import time
    from types import SimpleNamespace

    import torch

    from mixmae_scale.data import storage
    from mixmae_scale.data.heldout import HeldOut
    from mixmae_scale.pretrain.heldout_loss import heldout_loss

    folder = write_set(tmp_path / "set", with_val=True)  # val: one tar of 4 samples
    heldout = HeldOut(load_split(folder, "val"), 0, 0)
    ranges = []
    open_range = storage.open_range

    def counted(url, start, end):
        ranges.append((Path(url).name, start, end))
        return open_range(url, start, end)

    monkeypatch.setattr(storage, "open_range", counted)

    class Model(torch.nn.Module):
        def sample_mask(self, generator, device):
            return None

    def engine(images, mask):
        time.sleep(0.5)  # a forward's time: the reader runs ahead meanwhile
        return SimpleNamespace(loss=torch.tensor(0.25))

    engine.module = Model()
    config = SimpleNamespace(batch=SimpleNamespace(micro=1), logging=SimpleNamespace(heldout_batches=1),
                             data=SimpleNamespace(val_split="val", loader=backend, num_threads=1,
                                                  exif_orientation=False),
                             model=SimpleNamespace(img_size=32), run=SimpleNamespace(seed=0))
    result = heldout_loss(engine, config, heldout, torch.device("cpu"), "fp32")
    assert (result.loss, result.images) == (0.25, 1)
    assert [name for name, _, _ in ranges] == ["val-000.tar"], ranges


def test_a_loader_opened_for_some_batches_says_so_when_asked_for_more(tmp_path):
    """The limit is the caller's promise: the reader hands out the window that holds the batches (and the decoder's
    prefetch), whole; a batch past that window is an error naming the limit, never a wait on a reader that has
    stopped."""
    import itertools

    from mixmae_scale.data.loader import ShardLoader
    from mixmae_scale.data.shard_reader import DECODER_PREFETCH
    from mixmae_scale.data.spec import PipelineSpec

    folder = write_set(tmp_path / "set")  # 24 train samples
    spec = PipelineSpec(mode="eval", img_size=32, batch_size=2, num_threads=1, with_labels=False)
    loader = ShardLoader(str(folder), "train", spec, "torch", workers=1, batches=1)
    try:
        stream = iter(loader)  # one window: the epoch's 12 batches (the window, 4096 samples, is larger)
        assert loader.layout.batches == 12 and DECODER_PREFETCH == 2
        assert len(list(itertools.islice(stream, 12))) == 12
        assert list(stream) == []  # the epoch ends
        with pytest.raises(DataError, match="opened for 3 micro-batch"):
            next(iter(loader))  # the next epoch's first batch
    finally:
        loader.close()


def test_a_tiny_set_asked_for_another_validation_name_is_told_the_conversion_names_it_val(tmp_path):
    """A conversion's held-out split is named 'val' (`way_to_add_split`): with data.val_split=validation, "give the
    set a 'validation' split: convert the images again with --val-fraction" made a 'val' the run still did not
    read; the refusals of a larger set say to set data.val_split=val, and so does this."""
    folder = write_set(tmp_path / "set", sizes=(7, 5))
    said = choose_heldout(str(folder), "train", "validation", "auto", 8).describe()
    assert said.endswith("then set data.val_split=val"), said


def test_the_line_about_no_hold_out_counts_what_training_reads_when_data_sources_give_it(tmp_path):
    """With data.sources the training mixture is theirs, not data.shards' train split: the line said "training
    reads all 12 samples" (data.shards' count) of a run reading a 40-sample mixture."""
    folder = write_set(tmp_path / "set", sizes=(7, 5))
    mixture = training_mixture(str(folder), "train", [(str(write_set(tmp_path / "a", sizes=(20,))), 1.0, None),
                                                      (str(write_set(tmp_path / "b", sizes=(10,))), 2.0, None)])
    heldout = choose_heldout(str(folder), "train", "val", "auto", heldout_count(4, 16))
    line = heldout.describe(mixture)
    assert "training reads the data.sources mixture (40 samples per epoch), and no held-out loss" in line
    assert "12 samples," not in line.split("; training reads")[1]
    big = write_set(tmp_path / "big", sizes=(20, 20))
    tail = choose_heldout(str(big), "train", "val", "auto", 8)
    line = tail.describe(tail.exclude_from(training_mixture(str(big), "train", [(str(big), 1.0, None),
                                                                               (str(tmp_path / "a"), 1.0, None)])))
    assert line.endswith("training reads the data.sources mixture (52 samples per epoch), without them (data.heldout)")


def test_a_summary_says_when_the_start_and_end_losses_scored_other_held_out_images(monkeypatch, caplog):
    """The loss at step 0 travels with the checkpoints; resumed with other held-out images (another validation split,
    another tail), the run reported '1.0 at step 0 -> 0.8' across two sets of images as if it had learnt."""
    from types import SimpleNamespace

    import torch

    from mixmae_scale.config.derive import load_resolved
    from mixmae_scale.data.heldout import HeldOut
    from mixmae_scale.pretrain import job as module
    from mixmae_scale.pretrain.heldout_loss import HeldOutLoss

    config = load_resolved("tiny", world_size=1, train_samples=300).config

    def split(counts):
        return SplitShards("val", "/v", "/v", tuple(f"{n}.tar" for n in range(len(counts))),
                           tuple(f"{n}.idx" for n in range(len(counts))), counts, (0,) * len(counts), sum(counts),
                           False, 0)

    monkeypatch.setattr(module, "heldout_loss", lambda *a: HeldOutLoss(0.8, 16))
    loop = SimpleNamespace(ctx=SimpleNamespace(rank=0), engine=None, device=torch.device("cpu"),
                           derived=SimpleNamespace(dtype="fp32"), step=10)
    first = module.PretrainJob(config, None, HeldOut(split((16, 8)), 0, 0))
    first.on_start(loop)
    kept = first.state()
    assert kept["heldout_start_images"] == first.scores
    same = module.PretrainJob(config, None, HeldOut(split((16, 8)), 0, 0))
    same.load_state(kept)
    assert same.summary(loop)["heldout_same_images"] is True
    other = module.PretrainJob(config, None, HeldOut(split((16, 9)), 0, 0))
    other.load_state(kept)
    with caplog.at_level("WARNING"):
        summary = other.summary(loop)
    assert summary["heldout_same_images"] is False and summary["heldout_loss_start"] == 0.8
    assert "at step 0 on other held-out images than the 0.8000 at step 10" in caplog.text
    older = module.PretrainJob(config, None, HeldOut(split((16, 9)), 0, 0))
    older.load_state({"heldout_start": kept["heldout_start"]})  # a checkpoint that did not keep the images
    assert older.summary(loop)["heldout_same_images"] is None


def write_superset(folder: Path, held_set: Path, extra: int = 6, order=(3, 0, 1, 2), skip: int | None = None) -> Path:
    """A manifest at `folder` over `held_set`'s train tars (in another order) plus one more tar written beside them,
    with indexes of its own: an adopted index over the same tars and others, which is no copy of the held-out set.
    `skip`: the shard whose index here leaves out its first sample (another adoption's lines are not the set's)."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (30, 20, 10)).save(jpeg, "JPEG")
    listed = json.loads((held_set / "dataset.json").read_text())["splits"]["train"]["shards"]
    entries = []
    if extra:
        writer = TarShardWriter(held_set / "more-000.tar")
        for n in range(extra):
            writer.add(f"m-{n}", {"jpg": jpeg.getvalue()})
        writer.close()
        (folder / "more-000.idx").write_text(writer.index_text())
        entries.append({"name": "more-000.tar", "index": "more-000.idx", "samples": extra,
                        "bytes": (held_set / "more-000.tar").stat().st_size})
    for shard in order:
        entry = dict(listed[shard])
        lines = (held_set / entry["index"]).read_text().splitlines()
        if shard == skip:
            version, count = lines[0].split()
            lines = [f"{version} {int(count) - 1}", *lines[2:]]
            entry["samples"] -= 1
        (folder / f"copy-{entry['index']}").write_text("\n".join(lines) + "\n")
        entries.append({**entry, "index": f"copy-{entry['index']}"})
    splits = {"train": {"samples": sum(e["samples"] for e in entries), "labeled": False, "shards": entries}}
    write_text(folder / "dataset.json", json.dumps({"format": "mixmae-scale-shards", "version": 2, "classes": [],
                                                    "base": str(held_set), "splits": splits}))
    return folder


def sample_names(mixture: ShardMixture, source: int) -> list[str]:
    """`<tar url>:<key>` of every sample a source of the mixture reads, once each, in manifest order."""
    alone = ShardMixture([WeightedSet(mixture.sets[source].shards)])
    return [str(Path(s.key.rsplit(":", 1)[0]).resolve()) + ":" + s.key.rsplit(":", 1)[1]
            for s in ordered_samples(alone, 0, 1)]


@pytest.mark.parametrize("skip", [None, 2])
def test_a_source_over_the_held_out_tars_and_more_leaves_out_the_held_out_samples(tmp_path, skip):
    """A source whose tars are a superset of the held-out train split's (an adopted index over the same tars and
    others) was read whole: only a source with exactly the held-out split's tars lost the tail, so training read
    the held-out images. The samples are left out by their identity within the shared tars."""
    folder = write_set(tmp_path / "set")
    superset = write_superset(tmp_path / "superset", folder, skip=skip)
    heldout = choose_heldout(str(folder), "train", "val", "auto", 8)
    held = set(sample_names(heldout.mixture, 0))
    mixture = training_mixture("unused", "train", [(str(superset), 1.0, None), (str(folder), 1.0, None)])
    cut = heldout.exclude_from(mixture)
    read = sample_names(cut, 0)
    assert len(held) == 8 and not held & set(read), sorted(held & set(read))
    assert len(read) == len(set(read)) == 24 + 6 - 8 - (skip is not None)  # every other sample, once
    assert not held & set(sample_names(cut, 1)) and cut.sets[1].shards.samples == 16
    assert [s.weight for s in cut.sets] == [1.0, 1.0]


def test_a_source_of_held_out_images_alone_is_refused_naming_it_and_the_way_out(tmp_path):
    """A source listing only tars of the held-out tail keeps nothing once its held-out samples are left out: refused
    by name, where an empty set would have been read as an epoch of no samples."""
    folder = write_set(tmp_path / "set")
    tail_only = write_superset(tmp_path / "tail-only", folder, extra=0, order=(3,))
    heldout = choose_heldout(str(folder), "train", "val", "auto", 8)
    mixture = training_mixture("unused", "train", [(str(folder), 1.0, None), (str(tail_only), 1.0, None)])
    with pytest.raises(DataError) as refused:
        heldout.exclude_from(mixture)
    assert str(refused.value).startswith(f"data.sources: {tail_only} holds only held-out images"), refused.value
    assert "drop it from data.sources" in str(refused.value) and "data.val_split" in str(refused.value)


def test_a_tar_named_by_its_url_in_a_local_manifest_is_the_same_tar_as_in_a_remote_one(tmp_path):
    """A manifest's shard name may be a URL standing alone (storage.join); a local manifest's tars were named by
    joining every name under its resolved folder, so its URL-named tar ('<folder>/s3:/bucket/...') was not the held-out
    set's tar of that URL, and a source listing it kept the held-out samples."""
    from mixmae_scale.data.heldout import tar_identities
    from mixmae_scale.data.manifest import SplitShards

    def split(location, base, names):
        return SplitShards("train", location, base, names, tuple(n.rsplit("/", 1)[-1] + ".idx" for n in names),
                           (4,) * len(names), (100,) * len(names), 4 * len(names), False, 0)

    remote = split("s3://bucket/set", "s3://bucket/set", ("train-000.tar",))
    local = split(str(tmp_path), str(tmp_path), ("s3://bucket/set/train-000.tar", "more.tar"))
    assert tar_identities(local) == ("s3://bucket/set/train-000.tar", str((tmp_path / "more.tar").resolve()))
    assert tar_identities(remote)[0] in tar_identities(local)


def test_a_key_repeated_within_a_shared_tar_leaves_out_only_the_held_out_sample_of_it(tmp_path):
    """Matched by key, a tar holding one key twice (a tool that wrote it twice) lost both samples where only the later
    one was held out: each sample of a tar is told by where its image lies in the tar, which every index of that tar
    gives alike."""
    folder = write_set(tmp_path / "set", sizes=(10, 6))
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(jpeg, "JPEG")
    writer = TarShardWriter(folder / "train-001.tar")
    for n in range(6):
        writer.add(f"k{n % 3}", {"jpg": jpeg.getvalue()})  # k0 k1 k2 k0 k1 k2: the tail's 4 are k2 k0 k1 k2
    writer.close()
    (folder / "train-001.idx").write_text(writer.index_text())
    manifest = json.loads((folder / "dataset.json").read_text())
    manifest["splits"]["train"]["shards"][1]["bytes"] = (folder / "train-001.tar").stat().st_size
    write_text(folder / "dataset.json", json.dumps(manifest))
    superset = write_superset(tmp_path / "superset", folder, extra=2, order=(0, 1))
    heldout = choose_heldout(str(folder), "train", "val", "auto", 4)
    cut = heldout.exclude_from(training_mixture("unused", "train", [(str(superset), 1.0, None)]))
    assert cut.sets[0].shards.samples == 2 + 10 + 6 - 4, cut.sets[0].shards
    kept = [(first, lines) for name, first, lines in zip(cut.sets[0].shards.names, cut.sets[0].shards.first_line,
                                                          cut.sets[0].shards.samples_per_shard, strict=True)
            if name == "train-001.tar"]
    assert kept == [(0, 2)], kept  # k0 k1 of the first three, the held-out four left out
