"""Analytic parameter and FLOP counts, as the published tables count them.

"GFLOPs" in the Swin and MixMAE tables are multiply-accumulates of the matrix products (linear
layers, the patch-embedding convolution, q@k and attn@v); norms, softmax and additions are not
counted. The same numbers feed MFU: training FLOPs per image = 3 x 2 x forward MACs.
"""

from __future__ import annotations

import torch

from mixmae_scale.models.mixmae import ModelSettings
from mixmae_scale.models.swin import SwinShape


def encoder_macs(shape: SwinShape) -> int:
    first = shape.stage_resolutions[0]
    macs = first * first * (shape.patch_size**2 * 3) * shape.embed_dim  # patch embedding conv
    for s, (depth, res, dim, window) in enumerate(
            zip(shape.depths, shape.stage_resolutions, shape.stage_dims, shape.stage_windows, strict=True)):
        tokens = res * res
        n = window * window
        hidden = int(dim * shape.mlp_ratio)
        per_block = tokens * (3 * dim * dim + 2 * n * dim + dim * dim + 2 * dim * hidden)
        macs += depth * per_block
        if s < len(shape.depths) - 1:
            macs += (tokens // 4) * (4 * dim) * (2 * dim)  # patch merging reduction
    return macs


def attention_macs(shape: SwinShape, mask: torch.Tensor | None = None) -> int:
    """The encoder's q@k and attn@v MACs per image: over whole windows (`mask` None, as `encoder_macs`
    counts them), or over each window's same-source groups only, for a final-grid mixing `mask`
    (what `model.attention=grouped` computes: sum over groups of 2 x size^2 x width)."""
    from mixmae_scale.models.mixing import upsample_mask
    from mixmae_scale.models.source_groups import window_sources

    macs = 0
    for depth, res, dim, window in zip(shape.depths, shape.stage_resolutions, shape.stage_dims,
                                       shape.stage_windows, strict=True):
        n = window * window
        if mask is None:
            pairs = (res // window) ** 2 * n * n
        else:
            first = (window_sources(upsample_mask(mask, res), window) == 0).sum(dim=1)
            pairs = int((first**2 + (n - first) ** 2).sum())
        macs += depth * 2 * pairs * dim
    return macs


def decoder_macs(shape: SwinShape, dim: int, depth: int, mlp_ratio: float = 4.0) -> int:
    """Per image: the embedding on B tokens, then blocks and prediction on both streams (2B)."""
    grid = shape.stage_resolutions[-1]
    tokens = grid * grid
    cell = shape.img_size // grid
    hidden = int(dim * mlp_ratio)
    embed = tokens * shape.num_features * dim
    blocks = depth * tokens * (4 * dim * dim + 2 * tokens * dim + 2 * dim * hidden)
    pred = tokens * dim * cell * cell * 3
    return embed + 2 * (blocks + pred)


def model_report(model: ModelSettings, num_classes: int = 1000) -> dict[str, float | int | str]:
    """Counts for resolved model settings (a `ModelConfig`), built on the meta device (no memory, any size)."""
    from mixmae_scale.models.mixmae import build_mixmae, swin_shape

    shape = swin_shape(model)
    with torch.device("meta"):
        mixmae = build_mixmae(model)
    encoder = sum(p.numel() for p in mixmae.encoder.parameters())
    total = sum(p.numel() for p in mixmae.parameters())
    head = shape.num_features * num_classes + num_classes
    enc_macs = encoder_macs(shape)
    dec_macs = decoder_macs(shape, model.decoder_dim, model.decoder_depth, model.mlp_ratio)
    return {
        "size": model.size,
        "img_size": model.img_size,
        "windows": "x".join(str(w) for w in shape.stage_windows),
        "encoder_params": encoder,
        "encoder_params_with_head": encoder + head,  # the convention of the published tables
        "pretrain_params": total,
        "encoder_gflops": round(enc_macs / 1e9, 3),
        "pretrain_gflops": round((enc_macs + dec_macs) / 1e9, 3),
        "train_flops_per_image": 6 * (enc_macs + dec_macs),
    }
