"""Attention work that `model.attention=grouped` skips, counted exactly from sampled masks; table + JSON.

For Swin-B/L/H at 224 px and the official mask (7x7 final-grid cells, ratio 0.5: 24 cells from the partner),
each sampled mask's window splits give the q@k and attn@v multiply-adds over the same-source groups
(`models.flops.attention_macs`); the masked path computes them over whole windows. Reported: the expectation
over masks (and its range), as a share of the attention and of the encoder's and the pretraining forward's
multiply-adds (`models.flops`, the published tables' convention; MFU's FLOPs are 6x these, so the shares hold).
FlexAttention computes whole tiles: the share of tile pairs its block mask keeps (a pair is computed when it
holds any same-source pair) is given for 128-, 64- and 32-token tiles, against the same tiling unmasked.

    python benchmarks/attention_flops.py [--masks 2000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mixmae_scale.atomic_file import write_text
from mixmae_scale.models.flops import attention_macs, decoder_macs, encoder_macs
from mixmae_scale.models.mixing import sample_mask, upsample_mask
from mixmae_scale.models.sizes import SIZES
from mixmae_scale.models.source_groups import window_sources
from mixmae_scale.models.swin import SwinShape

RESULTS = Path(__file__).resolve().parent / "results" / "attention_flops.json"
TILES = (128, 64, 32)


def shape_of(size: str) -> SwinShape:
    s = SIZES[size]
    return SwinShape(224, 4, s["embed_dim"], tuple(s["depths"]), tuple(s["num_heads"]), tuple(s["window_size"]))


def flex_tile_macs(shape: SwinShape, mask: torch.Tensor | None, tile: int) -> int:
    """MACs of the tiles FlexAttention computes on the regrouped windows (whole tiles, padding included);
    `mask` None: every tile, as without a block mask."""
    macs = 0
    for depth, res, dim, window in zip(shape.depths, shape.stage_resolutions, shape.stage_dims,
                                       shape.stage_windows, strict=True):
        n = window * window
        starts = torch.arange(0, n, tile)
        ends = (starts + tile).clamp(max=n)
        if mask is None:
            macs += depth * 2 * (res // window) ** 2 * len(starts) ** 2 * tile * tile * dim
            continue
        first = (window_sources(upsample_mask(mask, res), window) == 0).sum(dim=1)  # (nW,)
        has0 = starts[None] < first[:, None]  # (nW, tiles): tile holds source-0 tokens
        has1 = ends[None] > first[:, None]
        kept = (has0[:, :, None] & has0[:, None]) | (has1[:, :, None] & has1[:, None])
        macs += depth * 2 * int(kept.sum()) * tile * tile * dim
    return macs


def count(size: str, masks: int, seed: int) -> dict:
    shape = shape_of(size)
    cfg = SIZES[size]
    dense = attention_macs(shape)
    encoder = encoder_macs(shape)
    pretrain = encoder + decoder_macs(shape, cfg["decoder_dim"], cfg["decoder_depth"], shape.mlp_ratio)
    generator = torch.Generator().manual_seed(seed)
    grouped, tiles = [], {t: [] for t in TILES}
    for _ in range(masks):
        mask = sample_mask(7, 0.5, generator=generator)
        grouped.append(attention_macs(shape, mask))
        for t in TILES:
            tiles[t].append(flex_tile_macs(shape, mask, t))
    grouped_t = torch.tensor(grouped, dtype=torch.float64)
    saved = dense - grouped_t
    return {
        "size": size, "img_size": 224, "windows": list(shape.stage_windows), "masks": masks,
        "encoder_gmacs": encoder / 1e9, "pretrain_forward_gmacs": pretrain / 1e9,
        "attention_gmacs_masked": dense / 1e9,
        "attention_gmacs_grouped_mean": grouped_t.mean().item() / 1e9,
        "saved_gmacs_mean": saved.mean().item() / 1e9,
        "saved_gmacs_min": saved.min().item() / 1e9, "saved_gmacs_max": saved.max().item() / 1e9,
        "saved_share_of_attention": saved.mean().item() / dense,
        "saved_share_of_encoder": saved.mean().item() / encoder,
        "saved_share_of_pretrain_forward": saved.mean().item() / pretrain,
        "attention_share_of_encoder": dense / encoder,
        **{f"flex_tile{t}_kept": sum(tiles[t]) / len(tiles[t]) / flex_tile_macs(shape, None, t) for t in TILES},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = [count(size, args.masks, args.seed) for size in ("base", "large", "huge")]
    print(f"per image, forward, 224 px, mask ratio 0.5 on the 7x7 grid, {args.masks} sampled masks (GMACs)")
    print("| size | encoder | attention (masked) | attention (grouped) | saved (min-max) | of attention | "
          "of encoder | of pretrain fwd | flex tiles kept (128 / 64 / 32) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kept = " / ".join(f"{r[f'flex_tile{t}_kept']:.0%}" for t in TILES)
        print(f"| {r['size']} | {r['encoder_gmacs']:.2f} | {r['attention_gmacs_masked']:.3f} | "
              f"{r['attention_gmacs_grouped_mean']:.3f} | {r['saved_gmacs_mean']:.3f} "
              f"({r['saved_gmacs_min']:.3f}-{r['saved_gmacs_max']:.3f}) | {r['saved_share_of_attention']:.1%} | "
              f"{r['saved_share_of_encoder']:.2%} | {r['saved_share_of_pretrain_forward']:.2%} | "
              f"{kept} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps({"convention": "multiply-adds of q@k and attn@v per image, forward; "
                                     "training FLOPs = 6 x these", "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
