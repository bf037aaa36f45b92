"""Fine-tuning augmentation at the official strength: timm's rand-m9-mstd0.5-inc1 in the PyTorch loader,
the same magnitude scale in DALI's, bicubic resampling by default."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from mixmae_scale.data.spec import RAND_AUGMENT_LEVELS, PipelineSpec
from mixmae_scale.data.torch_pipeline import TorchDecoder


def test_dali_magnitude_bins_are_timms_magnitude_scale():
    from timm.data.auto_augment import _LEVEL_DENOM

    assert RAND_AUGMENT_LEVELS - 1 == _LEVEL_DENOM  # m9 is 0.9 of each op's range in both


def test_pytorch_fallback_uses_timms_rand_augment_and_survives_its_strongest_draws():
    from timm.data.auto_augment import RandAugment

    spec = PipelineSpec(mode="finetune", img_size=64, batch_size=2, rand_augment=(2, 9), rand_augment_std=0.5)
    augment = transform = TorchDecoder(spec, threads=1).rand_augment
    assert isinstance(augment, RandAugment)
    assert augment.num_layers == 2 and {op.magnitude for op in augment.ops} == {9}
    assert {op.magnitude_std for op in augment.ops} == {0.5}
    assert "PosterizeIncreasing" in {op.name for op in augment.ops}  # the "inc1" op set
    # A magnitude drawn at timm's maximum made PosterizeIncreasing keep 0 bits, which Pillow refuses.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8))
    random.seed(0)
    for op in augment.ops:
        op.magnitude_std = 5.0  # draws at the clip often
    for _ in range(400):
        transform(image)


@pytest.mark.parametrize("interpolation, expected", [("bicubic", "BICUBIC"), ("linear", "BILINEAR")])
def test_crop_resampling_is_bicubic_unless_told(interpolation, expected):
    spec = PipelineSpec(mode="pretrain", img_size=64, batch_size=2, interpolation=interpolation)
    assert TorchDecoder(spec, threads=1).interpolation.name == expected
    assert PipelineSpec(mode="pretrain", img_size=64, batch_size=2).interpolation == "bicubic"
