"""Per-GPU memory of a training configuration, by component, and the largest micro-batch that fits.

Model states follow the ZeRO paper's accounting for mixed precision with Adam (2 bytes of weights,
2 of gradients, 12 of fp32 master weights and moments per parameter; fp32 training: 4 + 4 + 8),
each divided by the world size where the ZeRO stage partitions it, except the gradients of bf16, which
DeepSpeed accumulates in fp32 here (`model_state_bytes`: 6 bytes/param unpartitioned at ZeRO-1). Activations are
measured, not guessed: one forward of the real model at micro-batch 2 records the bytes every operation saves for
backward (parameters excluded), per encoder block and elsewhere; the encoder is shortened to one block per stage
(two in the first), since a stage's blocks save alike (`measured_depths`). With activation checkpointing a
checkpointed block keeps only its input, plus its activations while it is recomputed; `model.checkpoint_every=k`
checkpoints every k-th block (`checkpointed_blocks`), the others keep all they save. The measurement
uses the explicit attention path, which keeps the attention probabilities; memory-efficient SDPA
kernels on GPUs keep less, so the activation figure is an upper bound there.

Two transients decide the peak, and they never coexist: during forward and backward, activations
plus (ZeRO-3) the 16-bit weights gathered for the blocks in flight; during the optimizer step, the
fp32 upcast of the gradients being stepped plus, for an unfused AdamW (the CPU), two full-size
temporaries. ZeRO-3 steps one `sub_group_size` slice of its partition at a time; ZeRO-1/2 step the
whole partition at once, which is why their step can cost more than ZeRO-3's at small world sizes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch

from mixmae_scale.config import ResolvedConfig, run_kind
from mixmae_scale.config.precision import choose_precision, detect_hardware
from mixmae_scale.models.classifier import SwinClassifier
from mixmae_scale.models.mixmae import build_mixmae, swin_shape
from mixmae_scale.models.swin import SwinBlock

GIB = 2**30
# DeepSpeed's values for keys a ZeRO-3 config leaves out.
DEEPSPEED_DEFAULTS = {"sub_group_size": 1e9, "stage3_max_live_parameters": 1e9, "stage3_prefetch_bucket_size": 5e7}
# CUDA context, NCCL buffers and the allocator's slack; measured values differ by driver and card.
RUNTIME_OVERHEAD_GIB = 1.5


@dataclass
class ActivationProfile:
    """Bytes saved for backward per image: inside each encoder block, and everywhere else."""

    per_block: list[float]
    block_inputs: list[float]
    other: float

    def per_image(self, checkpoint_every: int | bool) -> float:
        """Peak activation bytes per image in a training step: what is saved, plus, during backward,
        the gradients of the block being differentiated (and, for a checkpointed block, its recomputed
        activations). `checkpoint_every` (model.checkpoint_every; True counts as 1): the blocks
        `checkpointed_blocks` says keep only their input, the others all they save."""
        checkpointed = checkpointed_blocks(len(self.per_block), int(checkpoint_every))
        rows = list(zip(self.per_block, self.block_inputs, checkpointed, strict=True))
        saved = sum(inp if ckpt else block for block, inp, ckpt in rows)
        in_backward = max((2 if ckpt else 1) * block for block, _, ckpt in rows)
        return saved + self.other + in_backward


def checkpointed_blocks(blocks: int, checkpoint_every: int) -> list[bool]:
    """Which encoder blocks run under activation checkpointing, exactly as models/swin.py's
    `SwinEncoder.forward_tokens` picks them: the block index counts over all stages, and block i is
    checkpointed when i % checkpoint_every == 0 (0: none). With k = 2 half the blocks keep all they save."""
    return [bool(checkpoint_every) and i % checkpoint_every == 0 for i in range(blocks)]


@dataclass
class MemoryPlan:
    profile: str
    job: str
    gpus: int
    gpu_mem_gib: float
    zero_stage: int
    dtype: str
    micro_batch: int  # what the run derives (config/derive.py), not the profile's ceiling batch.micro
    checkpointing: bool
    params: int
    accumulation: int = 1
    global_batch: int = 0
    components_gib: dict[str, float] = field(default_factory=dict)
    peak_phase: str = ""
    total_gib: float = 0.0
    fits: bool = False
    max_micro_batch: int = 0
    checkpoint_every: int = 0  # model.checkpoint_every: which blocks `checkpointing` covers (checkpointed_blocks)

    def to_dict(self) -> dict:
        return asdict(self)


def build_for_job(resolved: ResolvedConfig, job: str, depths: list[int] | None = None) -> torch.nn.Module:
    """The model the job trains: MixMAE (encoder + decoder) or the classifier (encoder + head).
    `depths`: other encoder stage depths than the configuration's (the measurement's shortened copy)."""
    config = resolved.config
    if job not in ("pretrain", "finetune"):
        from mixmae_scale.config import ConfigError

        raise ConfigError(f"mixmae plan sizes pretraining and classification fine-tuning, not {job} (the profile "
                          "sets segment.*): its dense backbone, UperNet head and crops are not measured; "
                          "--job pretrain or finetune plans the encoder alone")
    model = config.model if depths is None else replace(config.model, depths=list(depths))
    if job == "finetune":
        return SwinClassifier(swin_shape(model), config.finetune.num_classes or 1000,
                              checkpoint_every=model.checkpoint_every)
    return build_mixmae(model)


def measured_depths(depths: list[int]) -> list[int]:
    """The shortest encoder whose blocks save what every block of `depths` saves: the blocks of a stage are
    alike, except that the very first block of the encoder has no stochastic depth (rate 0, so nothing is
    saved for it) where the others have some. Keeping two blocks of the first stage and one of each other
    keeps that difference; Swin-H's forward measures 5 blocks instead of 24 (seconds instead of ~20 s)."""
    return [min(depths[0], 2), *([1] * (len(depths) - 1))]


def expand_to_depths(measured: list[float], depths: list[int]) -> list[float]:
    """Per-block figures of the `measured_depths` encoder, repeated for every block of `depths`."""
    out: list[float] = []
    start = 0
    for s, depth in enumerate(depths):
        taken = measured_depths(depths)[s]
        stage = measured[start:start + taken]
        out += stage + [stage[-1]] * (depth - taken)
        start += taken
    return out


def measure_activations(resolved: ResolvedConfig, dtype: str, batch: int = 2,
                        job: str = "pretrain") -> ActivationProfile:
    """Run one real forward on the CPU and record what autograd saves (see the module docstring).

    The forward runs in fp32 and each saved fp32 tensor is counted at the element size of `dtype`:
    a half-precision model saves the same tensors at half the size, and a bf16 forward on a CPU
    without native bf16 took minutes for Swin-H (against seconds)."""
    config = resolved.config.model
    depths = list(config.depths)
    torch.manual_seed(0)
    model = build_for_job(resolved, job, measured_depths(depths))
    model.encoder.checkpoint_every = 0
    model.encoder.set_fused_attention(False)  # the explicit path saves what a math-kernel attention saves
    float_scale = 0.5 if dtype in ("bf16", "fp16") else 1.0
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    blocks = [m for m in model.encoder.modules() if isinstance(m, SwinBlock)]
    per_block = [0.0] * len(blocks)
    block_inputs = [0.0] * len(blocks)
    state = {"block": None, "other": 0.0, "seen": set()}

    def enter(index):
        def hook(module, inputs):
            state["block"] = index
            block_inputs[index] = inputs[0].numel() * inputs[0].element_size() * float_scale
        return hook

    def leave(module, inputs, output):
        state["block"] = None

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(enter(i)))
        handles.append(block.register_forward_hook(leave))

    def pack(tensor):
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_ptrs and ptr not in state["seen"]:
            state["seen"].add(ptr)
            size = storage.nbytes() * (float_scale if tensor.dtype == torch.float32 else 1.0)
            if state["block"] is None:
                state["other"] += size
            else:
                per_block[state["block"]] += size
        return tensor

    images = torch.randn(batch, 3, config.img_size, config.img_size, dtype=next(model.parameters()).dtype)
    inputs = {"mask": model.sample_mask(torch.Generator().manual_seed(0))} if job == "pretrain" else {}
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images.requires_grad_(False), **inputs)
    for handle in handles:
        handle.remove()
    return ActivationProfile([b / batch for b in expand_to_depths(per_block, depths)],
                             [b / batch for b in expand_to_depths(block_inputs, depths)], state["other"] / batch)


def planning_dtype(resolved: ResolvedConfig) -> str:
    """The dtype the planned GPUs will run: `auto` is decided for a GPU (this machine's, or an
    Ampere-or-newer one when planning from a node without GPUs), not for the CPU that plans."""
    return choose_precision(resolved.config.precision.dtype, detect_hardware("cuda")).dtype


def model_state_bytes(params: int, stage: int, world: int, dtype: str, fp32_grad_accum: bool = False
                      ) -> dict[str, float]:
    """Per-GPU bytes of the model states. `fp32_grad_accum`: DeepSpeed accumulates the gradients in fp32 (the
    `data_types.grad_accum_dtype: fp32` config/deepspeed_config.py sets for bf16 at ZeRO >= 1, without offload).
    What DeepSpeed 0.19 then allocates beside the ZeRO paper's 2 bytes of 16-bit gradients:
    - ZeRO-1: engine.py `_do_optimizer_sanity_check` picks `BF16_Optimizer` (bf16 + fp32 accumulation at stage 1),
      whose `_setup_for_real_optimizer` (runtime/bf16_optimizer.py) allocates `fp32_groups_gradients_flat`,
      `torch.zeros_like(bf16_groups_flat, dtype=grad_acc_dtype)`: fp32 gradients of every parameter, not
      partitioned (4 bytes/param); the bf16 `.grad`s stay too (`update_hp_grads` folds them in and zeroes, not frees,
      them without `immediate_grad_update`, off by default): 2 + 4 bytes/param in all.
    - ZeRO-2: runtime/zero/stage_1_and_2.py `_build_compact_grad_partition_buffer` keeps the rank's gradient
      partition in `gradient_accumulation_dtype` (fp32): 4 bytes/param / world (the bf16 gradients pass through the
      reduce buckets only).
    - ZeRO-3: runtime/zero/stage3.py `grad_partitions_flat_buffer` (`torch.zeros(partition numel,
      dtype=gradient_accumulation_dtype)`): 4 bytes/param / world."""
    half = dtype in ("bf16", "fp16")
    weights = (2 if half else 4) * params
    grads = (2 if half else 4) * params
    master = 4 * params if half else 0
    moments = 8 * params
    shard = lambda x, partitioned: x / world if partitioned else x  # noqa: E731
    gradients = shard(grads, stage >= 2)
    if fp32_grad_accum and half and stage >= 1:
        gradients = (2 + 4) * params if stage == 1 else 4 * params / world
    return {"weights": shard(weights, stage >= 3), "gradients": gradients,
            "fp32_master_weights": shard(master, stage >= 1), "adam_moments": shard(moments, stage >= 1)}


def optimizer_step_bytes(params: int, stage: int, world: int, dtype: str, sub_group_size: float,
                         fused: bool) -> float:
    """The step's transient (see the module docstring): fp32 gradients of the slice being stepped, and an
    unfused AdamW's temporaries (`exp_avg_sq.sqrt()`, then the denominator) over the same slice."""
    chunk = params / world if stage >= 1 else params
    if stage == 3:
        chunk = min(chunk, sub_group_size)
    upcast = 4 * chunk if dtype in ("bf16", "fp16") else 0.0
    return upcast + (0.0 if fused else 2 * 4 * chunk)


def gathered_weight_bytes(params: int, stage: int, world: int, dtype: str, zero: dict) -> float:
    """ZeRO-3 only: full 16-bit copies of the weights in flight, beyond this rank's own partition."""
    if stage < 3:
        return 0.0
    get = lambda key: float(zero.get(key, DEEPSPEED_DEFAULTS[key]))  # noqa: E731
    live = min(params, get("stage3_max_live_parameters") + get("stage3_prefetch_bucket_size"))
    return (2 if dtype in ("bf16", "fp16") else 4) * live * (1 - 1 / world)


def plan(resolved: ResolvedConfig, profile: str, gpus: int, gpu_mem_gib: float,
         activations: ActivationProfile | None = None, overhead_gib: float = RUNTIME_OVERHEAD_GIB,
         fused_optimizer: bool = True, job: str | None = None) -> MemoryPlan:
    """`fused_optimizer`: True on GPUs (build_optimizer uses fused AdamW there), False for CPU runs.
    `job`: pretrain or finetune; by default what the profile is (config/derive.py's `run_kind`)."""
    from mixmae_scale.config.deepspeed_config import build_deepspeed_config

    config = resolved.config
    job = job or run_kind(profile)
    dtype, stage = planning_dtype(resolved), config.zero.stage
    checkpointing = config.model.checkpoint_every > 0
    with torch.device("meta"):
        params = sum(p.numel() for p in build_for_job(resolved, job).parameters())
    activations = activations or measure_activations(resolved, dtype, job=job)
    zero = build_deepspeed_config(resolved).get("zero_optimization", {})
    # What the planned GPUs' run gets (config/deepspeed_config.py: bf16 at ZeRO >= 1 accumulates in fp32, unless the
    # profile's `deepspeed:` says otherwise); this machine's own dtype may differ (a CPU plans for bf16 GPUs). With
    # offload, ZeRO-1 keeps DeepSpeed's ZeRO optimizer (not BF16_Optimizer): counted as before there.
    default_accum = "fp32" if dtype == "bf16" and stage > 0 else None
    accum = (config.deepspeed.get("data_types") or {}).get("grad_accum_dtype", default_accum)
    fp32_accum = accum == "fp32" and dtype == "bf16" and not config.zero.offload_optimizer
    states = model_state_bytes(params, stage, gpus, dtype, fp32_accum)
    step = optimizer_step_bytes(params, stage, gpus, dtype, float(zero.get("sub_group_size",
                                DEEPSPEED_DEFAULTS["sub_group_size"])), fused_optimizer)
    if config.zero.offload_optimizer:
        states["fp32_master_weights"] = states["adam_moments"] = 0.0
        step = 0.0  # the step runs in host memory
    gathered = gathered_weight_bytes(params, stage, gpus, dtype, zero)
    per_image = activations.per_image(config.model.checkpoint_every)
    micro = resolved.derived.micro_batch
    fixed = sum(states.values()) + overhead_gib * GIB
    components = {k: v / GIB for k, v in states.items()}
    components["activations"] = micro * per_image / GIB
    components["gathered_weights"] = gathered / GIB
    components["optimizer_step_transient"] = step / GIB
    components["runtime_overhead"] = overhead_gib
    forward_backward = micro * per_image + gathered
    phase = "forward/backward" if forward_backward >= step else "optimizer step"
    total = (fixed + max(forward_backward, step)) / GIB
    budget = gpu_mem_gib * GIB - fixed
    max_micro = 0 if step > budget else max(0, int((budget - gathered) // per_image)) // 2 * 2  # even: pairs
    return MemoryPlan(profile, job, gpus, gpu_mem_gib, stage, dtype, micro, checkpointing, params,
                      resolved.derived.accumulation, resolved.derived.global_batch,
                      {k: round(v, 3) for k, v in components.items()}, phase, round(total, 3),
                      total <= gpu_mem_gib, max_micro, config.model.checkpoint_every)


# Below this many images per GPU a Swin step stops saturating an 80 GB-class GPU, so a cheaper
# configuration that only fits smaller micro-batches is passed over (unless the per-GPU batch is smaller).
SATURATING_MICRO_BATCH = 32
# The activation measurement under-estimated the H200's peak without checkpointing by up to 18%
# (benchmarks/results/plan_check.json); the rest is allocator fragmentation.
DEFAULT_HEADROOM = 0.25


@dataclass
class Option:
    zero_stage: int
    checkpointing: bool
    micro_batch: int  # 0: does not fit at any micro-batch
    accumulation: int
    peak_gib: float

    def overrides(self) -> list[str]:
        return [f"zero.stage={self.zero_stage}", f"model.checkpoint_every={int(self.checkpointing)}",
                f"batch.micro={self.micro_batch}", f"batch.accumulation={self.accumulation}"]


def options(profile: str, gpus: int, gpu_mem_gib: float, cluster: str | None = None,
            overrides: list[str] | tuple[str, ...] = (), headroom: float = DEFAULT_HEADROOM,
            activations: ActivationProfile | None = None,
            job: str | None = None) -> tuple[list[Option], Option | None]:
    """Every ZeRO stage x checkpointing choice with the largest micro-batch that divides the per-GPU
    share of the profile's global batch and fits in (1 - headroom) of the GPU, and the one to use.

    Candidates are ranked by cost, not timed: no recompute before recompute (checkpointing adds about
    a third to the step's compute), then the lower ZeRO stage (stage 3 adds 50% communication). The
    choice is the first that reaches a saturating micro-batch. `activations`: a measurement already
    made for this profile, job and precision (it does not depend on stage or checkpointing)."""
    from mixmae_scale.config import load_config, load_resolved, run_kind

    batch = load_config(profile, cluster, list(overrides))[0].batch
    global_batch = batch.global_batch or batch.micro * (batch.accumulation or 1) * gpus
    base = load_resolved(profile, cluster, [*overrides, "batch.global_batch=null", "batch.accumulation=1"],
                         world_size=gpus)
    job = job or run_kind(profile)
    if global_batch % gpus:
        raise ValueError(f"the global batch {global_batch} of {profile!r} does not divide over {gpus} GPUs")
    per_gpu = global_batch // gpus
    acts = activations or measure_activations(base, planning_dtype(base), job=job)
    usable = gpu_mem_gib * (1 - headroom)
    found: list[Option] = []
    for checkpointing in (False, True):
        for stage in (1, 2, 3):
            settings = [*overrides, f"zero.stage={stage}", f"model.checkpoint_every={int(checkpointing)}",
                        "batch.global_batch=null", "batch.accumulation=1", "batch.micro=2"]
            largest = plan(load_resolved(profile, cluster, settings, world_size=gpus), profile, gpus, usable,
                           activations=acts, job=job).max_micro_batch
            micro = max((m for m in range(2, per_gpu + 1, 2) if per_gpu % m == 0 and m <= largest), default=0)
            peak = 0.0
            if micro:
                settings[-1] = f"batch.micro={micro}"
                peak = plan(load_resolved(profile, cluster, settings, world_size=gpus), profile, gpus, gpu_mem_gib,
                            activations=acts, job=job).total_gib
            found.append(Option(stage, checkpointing, micro, per_gpu // micro if micro else 0, round(peak, 2)))
    enough = min(per_gpu, SATURATING_MICRO_BATCH)
    chosen = next((o for o in found if o.micro_batch >= enough), None)
    if chosen is None:
        chosen = max((o for o in found if o.micro_batch), key=lambda o: o.micro_batch, default=None)
    return found, chosen


def next_steps(profile: str, gpus: int, gpu_mem_gib: float, cluster: str | None = None,
               overrides: list[str] | tuple[str, ...] = (), headroom: float = DEFAULT_HEADROOM,
               activations: ActivationProfile | None = None, job: str | None = None) -> list[str]:
    """What to change when no option of `options` fits, each way out evaluated by this planner rather than guessed:
    the leanest setting it ranks (ZeRO-3, checkpointing every block, micro-batch 2, the smallest MixMAE pairs)
    with the optimizer offloaded, on more GPUs (those the global batch splits over), and the GPU memory it needs.
    Without these a table of 'does not fit' rows left the reader no next step."""
    from mixmae_scale.config import load_config, load_resolved, run_kind

    batch = load_config(profile, cluster, list(overrides))[0].batch
    global_batch = batch.global_batch or batch.micro * (batch.accumulation or 1) * gpus
    job = job or run_kind(profile)
    usable = gpu_mem_gib * (1 - headroom)
    leanest = [*overrides, "zero.stage=3", "model.checkpoint_every=1", "batch.global_batch=null",
               "batch.accumulation=1", "batch.micro=2"]

    def lean(world: int, extra: tuple[str, ...] = ()) -> MemoryPlan:
        return plan(load_resolved(profile, cluster, [*leanest, *extra], world_size=world), profile, world, usable,
                    activations=activations, job=job)

    steps = [f"nothing fits {usable:.2f} GiB ({1 - headroom:.0%} of the GPU): not even micro-batch 2 (the smallest, "
             "MixMAE pairs images) with ZeRO-3 and checkpointing every block"]
    offload = lean(gpus, ("zero.offload_optimizer=true",)).max_micro_batch
    steps.append(f"offload the optimizer to host memory: --set zero.offload_optimizer=true --set zero.stage=3 --set "
                 f"model.checkpoint_every=1 (micro-batch up to {offload} fits)" if offload >= 2 else
                 "offloading the optimizer (--set zero.offload_optimizer=true) does not fit either")
    more = [w for w in range(gpus + 1, global_batch // 2 + 1) if global_batch % (2 * w) == 0][:12]
    enough = next((w for w in more if lean(w).max_micro_batch >= 2), None)
    steps.append(f"more GPUs: --gpus {enough} fits with ZeRO-3 and checkpointing (it partitions the model states over "
                 "them)" if enough else f"more GPUs: none of {', '.join(map(str, more)) or 'the counts'} that split "
                 f"the global batch {global_batch} fits either")
    needed = lean(gpus).total_gib / (1 - headroom) * 2**30 / 1e9
    steps.append(f"a larger GPU: --gpu-mem-gb {needed:.1f} or more fits ZeRO-3 with checkpointing at micro-batch 2")
    return steps
