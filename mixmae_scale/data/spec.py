"""What a loader produces, independent of the backend (DALI or PyTorch), so that code which only
describes a pipeline never imports DALI: machines without DALI run the PyTorch fallback."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875  # resize 256, centre crop 224


@dataclass(frozen=True)
class PipelineSpec:
    mode: Literal["pretrain", "finetune", "eval"]
    img_size: int
    batch_size: int
    shard_id: int = 0
    num_shards: int = 1
    seed: int = 0
    num_threads: int = 4
    shuffle_buffer: int = 4096
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    rand_augment: tuple[int, int] | None = None  # (ops, magnitude), fine-tuning only
    device_id: int | None = None  # a GPU index: decode on it; None: CPU only
    with_meta: bool = False  # also return each sample's json (tests, visualisation)
