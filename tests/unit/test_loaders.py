"""data/loaders.py: each role of a run gets its pipeline from the one builder; the roles must keep apart what
they differ in (augmentations, labels, rank share, dtype) and agree on the evaluation view."""

from __future__ import annotations

import json

import pytest

from mixmae_scale.config import load_config
from mixmae_scale.data.loaders import FINETUNE_CROP_SCALE, LoaderPlace, eval_spec, loader_dtype, spec_for
from mixmae_scale.seeds import stream_seed

PLACE = LoaderPlace(rank=1, world=4, device_id=None)


def _config(*overrides: str):
    return load_config("tiny", overrides=["run.seed=7", *overrides])[0]


def test_pretraining_reads_its_rank_share_with_the_profile_crop_no_labels_and_half_precision_pixels():
    spec = spec_for(_config(), "pretrain", 8, PLACE, engine_dtype="bf16")
    assert (spec.mode, spec.batch_size, spec.shard_id, spec.num_shards) == ("pretrain", 8, 1, 4)
    assert spec.crop_scale == (0.2, 1.0) and not spec.with_labels and spec.output_dtype == "float16"
    assert spec.order_seed == 7 and spec.seed == stream_seed(7, 1) % 2**31  # order: the run's; DALI's: the rank's


def test_finetuning_uses_the_official_crop_scale_labels_fp32_pixels_and_rand_augment_when_asked():
    spec = spec_for(_config("finetune.rand_augment_ops=2", "finetune.rand_augment_magnitude=9"), "finetune", 8, PLACE,
                    engine_dtype="bf16")
    assert spec.crop_scale == FINETUNE_CROP_SCALE and spec.with_labels and spec.output_dtype == "float32"
    assert spec.rand_augment == (2, 9)
    assert spec_for(_config("finetune.rand_augment_ops=0"), "finetune", 8, PLACE).rand_augment is None


def test_a_crop_scale_given_applies_to_whichever_job_runs_and_none_is_each_jobs_recipe():
    """base.yaml's crop_scale was pretraining's 0.2-1, shown by `config show` for a fine-tuning run that cropped
    0.08-1 whatever it said; it is now null (each job's recipe), and a value given is used."""
    from mixmae_scale.data.loaders import SEGMENT_CROP_SCALE

    assert _config().data.crop_scale is None
    for role in ("pretrain", "finetune", "segment"):
        assert spec_for(_config("data.crop_scale=[0.3,1.0]"), role, 8, PLACE).crop_scale == (0.3, 1.0), role
    recipes = [spec_for(load_config(profile)[0], role, 8, PLACE).crop_scale
               for profile, role in (("swin_b", "pretrain"), ("finetune_b", "finetune"), ("seg_ade20k", "segment"))]
    assert recipes == [(0.2, 1.0), FINETUNE_CROP_SCALE, SEGMENT_CROP_SCALE] == [(0.2, 1.0), (0.08, 1.0), (0.25, 1.0)]


def test_config_show_prints_the_crop_scale_the_job_would_use_not_null(capsys):
    """`config show` printed `crop_scale: null` (the job's recipe, but which?); it now prints the job's value: the
    profile's own job by default, or the one `--job` names, and a value given whatever the job."""
    from mixmae_scale.cli import main

    def shown(*args: str) -> tuple[list[float], str]:
        assert main(["config", "show", "--json", *args]) == 0
        out, err = capsys.readouterr()
        return json.loads(out)["data"]["crop_scale"], err

    scale, err = shown("--profile", "finetune_b")
    assert scale == [0.08, 1.0] and "job: finetune (what the profile sets up" in err
    assert shown("--profile", "swin_b")[0] == [0.2, 1.0]
    assert shown("--profile", "seg_ade20k")[0] == [0.25, 1.0]
    scale, err = shown("--profile", "swin_b", "--job", "segment")
    assert scale == [0.25, 1.0] and "job: segment (--job)" in err
    assert shown("--profile", "finetune_b", "--set", "data.crop_scale=[0.3,1.0]")[0] == [0.3, 1.0]


def test_the_heldout_loss_reads_the_same_images_on_every_rank_and_validation_reads_its_rank_share():
    config = _config()
    heldout = spec_for(config, "heldout", 16, PLACE, engine_dtype="fp16")
    assert (heldout.mode, heldout.shard_id, heldout.num_shards, heldout.with_labels) == ("eval", 0, 1, False)
    assert heldout.output_dtype == "float16" and heldout.device_id is None
    val = spec_for(config, "val", 5, PLACE)
    assert (val.mode, val.shard_id, val.num_shards, val.with_labels, val.batch_size) == ("eval", 1, 4, True, 5)


def test_validation_is_the_evaluation_view_mixmae_eval_uses():
    config = _config()
    assert spec_for(config, "val", 5, PLACE) == eval_spec(config.model.img_size, 5, config.data.num_threads, PLACE)


def test_loader_dtype_is_float32_only_for_fp32_engines():
    assert [loader_dtype(d) for d in ("fp32", "bf16", "fp16")] == ["float32", "float16", "float16"]


def test_segmentation_trains_on_masks_with_crop_and_flip_but_no_rand_augment_and_validates_on_the_eval_view():
    from mixmae_scale.data.loaders import SEGMENT_CROP_SCALE

    config = _config("finetune.rand_augment_ops=2", "segment.crop_size=64")
    train = spec_for(config, "segment", 8, PLACE)
    assert train.img_size == 64 != config.model.img_size  # segment.crop_size, not the pretraining size
    assert (train.mode, train.with_masks, train.rand_augment, train.crop_scale) == ("finetune", True, None,
                                                                                   SEGMENT_CROP_SCALE)
    assert train.hflip == config.data.hflip and (train.shard_id, train.num_shards) == (1, 4)
    val = spec_for(config, "segment_val", 5, PLACE)
    assert val == eval_spec(64, 5, config.data.num_threads, PLACE, masks=True,
                            mask_classes=config.segment.num_classes)
    assert val.mode == "eval" and val.with_masks
    assert train.mask_classes == val.mask_classes == config.segment.num_classes  # labels past them are refused


def test_a_spec_with_masks_and_rand_augment_is_refused():
    from mixmae_scale.data.spec import PipelineSpec

    with pytest.raises(ValueError, match="move the image away from its mask"):
        PipelineSpec(mode="finetune", img_size=32, batch_size=2, with_masks=True, rand_augment=(2, 9))


def test_evaluation_resizes_as_the_official_code_at_224_and_crops_the_whole_resize_above_it():
    """util/datasets.py of the official code: crop_pct 224/256 up to 224 px, 1.0 above (a 384-px fine-tuned
    model is evaluated on a 384 resize; 0.875 everywhere resized it to 439 and cut its borders off)."""
    from mixmae_scale.data.spec import eval_resize

    official = {size: int(size / (224 / 256 if size <= 224 else 1.0)) for size in (224, 384, 448)}
    assert {size: eval_resize(size) for size in official} == official == {224: 256, 384: 384, 448: 448}


@pytest.mark.parametrize("size, resize", [(96, 109), (112, 128), (160, 182), (192, 219), (64, 73), (200, 228)])
def test_evaluation_below_224_truncates_the_resize_as_the_official_code(size, resize):
    """The official `int(size / crop_pct)` truncates: 160 px resizes to 182 (182.86 truncated), the demo's 96 to 109;
    rounding gave 183 and 110, another centre crop than the official evaluation's."""
    from mixmae_scale.data.spec import eval_resize

    assert int(size / (224 / 256)) == resize
    assert eval_resize(size) == resize
