"""The dense backbone in torchvision's detection models: an FPN over its four maps, with the extra max-pooled
level that torchvision's default anchors and RoI pooling expect.

torchvision's `BackboneWithFPN` picks layers out of a sequential model by name, which a Swin with padded
windows is not; this is the same composition for a backbone that returns its maps as a list.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from mixmae_scale.models.backbone import SwinBackbone


class SwinFPN(nn.Module):
    """`FasterRCNN(SwinFPN(load_backbone(...)), num_classes=...)`: maps named "0".."3" plus "pool", all with
    `out_channels` channels, as torchvision's detection heads read them."""

    def __init__(self, backbone: SwinBackbone, out_channels: int = 256) -> None:
        super().__init__()
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(backbone.out_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(self.body(images))))
