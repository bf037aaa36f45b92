"""The training loop every job shares: set-up, resume, steps, logging, checkpoints.

Pretraining and fine-tuning differ in their model, optimizer groups, batch -> loss and what happens
between steps (evaluation, reconstruction grids): a job supplies those through the `Job` protocol
(engine/job.py). This module owns the rest: `run()` drives steps until the last one or a stop, `train_step()`
makes one attempt at an optimizer step and returns what it came to (engine/step.py's `StepOutcome`). It calls
the policies that live in their own modules at the few points where they act:

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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import yaml

from mixmae_scale.atomic_file import write_text
from mixmae_scale.config import ResolvedConfig, resolve
from mixmae_scale.config.deepspeed_config import engine_config
from mixmae_scale.config.derive import BatchSplitError
from mixmae_scale.config.precision import log_choice
from mixmae_scale.config.schema import Config
from mixmae_scale.data.errors import DataError, plural
from mixmae_scale.data.loader import Batch
from mixmae_scale.data.loaders import job_crop_scale
from mixmae_scale.data.shard_sets import ShardMixture, training_mixture
from mixmae_scale.engine import distributed, faults, run_folder, run_record
from mixmae_scale.engine.checkpointing import recipe, store
from mixmae_scale.engine.checkpointing.checkpointer import Checkpointer
from mixmae_scale.engine.checkpointing.resume import ResumePlan, plan_resume
from mixmae_scale.engine.checkpointing.state import RankPosition, RunIdentity
from mixmae_scale.engine.checkpointing.universal import optimizer_layout
from mixmae_scale.engine.config_agreement import agree_on_configuration
from mixmae_scale.engine.monitor import (
    MetricsLog,
    device_peak_flops,
    drop_rows_after,
    format_eta,
    logged_learning_rate,
    model_flops_utilization,
    peak_memory_mib,
    reset_peak_memory,
)
from mixmae_scale.engine.optimizer import last_step_learning_rate, scheduled_learning_rate
from mixmae_scale.engine.preemption import StopFlag, report_stop
from mixmae_scale.engine.rng import seed_generators
from mixmae_scale.engine.step import (
    LogWindow,
    StepOutcome,
    at_the_minimum_loss_scale,
    fp16_loss_scale,
    keep_skipping_at_the_minimum_loss_scale,
    step_decision,
)
from mixmae_scale.models.regional_compile import block_types as compiled_block_types
from mixmae_scale.models.regional_compile import maybe_compile
from mixmae_scale.seeds import stream_seed

if TYPE_CHECKING:
    from mixmae_scale.engine.job import Job

log = logging.getLogger("mixmae.loop")


class RunAlreadyComplete(RuntimeError):
    """The newest checkpoint is at or past this launch's last step: nothing to train, nothing to rewrite. Past it (a
    schedule shortened on resume, a lower --max-steps) the message says this launch's last step and where it came
    from: "already complete at step 15" alone, for a run stopped at 15 of 36 resumed with schedule.epochs mistyped,
    read as a finished run."""

    def __init__(self, step: int, checkpoint: Path, last_step: int | None = None, total_steps: int | None = None,
                 epochs: float | None = None) -> None:
        if last_step is None or step <= last_step:
            text = f"already complete at step {step} ({checkpoint}); nothing to do"
        else:
            why = (f"--max-steps {last_step}" if total_steps is not None and last_step < total_steps
                   else f"the schedule's {plural(last_step, 'step')}" + (f", schedule.epochs={epochs:g}"
                                                                          if epochs is not None else ""))
            text = (f"nothing to do: the newest checkpoint, step {step} ({checkpoint}), is past this launch's last "
                    f"step {last_step} ({why}); a longer schedule or a higher --max-steps continues it")
        super().__init__(text)
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
    heldout: dict[str, str] | None = None  # what the tags record of the images the run scores (recipe.heldout_record)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"


def start_run(config: Config, sources: list[str], run_dir: Path, local_rank: int, max_steps: int | None = None,
              overwrite: bool = False, exclude: Callable[[ShardMixture], ShardMixture] | None = None,
              job: str = "pretrain", check: Callable[[ShardMixture, int], None] | None = None,
              scores: Callable[[], dict[str, str]] | None = None) -> RunContext:
    """Process group, configuration resolved for the real world size and data, the run folder, the resume plan.
    `exclude` takes samples out of the training data (pretraining's held-out tail, data/heldout.py); `job` fills
    what the configuration leaves to the job's recipe (`data.crop_scale`), so that config.yaml says what ran.
    `check(training data, world size)`: the job's refusals of its data (a one-class set for a classifier, a
    validation split smaller than the ranks), made from the manifests before the run folder is touched, so that a
    refused run leaves no folder, lock, checkpoints/ or config.yaml behind; a training mixture some epoch of which
    gives a rank no whole micro-batch (ShardMixture.too_small) is refused there too. `scores()`: the record of the
    images the run scores but never trains on (recipe.heldout_record), after `check`: each tag keeps it, and a resume
    with other ones is said (not refused).

    Nothing in the run folder is written before the plan is made but its lock (engine/run_lock.py: a folder a live
    run holds is refused; released when the work ends, engine/runtime.py) and a file every rank reads and rank 0
    removes at once (a folder some ranks do not see is refused): another run's folder is refused unless `overwrite`
    moves that run aside (engine/run_folder.py), an incompatible checkpoint is refused and a finished run is
    reported (`RunAlreadyComplete`) with its files as they were."""
    stop = StopFlag()  # first: a signal during start-up waits for the first step boundary
    config.data.crop_scale = job_crop_scale(config, job)
    rank, world, device = distributed.init(local_rank)
    train_data = training_mixture(config.data.shards, config.data.train_split,
                                  [(s.shards, s.weight, s.split) for s in config.data.sources])
    if exclude is not None:
        train_data = exclude(train_data)
    if check is not None:
        check(train_data, world)
    heldout = scores() if scores is not None else None
    root = Path(run_dir)
    try:
        resolved = resolve(config, sources, world_size=world, train_samples=train_data.expected_samples)
    except BatchSplitError as exc:  # a resume on GPUs that cannot split its global batch: name the ones that can
        raise run_folder.unsplittable_resume(root, exc, overwrite) from None
    # The loader refuses it too (data/loader.py), but only once the folder holds this start's lock, config.yaml and
    # checkpoints/: made here, from the manifests, a refused start leaves the folder as it found it.
    too_small = train_data.too_small(config.data.train_split, world, resolved.derived.micro_batch)
    if too_small:
        raise DataError(too_small)
    ds_config = engine_config(resolved, root)
    layout = optimizer_layout(ds_config)
    agree_on_configuration(resolved, ds_config, layout)
    cleaned = run_folder.agree_on_lock(root)  # first: a second job must not read, move or write what this one does
    run_folder.agree_on_shared_folder(root)
    resume, notes = run_folder.agree_on_run_folder(root, config.checkpoint.resume, overwrite, job)
    for note in [*cleaned, *notes] if rank == 0 else []:
        log.warning("%s", note)
    derived = resolved.derived
    last_step = min(derived.total_steps, max_steps) if max_steps else derived.total_steps
    plan = plan_resume(root / "checkpoints", resolved, layout, last_step, resume=resume, data=train_data,
                       heldout=heldout)
    if plan is not None and plan.finishes_by(last_step):
        if rank == 0:  # so that a Slurm job does not requeue itself for it again (cluster/requeue.py)
            run_folder.note_complete(root, plan.step, last_step)
        raise RunAlreadyComplete(plan.step, root / "checkpoints" / plan.tag, last_step, derived.total_steps,
                                 config.schedule.epochs if plan.step > last_step else None)
    branch_note = run_folder.agree_on_branch(root, resume)  # after the plan: a refused start moves nothing
    if branch_note and rank == 0:
        log.warning("%s", branch_note)
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
    seed_generators(stream_seed(config.run.seed, rank, bits=63))
    return RunContext(config, resolved, rank, world, local_rank, device, root, train_data, ds_config, layout, plan,
                      stop, last_step, heldout)


def compile_model(model: torch.nn.Module, ctx: RunContext) -> int:
    """Regional compilation as `model.compile` resolved (see models/regional_compile.py), said once; returns
    the number of compiled blocks. Before DeepSpeed wraps the model, so its hooks stay outside the graphs."""
    derived = ctx.resolved.derived
    compiled = maybe_compile(model, derived.compile, ctx.device, derived.compile_whole)
    if compiled and not derived.compile_whole and ctx.config.zero.stage == 3:
        # ZeRO-3 hooks every submodule to gather its parameters; inside a compiled block those hooks were
        # traced too, recompiling per module type up to dynamo's limit (then eager). As ZeRO-3 leaves, the
        # compiled blocks are gathered whole by one hook outside their graph.
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, list(compiled_block_types()), raise_if_not_found=False)
    if ctx.rank == 0:
        setting = ctx.config.model.compile
        if compiled and derived.compile_whole:
            log.info("model.compile=whole: the whole forward and loss compiled on first use")
            return compiled
        log.info("model.compile=%s: %s", setting, f"{compiled} blocks compiled on first use" if compiled
                 else "eager blocks" + (" (auto compiles on GPUs only)" if setting == "auto" else ""))
    return compiled


class TrainingLoop:
    """One run of a job: set-up and resume here, then `run()`."""

    def __init__(self, ctx: RunContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer, job: Job) -> None:
        import deepspeed

        self.ctx, self.loader, self.job = ctx, job.loader, job
        self.config, self.derived = ctx.config, ctx.resolved.derived
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=ctx.ds_config)
        self.step = 0
        self.checkpointer = Checkpointer(self.engine, ctx.checkpoints, self.config.checkpoint,
                                         RunIdentity.of(ctx.resolved, ctx.layout), ctx.world, ctx.rank, job, job.loader,
                                         self.config.run.seed,
                                         recipe.as_record(ctx.resolved, ctx.train_data, ctx.heldout))
        self.guard = faults.NonFiniteGuard(self.config.faults.nonfinite_skip_limit)
        self.rates: list[float] = []
        self.peak_flops = device_peak_flops(self.config.logging.peak_tflops)
        self.stopped_by_signal = False
        self.stop_reported = False  # the relay's report of a stop (preemption.report_stop) was written
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
        record = run_record.RunRecord.begin(self.ctx, self.job.kind, self.step, devices,
                                            heldout=getattr(self.job, "heldout", None),  # pretraining's choice
                                            init=self.job.started_from)
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
            self.wandb.log_summary(summary)
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
            before = logged_learning_rate(self.ctx.root / "metrics.csv", self.step)
            after = scheduled_learning_rate(self.derived.learning_rate, self.scheduler)
            # A schedule of another length says the continuation whole, its lr with it; otherwise the lr alone.
            note = (recipe.continuation_note(self.step, plan.saved_total_steps, self.derived.total_steps, before, after,
                                             run_folder.way_out(self.ctx.root))
                    or recipe.schedule_note(plan.config_changes, self.step, before, after, self.derived.total_steps))
            if note:
                log.warning("%s", note)

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
        """A stop asked for at a step boundary, its checkpoint saved. One asked for during the run's last step is not
        a stop: the run is complete, and summary.json, run.json and the log say so (they said "stopped by a signal",
        `stopped_by_signal: true`, for a run with nothing left to resume). The relay's report is written either way:
        it needs it to know the ranks did what the signal asked. The last step of a launch cut short by --max-steps is
        that launch's end, not the run's: neither the log nor the report calls the run complete there."""
        self.stopped_by_signal = self.step < self.ctx.last_step
        self.stop_reported = True
        complete = self.step >= self.derived.total_steps
        if self.ctx.local_rank == 0:  # each node's relay reads its own node's report
            report_stop(saved, self.step, complete=complete)
        if self.ctx.rank == 0 and self.stopped_by_signal:
            log.warning("stop requested: checkpoint %s written at step %d, exiting", saved, self.step)
        elif self.ctx.rank == 0:
            log.warning("stop requested during the last step (%d): %s, checkpoint %s", self.step,
                        "the run is complete" if complete else
                        f"this launch's last (--max-steps); the schedule goes on to step {self.derived.total_steps}",
                        saved)

    def run(self) -> dict[str, Any]:
        """Steps until the last one or a stop; returns the run's summary (the same on every rank)."""
        metrics = MetricsLog(self.ctx.root / "metrics.csv", getattr(self.engine, "monitor", None), self.wandb) \
            if self.ctx.rank == 0 else None
        try:
            self.job.on_start(self)
            batches, window = self._micro_batches(), LogWindow.on(self.device)
            run_start = time.perf_counter()
            reset_peak_memory()
            self.engine.train()
            keep_skipping_at_the_minimum_loss_scale(self.engine)  # after any resume: it loads the scaler
            while self.step < self.ctx.last_step:
                outcome = self.train_step(batches, window)
                if outcome.applied:
                    self._step_done(outcome, metrics, window, run_start)
                if self.checkpointer.maybe_save(self.step, last=self.step == self.ctx.last_step,
                                                stop=outcome.stop is not None, step_done=outcome.applied):
                    self.job.after_checkpoint(self, self.step)
                if outcome.stop is not None:
                    self._stop_for_signal(self.last_saved)
                    break
            if metrics is not None:
                metrics.close()
            summary = self._summary(run_start)
            self._report_a_stop_after_the_last_step()
            return summary
        finally:
            self.job.close()

    def _report_a_stop_after_the_last_step(self) -> None:
        """A stop signal that came after the last step (during the final evaluation, the summary) found the run
        ending anyway, saved at its last step: the relay (cluster/signal_relay.py), which forwarded it and waits for
        a report that the ranks did what it asked, got none and ended the Slurm step with exit 1, a completed run's
        job read as failed. The report names the run's last checkpoint; summary.json says it completed."""
        if self.ctx.stop.signal is None or self.stop_reported or self.ctx.local_rank != 0:
            return
        saved = store.existing(self.last_saved)
        if saved is not None:
            report_stop(saved, self.step, complete=self.step >= self.derived.total_steps)

    def _micro_batches(self) -> Iterator[Batch]:
        """The loader's batches, epoch after epoch: the step count, not the data, ends a run."""
        while True:
            yield from self.loader

    def train_step(self, batches: Iterator[Batch], window: LogWindow) -> StepOutcome:
        """One attempt at an optimizer step over `derived.accumulation` finite micro-batches. A non-finite loss
        is dropped before its backward and its micro-batch replaced by the next one; an update DeepSpeed does
        not apply (non-finite gradients) leaves the step to be redone. Past `faults.nonfinite_skip_limit` such
        attempts in a row it raises `faults.NonFiniteStop` after a checkpoint of the step's start."""
        boundary = self.checkpointer.step_start()
        start, micro, stop_votes, accumulation = time.perf_counter(), 0, 0, self.derived.accumulation
        while micro < accumulation:
            batch = self._next_batch(batches, window)
            loss = self.job.loss(self, batch, self.step, micro)
            nonfinite, stop_votes = step_decision(loss, micro == accumulation - 1 and self.ctx.stop.requested())
            if nonfinite:
                del loss, batch  # the graph goes now, not when the next forward has doubled the activations
                self._nonfinite_loss(boundary)
                continue
            self.engine.backward(loss)
            self.engine.step()
            window.add(loss, batch.images.shape[0])
            del loss, batch
            micro += 1
        applied = self.engine.was_step_applied()
        if applied:
            self.guard.succeeded()
        else:
            self._nonfinite_gradients(boundary)
        return StepOutcome.of(applied, stop_votes, time.perf_counter() - start)

    def _next_batch(self, batches: Iterator[Batch], window: LogWindow) -> Batch:
        """The next micro-batch, its wait counted; a wait past `faults.data_stall_s` is said (a stalled reader)."""
        wait_start = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - wait_start
        window.throughput.data_wait += waited
        limit = self.config.faults.data_stall_s
        if waited > limit:
            log.warning("rank %d waited %.0f s for a batch (faults.data_stall_s=%.0f)", self.ctx.rank, waited, limit)
        return batch

    def _nonfinite_loss(self, boundary: RankPosition) -> None:
        self.guard.loss_skipped()
        if self.ctx.rank == 0:
            log.warning("non-finite loss at step %d (%d in a row): micro-batch skipped", self.step,
                        self.guard.in_a_row)
        if self.guard.exhausted:
            self._stop_nonfinite(boundary)

    def _nonfinite_gradients(self, boundary: RankPosition) -> None:
        """DeepSpeed found the gradients non-finite and skipped the update; with fp16 that is the loss scaler's
        normal search, counted apart and not toward the limit until the scale is at its minimum."""
        fp16 = self.derived.dtype == "fp16"
        floor = fp16 and at_the_minimum_loss_scale(self.engine)
        self.guard.step_not_applied(fp16, floor)
        if self.ctx.rank == 0 and (floor or not fp16):
            log.warning("non-finite gradients at step %d (%d in a row%s): update skipped, the step is redone with the "
                        "next data", self.step, self.guard.in_a_row,
                        ", fp16 loss scale at its minimum" if floor else "")
        if self.guard.exhausted:
            self._stop_nonfinite(boundary)

    def _step_done(self, outcome: StepOutcome, metrics: MetricsLog | None, window: LogWindow,
                   run_start: float) -> None:
        """An applied step counts: it is logged (every `logging.every_steps` and the last), then the job's turn."""
        self.step += 1
        last = self.step == self.ctx.last_step
        if self.step == 1 and self.ctx.rank == 0 and self.job.compiled_blocks:
            log.info("first step took %.1f s, compiling %s included", outcome.seconds,
                     plural(self.job.compiled_blocks, "block"))
        if self.step % self.config.logging.every_steps == 0 or last:
            self._log(metrics, window, run_start)
            window.reset()
        self.job.after_step(self, self.step, last)

    def _summary(self, run_start: float) -> dict[str, Any]:
        """Collective (peak memory of every rank, the job's own summary); closes run.json and W&B on rank 0."""
        derived = self.derived
        peak = [0.0] * self.ctx.world
        dist.all_gather_object(peak, peak_memory_mib())
        steady = self.rates[1:] or self.rates
        images_per_s = sum(steady) / len(steady) if steady else None
        summary = {"steps": self.step, "optimizer_steps": int(self.engine.global_steps),
                   "planned_steps": self.ctx.last_step, "schedule_steps": derived.total_steps,
                   "stopped_by_signal": self.stopped_by_signal,
                   "images_seen": self.step * derived.global_batch, **self.guard.summary(),
                   "skipped_samples_after_nonfinite": self.skipped_samples,
                   "images_per_s": images_per_s, "peak_mem_mib_per_rank": peak,
                   "wall_s": time.perf_counter() - run_start,
                   "checkpoint": str(saved) if (saved := store.existing(self.last_saved)) else None,
                   "dtype": derived.dtype, "dtype_reason": derived.dtype_reason}
        mfu = self._mfu(images_per_s)
        if images_per_s and mfu is not None:
            summary["mfu"] = mfu
        summary.update(self.job.summary(self))
        self._close_records(summary)
        return summary

    def _mfu(self, images_per_s: float | None) -> float | None:
        """The model FLOPs utilisation of all ranks at `images_per_s`, where the job counts its FLOPs and the device
        has a known peak."""
        return model_flops_utilization(images_per_s, self.job.flops_per_image, self.peak_flops, self.ctx.world)

    def _log(self, metrics: MetricsLog | None, window: LogWindow, run_start: float) -> None:
        """Collective (the window's loss and rate are summed over ranks); rank 0 writes the row and the line."""
        derived, step, last_step = self.derived, self.step, self.ctx.last_step
        rate, wait_frac = window.throughput.window()
        loss_sum = window.loss_sum
        totals = torch.stack([loss_sum.detach().double(), loss_sum.new_full((), window.loss_count, dtype=torch.float64),
                              loss_sum.new_full((), rate, dtype=torch.float64)])
        dist.all_reduce(totals)
        total_loss, total_count, global_rate = totals.tolist()  # one read per logging interval
        mean_loss = total_loss / max(total_count, 1)
        self.rates.append(global_rate)
        if metrics is None:
            return
        mfu = self._mfu(global_rate)
        grad_norm = self.engine.get_global_grad_norm()
        row = {"step": step, "epoch": self.loader.epoch_progress, "images_seen": step * derived.global_batch,
               "loss": mean_loss, "lr": last_step_learning_rate(derived.learning_rate, self.scheduler),
               "grad_norm": float(grad_norm) if grad_norm is not None else None, "images_per_s": global_rate,
               "mfu": mfu, "data_wait_frac": wait_frac, "peak_mem_mib": peak_memory_mib(),
               "elapsed_s": time.perf_counter() - run_start,
               "loss_scale": fp16_loss_scale(self.engine) if derived.dtype == "fp16" else None}
        metrics.write(row)
        eta = (last_step - step) * derived.global_batch / max(global_rate, 1e-9)
        grad_text = f"{row['grad_norm']:.3f}" if row["grad_norm"] is not None else "n/a"
        log.info("step %d/%d  epoch %.2f  loss %.4f  lr %.2e  grad %s  %.0f img/s  MFU %s  data %.0f%%  mem %.0f MiB"
                 "  ETA %s", step, last_step, row["epoch"], mean_loss, row["lr"], grad_text, global_rate,
                 f"{mfu:.1%}" if mfu else "n/a", 100 * wait_frac, row["peak_mem_mib"], format_eta(eta))
