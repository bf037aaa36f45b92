"""`mixmae probe --dense --baseline` on the small demo set: the demo's masks read through the loader, a per-pixel
read-out of each encoder's feature maps, and the margin report against random encoders.

Whether pretraining beats the random encoders is measured on the full demo over training seeds
(benchmarks/results/demo_dense_probe_cpu_fp32.json); here the "pretrained" encoder is one more random draw,
saved as an exported file, so the test needs no training run."""

from __future__ import annotations

import json

import pytest
import torch

from mixmae_scale.cli import main
from mixmae_scale.models.backbone import SwinBackbone
from mixmae_scale.models.convert_official import infer_architecture, save_weights
from mixmae_scale.models.swin import SwinShape


@pytest.fixture(scope="module")
def stand_in_encoder(tmp_path_factory):
    torch.manual_seed(123)
    backbone = SwinBackbone(SwinShape(96, 4, 32, (2, 2, 2, 2), (1, 2, 4, 8), (12, 12, 6, 3)))
    state = {k: v.contiguous() for k, v in backbone.state_dict().items()}
    path = tmp_path_factory.mktemp("encoder") / "encoder.safetensors"
    save_weights(path, state, infer_architecture(state), "encoder")
    return path


def test_dense_probe_with_baseline_reports_miou_and_the_margin_over_random_encoders(demo_shards, stand_in_encoder,
                                                                                   capsys):
    assert main(["probe", "--dense", "--init", str(stand_in_encoder), "--data", str(demo_shards), "--baseline",
                 "--baseline-seeds", "2", "--loader", "torch", "--threads", "1", "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    pretrained, randoms = report["pretrained"], report["random_init"]
    assert pretrained["num_classes"] == 11 and pretrained["val_samples"] == 80 and pretrained["train_samples"] == 300
    assert len(randoms) == 2 and randoms[0]["miou"] != randoms[1]["miou"]  # two draws, two read-outs
    # Background is most pixels and lies outside every figure: even a random encoder's read-out finds much of it.
    assert all(0 < r["miou"] < 100 and r["per_class_iou"][0] > 20 for r in [pretrained, *randoms])
    assert report["miou"]["margin"] == pytest.approx(pretrained["miou"] - (randoms[0]["miou"] + randoms[1]["miou"]) / 2)
    assert "mIoU: " in out and "random encoders" in out and report["not_meaningful"]  # 80 validation images


def test_dense_probe_refuses_shards_without_masks_with_the_way_forward(demo_shards, stand_in_encoder, tmp_path, capsys):
    manifest = json.loads((demo_shards / "dataset.json").read_text())
    manifest["splits"]["train"].pop("masks")
    manifest["base"] = str(demo_shards)
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            shard["index"] = str(demo_shards / shard["index"])
    (tmp_path / "dataset.json").write_text(json.dumps(manifest))
    assert main(["probe", "--dense", "--init", str(stand_in_encoder), "--data", str(tmp_path)]) != 0
    assert "has no segmentation masks, which --dense reads; make shards with masks" in capsys.readouterr().err
