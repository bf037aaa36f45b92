"""The training loop every job shares: set-up, resume, steps, faults, signals, logging, checkpoints.

Pretraining and fine-tuning differ in their model, optimizer groups, batch -> loss and what happens
between steps (evaluation, reconstruction grids): a `Job` supplies those. This module owns the rest,
so both jobs get the same guarantees:

- exact resume: weights, optimizer and scheduler (DeepSpeed's checkpoint), each rank's loader position
  and RNGs (torch, CUDA, Python's `random`, NumPy's global generator: timm's mixup and random erasing
  draw from the last two), and the job's own state;
- SIGTERM or SIGUSR1 (preemption) saves a checkpoint at the next step boundary and the job exits 0;
- a non-finite loss is skipped on every rank alike, up to `faults.nonfinite_skip_limit` in a row;
  past that the state at the start of the step (an accumulation boundary: the micro-batches this step
  already consumed are replayed on resume) is saved and the run stops;
- `metrics.csv` (and the job's own logs) keep one row per step through crashes: on resume, rows past
  the resumed step are dropped.

Every decision that must agree across ranks is all-reduced first, so no rank waits alone in a collective.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from collections import Counter
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
from mixmae_scale.data.manifest import SplitShards, load_split
from mixmae_scale.engine import checkpoint as ckpt
from mixmae_scale.engine import distributed
from mixmae_scale.engine.distributed import seed_for
from mixmae_scale.engine.monitor import (
    MetricsLog,
    Throughput,
    drop_rows_after,
    format_eta,
    peak_memory_mib,
    reset_peak_memory,
)
from mixmae_scale.models.regional_compile import maybe_compile

log = logging.getLogger("mixmae.loop")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; the last good state was checkpointed."""


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
    train_split: SplitShards
    ds_config: dict[str, Any]
    layout: dict[str, Any]
    resume_tag: str | None

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"


def start_run(config: Config, sources: list[str], run_dir: Path, local_rank: int) -> RunContext:
    """Process group, configuration resolved for the real world size and data, and the run folder.

    An incompatible checkpoint is refused before anything in the run folder is touched."""
    rank, world, device = distributed.init(local_rank)
    train_split = load_split(config.data.shards, config.data.train_split, world)
    resolved = resolve(config, sources, world_size=world, train_samples=train_split.samples)
    root = Path(run_dir)
    ds_config = engine_config(resolved, root)
    layout = ckpt.optimizer_layout(ds_config)
    tag = ckpt.find_resume(root / "checkpoints", config.checkpoint.resume)
    if tag is not None:
        ckpt.check_compatible(root / "checkpoints", tag, resolved.model_digest(), world, layout)
    derived = resolved.derived
    if rank == 0:
        log_choice(log, derived.dtype, derived.dtype_reason, derived.dtype_warning)
        if len(train_split.tars) < world:  # said once, by rank 0, not by every rank and every loader
            log.warning("split '%s' has %d shard(s) for %d ranks: ranks read parts of the same files; more, smaller "
                        "shards spread the I/O better", config.data.train_split, len(train_split.tars), world)
        (root / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_text(root / "config.yaml", yaml.safe_dump({**resolved.to_dict(), "deepspeed_config": ds_config},
                                                        sort_keys=False))
    dist.barrier()
    seed = seed_for(config.run.seed, rank)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    return RunContext(config, resolved, rank, world, local_rank, device, root, train_split, ds_config, layout, tag)


def compile_model(model: torch.nn.Module, ctx: RunContext) -> int:
    """Regional compilation as `model.compile` resolved (see models/regional_compile.py), said once; returns
    the number of compiled blocks. Before DeepSpeed wraps the model, so its hooks stay outside the graphs."""
    compiled = maybe_compile(model, ctx.resolved.derived.compile, ctx.device)
    if ctx.rank == 0:
        setting = ctx.config.model.compile
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


class _StopFlag:
    """SIGTERM/SIGUSR1 ask for a checkpoint and a clean exit at the next step boundary, and so does the
    death of the launcher that started this rank: DeepSpeed's `deepspeed` runner dies of SIGTERM or SIGUSR1
    without telling the ranks (see cluster/signal_relay.py), which would otherwise train on, orphaned."""

    LAUNCHERS = ("deepspeed", "torchrun", "signal_relay", "mixmae launch")

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        self.launchers = _launcher_ancestors(self.LAUNCHERS)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def requested(self) -> bool:
        if self.signal is None and any(not _alive(pid, born) for pid, born in self.launchers):
            log.warning("the launcher that started this rank is gone: saving a checkpoint and exiting")
            self.signal = signal.SIGHUP
        return self.signal is not None


def _launcher_ancestors(markers: tuple[str, ...], levels: int = 3) -> list[tuple[int, float]]:
    import psutil

    found, process = [], psutil.Process().parent()
    for _ in range(levels):
        if process is None:
            break
        try:
            if any(m in " ".join(process.cmdline()) for m in markers):
                found.append((process.pid, process.create_time()))
            process = process.parent()
        except psutil.Error:
            break
    return found


def _alive(pid: int, born: float) -> bool:
    import psutil

    try:
        process = psutil.Process(pid)
        return process.create_time() == born and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def rng_state() -> dict[str, Any]:
    """Every generator a step draws from, on this rank."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    return {"torch": ckpt.rng_state(), "python": repr(random.getstate()), "numpy": numpy_state}


def restore_rng(state: dict[str, Any] | str) -> None:
    if isinstance(state, str):  # checkpoints written before Python and NumPy states were kept
        ckpt.restore_rng_state(state)
        return
    ckpt.restore_rng_state(state["torch"])
    random.setstate(_literal_tuple(state["python"]))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": np.array(numpy_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(numpy_state)


def _literal_tuple(text: str) -> tuple:
    import ast

    return ast.literal_eval(text)


class TrainingLoop:
    def __init__(self, ctx: RunContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loader: ShardLoader, job: Job) -> None:
        import deepspeed

        self.ctx, self.loader, self.job = ctx, loader, job
        self.config, self.derived = ctx.config, ctx.resolved.derived
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=ctx.ds_config)
        self.step = 0
        self.last_saved: Path | None = None
        self.skipped_nonfinite = 0
        self.rates: list[float] = []
        self.stopped_by_signal = False
        if ctx.resume_tag is not None:
            self._resume(ctx.resume_tag)

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def _resume(self, tag: str) -> None:
        _, client = self.engine.load_checkpoint(str(self.ctx.checkpoints), tag=tag)
        self.step = int(client["step"])
        self.job.load_state(client.get("job", client))
        state = ckpt.read_rank_state(self.ctx.checkpoints, tag, self.ctx.rank)
        self.loader.load_state_dict(state["loader"])
        restore_rng(state["rng"])
        if self.ctx.rank == 0:
            drop_rows_after(self.ctx.root / "metrics.csv", self.step)
            self.job.truncate_logs(self.step)
            log.info("resumed from %s at step %d", self.ctx.checkpoints / tag, self.step)

    def save(self, at_step: int, directory: Path | None = None, keep: int | None = None,
             boundary: dict[str, Any] | None = None) -> Path:
        """Collective. `boundary`: the loader and RNG states from the start of the step, when the step is
        abandoned half-way (its consumed micro-batches are then replayed on resume)."""
        ctx = self.ctx
        client = {"step": at_step, "job": self.job.state(), "model_digest": ctx.resolved.model_digest(),
                  "world_size": ctx.world}
        rank_state = {**(boundary or {"loader": self.loader.state_dict(), "rng": rng_state()}),
                      "model_digest": ctx.resolved.model_digest(), "optimizer_layout": ctx.layout}
        return ckpt.save(self.engine, directory or ctx.checkpoints, at_step, client, rank_state,
                         keep or self.config.checkpoint.keep_last)

    def run(self, max_steps: int | None = None) -> dict[str, Any]:
        config, derived, rank = self.config, self.derived, self.ctx.rank
        last_step = min(derived.total_steps, max_steps) if max_steps else derived.total_steps
        metrics = MetricsLog(self.ctx.root / "metrics.csv", getattr(self.engine, "monitor", None)) if rank == 0 \
            else None
        self.job.on_start(self)

        def micro_batches():
            while True:
                yield from self.loader

        stream = micro_batches()
        poisoned = Counter(config.faults.inject_nan_loss_at_steps)
        window, stop = Throughput(), _StopFlag()
        # The running loss stays on the device; it is read once per logging interval.
        loss_sum, loss_count, nonfinite_run = torch.zeros((), device=self.device), 0, 0
        run_start = time.perf_counter()
        reset_peak_memory()
        self.engine.train()
        while self.step < last_step:
            boundary = ({"loader": self.loader.state_dict(), "rng": rng_state()} if derived.accumulation > 1
                        else None)
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
                loss = self.job.loss(self, batch, self.step, micro)
                if poisoned[self.step] > 0:  # fault injection for tests: one more poisoned attempt at this step
                    poisoned[self.step] -= 1
                    loss = loss * float("nan")
                last_micro = micro == derived.accumulation - 1
                nonfinite, stop_votes = step_decision(loss, last_micro and stop.requested())
                if nonfinite:
                    nonfinite_run += 1
                    self.skipped_nonfinite += 1
                    if rank == 0:
                        log.warning("non-finite loss at step %d (%d in a row): batch skipped", self.step,
                                    nonfinite_run)
                    if nonfinite_run > config.faults.nonfinite_skip_limit:
                        self.last_saved = self.save(self.step, boundary=boundary)
                        raise NonFiniteLossError(
                            f"{nonfinite_run} non-finite losses in a row at step {self.step} "
                            f"(faults.nonfinite_skip_limit={config.faults.nonfinite_skip_limit}); the last good "
                            f"state is in {self.last_saved}. Lower the learning rate or check the data, then resume")
                    continue
                nonfinite_run = 0
                stop_now = stop_votes > 0
                self.engine.backward(loss)
                self.engine.step()
                loss_sum += loss.detach().float()
                loss_count += 1
                window.images += batch.images.shape[0]
                micro += 1
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
            at_end = self.step == last_step and config.checkpoint.at_end
            if self.step % config.checkpoint.every_steps == 0 or at_end or stop_now:
                self.last_saved = self.save(self.step)
            if stop_now:
                self.stopped_by_signal = True
                if rank == 0:
                    log.warning("signal received: checkpoint %s written at step %d, exiting", self.last_saved,
                                self.step)
                break
        if metrics is not None:
            metrics.close()
        peak = [0.0] * self.ctx.world
        dist.all_gather_object(peak, peak_memory_mib())
        steady = self.rates[1:] or self.rates
        return {"steps": self.step, "optimizer_steps": int(self.engine.global_steps), "planned_steps": last_step,
                "stopped_by_signal": self.stopped_by_signal,
                "images_seen": self.step * derived.global_batch, "skipped_nonfinite": self.skipped_nonfinite,
                "images_per_s": sum(steady) / len(steady) if steady else None, "peak_mem_mib_per_rank": peak,
                "wall_s": time.perf_counter() - run_start,
                "checkpoint": str(self.last_saved) if self.last_saved else None,
                "dtype": derived.dtype, "dtype_reason": derived.dtype_reason}

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
    afterwards. With accumulation 1 (the at-scale profiles) that is one read per optimizer step, down from
    three (the loss, the finite check, the stop flag); the running loss is read only when logged."""
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
