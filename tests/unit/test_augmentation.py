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


def _outputs(augment, batches: list[np.ndarray]) -> list[np.ndarray]:
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(batches[0]), num_threads=1, device_id=None, seed=7)
    def graph():
        return augment(fn.external_source(source=iter(batches), layout="HWC", batch=True))

    pipe = graph()
    pipe.build()
    return [np.stack([np.array(t) for t in pipe.run()[0]]) for _ in batches]


def test_rand_augment_suite_on_current_operators_augments_as_dalis_without_deprecation_warnings():
    """DALI's suite builds sharpness and equalize on deprecated `fn.experimental` aliases (eight warnings per
    fine-tuning log); ours is DALI's suite with those two on `fn.filter` and `fn.equalize`, and must augment
    exactly as DALI's does (random sign included)."""
    import warnings

    from nvidia.dali.auto_aug import rand_augment as dali

    from mixmae_scale.data.rand_augment import CURRENT_OPERATORS, suite

    ours, theirs = {op.name: op for op in suite()}, {op.name: op for op in dali.get_rand_augment_suite()}
    assert list(ours) == list(theirs) and set(CURRENT_OPERATORS) == {"sharpness", "equalize"}
    assert all(repr(ours[name]) == repr(theirs[name]) or name in CURRENT_OPERATORS for name in ours)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (16, 24, 24, 3), dtype=np.uint8) for _ in range(2)]
    for name in CURRENT_OPERATORS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mine = _outputs(lambda x, n=name: ours[n](x, magnitude_bin=9, num_magnitude_bins=RAND_AUGMENT_LEVELS),
                            batches)
        assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]
        reference = _outputs(lambda x, n=name: theirs[n](x, magnitude_bin=9, num_magnitude_bins=RAND_AUGMENT_LEVELS),
                             batches)
        for a, b, source in zip(mine, reference, batches, strict=True):
            assert np.array_equal(a, b) and not np.array_equal(a, source), name
