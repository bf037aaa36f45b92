"""The pretraining job: shards -> DALI batches -> MixMAE -> loss -> DeepSpeed step -> checkpoint.

Runs under the `deepspeed` launcher or torchrun (one process per GPU, or per CPU rank here). Every
decision that must agree across ranks (skip a non-finite step, stop on a signal) is all-reduced
first, so no rank is ever left waiting in a collective.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from mixmae_scale.atomic_file import write_text
from mixmae_scale.config import resolve
from mixmae_scale.config.deepspeed_config import engine_config
from mixmae_scale.config.precision import log_choice
from mixmae_scale.config.schema import Config
from mixmae_scale.data.loader import ShardLoader, choose_decode_device
from mixmae_scale.data.manifest import load_split
from mixmae_scale.data.spec import PipelineSpec
from mixmae_scale.engine import checkpoint as ckpt
from mixmae_scale.engine import distributed
from mixmae_scale.engine.distributed import all_reduce_scalar, autocast, seed_for
from mixmae_scale.engine.monitor import (
    MetricsLog,
    Throughput,
    device_peak_flops,
    format_eta,
    peak_memory_mib,
    reset_peak_memory,
)
from mixmae_scale.engine.optimizer import build_optimizer
from mixmae_scale.models.flops import model_report
from mixmae_scale.models.mixmae import build_mixmae

log = logging.getLogger("mixmae.pretrain")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; the last good state was checkpointed."""


@dataclass
class RunPaths:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"


def heldout_loss(engine, config: Config, device: torch.device, shards_dir: str, dtype: str) -> float:
    """Reconstruction loss on the first validation batches with fixed masks: comparable across steps
    and runs. Every rank scores the same batches (ZeRO-3 forwards are collective)."""
    spec = PipelineSpec(mode="eval", img_size=config.model.img_size, batch_size=config.batch.micro,
                        num_threads=config.data.num_threads, seed=config.run.seed)
    loader = ShardLoader(shards_dir, config.data.val_split, spec, config.data.loader, config.data.num_threads)
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
    return total / max(count, 1)


class ReconstructionSnapshots:
    """The reconstruction grid of fixed validation images and a fixed mask, as PNG files in the run
    folder and images in TensorBoard. Every rank runs the forward (ZeRO-3 gathers weights collectively);
    rank 0 writes."""

    def __init__(self, config: Config, root: Path, rank: int, device: torch.device) -> None:
        from mixmae_scale.visualize.reconstruction import first_images

        self.images = first_images(config.data.shards, config.data.val_split, 8, config.model.img_size,
                                   config.data.loader).to(device)
        self.seed, self.rank, self.folder = config.run.seed, rank, root / "reconstructions"
        self.writer = None
        if rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            if config.logging.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(root / "tensorboard" / "reconstructions"))

    def write(self, model, step: int) -> None:
        from mixmae_scale.visualize.reconstruction import grid, reconstruct, save_png

        was_training = model.training
        model.eval()
        mask = model.sample_mask(torch.Generator().manual_seed(seed_for(self.seed, 777)), self.images.device)
        picture = grid(reconstruct(model, self.images, mask))
        model.train(was_training)
        if self.rank == 0:
            save_png(picture, self.folder / f"step{step:08d}.png")
            if self.writer is not None:
                self.writer.add_image("reconstruction", picture, step, dataformats="HWC")
                self.writer.flush()


def fp16_loss_scale(engine) -> float | None:
    """DeepSpeed's dynamic loss scale: `loss_scale` on the ZeRO optimizers, `cur_scale` on the stage-0 one."""
    optimizer = engine.optimizer
    scale = getattr(optimizer, "loss_scale", None) or getattr(optimizer, "cur_scale", None)
    return float(scale) if scale is not None else None


class _StopFlag:
    """SIGTERM/SIGUSR1 (preemption) ask for a checkpoint and a clean exit at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum


def pretrain(config: Config, sources: list[str], run_dir: Path, max_steps: int | None = None,
             local_rank: int = 0) -> dict[str, Any]:
    import deepspeed

    rank, world, device = distributed.init(local_rank)
    train_shards = load_split(config.data.shards, config.data.train_split, world)
    resolved = resolve(config, sources, world_size=world, train_samples=train_shards.samples)
    derived = resolved.derived
    paths = RunPaths(Path(run_dir))
    ds_config = engine_config(resolved, paths.root)
    layout = ckpt.optimizer_layout(ds_config)
    # Refuse an incompatible resume before anything in the run directory is touched.
    tag = ckpt.find_resume(paths.checkpoints, config.checkpoint.resume)
    if tag is not None:
        ckpt.check_compatible(paths.checkpoints, tag, resolved.model_digest(), world, layout)
    if rank == 0:
        log_choice(log, derived.dtype, derived.dtype_reason, derived.dtype_warning)
        paths.checkpoints.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump({**resolved.to_dict(), "deepspeed_config": ds_config}, sort_keys=False)
        write_text(paths.root / "config.yaml", text)
    dist.barrier()

    torch.manual_seed(seed_for(config.run.seed, rank))
    model = build_mixmae(config.model).to(device)
    optimizer = build_optimizer(model, config.optim, derived.learning_rate)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    device_id = choose_decode_device(config.data.decode_device, local_rank)
    spec = PipelineSpec(mode="pretrain", img_size=config.model.img_size, batch_size=config.batch.micro,
                        shard_id=rank, num_shards=world, seed=seed_for(config.run.seed, rank) % 2**31,
                        num_threads=config.data.num_threads, shuffle_buffer=config.data.shuffle_buffer,
                        crop_scale=tuple(config.data.crop_scale), crop_ratio=tuple(config.data.crop_ratio),
                        hflip=config.data.hflip, interpolation=config.data.interpolation, device_id=device_id)
    loader = ShardLoader(config.data.shards, config.data.train_split, spec, config.data.loader,
                         config.data.num_threads)

    step, heldout_start = 0, None
    if tag is not None:
        _, client = engine.load_checkpoint(str(paths.checkpoints), tag=tag)
        step, heldout_start = int(client["step"]), client.get("heldout_start")
        state = ckpt.read_rank_state(paths.checkpoints, tag, rank)
        loader.load_state_dict(state["loader"])
        ckpt.restore_rng_state(state["rng"])
        if rank == 0:
            log.info("resumed from %s at step %d", paths.checkpoints / tag, step)
    if heldout_start is None:
        heldout_start = heldout_loss(engine, config, device, config.data.shards, derived.dtype)
        if rank == 0:
            log.info("held-out reconstruction loss at step 0: %.4f", heldout_start)

    last_step = min(derived.total_steps, max_steps) if max_steps else derived.total_steps
    flops_per_image = model_report(config.model)["train_flops_per_image"]
    peak = device_peak_flops(config.logging.peak_tflops)
    metrics = MetricsLog(paths.root / "metrics.csv", getattr(engine, "monitor", None)) if rank == 0 else None
    stop = _StopFlag()

    def save(at_step: int) -> Path:
        client = {"step": at_step, "heldout_start": heldout_start, "model_digest": resolved.model_digest(),
                  "world_size": world}
        rank_state = {"loader": loader.state_dict(), "rng": ckpt.rng_state(), "model_digest": resolved.model_digest(),
                      "optimizer_layout": layout}
        return ckpt.save(engine, paths.checkpoints, at_step, client, rank_state, config.checkpoint.keep_last)

    def micro_batches():
        while True:
            yield from loader

    stream = micro_batches()
    every_picture = config.logging.visualize_every_steps
    snapshots = ReconstructionSnapshots(config, paths.root, rank, device) if every_picture else None
    poisoned = Counter(config.faults.inject_nan_loss_at_steps)
    window = Throughput()
    loss_sum, loss_count, nonfinite_run, skipped_total = 0.0, 0, 0, 0
    run_start, rates = time.perf_counter(), []
    last_saved: Path | None = None
    reset_peak_memory()
    engine.train()
    while step < last_step:
        micro = 0
        while micro < derived.accumulation:
            wait_start = time.perf_counter()
            batch = next(stream)
            waited = time.perf_counter() - wait_start
            window.data_wait += waited
            if waited > config.faults.data_stall_s:
                log.warning("rank %d waited %.0f s for a batch (faults.data_stall_s=%.0f)", rank, waited,
                            config.faults.data_stall_s)
            # fp32: the model casts its encoder input to its weights' dtype and makes the target from these.
            images = batch.images.to(device, non_blocking=True)
            generator = torch.Generator().manual_seed(seed_for(config.run.seed, rank, step, micro))
            mask = engine.module.sample_mask(generator, device)
            with autocast(device, derived.dtype):
                loss = engine(images, mask=mask).loss
            if poisoned[step] > 0:  # fault injection for tests: one more poisoned attempt at this step
                poisoned[step] -= 1
                loss = loss * float("nan")
            value = float(loss.detach())  # one host sync serves the finite check and the running mean
            if all_reduce_scalar(float(math.isfinite(value)), dist.ReduceOp.MIN) < 1:
                nonfinite_run += 1
                skipped_total += 1
                if rank == 0:
                    log.warning("non-finite loss at step %d (%d in a row): batch skipped", step, nonfinite_run)
                if nonfinite_run > config.faults.nonfinite_skip_limit:
                    last_saved = save(step)
                    raise NonFiniteLossError(
                        f"{nonfinite_run} non-finite losses in a row at step {step} (faults.nonfinite_skip_limit="
                        f"{config.faults.nonfinite_skip_limit}); the last good state is in {last_saved}. Lower the "
                        "learning rate or check the data, then resume")
                continue
            nonfinite_run = 0
            engine.backward(loss)
            engine.step()
            loss_sum += value
            loss_count += 1
            window.images += images.shape[0]
            micro += 1
        step += 1
        if step % config.logging.every_steps == 0 or step == last_step:
            rate, wait_frac = window.window()
            global_rate = all_reduce_scalar(rate)
            mean_loss = all_reduce_scalar(loss_sum) / max(all_reduce_scalar(loss_count), 1)
            rates.append(global_rate)
            if rank == 0:
                mfu = global_rate * flops_per_image / (peak * world) if peak else None
                eta = (last_step - step) * derived.global_batch / max(global_rate, 1e-9)
                grad_norm = engine.get_global_grad_norm()
                row = {"step": step, "epoch": step / derived.steps_per_epoch,
                       "images_seen": step * derived.global_batch, "loss": mean_loss,
                       "lr": scheduler.get_last_lr()[0],
                       "grad_norm": float(grad_norm) if grad_norm is not None else None,
                       "images_per_s": global_rate, "mfu": mfu, "data_wait_frac": wait_frac,
                       "peak_mem_mib": peak_memory_mib(), "elapsed_s": time.perf_counter() - run_start,
                       "loss_scale": fp16_loss_scale(engine) if derived.dtype == "fp16" else None}
                metrics.write(row)
                grad_text = f"{row['grad_norm']:.3f}" if row["grad_norm"] is not None else "n/a"
                log.info("step %d/%d  epoch %.2f  loss %.4f  lr %.2e  grad %s  %.0f img/s  MFU %s  data %.0f%%  "
                         "mem %.0f MiB  ETA %s", step, last_step, row["epoch"], mean_loss, row["lr"], grad_text,
                         global_rate, f"{mfu:.1%}" if mfu else "n/a", 100 * wait_frac, row["peak_mem_mib"],
                         format_eta(eta))
            window.reset()
            loss_sum, loss_count = 0.0, 0
        if snapshots is not None and (step % config.logging.visualize_every_steps == 0 or step == last_step):
            snapshots.write(engine.module, step)
        stop_now = all_reduce_scalar(float(stop.signal is not None), dist.ReduceOp.MAX) > 0
        at_end = step == last_step and config.checkpoint.at_end
        if step % config.checkpoint.every_steps == 0 or at_end or stop_now:
            last_saved = save(step)
        if stop_now:
            if rank == 0:
                log.warning("signal received: checkpoint %s written at step %d, exiting", last_saved, step)
            break

    heldout_end = heldout_loss(engine, config, device, config.data.shards, derived.dtype)
    peak_mem = [0.0] * world
    dist.all_gather_object(peak_mem, peak_memory_mib())
    summary = {"steps": step, "planned_steps": last_step, "stopped_by_signal": stop.signal is not None,
               "images_seen": step * derived.global_batch, "heldout_loss_start": heldout_start,
               "heldout_loss_end": heldout_end, "skipped_nonfinite": skipped_total,
               "images_per_s": sum(rates[1:]) / len(rates[1:]) if len(rates) > 1 else (rates[0] if rates else None),
               "train_flops_per_image": flops_per_image, "peak_mem_mib_per_rank": peak_mem,
               "wall_s": time.perf_counter() - run_start, "checkpoint": str(last_saved) if last_saved else None,
               "dtype": derived.dtype, "dtype_reason": derived.dtype_reason,
               "loss_scale": fp16_loss_scale(engine) if derived.dtype == "fp16" else None,
               "derived": asdict(derived)}
    if summary["images_per_s"] and peak:
        summary["mfu"] = summary["images_per_s"] * flops_per_image / (peak * world)
    if rank == 0:
        log.info("held-out reconstruction loss: %.4f at step 0 -> %.4f at step %d", heldout_start, heldout_end, step)
        write_text(paths.root / "summary.json", json.dumps(
            summary, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v)))
        metrics.close()
    return summary
