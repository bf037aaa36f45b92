"""The Slurm scripts run as written on a first submission, with Slurm simulated: no Slurm is installed here, so
stand-in `srun`, `scontrol` and `python` scripts on PATH record the command lines that reach them, and each
sbatch file runs under bash with the environment variables Slurm would set. What is checked is what a real
submission depends on: the log file Slurm opens before the script runs, the interpreter taken from the
environment, arguments that keep their quoting, and the GPU count in every form Slurm sets it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

SLURM = Path(__file__).resolve().parents[2] / "launch" / "slurm"
SCRIPTS = ("pretrain.sbatch", "pretrain_srun.sbatch")

RECORDER = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$RECORDS/{name}.args"
"""
# srun records its own arguments, then runs the command after its options on "node 1" of the allocation.
SRUN = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$RECORDS/srun.args"
while [[ $1 == -* ]]; do shift; done
SLURM_NODEID=1 exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && printf 'gpu-a\\ngpu-b\\n'
"""


@pytest.fixture
def slurm(tmp_path):
    """A submission folder, a PATH with the stand-ins, and Slurm's batch-step environment (2 nodes)."""
    bin_dir, records, submit = tmp_path / "bin", tmp_path / "records", tmp_path / "submit dir"
    for folder in (bin_dir, records, submit):
        folder.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("python", RECORDER.format(name="python"))):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "RECORDS": str(records),
           "SLURM_SUBMIT_DIR": str(submit), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-[a-b]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2", "PROFILE": "swin_b", "CLUSTER": "my cluster.yaml"}
    return env, records, submit


def submit(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM / script), *args], env=env, capture_output=True, text=True, timeout=60)


def recorded(records: Path, name: str) -> list[str]:
    return (records / f"{name}.args").read_bytes().decode().split("\0")[:-1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_log_goes_where_slurm_can_open_it_before_the_script_runs(script):
    """`#SBATCH --output=logs/...` fails on a fresh clone: Slurm opens the file before the script's mkdir."""
    outputs = re.findall(r"^#SBATCH\s+(?:--output|-o|--error|-e)[= ](\S+)", (SLURM / script).read_text(), re.M)
    assert outputs and all("/" not in path for path in outputs), outputs


@pytest.mark.parametrize("script", SCRIPTS)
def test_quoted_arguments_and_the_environments_python_reach_the_ranks(script, slurm):
    env, records, submit_dir = slurm
    env = {**env, "SLURM_GPUS_PER_NODE": "a100:8"}
    result = submit(script, env, "--set", "run.name=my run", "data.shards=/data/with space", "--max-steps", "5")
    assert result.returncode == 0, result.stderr
    args = recorded(records, "python")
    assert args[-5:] == ["--set", "run.name=my run", "data.shards=/data/with space", "--max-steps", "5"]
    assert args[args.index("--profile"):][:4] == ["--profile", "swin_b", "--cluster", "my cluster.yaml"]
    assert "cluster.num_nodes=2" in args and "cluster.gpus_per_node=8" in args
    assert not any(".venv" in a for a in recorded(records, "srun") + args)
    if script == "pretrain.sbatch":  # one launcher per node: the relay, then DeepSpeed's runner on this python
        assert args[:6] == ["-m", "mixmae_scale.cluster.signal_relay", "python", "-m", "deepspeed.launcher.runner",
                            "--no_ssh"]
        assert args[args.index("--node_rank") + 1] == "1"  # read on the node, not in the batch step
        assert args[args.index("--num_gpus") + 1] == "8" and args[args.index("--master_addr") + 1] == "gpu-a"
        assert (submit_dir / "logs" / "hostfile-4242").read_text() == "gpu-a slots=8\ngpu-b slots=8\n"
    else:
        assert args[:3] == ["-m", "mixmae_scale.cli", "pretrain"]


@pytest.mark.parametrize("variables, gpus", [
    ({"SLURM_GPUS_ON_NODE": "8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "a100:8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "gpu:a100:8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "a100:4,v100:2"}, 6),
    ({"SLURM_JOB_GPUS": "0,1,2,3"}, 4),
    ({"SLURM_STEP_GPUS": "4,5"}, 2),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, 3),
    ({"SLURM_GPUS": "h100:16"}, 8),  # --gpus=h100:16 over the 2 nodes
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "a100:8"}, 4),  # what the node has wins
    ({"MIXMAE_GPUS_PER_NODE": "2", "SLURM_GPUS_PER_NODE": "a100:8"}, 2),
])
@pytest.mark.parametrize("script", SCRIPTS)
def test_gpus_per_node_are_read_in_every_form_slurm_sets(script, slurm, variables, gpus):
    env, records, _ = slurm
    result = submit(script, {**env, **variables})
    assert result.returncode == 0, result.stderr
    args = recorded(records, "python")
    assert f"cluster.gpus_per_node={gpus}" in args
    if script == "pretrain.sbatch":
        assert args[args.index("--num_gpus") + 1] == str(gpus)


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_gpu_count_or_no_python_is_one_line_and_nothing_starts(script, slurm):
    env, records, _ = slurm
    result = submit(script, env)
    assert result.returncode != 0 and not (records / "srun.args").exists()
    assert result.stderr.strip().splitlines()[-1].startswith("mixmae: error: cannot tell how many GPUs this node has")
    result = submit(script, {**env, "SLURM_GPUS_PER_NODE": "8", "MIXMAE_PYTHON": "/opt/nowhere/python"})
    assert result.returncode == 2 and not (records / "srun.args").exists()
    assert result.stderr.strip() == ("mixmae: error: no '/opt/nowhere/python' on PATH: activate the environment "
                                     "mixmae-scale is installed in before sbatch, or set MIXMAE_PYTHON=/path/to/python")


def test_both_scripts_read_gpus_the_same_way():
    def function(script: str) -> str:
        text = (SLURM / script).read_text()
        return text[text.index("gpus_on_node() {"):text.index("\n}\n", text.index("gpus_on_node() {"))]

    assert function("pretrain.sbatch") == function("pretrain_srun.sbatch")
