"""The pure-PyTorch fallback: webdataset + Pillow + torchvision, the same views as the DALI pipelines.

For machines without DALI (or to rule DALI out when debugging). Shards are split across ranks
(`split_by_node`-style, by rank given explicitly) and across DataLoader workers (`split_by_worker`);
the stream repeats, and the loader takes a fixed number of batches per epoch.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Iterator
from functools import partial

import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from mixmae_scale.data.manifest import DataError, SplitShards
from mixmae_scale.data.spec import EVAL_CROP_FRACTION, IMAGENET_MEAN, IMAGENET_STD, RAND_AUGMENT_LEVELS, PipelineSpec


class DaliStyleResizeCrop:
    """Resize the shorter side, then centre-crop, rounding as DALI does.

    torchvision truncates the longer side and rounds the crop offset half to even; DALI rounds both
    half up. On sharp-edged images a one-pixel offset is a large difference, so the fallback follows
    DALI and the two loaders give the same evaluation tensors.
    """

    def __init__(self, shorter: int, crop: int) -> None:
        self.shorter, self.crop = shorter, crop

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        scale = self.shorter / min(w, h)
        size = (math.floor(h * scale + 0.5), math.floor(w * scale + 0.5))
        image = F.resize(image, list(size), InterpolationMode.BICUBIC, antialias=True)
        top = math.floor((size[0] - self.crop) / 2 + 0.5)
        left = math.floor((size[1] - self.crop) / 2 + 0.5)
        return F.crop(image, top, left, self.crop, self.crop)


def build_transform(spec: PipelineSpec) -> transforms.Compose:
    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if spec.mode == "eval":
        shorter = round(spec.img_size / EVAL_CROP_FRACTION)
        return transforms.Compose([DaliStyleResizeCrop(shorter, spec.img_size), *normalize])
    interpolation = InterpolationMode.BICUBIC if spec.interpolation == "bicubic" else InterpolationMode.BILINEAR
    steps = [transforms.RandomResizedCrop(spec.img_size, scale=spec.crop_scale, ratio=spec.crop_ratio,
                                          interpolation=interpolation, antialias=True)]
    if spec.rand_augment is not None:
        # timm's own RandAugment, as the official fine-tuning (`create_transform(auto_augment=...)`).
        from timm.data.auto_augment import rand_augment_transform

        # magnitude_max just under timm's 10: at 10, the increasing Posterize keeps 0 bits, which Pillow >= 10
        # refuses (ValueError), so about one fine-tuning batch in a few hundred crashed the loader.
        ops, magnitude = spec.rand_augment
        steps.append(rand_augment_transform(
            f"rand-m{magnitude}-n{ops}-mstd{spec.rand_augment_std}-inc1",
            {"translate_const": int(spec.img_size * 0.45), "img_mean": tuple(round(255 * m) for m in IMAGENET_MEAN),
             "interpolation": Image.BICUBIC, "magnitude_max": RAND_AUGMENT_LEVELS - 1 - 1e-3}))
    steps.append(transforms.RandomHorizontalFlip(spec.hflip))
    return transforms.Compose(steps + normalize)


def _decode(sample: dict, *, transform, with_meta: bool) -> tuple:
    try:
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            tensor = transform(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as exc:  # what PIL raises for truncated or foreign bytes
        where = f"{sample.get('__url__', '?')}: member {sample.get('__key__', '?')}.jpg"
        raise DataError(f"{where} could not be decoded ({exc}). `mixmae shards verify --decode` lists every such "
                        "file; rebuild the shards, then run the same command again to resume") from exc
    label = int(sample["cls"])
    meta = json.loads(sample["json"]) if with_meta else {}
    return tensor, label, meta


def _split_by_sample(shards: SplitShards, spec: PipelineSpec) -> bool:
    """Evaluation (exact counts) and too few shards split by sample; training splits by shard."""
    return spec.mode == "eval" or len(shards.tars) < spec.num_shards


def sample_stream(shards: SplitShards, spec: PipelineSpec, repeat: bool) -> wds.WebDataset:
    """Raw samples for this rank; shards are data only (no pickle decoders are ever registered)."""
    by_sample = _split_by_sample(shards, spec)
    urls = list(shards.tars) if by_sample else list(shards.tars)[spec.shard_id::spec.num_shards]
    # One worker per ordered stream in evaluation, so every world-th sample is this rank's, exactly.
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None,
                             workersplitter=None if spec.mode == "eval" else wds.split_by_worker,
                             handler=wds.reraise_exception, empty_check=False)
    if by_sample:
        dataset = dataset.slice(spec.shard_id, None, spec.num_shards)
    if repeat:
        dataset = dataset.repeat()
    if spec.mode != "eval":
        dataset = dataset.shuffle(spec.shuffle_buffer, rng=random.Random(hash((spec.seed, spec.shard_id))))
    return dataset


def torch_batches(shards: SplitShards, spec: PipelineSpec, workers: int, repeat: bool = True) -> Iterator[tuple]:
    transform = build_transform(spec)
    dataset = sample_stream(shards, spec, repeat).map(partial(_decode, transform=transform, with_meta=spec.with_meta))
    dataset = dataset.batched(spec.batch_size, partial=not repeat, collation_fn=_collate)
    # Workers are spawned, not forked: a fork after DALI or DeepSpeed started threads can deadlock.
    workers = min(workers, 1) if spec.mode == "eval" else workers
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False,
                           worker_init_fn=_SeedWorker(spec.seed, spec.shard_id),
                           multiprocessing_context="spawn" if workers > 0 else None)
    yield from loader


class _SeedWorker:
    """Seeds Python's and torch's RNGs per (seed, rank, worker): augmentations repeat exactly."""

    def __init__(self, seed: int, rank: int) -> None:
        self.seed, self.rank = seed, rank

    def __call__(self, worker_id: int) -> None:
        seed = hash((self.seed, self.rank, worker_id)) % 2**31
        random.seed(seed)
        torch.manual_seed(seed)


def _collate(samples: list[tuple]) -> tuple:
    images = torch.stack([s[0] for s in samples])
    labels = torch.tensor([s[1] for s in samples], dtype=torch.long)
    return images, labels, [s[2] for s in samples]
