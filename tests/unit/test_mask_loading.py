"""Segmentation masks through the shards and both loaders: a mask stays on its image through conversion, the
random crop, the flip and the evaluation view.

The images are bands of far-apart colours whose widths differ, and each mask labels a pixel with its band's
colour index, so after the pipeline the label a pixel's colour implies must be the mask's label; a flip or a
crop applied to one and not the other would disagree on most pixels."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixmae_scale.data.loader import ShardLoader
from mixmae_scale.data.spec import IMAGENET_MEAN, IMAGENET_STD, PipelineSpec
from mixmae_scale.shards.convert import ConvertOptions, convert
from mixmae_scale.shards.masks import ade20k_layout, prepare_mask

PALETTE = np.array([(230, 30, 30), (30, 200, 30), (30, 30, 230), (240, 240, 40), (250, 250, 250), (10, 10, 10)])


def banded_sample(rng: random.Random) -> tuple[Image.Image, Image.Image]:
    width, height = rng.randint(80, 140), rng.randint(80, 140)
    cuts = sorted(rng.sample(range(8, width - 8), 3))
    colours = rng.sample(range(len(PALETTE)), 4)
    labels = np.zeros((height, width), dtype=np.uint8)
    for band, (start, stop) in enumerate(zip([0, *cuts], [*cuts, width], strict=True)):
        labels[:, start:stop] = colours[band]
    labels[: height // 3, : width // 4] = 5 - labels[0, 0] if labels[0, 0] != 5 else 0  # a corner: not symmetric
    image = Image.fromarray(PALETTE[labels].astype(np.uint8))
    return image, Image.fromarray(labels, mode="L")


@pytest.fixture(scope="module")
def banded_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("banded")
    src = root / "images"
    rng = random.Random(0)
    for split, count in (("train", 12), ("val", 6)):
        for i in range(count):
            image, mask = banded_sample(rng)
            for folder, what, suffix in ((src / split / "n0", image, ".JPEG"),
                                         (src / "masks" / split / "n0", mask, ".png")):
                folder.mkdir(parents=True, exist_ok=True)
                what.save(folder / f"img{i:02d}{suffix}", quality=95)
    (src / "masks" / "classes.json").write_text(json.dumps([f"colour{i}" for i in range(len(PALETTE))]))
    convert(src, root / "shards", ConvertOptions(layout="imagenet", samples_per_shard=5, shard_bytes=None))
    return root / "shards"


def implied_labels(images: torch.Tensor) -> torch.Tensor:
    """Each pixel's nearest palette colour: the label its colour says."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (images.float() * std + mean) * 255
    distance = (rgb[:, None] - torch.tensor(PALETTE, dtype=torch.float32).view(1, -1, 3, 1, 1)).pow(2).sum(2)
    return distance.argmin(1)


@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("mode", ["finetune", "eval"])
def test_masks_stay_on_their_images_through_crop_flip_and_the_eval_view(banded_shards, backend, mode):
    spec = PipelineSpec(mode=mode, img_size=64, batch_size=6, num_threads=1, shuffle_buffer=12, crop_scale=(0.2, 1.0),
                        hflip=0.5, with_masks=True, with_meta=True)
    loader = ShardLoader(str(banded_shards), "train" if mode != "eval" else "val", spec, backend, 1)
    batches = [b for b, _ in loader.eval_batches()] if mode == "eval" else list(loader)
    loader.close()
    images, masks = torch.cat([b.images for b in batches]), torch.cat([b.masks for b in batches])
    assert masks.dtype == torch.long and masks.shape == (len(images), 64, 64)
    agree = (implied_labels(images) == masks).float().mean(dim=(1, 2))
    assert agree.min() > 0.95, agree  # only the pixels at band edges may differ (interpolation, JPEG)
    flipped = (implied_labels(images.flip(-1)) == masks).float().mean(dim=(1, 2))
    assert flipped.mean() < 0.8  # the check can fail: a mask flipped apart from its image disagrees


def test_a_split_without_masks_is_refused_when_masks_are_asked_for(demo_shards, tmp_path):
    from mixmae_scale.data.errors import DataError

    manifest = json.loads((demo_shards / "dataset.json").read_text())
    manifest["splits"]["val"].pop("masks", None)
    manifest["base"] = str(demo_shards)
    for shard in manifest["splits"]["val"]["shards"]:
        shard["index"] = str(demo_shards / shard["index"])
    (tmp_path / "dataset.json").write_text(json.dumps(manifest))
    spec = PipelineSpec(mode="eval", img_size=32, batch_size=4, with_masks=True)
    with pytest.raises(DataError, match="split 'val' has no segmentation masks"):
        ShardLoader(str(tmp_path), "val", spec, "torch", 1)


def test_ade20k_masks_map_other_to_ignore_and_shift_the_classes_down(tmp_path):
    raw = np.array([[0, 1, 150], [2, 0, 3]], dtype=np.uint8)
    Image.fromarray(raw, mode="L").save(tmp_path / "a.png")
    data, reason = prepare_mask(tmp_path / "a.png", ade20k_layout(tmp_path), (3, 2), (3, 2))
    assert reason == ""
    with Image.open(__import__("io").BytesIO(data)) as mask:
        assert np.asarray(mask).tolist() == [[255, 0, 149], [1, 255, 2]]
    Image.fromarray(np.array([[151]], dtype=np.uint8), mode="L").save(tmp_path / "b.png")
    data, reason = prepare_mask(tmp_path / "b.png", ade20k_layout(tmp_path), (1, 1), (1, 1))
    assert data is None and "value 151, beyond its 150 classes" in reason
    data, reason = prepare_mask(tmp_path / "a.png", ade20k_layout(tmp_path), (4, 2), (4, 2))
    assert data is None and "is 3x2, its image 4x2" in reason


def test_adopted_tars_whose_samples_carry_seg_png_keep_their_masks(banded_shards, tmp_path):
    from mixmae_scale.data.manifest import load_manifest
    from mixmae_scale.shards.adopt import AdoptOptions, adopt

    tars = tmp_path / "tars"
    tars.mkdir()
    for tar in banded_shards.glob("val-*.tar"):
        (tars / tar.name).write_bytes(tar.read_bytes())
    adopt(tars, tmp_path / "adopted", AdoptOptions(split="val"))
    assert load_manifest(tmp_path / "adopted").splits["val"].masks
    spec = PipelineSpec(mode="eval", img_size=32, batch_size=3, num_threads=1, with_masks=True)
    batches = [b for b, _ in ShardLoader(str(tmp_path / "adopted"), "val", spec, "torch", 1).eval_batches()]
    assert sum(len(b.masks) for b in batches) == 6 and all(b.masks.max() < len(PALETTE) for b in batches)


def test_an_ade20k_tree_converts_to_shards_with_masks_and_a_missing_annotation_is_rejected(tmp_path, capsys):
    from mixmae_scale.cli import main
    from mixmae_scale.data.manifest import load_manifest

    rng = np.random.default_rng(0)
    for split, count in (("training", 4), ("validation", 2)):
        for folder in ("images", "annotations"):
            (tmp_path / "ade" / folder / split).mkdir(parents=True)
        for i in range(count):
            name = f"ADE_{split}_{i:08d}"
            Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(
                tmp_path / "ade" / "images" / split / f"{name}.jpg", quality=95)
            if (split, i) != ("training", 3):
                labels = np.full((40, 56), i + 1, dtype=np.uint8)
                labels[:, 24:32] = 0  # "other", in the middle: the centre crop keeps it
                Image.fromarray(labels, mode="L").save(tmp_path / "ade" / "annotations" / split / f"{name}.png")
    assert main(["shards", "ade20k", "--src", str(tmp_path / "ade"), "--out", str(tmp_path / "shards"),
                 "--workers", "1", "--max-rejected", "0.5"]) == 0
    assert "with segmentation masks (seg.png)" in capsys.readouterr().out
    manifest = load_manifest(tmp_path / "shards")
    assert manifest.splits["train"].masks and len(manifest.mask_classes) == 150
    assert manifest.splits["train"].samples == 3 and manifest.splits["val"].samples == 2
    rejected = (tmp_path / "shards" / "rejected.jsonl").read_text()
    assert "no mask: expected" in rejected and "ADE_training_00000003.png" in rejected
    spec = PipelineSpec(mode="eval", img_size=32, batch_size=2, num_threads=1, with_masks=True)
    batches = [b for b, _ in ShardLoader(str(tmp_path / "shards"), "val", spec, "torch", 1).eval_batches()]
    values = {tuple(sorted(set(m.unique().tolist()))) for m in batches[0].masks}
    assert values == {(0, 255), (1, 255)}  # labels 1 and 2 shifted down; "other" ignored


def seg_spec(role: str, classes: int, batch: int = 6):
    """The loader spec of a segmentation run (`segment` training crops, `segment_val` the evaluation view) whose
    model predicts `classes` classes (segment.num_classes)."""
    from mixmae_scale.config import load_resolved
    from mixmae_scale.data.loaders import spec_for

    config = load_resolved("seg_demo", overrides=["segment.init=random", f"segment.num_classes={classes}",
                                                  "segment.crop_size=64"], world_size=1, train_samples=2600).config
    return spec_for(config, role, batch)


@pytest.mark.parametrize("role, split", [("segment", "train"), ("segment_val", "val")])
def test_a_model_of_fewer_classes_than_the_manifests_masks_is_refused_before_a_sample_is_read(banded_shards, role,
                                                                                             split):
    """segment.num_classes=3 on masks of 6 classes reached the loss's IndexError (a device-side assert on a GPU)
    mid-run, at the first label past the head."""
    from mixmae_scale.data.errors import DataError

    with pytest.raises(DataError, match=f"split '{split}' label 6 classes .*more than the model's 3 "):
        ShardLoader(str(banded_shards), split, seg_spec(role, 3), "torch", 1)
    ShardLoader(str(banded_shards), split, seg_spec(role, 6), "torch", 1).close()  # as many: read


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_masks_whose_manifest_bounds_their_labels_are_not_checked_again_batch_by_batch(banded_shards, backend,
                                                                                      monkeypatch):
    """A manifest that says how many classes its masks label was checked when the loader was made: its batches
    skip the per-batch pass over every mask pixel (the control: a manifest that does not say, below)."""
    from mixmae_scale.data import loader as loader_module

    limits = []
    checked = loader_module.require_mask_labels
    monkeypatch.setattr(loader_module, "require_mask_labels",
                        lambda masks, raw, classes: limits.append(classes) or checked(masks, raw, classes))
    loader = ShardLoader(str(banded_shards), "val", seg_spec("segment_val", 6), backend, 1)
    list(loader.eval_batches())
    loader.close()
    assert limits and set(limits) == {0}


@pytest.fixture(scope="module")
def unlisted_mask_classes(banded_shards, tmp_path_factory) -> Path:
    """The banded set with a manifest that does not say how many classes its masks label (tars adopted from
    another tool): the largest label is found only when the masks are decoded."""
    import shutil

    copy = tmp_path_factory.mktemp("unlisted") / "shards"
    shutil.copytree(banded_shards, copy)
    manifest = json.loads((copy / "dataset.json").read_text())
    del manifest["mask_classes"]
    (copy / "dataset.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("role, split", [("segment", "train"), ("segment_val", "val")])
def test_a_mask_label_past_the_models_classes_names_its_sample_and_value_when_the_manifest_does_not_say(
        unlisted_mask_classes, backend, role, split):
    from mixmae_scale.data.errors import DataError

    loader = ShardLoader(str(unlisted_mask_classes), split, seg_spec(role, 3), backend, 1)
    try:
        with pytest.raises(DataError, match=rf"{split}_\d{{8}}: its segmentation mask holds label [345], past the "
                                            r"model's 3 classes \(0-2, 255 = unlabelled\)"):
            list(loader) if role == "segment" else list(loader.eval_batches())
    finally:
        loader.close()
    every = ShardLoader(str(unlisted_mask_classes), split, seg_spec(role, 6), backend, 1)  # 6 classes: all fit
    assert every._mask_label_limit == 6  # checked batch by batch: the manifest does not bound the labels
    list(every) if role == "segment" else list(every.eval_batches())
    every.close()
