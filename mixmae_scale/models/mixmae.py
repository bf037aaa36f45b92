"""MixMAE: mix two images' patch tokens, encode with same-source attention, reconstruct both.

Data path of one forward: images -> patch tokens -> mixed with the reversed batch -> position
embedding -> Swin stages under per-stage same-source masks -> two-stream decoder -> dual loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from mixmae_scale.models.decoder import DualStreamDecoder
from mixmae_scale.models.mixing import mix_tokens, sample_mask, stage_source_groups, stage_source_masks
from mixmae_scale.models.source_groups import flex_backward_exists
from mixmae_scale.models.swin import SwinEncoder, SwinShape


@dataclass
class MixMAEOutput:
    loss: torch.Tensor
    pred: torch.Tensor  # (B, L, P): each position from the stream where it was hidden
    mask: torch.Tensor  # (L,) on the final grid; 1 = taken from the partner image


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, L, patch * patch * 3), pixels ordered (row, column, channel)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int = 3) -> torch.Tensor:
    b, n, _ = patches.shape
    g = int(round(n**0.5))
    x = patches.reshape(b, g, g, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, g * patch, g * patch)


def normalized_target(images: torch.Tensor, patch: int, norm_pix: bool) -> torch.Tensor:
    target = patchify(images, patch)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


def unmix_predictions(pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(2B, L, P) two-stream output -> (B, L, P): image i's hidden cells from stream 1 (m = 1), its
    visible cells from stream 2 at B-1-i (where image i was the hidden one, m = 0)."""
    batch = pred.shape[0] // 2
    m = mask.to(pred.dtype)[None, :, None]
    return pred[:batch] * m + pred[batch:].flip(0) * (1 - m)


def attention_dtype(tokens: torch.Tensor) -> torch.dtype:
    """The dtype attention computes in: autocast's where it is on, the tokens' otherwise."""
    device = tokens.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tokens.dtype


class MixMAE(nn.Module):
    def __init__(self, shape: SwinShape, decoder_dim: int = 512, decoder_depth: int = 8,
                 decoder_heads: int = 16, mask_ratio: float = 0.5, range_mask_ratio: float = 0.0,
                 norm_pix_loss: bool = True, drop_path: float = 0.0, fused_attention: bool = True,
                 checkpoint_every: int = 0, attention: str | None = None) -> None:
        super().__init__()
        self.shape = shape
        # "grouped": attention over each window's same-source groups only (models/source_groups.py);
        # otherwise the additive same-source mask, through the fused or the reference kernel.
        self.attention = attention or ("fused" if fused_attention else "reference")
        # Which kernel computes the groups: "auto" is FlexAttention where its backward exists (CUDA), the
        # dense per-size kernel elsewhere; "flex" or "dense" force one (tests, benchmarks).
        self.group_kernel = "auto"
        self.flex_tile = 64  # FlexAttention's block-mask tile (see models/source_groups.flex_groups)
        self.mask_ratio = mask_ratio
        self.range_mask_ratio = range_mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.encoder = SwinEncoder(shape, drop_path, fused_attention, checkpoint_every)
        self.grid = shape.stage_resolutions[-1]
        self.cell = shape.img_size // self.grid  # pixels per final-grid cell (32 for patch 4, 4 stages)
        self.decoder = DualStreamDecoder(shape.num_features, self.grid, self.cell * self.cell * 3,
                                         decoder_dim, decoder_depth, decoder_heads, shape.mlp_ratio)

    def sample_mask(self, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
                    ) -> torch.Tensor:
        return sample_mask(self.grid, self.mask_ratio, self.range_mask_ratio, generator, device)

    def forward_encoder(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.add_position(mix_tokens(self.encoder.embed(images), mask))
        shape = self.shape
        if self.attention == "grouped":
            kernel = self.group_kernel
            if kernel == "auto":
                kernel = "flex" if flex_backward_exists(tokens.device) else "dense"
            layouts = stage_source_groups(mask, shape.stage_resolutions, shape.stage_windows,
                                          list(shape.num_heads), kernel, self.flex_tile)
        else:
            layouts = stage_source_masks(mask, shape.stage_resolutions, shape.stage_windows, attention_dtype(tokens))
        return self.encoder.forward_tokens(tokens, layouts)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> MixMAEOutput:
        """A given `mask` makes the forward deterministic; otherwise one is drawn from `generator`.
        Pass fp32 `images` even to a half-precision model: the reconstruction target is made from them."""
        if images.shape[0] % 2:
            raise ValueError(f"MixMAE pairs image i with B-1-i: the micro-batch must be even, got "
                             f"{images.shape[0]}")
        if mask is None:
            mask = self.sample_mask(generator, images.device)
        mask = mask.to(images.device)
        # The encoder takes its weights' dtype (DeepSpeed's bf16/fp16 engines hold half-precision weights);
        # the target is computed from the pixels as given, fp32 from the loader, as the official code
        # computes its loss on fp32 pixels under fp16 autocast. Half-precision pixels would quantise the
        # per-patch normalised target (bf16 keeps 8 bits of mantissa).
        weights_dtype = self.encoder.patch_embed.proj.weight.dtype
        features = self.forward_encoder(images.to(weights_dtype), mask).flatten(1, 2)
        pred = unmix_predictions(self.decoder(features, mask), mask)
        target = normalized_target(images.float(), self.cell, self.norm_pix_loss)
        loss = (pred.float() - target.float()).pow(2).mean()
        return MixMAEOutput(loss=loss, pred=pred, mask=mask)


class ModelSettings(Protocol):
    """What `swin_shape` and `build_mixmae` read. The toolkit passes its resolved `config.schema.ModelConfig`;
    the model library does not import the configuration package, so it can be used on its own."""

    img_size: int
    patch_size: int
    embed_dim: int
    depths: Sequence[int]
    num_heads: Sequence[int]
    window_size: Sequence[int]
    mlp_ratio: float
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    mask_ratio: float
    range_mask_ratio: float
    norm_pix_loss: bool
    drop_path: float
    attention: str
    checkpoint_every: int


def swin_shape(model: ModelSettings) -> SwinShape:
    return SwinShape(model.img_size, model.patch_size, model.embed_dim, tuple(model.depths),
                     tuple(model.num_heads), tuple(model.window_size), model.mlp_ratio)


def build_mixmae(model: ModelSettings) -> MixMAE:
    """`model` must be resolved (size preset filled in): see `mixmae_scale.config.resolve`."""
    return MixMAE(swin_shape(model), model.decoder_dim, model.decoder_depth, model.decoder_heads,
                  model.mask_ratio, model.range_mask_ratio, model.norm_pix_loss, model.drop_path,
                  fused_attention=model.attention != "reference", checkpoint_every=model.checkpoint_every,
                  attention=model.attention)
