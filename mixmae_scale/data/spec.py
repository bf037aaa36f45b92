"""What a loader produces, independent of the backend (DALI or PyTorch), so that code which only
describes a pipeline never imports DALI: machines without DALI run the PyTorch fallback."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875  # resize 256, centre crop 224
RAND_AUGMENT_LEVELS = 11  # timm's magnitude scale 0..10 (levels 0-10)
MASK_IGNORE = 255  # a mask pixel without a label (shards/masks.py); `Batch.masks` holds class indices or this


def eval_resize(img_size: int) -> int:
    """The shorter side evaluation resizes to before its centre crop of `img_size`: 256 for 224 (crop fraction
    0.875), and the crop size itself above 224, as the official fine-tuning code does (util/datasets.py: a
    384-px model is evaluated on a 384 resize, not a 439 one). Below 224 the official `int(size / crop_pct)`
    truncates, and so does this: 160 px resizes to 182 (182.86), the demo's 96 to 109; rounding gave 183 and 110."""
    return img_size if img_size > 224 else int(img_size / EVAL_CROP_FRACTION)


@dataclass(frozen=True)
class PipelineSpec:
    mode: Literal["pretrain", "finetune", "eval"]
    img_size: int
    batch_size: int
    shard_id: int = 0
    num_shards: int = 1
    seed: int = 0  # DALI's generators (fine-tuning's RandAugment): per rank
    # Sample order, crop windows and flips (data/shard_sets.py, crop_params.py): the run's seed, the same on every
    # rank, so that what a sample gets does not depend on the number of ranks.
    order_seed: int = 0
    num_threads: int = 4
    shuffle_buffer: int = 4096  # samples per shuffled window of a rank's run (data/shard_sets.py)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    rand_augment: tuple[int, int] | None = None  # (ops, magnitude on timm's 0-10 scale), fine-tuning only
    rand_augment_std: float = 0.5  # magnitude noise (timm's mstd)
    interpolation: Literal["bicubic", "linear"] = "bicubic"  # after the random crop (eval is always bicubic)
    exif_orientation: bool = False  # rotate by the EXIF tag first (data.exif_orientation; off as the official code)
    device_id: int | None = None  # a GPU index: decode on it; None: CPU only
    with_meta: bool = False  # also return each sample's json (tests, visualisation)
    with_labels: bool = True  # pretraining reads no labels, so it neither outputs nor parses them
    # Segmentation: also decode each sample's mask (`seg.png`) with the image's crop window and flip (training) or
    # resize and centre crop (eval), nearest-neighbour so that no label is invented: `Batch.masks`.
    with_masks: bool = False
    # The classes the model predicts (segment.num_classes): a split whose manifest names more mask classes is
    # refused when the loader is made, and a decoded mask label past them (other than MASK_IGNORE) names its sample
    # (data/loader.py), where it reached the loss's IndexError mid-run. 0: not checked.
    mask_classes: int = 0
    # float16 halves the batch the host hands the GPU and keeps normalised 8-bit pixels within 1e-3 (a pixel
    # step is 0.017 after normalisation), so the per-patch normalised target loses nothing; bfloat16 would
    # round them by up to half a step. Half-precision runs ask for it.
    output_dtype: Literal["float32", "float16"] = "float32"

    def __post_init__(self) -> None:
        if self.with_masks and self.mode != "eval" and self.rand_augment is not None:
            raise ValueError("PipelineSpec: with_masks and rand_augment together would move the image away from its "
                             "mask (RandAugment's rotations, shears and translations); segmentation trains with the "
                             "crop and flip alone")
