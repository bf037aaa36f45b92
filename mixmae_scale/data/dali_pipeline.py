"""DALI pipelines over the WebDataset shards: pretraining, fine-tuning and evaluation views.

One pipeline per rank reads its share of the shards (`shard_id=rank`, `num_shards=world_size`).
JPEG decoding runs on the GPU ("mixed", hardware decoder where the card has one) when a GPU is
present, on the CPU otherwise; the choice is made by the caller and logged once. Pipelines are built
with checkpointing on, so the loader can save and restore their exact position and RNG state.
"""

from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline

from mixmae_scale.data.manifest import SplitShards
from mixmae_scale.data.spec import EVAL_CROP_FRACTION, IMAGENET_MEAN, IMAGENET_STD, RAND_AUGMENT_LEVELS, PipelineSpec


def _decode_device(spec: PipelineSpec) -> str:
    return "mixed" if spec.device_id is not None else "cpu"


def _gpu_decoder_args(spec: PipelineSpec) -> dict:
    if spec.device_id is None:
        return {}
    # Paddings from DALI's ImageNet examples avoid re-allocations as image sizes vary; the hardware
    # decoder (A100/H100) takes this share of the images, CUDA decoding the rest.
    return {"device_memory_padding": 211_025_920, "host_memory_padding": 140_544_512, "hw_decoder_load": 0.65}


def build_pipeline(shards: SplitShards, spec: PipelineSpec, checkpoint: bytes | None = None) -> Pipeline:
    """`checkpoint` (from `pipe.checkpoint()`) restores the reader position and every RNG exactly."""
    train = spec.mode != "eval"
    size = spec.img_size
    mean = [255 * m for m in IMAGENET_MEAN]
    std = [255 * s for s in IMAGENET_STD]
    out_dtype = types.FLOAT16 if spec.output_dtype == "float16" else types.FLOAT

    @pipeline_def(enable_conditionals=spec.rand_augment is not None, enable_checkpointing=True)
    def graph():
        ext = ["jpg", "cls"] + (["json"] if spec.with_meta else [])
        outputs = fn.readers.webdataset(
            paths=list(shards.tars), index_paths=list(shards.indexes), ext=ext,
            missing_component_behavior="error", random_shuffle=train, initial_fill=spec.shuffle_buffer,
            pad_last_batch=True, shard_id=spec.shard_id, num_shards=spec.num_shards, name="reader")
        jpg, cls = outputs[0], outputs[1]
        device = _decode_device(spec)
        if train:
            images = fn.decoders.image_random_crop(
                jpg, device=device, output_type=types.RGB, random_area=list(spec.crop_scale),
                random_aspect_ratio=list(spec.crop_ratio), num_attempts=10, **_gpu_decoder_args(spec))
            interp = types.INTERP_CUBIC if spec.interpolation == "bicubic" else types.INTERP_LINEAR
            images = fn.resize(images, size=[size, size], interp_type=interp, antialias=True)
            if spec.rand_augment is not None:
                from mixmae_scale.data.rand_augment import rand_augment

                # timm's magnitude m of 0..10 is DALI's bin m of 11 (DALI's default of 31 bins made m=9 about
                # a third of the intended strength); monotonic magnitudes are timm's "inc" op set.
                ops, magnitude = spec.rand_augment
                images = rand_augment(images, n=ops, m=magnitude, num_magnitude_bins=RAND_AUGMENT_LEVELS)
            mirror = fn.random.coin_flip(probability=spec.hflip)
            images = fn.crop_mirror_normalize(images, dtype=out_dtype, output_layout="CHW", mean=mean, std=std,
                                              mirror=mirror)
        else:
            images = fn.decoders.image(jpg, device=device, output_type=types.RGB, **_gpu_decoder_args(spec))
            images = fn.resize(images, resize_shorter=round(size / EVAL_CROP_FRACTION),
                               interp_type=types.INTERP_CUBIC, antialias=True)
            images = fn.crop_mirror_normalize(images, dtype=out_dtype, output_layout="CHW", crop=(size, size),
                                              crop_pos_x=0.5, crop_pos_y=0.5, mean=mean, std=std)
        # Labels arrive as ASCII digits of varying length: pad to the batch's longest, parse later.
        result = [images] + ([fn.pad(cls, fill_value=0, axes=(0,), shape=(-1,))] if spec.with_labels else [])
        if spec.with_meta:
            result.append(fn.pad(outputs[2], fill_value=0, axes=(0,), shape=(-1,)))
        return tuple(result)

    pipe = graph(batch_size=spec.batch_size, num_threads=spec.num_threads, device_id=spec.device_id,
                 seed=spec.seed, prefetch_queue_depth=2, checkpoint=checkpoint)
    pipe.build()
    return pipe
