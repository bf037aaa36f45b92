"""Layer-wise learning-rate decay for the Swin classifier.

Layer ids: the patch embedding (with the position embedding) is 0, encoder block k (counted over all
stages) is k + 1, a stage's patch merging belongs with the first block it feeds, and the final norm
and the head are num_blocks + 1 with scale 1.0. Scale = decay ** (num_blocks + 1 - id). Unlike the
official code, the head and the final norm are not decayed (the reference notes that quirk).
"""

from __future__ import annotations

import fnmatch
import re

import torch

from mixmae_scale.engine.optimizer import NO_WEIGHT_DECAY


def layer_id(name: str, depths: list[int] | tuple[int, ...]) -> int:
    num_blocks = sum(depths)
    if name.startswith("encoder.patch_embed") or name.startswith("encoder.absolute_pos_embed"):
        return 0
    match = re.match(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.", name)
    if match:
        stage, block = int(match[1]), int(match[2])
        return sum(depths[:stage]) + block + 1
    match = re.match(r"encoder\.layers\.(\d+)\.downsample\.", name)
    if match:
        return sum(depths[: int(match[1]) + 1]) + 1
    return num_blocks + 1  # encoder.norm, head


def param_groups_layer_decay(model: torch.nn.Module, depths: list[int] | tuple[int, ...], base_lr: float,
                             weight_decay: float, decay: float) -> list[dict]:
    num_blocks = sum(depths)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_wd = param.ndim <= 1 or name.endswith(".bias") or any(fnmatch.fnmatch(name, p) for p in NO_WEIGHT_DECAY)
        lid = layer_id(name, depths)
        scale = decay ** (num_blocks + 1 - lid)
        group = groups.setdefault((lid, no_wd), {
            "params": [], "names": [], "weight_decay": 0.0 if no_wd else weight_decay, "lr_scale": scale,
            "lr": base_lr * scale, "layer_id": lid})
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]
