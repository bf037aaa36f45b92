"""Memory planner: ZeRO accounting, measured activations, the largest micro-batch that fits."""

from __future__ import annotations

import pytest

from mixmae_scale.cluster.plan import (
    GIB,
    ActivationProfile,
    gathered_weight_bytes,
    measure_activations,
    model_state_bytes,
    optimizer_step_bytes,
    plan,
)
from mixmae_scale.config import load_resolved


@pytest.mark.parametrize("stage, per_param", [(0, 16), (1, 2 + 2 + 12 / 4), (2, 2 + (2 + 12) / 4), (3, 16 / 4)])
def test_mixed_precision_adam_bytes_per_parameter_by_zero_stage(stage, per_param):
    states = model_state_bytes(1_000_000, stage, world=4, dtype="bf16")
    assert sum(states.values()) == pytest.approx(per_param * 1_000_000)


def test_zero3_at_two_ranks_is_eight_bytes_per_parameter_against_ten_for_zero1():
    z1 = sum(model_state_bytes(10, 1, 2, "bf16").values())
    z3 = sum(model_state_bytes(10, 3, 2, "bf16").values())
    assert (z1, z3) == (100, 80)
    assert sum(model_state_bytes(10, 0, 1, "fp32").values()) == 160  # fp32: weights, grads, two moments


def _saved_for_backward(model, images, **inputs) -> int:
    """The bytes a real forward of `model` saves for backward, parameters left out (saved-tensor hooks)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images, **inputs)
    return sum(seen.values())


def _saved_bytes_per_image(resolved, checkpoint_every: int) -> float:
    """What a real fp32 pretraining forward of the profile's model saves for backward, per image: the bytes
    at micro-batch 4 less those at 2, halved, so that what is saved once per batch (the additive same-source
    masks a checkpointed block keeps as an input) drops out. Non-reentrant checkpointing saves each block's
    inputs through the ambient saved-tensor hooks and hides what the block saves inside, which is what
    checkpointing keeps alive between forward and backward."""
    import torch

    from mixmae_scale.cluster.plan import build_for_job

    totals = []
    for batch in (2, 4):
        torch.manual_seed(0)
        model = build_for_job(resolved, "pretrain")
        model.encoder.checkpoint_every = checkpoint_every
        model.encoder.set_fused_attention(False)
        size = resolved.config.model.img_size
        images = torch.randn(batch, 3, size, size)
        totals.append(_saved_for_backward(model, images, mask=model.sample_mask(torch.Generator().manual_seed(0))))
    return (totals[1] - totals[0]) / 2


def test_activations_are_measured_and_a_checkpointed_forward_keeps_what_the_planner_counts():
    """The planner's checkpointed figure is computed from the plain measurement (block inputs, what is saved
    outside the blocks, and two blocks' activations while one is recomputed); a real checkpointed forward
    must keep what that figure counts as kept, and far less than a plain one. The recomputation transient is
    not visible to saved-tensor hooks and stays arithmetic."""
    resolved = load_resolved("tiny")
    fp32 = measure_activations(resolved, "fp32")
    bf16 = measure_activations(resolved, "bf16")
    assert len(fp32.per_block) == 8 and all(b > 0 for b in fp32.per_block)
    assert fp32.per_image(True) < 0.75 * fp32.per_image(False)
    plain, checkpointed = _saved_bytes_per_image(resolved, 0), _saved_bytes_per_image(resolved, 1)
    assert checkpointed < 0.25 * plain
    recomputing = 2 * max(fp32.per_block)
    assert checkpointed == pytest.approx(fp32.per_image(True) - recomputing, rel=0.02)
    assert bf16.per_image(False) == pytest.approx(fp32.per_image(False) / 2, rel=0.15)
    # Stage 1 runs at 24x24 tokens of width 32; its block input is exactly that tensor.
    assert fp32.block_inputs[0] == 24 * 24 * 32 * 4


def test_half_precision_activations_counted_from_fp32_match_a_real_bf16_forward():
    """The planner runs fp32 and counts fp32 saves at 2 bytes (a bf16 forward is ~100x slower on CPUs
    without AVX-512); a real bf16 forward of the same model must save the same bytes."""
    import torch

    from mixmae_scale.cluster.plan import build_for_job

    resolved = load_resolved("tiny")
    for job in ("pretrain", "finetune"):
        counted = measure_activations(resolved, "bf16", job=job)
        torch.manual_seed(0)
        model = build_for_job(resolved, job).to(torch.bfloat16)
        model.encoder.set_fused_attention(False)
        images = torch.randn(2, 3, 96, 96, dtype=torch.bfloat16)
        inputs = {"mask": model.sample_mask(torch.Generator().manual_seed(0))} if job == "pretrain" else {}
        real = _saved_for_backward(model, images, **inputs) / 2
        assert sum(counted.per_block) + counted.other == pytest.approx(real, rel=0.03), job


def test_plan_finds_the_largest_even_micro_batch_that_fits():
    resolved = load_resolved("tiny", world_size=2)
    activations = measure_activations(resolved, "bf16")
    result = plan(resolved, "tiny", gpus=2, gpu_mem_gib=2.0, activations=activations, overhead_gib=0.5)
    assert result.fits and result.max_micro_batch % 2 == 0 and result.max_micro_batch >= result.micro_batch
    transient = ("activations", "gathered_weights", "optimizer_step_transient")
    fixed = sum(v for k, v in result.components_gib.items() if k not in transient)
    per_image = activations.per_image(False) / GIB
    assert fixed + result.max_micro_batch * per_image <= 2.0 + 1e-3
    assert fixed + (result.max_micro_batch + 2) * per_image > 2.0 - 1e-3


def test_zero3_steps_one_sub_group_at_a_time_and_zero1_the_whole_partition():
    params, world = 1_000_000_000, 2
    # bf16: a 4-byte upcast of the gradients stepped, plus two 4-byte temporaries for unfused AdamW.
    assert optimizer_step_bytes(params, 1, world, "bf16", 1e8, fused=False) == 12 * params / world
    assert optimizer_step_bytes(params, 3, world, "bf16", 1e8, fused=False) == 12 * 1e8
    assert optimizer_step_bytes(params, 3, world, "bf16", 1e8, fused=True) == 4 * 1e8
    assert optimizer_step_bytes(params, 1, world, "fp32", 1e8, fused=True) == 0


def test_zero3_gathered_weights_follow_the_live_parameter_limit():
    zero = {"stage3_max_live_parameters": 1e8, "stage3_prefetch_bucket_size": 5e7}
    assert gathered_weight_bytes(10**9, 3, 2, "bf16", zero) == 2 * 1.5e8 * 0.5
    assert gathered_weight_bytes(10**9, 3, 2, "bf16", {}) == 2 * 10**9 * 0.5  # DeepSpeed's 1e9 default: all
    assert gathered_weight_bytes(10**9, 1, 2, "bf16", zero) == 0


def test_peak_is_the_larger_phase_not_their_sum():
    resolved = load_resolved("tiny", world_size=2, overrides=["zero.stage=1", "batch.micro=2"])
    activations = measure_activations(resolved, "fp32")
    result = plan(resolved, "tiny", gpus=2, gpu_mem_gib=8.0, activations=activations, overhead_gib=0.0,
                  fused_optimizer=False)
    c = result.components_gib
    states = c["weights"] + c["gradients"] + c["fp32_master_weights"] + c["adam_moments"]
    # At micro-batch 2 the unfused step's temporaries outweigh the activations of the tiny model.
    assert result.peak_phase == "optimizer step"
    assert result.total_gib == pytest.approx(states + max(c["activations"], c["optimizer_step_transient"]), abs=2e-3)


def test_plan_cli_recommends_a_configuration_that_reaches_the_global_batch(capsys):
    import json

    from mixmae_scale.cli import main

    assert main(["plan", "tiny", "--gpus", "2", "--gpu-mem-gb", "4", "--recommend", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    chosen, global_batch = report["recommended"], load_resolved("tiny", world_size=2).derived.global_batch
    assert len(report["options"]) == 6 and report["peak_phase"] in ("forward/backward", "optimizer step")
    assert chosen["micro_batch"] * chosen["accumulation"] * 2 == global_batch
    assert chosen["peak_gib"] <= 4 * 1e9 / 2**30


def test_a_finetuning_profile_is_planned_as_the_classifier_it_trains():
    from mixmae_scale.config import run_kind
    from mixmae_scale.finetune.job import build_classifier

    assert run_kind("finetune_tiny") == "finetune" and run_kind("tiny") == "pretrain"  # what each profile's file sets
    finetune = load_resolved("finetune_tiny", world_size=2, overrides=["finetune.num_classes=10"])
    result = plan(finetune, "finetune_tiny", gpus=2, gpu_mem_gib=4.0)
    classifier = build_classifier(load_resolved("finetune_tiny", overrides=["finetune.init=null",
                                                                            "finetune.num_classes=10"]).config, 10)
    assert result.job == "finetune" and result.params == sum(p.numel() for p in classifier.parameters())
    pretrain = plan(finetune, "finetune_tiny", gpus=2, gpu_mem_gib=4.0, job="pretrain")
    assert pretrain.params > result.params  # MixMAE adds the decoder; the classifier only a head


@pytest.mark.parametrize("profile, gpus", [("swin_h", 64), ("swin_h", 8), ("swin_h", 16), ("swin_b", 128),
                                           ("swin_l", 32), ("tiny", 2), ("tiny", 4), ("finetune_b", 64)])
def test_plan_cli_sizes_the_micro_batch_and_accumulation_the_run_derives(profile, gpus, capsys, monkeypatch):
    """`mixmae plan` once planned the profile's ceiling batch.micro (Swin-H on 64 GPUs: 64) while the run derives
    32 from the global batch; the planner must report the run's own derivation (config/derive.py)."""
    import json

    from mixmae_scale.cli import main
    from mixmae_scale.cluster import plan as plan_module
    from mixmae_scale.cluster.plan import ActivationProfile

    # Synthetic activations (0.01 GiB per image) keep this fast; the batch arithmetic does not depend on them.
    monkeypatch.setattr(plan_module, "measure_activations", lambda *a, **k: ActivationProfile([0.01 * GIB], [0.0], 0.0))
    assert main(["plan", profile, "--gpus", str(gpus), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    run = load_resolved(profile, world_size=gpus).derived  # what start_run resolves on `gpus` ranks
    assert (report["micro_batch"], report["accumulation"], report["global_batch"]) == (
        run.micro_batch, run.accumulation, run.global_batch)


def test_swin_h_on_64_gpus_is_planned_at_micro_batch_32_not_the_profile_ceiling_64():
    resolved = load_resolved("swin_h", world_size=64)
    acts = ActivationProfile([0.01 * GIB], [0.0], 0.0)
    result = plan(resolved, "swin_h", gpus=64, gpu_mem_gib=80.0, activations=acts)
    assert resolved.config.batch.micro == 64
    assert (result.micro_batch, result.accumulation) == (32, 1)
    assert result.components_gib["activations"] == pytest.approx(32 * acts.per_image(False) / GIB, abs=1e-3)


@pytest.mark.parametrize("job, overrides", [("pretrain", ["model.drop_path=0.1", "model.depths=[3,1,4,2]"]),
                                            ("pretrain", ["model.depths=[1,2,2,2]"]),
                                            ("finetune", ["model.depths=[2,2,5,2]"])])
def test_the_shortened_encoders_measurement_equals_the_whole_encoders(job, overrides, monkeypatch):
    """The planner measures one block per stage (two in the first) and repeats them; the whole encoder's own
    forward must save exactly the same bytes, block by block, with stochastic depth on (the first block has
    none) and off."""
    from mixmae_scale.cluster import plan as plan_module

    resolved = load_resolved("tiny", overrides=overrides)
    short = measure_activations(resolved, "bf16", job=job)
    monkeypatch.setattr(plan_module, "measured_depths", list)  # measure every block
    whole = measure_activations(resolved, "bf16", job=job)
    assert len(short.per_block) == sum(resolved.config.model.depths)
    assert (short.per_block, short.block_inputs, short.other) == (whole.per_block, whole.block_inputs, whole.other)


def test_a_segmentation_profile_launches_the_segmentation_job_and_is_not_planned_as_another(capsys):
    """seg_demo leaves its encoder to --init and seg_ade20k names one: both are segmentation profiles, which
    `mixmae launch` starts as `segment` (it used to start them as pretraining) and `mixmae plan` refuses to size as
    something else."""
    from mixmae_scale.cli import main
    from mixmae_scale.config import ConfigError, run_kind

    assert run_kind("seg_demo") == run_kind("seg_ade20k") == "segment"
    assert main(["launch", "seg_demo", "--dry-run", "--set", "segment.init=random"]) == 0  # without: refused
    said = capsys.readouterr().out
    assert "job: segment (from the profile: it sets segment.*" in said
    assert "--module mixmae_scale.cli segment --profile seg_demo" in said
    with pytest.raises(ConfigError, match="sizes pretraining and classification fine-tuning, not segment"):
        plan(load_resolved("seg_demo"), "seg_demo", gpus=1, gpu_mem_gib=4.0)


def swin_h_profile() -> ActivationProfile:
    """Swin-H's 24 blocks (depths 2, 2, 18, 2): per-stage figures of the shape a measurement gives (a stage's
    blocks alike, each later stage a quarter of the tokens at twice the width), inputs a tenth of the block."""
    per_stage = [8.0, 4.0, 2.0, 1.0]
    per_block = [per_stage[s] * 1e7 for s, depth in enumerate((2, 2, 18, 2)) for _ in range(depth)]
    return ActivationProfile(per_block, [b / 10 for b in per_block], 5e6)


@pytest.mark.parametrize("every", [1, 2, 3, 24])
def test_checkpointing_every_kth_block_counts_those_blocks_as_checkpointed_and_the_rest_whole(every):
    """models/swin.py checkpoints the blocks whose index over all stages is a multiple of k (0, k, 2k, ...); the
    planner counted any k >= 1 as every block."""
    import torch

    from mixmae_scale.cluster.plan import checkpointed_blocks
    from mixmae_scale.models.swin import SwinEncoder

    acts = swin_h_profile()
    chosen = checkpointed_blocks(24, every)
    assert chosen == [i % every == 0 for i in range(24)]
    saved = sum(acts.block_inputs[i] if chosen[i] else acts.per_block[i] for i in range(24))
    largest = max((2 if chosen[i] else 1) * acts.per_block[i] for i in range(24))
    assert acts.per_image(every) == pytest.approx(saved + acts.other + largest)
    # The model's own choice: count the blocks that run under torch.utils.checkpoint in a real forward.
    from mixmae_scale.models import swin as swin_module

    encoder = SwinEncoder(swin_module.SwinShape(img_size=32, patch_size=4, embed_dim=8, depths=(2, 2, 18, 2),
                                                num_heads=(1, 1, 1, 1), window_size=(2, 2, 2, 1)),
                          checkpoint_every=every)
    ran: list[bool] = []
    real = swin_module.checkpoint
    for index, block in enumerate(b for stage in encoder.layers for b in stage.blocks):
        block.register_forward_pre_hook(lambda module, args, i=index: ran.append(i))
    calls: list[int] = []

    def counting(function, *args, **kwargs):
        calls.append(len(ran))
        return real(function, *args, **kwargs)

    swin_module.checkpoint = counting
    try:
        with torch.enable_grad():
            encoder(torch.randn(1, 3, 32, 32))
    finally:
        swin_module.checkpoint = real
    assert sum(chosen) == len(calls)


def test_swin_h_activations_with_every_second_block_checkpointed_lie_between_every_block_and_none():
    """`mixmae plan swin_h --gpus 8 --gpu-mem-gb 80 --set zero.stage=3 model.checkpoint_every=K` gave the same
    activations for K = 1, 2 and 24."""
    acts = swin_h_profile()
    reported: dict[int, int | None] = {}

    def activations(every: int) -> float:
        resolved = load_resolved("swin_h", overrides=["zero.stage=3", f"model.checkpoint_every={every}"],
                                 world_size=8)
        result = plan(resolved, "swin_h", gpus=8, gpu_mem_gib=80.0, activations=acts)
        assert result.checkpointing == (every > 0)
        reported[every] = result.to_dict().get("checkpoint_every")
        return result.components_gib["activations"]

    every_block, half, one_in_24, none = activations(1), activations(2), activations(24), activations(0)
    assert every_block < half < none and half < one_in_24  # one block in 24: nearly all blocks keep all they save
    micro = load_resolved("swin_h", overrides=["zero.stage=3"], world_size=8).derived.micro_batch
    # every block: unchanged, what the planner always counted (and benchmarks/plan_check.py calibrated)
    formula = sum(acts.block_inputs) + acts.other + 2 * max(acts.per_block)
    assert every_block == pytest.approx(round(micro * formula / GIB, 3))
    assert none == pytest.approx(round(micro * (sum(acts.per_block) + acts.other + max(acts.per_block)) / GIB, 3))
    assert reported == {1: 1, 2: 2, 24: 24, 0: 0}  # `mixmae plan --json` says which k it planned


@pytest.mark.parametrize("stage, gradients", [(1, (2 + 4) * 1_000_000), (2, 4 * 1_000_000 / 4),
                                              (3, 4 * 1_000_000 / 4)])
def test_bf16_gradients_accumulated_in_fp32_are_counted_as_deepspeed_allocates_them(stage, gradients):
    """config/deepspeed_config.py sets grad_accum_dtype fp32 for bf16 at ZeRO >= 1: at ZeRO-1 DeepSpeed's
    BF16_Optimizer keeps an unpartitioned fp32 gradient buffer beside the bf16 gradients; ZeRO-2/3 keep the rank's
    gradient partition in fp32. The planner counted 2 bytes/param (ZeRO-1) and 2/world (ZeRO-2/3)."""
    states = model_state_bytes(1_000_000, stage, world=4, dtype="bf16", fp32_grad_accum=True)
    assert states["gradients"] == pytest.approx(gradients)


def test_the_plan_of_a_bf16_zero1_run_counts_its_fp32_gradient_buffer():
    acts = ActivationProfile([0.01 * GIB], [0.0], 0.0)

    def gradients_gib(*overrides: str) -> float:
        resolved = load_resolved("swin_b", overrides=["precision.dtype=bf16", *overrides], world_size=8)
        result = plan(resolved, "swin_b", gpus=8, gpu_mem_gib=80.0, activations=acts)
        return result.components_gib["gradients"], result.params

    zero1, params = gradients_gib("zero.stage=1")
    assert zero1 == pytest.approx(round(6 * params / GIB, 3))
    assert gradients_gib("zero.stage=2")[0] == pytest.approx(round(4 * params / 8 / GIB, 3))
    # told to accumulate in bf16 (the profile's own deepspeed: block), DeepSpeed keeps bf16 gradients only
    bf16_accum = gradients_gib("zero.stage=1", "deepspeed.data_types.grad_accum_dtype=bf16")[0]
    assert bf16_accum == pytest.approx(round(2 * params / GIB, 3))


def test_plan_recommend_with_nothing_fitting_says_what_to_change_and_exits_2(capsys):
    """A GPU that holds no configuration at any micro-batch: the rows all say 'does not fit', so the command says
    what the planner finds would fit (offload, more GPUs, a larger GPU) and exits 2, as other refusals do."""
    from mixmae_scale.cli import main

    assert main(["plan", "tiny", "--gpus", "2", "--gpu-mem-gb", "0.5", "--recommend"]) == 2
    out = capsys.readouterr().out
    assert "does not fit" in out and "nothing fits" in out and "what would fit instead" in out
    assert "zero.offload_optimizer=true" in out and "--gpu-mem-gb" in out and "more GPUs" in out
    assert main(["plan", "tiny", "--gpus", "2", "--gpu-mem-gb", "0.5", "--recommend", "--json"]) == 2
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["recommended"] is None and report["next_steps"]
