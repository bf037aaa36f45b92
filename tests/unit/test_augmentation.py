"""Fine-tuning augmentation at the official strength: timm's rand-m9-mstd0.5-inc1 in the PyTorch loader, and
rebuilt on DALI's operators (op set, parameters, per-op probability, magnitude noise), bicubic resampling by
default."""

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


def _timm_args(name: str, level: float, negate: bool, monkeypatch) -> tuple:
    """timm's own parameter for an op at a level, its random sign fixed."""
    from timm.data import auto_augment

    monkeypatch.setattr(auto_augment.random, "random", lambda: 1.0 if negate else 0.0)
    level_to_arg = auto_augment.LEVEL_TO_ARG[name]
    return () if level_to_arg is None else level_to_arg(level, {"translate_pct": 0.45})


def test_the_dali_suite_is_timms_increasing_op_set_with_timms_parameters_at_every_level(monkeypatch):
    """The official recipe's "inc1" set, in timm's order, each level mapped to the parameter timm gives it (sign
    included). DALI's own suite has no Invert or SolarizeAdd and keeps 4 posterize bits at m9 where timm keeps 1."""
    from nvidia.dali.auto_aug.augmentations import sharpness_kernel
    from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS

    from mixmae_scale.data.rand_augment import TIMM_LEVELS, suite

    assert list(TIMM_LEVELS) == list(_RAND_INCREASING_TRANSFORMS) and len(suite()) == 15
    for name, (_, mapping, signed) in TIMM_LEVELS.items():
        for level in (0.0, 3.0, 8.6, 9.0, 9.999):
            for negate in ((False, True) if signed else (False,)):
                theirs = _timm_args(name, level, negate, monkeypatch)
                if mapping is None:
                    assert theirs == (), name
                    continue
                ours = np.asarray(mapping(-level if negate else level))
                if name == "SharpnessIncreasing":
                    assert np.allclose(ours, sharpness_kernel(theirs[0] - 1.0)), (name, level)
                elif name == "PosterizeIncreasing":  # a mask keeping the top `bits` bits
                    assert bin(int(ours)).count("1") == theirs[0] and int(ours) >> (8 - theirs[0]) << (8 - theirs[0]) \
                        == int(ours), (name, level)
                else:
                    assert np.allclose(ours[np.nonzero(ours)] if ours.ndim else ours, theirs[0], atol=1e-6), \
                        (name, level, ours, theirs)


def _through_dali(augment, batch: np.ndarray, conditionals: bool = False) -> np.ndarray:
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(batch), num_threads=1, device_id=None, seed=7, enable_conditionals=conditionals)
    def graph():
        return augment(fn.external_source(source=lambda: list(batch), layout="HWC", batch=True))

    pipe = graph()
    pipe.build()
    return np.stack([np.array(t) for t in pipe.run()[0]])


@pytest.mark.parametrize("name", ["Invert", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd"])
def test_the_pixel_ops_equal_timms_pixel_for_pixel(name):
    from timm.data.auto_augment import AugmentOp

    from mixmae_scale.data.rand_augment import BINS, TIMM_LEVELS, suite

    op = {o.name: o for o in suite()}[TIMM_LEVELS[name][0]]
    batch = np.random.default_rng(1).integers(0, 256, (4, 20, 20, 3), dtype=np.uint8)
    ours = _through_dali(lambda x: op(x, magnitude_bin=90, num_magnitude_bins=BINS), batch)
    theirs = AugmentOp(name, prob=1.0, magnitude=9, hparams={"magnitude_std": 0})
    expected = np.stack([np.array(theirs(Image.fromarray(image))) for image in batch])
    assert np.array_equal(ours, expected) and not np.array_equal(ours, batch), name


def test_each_layer_applies_no_op_half_the_time_at_magnitudes_drawn_from_n_m_mstd():
    """timm applies each chosen op with probability 0.5, at a magnitude drawn per application from N(9, 0.5)
    clipped to 0..10; DALI's suite applied every op at exactly 9."""
    from nvidia.dali import pipeline_def

    from mixmae_scale.data.rand_augment import BINS, draws

    @pipeline_def(batch_size=1024, num_threads=1, device_id=None, seed=11)
    def graph(m, mstd):
        return draws(2, m, mstd)

    for m, mstd in ((9.0, 0.5), (8.96, 0.0)):  # 89.6 is bin 90: rounded, where a truncating cast gives 89
        pipe = graph(m, mstd)
        pipe.build()
        ops, bins = (np.concatenate([np.array(t) for t in out]) for out in pipe.run())
        assert ops.shape == bins.shape == (2048,)
        if mstd:
            assert abs((ops == 15).mean() - 0.5) < 0.04 and set(ops.tolist()) == set(range(16))
            assert abs(bins.mean() - 90) < 0.6 and abs(bins.std() - 5) < 0.5, (bins.mean(), bins.std())
            assert bins.min() >= 0 and bins.max() <= BINS - 1
        else:
            assert set(bins.tolist()) == {90}


def test_rand_augment_leaves_an_image_as_it_was_only_when_no_op_was_drawn_and_warns_of_nothing():
    """One layer over a low-contrast picture (every op of the set changes it): about half come out unchanged,
    and the pipeline builds without DALI's deprecation warnings (its suite's experimental aliases)."""
    import warnings

    from mixmae_scale.data.rand_augment import rand_augment

    rng = np.random.default_rng(2)
    batch = np.repeat(rng.integers(60, 190, (1, 32, 32, 3), dtype=np.uint8), 512, axis=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _through_dali(lambda x: rand_augment(x, n=1, m=9, mstd=0.5, shape=(32, 32)), batch, True)
    assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]
    unchanged = np.mean([np.array_equal(a, b) for a, b in zip(out, batch, strict=True)])
    assert abs(unchanged - 0.5) < 0.07, unchanged


def test_a_saved_generator_state_of_another_pipeline_restarts_the_draws_with_a_warning(caplog):
    """A fine-tuning run saved before its RandAugment changed (another DALI graph, whose generators DALI matches
    by operator name) resumes: DALI refused the state and the run crashed; now only the draws start afresh."""
    import logging

    from mixmae_scale.data.dali_pipeline import build_pipeline

    # One op per image (the official recipe's 2 only doubles each graph's build time, which is most of this test's)
    spec = PipelineSpec(mode="finetune", img_size=32, batch_size=2, rand_augment=(1, 9), rand_augment_std=0.0)
    saved = build_pipeline(spec, lambda: None).checkpoint()  # no magnitude noise: no normal generator
    noisy = PipelineSpec(mode="finetune", img_size=32, batch_size=2, rand_augment=(1, 9), rand_augment_std=0.5)
    build_pipeline(spec, lambda: None, checkpoint=saved)  # its own graph's state: restored without a word
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="mixmae"):
        build_pipeline(noisy, lambda: None, checkpoint=saved)
    assert any("written for another pipeline" in r.getMessage() for r in caplog.records)
