"""RandAugment for the DALI pipeline, on DALI's current operators.

DALI 2.4's own RandAugment suite (`nvidia.dali.auto_aug.rand_augment`) still builds two of its ops,
`sharpness` and `equalize`, on `fn.experimental.filter` and `fn.experimental.equalize`: aliases DALI
itself deprecates, so every fine-tuning pipeline build printed eight deprecation warnings, half of a
fine-tuning log. Here the same suite runs with those two ops on `fn.filter` and `fn.equalize`, the
operators they moved to. Each op keeps DALI's magnitude range, sign and parameter mapping, and the
suite its order, so the augmented images and the random draws are DALI's own
(tests/unit/test_augmentation.py compares the two pipelines image for image).
"""

from __future__ import annotations

from nvidia.dali import fn
from nvidia.dali.auto_aug import rand_augment as dali_rand_augment
from nvidia.dali.auto_aug.core import augmentation
from nvidia.dali.data_node import DataNode


def _sharpness(data, kernel):
    return fn.filter(data, kernel)


def _equalize(data, _):
    return fn.equalize(data)


CURRENT_OPERATORS = {"sharpness": _sharpness, "equalize": _equalize}


def suite() -> list:
    """DALI's monotonic RandAugment suite (timm's "inc" op set) with every op on a current operator."""
    ops = []
    for op in dali_rand_augment.get_rand_augment_suite():
        if op.name in CURRENT_OPERATORS:
            op = augmentation(CURRENT_OPERATORS[op.name], mag_range=op.mag_range, randomly_negate=op.randomly_negate,
                              mag_to_param=op.mag_to_param, param_device=op.param_device, name=op.name)
        ops.append(op)
    return ops


def rand_augment(images: DataNode, n: int, m: int, num_magnitude_bins: int) -> DataNode:
    """`dali_rand_augment.rand_augment(images, n, m, num_magnitude_bins, monotonic_mag=True)`, without the
    deprecated operators (its other arguments at DALI's defaults)."""
    return dali_rand_augment.apply_rand_augment(suite(), images, n, m, num_magnitude_bins=num_magnitude_bins,
                                                fill_value=128, interp_type=None)
