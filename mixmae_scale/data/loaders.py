"""The one place a configuration becomes loaders: which images, transforms, batch, rank share, seeds and
output dtype each role of a run reads with (pretraining and fine-tuning training, fine-tuning's validation,
pretraining's held-out loss), and the evaluation view that commands without a profile (`mixmae eval`,
`mixmae probe`, pictures) share with them. Keeping these together keeps the roles from drifting apart: the
held-out loss and the validation see exactly the evaluation transform that `mixmae eval` applies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mixmae_scale.config.schema import Config
from mixmae_scale.data.loader import ShardLoader, choose_decode_device
from mixmae_scale.data.shard_sets import ShardMixture
from mixmae_scale.data.spec import PipelineSpec
from mixmae_scale.seeds import stream_seed

Role = Literal["pretrain", "finetune", "val", "heldout", "segment", "segment_val"]
PRETRAIN_CROP_SCALE = (0.2, 1.0)  # the official pretraining recipe's random-resized-crop scale
FINETUNE_CROP_SCALE = (0.08, 1.0)  # the official fine-tuning recipe's
# Segmentation's random resized crop: a crop keeps at least a quarter of the image, so that most crops still hold
# the objects' context (mmseg's ADE20K recipe rescales by 0.5-2x and crops; below a quarter a crop of a demo
# picture is often all background or all texture).
SEGMENT_CROP_SCALE = (0.25, 1.0)
JOB_CROP_SCALE = {"pretrain": PRETRAIN_CROP_SCALE, "finetune": FINETUNE_CROP_SCALE, "segment": SEGMENT_CROP_SCALE}


def job_crop_scale(config: Config, job: str) -> list[float]:
    """`data.crop_scale` as `job` applies it: the value given, or the job's recipe where it is null. A run writes this
    into its config.yaml (and `config show` prints it) so that the file says the scale the run cropped with."""
    return list(config.data.crop_scale if config.data.crop_scale is not None else JOB_CROP_SCALE[job])


@dataclass(frozen=True)
class LoaderPlace:
    """Which share of the data this process reads and where it decodes (`device_id`: a GPU index or None)."""

    rank: int = 0
    world: int = 1
    device_id: int | None = None

    @classmethod
    def of(cls, config: Config, rank: int, world: int, gpu: int) -> LoaderPlace:
        """Decides the decode device once per run (it is said in the log). `gpu`: the index of the rank's own device,
        which is not its local rank where each task sees its GPU alone (engine/distributed.py `device_index`)."""
        return cls(rank, world, choose_decode_device(config.data.decode_device, gpu, config.data.loader))


def loader_dtype(engine_dtype: str) -> str:
    """What the loader hands a run of `engine_dtype`: float16 for half-precision engines (PipelineSpec)."""
    return "float32" if engine_dtype == "fp32" else "float16"


def eval_spec(img_size: int, batch: int, threads: int, place: LoaderPlace = LoaderPlace(), labels: bool = True,
              output_dtype: str = "float32", seed: int = 0, masks: bool = False,
              exif_orientation: bool = False, mask_classes: int = 0) -> PipelineSpec:
    """The evaluation view (resize, centre crop), this place's share of the split; `masks`: with each image's
    segmentation mask through the same view, its labels checked against the model's `mask_classes` (0: not)."""
    return PipelineSpec(mode="eval", img_size=img_size, batch_size=batch, shard_id=place.rank,
                        num_shards=place.world, num_threads=threads, device_id=place.device_id, seed=seed,
                        with_labels=labels, output_dtype=output_dtype, with_masks=masks,
                        exif_orientation=exif_orientation, mask_classes=mask_classes)


def spec_for(config: Config, role: Role, batch: int, place: LoaderPlace = LoaderPlace(),
             engine_dtype: str = "fp32") -> PipelineSpec:
    """The pipeline of one role of a run. Training roles read this rank's share with the run's augmentations;
    "heldout" reads the same images on every rank, decoded on the CPU, without labels (ZeRO-3 forwards are
    collective, so every rank scores the same batches); "val" reads this rank's share of the validation split.
    Segmentation: "segment" trains on images and masks (`Batch.masks`) with a random resized crop and flip and no
    RandAugment (its geometric ops would move an image away from its mask); "segment_val" is the evaluation view
    with masks. Both read at `segment.crop_size`, not at the encoder's pretraining size (`model.img_size`): a dense
    backbone takes any multiple of 32 (ADE20K's 512 crops for an encoder pretrained at 224)."""
    data = config.data
    if role == "heldout":
        return eval_spec(config.model.img_size, batch, data.num_threads, labels=False,
                         output_dtype=loader_dtype(engine_dtype), seed=config.run.seed,
                         exif_orientation=data.exif_orientation)
    segmenting = role in ("segment", "segment_val")
    size = config.segment.crop_size if segmenting else config.model.img_size
    classes = config.segment.num_classes if segmenting else 0  # the mask labels the model has outputs for
    if role in ("val", "segment_val"):
        return eval_spec(size, batch, data.num_threads, place, masks=segmenting, exif_orientation=data.exif_orientation,
                         mask_classes=classes)
    mode = "finetune" if role == "segment" else role  # training with a crop and flip, as fine-tuning
    common = dict(mode=mode, img_size=size, batch_size=batch, shard_id=place.rank,
                  num_shards=place.world, seed=stream_seed(config.run.seed, place.rank) % 2**31,
                  num_threads=data.num_threads, shuffle_buffer=data.shuffle_buffer,
                  crop_ratio=tuple(data.crop_ratio), hflip=data.hflip, interpolation=data.interpolation,
                  device_id=place.device_id, order_seed=config.run.seed, exif_orientation=data.exif_orientation)
    crop_scale = tuple(job_crop_scale(config, role))
    if role == "pretrain":
        return PipelineSpec(**common, crop_scale=crop_scale, with_labels=False, output_dtype=loader_dtype(engine_dtype))
    if role == "segment":
        return PipelineSpec(**common, crop_scale=crop_scale, with_masks=True, output_dtype=loader_dtype(engine_dtype),
                            mask_classes=classes)
    ft = config.finetune
    return PipelineSpec(**common, crop_scale=crop_scale,
                        rand_augment_std=ft.rand_augment_magnitude_std,
                        rand_augment=(ft.rand_augment_ops, ft.rand_augment_magnitude)
                        if ft.rand_augment_ops > 0 else None)


def open_loader(config: Config, shards: str | ShardMixture, split: str, spec: PipelineSpec,
                batches: int | None = None) -> ShardLoader:
    """A loader on the configured backend (DALI or the PyTorch fallback); `batches`: the most it will be asked for,
    where the caller knows (ShardLoader)."""
    return ShardLoader(shards, split, spec, config.data.loader, config.data.num_threads, batches)
