"""Faults that real runs meet, on 2 CPU ranks through the real launchers (gloo): non-finite losses and gradients,
a non-finite stop and the resume past its data, a damaged or half-written checkpoint, Slurm's signals to every
process of a job, ranks started by `srun` itself, and what a killed run leaves in /dev/shm.

Slurm cannot run here: its signals are sent the way it sends them (SIGTERM to every process of the step), and
`srun`'s environment is set by hand for two ranks on this host; the tests say which."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from free_port import free_port
from test_pretrain import launch, losses, wait_for_steps

pytestmark = pytest.mark.slow
WORKERS = Path(__file__).parent / "workers"


def test_every_zero_stage_and_precision_skips_an_update_with_non_finite_gradients():
    """A finite loss whose gradients are NaN, through DeepSpeed's real engine on one rank: no weight changes and
    `was_step_applied()` is false at ZeRO 0 (our FiniteStepAdamW), 1, 2 and 3, in fp32 and (where the CPU computes it
    natively) bf16; the clean step after it is applied."""
    import torch

    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # emulated bf16 is ~100x slower: fp32 only there
    cases = [f"{stage}:{dtype}" for stage in (0, 1, 2, 3) for dtype in (("fp32", "bf16") if native_bf16 else ("fp32",))]
    result = subprocess.run([sys.executable, str(WORKERS / "nonfinite_steps.py"), *cases], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [f"{r['stage']}:{r['dtype']}" for r in rows] == cases
    for row in rows:
        assert row["nan_grad_step"] == {"loss_finite": True, "applied": False, "weights_changed": False,
                                        "weights_finite": True}, row
        assert row["clean_step"]["applied"] and row["clean_step"]["weights_changed"], row


def test_one_inf_gradient_element_on_one_rank_skips_the_update_on_both_ranks():
    """The common real case, not every gradient NaN everywhere: one element of one gradient is +inf on rank 1
    alone (two worker processes on this host, gloo). At every ZeRO stage in fp32 neither rank applies the step
    nor changes a weight, and after the clean step the two ranks hold the same weights. The loop's own agreed read
    of a micro-step (`step_decision`) also runs there: a NaN loss on rank 1 alone and a stop asked on rank 0 alone
    reach both ranks."""
    cases = [f"{stage}:fp32:inf-on-rank-1" for stage in (0, 1, 2, 3)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen([sys.executable, str(WORKERS / "nonfinite_steps.py"), *cases],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outputs = [rank.communicate(timeout=600) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), outputs[0][1][-2000:] + outputs[1][1][-2000:]
    rows = {r: [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            for r, (out, _) in enumerate(outputs)}
    for zero, one in zip(rows[0], rows[1], strict=True):
        assert zero["stage"] == one["stage"] and (zero["rank"], one["rank"]) == (0, 1)
        for row in (zero, one):
            assert row["nan_grad_step"] == {"loss_finite": True, "applied": False, "weights_changed": False,
                                            "weights_finite": True}, row
            assert row["clean_step"]["applied"] and row["clean_step"]["weights_changed"], row
        assert zero["weights_sum"] == one["weights_sum"], (zero, one)
    assert [r["stage"] for r in rows[0]] == [0, 1, 2, 3]
    decisions = [json.loads(line.removeprefix("decision ")) for out, _ in outputs for line in out.splitlines()
                 if line.startswith("decision ")]  # a NaN loss on rank 1 alone and a stop on rank 0 alone
    assert decisions == [{"rank": 0, "nonfinite_ranks": 1, "stop_votes": 1},
                         {"rank": 1, "nonfinite_ranks": 1, "stop_votes": 1}]


def test_a_non_finite_stop_resumes_past_the_bad_data(demo_shards, tmp_path):
    """Accumulation 1 (the at-scale profiles'). Micro-batch 3 has a NaN loss (skipped), micro-batch 5 NaN
    gradients (the update is not applied and the step is redone), micro-batches 9-11 NaN losses in a row: past
    faults.nonfinite_skip_limit=2 the run stops at step 7 with a checkpoint under a new tag. Run again with the same
    faults injected, it rolls back to step 6's regular checkpoint, skips the 4 micro-batches x 2 ranks x 8 samples
    read since (the bad batches are never read again) and finishes. Which checkpoint a resume trusts (damage,
    `.partial` leftovers, the three policies' arithmetic) is tested without ranks in tests/unit/test_resume_logic.py."""
    run = tmp_path / "faults"
    stale = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_1_0"  # a killed run's leftover
    stale.write_bytes(b"\0" * 4096)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    other = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid() + 1}_127.0.0.1_1_0"  # another user's
    other.write_bytes(b"\0")
    os.utime(other, (time.time() - 3600, time.time() - 3600))
    faults = ("precision.dtype=fp32", "checkpoint.every_steps=2", "faults.nonfinite_skip_limit=2",
              "faults.inject_nan_loss_at_batches=[3,9,10,11]", "faults.inject_nan_grad_at_batches=[5]")
    try:
        first = launch(run, demo_shards, *faults, max_steps=8, check=False)
        assert not stale.exists() and other.exists()
    finally:
        other.unlink(missing_ok=True)
        stale.unlink(missing_ok=True)
    output = first.stdout + first.stderr
    assert first.returncode == 3, output[-3000:]
    assert "non-finite loss at step 3 (1 in a row)" in output
    assert "non-finite gradients at step 4 (1 in a row): update skipped" in output
    assert "3 non-finite attempts in a row at step 7" in output and "4 losses and 1 gradient steps" in output
    checkpoints = run / "checkpoints"
    assert (checkpoints / "step00000007-nonfinite" / "COMPLETE").exists()
    assert (checkpoints / "step00000006" / "COMPLETE").exists()
    steps_logged = losses(run)
    assert sorted(steps_logged) == list(range(1, 8)) and all(v == v for v in steps_logged.values())

    second = launch(run, demo_shards, *faults, max_steps=8)
    output = second.stdout + second.stderr
    assert "rolling back to step00000006 (step 6) and skipping the 64 samples read since" in output, output[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["skipped_samples_after_nonfinite"] == 64
    assert summary["skipped_nonfinite"] == 0  # batches 9-11 were not read again
    assert not (checkpoints / "step00000007-nonfinite").exists()  # a newer regular checkpoint replaced it


def _common(run: Path, shards: Path) -> list[str]:
    return ["pretrain", "--profile", "tiny", "--run-dir", str(run), "--set", f"data.shards={shards}", "batch.micro=8",
            "batch.global_batch=16", "logging.every_steps=1", "logging.heldout_batches=1", "data.shuffle_buffer=64",
            "logging.visualize_every_steps=0", "precision.dtype=fp32", "checkpoint.every_steps=1000"]


def test_slurm_time_limit_sigterm_to_every_process_saves_within_killwait_and_exits_zero(demo_shards, tmp_path):
    """What Slurm does at the time limit: SIGTERM to every process of the job step at once (here the step's process
    group: the relay the sbatch script runs, DeepSpeed's runner, its launch.py and both ranks), SIGKILL 30 s later
    (KillWait). The runner outlives it (the relay started it with SIGTERM ignored) and launch.py exits 1; the ranks
    save at the next step boundary, and the relay exits 0 because they did."""
    run = tmp_path / "time-limit"
    bin_dir = Path(sys.executable).parent
    command = [sys.executable, "-m", "mixmae_scale.cluster.signal_relay", str(bin_dir / "deepspeed"), "--num_gpus",
               "2", "--master_port", str(free_port()), "--module", "mixmae_scale.cli", *_common(run, demo_shards),
               "--max-steps", "400"]
    proc = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for_steps(run, proc)
    group = [proc, *psutil.Process(proc.pid).children(recursive=True)]
    assert len(group) >= 4  # relay, runner, launch.py, 2 ranks
    signalled = time.time()
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    elapsed = time.time() - signalled
    assert proc.returncode == 0, output[-3000:]
    assert elapsed < 30, f"{elapsed:.0f} s: past Slurm's default KillWait"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by_signal"] and (Path(summary["checkpoint"]) / "COMPLETE").exists()
    assert "and stopped as asked" in output


def test_ranks_started_by_srun_read_their_place_from_slurm_and_save_on_sigterm(demo_shards, tmp_path):
    """launch/slurm/pretrain_srun.sbatch's layout: one task per GPU, no launcher. Two ranks on this host with the
    variables `srun --ntasks=2` sets (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_STEP_ID, the node list);
    Slurm's SIGTERM goes to each rank itself: both save the same step and exit 0."""
    run = tmp_path / "srun"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_NTASKS="2",
               SLURM_STEP_NODELIST="localhost", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port))
    ranks = [subprocess.Popen([sys.executable, "-m", "mixmae_scale.cli", *_common(run, demo_shards), "--max-steps",
                               "400"], env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    wait_for_steps(run, ranks[0])
    for rank in ranks:
        rank.send_signal(signal.SIGTERM)
    outputs = [rank.communicate(timeout=120)[0] for rank in ranks]
    assert [r.returncode for r in ranks] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by_signal"] and (Path(summary["checkpoint"]) / "COMPLETE").exists()
    marker = json.loads((Path(summary["checkpoint"]) / "COMPLETE").read_text())
    assert marker["world_size"] == 2 and {"rank_0.json", "rank_1.json"} <= set(marker["files"])
