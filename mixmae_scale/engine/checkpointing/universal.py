"""DeepSpeed's universal checkpoint: when a resume needs it, how it is made, and the one fix it needs on load.

ZeRO shards the optimizer per rank, so a checkpoint written by 16 ranks cannot be loaded as it is by 8,
nor by a run whose precision or ZeRO layout differs (bf16 on one machine, fp32 on one without native
bf16). The universal form stores each parameter's fp32 master weights and both Adam moments whole. It is
made at resume time and kept beside the tag (`step...universal`), not written with every checkpoint: it
costs a full read and write of the optimizer state, which periodic saves should not pay for a resume that
rarely happens (benchmarks/universal_conversion.py measures it).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mixmae_scale.engine.checkpointing import store


def optimizer_layout(ds_config: dict[str, Any]) -> dict[str, Any]:
    """What fixes the layout of DeepSpeed's optimizer shards, read from the config DeepSpeed gets: the
    ZeRO stage, the precision and the gradient-accumulation dtype (which select the optimizer wrapper:
    bf16 with fp32 accumulation at ZeRO-1 is DeepSpeed's BF16_Optimizer), offload and, at stage 3, the
    sub-groups the partition is cut into (DeepSpeed's default: 1e9 elements). A resume across any change of
    these (or of the world size) goes through the universal checkpoint."""
    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    dtype = next((name for name in ("bf16", "fp16") if ds_config.get(name, {}).get("enabled")), "fp32")
    return {"zero_stage": stage, "dtype": dtype,
            "sub_group_size": int(zero.get("sub_group_size", 1_000_000_000)) if stage == 3 else None,
            "grad_accum_dtype": ds_config.get("data_types", {}).get("grad_accum_dtype"),
            "offload": bool(zero.get("offload_optimizer"))}


def layout_changes(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """Each optimizer-layout key that differs, as "key old -> new". A key a checkpoint lacks was written before
    it was recorded, at its value then: None (offload: False)."""
    saved = {"offload": False, **(saved or {})}
    return [f"{k} {saved.get(k)} -> {v}" for k, v in current.items() if saved.get(k) != v]


CONVERTER = "deepspeed.checkpoint.ds_to_universal"
# Run as the converter's first lines: SIGTERM and SIGUSR1 ignored (an ignored signal stays ignored across fork and
# exec, so ds_to_universal's worker processes ignore them too), then the converter as `python -m` would run it.
SHIELD = ("import runpy, signal, sys\n"
          "for name in ('SIGTERM', 'SIGUSR1'):\n"
          "    signal.signal(getattr(signal, name), signal.SIG_IGN)\n"
          "module = sys.argv.pop(1)\n"
          "runpy.run_module(module, run_name='__main__', alter_sys=True)\n")


class ConversionInterrupted(store.ResumeError):
    """The converter was killed by a signal: nothing is wrong with the input, the same command may succeed (exit 1,
    not the refused input's 2: cli/failure_report.is_refused_input)."""


def converter_command(ckpt_dir: Path, tag: str, output: Path, workers: int) -> list[str]:
    """The conversion as one would run it by hand (`python -m deepspeed.checkpoint.ds_to_universal ...`)."""
    return [sys.executable, "-m", CONVERTER, "--input_folder", str(ckpt_dir / tag), "--output_folder", str(output),
            "--inject_missing_state", "--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]


def run_shielded(command: list[str]) -> subprocess.CompletedProcess:
    """`command` (a `python -m module ...` line) run where the rank's stop signals do not reach it: in a session of its
    own (a signal to the rank's process group, a terminal's Ctrl-C, does not reach it) and with SIGTERM and SIGUSR1
    ignored (Slurm's `--signal` and `scancel` signal every process of a job step by its id). A preemption during a
    resume's conversion used to kill the converter: the ranks exited 2 ("failed: ." and no reason), which a
    resubmitting script reads as input refused for good. Now the conversion finishes, and the rank's own stop flag,
    set by the same signal, saves and stops at the first step boundary as a stop always does."""
    assert command[1] == "-m", command
    return subprocess.run([command[0], "-c", SHIELD, *command[2:]], capture_output=True, text=True,
                          start_new_session=True)


def failure_reason(result: subprocess.CompletedProcess) -> str:
    """Why the converter failed: the last lines it wrote, and the signal that killed it (a negative returncode)."""
    tail = " ".join((result.stderr or result.stdout or "").strip().splitlines()[-3:])
    if result.returncode < 0:
        try:
            name = signal.Signals(-result.returncode).name
        except ValueError:
            name = f"signal {-result.returncode}"
        killed = f"the converter was killed by {name} (signal {-result.returncode})"
        return f"{killed}; its last output: {tail}" if tail else killed
    return tail or f"the converter exited {result.returncode} without output"


def convert_to_universal(ckpt_dir: Path, tag: str, workers: int = 2) -> Path:
    """DeepSpeed's ds_to_universal in a subprocess shielded from the rank's stop signals (`run_shielded`), written
    under a temporary name and sealed like a checkpoint; an earlier complete conversion is reused."""
    final = store.universal_folder(ckpt_dir, tag)
    if (final / store.MARKER).exists() and store.damage(final) is None:
        return final
    partial = final.with_name(final.name + store.PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    command = converter_command(ckpt_dir, tag, partial, workers)
    start = time.perf_counter()
    result = run_shielded(command)
    (ckpt_dir / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer; tags are chosen here
    if result.returncode:
        shutil.rmtree(partial, ignore_errors=True)
        message = (f"converting {ckpt_dir / tag} to DeepSpeed's universal form failed: {failure_reason(result)}. ")
        if result.returncode < 0:
            raise ConversionInterrupted(message + "The checkpoint is as it was: run the same command again")
        raise store.ResumeError(message + "Resume on the same number of GPUs and precision, or run the conversion "
                                f"by hand: {' '.join(command)}")
    store.seal(partial, {"universal_of": tag, "seconds": round(time.perf_counter() - start, 2)})
    store.publish(partial, final)
    return final


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
