"""What fine-tuning jobs share between steps: an evaluation every `eval_every` steps and at the last, one line per
evaluation in `eval.jsonl`, and the best one kept as its own `best/` checkpoint. The best evaluation travels with
the checkpoints, so a resumed run keeps comparing against it, and `eval.jsonl` keeps one line per evaluation
through crashes. A job says how it evaluates, which number is better, and how a result reads in the log.

best/ keeps the best a resume would restore as well as the newest: a new best does not replace the previous one
until a regular checkpoint at or after it is saved (`best_victims`). Replaced at once, a crash between a new best
and the next regular checkpoint resumed a run whose recorded best had no weights left, and the job forgot it while
eval.jsonl still showed its score."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixmae_scale.engine.checkpointing import store
from mixmae_scale.engine.job import Job, Loop
from mixmae_scale.engine.monitor import drop_rows_after

if TYPE_CHECKING:
    from mixmae_scale.config.schema import Config
    from mixmae_scale.data.loader import ShardLoader
    from mixmae_scale.data.spec import PipelineSpec

log = logging.getLogger("mixmae.eval")


def recorded_best(best: dict[str, Any], metric: str) -> dict[str, Any] | None:
    """summary.json's "best": None before any evaluation, rather than the job's placeholder of -1 (read as a score)."""
    return None if best[metric] < 0 else best


class EvaluatedJob(Job):
    root: Path
    eval_every: int
    metric: str  # the result's key that decides the best evaluation (higher is better)
    left_out_of_best: tuple[str, ...] = ()  # result keys too large to keep with every checkpoint
    config: Config
    val_spec: PipelineSpec

    def start_evaluations(self) -> None:
        self.best: dict[str, Any] = {self.metric: -1.0}
        self.last: dict[str, Any] | None = None
        self._val_loader: ShardLoader | None = None

    def val_loader(self) -> ShardLoader:
        """The validation split's loader, made at the first evaluation and kept for the run: the split's indexes
        are read, and its samples' ids summed, once per run rather than at every evaluation."""
        if self._val_loader is None:
            from mixmae_scale.data.loaders import open_loader

            data = self.config.data
            self._val_loader = open_loader(self.config, data.shards, data.val_split, self.val_spec)
        return self._val_loader

    def close(self) -> None:
        super().close()
        if self._val_loader is not None:
            self._val_loader.close()

    def evaluate(self, loop: Loop, step: int) -> dict[str, Any]:
        """Collective: the validation split's scores at `step` (with "step" and "epoch")."""
        raise NotImplementedError

    def describe(self, result: dict[str, Any]) -> str:
        """The log line's scores."""
        raise NotImplementedError

    def after_step(self, loop: Loop, step: int, last: bool) -> None:
        if step % self.eval_every and not last:
            return
        result = self.evaluate(loop, step)
        self.last = result
        if loop.ctx.rank == 0:
            with (self.root / "eval.jsonl").open("a") as handle:
                handle.write(json.dumps(result) + "\n")
            log.info("eval at step %d: %s (%d images)", step, self.describe(result), result["samples"])
        if result[self.metric] > self.best[self.metric]:
            self.best = {k: v for k, v in result.items() if k not in self.left_out_of_best}
            loop.save(step, directory=self.root / "best", keep=0)  # rotation keeps them all: `prune_best` decides
            if loop.ctx.rank == 0:
                self.prune_best()

    def after_checkpoint(self, loop: Loop, step: int) -> None:
        if loop.ctx.rank == 0:
            self.prune_best()

    def prune_best(self) -> None:
        """Rank 0: remove the best/ checkpoints no resume can restore any more (`best_victims`)."""
        best = self.root / "best"
        tags = store.complete_tags(best)
        damaged = frozenset(tag for tag in tags if store.damage(best / tag))
        for tag in sorted(best_victims(tags, newest_regular_step(self.root / "checkpoints"), damaged)):
            shutil.rmtree(best / tag, ignore_errors=True)

    def on_start(self, loop: Loop) -> None:
        """Every rank, after set-up and resume: the recorded best must have its own checkpoint in best/, at its step.
        One without (a resume from a checkpoint older than the newest, whose best was pruned; a damaged one) is
        forgotten, so that the next evaluation saves one again rather than only one that beats a number with no
        weights behind it, and `export --best` does not take another step's weights for it."""
        resume = getattr(loop.ctx, "resume", None)
        if getattr(resume, "heldout_change", None) and self.best[self.metric] >= 0:
            # Scored on other validation images: a number the evaluations from here on cannot be compared with.
            if loop.ctx.rank == 0:
                aside = self._set_aside(store.complete_tags(self.root / "best"))
                log.warning("the best evaluation so far (%s at step %s) scored other validation images than this "
                            "resume does: best/ starts again at the next evaluation%s", self.best[self.metric],
                            self.best.get("step"), f"; its checkpoint is kept in {aside}" if aside else "")
            self.best = {self.metric: -1.0}
        kept = [None]
        if loop.ctx.rank == 0:
            kept[0] = self.best[self.metric] < 0 or self._best_is_kept()
            self.prune_best()
        if loop.ctx.world > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(kept, src=0)  # rank 0 moved the folders: its view decides
        if not kept[0]:
            if loop.ctx.rank == 0:
                log.warning("best/ keeps no checkpoint of the best evaluation this run resumes with (%s at step %s): "
                            "the next evaluation starts best/ again", self.best[self.metric], self.best.get("step"))
            self.best = {self.metric: -1.0}

    def _best_is_kept(self) -> bool:
        best, step = self.root / "best", self.best.get("step")
        tags = store.complete_tags(best)
        if step is None:  # a best recorded without its step: any checkpoint of it
            return bool(tags)
        tag = store.tag_for(int(step))
        return tag in tags and store.damage(best / tag) is None

    def state(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state(self, state: dict[str, Any]) -> None:
        self.best = state.get("best", self.best)

    def truncate_logs(self, step: int) -> None:
        """Rank 0, at a resume from `step`: the evaluations after it belong to a continuation this run leaves (a
        rollback, a named earlier tag, a damaged newest checkpoint); so do best/ checkpoints after it, which are
        moved to `superseded-best-<n>/`. Kept, one at a step the run reaches again stayed in place of the new
        one (a step is not saved twice), and one after a new best outranked it for `export --best`. The best up to
        `step` stays: `best_victims` kept it."""
        drop_rows_after(self.root / "eval.jsonl", step)
        later = [tag for tag in store.complete_tags(self.root / "best") if store.step_of(tag) > step]
        target = self._set_aside(later)
        if target is not None:
            log.warning("best/ held %s of the continuation this run leaves at step %d: moved to %s",
                        ", ".join(later), step, target)

    def _set_aside(self, tags: list[str]) -> Path | None:
        """Rank 0: move best/'s `tags` to a new `superseded-best-<n>/` (None: nothing to move), kept, not removed."""
        if not tags:
            return None
        number = 1
        while (self.root / f"superseded-best-{number}").exists():
            number += 1
        target = self.root / f"superseded-best-{number}"
        target.mkdir()
        for tag in tags:
            (self.root / "best" / tag).rename(target / tag)
        return target


def newest_regular_step(ckpt_dir: Path) -> int | None:
    """The step of the newest intact regular checkpoint: where a resume goes on from (a stop's rollback too)."""
    intact, _ = store.intact_newest_first(ckpt_dir, store.complete_tags(ckpt_dir))
    regular = [tag for tag in intact if store.is_regular(tag)]
    return store.step_of(regular[0]) if regular else None


def best_victims(tags: list[str], regular_step: int | None, damaged: frozenset[str] = frozenset()) -> set[str]:
    """The best/ tags to remove: all but two, the newest intact one at or before the newest regular checkpoint
    (`regular_step`: the best a resume from it restores) and the newest intact one after it (the run's best as it
    goes on, which a resume from that checkpoint sets aside: `truncate_logs`). A best between those two is restored
    by no resume: the next regular checkpoint comes after the newest."""
    covered = [tag for tag in tags if regular_step is not None and store.step_of(tag) <= regular_step]
    later = [tag for tag in tags if tag not in covered]
    kept = {group[-1] for group in ([t for t in covered if t not in damaged], [t for t in later if t not in damaged])
            if group}
    return set(tags) - kept
