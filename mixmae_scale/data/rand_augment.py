"""timm's RandAugment ("rand-m9-mstd0.5-inc1", the official fine-tuning recipe) on DALI's operators.

DALI's own suite (`nvidia.dali.auto_aug.rand_augment`) is torchvision's RandAugment, not timm's: every chosen
op is applied, at one fixed magnitude, from a set without Invert and SolarizeAdd and with a posterize that
keeps 4 bits where timm's keeps 1 at m9. timm (`timm.data.auto_augment.RandAugment`) differs in three ways
that change how strong the augmentation is, and all three are rebuilt here:

- the op set: timm's 15 "increasing" ops, each magnitude mapped to its parameter by timm's own level
  functions (`TIMM_LEVELS` names them; tests/unit/test_augmentation.py compares every mapping with timm's);
- each chosen op is applied with probability 0.5 (timm's AugmentOp prob): drawn here as the choice of an
  identity op half of the time, which has the same distribution (an op uniformly, then kept or not);
- the magnitude of every application is drawn from N(m, mstd) and clipped to [0, 10], quantised to 0.1
  (101 magnitude bins, so the draw is a per-sample bin), with the sign of signed ops drawn per application.

What still differs, and why it is left: affine ops fill with grey 128 (timm: the ImageNet mean colour,
124/116/104) and resample bilinearly (timm: bicubic, which DALI's warp_affine does not offer); equalize
follows OpenCV's histogram formula (DALI's), not PIL's. Sharpness and equalize run on `fn.filter` and
`fn.equalize`: DALI's suite still builds them on deprecated `fn.experimental` aliases (eight warnings per
pipeline build).
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dali_math
from nvidia.dali.auto_aug import augmentations as dali_ops
from nvidia.dali.auto_aug.core import augmentation, signed_bin
from nvidia.dali.auto_aug.core._select import select
from nvidia.dali.data_node import DataNode
from nvidia.dali.pipeline import do_not_convert

MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM: magnitudes run 0..10
BINS = 101  # magnitude bins: 0.1 apart on timm's scale, the resolution of the N(m, mstd) draw
APPLY_PROBABILITY = 0.5  # timm's AugmentOp prob for RandAugment


def _fraction(level: float) -> float:
    return float(level) / MAX_LEVEL


# -- timm's level -> parameter mappings (timm.data.auto_augment's *_level_to_arg); `level` arrives signed ------
def _rotate(level):
    return np.float32(_fraction(level) * 30.0)


def _shear_x(level):
    return np.array([_fraction(level) * 0.3, 0.0], dtype=np.float32)


def _shear_y(level):
    return np.array([0.0, _fraction(level) * 0.3], dtype=np.float32)


def _translate_x(level):
    return np.array([_fraction(level) * 0.45, 0.0], dtype=np.float32)  # timm's translate_pct


def _translate_y(level):
    return np.array([0.0, _fraction(level) * 0.45], dtype=np.float32)


def _enhance_factor(level):
    """timm's *Increasing enhance ops: 1 + (m/10 x 0.9) with a random sign, at least 0.1."""
    return np.float32(max(0.1, 1.0 + _fraction(level) * 0.9))


def _sharpness_kernel(level):
    return dali_ops.sharpness_kernel(float(_enhance_factor(level)) - 1.0)


def _posterize_mask(level):
    """timm's PosterizeIncreasing keeps 4 - int(m/10 x 4) bits; at least 1 (timm at m=10 would keep none,
    which Pillow >= 10 refuses: the PyTorch loader clips the level at 9.999 for the same reason)."""
    bits = max(1, 4 - int(_fraction(level) * 4))
    return np.uint8(0xFF ^ (2 ** (8 - bits) - 1))


def _solarize_threshold(level):
    return np.int32(256 - int(_fraction(level) * 256))  # SolarizeIncreasing: pixels at or above it invert


def _solarize_add_shift(level):
    return np.uint8(int(_fraction(level) * 110))  # SolarizeAdd: added to pixels below 128, at most 237


def _warp(matrix_op):
    def op(data, parameter, fill_value=128, interp_type=None):
        return fn.warp_affine(data, matrix=matrix_op(parameter), fill_value=fill_value, interp_type=interp_type,
                              inverse_map=False)
    return op


def _translate(data, rel_offset, shape, fill_value=128, interp_type=None):
    offset = rel_offset * types.Constant(np.array([shape[1], shape[0]], dtype=np.float32))  # (x: width, y: height)
    return fn.warp_affine(data, matrix=fn.transforms.translation(offset=offset), fill_value=fill_value,
                          interp_type=interp_type, inverse_map=False)


def _rotate_op(data, angle, fill_value=128, interp_type=None):
    return fn.rotate(data, angle=angle, fill_value=fill_value, interp_type=interp_type, keep_size=True)


def _posterize(data, mask):
    return data & mask


def _solarize(data, threshold):
    inverted = types.Constant(255, dtype=types.UINT8) - data
    kept = data < threshold
    return kept * data + (kept ^ True) * inverted


def _enhance(name):
    kernels = {"brightness": lambda data, f: fn.brightness(data, brightness=f),
               "color": lambda data, f: fn.saturation(data, saturation=f)}
    return kernels[name]


def _contrast(data, factor):
    return dali_ops.contrast.op(data, factor)


def _sharpness(data, kernel):
    return fn.filter(data, kernel)


def _equalize(data, _):
    return fn.equalize(data)


def _define(name: str, op, mag_to_param=None, signed: bool = False, param_device: str = "cpu"):
    if mag_to_param is None:
        return augmentation(op, name=name)
    # A level function is plain Python on numbers, called once per magnitude bin (101 per op and layer) while the
    # graph is defined. DALI's AutoGraph converted it at every call, as it does whatever a conditional pipeline
    # calls: half of a RandAugment pipeline's build (11 s -> 5 s here at 2 layers, on every rank of every
    # fine-tuning start). Unconverted, the pipeline's output is the same bit for bit (checked on 64 images).
    return augmentation(op, mag_range=(0.0, MAX_LEVEL), randomly_negate=signed,
                        mag_to_param=do_not_convert(mag_to_param), param_device=param_device, name=name)


# timm's _RAND_INCREASING_TRANSFORMS, in its order: name in timm -> (our op, mapping, signed)
TIMM_LEVELS = {
    "AutoContrast": ("auto_contrast", None, False),
    "Equalize": ("equalize", None, False),
    "Invert": ("invert", None, False),
    "Rotate": ("rotate", _rotate, True),
    "PosterizeIncreasing": ("posterize", _posterize_mask, False),
    "SolarizeIncreasing": ("solarize", _solarize_threshold, False),
    "SolarizeAdd": ("solarize_add", _solarize_add_shift, False),
    "ColorIncreasing": ("color", _enhance_factor, True),
    "ContrastIncreasing": ("contrast", _enhance_factor, True),
    "BrightnessIncreasing": ("brightness", _enhance_factor, True),
    "SharpnessIncreasing": ("sharpness", _sharpness_kernel, True),
    "ShearX": ("shear_x", _shear_x, True),
    "ShearY": ("shear_y", _shear_y, True),
    "TranslateXRel": ("translate_x", _translate_x, True),
    "TranslateYRel": ("translate_y", _translate_y, True),
}

_OPS = {
    "auto_contrast": lambda data, _: dali_ops.auto_contrast.op(data, _),
    "equalize": _equalize,
    "invert": lambda data, _: dali_ops.invert.op(data, _),
    "rotate": _rotate_op,
    "posterize": _posterize,
    "solarize": _solarize,
    "solarize_add": lambda data, shift: dali_ops.solarize_add.op(data, shift),
    "color": _enhance("color"),
    "contrast": _contrast,
    "brightness": _enhance("brightness"),
    "sharpness": _sharpness,
    "shear_x": _warp(lambda shear: fn.transforms.shear(shear=shear)),
    "shear_y": _warp(lambda shear: fn.transforms.shear(shear=shear)),
    "translate_x": _translate,
    "translate_y": _translate,
}

_DEVICE = {"posterize": "auto", "solarize": "auto", "solarize_add": "auto", "sharpness": "auto"}


def suite() -> list:
    """timm's increasing op set as DALI augmentations, magnitudes on timm's 0..10 scale."""
    return [_define(ours, _OPS[ours], mapping, signed, _DEVICE.get(ours, "cpu"))
            for ours, mapping, signed in TIMM_LEVELS.values()]


def draws(n: int, m: float, mstd: float) -> tuple[DataNode, DataNode]:
    """Per sample and per layer: which op (an index into `suite()`, or len(suite()) for no op, drawn half of
    the time) and the magnitude bin (round(10 x clip(N(m, mstd), 0, 10)))."""
    count = len(TIMM_LEVELS)
    op_idx = fn.random.uniform(values=list(range(count)) + [count] * count, shape=(n,), dtype=types.INT32)
    level = fn.random.normal(shape=(n,)) * mstd + m if mstd > 0 else types.Constant(np.full(n, m, np.float32))
    scaled = dali_math.clamp(level * (BINS - 1) / MAX_LEVEL, 0.0, float(BINS - 1))  # cast rounds to nearest
    return op_idx, fn.cast(scaled, dtype=types.INT32)


def rand_augment(images: DataNode, n: int, m: float, mstd: float, shape: tuple[int, int]) -> DataNode:
    """timm's RandAugment on a batch of HWC uint8 images of `shape` (height, width); the pipeline must enable
    conditionals."""
    ops = suite() + [dali_ops.identity]
    op_idx, bins = draws(n, m, mstd)
    magnitude = signed_bin(bins, shape=(n,))
    for layer in range(n):
        images = select(ops, op_idx[layer], data=images, magnitude_bin=magnitude[layer], num_magnitude_bins=BINS,
                        shape=shape)
    return images
