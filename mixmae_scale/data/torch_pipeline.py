"""The pure-PyTorch fallback: Pillow + torchvision decode what the shard reader hands out, as DALI would.

For machines without DALI (or to rule DALI out when debugging). The samples, their order, crop windows
and flips come from the same reader as DALI's (data/shard_reader.py), so the two backends train on the
same views up to the decoders' rounding, and give the same evaluation tensors. Decoding runs in a
thread pool (Pillow releases the GIL while it decodes), except with RandAugment: timm's draws from
Python's and NumPy's global generators, so those samples are decoded one at a time, each with its
generators seeded from the sample's identity and restored afterwards (mixup draws from them too).
"""

from __future__ import annotations

import io
import math
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from mixmae_scale.data.errors import DataError
from mixmae_scale.data.pixels import to_rgb8
from mixmae_scale.data.shard_reader import RawBatch, RawSample
from mixmae_scale.data.spec import IMAGENET_MEAN, IMAGENET_STD, RAND_AUGMENT_LEVELS, PipelineSpec, eval_resize
from mixmae_scale.seeds import stream_seed


class DaliStyleResizeCrop:
    """Resize the shorter side, then centre-crop, rounding as DALI does.

    torchvision truncates the longer side and rounds the crop offset half to even; DALI rounds both
    half up. On sharp-edged images a one-pixel offset is a large difference, so the fallback follows
    DALI and the two loaders give the same evaluation tensors.
    """

    def __init__(self, shorter: int, crop: int, interpolation: InterpolationMode = InterpolationMode.BICUBIC) -> None:
        self.shorter, self.crop, self.interpolation = shorter, crop, interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        scale = self.shorter / min(w, h)
        size = (math.floor(h * scale + 0.5), math.floor(w * scale + 0.5))
        image = F.resize(image, list(size), self.interpolation, antialias=True)
        top = math.floor((size[0] - self.crop) / 2 + 0.5)
        left = math.floor((size[1] - self.crop) / 2 + 0.5)
        return F.crop(image, top, left, self.crop, self.crop)


class TorchDecoder:
    """One batch of raw samples -> (images, labels, meta, masks or None) tensors for a spec."""

    def __init__(self, spec: PipelineSpec, threads: int) -> None:
        self.spec = spec
        self.normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.eval_view = DaliStyleResizeCrop(eval_resize(spec.img_size), spec.img_size)
        self.mask_eval_view = DaliStyleResizeCrop(eval_resize(spec.img_size), spec.img_size,
                                                  InterpolationMode.NEAREST)
        bicubic = spec.interpolation == "bicubic"
        self.interpolation = InterpolationMode.BICUBIC if bicubic else InterpolationMode.BILINEAR
        self.rand_augment = None
        if spec.mode != "eval" and spec.rand_augment is not None:
            # timm's own RandAugment, as the official fine-tuning (`create_transform(auto_augment=...)`).
            from timm.data.auto_augment import rand_augment_transform

            # magnitude_max just under timm's 10: at 10, the increasing Posterize keeps 0 bits, which Pillow >= 10
            # refuses (ValueError), so about one fine-tuning batch in a few hundred crashed the loader.
            ops, magnitude = spec.rand_augment
            self.rand_augment = rand_augment_transform(
                f"rand-m{magnitude}-n{ops}-mstd{spec.rand_augment_std}-inc1",
                {"translate_const": int(spec.img_size * 0.45),
                 "img_mean": tuple(round(255 * m) for m in IMAGENET_MEAN),
                 "interpolation": Image.BICUBIC, "magnitude_max": RAND_AUGMENT_LEVELS - 1 - 1e-3})
        self.pool = ThreadPoolExecutor(max(threads, 1)) if self.rand_augment is None else None

    def __call__(self, batch: RawBatch) -> tuple[torch.Tensor, torch.Tensor, list[dict], torch.Tensor | None]:
        samples = batch.samples
        images = list(self.pool.map(self.decode, samples)) if self.pool else [self.decode(s) for s in samples]
        labels = torch.tensor([s.label for s in samples], dtype=torch.long)
        mapping = self.pool.map if self.pool else map
        masks = torch.stack(list(mapping(self.decode_mask, samples))) if self.spec.with_masks else None
        return torch.stack(images), labels, [_meta(s) for s in samples], masks

    def decode_mask(self, sample: RawSample) -> torch.Tensor:
        """The mask through the image's crop window, resize and flip (or evaluation view), nearest-neighbour."""
        try:
            with Image.open(io.BytesIO(sample.mask)) as opened:
                mask = opened.convert("L") if opened.mode not in ("L", "P") else opened.copy()
        except (OSError, SyntaxError, ValueError, TypeError) as exc:
            raise DataError(f"{sample.key}: the segmentation mask (seg.png) could not be decoded ({exc})") from exc
        if self.spec.mode == "eval":
            mask = self.mask_eval_view(mask)
        else:
            mask = _resize(mask.crop(_window(sample, mask.size)), self.spec.img_size, InterpolationMode.NEAREST)
            mask = F.hflip(mask) if sample.flip else mask
        return torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())

    def decode(self, sample: RawSample) -> torch.Tensor:
        try:
            with Image.open(io.BytesIO(sample.image)) as opened:
                oriented = ImageOps.exif_transpose(opened) if self.spec.exif_orientation else opened
                image = to_rgb8(oriented, strict=False)  # 16-bit and float scaled as DALI does, not clipped
        except (OSError, SyntaxError, ValueError) as exc:  # what Pillow raises for truncated or foreign bytes
            raise DataError(f"{sample.key}: the image could not be decoded ({exc}). `mixmae shards verify --decode` "
                            "lists every such file; rebuild or re-adopt the shards, then run the same command "
                            "again to resume") from exc
        if self.spec.mode == "eval":
            return self.normalize(self.eval_view(image))
        image = _resize(image.crop(_window(sample, image.size)), self.spec.img_size, self.interpolation)
        if self.rand_augment is not None:
            image = _with_sample_generators(self.spec.order_seed, sample, lambda: self.rand_augment(image))
        if sample.flip:
            image = F.hflip(image)
        return self.normalize(image)


def _window(sample: RawSample, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The sample's crop window in pixels of an image of `size`: the same box for the image and its mask."""
    x0, y0, w, h = sample.crop
    width, height = size
    return round(x0 * width), round(y0 * height), round((x0 + w) * width), round((y0 + h) * height)


def _resize(image: Image.Image, size: int, interpolation: InterpolationMode) -> Image.Image:
    return F.resize(image, [size, size], interpolation, antialias=True)


def _with_sample_generators(order_seed: int, sample: RawSample, work):
    python_state, numpy_state = random.getstate(), np.random.get_state()
    seed = stream_seed("rand-augment", order_seed, *sample.uid)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        return work()
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _meta(sample: RawSample) -> dict:
    import json

    return json.loads(sample.meta) if sample.meta else {}
