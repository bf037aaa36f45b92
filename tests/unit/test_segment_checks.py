"""What segmentation refuses of its data, made off the manifests before the run folder is touched: a set without
masks, masks of more classes than segment.num_classes, a validation split smaller than the ranks. These refusals came
from the loaders, after start_run had made the run folder (an empty checkpoints/ and a config.yaml of a run that
never ran); the validation split's masks were first looked at by the first evaluation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mixmae_scale.data.errors import DataError


def segmenting(shards: Path, monkeypatch, world: int, *overrides: str):
    """seg_demo's config from random weights on `shards`, whose start sees `world` ranks (the process group, where
    there is one, is the test's)."""
    from mixmae_scale.config import load_config
    from mixmae_scale.engine import loop

    monkeypatch.setattr(loop.distributed, "init", lambda local_rank: (0, world, torch.device("cpu")))
    return load_config("seg_demo", None, ["segment.init=random", f"data.shards={shards}", *overrides])[0]


def test_a_set_without_masks_is_refused_before_the_run_folder_is_made(tmp_path, monkeypatch, gloo_of_one):
    from tiny_sets import tiny_set

    from mixmae_scale.segment import job

    shards = tiny_set(tmp_path, {"cats": 4, "dogs": 4}, val_fraction=0.25)
    config = segmenting(shards, monkeypatch, 1, "batch.global_batch=2")
    with pytest.raises(DataError, match=rf"^{shards}: split 'train' has no segmentation masks"):
        job.segment(config, [], tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_masks_of_more_classes_than_the_model_are_refused_before_the_run_folder_is_made(tmp_path, monkeypatch,
                                                                                        demo_shards, gloo_of_one):
    from mixmae_scale.segment import job

    config = segmenting(demo_shards, monkeypatch, 1, "segment.num_classes=5")
    with pytest.raises(DataError, match=r"the masks of split 'train' label 11 classes \(its manifest's mask_classes\), "
                                        r"more than the model's 5 \(segment.num_classes\)"):
        job.segment(config, [], tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_validation_split_without_masks_is_refused_before_the_run_folder_is_made(tmp_path, monkeypatch,
                                                                                   demo_shards, gloo_of_one):
    """Its refusal came from the first evaluation's loader, after the run had trained up to it."""
    import json

    from mixmae_scale.segment import job

    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    manifest = json.loads((shards / "dataset.json").read_text())
    del manifest["splits"]["val"]["masks"]
    (shards / "dataset.json").write_text(json.dumps(manifest))
    config = segmenting(shards, monkeypatch, 1)
    with pytest.raises(DataError, match=rf"^{shards}: split 'val' has no segmentation masks"):
        job.segment(config, [], tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_validation_split_smaller_than_the_ranks_is_refused_before_the_run_folder_is_made(tmp_path, monkeypatch,
                                                                                           demo_shards):
    from mixmae_scale.segment import job

    config = segmenting(demo_shards, monkeypatch, 81, "batch.global_batch=162")
    with pytest.raises(DataError, match=rf"^split 'val' of {demo_shards} has 80 images for 81 ranks .*; run the "
                                        "segmentation fine-tuning on 80 GPUs or fewer"):
        job.segment(config, [], tmp_path / "run")
    assert not (tmp_path / "run").exists()
