"""A light UperNet head over the dense backbone's four maps, and the segmentation model that joins them.

UperNet (Xiao et al. 2018) is what MixMAE, BEiT, MAE and Swin report ADE20K with: a pyramid pooling module
(PPM) on the stride-32 map, 1x1 lateral convolutions, a top-down sum, a 3x3 convolution per level, and the
levels upsampled to stride 4, concatenated and fused. This one keeps that structure with one width for
every level (`channels`, 512 in the published recipe) and no auxiliary FCN head.

GroupNorm replaces the recipe's SyncBatchNorm: a batch of 16 crops spread over 8 or 16 GPUs leaves one or two
images per GPU, too few for batch statistics, and GroupNorm needs no synchronisation between ranks, so the
head computes the same on any world size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import nn

NORM_GROUPS = 32  # GroupNorm groups: `channels` must be a multiple of it


def conv_norm_act(in_channels: int, out_channels: int, kernel_size: int) -> ConvNormAct:
    return ConvNormAct(in_channels, out_channels, kernel_size, norm_layer="groupnorm",
                       norm_kwargs={"num_groups": NORM_GROUPS})


class PyramidPooling(nn.Module):
    """PSPNet's pooling module: the map average-pooled to s x s for each scale, projected and upsampled back,
    concatenated with the map and fused: context from the whole image for every pixel. The branches have no norm:
    a 1x1 pooled map leaves GroupNorm channels / 32 values per group, one at the demo's widths, which it would
    normalise to zero."""

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int]) -> None:
        super().__init__()
        self.scales = tuple(scales)
        self.branches = nn.ModuleList(ConvNormAct(in_channels, channels, 1, bias=True, apply_norm=False)
                                      for _ in self.scales)
        self.fuse = conv_norm_act(in_channels + len(self.scales) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(branch(F.adaptive_avg_pool2d(x, scale)), size=size, mode="bilinear",
                                align_corners=False) for scale, branch in zip(self.scales, self.branches, strict=True)]
        return self.fuse(torch.cat([x, *pooled], dim=1))


class UperHead(nn.Module):
    """Per-pixel class logits at the first map's stride (4) from feature maps ordered fine to coarse."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1) -> None:
        super().__init__()
        if channels % NORM_GROUPS:
            raise ValueError(f"UperHead: channels={channels} must be a multiple of {NORM_GROUPS} (GroupNorm groups)")
        self.in_channels, self.channels, self.num_classes = list(in_channels), channels, num_classes
        self.pool_scales = tuple(pool_scales)
        self.ppm = PyramidPooling(self.in_channels[-1], channels, self.pool_scales) if self.pool_scales \
            else conv_norm_act(self.in_channels[-1], channels, 3)
        self.laterals = nn.ModuleList(conv_norm_act(c, channels, 1) for c in self.in_channels[:-1])
        self.smooth = nn.ModuleList(conv_norm_act(channels, channels, 3) for _ in self.in_channels[:-1])
        self.fuse = conv_norm_act(len(self.in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)  # mmseg's decode-head init
        nn.init.zeros_(self.classifier.bias)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(maps) != len(self.in_channels):
            raise ValueError(f"UperHead: expected {len(self.in_channels)} feature maps, got {len(maps)}")
        levels = [lateral(m) for lateral, m in zip(self.laterals, maps, strict=False)] + [self.ppm(maps[-1])]
        for i in range(len(levels) - 1, 0, -1):  # top-down: each coarser level added into the finer one
            levels[i - 1] = levels[i - 1] + F.interpolate(levels[i], size=levels[i - 1].shape[-2:], mode="bilinear",
                                                          align_corners=False)
        size = levels[0].shape[-2:]
        outs = [smooth(level) for smooth, level in zip(self.smooth, levels, strict=False)] + [levels[-1]]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.classifier(self.dropout(self.fuse(torch.cat(outs, dim=1))))

    def macs(self, height: int, width: int, strides: Sequence[int] = (4, 8, 16, 32)) -> int:
        """Multiply-accumulates of the convolutions on an image of `height` x `width` (norms, pooling and
        upsampling are not counted, as models/flops.py counts the encoder)."""
        c = self.channels
        pixels = [(height // s) * (width // s) for s in strides]
        macs = sum(p * cin * c for p, cin in zip(pixels, self.in_channels[:-1], strict=False))  # laterals
        macs += sum(p * 9 * c * c for p in pixels[:-1])  # smoothing
        top = self.in_channels[-1]
        if self.pool_scales:
            macs += sum(s * s * top * c for s in self.pool_scales)
            macs += pixels[-1] * 9 * (top + len(self.pool_scales) * c) * c
        else:
            macs += pixels[-1] * 9 * top * c
        macs += pixels[0] * 9 * len(self.in_channels) * c * c  # fusion at stride 4
        return macs + pixels[0] * c * self.num_classes


class SegmentationModel(nn.Module):
    """Backbone maps -> head logits, upsampled bilinearly to the input's size: `[B, num_classes, H, W]`.
    Parameter names start with `backbone.encoder.` (the encoder's own names under the backbone) and
    `decode_head.` (mmseg's name for it), so the two are told apart by prefix for layer decay and export."""

    def __init__(self, backbone: nn.Module, head: UperHead) -> None:
        super().__init__()
        self.backbone, self.decode_head = backbone, head

    @property
    def num_classes(self) -> int:
        return self.decode_head.num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.decode_head(self.backbone(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
