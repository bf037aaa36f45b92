"""Same-source attention that skips the cross-source pairs (`model.attention=grouped`).

In a mixed window a token attends only to tokens of its own image, so the masked attention computes every
cross-image pair and then discards it. Regrouping each window's tokens by source makes the same-source mask
block-diagonal; attention over each group alone gives the same result with only the diagonal blocks' work.
The mask is shared by the batch, so every image has the same groups and one plan per stage serves all.

Two kernels compute the groups:
- `DenseGroups`: groups of equal size are stacked and attended in one dense SDPA call per distinct size.
  Exact forward and backward on every device. The group sizes are host numbers (one small device-to-host
  read of the stage's source map per forward), so under `torch.compile` each new size pattern is a new
  graph: this kernel is for eager steps.
- `FlexGroups`: FlexAttention on the regrouped windows with a block mask, whose shapes do not depend on
  the mask (no host read, no recompilation, no graph break). Its backward exists on CUDA only on this
  torch (on the CPU it raises NotImplementedError), so it is chosen on CUDA; its forward runs anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def window_sources(source: torch.Tensor, window: int) -> torch.Tensor:
    """(H, W) source map -> (nW, N) source id of each window token, windows row-major as `window_partition`."""
    h, w = source.shape
    return source.view(h // window, window, w // window, window).permute(0, 2, 1, 3).reshape(-1, window * window)


def grouped_order(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Within-window order that puts source-0 tokens first (stably), and the count of source-0 tokens."""
    order = torch.argsort(ids, dim=1, stable=True)
    return order, (ids == ids.new_zeros(())).sum(dim=1)


@dataclass(frozen=True)
class DenseGroups:
    """One stage's groups, stacked by size. `order` lists all nW * N window-token positions (w * N + i)
    group after group, buckets in `buckets` order ((size, count) pairs); `restore` is its inverse;
    `local` is each listed token's index inside its window (for the relative-position bias)."""

    order: torch.Tensor
    restore: torch.Tensor
    local: torch.Tensor
    buckets: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class FlexGroups:
    """One stage's windows regrouped for FlexAttention: `order` (nW, N) within-window permutation,
    `restore` its inverse, `first` (nW,) count of source-0 tokens, `block_mask` over (windows x heads)."""

    order: torch.Tensor
    restore: torch.Tensor
    first: torch.Tensor
    block_mask: object  # torch.nn.attention.flex_attention.BlockMask
    num_heads: int
    tile: int


def dense_groups(source: torch.Tensor, window: int) -> DenseGroups:
    """Groups of one size are stacked so that one SDPA call covers them all. At 224 px with the 7x7 mask,
    the first stage's 32 groups come in about 20-27 sizes (8-token cells under 14-token windows), the second
    stage's 8 in 4-8, the last two stages' in 2. A window of one source is one group of all its tokens."""
    ids = window_sources(source, window)
    n_windows, n = ids.shape
    order, first = grouped_order(ids)
    sizes = torch.stack([first, n - first], dim=1).cpu().tolist()  # the one host read
    starts = {}
    for w, (a, b) in enumerate(sizes):
        for start, size in ((0, a), (a, b)):
            if size:
                starts.setdefault(size, []).append(w * n + start)
    positions, buckets = [], []
    flat_order = (order + torch.arange(n_windows, device=order.device)[:, None] * n).flatten()
    for size in sorted(starts):
        begin = torch.tensor(starts[size], device=order.device)
        positions.append((begin[:, None] + torch.arange(size, device=order.device)).flatten())
        buckets.append((size, len(starts[size])))
    listed = flat_order[torch.cat(positions)]
    return DenseGroups(order=listed, restore=torch.argsort(listed), local=listed % n, buckets=tuple(buckets))


def flex_groups(source: torch.Tensor, window: int, num_heads: int, tile: int = 64) -> FlexGroups:
    """`tile`: the block mask's block size. At 128 (FlexAttention's default) a window of 196 tokens is 2x2
    tiles and none of them is skipped (benchmarks/attention_flops.py); 64 skips about a quarter."""
    from torch.nn.attention.flex_attention import create_block_mask

    ids = window_sources(source, window)
    n_windows, n = ids.shape
    order, first = grouped_order(ids)

    def same_source(b, h, q, kv):
        split = first[h // num_heads]
        return (q < split) == (kv < split)

    block_mask = create_block_mask(same_source, None, n_windows * num_heads, n, n, device=source.device,
                                   BLOCK_SIZE=tile)
    return FlexGroups(order=order, restore=torch.argsort(order, dim=1), first=first, block_mask=block_mask,
                      num_heads=num_heads, tile=tile)


def flex_tile_options(tile: int, device: torch.device) -> dict | None:
    """Kernel tiles no larger than the block mask's (a compiled kernel's tile must divide it; newer torch
    shrinks its defaults itself, older ones raise)."""
    if device.type != "cuda" or tile >= 128:
        return None
    return {"BLOCK_M": tile, "BLOCK_N": tile, "BLOCK_M1": min(tile, 32), "BLOCK_N1": tile, "BLOCK_M2": tile,
            "BLOCK_N2": min(tile, 32)}


def flex_backward_exists(device: torch.device) -> bool:
    """FlexAttention's backward on this torch: CUDA only (the CPU one raises NotImplementedError)."""
    return device.type == "cuda"


@torch.compiler.disable  # group sizes are host numbers: compiled, each mask's sizes would be a new graph
def dense_group_attention(project_qkv, x: torch.Tensor, groups: DenseGroups, bias_of_pairs,
                          num_heads: int) -> torch.Tensor:
    """x: (B * nW, N, C) windows -> attended windows before the output projection, (B * nW, N, C).

    `project_qkv(x)` is the qkv projection; `bias_of_pairs(local_q, local_k)` the relative-position bias
    (nH, ..., k, k) between window positions."""
    bw, n, c = x.shape
    d = c // num_heads
    total = groups.order.numel()
    listed = x.reshape(bw * n // total, total, c)[:, groups.order]  # (B, nW * N, C), group after group
    qkv = project_qkv(listed)
    outputs, offset = [], 0
    for size, count in groups.buckets:
        span = size * count
        part = qkv[:, offset:offset + span].reshape(-1, count, size, 3, num_heads, d)
        q, k, v = part.permute(3, 0, 1, 4, 2, 5).reshape(3, -1, count * num_heads, size, d).unbind(0)
        local = groups.local[offset:offset + span].view(count, size)
        bias = bias_of_pairs(local[:, :, None], local[:, None, :])  # (count, size, size, nH)
        bias = bias.permute(0, 3, 1, 2).reshape(1, count * num_heads, size, size).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        outputs.append(out.view(-1, count, num_heads, size, d).transpose(2, 3).reshape(-1, span, c))
        offset += span
    return torch.cat(outputs, dim=1)[:, groups.restore].reshape(bw, n, c)


def flex_group_attention(project_qkv, x: torch.Tensor, groups: FlexGroups, bias_of_pairs) -> torch.Tensor:
    """As `dense_group_attention`, with FlexAttention over the regrouped windows (windows folded into heads)."""
    from torch.nn.attention.flex_attention import flex_attention

    bw, n, c = x.shape
    n_windows, heads = groups.order.shape[0], groups.num_heads
    d = c // heads
    gather = groups.order[None, :, :, None].expand(bw // n_windows, -1, -1, c)
    listed = torch.gather(x.view(-1, n_windows, n, c), 2, gather)
    qkv = project_qkv(listed).view(-1, n_windows, n, 3, heads, d)
    q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).reshape(3, -1, n_windows * heads, n, d).unbind(0)
    bias = bias_of_pairs(groups.order[:, :, None], groups.order[:, None, :])  # (nW, N, N, nH)
    bias = bias.permute(0, 3, 1, 2).reshape(n_windows * heads, n, n).to(q.dtype)

    def add_bias(score, b, h, q_index, kv_index):
        return score + bias[h, q_index, kv_index]

    out = flex_attention(q, k, v, score_mod=add_bias, block_mask=groups.block_mask,
                         kernel_options=flex_tile_options(groups.tile, q.device))
    out = out.view(-1, n_windows, heads, n, d).transpose(2, 3).reshape(-1, n_windows, n, c)
    back = groups.restore[None, :, :, None].expand_as(gather)
    return torch.gather(out, 2, back).reshape(bw, n, c)
