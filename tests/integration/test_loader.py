"""DALI and PyTorch loaders on real demo shards: equal batches, exact resume, same evaluation tensors."""

from __future__ import annotations

import collections
import itertools
import json
import shutil

import pytest
import torch

from mixmae_scale.data.loader import ShardLoader, choose_decode_device
from mixmae_scale.data.manifest import DataError
from mixmae_scale.data.spec import PipelineSpec


def _spec(**kw) -> PipelineSpec:
    base = dict(mode="pretrain", img_size=64, batch_size=8, num_threads=1, shuffle_buffer=64, seed=3,
                with_meta=True)
    return PipelineSpec(**{**base, **kw})


def _keys(batches) -> list[str]:
    return [m["source"] for b in batches for m in b.meta]


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_every_rank_gets_the_same_number_of_batches(demo_shards, backend):
    # 300 samples in 5 shards of unequal size: 2 ranks x batch 8 -> 18 batches each.
    counts = []
    for rank in range(2):
        loader = ShardLoader(str(demo_shards), "train", _spec(shard_id=rank, num_shards=2), backend, workers=1)
        for _ in range(2):  # two epochs: the stream wraps around without a short epoch
            batches = list(loader)
            counts.append(len(batches))
            assert all(b.images.shape == (8, 3, 64, 64) and b.labels.shape == (8,) for b in batches)
    assert counts == [300 // 16] * 4


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_resumed_loader_sees_exactly_the_samples_of_an_uninterrupted_one(demo_shards, backend):
    spec = _spec(shard_id=1, num_shards=2)
    full = ShardLoader(str(demo_shards), "train", spec, backend, workers=1)
    reference = list(itertools.islice(iter(full), 12))
    first = ShardLoader(str(demo_shards), "train", spec, backend, workers=1)
    head = list(itertools.islice(iter(first), 5))
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    resumed = ShardLoader(str(demo_shards), "train", spec, backend, workers=1)
    resumed.load_state_dict(state)
    tail = list(itertools.islice(iter(resumed), 7))
    assert _keys(head + tail) == _keys(reference)
    for got, want in zip(head + tail, reference, strict=True):
        assert torch.equal(got.images, want.images)  # the same crops and flips, not only the same files
    labels = torch.cat([b.labels for b in reference])
    assert ((labels >= 0) & (labels < 10)).all()


def test_labels_match_the_class_folders(demo_shards):
    loader = ShardLoader(str(demo_shards), "val", _spec(mode="eval"), "dali")
    classes = json.loads((demo_shards / "classes.json").read_text())
    for batch, _ in itertools.islice(loader.eval_batches(), 3):
        for label, meta in zip(batch.labels.tolist(), batch.meta, strict=True):
            assert classes[label]["wnid"] == meta["wnid"]


def test_dali_and_torch_give_the_same_evaluation_tensors(demo_shards):
    tensors = {}
    for backend in ("dali", "torch"):
        loader = ShardLoader(str(demo_shards), "val", _spec(mode="eval", img_size=96), backend, workers=1)
        for batch, _ in loader.eval_batches():
            for image, meta in zip(batch.images, batch.meta, strict=True):
                tensors.setdefault(meta["source"], {})[backend] = image
    both = [v for v in tensors.values() if len(v) == 2]
    assert len(both) == 80
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    diffs = [((v["dali"] - v["torch"]) * std).abs().mean().item() for v in both]  # in [0, 1] pixel units
    # The mean absolute difference over the split is the criterion; single sharp-edged pictures differ a
    # little more where the two libraries' bicubic antialiasing kernels disagree.
    assert sum(diffs) / len(diffs) < 2 / 255, sum(diffs) / len(diffs)
    assert max(diffs) < 3 / 255, max(diffs)
    # Sensitivity: two different images differ by far more than the threshold.
    assert ((both[0]["dali"] - both[1]["dali"]) * std).abs().mean() > 10 / 255


def test_clear_errors_for_missing_or_mismatched_shards(demo_shards, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ShardLoader(str(tmp_path / "nowhere"), "train", _spec())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="the folder is empty"):
        ShardLoader(str(tmp_path / "empty"), "train", _spec())
    broken = tmp_path / "broken"
    shutil.copytree(demo_shards, broken)
    (broken / "train-000001.tar").unlink()
    with pytest.raises(DataError, match=f"{broken / 'train-000001.tar'}: no such file"):
        list(ShardLoader(str(broken), "train", _spec(), "torch", workers=1))  # a rank opens the shards it reads
    (broken / "train-000001.idx").unlink()
    with pytest.raises(DataError, match=f"{broken / 'train-000001.idx'}: no such file.*index"):
        list(ShardLoader(str(broken), "train", _spec(), "torch", workers=1))
    with pytest.raises(DataError, match="no split 'test'"):
        ShardLoader(str(demo_shards), "test", _spec())
    with pytest.raises(DataError, match="fewer than one batch"):
        ShardLoader(str(demo_shards), "val", _spec(batch_size=64, num_shards=2))


def test_shards_with_unsafe_member_names_are_refused(demo_shards, tmp_path):
    crafted = tmp_path / "crafted"
    shutil.copytree(demo_shards, crafted)
    idx = crafted / "val-000001.idx"
    lines = idx.read_text().splitlines()
    fields = lines[1].split()
    fields[3] = "../../etc/" + fields[3]
    idx.write_text("\n".join([lines[0], " ".join(fields), *lines[2:]]) + "\n")
    with pytest.raises(DataError, match="absolute or contains '..'"):
        list(ShardLoader(str(crafted), "val", _spec(mode="eval"), "torch").eval_batches())


def test_gpu_decoding_requested_without_a_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DataError, match="no CUDA device"):
        choose_decode_device("gpu", 0)
    assert choose_decode_device("auto", 0) is None


def test_the_decode_device_line_names_the_loader_that_decodes(caplog):
    """With data.loader=torch the log said "DALI decodes images on the CPU"."""
    import logging

    with caplog.at_level(logging.INFO, logger="mixmae_scale.data.loader"):
        assert choose_decode_device("auto", 0, "torch") is None
    assert caplog.messages == ["the PyTorch loader decodes images on the CPU (data.loader=torch)"]


def test_the_pytorch_fallback_runs_where_dali_cannot_be_imported(demo_shards):
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['nvidia.dali'] = None\n"  # any DALI import now raises ImportError
        "from mixmae_scale.data.spec import PipelineSpec\n"
        "from mixmae_scale.data.loader import ShardLoader\n"
        f"loader = ShardLoader({str(demo_shards)!r}, 'train', PipelineSpec(mode='pretrain', img_size=64, "
        "batch_size=8), 'torch', workers=0)\n"
        "batch = next(iter(loader)); print(tuple(batch.images.shape))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(8, 3, 64, 64)" in result.stdout


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_an_undecodable_image_inside_a_shard_stops_with_the_shard_named(demo_shards, tmp_path, backend):
    import tarfile

    damaged = tmp_path / "damaged"
    shutil.copytree(demo_shards, damaged)
    tar_path = sorted(damaged.glob("val-*.tar"))[0]
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    with tar_path.open("r+b") as handle:  # same length, no JPEG (or any image) signature left
        handle.seek(member.offset_data)
        handle.write(b"\0" * 64)
    loader = ShardLoader(str(damaged), "val", _spec(mode="eval"), backend, workers=1)
    with pytest.raises(DataError) as error:
        for _ in loader.eval_batches():
            pass
    message = str(error.value)
    # DALI's decoder does not say which sample failed: the samples it was given last are named, the culprit
    # among them; the PyTorch loader names the one sample.
    named = f"{tar_path}:{member.name.split('.')[0]}"
    assert "shards verify --decode" in message and named in message, message


def _epoch_keys(loaders: list[ShardLoader], batches: int | None = None) -> list[str]:
    """Keys each loader yields for `batches` micro-batches (None: the rest of its current epoch)."""
    keys = []
    for loader in loaders:
        count = loader.batches_per_epoch - loader.batch_in_epoch if batches is None else batches
        keys += _keys(itertools.islice(iter(loader), count))
    return keys


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2), (2, 3)])
def test_a_resume_on_another_world_size_finishes_the_epoch_without_skipping(demo_shards, old, new):
    """Position by global samples: 300 samples, windows of 24. Interrupted after 5 micro-batches of 8 per rank,
    resumed on `new` ranks: the epoch's keys are each seen at most twice, those seen twice are exactly the read
    part of each old rank's current window (the count the loader reports), and none is missing beyond the
    remainder the new layout leaves out to keep batches whole."""
    spec = dict(num_shards=old, shuffle_buffer=24)
    before = [ShardLoader(str(demo_shards), "train", _spec(shard_id=r, **spec), "torch", workers=1)
              for r in range(old)]
    seen = _epoch_keys(before, 5)
    state = json.loads(json.dumps(before[0].state_dict()))
    after = []
    for rank in range(new):
        loader = ShardLoader(str(demo_shards), "train", _spec(shard_id=rank, num_shards=new, shuffle_buffer=24),
                             "torch", workers=1)
        loader.load_state_dict(state)
        after.append(loader)
    note = after[0].resume_note
    assert note and f"on {new} rank{'' if new == 1 else 's'}" in note
    rest = _epoch_keys(after)
    counts = {key: (seen + rest).count(key) for key in set(seen + rest)}
    assert max(counts.values()) <= 2
    repeated = sum(1 for c in counts.values() if c == 2)
    assert f"{repeated} of them read a second time" in note, (repeated, note)
    assert repeated == old * (5 * 8 % 24)
    left_out = int(note.split(", ")[-1].split()[0])
    assert 300 - len(counts) == left_out < new * 8
    assert all(loader.epoch == 0 and loader.batch_in_epoch == loader.batches_per_epoch for loader in after)


def test_a_mixture_visits_each_set_by_its_weight_and_resumes_exactly(demo_shards):
    from mixmae_scale.data.manifest import load_split
    from mixmae_scale.data.shard_sets import ShardMixture, WeightedSet

    def mixture():  # the val split (80 samples) twice per epoch and half of the train split's 5 shards
        return ShardMixture([WeightedSet(load_split(demo_shards, "val"), 2.0, "val"),
                             WeightedSet(load_split(demo_shards, "train"), 0.5, "train")])

    def sources_by_shard(split: str) -> dict[str, set[str]]:  # read from the tars themselves, not the loader
        import tarfile

        shards = {}
        for tar in sorted(demo_shards.glob(f"{split}-*.tar")):
            with tarfile.open(tar) as opened:
                shards[tar.name] = {json.loads(opened.extractfile(m).read())["source"] for m in opened
                                    if m.name.endswith(".json")}
        return shards

    spec = _spec(shuffle_buffer=32)
    loader = ShardLoader(mixture(), "train", spec, "torch", workers=1)
    keys = _keys(list(loader))  # one epoch, as read
    val = collections.Counter(k for k in keys if k.startswith("val/"))
    train = [k for k in keys if k.startswith("train/")]
    assert len(val) == 80 and set(val.values()) == {2}  # every val image exactly twice
    visited = {name: members & set(train) for name, members in sources_by_shard("train").items()}
    visited = {name: seen for name, seen in visited.items() if seen}
    # half of the 5 train shards (2, and a third in half the epochs), each whole and once: a shard read in part or
    # twice fails here
    assert len(visited) in (2, 3) and len(train) == len(set(train)) == sum(len(seen) for seen in visited.values())
    assert all(seen == sources_by_shard("train")[name] for name, seen in visited.items())
    print(f"\nval share measured: {sum(val.values()) / len(keys):.3f} ({len(keys)} samples; train shards "
          f"{sorted(visited)})")
    again = ShardLoader(mixture(), "train", spec, "torch", workers=1)
    head = _keys(itertools.islice(iter(again), 7))
    resumed = ShardLoader(mixture(), "train", spec, "torch", workers=1)
    resumed.load_state_dict(json.loads(json.dumps(again.state_dict())))
    assert head + _keys(itertools.islice(iter(resumed), 5)) == keys[:12 * 8]


def test_shards_in_object_storage_read_as_from_disk_in_few_requests(demo_shards, s3_bucket):
    """A real S3-protocol server (moto) on the loopback: the same batches as from the local folder, with one
    GET per run of samples within a shard (plus one per index and the manifest), not one per member."""
    from mixmae_scale.data import storage

    for path in (p for p in demo_shards.iterdir() if p.is_file()):
        storage.upload(path, f"s3://{s3_bucket}/demo/{path.name}")
    spec = _spec(shuffle_buffer=64)
    local = list(ShardLoader(str(demo_shards), "train", spec, "torch", workers=1))
    storage.REQUESTS.clear()
    remote_loader = ShardLoader(f"s3://{s3_bucket}/demo", "train", spec, "torch", workers=1)
    remote = list(remote_loader)
    assert _keys(remote) == _keys(local)
    assert all(torch.equal(a.images, b.images) for a, b in zip(remote, local, strict=True))
    samples = len(remote) * 8
    gets = storage.REQUESTS["GET"]
    # 1 manifest + 5 indexes + one byte range per shard (a range stays open across the windows that cut a shard);
    # the reader is up to 3 windows (of 64) into the next epoch by the time this one is consumed: at most 4 more.
    assert gets <= 1 + 5 + 5 + 4, dict(storage.REQUESTS)
    assert gets / samples < 0.1  # DALI's own S3 reader: about 2.3 (one request per member)
    with pytest.raises(DataError, match=rf"s3://{s3_bucket}/missing is not a shard set \(it has no dataset.json\): "
                       "nothing is stored under it"):
        ShardLoader(f"s3://{s3_bucket}/missing", "train", spec, "torch")
    # What `mixmae visualize` and `mixmae probe` read (their evaluation views) comes from the store the same way.
    from held_splits import load_images

    from mixmae_scale.finetune.evaluate import require_folder
    from mixmae_scale.visualize.reconstruction import first_images

    require_folder(f"s3://{s3_bucket}/demo", "--data")  # an s3:// set is not a local folder to look for
    assert torch.equal(first_images(f"s3://{s3_bucket}/demo", "val", 4, 64),
                       first_images(str(demo_shards), "val", 4, 64))
    remote_x, remote_y = load_images(f"s3://{s3_bucket}/demo", "val", 64, 16, "dali", 1)
    local_x, local_y = load_images(str(demo_shards), "val", 64, 16, "dali", 1)
    assert torch.equal(remote_x, local_x) and torch.equal(remote_y, local_y) and len(remote_y) == 80


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_shards_another_tool_wrote_train_where_they_are_after_adoption(tmp_path, backend):
    """Tars written by webdataset's own ShardWriter (JPEG, PNG and WebP members, keys with folders, `cls` labels),
    adopted without rewriting them: the loader reads them in place, decodes every format and keeps the labels."""
    import io

    import webdataset as wds
    from PIL import Image

    from mixmae_scale.shards.adopt import AdoptOptions, adopt

    source = tmp_path / "theirs"
    source.mkdir()
    formats = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}
    with wds.ShardWriter(str(source / "part-%04d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(40):
            ext = list(formats)[i % 4]
            buffer = io.BytesIO()
            Image.new("RGB", (80 + i, 60), (6 * i, 100, 255 - 6 * i)).save(buffer, format=formats[ext])
            sink.write({"__key__": f"class{i % 4}/item{i:03d}", ext: buffer.getvalue(), "cls": i % 4})
    before = {p.name: p.stat().st_mtime_ns for p in source.iterdir()}
    adopt(source, tmp_path / "index", AdoptOptions())
    spec = _spec(with_meta=False, shuffle_buffer=16)
    batches = list(ShardLoader(str(tmp_path / "index"), "train", spec, backend, workers=1))
    assert len(batches) == 40 // 8 and all(b.images.shape == (8, 3, 64, 64) for b in batches)
    labels = torch.cat([b.labels for b in batches])
    assert sorted(labels.tolist()) == sorted(i % 4 for i in range(40))
    assert all(torch.isfinite(b.images).all() for b in batches)
    evaluated = list(ShardLoader(str(tmp_path / "index"), "train", _spec(mode="eval", with_meta=False), backend,
                                 workers=1).eval_batches())
    assert sum(real for _, real in evaluated) == 40
    assert {p.name: p.stat().st_mtime_ns for p in source.iterdir()} == before  # read where they are, not rewritten


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_adopted_tars_whose_file_names_hold_whitespace_train_and_evaluate_every_sample(tmp_path, backend):
    """A tar's file name is in no index line (member names are, and those with whitespace are rejected): tars named
    `part 1.tar` and `sub dir/tab<TAB>x.tar` are read where they are, every sample once in evaluation, labels kept."""
    import io
    import tarfile

    from PIL import Image

    from mixmae_scale.shards.adopt import AdoptOptions, adopt

    source = tmp_path / "theirs"
    for label, name in enumerate(("part 1.tar", "sub dir/tab\tx.tar")):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(source / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(8):
                buffer = io.BytesIO()
                Image.new("RGB", (40, 30), (30 * i, 90, 200)).save(buffer, format="JPEG")
                for ext, data in (("jpg", buffer.getvalue()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"s{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    adopt(source, tmp_path / "index", AdoptOptions())
    batches = list(ShardLoader(str(tmp_path / "index"), "train", _spec(with_meta=False, shuffle_buffer=8), backend,
                               workers=1))
    assert sorted(torch.cat([b.labels for b in batches]).tolist()) == [0] * 8 + [1] * 8
    evaluated = list(ShardLoader(str(tmp_path / "index"), "train", _spec(mode="eval", with_meta=False), backend,
                                 workers=1).eval_batches())
    assert sum(real for _, real in evaluated) == 16


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_a_sixteen_bit_png_reads_with_the_pixels_dali_gives_not_saturated(tmp_path, backend):
    """Adopted shards keep a 16-bit PNG as it is; Pillow's convert("RGB") clipped it nearly white in the torch
    loader (mean 255) where DALI scales 0..65535 to 0..255 (mean 128)."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    from mixmae_scale.shards.adopt import AdoptOptions, adopt

    gradient = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    source = tmp_path / "theirs"
    source.mkdir()
    with wds.TarWriter(str(source / "part-0000.tar")) as sink:
        for i in range(8):
            buffer = io.BytesIO()
            Image.fromarray(gradient).save(buffer, format="PNG")
            sink.write({"__key__": f"item{i:03d}", "png": buffer.getvalue()})
    adopt(source, tmp_path / "index", AdoptOptions())
    spec = _spec(mode="eval", with_labels=False, with_meta=False)
    batch, _ = next(iter(ShardLoader(str(tmp_path / "index"), "train", spec, backend, workers=1).eval_batches()))
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    pixels = (batch.images * std + mean) * 255
    assert abs(pixels.mean().item() - 127.5) < 3  # DALI: 127.5 (round(v / 257)); torch before: 255


def test_each_evaluation_sample_comes_out_of_the_decoder_with_its_own_id_on_every_rank(demo_shards):
    """The ids evaluation checks its coverage with (data/sample_ids.py) are the samples' own, in the images'
    order, through DALI and the PyTorch loader alike: over 3 ranks (shares of 27, 27 and 26 in batches of 8, the
    last padded) the real samples' ids are 80 distinct ones adding up to the split's."""
    from mixmae_scale.data.sample_ids import Coverage

    seen = {}
    for backend in ("dali", "torch"):
        total, ids = Coverage(), []
        for rank in range(3):
            loader = ShardLoader(str(demo_shards), "val", _spec(mode="eval", shard_id=rank, num_shards=3), backend,
                                 workers=1)
            for batch, valid in loader.eval_batches():
                ids += batch.ids[:valid].tolist()
                total += Coverage(valid, int(batch.ids[:valid].sum()))
        assert total == loader.split_coverage() and total.samples == 80 == len(set(ids))
        seen[backend] = ids
    assert seen["dali"] == seen["torch"]


def test_an_evaluation_that_counts_one_sample_twice_and_another_not_at_all_is_refused(demo_shards, tmp_path,
                                                                                      monkeypatch):
    """The right count of samples is not enough: one sample delivered in place of another (a duplicate plus an
    omission, which a count passes) stops the evaluation with a message that says so. The split's own sum is
    hashed from its indexes once per loader, not at every evaluation."""
    import torch.distributed as dist

    import mixmae_scale.data.loader as loader_module
    from mixmae_scale.finetune.evaluate import evaluate

    hashed, real = [], loader_module.split_coverage
    monkeypatch.setattr(loader_module, "split_coverage", lambda mixture: hashed.append(mixture) or real(mixture))

    class OneSampleTwice:
        def __init__(self, loader: ShardLoader) -> None:
            self.loader, self.mixture = loader, loader.mixture

        def split_coverage(self):
            return self.loader.split_coverage()

        def eval_batches(self):
            for number, (batch, valid) in enumerate(self.loader.eval_batches()):
                if number == 1:
                    batch.ids[1] = batch.ids[0]
                yield batch, valid

    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 10))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        loader = ShardLoader(str(demo_shards), "val", _spec(mode="eval"), "torch", workers=1)
        assert evaluate(model, loader, torch.device("cpu"), "fp32", 80)["samples"] == 80
        with pytest.raises(RuntimeError, match="counted 80 samples .* a sample was counted twice and another not"):
            evaluate(model, OneSampleTwice(loader), torch.device("cpu"), "fp32", 80)
        assert len(hashed) == 1
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("change", ["rewritten", "cut_short", "reordered_at_the_same_size"])
def test_a_shard_that_changes_under_a_reading_loader_stops_it_naming_the_shard(demo_shards, tmp_path, backend,
                                                                               change):
    """Shards on a shared file system can be rewritten (a conversion rerun into the same folder) or cut short (a
    copy still in progress) while a run reads them. The loader was built against the manifest; the read that
    meets the changed shard stops with the shard's path and what to do, not a decoder error or a wrong sample.
    The same samples written again in another order keep each tar's size, which the manifest check cannot see:
    the tar header before each image's bytes can."""
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    loader = ShardLoader(str(shards), "train", _spec(shuffle_buffer=8), backend, workers=1)
    batches = iter(loader)
    next(batches)
    for tar in sorted(shards.glob("train-*.tar")):
        data = tar.read_bytes()
        if change == "reordered_at_the_same_size":
            tar.write_bytes(_reordered(data))
            assert tar.stat().st_size == len(data)
        else:
            tar.write_bytes(data + b"\0" * 1024 if change == "rewritten" else data[: len(data) // 2])
    with pytest.raises(DataError) as raised:
        for _ in batches:
            pass
    message = str(raised.value)
    assert "train-0000" in message and ".tar" in message, message
    assert "the shard changed after it was indexed" in message or "cut short or replaced" in message, message


def _reordered(data: bytes) -> bytes:
    """The tar's samples (members grouped by key, in order) written again last first, as a writer's rerun with
    another shuffle would: the same members, so the same size (as the original, without record padding)."""
    import io
    import tarfile

    samples: dict[str, list[tuple[tarfile.TarInfo, bytes]]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            samples.setdefault(member.name.split(".")[0], []).append((member, tar.extractfile(member).read()))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for members in reversed(list(samples.values())):
            for member, payload in members:
                tar.addfile(member, io.BytesIO(payload))
    written = out.getvalue()  # padded to tarfile's 10 KiB records: the zeros past the original's end go
    assert len(written) >= len(data) and not written[len(data):].strip(b"\0")
    return written[:len(data)]


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_the_exif_orientation_tag_is_ignored_as_the_official_code_does_unless_asked(tmp_path, backend):
    """The official loader (PIL's open) ignores the EXIF orientation tag, while DALI's decoders apply it by default
    and the fallback called exif_transpose: an image a phone stored on its side trained upright here, unlike the
    official code (conversion keeps the tag on copied and re-encoded images alike). Stored pixels: red left, blue
    right; tag 6 (rotate 90 degrees clockwise) would put red on top."""
    import io

    from PIL import Image

    from mixmae_scale.shards.convert import ConvertOptions, convert

    image = Image.new("RGB", (96, 48), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 48, 48))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    (tmp_path / "src").mkdir()
    for i in range(2):
        (tmp_path / "src" / f"side{i}.jpg").write_bytes(buf.getvalue())
    convert(tmp_path / "src", tmp_path / "shards", ConvertOptions(layout="folder", splits=("train",), shard_bytes=None))

    def red_on_the(exif_orientation: bool) -> str:
        spec = _spec(mode="eval", batch_size=2, with_labels=False, exif_orientation=exif_orientation)
        batch = next(iter(ShardLoader(str(tmp_path / "shards"), "train", spec, backend, workers=1)))
        red = batch.images[0, 0] - batch.images[0, 2]  # normalised red minus blue, 64 x 64
        halves = {"left": red[:, :32].mean(), "right": red[:, 32:].mean(), "top": red[:32].mean(),
                  "bottom": red[32:].mean()}
        return max(halves, key=halves.get)

    assert red_on_the(exif_orientation=False) == "left"
    assert red_on_the(exif_orientation=True) == "top"
