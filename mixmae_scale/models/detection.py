"""The dense backbone in torchvision's detection models: an FPN over its four maps, with the extra max-pooled
level that torchvision's default anchors and RoI pooling expect.

torchvision's `BackboneWithFPN` picks layers out of a sequential model by name, which a Swin with padded
windows is not; this is the same composition for a backbone that returns its maps as a list. The backbone's maps
are raw stage outputs (the residual stream, whose scale grows stage by stage), and torchvision's FPN normalises
nothing (`norm_layer=None`), so each map gets a LayerNorm first, as mmdet's Swin and the official Swin detection
code add one per output stage (`norm{i}`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from mixmae_scale.models.backbone import SwinBackbone


class SwinFPN(nn.Module):
    """`FasterRCNN(SwinFPN(load_backbone(...)), num_classes=...)`: maps named "0".."3" plus "pool", all with
    `out_channels` channels, as torchvision's detection heads read them. `stage_norms=False` feeds the FPN the raw
    stage outputs instead (this class before the norms were added)."""

    def __init__(self, backbone: SwinBackbone, out_channels: int = 256, stage_norms: bool = True) -> None:
        super().__init__()
        self.body = backbone
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in backbone.out_channels) if stage_norms else None
        self.fpn = FeaturePyramidNetwork(backbone.out_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def stage_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """What the FPN reads: the backbone's maps, each normalised over its channels (with `stage_norms`)."""
        maps = self.body(images)
        if self.norms is None:
            return maps
        return [norm(m.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for norm, m in zip(self.norms, maps, strict=True)]

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(self.stage_maps(images))))
