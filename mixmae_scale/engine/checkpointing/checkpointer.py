"""The object the training loop calls where a checkpoint may be due; it decides when to save and what goes in.

As torchtitan's CheckpointManager does with `save(step, last_step)`, the loop does not decide intervals: it
tells the checkpointer where the run is (`maybe_save(step, last=..., stop=...)`) and the checkpointer saves
on `checkpoint.every_steps`, at the run's last step (`checkpoint.at_end`) and when a signal asked the run to
stop. A non-finite stop (`save_nonfinite_stop`) and a resume across a layout change
(`checkpoint.save_after_layout_change`) save under their own tags. Every save is collective (store.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from mixmae_scale.config.schema import CheckpointConfig
from mixmae_scale.data.errors import plural
from mixmae_scale.data.loader import ShardLoader
from mixmae_scale.engine.checkpointing import resume, store
from mixmae_scale.engine.checkpointing.state import RankPosition, RankState, RunIdentity, RunState, StopRecord
from mixmae_scale.engine.rng import restore_rng, seed_generators
from mixmae_scale.seeds import stream_seed

log = logging.getLogger("mixmae.checkpoint")


class JobState(Protocol):
    """What a job saves with every checkpoint (the same on every rank): its evaluation's best result, for one."""

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


class Checkpointer:
    def __init__(self, engine, ckpt_dir: Path, settings: CheckpointConfig, identity: RunIdentity, world: int,
                 rank: int, job: JobState, loader: ShardLoader, seed: int, recipe: dict[str, Any] | None = None
                 ) -> None:
        """`seed`: run.seed, from which a resume on another world size seeds each rank's generators; `recipe`: the
        resolved configuration every tag records (recipe.py: a resume with another one is noted or refused)."""
        self.engine, self.ckpt_dir, self.settings, self.identity = engine, ckpt_dir, settings, identity
        self.recipe = recipe
        self.world, self.rank, self.job, self.loader, self.seed = world, rank, job, loader, seed
        self.last_saved: Path | None = None  # what the run's summary names (if it is still complete at the end)
        self.skipped_samples = 0  # by resumes after non-finite stops, over the run's life

    # -- when ----------------------------------------------------------------------------------------------------
    def due(self, step: int, last: bool = False, stop: bool = False, step_done: bool = True) -> bool:
        """Every `checkpoint.every_steps`, at the run's last step unless `checkpoint.at_end` is off, and when a
        signal asked the run to stop (the state must outlive the process). An attempt whose update was not applied
        (`step_done` false) leaves `step` as it was: it is saved only for a stop, as the state it is in."""
        if stop:
            return True
        return step_done and (step % self.settings.every_steps == 0 or (last and self.settings.at_end))

    def maybe_save(self, step: int, last: bool = False, stop: bool = False, step_done: bool = True) -> Path | None:
        """Collective: every rank calls it after each attempt with the same arguments. The folder saved, or None."""
        if not self.due(step, last, stop, step_done):
            return None
        self.last_saved = self.save(step)
        return self.last_saved

    def step_start(self) -> RankPosition:
        """This rank's position at a step's start, what a non-finite stop saves: cheap enough for every step."""
        return RankPosition.capture(self.loader, with_generators=False)

    def save_nonfinite_stop(self, step: int, start: RankPosition) -> Path:
        """Collective. The state of the step's start under a new tag, and in its marker where the data stands now
        (after the failed attempts), so that the next launch can skip past them."""
        stop = StopRecord(step, self.loader.position())
        self.last_saved = self.save(step, kind=store.NONFINITE, position=start, stop=stop)
        return self.last_saved

    # -- what ----------------------------------------------------------------------------------------------------
    def save(self, step: int, directory: Path | None = None, keep: int | None = None, kind: str = "",
             position: RankPosition | None = None, stop: StopRecord | None = None) -> Path:
        """Collective. `directory`: another home than the run's checkpoints (fine-tuning's best/); `keep`: the tags
        rotation keeps there (0: all), `checkpoint.keep_last` if None; `position`: the rank's position to store
        instead of the current one."""
        run = RunState(step, self.job.state(), self.identity.model_digest, self.world, self.skipped_samples)
        rank = RankState(position or RankPosition.capture(self.loader), self.identity)
        request = store.SaveRequest(step, kind, self.settings.keep_last if keep is None else keep,
                                    stop.marker_extra() if stop else None, self.recipe)
        return store.save(self.engine, directory or self.ckpt_dir, request, run.to_client(), rank.to_dict())

    def resume(self, plan: resume.ResumePlan) -> int:
        """Every rank: the plan's checkpoint loaded into the engine, the job, the loader and the generators; saved
        again at once in this layout where `checkpoint.save_after_layout_change` asks. Returns the step.

        The generators are restored exactly on the same world size. On another, the old ranks' states cannot be
        shared out: copied round-robin, ranks r and r + old world drew the same mixup, cutmix, erasing and drop
        path numbers for the rest of the run. Each rank seeds them from (run.seed, rank, step) instead."""
        run, state = resume.load(self.engine, plan, self.ckpt_dir, self.rank)
        self.job.load_state(run.job)
        self.skipped_samples = run.skipped_samples
        self.loader.restore(state.position.loader)
        if plan.keeps_generators(self.world):
            restore_rng(state.position.rng)
        else:
            seed_generators(stream_seed(self.seed, self.rank, run.step, bits=63))
        if self.rank == 0:
            if not plan.keeps_generators(self.world):
                log.info("%s", reseed_note(run.step, plan.saved_world, self.world))
            for note in (*plan.notes, *([self.loader.resume_note] if self.loader.resume_note else [])):
                log.warning("%s", note)
            log.info("resumed from %s at step %d", self.ckpt_dir / plan.tag, run.step)
        if plan.universal and self.settings.save_after_layout_change:
            self.last_saved = self.save(run.step, kind=store.RELAYOUT)
        return run.step


def reseed_note(step: int, saved_world: int, world: int) -> str:
    """The log line of a resume on another number of ranks, whose generators are seeded anew (`Checkpointer.resume`
    says why); counted in words, as a 2 -> 1 resume is read ("the 2 saved ones do not share out over 1 ranks")."""
    return (f"each rank's random generators seeded from run.seed, its rank and step {step} (the generators "
            f"{plural(saved_world, 'rank')} saved do not share out over {plural(world, 'rank')})")
