"""Regional `torch.compile`: each Swin block and decoder block compiled on its own.

Why blocks and not the whole model: the blocks of a stage share one compiled graph (same code, same
shapes; parameters are graph inputs), so Swin-B compiles five graphs instead of tracing 32 blocks, and
everything around them stays eager: the mixing, the mask drawing, DeepSpeed's ZeRO-3 hooks (only the
blocks' `forward` is compiled, so the hooks that gather and release parameters run as before; the engine makes
the compiled blocks ZeRO-3 leaves, so that the hooks of the layers inside them are not traced into the graphs)
and activation checkpointing (which calls the block, recomputing through the compiled code).

The same-source mask is an input of the compiled forward, never a constant, so a new mask each step
does not recompile. Graphs are static (`dynamic=False`): the stages' shapes differ, and dynamo's automatic
dynamic shapes would otherwise turn the second stage's graph into a slower symbolic one. One graph per
stage shape and mode (training; evaluation under no_grad) means 8 for Swin's four stages, exactly dynamo's
default recompile limit, past which it silently runs eagerly: the limit is raised to fit.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch
from torch import nn

log = logging.getLogger(__name__)


def compiler_unavailable(device: torch.device) -> str | None:
    """Why `torch.compile` cannot generate code for `device` here, or None if it can."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed"
    compiler = os.environ.get("CXX", "g++")
    return None if shutil.which(compiler) else f"no C++ compiler ({compiler}) on PATH for the CPU backend"


GRAPHS_PER_SHAPE = 4  # training, evaluation (no_grad), and room for a second batch size in each


def compile_blocks(model: nn.Module, block_types: tuple[type[nn.Module], ...], **options) -> int:
    """Compile the `forward` of every module of `block_types` in `model`; returns how many. `options` go to
    `torch.compile` (a benchmark's dry run traces with backend="eager")."""
    import torch._dynamo.config as dynamo_config

    count, shapes = 0, set()
    for module in model.modules():
        if isinstance(module, block_types):
            module.forward = torch.compile(module.forward, dynamic=False, **options)
            shapes.add((type(module), tuple(p.shape for p in module.parameters())))
            count += 1
    needed = GRAPHS_PER_SHAPE * len(shapes)
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name, and the older one
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < needed:
            setattr(dynamo_config, name, needed)
    return count


def compile_whole(model: nn.Module, **options) -> int:
    """`model.compile=whole`: the model's whole forward (for MixMAE: mixing, encoder, decoder, loss) as one
    static graph, so the compiler also fuses what lies between the blocks and one graph launches per step
    instead of one per block. Needs no graph break inside (tests/unit/test_grouped_attention.py checks the
    pretraining forward) and parameters that stay in place (not ZeRO-3). Returns 1, the graphs' owner.
    `options` go to `torch.compile` (mode="reduce-overhead" adds CUDA graphs)."""
    model.forward = torch.compile(model.forward, dynamic=False, **options)
    return 1


def maybe_compile(model: nn.Module, enabled: bool, device: torch.device, whole: bool = False) -> int:
    """Compile MixMAE's or the classifier's blocks (or, `whole`, its whole forward) where `enabled` and the
    compiler works here; otherwise one warning and eager blocks. Returns the number of compiled blocks
    (0: eager; 1 for the whole forward)."""
    if not enabled:
        return 0
    reason = compiler_unavailable(device)
    if reason is not None:
        log.warning("model.compile: %s; the blocks run eagerly (set model.compile=false to silence this)", reason)
        return 0
    if whole:
        return compile_whole(model)
    return compile_blocks(model, block_types())


def block_types() -> tuple[type[nn.Module], ...]:
    """What regional compilation compiles: MixMAE's Swin blocks and its decoder's (timm's) blocks."""
    from timm.models.vision_transformer import Block

    from mixmae_scale.models.swin import SwinBlock

    return SwinBlock, Block
