"""The hierarchical Swin encoder of MixMAE: large windows, no shifted windows, fixed sin-cos position.

Tokens stay in (B, H, W, C) layout, as in timm's Swin, so that patch merging and window
partitioning are views and permutes rather than index gathers. Module names follow the official
MixMIM release (`patch_embed`, `layers.{s}.blocks.{b}`, `layers.{s}.downsample`, `norm`,
`absolute_pos_embed`) so that its checkpoints map onto this tree key for key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import DropPath, Mlp, PatchEmbed, build_sincos2d_pos_embed
from timm.models.swin_transformer import PatchMerging
from torch import nn
from torch.utils.checkpoint import checkpoint

from mixmae_scale.models.window_attention import WindowAttention, window_partition, window_reverse


@dataclass(frozen=True)
class SwinShape:
    img_size: int
    patch_size: int
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: tuple[int, ...]
    mlp_ratio: float = 4.0

    @property
    def stage_resolutions(self) -> list[int]:
        first = self.img_size // self.patch_size
        return [first // 2**s for s in range(len(self.depths))]

    @property
    def stage_dims(self) -> list[int]:
        return [self.embed_dim * 2**s for s in range(len(self.depths))]

    @property
    def stage_windows(self) -> list[int]:
        """Windows larger than their stage are clamped to the stage resolution."""
        return [min(w, r) for w, r in zip(self.window_size, self.stage_resolutions, strict=True)]

    @property
    def num_features(self) -> int:
        return self.stage_dims[-1]


class SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float, drop_path: float,
                 fused: bool) -> None:
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, fused=fused)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, source_mask: torch.Tensor | None) -> torch.Tensor:
        b, h, w, c = x.shape
        windows = window_partition(self.norm1(x), self.window)
        attended = window_reverse(self.attn(windows, source_mask), self.window, h, w)
        x = x + self.drop_path(attended)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float,
                 drop_path: list[float], downsample: bool, fused: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, mlp_ratio, drop_path[i], fused) for i in range(depth))
        self.downsample = PatchMerging(dim, 2 * dim) if downsample else None


class SwinEncoder(nn.Module):
    """`embed` gives patch tokens; `forward_tokens` runs the stages with optional per-stage masks."""

    def __init__(self, shape: SwinShape, drop_path: float = 0.0, fused_attention: bool = True,
                 checkpoint_every: int = 0) -> None:
        super().__init__()
        self.shape = shape
        self.checkpoint_every = checkpoint_every
        self.patch_embed = PatchEmbed(shape.img_size, shape.patch_size, 3, shape.embed_dim,
                                      norm_layer=nn.LayerNorm, output_fmt="NHWC")
        first = shape.stage_resolutions[0]
        pos = build_sincos2d_pos_embed([first, first], shape.embed_dim)[None]  # (1, L, C), fixed
        self.register_buffer("absolute_pos_embed", pos)
        total = sum(shape.depths)
        rates = [drop_path * i / max(total - 1, 1) for i in range(total)]
        self.layers = nn.ModuleList()
        start = 0
        n_stages = len(shape.depths)
        for s in range(n_stages):
            depth = shape.depths[s]
            self.layers.append(SwinStage(
                shape.stage_dims[s], depth, shape.num_heads[s], shape.stage_windows[s], shape.mlp_ratio,
                rates[start:start + depth], downsample=s < n_stages - 1, fused=fused_attention))
            start += depth
        self.norm = nn.LayerNorm(shape.num_features)
        self.apply(_init_weights)

    def set_fused_attention(self, fused: bool) -> None:
        for module in self.modules():
            if isinstance(module, WindowAttention):
                module.fused = fused

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H/4, W/4, C) patch tokens, before the position embedding."""
        return self.patch_embed(images)

    def add_position(self, tokens: torch.Tensor) -> torch.Tensor:
        b, h, w, c = tokens.shape
        return tokens + self.absolute_pos_embed.view(1, h, w, c).to(tokens.dtype)

    def forward_tokens(self, x: torch.Tensor, source_masks: list[torch.Tensor | None] | None = None,
                       stage_outputs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Run every stage; `source_masks[s]` is stage s's additive same-source mask or None. A list
        passed as `stage_outputs` receives each stage's tokens before its patch merging."""
        index = 0
        for s, stage in enumerate(self.layers):
            mask = source_masks[s] if source_masks is not None else None
            for block in stage.blocks:
                if self.checkpoint_every and index % self.checkpoint_every == 0 and torch.is_grad_enabled():
                    x = checkpoint(block, x, mask, use_reentrant=False)
                else:
                    x = block(x, mask)
                index += 1
            if stage.downsample is not None:
                if stage_outputs is not None:
                    stage_outputs.append(x)
                x = stage.downsample(x)
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unmixed forward (fine-tuning, evaluation): (B, 3, H, W) -> (B, h, w, C_final)."""
        return self.forward_tokens(self.add_position(self.embed(images)))

    def stage_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's token map (B, h, w, C), the last one normalised: what a probe reads, since a short
        pretraining puts what it learned in the early stages as much as the last."""
        stages: list[torch.Tensor] = []
        final = self.forward_tokens(self.add_position(self.embed(images)), stage_outputs=stages)
        return [*stages, final]


def _init_weights(module: nn.Module) -> None:
    """As the official code (JAX ViT's choice): xavier-uniform Linear weights, zero biases, LayerNorm 1/0.
    The patch-embedding conv keeps PyTorch's default; bias tables get trunc-normal(0.02) where made."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
