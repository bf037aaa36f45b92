"""The UperNet head and the segmentation model: logits at the input's size for any size divisible by 32,
gradients into every parameter of head and backbone, and a MAC count that matches the convolutions it runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixmae_scale.models.backbone import SwinBackbone
from mixmae_scale.models.segmentation_head import SegmentationModel, UperHead
from mixmae_scale.models.swin import SwinShape

TINY = SwinShape(96, 4, 32, (2, 2, 2, 2), (1, 2, 4, 8), (12, 12, 6, 3))


def model(num_classes: int = 5, pool_scales=(1, 2, 3)) -> SegmentationModel:
    backbone = SwinBackbone(TINY)
    return SegmentationModel(backbone, UperHead(backbone.out_channels, 32, num_classes, pool_scales))


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (96, 160), (160, 64)])
def test_logits_have_the_inputs_height_and_width_for_sizes_divisible_by_32(size):
    segmenter = model().eval()
    with torch.no_grad():
        logits = segmenter(torch.randn(2, 3, *size))
    assert tuple(logits.shape) == (2, 5, *size)
    assert torch.isfinite(logits).all()


def test_the_head_predicts_at_stride_4_of_the_finest_map():
    head = UperHead([32, 64, 128, 256], 32, 7).eval()
    maps = [torch.randn(1, c, 96 // s, 128 // s) for c, s in zip((32, 64, 128, 256), (4, 8, 16, 32), strict=True)]
    with torch.no_grad():
        assert tuple(head(maps).shape) == (1, 7, 24, 32)


@pytest.mark.parametrize("pool_scales", [(1, 2, 3), ()])
def test_every_parameter_of_head_and_backbone_gets_a_finite_nonzero_gradient(pool_scales):
    segmenter = model(pool_scales=pool_scales)
    logits = segmenter(torch.randn(2, 3, 64, 96))
    nn.functional.cross_entropy(logits, torch.randint(0, 5, (2, 64, 96))).backward()
    for name, param in segmenter.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_parameter_names_split_into_the_encoders_and_the_heads():
    """Layer decay and export tell the two apart by prefix: every parameter is under `backbone.encoder.` or
    `decode_head.`, neither part is empty, and each prefix holds exactly its module's parameters."""
    segmenter = model()
    names = [name for name, _ in segmenter.named_parameters()]
    encoder = [n for n in names if n.startswith("backbone.encoder.")]
    head = [n for n in names if n.startswith("decode_head.")]
    assert encoder and head and len(encoder) + len(head) == len(names)
    assert len(encoder) == len(list(segmenter.backbone.parameters()))
    assert len(head) == len(list(segmenter.decode_head.parameters()))


def test_head_channels_that_groupnorm_cannot_split_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        UperHead([32, 64, 128, 256], 48, 5)


@pytest.mark.parametrize("pool_scales", [(1, 2, 3, 6), ()])
def test_mac_count_equals_the_convolutions_multiply_accumulates(pool_scales):
    head = UperHead([32, 64, 128, 256], 64, 11, pool_scales).eval()
    counted = []

    def count(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        k = module.kernel_size[0] * module.kernel_size[1]
        counted.append(output[0].numel() * module.in_channels // module.groups * k)

    for conv in head.modules():
        if isinstance(conv, nn.Conv2d):
            conv.register_forward_hook(count)
    h, w = 192, 128
    maps = [torch.randn(1, c, h // s, w // s) for c, s in zip((32, 64, 128, 256), (4, 8, 16, 32), strict=True)]
    with torch.no_grad():
        head(maps)
    assert head.macs(h, w) == sum(counted)
