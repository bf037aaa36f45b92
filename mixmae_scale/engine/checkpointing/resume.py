"""How a run resumes, top to bottom: which checkpoint, in which layout, then loading it.

`plan_resume` is rank 0's decision, broadcast so that every rank gets the same plan or the same error (a stale
view of a shared file system could otherwise show two ranks two tags). `decide_resume` makes it in three steps:

1. The tag (`choose_tag`). `checkpoint.resume` is auto, none, or a tag (or its path). Auto takes the newest
   complete checkpoint whose files are all there at their written sizes, falling back past damaged ones with
   a note. After a non-finite stop, `faults.on_nonfinite_stop` decides: "rollback" (the default) takes the
   newest regular checkpoint before the stop and moves the data past everything read since it, as PaLM and OPT
   recovered from divergence (good weights again, the batches that led to the failure never read again);
   "skip" keeps the stop's weights and skips only the failed attempts; "replay" reads them again. The samples
   skipped are logged and reported in summary.json.
2. The run it belongs to (`_refuse_another_run`): another model, another global batch or a fine-tuning from other
   weights (`finetune.init`, `segment.init`) is refused, with the way out. Then the recipe (`_check_recipe`,
   recipe.py): every key changed since the tag was saved is named in a note, and one that changes what the loss
   means at the same step (the mask ratio, for one) is refused unless `checkpoint.allow_recipe_change` opts in.
3. The layout (`_choose_layout`). The same world size and optimizer layout loads the tag itself, each rank its
   own file: bit-exact. Another world size, precision or ZeRO layout converts the tag to DeepSpeed's universal
   checkpoint (universal.py) and loads that; the global batch is kept (micro-batch and accumulation are
   re-derived, config/derive.py) and the data goes on by global samples (data/loader.py). ZeRO-0 keeps the
   whole optimizer in one file, so any world size loads it as it is. ZeRO-3 and ZeRO 1-2 keep their optimizer
   state in universal forms the other cannot load, so a change across that line is refused before converting.

The plan is one object: the DeepSpeed config it needs (`deepspeed_config`) and the rank file each rank reads
come from it. `load` applies it on every rank and returns the client state and the rank state to go on from.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mixmae_scale.config import ConfigError, ResolvedConfig
from mixmae_scale.data.errors import plural
from mixmae_scale.data.loader import LoaderPosition
from mixmae_scale.engine import run_folder
from mixmae_scale.engine.checkpointing import recipe, store
from mixmae_scale.engine.checkpointing.state import RankState, RunIdentity, RunState, StopRecord, init_changes
from mixmae_scale.engine.checkpointing.universal import convert_to_universal, layout_changes, match_optimizer_steps


@dataclass(frozen=True)
class ResumePlan:
    """Everything a resume does, decided once. `choose_tag` fills the first part, `_choose_layout` the rest."""

    tag: str  # the checkpoint whose step, job state and rank files the run continues from
    data_position: LoaderPosition | None = None  # where the data resumes when it is not the tag's own position
    skipped_samples: int = 0
    notes: tuple[str, ...] = ()
    saved_world: int = 0
    saved_layout: dict[str, Any] | None = None  # the checkpoint's optimizer layout (the run record's old layout)
    load_tag: str = ""  # what DeepSpeed loads: the tag, or its universal conversion
    universal: bool = False
    same_layout: bool = True  # same world size and optimizer layout: each rank reads its own file back, bit-exact
    config_changes: tuple[str, ...] = ()  # `key old -> new` for each key changed since the tag was saved (recipe.py)
    heldout_change: str | None = None  # the held-out images differ from the tag's (recipe.heldout_change): the warning
    saved_total_steps: int | None = None  # the schedule length the tag was trained under (None: not in its recipe)

    @property
    def step(self) -> int:
        return store.step_of(self.tag)

    def finishes_by(self, last_step: int) -> bool:
        """A regular checkpoint at or past the run's last step: nothing left to train."""
        return store.is_regular(self.tag) and self.step >= last_step

    def deepspeed_config(self, ds_config: dict[str, Any]) -> dict[str, Any]:
        """The config DeepSpeed must get: it loads a universal checkpoint only when told so."""
        if not self.universal:
            return ds_config
        return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}

    def rank_file_for(self, rank: int) -> int:
        """Which of the checkpoint's rank files this rank reads: its own on the same layout; otherwise one of the old
        ranks' (the loader position is the same in all; the generators go on only on the same world size,
        `keeps_generators`)."""
        return rank if self.same_layout else rank % self.saved_world

    def keeps_generators(self, world: int) -> bool:
        """Each rank restores its own saved generators: the same world size (0: a plan whose layout was not looked
        at, a finished run's)."""
        return self.saved_world in (0, world)


Converter = Callable[[Path, str], Path]


def plan_resume(ckpt_dir: Path, resolved: ResolvedConfig, layout: dict[str, Any], last_step: int | None = None,
                convert: Converter = convert_to_universal, resume: str | None = None, data=None,
                heldout: dict[str, str] | None = None) -> ResumePlan | None:
    """Collective: rank 0 decides (and converts where needed), every rank gets the same plan or the same error.
    `last_step`: the run's last step; a checkpoint there is a finished run, reported without a conversion.
    `resume`: the setting to act on, where the run folder changed it (run_folder.continuation). `data`: the
    training data read (a ShardMixture), which a checkpoint's data location may change to (recipe.py); `heldout`: the
    images the run scores (recipe.heldout_record), compared with the tag's."""
    outcome: list[Any] = [None]
    if dist.get_rank() == 0:
        config = resolved.config
        try:
            outcome[0] = decide_resume(ckpt_dir, resume or config.checkpoint.resume, config.faults.on_nonfinite_stop,
                                       RunIdentity.of(resolved, layout), dist.get_world_size(), convert,
                                       last_step, recipe.as_record(resolved, data, heldout),
                                       config.checkpoint.allow_recipe_change)
        except (store.ResumeError, ConfigError) as exc:
            outcome[0] = exc
        except OSError as exc:  # a file the plan reads cannot be read: the same one-line end on every rank
            outcome[0] = store.ResumeError(str(exc))
    dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def decide_resume(ckpt_dir: Path, resume: str, policy: str, identity: RunIdentity, world: int,
                  convert: Converter = convert_to_universal, last_step: int | None = None,
                  current_recipe: dict[str, Any] | None = None, allow_recipe_change: bool = False
                  ) -> ResumePlan | None:
    """Rank 0's whole decision; None for a fresh start. A finished run (a regular tag at `last_step`) is
    returned before its layout is looked at: started again on other GPUs it converts nothing, it is done.
    `current_recipe`: the resolved configuration now (recipe.as_record), compared with the tag's; None compares
    nothing."""
    plan = choose_tag(ckpt_dir, resume, policy)
    if plan is None:
        return None
    saved = RankState.read(ckpt_dir, plan.tag, 0).identity
    _refuse_another_run(ckpt_dir, plan.tag, saved, identity)
    if current_recipe is not None:
        plan = _check_recipe(ckpt_dir, plan, current_recipe, allow_recipe_change)
    if last_step is not None and plan.finishes_by(last_step):
        return plan
    return _choose_layout(ckpt_dir, plan, saved.optimizer_layout, identity.optimizer_layout, world, convert)


# -- 1. the tag ----------------------------------------------------------------------------------------------------
def choose_tag(ckpt_dir: Path, resume: str, policy: str) -> ResumePlan | None:
    """`resume`: auto | none | a tag or tag path. The plan's tag and data; its layout is not decided yet."""
    if resume == "none":
        return None
    tags = store.complete_tags(ckpt_dir)
    if resume != "auto":
        return ResumePlan(_named_tag(ckpt_dir, resume, tags))
    intact, notes = _intact_newest_first(ckpt_dir, tags)
    unsealed = [t for t in store.unsealed_tags(ckpt_dir)
                if not intact or store.tag_order(t) > store.tag_order(intact[0])]
    if unsealed and not intact:
        raise store.ResumeError(f"no complete checkpoint to resume: {store.unsealed_note(ckpt_dir, unsealed)}; copy "
                                "the run folder again whole, or move them aside (or set checkpoint.resume=none) to "
                                "start over")
    if not intact:
        return None
    newest = intact[0]
    if unsealed:
        notes = [*notes, f"{store.unsealed_note(ckpt_dir, unsealed)}: resuming from {newest}, the newest complete one"]
    stop = StopRecord.of_tag(ckpt_dir, newest)
    if stop is None:
        return ResumePlan(newest, notes=tuple(notes))
    if policy == "replay":
        return ResumePlan(newest, notes=(*notes, f"{newest} was saved by a non-finite stop: replaying its step from "
                                                 "the start (faults.on_nonfinite_stop=replay)"))
    return _past_the_stop(ckpt_dir, newest, stop, intact[1:], policy, notes)


def _named_tag(ckpt_dir: Path, resume: str, tags: list[str]) -> str:
    tag = Path(resume).name
    if store.names_another_folder(ckpt_dir, resume):
        raise store.ResumeError(f"checkpoint.resume={resume!r} is a checkpoint of another folder than this run's "
                                f"{ckpt_dir.resolve()}: it takes a tag of this run (or its path); a run continues "
                                "only from its own checkpoints")
    if tag not in tags:
        raise store.ResumeError(f"checkpoint.resume={resume!r}: {(ckpt_dir / tag).resolve()} is not a complete "
                                f"checkpoint (complete ones: {', '.join(tags) or 'none'})")
    problem = store.damage(ckpt_dir / tag)
    if problem:
        raise store.ResumeError(f"checkpoint.resume={resume!r}: {(ckpt_dir / tag).resolve()} is damaged: {problem}")
    return tag


def _intact_newest_first(ckpt_dir: Path, tags: list[str]) -> tuple[list[str], list[str]]:
    intact, notes = store.intact_newest_first(ckpt_dir, tags)
    if notes and not intact:
        raise store.ResumeError(f"every checkpoint in {ckpt_dir.resolve()} is damaged: {'; '.join(notes)}; move "
                                "them aside (or set checkpoint.resume=none) to start over")
    return intact, notes


def _past_the_stop(ckpt_dir: Path, newest: str, stop: StopRecord, earlier: list[str], policy: str,
                   notes: list[str]) -> ResumePlan:
    """Rollback or skip: the weights to go on from, and the data moved past everything read since they were saved."""
    target = newest
    if policy == "rollback":
        regular = [t for t in earlier if store.is_regular(t) and store.step_of(t) <= stop.step]
        target = regular[0] if regular else newest
    before = RankState.read(ckpt_dir, target, 0).position.loader
    skipped = stop.loader_after.samples_since(before)
    how = (f"rolling back to {target} (step {store.step_of(target)})" if target != newest
           else "resuming from its weights (no earlier checkpoint to roll back to)" if policy == "rollback"
           else "resuming from its weights")
    note = (f"{newest} was saved by a non-finite stop at step {stop.step}: {how} and skipping the {skipped} samples "
            f"read since, so the batches that led to the failure are not read again (faults.on_nonfinite_stop="
            f"{policy})")
    return ResumePlan(target, stop.loader_after, skipped, (*notes, note))


# -- 2. the run it belongs to --------------------------------------------------------------------------------------
def _refuse_another_run(ckpt_dir: Path, tag: str, saved: RunIdentity, identity: RunIdentity) -> None:
    if saved.model_digest != identity.model_digest:
        raise store.ResumeError(run_folder.another_model(ckpt_dir.parent, tag, saved.model_shape, saved.model_digest,
                                                         identity.model_shape, identity.model_digest))
    batch = saved.global_batch
    if batch is not None and batch != identity.global_batch:
        raise store.ResumeError(f"{(ckpt_dir / tag).resolve()} was trained at a global batch of {batch}, this run "
                                f"has {identity.global_batch}: the step counter and the learning-rate schedule "
                                f"count batches of {batch}; resume with --set batch.global_batch={batch}, "
                                f"or, for another run, {run_folder.way_out(ckpt_dir.parent)}")
    changes = init_changes(saved.init, identity.init)
    if changes:
        raise store.ResumeError(f"{(ckpt_dir / tag).resolve()} was trained from other weights ({'; '.join(changes)}):"
                                " resumed, the run would go on from those and ignore the ones named now; resume with "
                                "the weights it started from, or, for another run, "
                                f"{run_folder.way_out(ckpt_dir.parent)}")


def _check_recipe(ckpt_dir: Path, plan: ResumePlan, current: dict[str, Any], allow: bool) -> ResumePlan:
    """The tag's recorded recipe against this run's: refused (recipe.py says which keys), or the plan with the
    changes noted, so that the log and run.json say what the steps after the resume ran with."""
    saved, where = recipe.saved_recipe(ckpt_dir, plan.tag), str((ckpt_dir / plan.tag).resolve())
    total = ((saved or {}).get("derived") or {}).get("total_steps")
    plan = replace(plan, saved_total_steps=total if isinstance(total, int) else None)
    verdict = recipe.compare(saved, current, allow, where, run_folder.way_out(ckpt_dir.parent))
    if verdict.refusal:
        raise store.ResumeError(verdict.refusal)
    if verdict.note is not None:
        plan = replace(plan, notes=(*plan.notes, verdict.note), config_changes=tuple(map(str, verdict.changes)))
    heldout = recipe.heldout_change(saved, current, where, plan.step, recipe.same_training_data(saved, current))
    if heldout is not None:
        plan = replace(plan, notes=(*plan.notes, heldout), heldout_change=heldout)
    return plan


# -- 3. the layout -------------------------------------------------------------------------------------------------
def _choose_layout(ckpt_dir: Path, plan: ResumePlan, saved: dict[str, Any] | None, current: dict[str, Any],
                   world: int, convert: Converter) -> ResumePlan:
    tag = plan.tag
    saved_world = int(store.marker(ckpt_dir, tag)["world_size"])
    plan = replace(plan, saved_world=saved_world, saved_layout=saved, load_tag=tag)
    changes = layout_changes(saved, current)
    stages = {(saved or {}).get("zero_stage"), current["zero_stage"]}
    if 0 in stages and changes:
        raise store.ResumeError(f"{(ckpt_dir / tag).resolve()} cannot be resumed across {', '.join(changes)}: "
                                "DeepSpeed's universal checkpoint converts and loads ZeRO 1-3 optimizer shards, and "
                                "ZeRO-0 keeps none; resume with the checkpoint's zero.stage and precision.dtype")
    if None not in stages and len({stage == 3 for stage in stages}) == 2:  # None: a layout not yet recorded
        raise store.ResumeError(
            f"{(ckpt_dir / tag).resolve()} was written at ZeRO stage {(saved or {}).get('zero_stage')} and this run "
            f"has zero.stage={current['zero_stage']}: DeepSpeed's universal checkpoint (0.19 tried here) loads "
            "ZeRO-3's optimizer state only into ZeRO-3 and that of ZeRO 1-2 only into ZeRO 1-2 (it stops with a "
            "KeyError or an assertion otherwise); resume with the checkpoint's zero.stage (the world size, "
            "precision and offload may still change), or between stages 1 and 2")
    if saved_world != world and stages == {0}:
        return replace(plan, same_layout=False, notes=(
            *plan.notes, f"resuming {tag} (ZeRO-0) on {plural(world, 'rank')}, written by {saved_world}"))
    if saved_world != world:
        changes.insert(0, f"world size {saved_world} -> {world}")
    if not changes:
        return plan
    start = time.perf_counter()
    existing = (store.universal_folder(ckpt_dir, tag) / store.MARKER).exists()
    folder = convert(ckpt_dir, tag)
    how = "reused its earlier conversion" if existing else f"converted in {time.perf_counter() - start:.1f} s"
    note = (f"resuming {tag} across a change of layout ({', '.join(changes)}): DeepSpeed's universal checkpoint "
            f"carries the fp32 master weights and both Adam moments over ({how}: {folder})")
    return replace(plan, load_tag=folder.name, universal=True, same_layout=False, notes=(*plan.notes, note))


# -- loading -------------------------------------------------------------------------------------------------------
def load(engine, plan: ResumePlan, ckpt_dir: Path, rank: int) -> tuple[RunState, RankState]:
    """Every rank: DeepSpeed loads what the plan names; the client state and this rank's state to go on from, the data
    moved where the plan says and DALI's per-rank generators dropped across a layout change."""
    _, client = engine.load_checkpoint(str(ckpt_dir), tag=plan.load_tag)
    if client is None:
        raise store.ResumeError(f"DeepSpeed could not load {ckpt_dir / plan.load_tag}; see its messages above")
    if plan.universal:
        match_optimizer_steps(engine)
    run = RunState.from_client(client)
    run.skipped_samples += plan.skipped_samples
    state = RankState.read(ckpt_dir, plan.tag, plan.rank_file_for(rank))
    loader = plan.data_position or state.position.loader
    if not plan.same_layout:
        loader = loader.without_generators()
    return run, replace(state, position=replace(state.position, loader=loader))
