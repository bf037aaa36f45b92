"""Per-GPU memory of a training configuration, by component, and the largest micro-batch that fits.

Model states follow the ZeRO paper's accounting for mixed precision with Adam (2 bytes of weights,
2 of gradients, 12 of fp32 master weights and moments per parameter; fp32 training: 4 + 4 + 8),
each divided by the world size where the ZeRO stage partitions it. Activations are measured, not
guessed: one forward of the real model at micro-batch 2 records the bytes every operation saves for
backward (parameters excluded), per encoder block and elsewhere. With activation checkpointing a
block keeps only its input, plus one block's activations while it is recomputed. The measurement
uses the explicit attention path, which keeps the attention probabilities; memory-efficient SDPA
kernels on GPUs keep less, so the activation figure is an upper bound there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from mixmae_scale.config import ResolvedConfig
from mixmae_scale.models.mixmae import build_mixmae
from mixmae_scale.models.swin import SwinBlock

GIB = 2**30
# CUDA context, NCCL buffers and the allocator's slack; measured values differ by driver and card.
RUNTIME_OVERHEAD_GIB = 1.5


@dataclass
class ActivationProfile:
    """Bytes saved for backward per image: inside each encoder block, and everywhere else."""

    per_block: list[float]
    block_inputs: list[float]
    other: float

    def per_image(self, checkpointing: bool) -> float:
        """Peak activation bytes per image in a training step: what is saved, plus, during backward,
        the gradients of the block being differentiated (and, with checkpointing, its recomputed
        activations)."""
        largest = max(self.per_block)
        if not checkpointing:
            return sum(self.per_block) + self.other + largest
        return sum(self.block_inputs) + self.other + 2 * largest


@dataclass
class MemoryPlan:
    profile: str
    gpus: int
    gpu_mem_gib: float
    zero_stage: int
    dtype: str
    micro_batch: int
    checkpointing: bool
    params: int
    components_gib: dict[str, float] = field(default_factory=dict)
    total_gib: float = 0.0
    fits: bool = False
    max_micro_batch: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def measure_activations(resolved: ResolvedConfig, dtype: str, batch: int = 2) -> ActivationProfile:
    """Run one real forward on the CPU and record what autograd saves (see the module docstring)."""
    config = resolved.config.model
    torch.manual_seed(0)
    model = build_mixmae(config)
    model.encoder.checkpoint_every = 0
    model.encoder.set_fused_attention(False)  # the explicit path saves what a math-kernel attention saves
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    elif dtype == "fp16":
        model = model.to(torch.float16)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    blocks = [m for m in model.encoder.modules() if isinstance(m, SwinBlock)]
    per_block = [0.0] * len(blocks)
    block_inputs = [0.0] * len(blocks)
    state = {"block": None, "other": 0.0, "seen": set()}

    def enter(index):
        def hook(module, inputs):
            state["block"] = index
            block_inputs[index] = inputs[0].numel() * inputs[0].element_size()
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
            if state["block"] is None:
                state["other"] += storage.nbytes()
            else:
                per_block[state["block"]] += storage.nbytes()
        return tensor

    images = torch.randn(batch, 3, config.img_size, config.img_size, dtype=next(model.parameters()).dtype)
    mask = model.sample_mask(torch.Generator().manual_seed(0))
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images.requires_grad_(False), mask=mask)
    for handle in handles:
        handle.remove()
    return ActivationProfile([b / batch for b in per_block], [b / batch for b in block_inputs],
                             state["other"] / batch)


def model_state_bytes(params: int, stage: int, world: int, dtype: str) -> dict[str, float]:
    half = dtype in ("bf16", "fp16")
    weights = (2 if half else 4) * params
    grads = (2 if half else 4) * params
    master = 4 * params if half else 0
    moments = 8 * params
    shard = lambda x, partitioned: x / world if partitioned else x  # noqa: E731
    return {"weights": shard(weights, stage >= 3), "gradients": shard(grads, stage >= 2),
            "fp32_master_weights": shard(master, stage >= 1), "adam_moments": shard(moments, stage >= 1)}


def plan(resolved: ResolvedConfig, profile: str, gpus: int, gpu_mem_gib: float,
         activations: ActivationProfile | None = None, overhead_gib: float = RUNTIME_OVERHEAD_GIB) -> MemoryPlan:
    config = resolved.config
    dtype = config.precision.dtype
    checkpointing = config.model.checkpoint_every > 0
    with torch.device("meta"):
        params = sum(p.numel() for p in build_mixmae(config.model).parameters())
    activations = activations or measure_activations(resolved, dtype)
    states = model_state_bytes(params, config.zero.stage, gpus, dtype)
    if config.zero.offload_optimizer:
        states["fp32_master_weights"] = states["adam_moments"] = 0.0
    fixed = sum(states.values()) + overhead_gib * GIB
    per_image = activations.per_image(checkpointing)
    micro = config.batch.micro
    components = {k: v / GIB for k, v in states.items()}
    components["activations"] = micro * per_image / GIB
    components["runtime_overhead"] = overhead_gib
    total = sum(components.values())
    budget = gpu_mem_gib * GIB - fixed
    max_micro = max(0, int(budget // per_image)) // 2 * 2  # MixMAE pairs images: even micro-batches
    return MemoryPlan(profile, gpus, gpu_mem_gib, config.zero.stage, dtype, micro, checkpointing, params,
                      {k: round(v, 3) for k, v in components.items()}, round(total, 3), total <= gpu_mem_gib,
                      max_micro)
