"""MixMAE's mask: drawn once per step on the final-stage grid, shared by the batch, upsampled per stage.

Convention (as in the official code): m = 1 marks a cell of the final grid taken from the partner
image B-1-i; image i is visible where m = 0. Because the mask lives on the coarsest grid and is
upsampled by nearest neighbour, a 2x2 patch merge never combines tokens of two images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixmae_scale.models.window_attention import same_source_mask


def sample_mask(grid: int, ratio: float, range_ratio: float = 0.0, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """A (grid * grid,) float mask with floor(grid^2 * r) ones, r = ratio + U(0, range_ratio)."""
    if range_ratio > 0:
        ratio = ratio + range_ratio * torch.rand((), generator=generator).item()
    cells = grid * grid
    n_masked = int(cells * ratio)
    order = torch.randperm(cells, generator=generator)
    mask = torch.zeros(cells)
    mask[order[:n_masked]] = 1.0
    return mask.to(device)


def upsample_mask(mask: torch.Tensor, resolution: int) -> torch.Tensor:
    """(g * g,) mask -> (resolution, resolution) nearest-neighbour upsampling."""
    grid = int(round(mask.numel() ** 0.5))
    if resolution % grid:
        raise ValueError(f"stage resolution {resolution} is not a multiple of the mask grid {grid}")
    return F.interpolate(mask.view(1, 1, grid, grid), size=(resolution, resolution), mode="nearest")[0, 0]


def stage_source_masks(mask: torch.Tensor, resolutions: list[int], windows: list[int]) -> list[torch.Tensor]:
    """One additive same-source attention mask per stage, (nW, 1, N, N)."""
    return [same_source_mask(upsample_mask(mask, r), w) for r, w in zip(resolutions, windows, strict=True)]


def mix_tokens(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mixed[i] = tokens[i] where m = 0, tokens[B-1-i] where m = 1; tokens are (B, H, W, C)."""
    batch = tokens.shape[0]
    if batch % 2:
        raise ValueError(
            f"MixMAE mixes image i with image B-1-i, so the micro-batch must be even; got {batch}")
    m = upsample_mask(mask, tokens.shape[1]).to(tokens.dtype)[None, :, :, None]
    return tokens * (1 - m) + tokens.flip(0) * m
