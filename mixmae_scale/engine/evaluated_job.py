"""What fine-tuning jobs share between steps: an evaluation every `eval_every` steps and at the last, one line per
evaluation in `eval.jsonl`, and the best one kept as its own `best/` checkpoint. The best evaluation travels with
the checkpoints, so a resumed run keeps comparing against it, and `eval.jsonl` keeps one line per evaluation
through crashes. A job says how it evaluates, which number is better, and how a result reads in the log."""

from __future__ import annotations

import json
import logging
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
            loop.save(step, directory=self.root / "best", keep=1)

    def on_start(self, loop: Loop) -> None:
        """Every rank, after set-up and resume: a best result whose checkpoint is not in best/ any more (best/ keeps
        one, and a resume moved the continuation it left aside: `truncate_logs`) is forgotten, so that the next
        evaluation saves one again rather than only one that beats a number with no weights behind it."""
        if self.best[self.metric] < 0:
            return
        kept = [bool(store.complete_tags(self.root / "best"))] if loop.ctx.rank == 0 else [None]
        if loop.ctx.world > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(kept, src=0)  # rank 0 moved the folders: its view decides
        if not kept[0]:
            if loop.ctx.rank == 0:
                log.warning("best/ keeps no checkpoint of this continuation (best %s at step %s was the one it "
                            "left): the next evaluation starts best/ again", self.best[self.metric],
                            self.best.get("step"))
            self.best = {self.metric: -1.0}

    def state(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state(self, state: dict[str, Any]) -> None:
        self.best = state.get("best", self.best)

    def truncate_logs(self, step: int) -> None:
        """Rank 0, at a resume from `step`: the evaluations after it belong to a continuation this run leaves (a
        rollback, a named earlier tag, a damaged newest checkpoint); so do best/ checkpoints after it, which are
        moved to `superseded-best-<n>/`. Kept, one at a step the run reaches again stayed in place of the new
        one (a step is not saved twice), and one after a new best outranked it for `export --best`."""
        drop_rows_after(self.root / "eval.jsonl", step)
        best = self.root / "best"
        later = [tag for tag in store.complete_tags(best) if store.step_of(tag) > step]
        if not later:
            return
        number = 1
        while (self.root / f"superseded-best-{number}").exists():
            number += 1
        target = self.root / f"superseded-best-{number}"
        target.mkdir()
        for tag in later:
            (best / tag).rename(target / tag)
        log.warning("best/ held %s of the continuation this run leaves at step %d: moved to %s", ", ".join(later),
                    step, target)
