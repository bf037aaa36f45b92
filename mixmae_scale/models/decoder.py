"""MixMAE's two-stream decoder: each stream keeps one image's tokens and fills the rest with a mask token.

Both streams run as one batch of 2B so the eight ViT blocks see one large matrix multiply instead of
two. Stream 1 (rows 0..B-1) keeps the tokens where m = 0 and reconstructs image i; stream 2 (rows
B..2B-1) keeps the tokens where m = 1 and reconstructs image B-1-i.
"""

from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn


class DualStreamDecoder(nn.Module):
    def __init__(self, in_dim: int, grid: int, patch_pixels: int, dim: int = 512, depth: int = 8,
                 heads: int = 16, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.decoder_embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("decoder_pos_embed", build_sincos2d_pos_embed([grid, grid], dim)[None])
        # nn.LayerNorm's eps 1e-5, as the official code (timm's ViT default of 1e-6 moved predictions ~1e-5).
        self.decoder_blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, patch_pixels)
        trunc_normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features: (B, L, C_enc) final-stage tokens; mask: (L,). Returns (2B, L, patch_pixels)."""
        x = self.decoder_embed(features)
        m = mask.to(x.dtype)[None, :, None]
        token = self.mask_token.to(x.dtype)
        stream1 = x * (1 - m) + token * m
        stream2 = x * m + token * (1 - m)
        x = torch.cat([stream1, stream2]) + self.decoder_pos_embed.to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))
