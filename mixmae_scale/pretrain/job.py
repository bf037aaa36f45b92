"""The pretraining job: shards -> DALI batches -> MixMAE -> loss, on the shared loop (`engine/loop.py`),
which owns the DeepSpeed step, resume, faults, signals, logging, MFU and checkpoints.

What is pretraining's own: the model and its weight-decay groups, one mixing mask per micro-step drawn
from (seed, rank, step, micro) so that a resumed run draws the same masks, the held-out reconstruction
loss at the start and the end (pretrain/heldout_loss.py), and, through a callback, the reconstruction grids
of the same images.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mixmae_scale.atomic_file import write_text
from mixmae_scale.config.schema import Config
from mixmae_scale.data.heldout import HeldOut, choose_heldout, heldout_count
from mixmae_scale.data.loader import Batch, ShardLoader
from mixmae_scale.data.loaders import LoaderPlace, open_loader, spec_for
from mixmae_scale.data.shard_sets import ShardMixture
from mixmae_scale.engine.checkpointing.recipe import HELDOUT, cut_record, heldout_record
from mixmae_scale.engine.distributed import autocast
from mixmae_scale.engine.fault_injection import with_injected_faults
from mixmae_scale.engine.job import Job, Loop
from mixmae_scale.engine.loop import RunContext, TrainingLoop, compile_model, fp16_loss_scale, start_run
from mixmae_scale.engine.optimizer import build_optimizer
from mixmae_scale.models.flops import model_report
from mixmae_scale.models.mixmae import build_mixmae
from mixmae_scale.pretrain.heldout_loss import HeldOutLoss, heldout_loss
from mixmae_scale.seeds import stream_seed

log = logging.getLogger("mixmae.pretrain")
__all__ = ["PretrainJob", "pretrain"]

# (config, run folder, rank, device, held-out images) -> an object with .write(model, step); see visualize/snapshots.py.
SnapshotFactory = Callable[[Config, Path, int, torch.device, ShardMixture], Any]


class PretrainJob(Job):
    """MixMAE's loss on this rank's batches; the held-out loss at the start is kept with the checkpoints, so a
    resumed run reports the start of the whole run, not of its last launch, with the images it scored
    (recipe.heldout_record): a resume with other held-out images then says the two are not comparable."""

    kind = "pretrain"

    def __init__(self, config: Config, loader: ShardLoader, heldout: HeldOut, snapshots=None) -> None:
        self.config, self.loader, self.heldout, self.snapshots = config, loader, heldout, snapshots
        self.heldout_start: HeldOutLoss | None = None
        self.scores = scored_images(config, heldout)[HELDOUT]  # the images the held-out loss scores now
        self.start_scored: str | None = None  # those the loss at step 0 scored (None: a checkpoint that did not say)
        self.flops_per_image = model_report(config.model)["train_flops_per_image"]
        self.compiled_blocks = 0

    def loss(self, loop: Loop, batch: Batch, step: int, micro: int) -> torch.Tensor:
        # fp32 or fp16 images (see PipelineSpec.output_dtype): the model casts its encoder input to its weights'
        # dtype and makes the target from these in fp32. The mask is drawn on the device: no copy, no sync.
        images = batch.images.to(loop.device, non_blocking=True)
        generator = torch.Generator(loop.device).manual_seed(
            stream_seed(self.config.run.seed, loop.ctx.rank, step, micro, bits=63))
        mask = loop.engine.module.sample_mask(generator, loop.device)
        with autocast(loop.device, loop.derived.dtype):
            return loop.engine(images, mask=mask).loss

    def on_start(self, loop: Loop) -> None:
        if self.heldout_start is None:
            self.heldout_start = heldout_loss(loop.engine, self.config, self.heldout, loop.device,
                                              loop.derived.dtype)
            self.start_scored = self.scores
            if loop.ctx.rank == 0:
                log.info("held-out reconstruction loss at step 0: %s", self.heldout_start.text())

    def after_step(self, loop: Loop, step: int, last: bool) -> None:
        every = self.config.logging.visualize_every_steps
        if self.snapshots is not None and (step % every == 0 or last):
            self.snapshots.write(loop.engine.module, step)

    def state(self) -> dict[str, Any]:
        # Beside heldout_start, not in it: an older release reads heldout_start as HeldOutLoss(**saved).
        return {"heldout_start": asdict(self.heldout_start) if self.heldout_start else None,
                "heldout_start_images": self.start_scored}

    def load_state(self, state: dict[str, Any]) -> None:
        saved = state.get("heldout_start")
        # A number: a checkpoint of the format without the reason (always a measured loss, or 0.0 over no images).
        self.heldout_start = (HeldOutLoss(**saved) if isinstance(saved, dict)
                              else HeldOutLoss(saved, self.config.logging.heldout_batches * self.config.batch.micro)
                              if saved else HeldOutLoss(None, 0, "not kept by the checkpoint this run resumed from"))
        self.start_scored = state.get("heldout_start_images")

    def summary(self, loop: Loop) -> dict[str, Any]:
        """The held-out loss at the end, said in the log with the one at the start."""
        rank = loop.ctx.rank
        end = heldout_loss(loop.engine, self.config, self.heldout, loop.device, loop.derived.dtype)
        start = self.heldout_start
        same = None if self.start_scored is None else self.start_scored == self.scores
        if rank == 0 and end.loss is None:
            log.warning("held-out reconstruction loss: %s", end.text())
        elif rank == 0 and same is False:
            log.warning("held-out reconstruction loss: %s at step 0 on other held-out images than the %s at step %d "
                        "(a resume changed them; run.json's resumes say where): not comparable", start.text(),
                        end.text(), loop.step)
        elif rank == 0:
            log.info("held-out reconstruction loss: %s at step 0 -> %s at step %d", start.text(), end.text(), loop.step)
        # heldout_same_images: whether the start and end losses scored the same images (None: a checkpoint from
        # before the start's images were kept), so that a summary's start -> end is not read across a change.
        return {"heldout_loss_start": start.loss, "heldout_loss_end": end.loss, "heldout_images": end.images,
                "heldout_not_measured": end.reason, "heldout_set": self.heldout.summary(),
                "heldout_same_images": same}


def scored_images(config: Config, heldout: HeldOut) -> dict[str, str]:
    """What the tags record of the images the held-out loss scores (recipe.heldout_record): the first
    logging.heldout_batches micro-batches of batch.micro (the configured one, as heldout_loss reads them)."""
    return heldout_record(heldout.images, config.logging.heldout_batches * config.batch.micro)


def build_job(config: Config, ctx: RunContext, heldout: HeldOut, model: torch.nn.Module,
              snapshot_factory: SnapshotFactory | None) -> PretrainJob:
    """The job on this rank's share of the training data (after the held-out images are taken out of it)."""
    place = LoaderPlace.of(config, ctx.rank, ctx.world, ctx.device.index or 0)
    spec = spec_for(config, "pretrain", ctx.resolved.derived.micro_batch, place, ctx.resolved.derived.dtype)
    loader = open_loader(config, ctx.train_data, config.data.train_split, spec)
    snapshots = (snapshot_factory(config, ctx.root, ctx.rank, ctx.device, heldout.mixture)
                 if snapshot_factory and config.logging.visualize_every_steps and heldout.images is not None
                 else None)
    job = PretrainJob(config, loader, heldout, snapshots)
    job.compiled_blocks = compile_model(model, ctx)
    return job


def leave_out_heldout(heldout: HeldOut, mixture: ShardMixture) -> tuple[ShardMixture, dict[str, str]]:
    """What training reads of `mixture` (the held-out samples left out, data/heldout.py), and what each tag records of
    that cut beside the data read (recipe.cut_record), so that a resume whose samples differ only by the cut is told as
    that, not as a set rebuilt in place."""
    cut = heldout.exclude_from(mixture)
    return cut, cut_record(mixture, heldout.earlier_cut(mixture), cut)


def pretrain(config: Config, sources: list[str], run_dir: Path, max_steps: int | None = None, local_rank: int = 0,
             snapshot_factory: SnapshotFactory | None = None, overwrite: bool = False) -> dict[str, Any]:
    """One pretraining run to its last step (or a stop); returns the summary it writes to summary.json."""
    data = config.data
    heldout = choose_heldout(data.shards, data.train_split, data.val_split, data.heldout,
                             heldout_count(config.logging.heldout_batches, config.batch.micro))
    records: dict[str, str] = {}  # what a tag records of the held-out cut (`leave_out_heldout`)

    def exclude(mixture: ShardMixture) -> ShardMixture:
        cut, record = leave_out_heldout(heldout, mixture)
        records.update(record)
        return cut

    ctx = start_run(config, sources, run_dir, local_rank, max_steps, overwrite, exclude=exclude,
                    job="pretrain", scores=lambda: {**scored_images(config, heldout), **records})
    sources = ctx.train_data if data.sources else None  # what training reads, when not data.shards' train split
    if ctx.rank == 0 and heldout.train_tail:  # a validation split is the usual case: nothing to say
        log.info("%s", heldout.describe(sources))
    if ctx.rank == 0 and heldout.images is None:
        log.warning("%s", heldout.describe(sources))
    derived = ctx.resolved.derived
    model = build_mixmae(config.model).to(ctx.device)
    optimizer = build_optimizer(model, config.optim, derived.learning_rate, config.zero.offload_optimizer,
                                width=config.model.embed_dim, zero_stage=config.zero.stage)
    job = build_job(config, ctx, heldout, model, snapshot_factory)
    loop = TrainingLoop(ctx, model, optimizer, with_injected_faults(job, config.faults))
    summary = loop.run()
    summary.update({"train_flops_per_image": job.flops_per_image, "derived": asdict(derived),
                    "loss_scale": fp16_loss_scale(loop.engine) if derived.dtype == "fp16" else None})
    if ctx.rank == 0:
        write_text(ctx.root / "summary.json", json.dumps(
            summary, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v)))
    return summary
