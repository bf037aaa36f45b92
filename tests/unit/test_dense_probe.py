"""The dense probe's read-out on feature maps whose answer is known: maps that carry the mask are read to a
perfect mIoU, maps of noise are not, and ignored pixels are never trained on."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixmae_scale.data.spec import MASK_IGNORE
from mixmae_scale.finetune.dense_probe import MaskedSplit, grid_features, probe_backbone, sample_cells

CLASSES = 3


def blocky_split(seed: int, count: int = 24, size: int = 64) -> MaskedSplit:
    """Masks of 16-pixel blocks (aligned with every map's grid); the image's first channel is the label."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, CLASSES, (count, size // 16, size // 16), generator=generator)
    masks = blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)
    images = torch.zeros(count, 3, size, size)
    images[:, 0] = masks.float()
    return MaskedSplit(images, masks)


class LabelBackbone(torch.nn.Module):
    """Four maps at strides 4-32 that carry the label (one-hot of the first channel), or noise (`blind`)."""

    def __init__(self, blind: bool = False) -> None:
        super().__init__()
        self.blind = blind

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        onehot = F.one_hot(images[:, 0].long(), CLASSES).permute(0, 3, 1, 2).float()
        if self.blind:
            onehot = torch.rand(onehot.shape, generator=torch.Generator().manual_seed(int(images.sum())))
        return [F.avg_pool2d(onehot, stride) for stride in (4, 8, 16, 32)]


def test_maps_that_carry_the_mask_are_read_perfectly_and_noise_is_not():
    train, val = blocky_split(0), blocky_split(1)
    seeing = probe_backbone(LabelBackbone(), train, val, CLASSES, batch=8)
    # Not 100: logits upsampled bilinearly from the stride-8 grid blur a pixel or two at each block's edge.
    assert seeing.miou > 95 and seeing.pixel_accuracy > 97 and len(seeing.per_class_iou) == CLASSES
    blind = probe_backbone(LabelBackbone(blind=True), train, val, CLASSES, batch=8)
    assert blind.miou < 50  # chance is about 20% mIoU for three balanced classes


def test_the_grid_brings_every_map_to_stride_8_and_concatenates_them():
    features = grid_features(LabelBackbone(), blocky_split(0, count=2).images)
    assert features.shape == (2, 4 * CLASSES, 8, 8)


def test_ignored_cells_are_never_sampled_for_training_and_at_most_the_asked_count_per_image():
    features = torch.arange(2 * 5 * 16, dtype=torch.float32).reshape(2, 5, 4, 4)
    labels = torch.full((2, 4, 4), MASK_IGNORE)
    labels[0, 0, :3] = torch.tensor([0, 1, 2])  # image 0: three labelled cells; image 1: none
    x, y = sample_cells(features, labels, torch.Generator().manual_seed(0), cells=8)
    assert sorted(y.tolist()) == [0, 1, 2] and x.shape == (3, 5)
    assert sorted(x[:, 0].tolist()) == [0.0, 1.0, 2.0]  # channel 0 of cells (0,0), (0,1), (0,2) of image 0
    x, y = sample_cells(features, torch.zeros(2, 4, 4, dtype=torch.long), torch.Generator().manual_seed(0), cells=5)
    assert len(y) == 10
