"""The training loop every job shares: set-up, resume, steps, logging, checkpoints.

Pretraining and fine-tuning differ in their model, optimizer groups, batch -> loss and what happens
between steps (evaluation, reconstruction grids): a `Job` supplies those. This module owns the rest and
calls the policies that live in their own modules at the few points where they act:

- engine/checkpointing/: the resume plan (rank 0's, broadcast: which tag, which layout) and the checkpointer,
  which decides when to save and what a checkpoint holds;
- engine/config_agreement.py: the configuration every rank must share;
- engine/faults.py: non-finite losses and gradients (skipped, counted, a stop with a checkpoint past
  `faults.nonfinite_skip_limit`);
- engine/preemption.py: SIGTERM/SIGUSR1 or a vanished launcher -> a checkpoint at the next step boundary and
  exit 0; engine/rng.py: every generator a step draws from.

Guarantees: a resume on the same layout reproduces the uninterrupted run exactly (weights, optimizer,
schedule, each rank's data position and generators, the job's own state); `metrics.csv` and the job's
logs keep one row per step through crashes. Every decision that must agree across ranks is all-reduced
or broadcast first, so no rank waits alone in a collective.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from mixmae_scale.atomic_file import write_text
from mixmae_scale.config import ResolvedConfig, resolve
from mixmae_scale.config.deepspeed_config import engine_config
from mixmae_scale.config.precision import log_choice
from mixmae_scale.config.schema import Config
from mixmae_scale.data.loader import Batch, ShardLoader
from mixmae_scale.data.shard_sets import ShardMixture, training_mixture
from mixmae_scale.engine import distributed, faults, run_folder, run_record
from mixmae_scale.engine.checkpointing import store
from mixmae_scale.engine.checkpointing.checkpointer import Checkpointer
from mixmae_scale.engine.checkpointing.resume import ResumePlan, plan_resume
from mixmae_scale.engine.checkpointing.state import RankPosition, RunIdentity
from mixmae_scale.engine.checkpointing.universal import optimizer_layout
from mixmae_scale.engine.config_agreement import agree_on_configuration
from mixmae_scale.engine.distributed import seed_for
from mixmae_scale.engine.monitor import (
    MetricsLog,
    Throughput,
    drop_rows_after,
    format_eta,
    peak_memory_mib,
    reset_peak_memory,
)
from mixmae_scale.engine.preemption import StopFlag, report_stop
from mixmae_scale.models.regional_compile import maybe_compile

log = logging.getLogger("mixmae.loop")


class RunAlreadyComplete(RuntimeError):
    """The newest checkpoint is at the run's last step: nothing to train, nothing to rewrite."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"already complete at step {step} ({checkpoint}); nothing to do")
        self.step, self.checkpoint = step, checkpoint


@dataclass
class RunContext:
    """What a job knows once the process group is up and the configuration is resolved for it."""

    config: Config
    resolved: ResolvedConfig
    rank: int
    world: int
    local_rank: int
    device: torch.device
    root: Path
    train_data: ShardMixture
    ds_config: dict[str, Any]
    layout: dict[str, Any]
    resume: ResumePlan | None
    stop: StopFlag
    last_step: int

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"


def start_run(config: Config, sources: list[str], run_dir: Path, local_rank: int, max_steps: int | None = None,
              overwrite: bool = False, exclude: Callable[[ShardMixture], ShardMixture] | None = None) -> RunContext:
    """Process group, configuration resolved for the real world size and data, the run folder, the resume plan.
    `exclude` takes samples out of the training data (pretraining's held-out tail, data/heldout.py).

    Nothing in the run folder is written before the plan is made: another run's folder is refused unless
    `overwrite` moves that run aside (engine/run_folder.py), an incompatible checkpoint is refused and a finished
    run is reported (`RunAlreadyComplete`) with its files as they were."""
    stop = StopFlag()  # first: a signal during start-up waits for the first step boundary
    rank, world, device = distributed.init(local_rank)
    train_data = training_mixture(config.data.shards, config.data.train_split,
                                  [(s.shards, s.weight, s.split) for s in config.data.sources])
    if exclude is not None:
        train_data = exclude(train_data)
    resolved = resolve(config, sources, world_size=world, train_samples=train_data.expected_samples)
    root = Path(run_dir)
    ds_config = engine_config(resolved, root)
    layout = optimizer_layout(ds_config)
    agree_on_configuration(resolved, ds_config, layout)
    folder_note = run_folder.agree_on_run_folder(root, config.checkpoint.resume, overwrite)
    if folder_note and rank == 0:
        log.warning("%s", folder_note)
    plan = plan_resume(root / "checkpoints", resolved, layout)
    derived = resolved.derived
    last_step = min(derived.total_steps, max_steps) if max_steps else derived.total_steps
    if plan is not None and plan.finishes_by(last_step):
        raise RunAlreadyComplete(plan.step, root / "checkpoints" / plan.tag)
    if plan is not None:
        ds_config = plan.deepspeed_config(ds_config)
    if rank == 0:
        log_choice(log, derived.dtype, derived.dtype_reason, derived.dtype_warning)
        if len(train_data.sets) > 1:
            log.info("training mixture: %s", ", ".join(f"{name} {share:.1%}" for name, share in train_data.shares()))
        (root / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_text(root / "config.yaml", yaml.safe_dump({**resolved.to_dict(), "deepspeed_config": ds_config},
                                                        sort_keys=False))
    dist.barrier()
    seed = seed_for(config.run.seed, rank)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    return RunContext(config, resolved, rank, world, local_rank, device, root, train_data, ds_config, layout, plan,
                      stop, last_step)


def compile_model(model: torch.nn.Module, ctx: RunContext) -> int:
    """Regional compilation as `model.compile` resolved (see models/regional_compile.py), said once; returns
    the number of compiled blocks. Before DeepSpeed wraps the model, so its hooks stay outside the graphs."""
    derived = ctx.resolved.derived
    compiled = maybe_compile(model, derived.compile, ctx.device, derived.compile_whole)
    if ctx.rank == 0:
        setting = ctx.config.model.compile
        if compiled and derived.compile_whole:
            log.info("model.compile=whole: the whole forward and loss compiled on first use")
            return compiled
        log.info("model.compile=%s: %s", setting, f"{compiled} blocks compiled on first use" if compiled
                 else "eager blocks" + (" (auto compiles on GPUs only)" if setting == "auto" else ""))
    return compiled


class Job:
    """What a job adds to the shared loop. The defaults do nothing."""

    compiled_blocks = 0  # set by the job's entry point: the first step's time then includes compiling

    def loss(self, loop: TrainingLoop, batch: Batch, step: int, micro: int) -> torch.Tensor:
        raise NotImplementedError

    def on_start(self, loop: TrainingLoop) -> None:
        """After set-up and resume, before the first step (every rank)."""

    def after_step(self, loop: TrainingLoop, step: int, last: bool) -> None:
        """After each optimizer step (every rank): evaluation, pictures."""

    def state(self) -> dict[str, Any]:
        """Saved with the checkpoint's client state (the same on every rank)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass

    def truncate_logs(self, step: int) -> None:
        """Rank 0, on resume: drop the job's own log lines written after `step`."""


class TrainingLoop:
    def __init__(self, ctx: RunContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loader: ShardLoader, job: Job) -> None:
        import deepspeed

        self.ctx, self.loader, self.job = ctx, loader, job
        self.config, self.derived = ctx.config, ctx.resolved.derived
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=ctx.ds_config)
        self.step = 0
        self.checkpointer = Checkpointer(self.engine, ctx.checkpoints, self.config.checkpoint,
                                         RunIdentity.of(ctx.resolved, ctx.layout), ctx.world, ctx.rank, job, loader)
        self.guard = faults.NonFiniteGuard(self.config.faults.nonfinite_skip_limit)
        self.rates: list[float] = []
        self.stopped_by_signal = False
        if ctx.resume is not None:
            self._resume(ctx.resume)
        elif ctx.rank == 0:  # a start from step 0: rows a run left before its first checkpoint are not this run's
            drop_rows_after(ctx.root / "metrics.csv", 0)
            job.truncate_logs(0)
        self.record, self.wandb = self._open_records()

    def _open_records(self) -> tuple[run_record.RunRecord | None, Any]:
        """run.json (engine/run_record.py) and, with logging.wandb, the W&B run (engine/wandb_sink.py): rank 0's."""
        devices = run_record.gather_device_names(self.ctx.device)  # collective
        if self.ctx.rank != 0:
            return None, None
        record = run_record.RunRecord.begin(self.ctx, self.ctx.resolved.job(), self.step, devices)
        settings = self.config.logging.wandb
        if settings.mode == "off":
            return record, None
        from mixmae_scale.engine.wandb_sink import WandbSink

        sink = WandbSink.open(settings, self.ctx.root, self.ctx.root.name, self.ctx.resolved.to_dict())
        sink.log_record(record.path)
        return record, sink

    def _close_records(self, summary: dict[str, Any]) -> None:
        if self.record is not None:
            self.record.finish(summary)
        if self.wandb is not None:
            self.wandb.log_record(self.record.path)
            self.wandb.finish()

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def last_saved(self) -> Path | None:
        return self.checkpointer.last_saved

    @property
    def skipped_samples(self) -> int:
        return self.checkpointer.skipped_samples

    def _resume(self, plan: ResumePlan) -> None:
        """The checkpointer loads the plan's checkpoint; the logs written after its step go (rank 0)."""
        self.step = self.checkpointer.resume(plan)
        if self.ctx.rank == 0:
            drop_rows_after(self.ctx.root / "metrics.csv", self.step)
            self.job.truncate_logs(self.step)

    def save(self, at_step: int, directory: Path | None = None, keep: int | None = None) -> Path:
        """Collective: a checkpoint outside the checkpointer's schedule (fine-tuning's best one, in best/)."""
        return self.checkpointer.save(at_step, directory, keep)

    def _stop_nonfinite(self, boundary: RankPosition) -> None:
        """Past the limit: a checkpoint under a new tag holding the step's start, and where the data now stands."""
        self.checkpointer.save_nonfinite_stop(self.step, boundary)
        guard, policy = self.guard, self.config.faults.on_nonfinite_stop
        raise faults.NonFiniteStop(
            f"{guard.in_a_row} non-finite attempts in a row at step {self.step} (faults.nonfinite_skip_limit="
            f"{guard.limit}; {guard.losses} losses and {guard.gradients} gradient steps skipped in this run); "
            f"{self.last_saved} holds the state. Run the same command again to resume: "
            f"faults.on_nonfinite_stop={policy} " + {
                "rollback": "goes back to the checkpoint before it and skips the data read since",
                "skip": "keeps these weights and skips the failed attempts' data",
                "replay": "replays this step's data"}[policy])

    def _stop_for_signal(self, saved: Path) -> None:
        self.stopped_by_signal = True
        if self.ctx.local_rank == 0:  # each node's relay reads its own node's report
            report_stop(saved, self.step)
        if self.ctx.rank == 0:
            log.warning("stop requested: checkpoint %s written at step %d, exiting", saved, self.step)

    def run(self) -> dict[str, Any]:
        config, derived, rank = self.config, self.derived, self.ctx.rank
        last_step = self.ctx.last_step
        metrics = MetricsLog(self.ctx.root / "metrics.csv", getattr(self.engine, "monitor", None), self.wandb) \
            if rank == 0 else None
        self.job.on_start(self)

        def micro_batches():
            while True:
                yield from self.loader

        stream = micro_batches()
        window, stop, guard = Throughput(), self.ctx.stop, self.guard
        fp16 = derived.dtype == "fp16"
        # The running loss stays on the device; it is read once per logging interval.
        loss_sum, loss_count = torch.zeros((), device=self.device), 0
        run_start = time.perf_counter()
        reset_peak_memory()
        self.engine.train()
        while self.step < last_step:
            boundary = self.checkpointer.step_start()
            micro, stop_now = 0, False
            step_start = time.perf_counter()
            while micro < derived.accumulation:
                wait_start = time.perf_counter()
                batch = next(stream)
                waited = time.perf_counter() - wait_start
                window.data_wait += waited
                if waited > config.faults.data_stall_s:
                    log.warning("rank %d waited %.0f s for a batch (faults.data_stall_s=%.0f)", rank, waited,
                                config.faults.data_stall_s)
                loss = faults.inject(self.job.loss(self, batch, self.step, micro), self.loader.batches_consumed - 1,
                                     config.faults)
                last_micro = micro == derived.accumulation - 1
                nonfinite, stop_votes = step_decision(loss, last_micro and stop.requested())
                if nonfinite:
                    del loss, batch  # the graph goes now, not when the next forward has doubled the activations
                    guard.loss_skipped()
                    if rank == 0:
                        log.warning("non-finite loss at step %d (%d in a row): micro-batch skipped", self.step,
                                    guard.in_a_row)
                    if guard.exhausted:
                        self._stop_nonfinite(boundary)
                    continue
                stop_now = stop_votes > 0
                self.engine.backward(loss)
                self.engine.step()
                loss_sum += loss.detach().float()
                loss_count += 1
                window.images += batch.images.shape[0]
                del loss, batch
                micro += 1
            if not self.engine.was_step_applied():  # DeepSpeed found the gradients non-finite and skipped the update
                guard.step_not_applied(fp16)
                if rank == 0 and not fp16:
                    log.warning("non-finite gradients at step %d (%d in a row): update skipped, the step is redone "
                                "with the next data", self.step, guard.in_a_row)
                if guard.exhausted:
                    self._stop_nonfinite(boundary)
                if stop_now:  # the step is not done: save the state as it is, without logging the step again
                    self._stop_for_signal(self.checkpointer.maybe_save(self.step, stop=True))
                    break
                continue
            guard.succeeded()
            self.step += 1
            if self.step == 1 and rank == 0 and self.job.compiled_blocks:
                log.info("first step took %.1f s, compiling %d block(s) included", time.perf_counter() - step_start,
                         self.job.compiled_blocks)
            if config.faults.inject_exception_at == [rank, self.step]:
                raise RuntimeError(f"injected fault on rank {rank} after step {self.step} (faults.inject_exception_at)")
            if self.step % config.logging.every_steps == 0 or self.step == last_step:
                self._log(metrics, window, loss_sum, loss_count, last_step, run_start)
                window.reset()
                loss_sum.zero_()
                loss_count = 0
            self.job.after_step(self, self.step, self.step == last_step)
            self.checkpointer.maybe_save(self.step, last=self.step == last_step, stop=stop_now)
            if stop_now:
                self._stop_for_signal(self.last_saved)
                break
        if metrics is not None:
            metrics.close()
        peak = [0.0] * self.ctx.world
        dist.all_gather_object(peak, peak_memory_mib())
        steady = self.rates[1:] or self.rates
        summary = {"steps": self.step, "optimizer_steps": int(self.engine.global_steps), "planned_steps": last_step,
                "stopped_by_signal": self.stopped_by_signal,
                "images_seen": self.step * derived.global_batch, **guard.summary(),
                "skipped_samples_after_nonfinite": self.skipped_samples,
                "images_per_s": sum(steady) / len(steady) if steady else None, "peak_mem_mib_per_rank": peak,
                "wall_s": time.perf_counter() - run_start,
                "checkpoint": str(saved) if (saved := store.existing(self.last_saved)) else None,
                "dtype": derived.dtype, "dtype_reason": derived.dtype_reason}
        self._close_records(summary)
        return summary

    def _log(self, metrics: MetricsLog | None, window: Throughput, loss_sum: torch.Tensor, loss_count: int,
             last_step: int, run_start: float) -> None:
        derived, step = self.derived, self.step
        rate, wait_frac = window.window()
        totals = torch.stack([loss_sum.detach().double(), loss_sum.new_full((), loss_count, dtype=torch.float64),
                              loss_sum.new_full((), rate, dtype=torch.float64)])
        dist.all_reduce(totals)
        total_loss, total_count, global_rate = totals.tolist()  # one read per logging interval
        mean_loss = total_loss / max(total_count, 1)
        self.rates.append(global_rate)
        if metrics is None:
            return
        flops = getattr(self.job, "flops_per_image", None)
        peak = getattr(self.job, "peak_flops", None)
        mfu = global_rate * flops / (peak * self.ctx.world) if flops and peak else None
        eta = (last_step - step) * derived.global_batch / max(global_rate, 1e-9)
        grad_norm = self.engine.get_global_grad_norm()
        row = {"step": step, "epoch": step / derived.steps_per_epoch, "images_seen": step * derived.global_batch,
               "loss": mean_loss, "lr": self.scheduler.get_last_lr()[-1],
               "grad_norm": float(grad_norm) if grad_norm is not None else None, "images_per_s": global_rate,
               "mfu": mfu, "data_wait_frac": wait_frac, "peak_mem_mib": peak_memory_mib(),
               "elapsed_s": time.perf_counter() - run_start,
               "loss_scale": fp16_loss_scale(self.engine) if derived.dtype == "fp16" else None}
        metrics.write(row)
        grad_text = f"{row['grad_norm']:.3f}" if row["grad_norm"] is not None else "n/a"
        log.info("step %d/%d  epoch %.2f  loss %.4f  lr %.2e  grad %s  %.0f img/s  MFU %s  data %.0f%%  mem %.0f MiB"
                 "  ETA %s", step, last_step, row["epoch"], mean_loss, row["lr"], grad_text, global_rate,
                 f"{mfu:.1%}" if mfu else "n/a", 100 * wait_frac, row["peak_mem_mib"], format_eta(eta))


def step_decision(loss: torch.Tensor, stop_requested: bool) -> tuple[int, int]:
    """(ranks whose loss is non-finite, ranks asking to stop), agreed by every rank: the one host read of a
    micro-step. Both flags are made on the loss's device and reduced in a single collective.

    The read comes before the backward because a non-finite micro-batch must be kept out of the gradients:
    none of DeepSpeed's engines (ZeRO 0-3, fp32/bf16/fp16) can take one out of an accumulated gradient
    afterwards. With accumulation 1 (the at-scale profiles) that is one read per optimizer step for the
    loss's finiteness and the stop flag together; the running loss is read only when logged."""
    flags = torch.stack([(~torch.isfinite(loss.detach())).to(torch.float32),
                         loss.new_full((), float(stop_requested), dtype=torch.float32)])
    dist.all_reduce(flags)  # on the loss's device: NCCL's on GPUs, gloo's on CPUs (engine/distributed.py)
    nonfinite, stop_votes = flags.tolist()
    return int(nonfinite), int(stop_votes)


def fp16_loss_scale(engine) -> float | None:
    """DeepSpeed's dynamic loss scale: `loss_scale` on the ZeRO optimizers, `cur_scale` on the stage-0 one."""
    optimizer = engine.optimizer
    scale = getattr(optimizer, "loss_scale", None) or getattr(optimizer, "cur_scale", None)
    return float(scale) if scale is not None else None
