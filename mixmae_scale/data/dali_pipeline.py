"""DALI pipelines that decode and augment the samples the shard reader hands them.

The reader (data/shard_reader.py) decides which samples a rank sees and each one's crop window and flip;
DALI does the heavy part: decoding only the crop window (`decoders.image_slice`, on the GPU with the
"mixed" backend where there is one, hardware decoder included), resizing, RandAugment for fine-tuning,
normalising. Windows are fractions of the image, so a decoder that applies EXIF orientation (opt-in,
`data.exif_orientation`; the official code's PIL loader ignores the tag) still crops inside the image. JPEG,
PNG and WebP members all decode here (shards adopted from other tools).

Segmentation masks (`PipelineSpec.with_masks`) take the same crop window, resize and flip as their images, or
the same evaluation view, with nearest-neighbour sampling.

Only fine-tuning's RandAugment draws from DALI's own generators; those pipelines are built with
checkpointing on so that a resume on the same ranks restores them exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline

from mixmae_scale.data.sample_ids import sample_id
from mixmae_scale.data.shard_reader import DECODER_PREFETCH, RawBatch
from mixmae_scale.data.spec import IMAGENET_MEAN, IMAGENET_STD, PipelineSpec, eval_resize


def _decode_device(spec: PipelineSpec) -> str:
    return "mixed" if spec.device_id is not None else "cpu"


def _gpu_decoder_args(spec: PipelineSpec) -> dict:
    if spec.device_id is None:
        return {}
    # Paddings from DALI's ImageNet examples avoid re-allocations as image sizes vary; the hardware
    # decoder (A100/H100) takes this share of the images, CUDA decoding the rest.
    return {"device_memory_padding": 211_025_920, "host_memory_padding": 140_544_512, "hw_decoder_load": 0.65}


def batch_arrays(batch: RawBatch, spec: PipelineSpec) -> tuple[list[np.ndarray], ...]:
    """What the external source feeds DALI for one batch, in the order `build_pipeline` declares."""
    samples = batch.samples
    columns = [[np.frombuffer(s.image, dtype=np.uint8) for s in samples]]
    if spec.mode != "eval":
        columns.append([np.array(s.crop[:2], dtype=np.float32) for s in samples])
        columns.append([np.array(s.crop[2:], dtype=np.float32) for s in samples])
        columns.append([np.array(int(s.flip), dtype=np.int32) for s in samples])
    if spec.with_masks:
        columns.append([np.frombuffer(s.mask, dtype=np.uint8) for s in samples])
    if spec.with_labels:
        columns.append([np.array(s.label, dtype=np.int64) for s in samples])
    if spec.with_meta:
        columns.append([np.frombuffer(s.meta or b"{}", dtype=np.uint8) for s in samples])
    if spec.mode == "eval":  # each sample's id comes out with its image: what evaluation counted (data/sample_ids.py)
        columns.append([np.array(sample_id(s.key), dtype=np.int64) for s in samples])
    return tuple(columns)


def _training_masks(encoded, anchor, shape, flip, size: int, oriented: bool):
    """The masks through the images' crop window, resize and flip, nearest-neighbour (no invented labels). Masks
    decode on the CPU (8-bit PNG, `GRAY` keeps the stored class indices): they are small, and the images' GPU
    decoder would gain nothing on them."""
    masks = fn.decoders.image_slice(encoded, anchor, shape, device="cpu", output_type=types.GRAY,
                                    adjust_orientation=oriented)
    masks = fn.resize(masks, size=[size, size], interp_type=types.INTERP_NN, antialias=False)
    return fn.flip(masks, horizontal=flip)


def _eval_masks(encoded, size: int, oriented: bool):
    """The masks through the evaluation view: shorter side resized, centre crop, as the images."""
    masks = fn.decoders.image(encoded, device="cpu", output_type=types.GRAY, adjust_orientation=oriented)
    masks = fn.resize(masks, resize_shorter=eval_resize(size), interp_type=types.INTERP_NN,
                      antialias=False)
    return fn.crop(masks, crop=(size, size), crop_pos_x=0.5, crop_pos_y=0.5)


def build_pipeline(spec: PipelineSpec, next_batch: Callable[[], RawBatch], checkpoint: bytes | None = None) -> Pipeline:
    """`next_batch` is called by DALI (ahead of the training step, as it prefetches) for each batch's samples.
    `checkpoint` (from `pipe.checkpoint()`) restores DALI's generators: fine-tuning's RandAugment."""
    size = spec.img_size
    mean = [255 * m for m in IMAGENET_MEAN]
    std = [255 * s for s in IMAGENET_STD]
    out_dtype = types.FLOAT16 if spec.output_dtype == "float16" else types.FLOAT
    train = spec.mode != "eval"
    outputs = (1 + (3 if train else 1) + int(spec.with_masks) + int(spec.with_labels)  # eval: the samples' ids
               + int(spec.with_meta))

    def source():
        return batch_arrays(next_batch(), spec)

    @pipeline_def(enable_conditionals=spec.rand_augment is not None,
                  enable_checkpointing=spec.rand_augment is not None)
    def graph():
        columns = list(fn.external_source(source=source, num_outputs=outputs, batch=True))
        encoded = columns.pop(0)
        device = _decode_device(spec)
        masks = None
        if train:
            anchor, shape, flip = columns.pop(0), columns.pop(0), columns.pop(0)
            if spec.with_masks:
                masks = _training_masks(columns.pop(0), anchor, shape, flip, size, spec.exif_orientation)
            images = fn.decoders.image_slice(encoded, anchor, shape, device=device, output_type=types.RGB,
                                             adjust_orientation=spec.exif_orientation, **_gpu_decoder_args(spec))
            interp = types.INTERP_CUBIC if spec.interpolation == "bicubic" else types.INTERP_LINEAR
            images = fn.resize(images, size=[size, size], interp_type=interp, antialias=True)
            if spec.rand_augment is not None:
                from mixmae_scale.data.rand_augment import rand_augment

                # timm's own RandAugment (op set, magnitude noise, per-op probability), not DALI's suite
                ops, magnitude = spec.rand_augment
                images = rand_augment(images, n=ops, m=magnitude, mstd=spec.rand_augment_std, shape=(size, size))
            images = fn.crop_mirror_normalize(images, dtype=out_dtype, output_layout="CHW", mean=mean, std=std,
                                              mirror=flip)
        else:
            if spec.with_masks:
                masks = _eval_masks(columns.pop(0), size, spec.exif_orientation)
            images = fn.decoders.image(encoded, device=device, output_type=types.RGB,
                                       adjust_orientation=spec.exif_orientation, **_gpu_decoder_args(spec))
            images = fn.resize(images, resize_shorter=eval_resize(size),
                               interp_type=types.INTERP_CUBIC, antialias=True)
            images = fn.crop_mirror_normalize(images, dtype=out_dtype, output_layout="CHW", crop=(size, size),
                                              crop_pos_x=0.5, crop_pos_y=0.5, mean=mean, std=std)
        return tuple([images] + ([masks] if masks is not None else []) + columns)

    def built(state: bytes | None) -> Pipeline:
        pipe = graph(batch_size=spec.batch_size, num_threads=spec.num_threads, device_id=spec.device_id,
                     seed=spec.seed, prefetch_queue_depth=DECODER_PREFETCH, checkpoint=state)
        pipe.build()
        return pipe

    try:
        return built(checkpoint)
    except RuntimeError as exc:
        # DALI matches saved generators to operators by name: a checkpoint of another graph (a run saved before
        # fine-tuning's RandAugment became timm's) cannot be restored. The samples and their order are the
        # loader's, not DALI's, so only the augmentation's random draws start afresh.
        if checkpoint is None or "checkpoint" not in str(exc).lower():
            raise
        logging.getLogger("mixmae").warning(
            "the checkpoint's DALI generator state was written for another pipeline (%s): the augmentation's "
            "random draws start afresh; the samples and their order go on as saved", " ".join(str(exc).split())[:200])
        return built(None)
