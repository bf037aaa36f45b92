"""Layer-wise learning-rate decay for the Swin classifier, exactly as the official `param_groups_lrd`.

With n encoder blocks in all, layer ids are: 0 for the patch embedding (and the position embedding),
k + 1 for block k counted over all stages, and for the patch merging after stage s the id of the block
it feeds (sum(depths[:s+1]) + 1). Everything else, the final norm and the head, gets n, the same id as
the last block. Scale = decay ** (n + 1 - id), so the head learns at decay ** 1 (0.7 for B), not at
the full rate. Weight decay follows `engine/optimizer.py`: 1-D parameters exempt, by default nothing else.
"""

from __future__ import annotations

import re

import torch

from mixmae_scale.engine.optimizer import exempt_from_decay


def layer_id(name: str, depths: list[int] | tuple[int, ...]) -> int:
    if name.startswith("encoder.patch_embed") or name.startswith("encoder.absolute_pos_embed"):
        return 0
    match = re.match(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.", name)
    if match:
        stage, block = int(match[1]), int(match[2])
        return sum(depths[:stage]) + block + 1
    match = re.match(r"encoder\.layers\.(\d+)\.downsample\.", name)
    if match:
        return sum(depths[: int(match[1]) + 1]) + 1
    return sum(depths)  # encoder.norm, head: the official `else` branch


def param_groups_layer_decay(model: torch.nn.Module, depths: list[int] | tuple[int, ...], base_lr: float,
                             weight_decay: float, decay: float, exempt_tables: bool = False) -> list[dict]:
    num_blocks = sum(depths)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_wd = exempt_from_decay(name, param, exempt_tables)
        lid = layer_id(name, depths)
        scale = decay ** (num_blocks + 1 - lid)
        group = groups.setdefault((lid, no_wd), {
            "params": [], "names": [], "weight_decay": 0.0 if no_wd else weight_decay, "lr_scale": scale,
            "lr": base_lr * scale, "layer_id": lid})
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]
