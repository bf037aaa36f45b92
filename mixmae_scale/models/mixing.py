"""MixMAE's mask: drawn once per step on the final-stage grid, shared by the batch, upsampled per stage.

Convention (as in the official code): m = 1 marks a cell of the final grid taken from the partner
image B-1-i; image i is visible where m = 0. Because the mask lives on the coarsest grid and is
upsampled by nearest neighbour, a 2x2 patch merge never combines tokens of two images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixmae_scale.models.source_groups import DenseGroups, FlexGroups, dense_groups, flex_groups
from mixmae_scale.models.window_attention import same_source_mask


def sample_mask(grid: int, ratio: float, range_ratio: float = 0.0, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """A (grid * grid,) float mask with floor(grid^2 * r) ones, r = ratio + U(0, range_ratio).

    The cells are drawn where `generator` lives: a training step passes a generator on its GPU, so the
    mask is made there without a host-to-device copy or a synchronisation. The count of masked cells is
    a host number, so the random part of the ratio comes from a CPU generator seeded alike."""
    draw_device = generator.device if generator is not None else torch.device(device)
    if range_ratio > 0:
        host = torch.Generator().manual_seed(generator.initial_seed()) if generator is not None else None
        ratio = ratio + range_ratio * torch.rand((), generator=host).item()
    cells = grid * grid
    order = torch.randperm(cells, generator=generator, device=draw_device)
    mask = torch.zeros(cells, device=draw_device).index_fill_(0, order[:int(cells * ratio)], 1.0)
    return mask.to(device)


def upsample_mask(mask: torch.Tensor, resolution: int) -> torch.Tensor:
    """(g * g,) mask -> (resolution, resolution) nearest-neighbour upsampling."""
    grid = int(round(mask.numel() ** 0.5))
    if resolution % grid:
        raise ValueError(f"stage resolution {resolution} is not a multiple of the mask grid {grid}")
    return F.interpolate(mask.view(1, 1, grid, grid), size=(resolution, resolution), mode="nearest")[0, 0]


def stage_source_masks(mask: torch.Tensor, resolutions: list[int], windows: list[int],
                       dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """One additive same-source attention mask per stage, (nW, 1, N, N) in the attention dtype: made once
    per forward and shared by the stage's blocks (and, as an input, by their compiled code)."""
    return [same_source_mask(upsample_mask(mask, r), w, dtype) for r, w in zip(resolutions, windows, strict=True)]


def stage_source_groups(mask: torch.Tensor, resolutions: list[int], windows: list[int], heads: list[int],
                        kernel: str, flex_tile: int = 64) -> list[DenseGroups | FlexGroups]:
    """Per stage, the windows' tokens grouped by source for attention that skips cross-source pairs;
    `kernel` "dense" or "flex" (see models/source_groups.py)."""
    if kernel == "flex":
        return [flex_groups(upsample_mask(mask, r), w, h, flex_tile)
                for r, w, h in zip(resolutions, windows, heads, strict=True)]
    return [dense_groups(upsample_mask(mask, r), w) for r, w in zip(resolutions, windows, strict=True)]


def mix_tokens(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mixed[i] = tokens[i] where m = 0, tokens[B-1-i] where m = 1; tokens are (B, H, W, C)."""
    batch = tokens.shape[0]
    if batch % 2:
        raise ValueError(
            f"MixMAE mixes image i with image B-1-i, so the micro-batch must be even; got {batch}")
    m = upsample_mask(mask, tokens.shape[1]).to(tokens.dtype)[None, :, :, None]
    return tokens * (1 - m) + tokens.flip(0) * m
