"""Resuming on another number of GPUs or another precision, decided once for all ranks.

ZeRO shards the optimizer per rank, so a checkpoint written by 16 ranks cannot be loaded as it is by 8,
nor by a run whose precision or ZeRO layout differs (bf16 on one machine, fp32 on one without native
bf16). DeepSpeed's universal checkpoint stores each parameter's fp32 master weights and both Adam moments
whole; `plan_resume` converts a checkpoint to it when the layout differs (`ds_to_universal`, in a
subprocess on rank 0) and the engine then loads it with `checkpoint.load_universal`. The conversion is
made at resume time and kept beside the tag (`step...universal`), not written with every checkpoint:
it costs a full read and write of the optimizer state, which periodic saves should not pay for a resume
that rarely happens (times in the README). The global batch is kept: micro-batch and accumulation are
re-derived for the new world size (config/derive.py), and the data goes on by global samples
(data/loader.py). A resume on the same layout loads the tag itself and stays bit-exact.

Every decision is rank 0's, broadcast to the others: which tag (a stale view of a shared file system
could show two ranks two tags), whether to convert, and the run's configuration, whose digest every rank
compares at start so that mixed hardware or a different file on one node ends the job with one message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mixmae_scale.config import ConfigError, ResolvedConfig
from mixmae_scale.engine import checkpoint as ckpt
from mixmae_scale.engine import run_folder
from mixmae_scale.engine.faults import pick_checkpoint


@dataclass
class ResumePlan:
    tag: str  # the checkpoint whose step, job state and rank files the run continues from
    load_tag: str  # what DeepSpeed loads: the tag, or its universal conversion
    universal: bool
    saved_world: int
    same_layout: bool  # same world size and optimizer layout: each rank reads its own file back, bit-exact
    loader_override: dict[str, Any] | None = None
    skipped_samples: int = 0
    notes: list[str] = field(default_factory=list)
    saved_layout: dict[str, Any] | None = None  # the checkpoint's optimizer layout (the run record's old layout)


def _flat(tree: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(tree, sort_keys=True, default=str)}


def agree_on_configuration(resolved: ResolvedConfig, ds_config: dict[str, Any], layout: dict[str, Any]) -> str:
    """Collective. Every rank's resolved configuration, DeepSpeed config and optimizer layout must be rank 0's;
    otherwise every rank raises one ConfigError naming the ranks, their hosts and the first keys that differ."""
    settings = resolved.to_dict()
    # The device's name in the reasons may differ (two GPU models of one generation); what was chosen may not.
    settings["derived"] = {k: v for k, v in settings["derived"].items() if k not in ("dtype_reason", "dtype_warning")}
    mine = _flat({"config": {**settings, "sources": None}, "deepspeed": ds_config, "layout": layout})
    digest = hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()[:16]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (digest, socket.gethostname()))
    reference = gathered[0][0]
    odd = [rank for rank, (other, _) in enumerate(gathered) if other != reference]
    if not odd:
        return digest
    first = odd[0]
    values: list[Any] = [None]
    if dist.get_rank() == first:
        values[0] = mine
    dist.broadcast_object_list(values, src=first)
    rank0_values: list[Any] = [mine if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(rank0_values, src=0)
    theirs, ours = values[0], rank0_values[0]
    keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    shown = "; ".join(f"{k}: {ours.get(k)} on rank 0, {theirs.get(k)} on rank {first}" for k in keys[:4])
    ranks = ", ".join(f"{r} ({gathered[r][1]})" for r in odd[:8]) + (" ..." if len(odd) > 8 else "")
    raise ConfigError(f"ranks {ranks} resolved another configuration than rank 0 ({gathered[0][1]}): {shown}. Every "
                      "node must run the same files and settings; precision.dtype=auto decides per machine, so set "
                      "it explicitly on mixed hardware")


def _layout_changes(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    # A key a checkpoint lacks was written before it was recorded, at its value then: None (offload: False).
    saved = {"offload": False, **(saved or {})}
    return [f"{k} {saved.get(k)} -> {v}" for k, v in current.items() if saved.get(k) != v]


def convert_to_universal(ckpt_dir: Path, tag: str, workers: int = 2) -> Path:
    """DeepSpeed's ds_to_universal in a subprocess (its output in the run's log), written under a temporary name and
    sealed like a checkpoint; an earlier complete conversion is reused."""
    final = ckpt.universal_folder(ckpt_dir, tag)
    if (final / ckpt.MARKER).exists() and ckpt.damage(final) is None:
        return final
    partial = final.with_name(final.name + ckpt.PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir / tag),
               "--output_folder", str(partial), "--inject_missing_state", "--num_extract_workers", str(workers),
               "--num_merge_workers", str(workers)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    (ckpt_dir / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer; tags are chosen here
    if result.returncode:
        shutil.rmtree(partial, ignore_errors=True)
        tail = " ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise ckpt.ResumeError(f"converting {ckpt_dir / tag} to DeepSpeed's universal form failed: {tail}. Resume on "
                               "the same number of GPUs and precision, or run the conversion by hand: "
                               f"{' '.join(command)}")
    ckpt.seal(partial, {"universal_of": tag, "seconds": round(time.perf_counter() - start, 2)})
    ckpt.publish(partial, final)
    return final


def _decide(ckpt_dir: Path, resolved: ResolvedConfig, world: int, layout: dict[str, Any]) -> ResumePlan | None:
    config = resolved.config
    choice = pick_checkpoint(ckpt_dir, config.checkpoint.resume, config.faults.on_nonfinite_stop)
    if choice is None:
        return None
    tag = choice.tag
    saved = ckpt.read_rank_state(ckpt_dir, tag, 0)
    if saved.get("model_digest") != resolved.model_digest():
        raise ckpt.ResumeError(run_folder.another_model(ckpt_dir.parent, tag, saved, resolved.model_shape(),
                                                        resolved.model_digest()))
    saved_batch = saved.get("global_batch")
    if saved_batch is not None and saved_batch != resolved.derived.global_batch:
        raise ckpt.ResumeError(f"{(ckpt_dir / tag).resolve()} was trained at a global batch of {saved_batch}, this run "
                               f"has {resolved.derived.global_batch}: the step counter and the learning-rate schedule "
                               f"count batches of {saved_batch}; resume with --set batch.global_batch={saved_batch}, "
                               f"or, for another run, {run_folder.way_out(ckpt_dir.parent)}")
    saved_world = int(ckpt.marker(ckpt_dir, tag)["world_size"])
    changes = _layout_changes(saved.get("optimizer_layout"), layout)
    notes = list(choice.notes)
    stages = {(saved.get("optimizer_layout") or {}).get("zero_stage"), layout["zero_stage"]}
    if 0 in stages and changes:
        raise ckpt.ResumeError(f"{(ckpt_dir / tag).resolve()} cannot be resumed across {', '.join(changes)}: "
                               "DeepSpeed's universal checkpoint converts and loads ZeRO 1-3 optimizer shards, and "
                               "ZeRO-0 keeps none; resume with the checkpoint's zero.stage and precision.dtype")
    if saved_world != world and stages == {0}:  # ZeRO-0 saves the whole optimizer once: any world size loads it
        return ResumePlan(tag, tag, False, saved_world, False, choice.loader_override, choice.skipped_samples,
                          notes + [f"resuming {tag} (ZeRO-0) on {world} rank(s), written by {saved_world}"],
                          saved.get("optimizer_layout"))
    if saved_world != world:
        changes.insert(0, f"world size {saved_world} -> {world}")
    if not changes:
        return ResumePlan(tag, tag, False, saved_world, True, choice.loader_override, choice.skipped_samples, notes,
                          saved.get("optimizer_layout"))
    start = time.perf_counter()
    existing = (ckpt.universal_folder(ckpt_dir, tag) / ckpt.MARKER).exists()
    folder = convert_to_universal(ckpt_dir, tag)
    how = "reused its earlier conversion" if existing else f"converted in {time.perf_counter() - start:.1f} s"
    notes.append(f"resuming {tag} across a change of layout ({', '.join(changes)}): DeepSpeed's universal checkpoint "
                 f"carries the fp32 master weights and both Adam moments over ({how}: {folder})")
    return ResumePlan(tag, folder.name, True, saved_world, False, choice.loader_override, choice.skipped_samples,
                      notes, saved.get("optimizer_layout"))


def plan_resume(ckpt_dir: Path, resolved: ResolvedConfig, layout: dict[str, Any]) -> ResumePlan | None:
    """Collective: rank 0 decides (and converts where needed), every rank gets the same plan or the same error."""
    outcome: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            plan = _decide(ckpt_dir, resolved, dist.get_world_size(), layout)
            outcome[0] = ("plan", dataclasses.asdict(plan) if plan else None)
        except (ckpt.ResumeError, ConfigError, OSError) as exc:
            outcome[0] = ("error", type(exc).__name__, str(exc))
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0][0] == "error":
        kind = ConfigError if outcome[0][1] == "ConfigError" else ckpt.ResumeError
        raise kind(outcome[0][2])
    return ResumePlan(**outcome[0][1]) if outcome[0][1] else None


def match_optimizer_steps(engine) -> None:
    """Adam's step counts in the form this run's optimizer keeps them. DeepSpeed's CPU Adam (offload) keeps `step`
    as a number, torch's AdamW as a tensor; a universal checkpoint carries whichever wrote it, so turning offload on
    or off across a resume would otherwise stop at the first step ("state_steps ... must contain ... tensors")."""
    import torch

    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    wants_tensor = isinstance(base, torch.optim.Optimizer) and type(base).__module__.startswith("torch.optim")
    for state in getattr(base, "state", {}).values():
        step = state.get("step")
        if step is None:
            continue
        if wants_tensor and not isinstance(step, torch.Tensor):
            state["step"] = torch.tensor(float(step))
        elif not wants_tensor and isinstance(step, torch.Tensor):
            state["step"] = int(step.item())


def rank_file_for(rank: int, plan: ResumePlan) -> int:
    """Which of the checkpoint's rank files this rank reads: its own on the same layout; otherwise one of the old
    ranks' (the loader position is the same in all; generators are carried over round-robin)."""
    return rank if plan.same_layout else rank % plan.saved_world
