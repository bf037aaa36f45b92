"""Configuration: merge order, overrides, strict keys, derived arithmetic, every shipped profile."""

from __future__ import annotations

import json

import pytest

from mixmae_scale.config import ConfigError, load_config, load_resolved
from mixmae_scale.config.deepspeed_config import DS_CONFIGS_DIR, build_deepspeed_config
from mixmae_scale.config.load import PROFILES_DIR, merge_sources, parse_override

SHIPPED = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def test_later_sources_win_in_merge_order(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("optim:\n  weight_decay: 0.1\nbatch:\n  micro: 32\n")
    merged, sources = merge_sources("swin_b", str(cluster), ["batch.micro=16"])
    assert sources[0].endswith("base.yaml") and sources[1].endswith("swin_b.yaml")
    assert sources[2] == str(cluster) and sources[3] == "--set batch.micro=16"
    assert merged["optim"]["weight_decay"] == 0.1  # cluster beats base
    assert merged["batch"]["micro"] == 16  # --set beats the cluster file and the profile
    assert merged["zero"]["stage"] == 1  # the size profile's own value survives
    assert merged["optim"]["betas"] == [0.9, 0.95]  # base values the others leave alone survive


def test_override_values_are_typed():
    assert parse_override("model.window_size=[16,16,24,12]") == {"model": {"window_size": [16, 16, 24, 12]}}
    config, _ = load_config("swin_b", overrides=["optim.base_learning_rate=1e-4", "precision.dtype=fp16",
                                                 "model.norm_pix_loss=false", "batch.micro=64.0"])
    assert config.optim.base_learning_rate == pytest.approx(1e-4)
    assert config.precision.dtype == "fp16" and config.model.norm_pix_loss is False
    assert config.batch.micro == 64 and isinstance(config.batch.micro, int)


@pytest.mark.parametrize("override, fragment", [
    ("optim.lerning_rate=1", "did you mean 'optim.base_learning_rate'"),
    ("model.windw_size=[7,7,7,7]", "did you mean 'model.window_size'"),
    ("zero.stag=2", "did you mean 'zero.stage'"),
    ("clusterr.num_nodes=2", "key 'clusterr.num_nodes'; did you mean 'cluster.num_nodes'"),  # was cluster.env
])
def test_unknown_key_names_the_closest_valid_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config("swin_b", overrides=[override])


def test_logging_csv_is_no_longer_a_key_and_is_refused_as_unknown():
    """`logging.csv` was read by nothing: `false` left metrics.csv written, which resume, `mixmae plot` and
    scaling sweeps read. Removed, a file or --set that still sets it gets the unknown-key error, not silence."""
    with pytest.raises(ConfigError, match="unknown configuration key 'logging.csv'"):
        load_config("tiny", overrides=["logging.csv=false"])


@pytest.mark.parametrize("override, fragment", [
    ("batch.micro=abc", "'batch.micro' must be an integer"),
    ("batch.micro=2.5", "'batch.micro' must be an integer"),
    ("precision.dtype=fp8", "'precision.dtype' must be one of"),
    ("model.norm_pix_loss=3", "'model.norm_pix_loss' must be true or false"),
    ("optim.betas=0.9", "'optim.betas' must be a list"),
    ("zero.stage=4", "zero.stage must be 0, 1, 2 or 3"),
    ("model.mask_ratio=1.5", "model.mask_ratio must be in"),
    ("model.range_mask_ratio=-0.1", r"model.range_mask_ratio must be >= 0 .* got range_mask_ratio=-0.1 with "
                                    r"mask_ratio=0.5"),
    ("model.range_mask_ratio=0.5", r"mask_ratio \+ model.range_mask_ratio < 1, got range_mask_ratio=0.5 with "
                                   r"mask_ratio=0.5"),
    ("data.crop_ratio=[1.33,0.75]", r"data.crop_ratio must be \[min, max\] with 0 < min <= max, got \[1.33, 0.75\]"),
    ("data.crop_ratio=[0,1.33]", r"data.crop_ratio must be .*, got \[0.0, 1.33\]"),
    ("data.crop_ratio=[0.75]", r"data.crop_ratio must be .*, got \[0.75\]"),
    ("batch.micro=3", "batch.micro must be even"),
    ("faults.data_stall_s=0", r"faults.data_stall_s must be a positive number of seconds, got 0"),
    ("faults.data_stall_s=-5", r"faults.data_stall_s must be .*, got -5"),
    ("faults.nonfinite_skip_limit=0", r"faults.nonfinite_skip_limit must be >= 1 .*, got 0"),
    ("model.window_size=[10,14,14,7]", r"model.window_size\[0\]=10 does not tile"),
    ("model.img_size=200", "must be divisible by"),
    ("model.embed_dim=-12", r"model.embed_dim must be >= 1, got -12"),
    ("model.embed_dim=0", r"model.embed_dim must be >= 1, got 0"),
    ("model.num_heads=[4,8,0,32]", r"model.num_heads must be >= 1 each, got \[4, 8, 0, 32\]"),
    ("model.window_size=[14,14,0,7]", r"model.window_size must be >= 1 each, got \[14, 14, 0, 7\]"),
    ("model.mlp_ratio=0", r"model.mlp_ratio must be positive, got 0"),
    ("model.decoder_dim=0", r"model.decoder_dim must be >= 1, got 0"),
    ("model.decoder_heads=0", r"model.decoder_heads must be >= 1, got 0"),
    ("model.decoder_depth=-1", r"model.decoder_depth must be >= 0, got -1"),
    ("model.drop_path=1.0", r"model.drop_path must be in \[0, 1\), got 1.0"),
    ("override_without_equals", "not of the form"),
    ("cluster.gpus_per_node=0", r"cluster.gpus_per_node must be >= 1, got 0"),
    ("cluster.num_nodes=-1", r"cluster.num_nodes must be >= 1, got -1"),
    ("checkpoint.keep_last=0", r"checkpoint.keep_last must be >= 1, got 0"),
    ("checkpoint.every_steps=0", r"checkpoint.every_steps must be >= 1, got 0"),
    ("logging.every_steps=0", r"logging.every_steps must be >= 1, got 0"),
])
def test_bad_values_fail_with_the_key_named(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_resolved("swin_b", overrides=[override])


def test_derived_batch_and_learning_rate():
    r = load_resolved("swin_b", world_size=16)
    d = r.derived
    assert (d.micro_batch, d.accumulation, d.global_batch) == (128, 1, 2048)
    assert d.learning_rate == pytest.approx(1.5e-4 * 2048 / 256)
    assert d.steps_per_epoch == 1_281_167 // 2048
    assert d.warmup_steps == 40 * d.steps_per_epoch and d.total_steps == 600 * d.steps_per_epoch
    # Fewer GPUs: accumulation makes up the global batch, the learning rate does not change.
    d8 = load_resolved("swin_b", world_size=4).derived
    assert (d8.accumulation, d8.global_batch, d8.learning_rate) == (4, 2048, d.learning_rate)
    # Accumulation given instead of the global batch: global follows micro x accumulation x world.
    d2 = load_resolved("swin_b", overrides=["batch.global_batch=null", "batch.accumulation=3"],
                       world_size=5).derived
    assert d2.global_batch == 128 * 3 * 5 and d2.learning_rate == pytest.approx(1.5e-4 * 1920 / 256)


def test_global_batch_that_cannot_be_split_is_one_error_with_the_nearest_ways_out():
    with pytest.raises(ConfigError, match=r"cannot be split over 3 GPUs.*2052 .* or 2046 .*or use 2 or 4 GPUs"):
        load_resolved("swin_b", world_size=3)
    with pytest.raises(ConfigError, match=r"over 24 GPUs.*2016 .* or 2064 .*use 16 or 32 GPUs"):
        load_resolved("swin_h", world_size=24)
    with pytest.raises(ConfigError, match=r"over 2048 GPUs.*GPUs: 4096 .*use 1024 GPUs"):
        load_resolved("swin_h", world_size=2048)
    with pytest.raises(ConfigError, match="contradicts"):
        load_resolved("swin_b", overrides=["batch.accumulation=2"], world_size=16)


@pytest.mark.parametrize("profile", ["swin_b", "swin_l", "swin_h", "finetune_b", "finetune_l"])
@pytest.mark.parametrize("gpus", [8, 16, 32, 64, 128, 256])
def test_every_size_profile_resolves_on_any_usual_cluster(profile, gpus):
    r = load_resolved(profile, world_size=gpus)
    d, ceiling = r.derived, r.config.batch.micro
    assert d.micro_batch * d.accumulation * gpus == d.global_batch == r.config.batch.global_batch
    assert d.micro_batch <= ceiling and d.micro_batch % 2 == 0
    share = d.global_batch // gpus  # the largest micro-batch the ceiling allows: the fewest accumulation steps
    assert d.micro_batch == max(m for m in range(2, min(ceiling, share) + 1, 2) if share % m == 0)


def test_swin_h_at_64_gpus_needs_no_hand_edit():
    d = load_resolved("swin_h", overrides=["cluster.num_nodes=8"]).derived
    assert (d.world_size, d.micro_batch, d.accumulation, d.global_batch) == (64, 32, 1, 2048)
    assert load_resolved("swin_h").derived.accumulation == 4  # its declared 8 GPUs: micro 64 x 4


def test_size_preset_fills_only_unset_fields():
    r = load_resolved("swin_l", overrides=["model.img_size=384", "model.window_size=[16,16,24,12]"])
    m = r.config.model
    assert m.embed_dim == 192 and m.num_heads == [6, 12, 24, 48]
    assert m.window_size == [16, 16, 24, 12]
    with pytest.raises(ConfigError, match="model.size is 'custom'"):
        load_resolved("swin_b", overrides=["model.size=custom"])


def test_unknown_profile_suggests_a_name():
    with pytest.raises(ConfigError, match="did you mean 'swin_h'"):
        load_resolved("swin_hh")


@pytest.mark.parametrize("profile", SHIPPED)
def test_every_shipped_profile_resolves_and_builds_a_deepspeed_config(profile):
    r = load_resolved(profile)
    ds = build_deepspeed_config(r)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds[
        "gradient_accumulation_steps"] * r.derived.world_size
    assert ds["zero_optimization"]["stage"] == r.config.zero.stage
    assert ds["bf16"]["enabled"] == (r.derived.dtype == "bf16")
    assert ds["fp16"]["enabled"] == (r.derived.dtype == "fp16")
    json.dumps(r.to_dict())  # the run directory stores it as JSON/YAML


def test_published_recipe_is_what_the_size_profiles_say():
    # ZeRO stage and checkpointing are the memory planner's (tests/unit/test_profiles_follow_plan.py).
    for profile, stage, ckpt in (("swin_b", 1, 0), ("swin_l", 1, 0), ("swin_h", 1, 0)):
        r = load_resolved(profile)
        c = r.config
        assert r.derived.global_batch == 2048 and c.schedule.epochs == 600 and c.schedule.warmup_epochs == 40
        assert c.optim.base_learning_rate == pytest.approx(1.5e-4) and c.optim.weight_decay == 0.05
        assert c.optim.betas == [0.9, 0.95] and c.model.mask_ratio == 0.5 and c.model.norm_pix_loss
        assert (c.zero.stage, c.model.checkpoint_every) == (stage, ckpt)


def test_the_pretraining_and_fine_tuning_recipes_reach_the_engine_as_published(tmp_path):
    """docs/recipe.md's rows that no other test held: the B profiles' values as the engine receives them (the
    scheduler dict DeepSpeed builds WarmupCosineLR from: linear warm-up, where DeepSpeed's default is log; the
    cosine to min lr) and the drop-path rates the encoder builds (linear from 0 over the 24 blocks)."""
    from mixmae_scale.config.deepspeed_config import engine_config
    from mixmae_scale.models.swin import SwinEncoder, SwinShape

    pre = load_resolved("swin_b")
    assert (pre.config.optim.eps, pre.config.optim.grad_clip, pre.config.schedule.min_learning_rate) == (1e-8, 0, 0)
    assert pre.config.data.interpolation == "bicubic"
    params = engine_config(pre, tmp_path)["scheduler"]["params"]
    assert (params["warmup_type"], params["warmup_min_ratio"], params["cos_min_ratio"]) == ("linear", 0.0, 0.0)
    assert params["warmup_num_steps"] == pre.derived.warmup_steps and params["total_num_steps"] == \
        pre.derived.total_steps
    ft = load_resolved("finetune_b")
    c, f = ft.config, ft.config.finetune
    assert ft.derived.global_batch == 1024 and (c.schedule.epochs, c.schedule.warmup_epochs) == (100, 5)
    assert c.optim.base_learning_rate == pytest.approx(5e-4) and ft.derived.learning_rate == pytest.approx(2e-3)
    assert (c.optim.betas, c.optim.weight_decay, c.optim.grad_clip) == ([0.9, 0.999], 0.05, 0.0)
    assert (c.model.drop_path, f.layer_decay, f.mixup, f.cutmix, f.label_smoothing, f.random_erasing) == (
        0.1, 0.7, 0.8, 1.0, 0.1, 0.25)
    assert (f.rand_augment_ops, f.rand_augment_magnitude, f.rand_augment_magnitude_std) == (2, 9, 0.5)
    params = engine_config(ft, tmp_path)["scheduler"]["params"]
    assert params["warmup_type"] == "linear" and params["cos_min_ratio"] == pytest.approx(1e-6 / 2e-3)
    large = load_resolved("finetune_l").config
    assert (large.model.drop_path, large.finetune.layer_decay, large.schedule.epochs) == (0.2, 0.8, 50)
    narrow_b = SwinShape(224, 4, 8, (2, 2, 18, 2), (1, 1, 2, 4), (14, 14, 14, 7))  # B's 24 blocks, few channels
    encoder = SwinEncoder(narrow_b, drop_path=0.1)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for layer in encoder.layers for b in layer.blocks]
    assert len(rates) == 24 and rates == pytest.approx([0.1 * i / 23 for i in range(24)])


def test_the_recipe_docs_fine_tuning_rows_say_what_the_code_does():
    """docs/recipe.md's fine-tuning warm-up row gives the warm-up steps the B profile derives and the lag of
    DeepSpeed's WarmupCosineLR behind the official per-iteration warm-up (the same scheduler as pretraining, whose
    row said it: tests/unit/test_segment_job.py holds the lag); its layer-decay row says which of the reference
    notes' two head rates the code follows (the official decay ** 1: tests/unit/test_layer_decay.py holds it)."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "docs" / "recipe.md"
    rows = {row.split("|")[1].strip(): row for row in recipe.read_text().splitlines() if row.startswith("| ")}
    warm_up, b = rows["epochs, warm-up"], load_resolved("finetune_b").derived
    assert b.warmup_steps == 5 * b.steps_per_epoch == 6255
    assert f"{b.warmup_steps:,} warm-up steps" in warm_up and "(k-1)/W" in warm_up and "(k-2)/W" in warm_up
    assert "we follow the official code (§8)" in rows["layer decay"]


@pytest.mark.parametrize("path", sorted(DS_CONFIGS_DIR.glob("*.json")), ids=lambda p: p.name)
def test_every_deepspeed_file_is_valid_for_deepspeed(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    r = load_resolved("tiny")
    ds = build_deepspeed_config(r)
    ds = {**json.loads(path.read_text()), **{k: ds[k] for k in (
        "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")}}
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
    parsed = DeepSpeedConfig(ds)  # DeepSpeed's own schema check (single process, world size 1)
    assert parsed.zero_optimization_stage == json.loads(path.read_text())["zero_optimization"]["stage"]


def test_deepspeed_overrides_reach_any_key():
    r = load_resolved("swin_h", overrides=["zero.stage=3",
                                           "deepspeed.zero_optimization.stage3_prefetch_bucket_size=1e8",
                                           "deepspeed.wall_clock_breakdown=true"])
    ds = build_deepspeed_config(r)
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 10**8  # PyYAML: the string "1e8"
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    DeepSpeedZeroConfig(**ds["zero_optimization"])  # YAML's float 1e8 would fail DeepSpeed's int field
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 100000  # from zero3.json
    assert ds["wall_clock_breakdown"] is True


def test_config_show_cli_prints_the_resolved_huge_profile(capsys):
    from mixmae_scale.cli import main

    assert main(["config", "show", "--profile", "swin_h", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["embed_dim"] == 352 and data["derived"]["global_batch"] == 2048
    assert data["deepspeed_config"]["zero_optimization"]["stage"] == data["zero"]["stage"] == 1
    assert data["deepspeed_config"]["gradient_accumulation_steps"] == 4  # 2048 = 64 x 4 x 8 GPUs
    assert main(["config", "show", "--profile", "swin_b", "--set", "optim.lerning_rate=1"]) == 2
    assert "optim.base_learning_rate" in capsys.readouterr().err


@pytest.mark.parametrize("pretrain, finetune", [("swin_b", "finetune_b"), ("swin_l", "finetune_l")])
def test_each_size_has_its_own_run_folder_and_its_finetune_profile_finds_it(pretrain, finetune):
    from pathlib import Path

    folders = {p: Path(c.run.output_dir) / c.run.name for p in ("swin_b", "swin_l", "swin_h")
               for c in [load_resolved(p).config]}
    assert len(set(folders.values())) == 3
    assert Path(load_resolved(finetune).config.finetune.init) == folders[pretrain]


@pytest.mark.parametrize("dtype, stage, expected", [("bf16", 1, "fp32"), ("bf16", 3, "fp32"), ("bf16", 0, None),
                                                    ("fp32", 2, None), ("fp16", 2, None)])
def test_bf16_gradients_accumulate_in_fp32_under_zero(dtype, stage, expected):
    from mixmae_scale.config.precision import Hardware

    hardware = Hardware(device="cuda", name="test GPU", native_bf16=True, native_fp16=True)
    resolved = load_resolved("swin_b", overrides=[f"precision.dtype={dtype}", f"zero.stage={stage}"], world_size=32,
                             hardware=hardware)
    assert build_deepspeed_config(resolved).get("data_types", {}).get("grad_accum_dtype") == expected


@pytest.mark.parametrize("world, stage, overrides, expected", [
    (1, 1, [], False),                      # one rank: nothing to overlap, no per-parameter bucket hook
    (32, 1, [], True),                      # ds_configs/zero1.json's overlap on a cluster
    (1, 2, [], True),                       # ZeRO-2 reduces through the hook either way: left as the file says
    (1, 1, ["deepspeed.zero_optimization.overlap_comm=true"], True),  # the user's override wins
])
def test_overlap_comm_is_off_only_for_a_single_zero1_rank(world, stage, overrides, expected):
    resolved = load_resolved("swin_b", overrides=[f"zero.stage={stage}", "batch.global_batch=64", *overrides],
                             world_size=world)
    assert build_deepspeed_config(resolved)["zero_optimization"]["overlap_comm"] is expected


@pytest.mark.parametrize("samples, world, largest", [(27, 2, 24), (6, 2, 4), (6, 1, 6), (7, 1, 6)])
def test_a_global_batch_larger_than_the_training_set_names_the_largest_that_splits(samples, world, largest):
    """It said `at most 6` for a folder of 6 images on 2 ranks, and 6 was then refused (3 images a rank, MixMAE
    pairs them): the value named is the largest this many GPUs take, and it is accepted."""
    gpus = "1 GPU" if world == 1 else f"{world} GPUs"
    with pytest.raises(ConfigError, match=rf"larger than the {samples} training samples: the largest global batch "
                                          rf"on {gpus} is {largest} \(a multiple of {2 * world}"):
        load_resolved("tiny", overrides=[f"data.train_samples={samples}", "batch.global_batch=32"], world_size=world)
    resolved = load_resolved("tiny", overrides=[f"data.train_samples={samples}", f"batch.global_batch={largest}"],
                             world_size=world)
    assert resolved.derived.steps_per_epoch == 1


@pytest.mark.parametrize("samples, world", [(3, 2), (1, 1), (1, 2)])
def test_a_training_set_smaller_than_any_global_batch_is_refused_with_the_smallest(samples, world):
    """`set batch.global_batch to at most 1` was no way out: no global batch below 2 per GPU exists."""
    gpus = "1 GPU" if world == 1 else f"{world} GPUs"
    with pytest.raises(ConfigError, match=rf"larger than the {samples} training samples, and no global batch fits on "
                                          rf"{gpus}: the smallest is {2 * world} "):
        load_resolved("tiny", overrides=[f"data.train_samples={samples}", "batch.global_batch=32"], world_size=world)


def test_no_warm_up_is_one_step_that_deepspeeds_scheduler_accepts(tmp_path):
    """schedule.warmup_epochs=0 passed validation, then DeepSpeed's WarmupCosineLR refused warmup_num_steps=0 in
    deepspeed.initialize, after the run folder was taken."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from mixmae_scale.config.deepspeed_config import engine_config

    resolved = load_resolved("tiny", overrides=["schedule.warmup_epochs=0"], world_size=1)
    params = engine_config(resolved, tmp_path)["scheduler"]["params"]
    assert resolved.derived.warmup_steps == params["warmup_num_steps"] == 1
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    WarmupCosineLR(optimizer, **params)


def test_each_nearest_global_batch_names_its_micro_batch_and_accumulation_best_first():
    """Swin-H (micro 64) on 12 GPUs: 2064 is micro 4 x 43 accumulation steps, about 10x slower than 2040's
    micro 34 x 5, so the two are not equal choices: each says what it gives, the larger micro-batch first."""
    with pytest.raises(ConfigError) as caught:
        load_resolved("swin_h", world_size=12)
    assert "2040 (micro 34 x 5 accumulation steps) or 2064 (micro 4 x 43 accumulation steps)" in str(caught.value)
    with pytest.raises(ConfigError) as caught:  # swin_b on 3 GPUs: 2052 (micro 114 x 6) before 2046 (micro 62 x 11)
        load_resolved("swin_b", world_size=3)
    assert "2052 (micro 114 x 6 accumulation steps) or 2046 (micro 62 x 11 accumulation steps)" in str(caught.value)
