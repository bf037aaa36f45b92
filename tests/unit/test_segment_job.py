"""The segmentation job's pieces, without a launch: the loss ignores unlabelled pixels, the distributed mIoU
counts real samples only, the optimizer groups decay the encoder and not the head, a seed names one
initialisation, the encoder comes from the named weights, and the configuration is checked at the edge."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mixmae_scale.cli.job_commands import segment_message
from mixmae_scale.config import load_resolved
from mixmae_scale.config.load import ConfigError
from mixmae_scale.models.convert_official import WeightsError, infer_architecture, save_weights
from mixmae_scale.models.mixmae import swin_shape
from mixmae_scale.models.swin import SwinEncoder
from mixmae_scale.segment.build import build_segmenter, check_init, param_groups, training_flops_per_image
from mixmae_scale.segment.evaluate import evaluate_segmentation, segmentation_loss
from mixmae_scale.segment.job import build_model

IGNORE = 255


def seg_config(*overrides: str):
    return load_resolved("seg_demo", overrides=["segment.init=random", *overrides], world_size=1,
                         train_samples=2600).config


def test_loss_is_the_mean_over_labelled_pixels_and_ignores_the_rest():
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    masks = torch.randint(0, 4, (2, 8, 8))
    masks[0, :4] = IGNORE
    loss = segmentation_loss(logits, masks, IGNORE)
    keep = masks != IGNORE
    expected = nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[keep], masks[keep])
    assert torch.allclose(loss, expected)
    loss.backward()
    assert logits.grad[0, :, :4].abs().sum() == 0  # ignored pixels get no gradient


def test_a_micro_batch_without_labelled_pixels_has_a_zero_finite_loss():
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((2, 8, 8), IGNORE), IGNORE)
    assert loss.item() == 0.0
    loss.backward()


@dataclass
class SegBatch:
    images: torch.Tensor
    masks: torch.Tensor


class ReadsTheAnswer(nn.Module):
    """Logits that pick the class written into the image's first channel: a model with a known prediction."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes, self.scale = num_classes, nn.Parameter(torch.ones(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        chosen = images[:, 0].long().clamp(0, self.num_classes - 1)
        return nn.functional.one_hot(chosen, self.num_classes).permute(0, 3, 1, 2).float() * self.scale


def test_miou_counts_the_real_samples_and_leaves_out_the_padding():
    masks = torch.zeros(2, 4, 4, dtype=torch.long)
    masks[:, :, 2:] = 1  # half the pixels class 0, half class 1
    predicted_zero = torch.zeros(2, 3, 4, 4)
    padded = torch.stack([predicted_zero[0], torch.ones(3, 4, 4)])  # its second sample is padding, predicted 1
    batches = [(SegBatch(predicted_zero, masks), 2), (SegBatch(padded, masks), 1)]
    result = evaluate_segmentation(ReadsTheAnswer(2), batches, torch.device("cpu"), "fp32", 2, IGNORE,
                                   expected_samples=3)
    # everything predicted 0: IoU(0) = 1/2 (3 x 8 right of 3 x 16 in the union), IoU(1) = 0
    assert result["samples"] == 3
    assert result["miou"] == pytest.approx(25.0)
    assert result["per_class_iou"] == pytest.approx([50.0, 0.0])
    assert result["pixel_accuracy"] == pytest.approx(50.0)


def test_miou_is_100_for_a_perfect_prediction_and_ignored_pixels_do_not_count():
    masks = torch.randint(0, 3, (2, 8, 8))
    images = masks[:, None].float().expand(2, 3, 8, 8).clone()
    masks[:, 0] = IGNORE
    images[:, 0, 0] = 2.0  # wrong where the mask is ignored
    result = evaluate_segmentation(ReadsTheAnswer(3), [(SegBatch(images, masks), 2)], torch.device("cpu"),
                                   "fp32", 3, IGNORE)
    assert result["miou"] == pytest.approx(100.0)


def test_a_split_counted_short_is_an_error():
    batch = SegBatch(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="counted 2 samples, the split has 3"):
        evaluate_segmentation(ReadsTheAnswer(2), [(batch, 2)], torch.device("cpu"), "fp32", 2, IGNORE, 3)


def test_the_encoder_is_layer_decayed_and_the_head_learns_at_the_full_rate():
    config = seg_config()
    model = build_segmenter(config)
    groups = param_groups(model, 1e-3, 0.05, 0.75)
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each parameter in one group
    head = [g for g in groups if all(n.startswith("decode_head.") for n in g["names"])]
    assert {g["lr"] for g in head} == {1e-3}
    assert sum(len(g["names"]) for g in head) == len(list(model.decode_head.parameters()))
    embed = next(g for g in groups if "backbone.encoder.patch_embed.proj.weight" in g["names"])
    assert embed["lr"] == pytest.approx(1e-3 * 0.75 ** (sum(config.model.depths) + 1))
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert "decode_head.classifier.bias" in no_decay and "decode_head.classifier.weight" not in no_decay


def test_the_heads_rate_is_scaled_and_the_encoders_is_not():
    model = build_segmenter(seg_config())
    plain, scaled = param_groups(model, 1e-3, 0.05, 0.75), param_groups(model, 1e-3, 0.05, 0.75, head_lr_scale=30)
    for before, after in zip(plain, scaled, strict=True):
        factor = 30 if before["names"][0].startswith("decode_head.") else 1
        assert after["lr"] == pytest.approx(before["lr"] * factor)
        assert after["lr_scale"] == pytest.approx(before["lr_scale"] * factor)
    assert seg_config().segment.head_lr_scale == 30  # the demo profile's (its comment says why)


def test_the_logged_lr_is_the_schedules_not_the_heads():
    """metrics.csv's `lr` had been the last group's, which is the head's at 30x in the demo profile."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from mixmae_scale.engine.optimizer import scheduled_learning_rate

    peak = 1e-3
    groups = param_groups(build_segmenter(seg_config()), peak, 0.05, 0.75, head_lr_scale=30)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=peak)
    scheduler = WarmupCosineLR(optimizer, total_num_steps=20, warmup_num_steps=5, warmup_min_ratio=0.0,
                               warmup_type="linear", cos_min_ratio=1e-3)
    seen = []
    for _ in range(12):
        scheduler.step()
        logged = scheduled_learning_rate(peak, scheduler)
        seen.append(logged)
        for group, first in zip(optimizer.param_groups, groups, strict=True):
            assert group["lr"] == pytest.approx(logged * first["lr"] / peak)
        assert optimizer.param_groups[-1]["lr"] == pytest.approx(30 * logged)
    assert seen[0] == 0 and seen[4] == pytest.approx(0.8 * peak)  # linear warm-up over 5 steps
    assert 0.95 * peak < seen[5] <= peak and seen[-1] < seen[5]  # then the cosine


def test_a_seed_names_one_initialisation_whatever_the_global_generator():
    torch.manual_seed(123)
    first = build_model(seg_config("run.seed=1")).state_dict()
    torch.manual_seed(456)
    again = build_model(seg_config("run.seed=1")).state_dict()
    other = build_model(seg_config("run.seed=2")).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["decode_head.classifier.weight"], other["decode_head.classifier.weight"])
    assert not torch.equal(first["backbone.encoder.layers.0.blocks.0.attn.qkv.weight"],
                           other["backbone.encoder.layers.0.blocks.0.attn.qkv.weight"])


def test_the_encoder_is_the_exported_one_and_its_shape_comes_from_the_weights(tmp_path):
    config = seg_config()
    encoder = SwinEncoder(swin_shape(config.model))
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    save_weights(tmp_path / "encoder.safetensors", state, infer_architecture(state), "encoder")
    config.segment.init = str(tmp_path / "encoder.safetensors")
    model = build_segmenter(config)
    loaded = model.backbone.state_dict()
    for key, value in state.items():
        if not key.startswith("encoder.norm."):
            assert torch.equal(loaded[key], value), key


def test_missing_or_unset_init_is_said_before_any_launch(tmp_path):
    config = seg_config()
    config.segment.init = None
    with pytest.raises(WeightsError, match="--init random"):
        check_init(config)
    config.segment.init = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="segment.init=.*nowhere"):
        check_init(config)


@pytest.mark.parametrize("override, message", [
    ("segment.ignore_index=3", "segment.ignore_index=3 is one of the 11 class labels"),
    ("segment.crop_size=100", "segment.crop_size must be a positive multiple of 32"),
    ("segment.head_channels=48", "segment.head_channels must be a positive multiple of 32"),
    ("segment.layer_decay=0", "segment.layer_decay must be in"),
    ("segment.head_lr_scale=0", "segment.head_lr_scale must be positive"),
])
def test_bad_segment_keys_are_refused_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        seg_config(override)


def test_training_flops_grow_with_the_crop_area():
    model = build_segmenter(seg_config())
    small, large = training_flops_per_image(model, 96), training_flops_per_image(model, 192)
    assert 3.5 < large / small < 4.5  # about 4x the pixels (window attention grows a little faster)


def test_the_run_ends_with_the_last_and_best_miou():
    summary = {"steps": 162, "last": {"miou": 41.234}, "best": {"miou": 43.5, "step": 100}}
    assert segment_message(summary) == "segmentation fine-tuned 162 steps: mIoU 41.23% (best 43.50% at step 100)"
    summary["last"]["precision"] = "bf16"  # a run's evaluations say what they computed in (eval.jsonl, this line)
    assert segment_message(summary) == ("segmentation fine-tuned 162 steps: mIoU 41.23% in bf16 (best 43.50% at "
                                        "step 100)")


def test_a_segmentation_export_rebuilds_the_same_model_and_an_encoder_file_is_refused(tmp_path):
    from mixmae_scale.segment.build import is_segmenter_file, load_segmenter

    config = seg_config("segment.head_channels=32")
    model = build_model(config).eval()
    state = model.state_dict()
    encoder = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.encoder.")}
    settings = {"num_classes": 11, "ignore_index": IGNORE, "crop_size": 96, "head_channels": 32,
                "pool_scales": [1, 2, 3]}
    save_weights(tmp_path / "segmenter.safetensors", state, {**infer_architecture(encoder), "segment": settings},
                 "segment")
    loaded, read = load_segmenter(tmp_path / "segmenter.safetensors")
    assert read == settings
    images = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), model(images))
    save_weights(tmp_path / "encoder.safetensors", encoder, infer_architecture(encoder), "encoder")
    assert not is_segmenter_file(tmp_path / "encoder.safetensors")
    with pytest.raises(WeightsError, match="not a segmentation model"):
        load_segmenter(tmp_path / "encoder.safetensors")


def test_eval_of_a_segmentation_model_takes_img_size_or_refuses_it_in_one_line(tmp_path, monkeypatch, capfd):
    """`mixmae eval --img-size` was ignored for a segmentation model: it evaluated at its crop size whatever was
    asked. A multiple of 32 is now the size evaluated (and reported); another size is refused naming the crop size."""
    from mixmae_scale.cli import main
    from mixmae_scale.engine import distributed
    from mixmae_scale.segment import build, evaluate

    settings = {"num_classes": 11, "ignore_index": IGNORE, "crop_size": 96, "head_channels": 32, "pool_scales": [1]}
    evaluated = []
    monkeypatch.setattr(build, "is_segmenter_file", lambda source: True)
    monkeypatch.setattr(build, "load_segmenter", lambda source: (build_segmenter(seg_config()), settings))
    monkeypatch.setattr(distributed, "init", lambda local_rank: (0, 1, torch.device("cpu")))
    monkeypatch.setattr(evaluate, "evaluate_segmenter", lambda model, used, *args: evaluated.append(used) or {
        "miou": 1.0, "precision": "fp32", "samples": 1, "split": "val", "data": "d", "weights": "w",
        "img_size": used["crop_size"]})
    for size, expected in ((None, 96), ("160", 160)):
        assert main(["eval", "--init", "seg.safetensors", "--data", str(tmp_path),
                     *(["--img-size", size] if size else [])]) == 0
        assert evaluated.pop()["crop_size"] == expected
        assert f"at {expected} px on the 1 image" in capfd.readouterr().out
    assert main(["eval", "--init", "seg.safetensors", "--data", str(tmp_path), "--img-size", "100"]) == 2
    assert capfd.readouterr().err.endswith("mixmae: error: --img-size 100: a segmentation model takes a multiple of "
                                            "32 (its backbone's last stride); it was trained on 96 px crops\n")
    assert evaluated == []


def test_the_logged_lr_is_the_one_the_step_ran_at():
    """The row logged after step k gave the lr step k+1 would run at (DeepSpeed's engine steps the scheduler after
    the optimizer). DeepSpeed's WarmupCosineLR runs step k at iteration k - 2 (docs/recipe.md): the log says that."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from mixmae_scale.engine.optimizer import last_step_learning_rate

    peak, warmup = 1e-3, 4
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = WarmupCosineLR(optimizer, total_num_steps=20, warmup_num_steps=warmup, warmup_min_ratio=0.0,
                               warmup_type="linear", cos_min_ratio=1e-3)
    used = []
    for _ in range(12):
        used.append(optimizer.param_groups[0]["lr"])  # what this optimizer step runs at
        scheduler.step()  # DeepSpeed's engine, after the step
        assert last_step_learning_rate(peak, scheduler) == pytest.approx(used[-1], abs=1e-12), len(used)
    assert used[:5] == pytest.approx([0, 0, peak / 4, peak / 2, 3 * peak / 4], abs=1e-12)


class RunStarted(Exception):
    """Stands for everything after the start's checks: the process group, the run folder, the training."""


def test_a_run_that_resumes_does_not_need_its_init_file(tmp_path, monkeypatch):
    """segment.init was required to exist before the run looked at its own checkpoint, which holds every weight."""
    from mixmae_scale.engine.checkpointing import store
    from mixmae_scale.segment import job

    def start_run(*args, **kwargs):
        raise RunStarted

    monkeypatch.setattr(job, "start_run", start_run)
    config = seg_config(f"segment.init={tmp_path / 'gone.safetensors'}")
    killed = tmp_path / "killed"
    (killed / "checkpoints" / "step00000006").mkdir(parents=True)
    store.seal(killed / "checkpoints" / "step00000006", {"step": 6, "world_size": 1, "kind": "regular"})
    with pytest.raises(RunStarted):
        job.segment(config, [], killed)
    with pytest.raises(FileNotFoundError, match="segment.init=.*gone.safetensors: not found"):
        job.segment(config, [], tmp_path / "new")


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_resumed_model_takes_its_encoders_shape_from_its_checkpoint_not_the_gone_init(world_of_one, tmp_path,
                                                                                         stage):
    """The encoder's shape comes from segment.init's weights (not model.*): resumed without them, it is read off
    the checkpoint's own tensors (ZeRO-3 keeps placeholders and the shapes beside them)."""
    from mixmae_scale.models.swin import SwinShape
    from tests.unit.test_zero0_weights import trained_checkpoint

    shape = SwinShape(img_size=96, patch_size=4, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4),
                      window_size=(12, 12, 6, 3))  # not seg_demo's model.* (embed 32, depths 2, 2, 2, 2)
    state = {f"encoder.{k}": v for k, v in SwinEncoder(shape).state_dict().items()}
    init = tmp_path / "encoder.safetensors"
    save_weights(init, state, infer_architecture(state), "encoder")
    config = seg_config(f"segment.init={init}")
    model = build_model(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}  # before ZeRO-3 partitions the parameters
    checkpoint, _ = trained_checkpoint(model, tmp_path / "run", stage, "fp32", None)
    init.unlink()
    resumed = build_model(config, checkpoint)
    assert {k: v.shape for k, v in resumed.state_dict().items()} == expected
    assert resumed.backbone.shape == shape


def test_run_json_says_where_the_encoder_came_from_and_a_resume_leaves_the_first_launchs_record(tmp_path):
    from mixmae_scale.segment.build import segment_start, started_from

    config = seg_config()
    assert segment_start(config, resumed=False) is None
    assert started_from(config, None) == {"key": "segment.init", "path": "random"}
    encoder = SwinEncoder(swin_shape(config.model))
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    save_weights(tmp_path / "encoder.safetensors", state, infer_architecture(state), "encoder")
    config.segment.init = str(tmp_path / "encoder.safetensors")
    assert started_from(config, segment_start(config, resumed=False)) == {
        "key": "segment.init", "path": str(tmp_path / "encoder.safetensors")}
    assert segment_start(config, resumed=True) is None and started_from(config, None) is None


def test_the_segmentation_eval_line_names_the_image_size_it_used():
    """`mixmae eval --init segmenter.safetensors` printed no size, though --img-size (or the crop it was trained at)
    decides the mIoU and the JSON has it: the line says it too."""
    from mixmae_scale.segment.evaluate import segmentation_line

    result = {"miou": 41.234, "precision": "fp32", "samples": 20, "split": "val", "data": "shards/seg",
              "weights": "runs/seg/segmenter.safetensors", "img_size": 448}
    assert segmentation_line(result) == ("mIoU 41.2% (fp32) at 448 px on the 20 images of split 'val' of shards/seg "
                                         "(runs/seg/segmenter.safetensors)")
