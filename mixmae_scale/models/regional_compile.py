"""Regional `torch.compile`: each Swin block and decoder block compiled on its own.

Why blocks and not the whole model: the blocks of a stage share one compiled graph (same code, same
shapes; parameters are graph inputs), so Swin-B compiles five graphs instead of tracing 32 blocks, and
everything around them stays eager: the mixing, the mask drawing, DeepSpeed's ZeRO-3 hooks (only the
blocks' `forward` is compiled, so the hooks that gather and release parameters run as before) and
activation checkpointing (which calls the block, recomputing through the compiled code).

The same-source mask is an input of the compiled forward, never a constant, so a new mask each step
does not recompile.
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


def compile_blocks(model: nn.Module, block_types: tuple[type[nn.Module], ...]) -> int:
    """Compile the `forward` of every module of `block_types` in `model`; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, block_types):
            module.forward = torch.compile(module.forward)
            count += 1
    return count


def maybe_compile(model: nn.Module, enabled: bool, device: torch.device) -> int:
    """Compile MixMAE's or the classifier's blocks where `enabled` and the compiler works here; otherwise one
    warning and eager blocks. Returns the number of compiled blocks (0: eager)."""
    if not enabled:
        return 0
    reason = compiler_unavailable(device)
    if reason is not None:
        log.warning("model.compile: %s; the blocks run eagerly (set model.compile=false to silence this)", reason)
        return 0
    from timm.models.vision_transformer import Block

    from mixmae_scale.models.swin import SwinBlock

    return compile_blocks(model, (SwinBlock, Block))
