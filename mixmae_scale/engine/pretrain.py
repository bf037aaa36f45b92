"""The pretraining job: shards -> DALI batches -> MixMAE -> loss, on the shared loop (`engine/loop.py`),
which owns the DeepSpeed step, resume, faults, signals, logging and checkpoints.

What is pretraining's own: the model and its weight-decay groups, one mixing mask per micro-step drawn
from (seed, rank, step, micro) so that a resumed run draws the same masks, the held-out reconstruction
loss with fixed masks at the start and the end (comparable across runs) on images training never reads (the
validation split, or a held-out tail of the train split: data/heldout.py), and, through a callback, the
reconstruction grids of the same images.

A held-out loss is scored on whole micro-batches only. Where none fits (a validation split smaller than one
micro-batch, or `logging.heldout_batches=0`) it is null in summary.json with the reason in
`heldout_not_measured` and in the log, never 0 (which a sweep would read as a perfect model); the run itself
goes ahead, as its training is sound. A sweep refuses such a run when it reads it (scaling/run.py).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mixmae_scale.atomic_file import write_text
from mixmae_scale.config.schema import Config
from mixmae_scale.data.heldout import HeldOut, choose_heldout, heldout_count
from mixmae_scale.data.loader import Batch, ShardLoader, choose_decode_device
from mixmae_scale.data.shard_sets import ShardMixture
from mixmae_scale.data.spec import PipelineSpec
from mixmae_scale.engine.distributed import autocast, seed_for
from mixmae_scale.engine.loop import Job, TrainingLoop, compile_model, fp16_loss_scale, start_run
from mixmae_scale.engine.monitor import device_peak_flops
from mixmae_scale.engine.optimizer import build_optimizer
from mixmae_scale.models.flops import model_report
from mixmae_scale.models.mixmae import build_mixmae

log = logging.getLogger("mixmae.pretrain")
__all__ = ["pretrain"]

# (config, run folder, rank, device, held-out images) -> an object with .write(model, step); see visualize/snapshots.py.
SnapshotFactory = Callable[[Config, Path, int, torch.device, ShardMixture], Any]


@dataclass(frozen=True)
class HeldOutLoss:
    """A held-out reconstruction loss, or None with the reason it was not measured: a mean over no images is
    not a loss (it used to read 0.0000, a perfect model)."""

    loss: float | None
    images: int
    reason: str | None = None

    def text(self) -> str:
        return f"{self.loss:.4f}" if self.loss is not None else f"not measured ({self.reason})"


def heldout_shortfall(split: str, samples: int, micro: int, batches: int) -> str | None:
    """Why no held-out batch can be scored, or None. The score uses whole micro-batches of the run's size (the
    masks pair images within a batch, so a smaller batch would score another task)."""
    if batches < 1:
        return f"logging.heldout_batches={batches}"
    if samples < micro:
        return f"{split} has {samples} images, fewer than one micro-batch of {micro}"
    return None


def heldout_loss(engine, config: Config, heldout: HeldOut, device: torch.device, dtype: str) -> HeldOutLoss:
    """Reconstruction loss on the first batches of the held-out images with fixed masks: comparable across
    steps and runs. Every rank scores the same batches (ZeRO-3 forwards are collective)."""
    spec = PipelineSpec(mode="eval", img_size=config.model.img_size, batch_size=config.batch.micro,
                        num_threads=config.data.num_threads, seed=config.run.seed, with_labels=False,
                        output_dtype=loader_dtype(dtype))
    loader = ShardLoader(heldout.mixture, config.data.val_split, spec, config.data.loader, config.data.num_threads)
    reason = heldout_shortfall(heldout.images.split, loader.layout.length, config.batch.micro,
                               config.logging.heldout_batches)
    if reason:
        return HeldOutLoss(None, 0, reason)
    model = engine.module
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i >= config.logging.heldout_batches:
                break
            mask = model.sample_mask(torch.Generator().manual_seed(seed_for(config.run.seed, 999, i)), device)
            with autocast(device, dtype):
                total += float(engine(batch.images.to(device), mask=mask).loss.detach())
            count += 1
    model.train(was_training)
    return HeldOutLoss(total / count, count * config.batch.micro)


def loader_dtype(engine_dtype: str) -> str:
    """What the loader hands a run of `engine_dtype`: float16 for half-precision engines (PipelineSpec)."""
    return "float32" if engine_dtype == "fp32" else "float16"


class PretrainJob(Job):
    def __init__(self, config: Config, heldout: HeldOut, snapshots=None) -> None:
        self.config = config
        self.heldout = heldout
        self.snapshots = snapshots
        self.heldout_start: HeldOutLoss | None = None
        self.flops_per_image = model_report(config.model)["train_flops_per_image"]
        self.peak_flops = device_peak_flops(config.logging.peak_tflops)

    def loss(self, loop: TrainingLoop, batch: Batch, step: int, micro: int) -> torch.Tensor:
        # fp32 or fp16 images (see PipelineSpec.output_dtype): the model casts its encoder input to its weights'
        # dtype and makes the target from these in fp32. The mask is drawn on the device: no copy, no sync.
        images = batch.images.to(loop.device, non_blocking=True)
        generator = torch.Generator(loop.device).manual_seed(
            seed_for(self.config.run.seed, loop.ctx.rank, step, micro))
        mask = loop.engine.module.sample_mask(generator, loop.device)
        with autocast(loop.device, loop.derived.dtype):
            return loop.engine(images, mask=mask).loss

    def on_start(self, loop: TrainingLoop) -> None:
        if self.heldout_start is None:
            self.heldout_start = heldout_loss(loop.engine, self.config, self.heldout, loop.device,
                                              loop.derived.dtype)
            if loop.ctx.rank == 0:
                log.info("held-out reconstruction loss at step 0: %s", self.heldout_start.text())

    def after_step(self, loop: TrainingLoop, step: int, last: bool) -> None:
        every = self.config.logging.visualize_every_steps
        if self.snapshots is not None and (step % every == 0 or last):
            self.snapshots.write(loop.engine.module, step)

    def state(self) -> dict[str, Any]:
        return {"heldout_start": asdict(self.heldout_start) if self.heldout_start else None}

    def load_state(self, state: dict[str, Any]) -> None:
        saved = state.get("heldout_start")
        # A number: written before the reason was kept (always a measured loss then, or 0.0 over no images).
        self.heldout_start = (HeldOutLoss(**saved) if isinstance(saved, dict)
                              else HeldOutLoss(saved, self.config.logging.heldout_batches * self.config.batch.micro)
                              if saved else HeldOutLoss(None, 0, "not kept by the checkpoint this run resumed from"))


def pretrain(config: Config, sources: list[str], run_dir: Path, max_steps: int | None = None, local_rank: int = 0,
             snapshot_factory: SnapshotFactory | None = None, overwrite: bool = False) -> dict[str, Any]:
    data = config.data
    heldout = choose_heldout(data.shards, data.train_split, data.val_split, data.heldout,
                             heldout_count(config.logging.heldout_batches, config.batch.micro))
    ctx = start_run(config, sources, run_dir, local_rank, max_steps, overwrite, exclude=heldout.exclude_from)
    if ctx.rank == 0 and heldout.train_tail:  # a validation split is the usual case: nothing to say
        log.info("%s", heldout.describe())
    derived = ctx.resolved.derived
    model = build_mixmae(config.model).to(ctx.device)
    optimizer = build_optimizer(model, config.optim, derived.learning_rate, config.zero.offload_optimizer,
                                width=config.model.embed_dim, zero_stage=config.zero.stage)
    spec = PipelineSpec(mode="pretrain", img_size=config.model.img_size, batch_size=derived.micro_batch,
                        shard_id=ctx.rank, num_shards=ctx.world, seed=seed_for(config.run.seed, ctx.rank) % 2**31,
                        num_threads=config.data.num_threads, shuffle_buffer=config.data.shuffle_buffer,
                        crop_scale=tuple(config.data.crop_scale), crop_ratio=tuple(config.data.crop_ratio),
                        hflip=config.data.hflip, interpolation=config.data.interpolation,
                        device_id=choose_decode_device(config.data.decode_device, local_rank), with_labels=False,
                        output_dtype=loader_dtype(derived.dtype), order_seed=config.run.seed)
    loader = ShardLoader(ctx.train_data, config.data.train_split, spec, config.data.loader, config.data.num_threads)
    snapshots = (snapshot_factory(config, ctx.root, ctx.rank, ctx.device, heldout.mixture)
                 if snapshot_factory and config.logging.visualize_every_steps else None)
    job = PretrainJob(config, heldout, snapshots)
    job.compiled_blocks = compile_model(model, ctx)
    loop = TrainingLoop(ctx, model, optimizer, loader, job)
    summary = loop.run()
    heldout_end = heldout_loss(loop.engine, config, heldout, ctx.device, derived.dtype)
    start = job.heldout_start
    summary.update({"heldout_loss_start": start.loss, "heldout_loss_end": heldout_end.loss,
                    "heldout_images": heldout_end.images, "heldout_not_measured": heldout_end.reason,
                    "heldout_set": heldout.summary(),
                    "train_flops_per_image": job.flops_per_image, "derived": asdict(derived)})
    if summary["images_per_s"] and job.peak_flops:
        summary["mfu"] = summary["images_per_s"] * job.flops_per_image / (job.peak_flops * ctx.world)
    summary["loss_scale"] = fp16_loss_scale(loop.engine) if derived.dtype == "fp16" else None
    if ctx.rank == 0:
        if heldout_end.loss is None:
            log.warning("held-out reconstruction loss: %s", heldout_end.text())
        else:
            log.info("held-out reconstruction loss: %s at step 0 -> %s at step %d", start.text(), heldout_end.text(),
                     summary["steps"])
        write_text(ctx.root / "summary.json", json.dumps(
            summary, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v)))
    return summary
