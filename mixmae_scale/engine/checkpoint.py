"""Checkpoints: DeepSpeed's sharded save plus our per-rank state and a completion marker.

DeepSpeed writes weights, optimizer and scheduler states; each rank adds its own state (loader
position, RNG) as `rank_{r}.json`; after a barrier, rank 0 writes `COMPLETE`. Only folders with the
marker count: a run killed mid-save resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mixmae_scale.atomic_file import write_text

MARKER = "COMPLETE"


class ResumeError(RuntimeError):
    """A checkpoint that this run must not resume from; the message says why and what to do."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if (p / MARKER).exists())


def rng_state() -> str:
    buffer = io.BytesIO()
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def restore_rng_state(text: str) -> None:
    state = torch.load(io.BytesIO(base64.b64decode(text)), weights_only=True)
    torch.set_rng_state(state["cpu"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
         keep_last: int) -> Path:
    """Collective: every rank calls it at the same step."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    rank = dist.get_rank()
    write_text(ckpt_dir / tag / f"rank_{rank}.json", json.dumps(rank_state))
    dist.barrier()
    if rank == 0:
        write_text(ckpt_dir / tag / MARKER, json.dumps({"step": step, "world_size": dist.get_world_size()}))
        for old in complete_tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()
    return ckpt_dir / tag


def find_resume(ckpt_dir: Path, resume: str) -> str | None:
    """The tag to resume from: 'auto' takes the newest complete one, 'none' none, else a tag or path."""
    if resume == "none":
        return None
    if resume == "auto":
        tags = complete_tags(ckpt_dir)
        return tags[-1] if tags else None
    tag = Path(resume).name
    if not (ckpt_dir / tag / MARKER).exists():
        raise ResumeError(f"checkpoint.resume={resume!r}: {ckpt_dir / tag} is not a complete checkpoint "
                          f"(complete ones: {complete_tags(ckpt_dir) or 'none'})")
    return tag


def optimizer_layout(ds_config: dict[str, Any]) -> dict[str, Any]:
    """What fixes the layout of DeepSpeed's optimizer shards, read from the config DeepSpeed gets: the
    ZeRO stage, the precision and the gradient-accumulation dtype (which select the optimizer wrapper:
    bf16 with fp32 accumulation at ZeRO-1 is DeepSpeed's BF16_Optimizer) and, at stage 3, the sub-groups
    the partition is cut into (DeepSpeed's default: 1e9 elements)."""
    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    dtype = next((name for name in ("bf16", "fp16") if ds_config.get(name, {}).get("enabled")), "fp32")
    return {"zero_stage": stage, "dtype": dtype,
            "sub_group_size": int(zero.get("sub_group_size", 1_000_000_000)) if stage == 3 else None,
            "grad_accum_dtype": ds_config.get("data_types", {}).get("grad_accum_dtype")}


def check_compatible(ckpt_dir: Path, tag: str, model_digest: str, world_size: int,
                     layout: dict[str, Any] | None = None) -> None:
    marker = json.loads((ckpt_dir / tag / MARKER).read_text())
    saved_world = int(marker["world_size"])
    meta_path = ckpt_dir / tag / "rank_0.json"
    saved = json.loads(meta_path.read_text())
    if saved.get("model_digest") != model_digest:
        raise ResumeError(f"{ckpt_dir / tag} holds a model of another shape (digest {saved.get('model_digest')}, "
                          f"this run {model_digest}): model.* must match the run being resumed; start a new "
                          "run directory or set checkpoint.resume=none")
    if saved_world != world_size:
        raise ResumeError(f"{ckpt_dir / tag} was written by {saved_world} ranks, this run has {world_size}: ZeRO "
                          "optimizer shards are per rank. Convert it with DeepSpeed's ds_to_universal.py and load "
                          "the universal checkpoint, or resume on the same number of GPUs")
    saved_layout = saved.get("optimizer_layout")
    # A key a checkpoint lacks was written before it was recorded, at its value then: None.
    changed = ", ".join(f"{k} {saved_layout.get(k)} -> {v}" for k, v in (layout or {}).items()
                        if saved_layout is not None and saved_layout.get(k) != v)
    if changed:
        raise ResumeError(f"{ckpt_dir / tag} holds DeepSpeed optimizer shards of another layout ({changed}); "
                          "DeepSpeed cannot load them as they are. Resume with the same zero.stage, precision.dtype "
                          "and sub_group_size, or convert the checkpoint with DeepSpeed's ds_to_universal.py")


def read_rank_state(ckpt_dir: Path, tag: str, rank: int) -> dict[str, Any]:
    return json.loads((ckpt_dir / tag / f"rank_{rank}.json").read_text())
