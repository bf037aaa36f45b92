"""AdamW parameter groups: which parameters weight decay applies to.

The official MixMAE code (timm's old `add_weight_decay` in pretraining, `param_groups_lrd` with an
empty `no_weight_decay()` in fine-tuning) exempts only 1-D parameters (norm scales, biases): the
relative-position bias tables and the mask token ARE decayed. That is the default here.
`optim.exempt_tables_from_decay` also exempts them, as timm's Swin and most MAE descendants do (a
decayed bias table is pulled towards "no relative-position preference"); it is opt-in because the
published numbers were obtained without it. The sin-cos position embeddings are buffers, never optimised.
"""

from __future__ import annotations

import fnmatch

import torch

from mixmae_scale.config.schema import OptimConfig

EXEMPT_TABLES = ("*relative_position_bias_table", "*mask_token")


def exempt_from_decay(name: str, param: torch.nn.Parameter, exempt_tables: bool) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or (
        exempt_tables and any(fnmatch.fnmatch(name, pattern) for pattern in EXEMPT_TABLES))


def width_scaled(name: str, param: torch.nn.Parameter) -> bool:
    """A matrix whose fan-in grows with the model width: the Linear weights (muP's hidden and output matrices).
    The patch embedding (fan-in: pixels), vectors and the relative-position tables do not."""
    return param.ndim == 2 and not name.endswith("relative_position_bias_table")


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, lr: float, offload: bool = False,
                    width: int | None = None, zero_stage: int = 1) -> torch.optim.Optimizer:
    """`width` (the model's embed_dim) with `optim.width_lr_base` set: width-scaled matrices get their own
    group at lr x width_lr_base / width (DeepSpeed's WarmupCosineLR scales each group's own lr)."""
    scale = optim.width_lr_base / width if optim.width_lr_base and width else 1.0
    groups: dict[tuple[bool, bool], list] = {(d, w): [] for d in (False, True) for w in (False, True)}
    for name, param in model.named_parameters():
        if param.requires_grad:
            decayed = not exempt_from_decay(name, param, optim.exempt_tables_from_decay)
            groups[(decayed, scale != 1.0 and width_scaled(name, param))].append(param)
    param_groups = [{"params": params, "weight_decay": optim.weight_decay if decayed else 0.0,
                     "lr": lr * (scale if scaled else 1.0)}
                    for (decayed, scaled), params in groups.items() if params]
    return adamw(param_groups, optim, lr, next(model.parameters()).is_cuda, offload, zero_stage)


class FiniteStepAdamW(torch.optim.AdamW):
    """torch's AdamW that does not apply a step whose gradients are not all finite, and says so the way DeepSpeed's
    own optimizers do (`overflow`, which the engine reads to skip the scheduler step and report
    `was_step_applied()`). Only ZeRO-0 in fp32 hands DeepSpeed the client optimizer bare; ZeRO 1-3 check the
    gradient norm themselves. The gradients are all-reduced by then, so every rank decides alike."""

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms = torch._foreach_norm(grads) if grads else []
        self.overflow = bool(norms) and not bool(torch.isfinite(torch.stack(norms).sum()))
        if self.overflow:
            return None
        return super().step(closure)


def adamw(groups: list[dict], optim: OptimConfig, lr: float, on_gpu: bool, offload: bool,
          zero_stage: int = 1) -> torch.optim.Optimizer:
    """AdamW over parameter groups that carry their own weight decay (and lr scales).

    With ZeRO-Offload (`zero.offload_optimizer`) the step runs on the host, and DeepSpeed refuses a torch
    optimizer there (ZeRORuntimeException): its own `DeepSpeedCPUAdam` in AdamW mode is the documented
    route (a C++ op, compiled on first use). Otherwise torch's AdamW, fused on GPUs."""
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=tuple(optim.betas), eps=optim.eps, adamw_mode=True)
    kind = FiniteStepAdamW if zero_stage == 0 else torch.optim.AdamW
    return kind(groups, lr=lr, betas=tuple(optim.betas), eps=optim.eps, fused=on_gpu or None)


def last_step_learning_rate(peak: float, scheduler) -> float:
    """The schedule's lr of the step just taken, which metrics.csv logs against that step: DeepSpeed's engine has
    already stepped the scheduler on to the next one (the log gave step k+1's lr as step k's).

    DeepSpeed's WarmupCosineLR sets the lr of iteration -1 (0) when built and steps after each optimizer step, so
    step k runs at iteration k - 2: steps 1 and 2 at lr 0 and the warm-up one step behind the official schedule
    (util/lr_sched.py: step k at k - 1), while its cosine, which counts one iteration further, matches the official
    one step for step (docs/recipe.md)."""
    import copy

    if scheduler.last_batch_iteration <= 0:  # step 1 ran at the lr set when the scheduler was built: 0
        return 0.0
    previous = copy.copy(scheduler)
    previous.last_batch_iteration -= 1
    return scheduled_learning_rate(peak, previous)


def scheduled_learning_rate(peak: float, scheduler) -> float:
    """The schedule's own lr (`peak` = derived.learning_rate, times the warm-up/cosine factor), which is what a
    run's log reports: each parameter group's lr is a multiple of it (layer decay, a new head's
    `segment.head_lr_scale`, the width-lr rule), so no single group's lr says where the schedule is."""
    return peak * scheduler.get_lr_ratio()
