"""The segmentation job: dense backbone + UperNet head -> per-pixel cross-entropy (unlabelled pixels ignored), on
the shared loop (`engine/loop.py`, through the `Job` protocol of engine/job.py), which owns the DeepSpeed step,
exact resume, faults, signals, logging, MFU and checkpoints, as for pretraining and classification.

What is segmentation's own: the model and its layer-decay groups (segment/build.py), the image-and-mask crops
(the loaders' "segment" and "segment_val" roles), the exact distributed mIoU every `segment.eval_every_steps`
(segment/evaluate.py), `eval.jsonl` (one line per evaluation) and `best/` (the checkpoint with the highest mIoU).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from mixmae_scale.atomic_file import write_text
from mixmae_scale.config.schema import Config
from mixmae_scale.data.loader import Batch, ShardLoader, as_mixture, require_masks
from mixmae_scale.data.loaders import LoaderPlace, open_loader, spec_for
from mixmae_scale.data.manifest import load_split
from mixmae_scale.data.shard_sets import ShardMixture
from mixmae_scale.data.spec import PipelineSpec
from mixmae_scale.engine import run_folder
from mixmae_scale.engine.checkpointing.recipe import heldout_record
from mixmae_scale.engine.distributed import autocast
from mixmae_scale.engine.evaluated_job import EvaluatedJob, recorded_best
from mixmae_scale.engine.fault_injection import with_injected_faults
from mixmae_scale.engine.job import Loop
from mixmae_scale.engine.loop import RunContext, TrainingLoop, start_run
from mixmae_scale.engine.optimizer import adamw
from mixmae_scale.finetune.evaluate import eval_batch_size
from mixmae_scale.finetune.pretrained import Pretrained
from mixmae_scale.models.segmentation_head import SegmentationModel
from mixmae_scale.segment.build import (
    build_segmenter,
    check_init,
    describe,
    optimizer_groups_without_names,
    param_groups,
    segment_start,
    started_from,
    training_flops_per_image,
)
from mixmae_scale.segment.evaluate import evaluate_segmentation, segmentation_loss

log = logging.getLogger("mixmae.segment")


class SegmentJob(EvaluatedJob):
    """Segmentation evaluated every `eval_every` steps and at the last; the best evaluation is kept with the
    checkpoints (its own `best/` checkpoint) so that a resumed run keeps comparing against it."""

    kind = "segment"
    metric = "miou"
    left_out_of_best = ("per_class_iou",)

    def __init__(self, config: Config, root: Path, loader: ShardLoader, val_spec: PipelineSpec, val_samples: int,
                 eval_every: int, flops_per_image: float | None, init: dict[str, Any] | None = None) -> None:
        self.config, self.root, self.loader, self.started_from = config, root, loader, init
        self.val_spec, self.val_samples, self.eval_every = val_spec, val_samples, eval_every
        self.flops_per_image, self.compiled_blocks = flops_per_image, 0
        self.start_evaluations()

    def loss(self, loop: Loop, batch: Batch, step: int, micro: int) -> torch.Tensor:
        images, masks = batch.images.to(loop.device), batch.masks.to(loop.device)
        with autocast(loop.device, loop.derived.dtype):
            logits = loop.engine(images.to(next(loop.engine.module.parameters()).dtype))
        return segmentation_loss(logits, masks, self.config.segment.ignore_index)

    def evaluate(self, loop: Loop, step: int) -> dict[str, Any]:
        """Collective: the mIoU of the whole validation split (every rank its share)."""
        config, derived = self.config, loop.derived
        val_loader = self.val_loader()
        scores = evaluate_segmentation(loop.engine, val_loader.eval_batches(), loop.device, derived.dtype,
                                       config.segment.num_classes, config.segment.ignore_index, self.val_samples,
                                       val_loader.split_coverage(), str(config.data.shards))
        return {"step": step, "epoch": self.loader.epoch_progress, **scores}

    def describe(self, result: dict[str, Any]) -> str:
        return (f"mIoU {result['miou']:.2f}  pixel accuracy {result['pixel_accuracy']:.2f}  "
                f"loss {result['loss']:.4f}")


def build_model(config: Config, resumed: Path | None = None, pretrained: Pretrained | None = None
                ) -> SegmentationModel:
    """The same initial weights on every rank and for every world size: drawn from `run.seed` alone (the loop
    seeds each rank's generators apart, for their augmentations), so a seed names one initialisation. `resumed`: the
    run's own checkpoint, about to be loaded into it (its shape is read from there, not from `segment.init`);
    `pretrained`: segment.init's weights, where the caller loaded them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed)
        return build_segmenter(config, resumed, pretrained)


def check_segment_data(config: Config, train_data: ShardMixture, world: int) -> None:
    """What segmentation refuses of its data, read off the manifests (start_run calls it before the run folder is
    touched: the same refusals from the loaders came after it and left an empty checkpoints/ and a config.yaml of a
    run that never ran): a training or validation split without masks, masks of more classes than
    segment.num_classes, a validation split with fewer images than ranks. The validation split's masks were
    otherwise first looked at by the first evaluation, steps into the run."""
    seg, data = config.segment, config.data
    require_masks(train_data, data.train_split, seg.num_classes)
    val = as_mixture(data.shards, data.val_split)
    require_masks(val, data.val_split, seg.num_classes)
    eval_batch_size(1, val.sets[0].shards.samples, world, data.shards, data.val_split, "the segmentation fine-tuning")


def segment(config: Config, sources: list[str], run_dir: Path, max_steps: int | None = None, local_rank: int = 0,
            overwrite: bool = False) -> dict[str, Any]:
    """One segmentation run to its last step (or a stop); returns the summary it writes to summary.json."""
    # The user's mistake, said before a process group or run folder is made; a run that resumes from its own
    # checkpoint needs nothing of segment.init.
    check_init(config, run_folder.resumes(run_dir, config.checkpoint.resume, overwrite))
    ctx = start_run(config, sources, run_dir, local_rank, max_steps, overwrite, job="segment",
                    check=lambda train_data, world: check_segment_data(config, train_data, world),
                    scores=lambda: heldout_record(load_split(config.data.shards, config.data.val_split)))
    if ctx.resume is None:  # a fresh start after all (the folder changed since it was read)
        check_init(config)
    derived, seg = ctx.resolved.derived, config.segment
    pretrained = segment_start(config, resumed=ctx.resume is not None)
    model = build_model(config, ctx.checkpoints / ctx.resume.tag if ctx.resume else None, pretrained).to(ctx.device)
    if ctx.rank == 0:
        if pretrained is not None:
            log.info("loaded %s", pretrained.described())
        log.info("%s", describe(model, config))
    groups = param_groups(model, derived.learning_rate, config.optim.weight_decay, seg.layer_decay,
                          config.optim.exempt_tables_from_decay, seg.head_lr_scale)
    optimizer = adamw(optimizer_groups_without_names(groups), config.optim, derived.learning_rate,
                      ctx.device.type == "cuda", config.zero.offload_optimizer, config.zero.stage)
    job = build_job(config, ctx, model, started_from(config, pretrained))
    loop = TrainingLoop(ctx, model, optimizer, with_injected_faults(job, config.faults))
    summary = loop.run()
    summary.update({"best": recorded_best(job.best, job.metric), "last": job.last,
                    "num_classes": seg.num_classes, "init": seg.init})
    if ctx.rank == 0:
        write_text(ctx.root / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def build_job(config: Config, ctx: RunContext, model: SegmentationModel, init: dict[str, Any] | None = None
              ) -> SegmentJob:
    """The job on this rank's share of the training crops, with the validation it runs every
    `segment.eval_every_steps`. `init`: where its encoder came from (segment/build.py's `started_from`)."""
    derived = ctx.resolved.derived
    place = LoaderPlace.of(config, ctx.rank, ctx.world, ctx.device.index or 0)
    loader = open_loader(config, ctx.train_data, config.data.train_split,
                         spec_for(config, "segment", derived.micro_batch, place))
    val_samples = load_split(config.data.shards, config.data.val_split, ctx.world).samples
    val_batch = eval_batch_size(derived.micro_batch, val_samples, ctx.world, config.data.shards,
                                config.data.val_split, "the segmentation fine-tuning")
    val_spec = spec_for(config, "segment_val", val_batch, place)
    # No regional compilation: the backbone runs its blocks' parts around padded windows (models/backbone.py),
    # never a block's forward, which is what models/regional_compile.py compiles.
    return SegmentJob(config, ctx.root, loader, val_spec, val_samples, config.segment.eval_every_steps,
                      training_flops_per_image(model, config.segment.crop_size), init)
