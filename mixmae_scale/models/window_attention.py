"""Non-shifted window attention with a learned relative-position bias and MixMAE's same-source mask.

The bias and the same-source mask are added into one float mask so that the whole attention is a
single `scaled_dot_product_attention` call PyTorch can route to a fused kernel. The mask is shared
by the batch (MixMAE draws one mask per step), so it has one copy per window, not per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from mixmae_scale.models.source_groups import DenseGroups, FlexGroups, dense_group_attention, flex_group_attention

SourceLayout = torch.Tensor | DenseGroups | FlexGroups


def relative_position_index(window: int) -> torch.Tensor:
    """Index into the (2w-1)^2 bias table for each (query, key) pair of a w x w window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, window * window, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def same_source_mask(source: torch.Tensor, window: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive mask (nW, 1, N, N) in the attention dtype: 0 where query and key come from the same
    image, -inf elsewhere. Made once per stage and forward, so no block builds or casts a mask.

    `source` is the (H, W) map of which image each token came from (the upsampled mixing mask).
    A token always sees itself, so no softmax row is fully masked.
    """
    ids = window_partition(source[None, :, :, None], window)[..., 0]  # (nW, N)
    blocked = ids[:, :, None] != ids[:, None, :]
    zero = torch.zeros((), dtype=dtype, device=source.device)
    return torch.where(blocked, float("-inf"), zero)[:, None]


class WindowAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int, fused: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.fused = fused
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)  # (nH, N, N)

    def bias_of_pairs(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Relative-position bias (..., nH) between window positions `query` and `key` (broadcast)."""
        return self.relative_position_bias_table[self.relative_position_index[query, key]]

    def forward(self, x: torch.Tensor, source_mask: SourceLayout | None) -> torch.Tensor:
        """x: (B * nW, N, C) windows; source_mask: the stage's same-source layout (an additive (nW, 1, N, N)
        mask, or source groups for the attention that skips cross-source pairs), or None (no mixing)."""
        if isinstance(source_mask, DenseGroups):
            return self.proj(dense_group_attention(self.qkv, x, source_mask, self.bias_of_pairs, self.num_heads))
        if isinstance(source_mask, FlexGroups):
            return self.proj(flex_group_attention(self.qkv, x, source_mask, self.bias_of_pairs))
        bw, n, c = x.shape
        qkv = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B * nW, nH, N, d)
        mask = self.relative_position_bias().to(q.dtype)[None]  # (1, nH, N, N)
        if source_mask is not None:
            # Fold the windows into the head axis so one (nW * nH, N, N) mask broadcasts over the batch.
            n_windows = source_mask.shape[0]
            mask = (mask + source_mask).to(q.dtype).reshape(1, n_windows * self.num_heads, n, n)
            shape = (bw // n_windows, n_windows * self.num_heads, n, -1)
            q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + mask
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.reshape(bw, self.num_heads, n, -1).transpose(1, 2).reshape(bw, n, c))
