"""DALI and PyTorch loaders on real demo shards: equal batches, exact resume, same evaluation tensors."""

from __future__ import annotations

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
    for batch in itertools.islice(iter(loader), 3):
        for label, meta in zip(batch.labels.tolist(), batch.meta, strict=True):
            assert classes[label]["wnid"] == meta["wnid"]


def test_dali_and_torch_give_the_same_evaluation_tensors(demo_shards):
    tensors = {}
    for backend in ("dali", "torch"):
        loader = ShardLoader(str(demo_shards), "val", _spec(mode="eval", img_size=96), backend, workers=1)
        for batch in loader:
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
    with pytest.raises(DataError, match="train-000001.tar is named in .* but missing"):
        ShardLoader(str(broken), "train", _spec())
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
        ShardLoader(str(crafted), "val", _spec(mode="eval"))


def test_gpu_decoding_requested_without_a_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DataError, match="no CUDA device"):
        choose_decode_device("gpu", 0)
    assert choose_decode_device("auto", 0) is None


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
    # DALI's decoder does not say which sample failed; the PyTorch loader names the tar and the member.
    named = str(damaged) if backend == "dali" else f"{tar_path.name}: member {member.name.split('.')[0]}.jpg"
    assert "shards verify --decode" in message and named in message, message
