"""AdamW parameter groups: no weight decay where decay has no meaning.

Norm scales and biases (1-D), the mask token and the relative-position bias tables are excluded, as
in the official recipe; the sin-cos position embeddings are buffers and never optimised.
"""

from __future__ import annotations

import torch
from timm.optim import param_groups_weight_decay

from mixmae_scale.config.schema import OptimConfig

NO_WEIGHT_DECAY = ("*relative_position_bias_table", "*mask_token", "*absolute_pos_embed", "*decoder_pos_embed")


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, lr: float) -> torch.optim.Optimizer:
    groups = param_groups_weight_decay(model, optim.weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY)
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas), eps=optim.eps, fused=fused or None)
