"""The Slurm scripts run as written on a first submission, with Slurm simulated: no Slurm is installed here, so
stand-in `srun`, `scontrol` and `python` scripts on PATH record the command lines that reach them, and each
sbatch file runs under bash with the environment variables Slurm would set. What is checked is what a real
submission depends on: the log file Slurm opens before the script runs, the interpreter taken from the
environment, arguments that keep their quoting, the GPU count in every form Slurm sets it, the hostfile DeepSpeed's
runner places ranks by, the rendezvous port, cluster.env and srun's CPU count. The stand-in `python` runs the real
interpreter for the helpers the scripts call around srun (cluster/shell_env.py, cluster/requeue.py,
cluster/restart.py) and records the rest; `scontrol` records any call but `show hostnames`."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from deepspeed_launcher import deepspeed_would_start

from mixmae_scale.config import ConfigError, load_resolved

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "launch" / "slurm"
SCRIPTS = ("pretrain.sbatch", "pretrain_srun.sbatch")

RECORDER = """#!/usr/bin/env bash
[[ $2 == mixmae_scale.cluster.@(shell_env|requeue|restart) ]] && exec "$REAL_PYTHON" "$@"
printf '%s\\0' "$@" > "$RECORDS/{name}.args"
env > "$RECORDS/{name}.env"
"""
# srun records its own arguments, then runs the command after its options on "node 1" of the allocation.
SRUN = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$RECORDS/srun.args"
[[ -n ${SRUN_RC:-} ]] && exit "$SRUN_RC"  # the step failed
while [[ $1 == -* ]]; do [[ $1 == -c ]] && shift; shift; done
SLURM_NODEID=1 exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && { printf 'gpu-a\\ngpu-b\\n'; exit 0; }
printf '%s\\0' "$@" > "$RECORDS/scontrol.args"
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
    (submit / "my cluster.yaml").write_text("cluster:\n  env:\n    NCCL_SOCKET_IFNAME: ib0\n")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "RECORDS": str(records),
           "REAL_PYTHON": sys.executable, "PYTHONPATH": str(ROOT),
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


@pytest.mark.parametrize("script", SCRIPTS)
def test_gpus_that_do_not_split_evenly_over_the_nodes_are_refused_with_the_counts(script, slurm):
    """`sbatch --gpus=16 --nodes=3` (SLURM_GPUS, no per-node variable): the count per node was rounded down to 5,
    silently, and every node ran 5 ranks. Slurm is simulated by its variables; nothing starts."""
    env, records, _ = slurm
    env = {**env, "SLURM_GPUS": "h100:16", "SLURM_JOB_NUM_NODES": "3", "SLURM_NNODES": "3"}
    result = submit(script, env)
    assert result.returncode == 2 and not (records / "srun.args").exists()
    assert result.stderr.strip().splitlines()[-1] == (
        "mixmae: error: --gpus=h100:16 does not split evenly over 3 nodes, and every node runs as many ranks as the "
        "first: request --gpus-per-node=N, or set MIXMAE_GPUS_PER_NODE=5 to use that many on each node")
    result = submit(script, {**env, "SLURM_GPUS": "2", "SLURM_JOB_NUM_NODES": "3"})  # fewer GPUs than nodes
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "mixmae: error: --gpus=2 does not split evenly over 3 nodes, and every node runs as many ranks as the first: "
        "request --gpus-per-node=N")
    result = submit(script, {**env, "MIXMAE_GPUS_PER_NODE": "5"})  # the way out it names
    assert result.returncode == 0, result.stderr
    assert "cluster.gpus_per_node=5" in recorded(records, "python")


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("variable", ["SLURM_HET_SIZE", "SLURM_PACK_SIZE"])  # its name before Slurm 20.02
def test_a_heterogeneous_job_is_refused_before_anything_starts(script, slurm, variable):
    """A heterogeneous job's batch script sees its first component only (nodes, GPUs, CPUs): the scripts started one
    step over it as if every node were alike. Slurm is simulated by the variable it sets; nothing starts."""
    env, records, _ = slurm
    result = submit(script, {**env, "SLURM_GPUS_PER_NODE": "8", variable: "2"}, "--set", "run.name=x")
    assert result.returncode == 2 and not (records / "srun.args").exists() and not (records / "python.args").exists()
    assert result.stderr.strip() == (
        f"mixmae: error: job 4242 is a heterogeneous job of 2 components ({variable}=2): this script starts one "
        "step with the same GPUs and tasks on every node; submit one component (no hetjob/':' between option "
        "groups) with --nodes and --gpus-per-node for all nodes")


def test_both_scripts_read_gpus_the_same_way():
    def function(script: str) -> str:
        text = (SLURM / script).read_text()
        return text[text.index("gpus_on_node() {"):text.index("\n}\n", text.index("gpus_on_node() {"))]

    assert function("pretrain.sbatch") == function("pretrain_srun.sbatch")


def recorded_env(records: Path, name: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (records / f"{name}.env").read_text().splitlines() if "=" in line)


def test_deepspeeds_runner_gets_the_allocations_hostfile_and_places_this_node(slurm, monkeypatch):
    """Without --hostfile the runner looks for /job/hostfile, finds one host and refuses --num_nodes 2 ("Num nodes
    is >1 but no extra nodes available via hostfile"). DeepSpeed's own `main` runs on the arguments the script
    gave it, with its Popen replaced: the per-node launch.py command it would start is checked, no rank starts."""
    env, records, submit_dir = slurm
    result = submit("pretrain.sbatch", {**env, "SLURM_GPUS_PER_NODE": "8"})
    assert result.returncode == 0, result.stderr
    args = recorded(records, "python")
    hostfile = submit_dir / "logs" / "hostfile-4242"
    assert args[args.index("--hostfile") + 1] == str(hostfile)
    assert hostfile.read_text() == "gpu-a slots=8\ngpu-b slots=8\n"
    launch = deepspeed_would_start(args[args.index("deepspeed.launcher.runner") + 1:], monkeypatch)
    world = next(a for a in launch if a.startswith("--world_info="))
    assert json.loads(base64.urlsafe_b64decode(world.split("=", 1)[1])) == {"gpu-a": list(range(8)),
                                                                           "gpu-b": list(range(8))}
    assert "--node_rank=1" in launch and "--master_addr=gpu-a" in launch


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("variables, cluster_port, port", [
    ({}, None, "14242"),  # 10000 + job id 4242 % 20000: another job on the node gets another port
    ({}, 29555, "29555"),  # cluster.master_port
    ({"MASTER_PORT": "31000"}, 29555, "31000"),  # the user's own
])
def test_the_rendezvous_port_comes_from_the_job_unless_set(script, slurm, variables, cluster_port, port):
    env, records, submit_dir = slurm
    if cluster_port:
        (submit_dir / "my cluster.yaml").write_text(f"cluster:\n  master_port: {cluster_port}\n")
    result = submit(script, {**env, "SLURM_GPUS_PER_NODE": "8", **variables})
    assert result.returncode == 0, result.stderr
    assert rendezvous_port(script, records) == port


def rendezvous_port(script: str, records) -> str:
    """The port the step's ranks were given: the launcher's --master_port (pretrain.sbatch), MASTER_PORT in the
    environment of each srun task (pretrain_srun.sbatch)."""
    if script == "pretrain.sbatch":
        ranks = recorded(records, "python")
        return ranks[ranks.index("--master_port") + 1]
    return recorded_env(records, "python")["MASTER_PORT"]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("where, variables, port", [
    ("profile", {}, "23456"),  # a profile file's cluster.master_port
    ("--set", {}, "24680"),  # a --set after the script, no cluster file
    ("--set over the file", {}, "24680"),  # a --set wins over the cluster file's, as on the ranks
    ("--set=", {"MASTER_PORT": "31000"}, "31000"),  # the user's MASTER_PORT wins over all of them
])
def test_a_master_port_from_the_profile_or_a_set_after_the_script_is_the_rendezvous_port(script, slurm, where,
                                                                                        variables, port):
    """The scripts read cluster.master_port from the cluster file alone: one in the profile or in a `--set` after
    the script was ignored without a word, and the job rendezvoused on the job-id port. The port is read from the
    job's configuration as the ranks parse the arguments; MASTER_PORT in the environment still wins."""
    env, records, submit_dir = slurm
    env = {**env, "SLURM_GPUS_PER_NODE": "8", **variables}
    args: tuple[str, ...] = ()
    if where == "profile":
        (submit_dir / "ported.yaml").write_text("cluster:\n  master_port: 23456\n")
        env = {**env, "PROFILE": str(submit_dir / "ported.yaml")}
        env.pop("CLUSTER")
    elif where == "--set":
        env.pop("CLUSTER")
        args = ("--set", "cluster.master_port=24680")
    elif where == "--set over the file":
        (submit_dir / "my cluster.yaml").write_text("cluster:\n  master_port: 29555\n  env:\n    A_B: c\n")
        args = ("--set", "cluster.master_port=24680")
    else:
        args = ("--set=cluster.master_port=24680",)
    result = submit(script, env, *args)
    assert result.returncode == 0, result.stderr
    assert rendezvous_port(script, records) == port
    if where == "--set over the file":
        assert recorded_env(records, "python")["A_B"] == "c"  # the file's cluster.env is still exported


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_master_port_set_outside_tcps_range_after_the_script_is_refused_before_the_step(script, slurm):
    env, records, _ = slurm
    result = submit(script, {**env, "SLURM_GPUS_PER_NODE": "8"}, "--set", "cluster.master_port=70000")
    assert result.returncode == 2 and not (records / "srun.args").exists()
    assert "cluster.master_port=70000 is not a TCP port (1-65535)" in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_cluster_env_reaches_the_step_and_srun_asks_for_the_jobs_cpus(script, slurm):
    """srun stopped inheriting --cpus-per-task in Slurm 22.05; .deepspeed_env is not read on these paths."""
    env, records, submit_dir = slurm
    (submit_dir / "my cluster.yaml").write_text("cluster:\n  env:\n    NCCL_SOCKET_IFNAME: ib0\n"
                                                "    NCCL_NET: \"a b'c\"\n")
    result = submit(script, {**env, "SLURM_GPUS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "64"})
    assert result.returncode == 0, result.stderr
    step_env = recorded_env(records, "python")
    assert step_env["NCCL_SOCKET_IFNAME"] == "ib0" and step_env["NCCL_NET"] == "a b'c"
    srun = recorded(records, "srun")
    assert srun[srun.index("-c") + 1] == "64"
    assert re.search(r"^#SBATCH --open-mode=append\b", (SLURM / script).read_text(), re.M)
    (submit_dir / "my cluster.yaml").write_text("cluster:\n  env:\n    NCCL-X: 1\n")
    result = submit(script, {**env, "SLURM_GPUS_PER_NODE": "8"})
    assert result.returncode == 2 and result.stderr.strip() == (
        "mixmae: error: my cluster.yaml: cluster.env key 'NCCL-X' is not an environment variable name (letters, "
        "digits, _; not starting with a digit)")


def test_each_nodes_launcher_keeps_to_the_gpus_slurm_gave_it(slurm, monkeypatch):
    """With a hostfile DeepSpeed's runner does not read CUDA_VISIBLE_DEVICES, and its per-node launch.py sets it to
    0..N-1 for the ranks: on a node shared without Slurm's device cgroups (ConstrainDevices=no), where Slurm sets
    the job's GPUs as the node's own indices (CUDA_VISIBLE_DEVICES=4,5), the ranks would land on GPUs 0,1 of
    another job. Slurm is simulated (stand-in srun runs the step as node 1 with that variable); DeepSpeed's own
    `main` runs on the arguments the node's launcher got, with its Popen replaced (last: that replaces
    subprocess.Popen in this process)."""
    env, records, _ = slurm
    result = submit("pretrain.sbatch", {**env, "SLURM_GPUS_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1"})
    assert result.returncode == 0, result.stderr
    args = recorded(records, "python")  # the usual case (cgroups: the job's GPUs are 0..N-1): unchanged
    assert "--include" not in args and args[args.index("--num_gpus") + 1] == "2"
    result = submit("pretrain.sbatch", {**env, "SLURM_GPUS_PER_NODE": "4", "CUDA_VISIBLE_DEVICES": "4,5"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "mixmae: error: node 1: CUDA_VISIBLE_DEVICES=4,5 lists 2 GPUs, the job uses 4 per node (from"
        " SLURM_GPUS_PER_NODE, SLURM_GPUS_ON_NODE or MIXMAE_GPUS_PER_NODE): request as many GPUs as it uses, or"
        " set MIXMAE_GPUS_PER_NODE=2")
    result = submit("pretrain.sbatch", {**env, "SLURM_GPUS_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": "4"})
    assert result.returncode == 2 and "CUDA_VISIBLE_DEVICES=4 lists 1 GPU, the job uses 2 per node" in result.stderr
    result = submit("pretrain.sbatch", {**env, "SLURM_GPUS_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": "4,5"})
    assert result.returncode == 0, result.stderr
    args = recorded(records, "python")
    launch = deepspeed_would_start(args[args.index("deepspeed.launcher.runner") + 1:], monkeypatch)
    world = next(a for a in launch if a.startswith("--world_info="))
    assert json.loads(base64.urlsafe_b64decode(world.split("=", 1)[1])) == {"gpu-a": [0, 1], "gpu-b": [4, 5]}
    assert "--node_rank=1" in launch  # launch.py gives the ranks of this node CUDA_VISIBLE_DEVICES=4,5


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_run_stopped_by_the_time_limit_warning_requeues_its_job(script, slurm):
    """After `--signal=USR1@300` the ranks save and exit 0: the job would end COMPLETED with its schedule
    unfinished. The script requeues it when the run folder's summary.json says a signal stopped it before its
    planned steps, up to MIXMAE_MAX_REQUEUES times (SLURM_RESTART_COUNT), not when a NO_REQUEUE file is in the
    run folder, and never after a failed step. Slurm is simulated: the stand-in srun runs the (recording) ranks
    and a stand-in scontrol records the requeue; the run folder is prepared by hand as a rank leaves it."""
    env, records, submit_dir = slurm
    env = {**env, "SLURM_GPUS_PER_NODE": "8"}
    assert re.search(r"^#SBATCH --requeue\b", (SLURM / script).read_text(), re.M)
    run = submit_dir / "run"
    run.mkdir()

    def outcome(summary: dict | None, **variables: str) -> tuple[subprocess.CompletedProcess, list[str] | None]:
        (records / "scontrol.args").unlink(missing_ok=True)
        (run / "summary.json").unlink(missing_ok=True)
        if summary is not None:
            (run / "summary.json").write_text(json.dumps(summary))
        result = submit(script, {**env, **variables}, "--run-dir", "run", "--set", "run.name=x")
        requeued = recorded(records, "scontrol") if (records / "scontrol.args").exists() else None
        return result, requeued

    stopped = {"steps": 40, "planned_steps": 100, "stopped_by_signal": True}
    result, requeued = outcome(stopped)
    assert result.returncode == 0, result.stderr
    assert requeued == ["requeue", "4242"]
    assert "mixmae: requeueing: stopped by a signal at step 40 of 100 (requeue 1 of 20)" in result.stdout
    result, requeued = outcome(stopped, SLURM_RESTART_COUNT="3", MIXMAE_MAX_REQUEUES="3")
    assert result.returncode == 0 and requeued is None
    assert "requeued 3 times already (MIXMAE_MAX_REQUEUES=3); submit it again to go on" in result.stdout
    result, requeued = outcome(stopped, SRUN_RC="1")
    assert result.returncode == 1 and requeued is None
    for summary in ({"steps": 100, "planned_steps": 100, "stopped_by_signal": False},
                    {"steps": 100, "planned_steps": 100, "stopped_by_signal": True}, None):
        result, requeued = outcome(summary)
        assert result.returncode == 0 and requeued is None, (summary, result.stdout)
    (run / "NO_REQUEUE").touch()
    result, requeued = outcome(stopped)
    assert result.returncode == 0 and requeued is None
    assert "NO_REQUEUE exists: requeueing stopped by hand" in result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("job_id", ["4242", "22768", "39999", "1234567"])
def test_the_default_port_stays_below_linuxs_ephemeral_range(script, job_id, slurm):
    """20000 + job id % 20000 fell in Linux's ephemeral range (32768-60999, net.ipv4.ip_local_port_range) for 36% of
    job ids, where any outgoing connection on the node (NCCL's, the data loaders') may already hold the port and the
    rendezvous fails with EADDRINUSE. The default is 10000 + job id % 20000 (10000-29999), the same in both
    scripts and in the ranks' own derivation (cluster/slurm_ranks.py, where the script exports no MASTER_PORT)."""
    from mixmae_scale.cluster.slurm_ranks import default_port, ranks_from_slurm

    env, records, submit_dir = slurm
    (submit_dir / "my cluster.yaml").write_text("cluster:\n  env:\n    NCCL_DEBUG: WARN\n")
    result = submit(script, {**env, "SLURM_GPUS_PER_NODE": "8", "SLURM_JOB_ID": job_id})
    assert result.returncode == 0, result.stderr
    args = recorded(records, "python")
    port = args[args.index("--master_port") + 1] if script == "pretrain.sbatch" else \
        recorded_env(records, "python")["MASTER_PORT"]
    expected = str(10000 + int(job_id) % 20000)
    assert port == expected == str(default_port(job_id))
    ranks = ranks_from_slurm({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": job_id})
    assert ranks["MASTER_PORT"] == expected
    assert all(10000 <= default_port(str(job)) < 32768 for job in range(0, 100000, 7))


def test_the_docs_say_which_script_gives_deepspeeds_runner_a_hostfile():
    """Only pretrain.sbatch starts DeepSpeed's runner and writes a hostfile; pretrain_srun.sbatch has neither (srun
    starts the ranks). docs/training.md said both scripts give the runner the allocation's hostfile."""
    assert "HOSTFILE" in (SLURM / "pretrain.sbatch").read_text()
    assert not re.search(r"HOSTFILE|--hostfile", (SLURM / "pretrain_srun.sbatch").read_text())
    text = " ".join((ROOT / "docs" / "training.md").read_text().split())
    both = [sentence for sentence in re.split(r"(?<=\.) ", text) if sentence.startswith("Both scripts")]
    assert both and not any("hostfile" in sentence for sentence in both), both


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_jobs_submitted_with_the_example_cluster_file_get_different_ports(script, slurm):
    """`mixmae templates DIR` ends "next: edit DIR/cluster.example.yaml ..., then CLUSTER=... sbatch": the example
    set cluster.master_port: 29500, which the scripts take over the job-id port, so every job submitted from it
    rendezvoused on 29500 and a second job on a shared node failed (EADDRINUSE). The example leaves the port to the
    scripts' per-job default; a fixed one is still taken where a cluster file sets it (the test above)."""
    env, records, _ = slurm
    ports = []
    for job_id in ("4242", "4243"):
        result = submit(script, {**env, "SLURM_GPUS_PER_NODE": "8", "SLURM_JOB_ID": job_id,
                                 "CLUSTER": str(ROOT / "launch" / "cluster.example.yaml")})
        assert result.returncode == 0, result.stderr
        args = recorded(records, "python")
        ports.append(args[args.index("--master_port") + 1] if script == "pretrain.sbatch" else
                     recorded_env(records, "python")["MASTER_PORT"])
    assert ports == ["14242", "14243"]


def test_one_launcher_per_node_whatever_tasks_per_node_the_job_was_submitted_with(slurm):
    """pretrain.sbatch's step starts DeepSpeed's runner once per node; srun without its own task count takes the
    job's (SLURM_NTASKS_PER_NODE), so `sbatch --ntasks-per-node=8 pretrain.sbatch` (the srun layout's setting)
    started 8 runners per node, each placing 8 ranks with the same node rank and port. The step asks for one task
    per node itself; here srun's count is read as Slurm reads it: its own option, else the job's variable."""
    env, records, _ = slurm
    env = {**env, "SLURM_GPUS_PER_NODE": "8", "SLURM_NTASKS_PER_NODE": "8", "SLURM_NTASKS": "16",
           "SLURM_TASKS_PER_NODE": "8(x2)"}
    result = submit("pretrain.sbatch", env)
    assert result.returncode == 0, result.stderr
    options = recorded(records, "srun")
    options = options[:options.index("bash")]
    per_node = [o.split("=", 1)[1] for o in options if o.startswith("--ntasks-per-node=")]
    total = [o.split("=", 1)[1] for o in options if o.startswith("--ntasks=")]
    assert (per_node or [env["SLURM_NTASKS_PER_NODE"]])[-1] == "1"
    assert (total or [env["SLURM_NTASKS"]])[-1] == "2"


def test_the_one_launcher_per_node_gets_every_cpu_the_job_holds_on_its_node(slurm):
    """The step asks for one task per node, but -c came from SLURM_CPUS_PER_TASK alone: a job submitted with the
    srun layout's --ntasks-per-node=8 --cpus-per-task=8 gave that one task (the launcher and all 8 ranks, with their
    data-loading threads) 8 of the node's 64 CPUs, and with --mem-per-cpu an eighth of the job's memory. Its -c is
    the job's CPUs per task times its tasks per node."""
    env, records, _ = slurm
    # (--ntasks-per-node, Slurm's placement, -c): without --ntasks-per-node (--ntasks=12 over 2 nodes) the node
    # with fewest tasks bounds it; a job of one task per node keeps its own count.
    for per_node, placed, expected in (("8", "8(x2)", "64"), (None, "8,4", "32"), (None, "1(x2)", "8"),
                                       (None, None, "8")):
        job = {**env, "SLURM_GPUS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "8"}
        job.update({key: value for key, value in (("SLURM_NTASKS_PER_NODE", per_node),
                                                  ("SLURM_TASKS_PER_NODE", placed)) if value})
        result = submit("pretrain.sbatch", job)
        assert result.returncode == 0, result.stderr
        options = recorded(records, "srun")
        options = options[:options.index("bash")]
        assert options[options.index("-c") + 1] == expected, (per_node, placed, options)


def test_a_job_of_several_tasks_per_node_without_cpus_per_task_gives_the_launcher_one_cpu_per_task(slurm):
    """Without --cpus-per-task Slurm gives each of the job's tasks one CPU: `sbatch --ntasks-per-node=8` holds 8 per
    node, but the step's one task per node, with no -c, got one for the launcher and all 8 ranks. A job of one task
    per node passes no -c, as before."""
    env, records, _ = slurm
    result = submit("pretrain.sbatch", {**env, "SLURM_GPUS_PER_NODE": "8", "SLURM_NTASKS_PER_NODE": "8"})
    assert result.returncode == 0, result.stderr
    options = recorded(records, "srun")
    options = options[:options.index("bash")]
    assert options[options.index("-c") + 1] == "8", options
    result = submit("pretrain.sbatch", {**env, "SLURM_GPUS_PER_NODE": "8", "SLURM_TASKS_PER_NODE": "1(x2)"})
    assert result.returncode == 0, result.stderr
    options = recorded(records, "srun")
    assert "-c" not in options[:options.index("bash")], options


def ranks_parse(records: Path, submit_dir: Path, monkeypatch) -> tuple[bool, str]:
    """(--overwrite?, checkpoint.resume) of the pretrain arguments the stand-in python recorded, read by the CLI's
    own parser and configuration loader as a rank reads them (from the submission folder, where the step runs)."""
    from mixmae_scale.cli import build_parser
    from mixmae_scale.config import load_config

    args = recorded(records, "python")
    monkeypatch.chdir(submit_dir)
    parsed = build_parser().parse_args(args[args.index("pretrain"):])
    return parsed.overwrite, load_config(parsed.profile, parsed.cluster, parsed.overrides)[0].checkpoint.resume


@pytest.mark.parametrize("script", SCRIPTS)
def test_slurms_own_restart_continues_the_run_instead_of_starting_it_anew(script, slurm, monkeypatch):
    """Slurm's requeue after a node failure (SLURM_RESTART_COUNT > 0) reruns the script with the job's arguments:
    --overwrite moved the stopped run aside and began at step 0, checkpoint.resume=none refused its checkpoints.
    On a restart the ranks get arguments without --overwrite that resume (checked through the CLI's parser), and
    the log says so; a first start keeps them as typed."""
    env, records, submit_dir = slurm
    env = {**env, "SLURM_GPUS_PER_NODE": "8"}
    typed = ("--overwrite", "--set", "run.name=x", "checkpoint.resume=none", "--max-steps", "5")
    result = submit(script, {**env, "SLURM_RESTART_COUNT": "1"}, *typed)
    assert result.returncode == 0, result.stderr
    args = recorded(records, "python")
    assert "--overwrite" not in args and ranks_parse(records, submit_dir, monkeypatch) == (False, "auto")
    assert args[-7:] == ["--set", "run.name=x", "checkpoint.resume=none", "--max-steps", "5", "--set",
                         "checkpoint.resume=auto"]
    assert "restart 1 of job 4242 (Slurm requeued it): dropping --overwrite" in result.stdout
    assert "checkpoint.resume=none replaced by checkpoint.resume=auto" in result.stdout
    result = submit(script, {**env, "SLURM_RESTART_COUNT": "0"}, *typed)
    assert result.returncode == 0, result.stderr
    assert recorded(records, "python")[-6:] == list(typed) and "dropping" not in result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("typed, profile_text, cluster_text", [
    (("--overw", "--max-steps", "5"), None, None),  # an abbreviation argparse takes for --overwrite
    (("--set=checkpoint.resume='none'",), None, None),  # YAML quoting, --set=
    (("--set", "checkpoint={resume: none}"), None, None),  # the section as a mapping
    ((), "checkpoint:\n  resume: none\n", None),  # in the profile
    ((), None, "checkpoint:\n  resume: none\n"),  # in the cluster file
])
def test_a_restart_sees_every_way_of_asking_for_a_fresh_start(script, slurm, monkeypatch, typed, profile_text,
                                                              cluster_text):
    """The restart decision matched `--overwrite` and `checkpoint.resume=none` as typed strings: an abbreviation
    argparse accepts, a quoted or mapping --set, or resume: none in the profile or cluster file reached the
    restarted ranks, which moved the run aside or refused its checkpoints. Slurm is simulated (SLURM_RESTART_COUNT,
    stand-in srun/python); what the ranks would run is read back through the CLI's parser."""
    env, records, submit_dir = slurm
    env = {**env, "SLURM_GPUS_PER_NODE": "8", "SLURM_RESTART_COUNT": "2"}
    if profile_text:
        (submit_dir / "fresh.yaml").write_text(profile_text)
        env["PROFILE"] = str(submit_dir / "fresh.yaml")
    if cluster_text:
        (submit_dir / "my cluster.yaml").write_text(cluster_text)
    result = submit(script, env, *typed)
    assert result.returncode == 0, result.stderr
    assert ranks_parse(records, submit_dir, monkeypatch) == (False, "auto"), recorded(records, "python")
    assert "restart 2 of job 4242 (Slurm requeued it): " in result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_job_submitted_with_overwrite_requeues_itself_and_its_restart_continues_the_run(script, slurm, monkeypatch):
    """`sbatch pretrain.sbatch --overwrite` (to replace an old run) stopped by the time-limit warning: the script
    did not requeue it, as the requeue would run --overwrite again, though the requeued script's restart drops it.
    It requeues, and the requeued job's ranks resume the run. Slurm is simulated (stand-in srun, python, scontrol;
    SLURM_RESTART_COUNT set by hand for the requeued start), the run folder's summary written by hand."""
    env, records, submit_dir = slurm
    env = {**env, "SLURM_GPUS_PER_NODE": "8"}
    (submit_dir / "run").mkdir()
    (submit_dir / "run" / "summary.json").write_text(
        json.dumps({"steps": 40, "planned_steps": 100, "stopped_by_signal": True}))
    typed = ("--overwrite", "--run-dir", "run")
    result = submit(script, env, *typed)
    assert result.returncode == 0, result.stderr
    assert ranks_parse(records, submit_dir, monkeypatch) == (True, "auto")  # the first start replaces the old run
    assert (records / "scontrol.args").exists() and recorded(records, "scontrol") == ["requeue", "4242"], result.stdout
    assert "undoes --overwrite and continues the run" in result.stdout
    result = submit(script, {**env, "SLURM_RESTART_COUNT": "1"}, *typed)
    assert result.returncode == 0, result.stderr
    assert ranks_parse(records, submit_dir, monkeypatch) == (False, "auto")


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_port_variable_left_in_the_submitting_shell_is_not_taken_for_the_jobs_port(script, slurm):
    """MIXMAE_CLUSTER_MASTER_PORT is the scripts' own variable, set from the job's configuration; one exported in
    the shell sbatch was run from (a copied line of the scripts, an earlier job's) was read as the job's port."""
    env, records, _ = slurm
    result = submit(script, {**env, "SLURM_GPUS_PER_NODE": "8", "MIXMAE_CLUSTER_MASTER_PORT": "29999"})
    assert result.returncode == 0, result.stderr
    ranks = recorded(records, "python")
    port = ranks[ranks.index("--master_port") + 1] if script == "pretrain.sbatch" else \
        recorded_env(records, "python")["MASTER_PORT"]
    assert port == "14242"


@pytest.mark.parametrize("script", SCRIPTS)
def test_cluster_env_from_a_set_after_the_script_reaches_the_step_over_the_files(script, slurm):
    """`mixmae launch` gives the ranks cluster.env of the whole configuration; the scripts exported the cluster
    file's alone, so a `--set cluster.env.NAME=VALUE` after the script never reached a rank, without a word."""
    env, records, submit_dir = slurm
    result = submit(script, {**env, "SLURM_GPUS_PER_NODE": "8"}, "--set", "cluster.env.NCCL_DEBUG=INFO",
                    "cluster.env.NCCL_SOCKET_IFNAME=eth1")
    assert result.returncode == 0, result.stderr
    step_env = recorded_env(records, "python")
    assert step_env["NCCL_DEBUG"] == "INFO" and step_env["NCCL_SOCKET_IFNAME"] == "eth1"  # the file says ib0
    (records / "srun.args").unlink()
    result = submit(script, {**env, "SLURM_GPUS_PER_NODE": "8"}, "--set", "cluster.env.NCCL-X=1")
    assert result.returncode == 2 and not (records / "srun.args").exists()
    assert "cluster.env key 'NCCL-X' is not an environment variable name" in result.stderr


# cluster.env of one configuration from a profile, a cluster file and --set after the script (a value YAML 1.1 reads
# as a number: 010 is 8, 1:30 is 90; one that needs shell quoting), and the launching shell's MIXMAE_*/AWS_*.
PARITY_PROFILE = "cluster:\n  env:\n    NCCL_IB_TIMEOUT: 010\n    FROM_PROFILE: kept\n    OVERRIDDEN: profile\n"
PARITY_CLUSTER = "cluster:\n  env:\n    NCCL_SOCKET_IFNAME: ib0\n    OVERRIDDEN: file\n    NCCL_ASYNC: 1:30\n"
PARITY_SETS = ("--set", "cluster.env.OVERRIDDEN=set", "data.shards=s3://bucket/shards")
PARITY_SHELL = {"MIXMAE_S3_CONNECT_TIMEOUT": "7", "AWS_REGION": "eu-west-1"}


def slurm_step_env(script: str, slurm, sets: tuple[str, ...]) -> dict[str, str]:
    """The environment of the step's ranks as the script leaves it: its shell_env exports, evaluated by bash, and
    whatever srun passes on (stand-in srun and python; Slurm simulated by its variables)."""
    env, records, submit_dir = slurm
    (submit_dir / "parity.yaml").write_text(PARITY_PROFILE)
    (submit_dir / "my cluster.yaml").write_text(PARITY_CLUSTER)
    result = submit(script, {**env, **PARITY_SHELL, "SLURM_GPUS_PER_NODE": "8",
                             "PROFILE": str(submit_dir / "parity.yaml")}, *sets)
    assert result.returncode == 0, result.stderr
    return recorded_env(records, "python")


def launch_plan(submit_dir: Path, sets: tuple[str, ...], launcher: str | None, monkeypatch):
    """compose() for `mixmae launch` of the same configuration, from the same shell, on one node or (launcher
    given) on two."""
    from mixmae_scale.cluster.compose import compose

    for key in [k for k in os.environ if k.startswith(("MIXMAE_", "AWS_"))]:  # the shell is the submitting one
        monkeypatch.delenv(key)
    for key, value in PARITY_SHELL.items():
        monkeypatch.setenv(key, value)
    overrides = list(sets[1:])
    if launcher:
        (submit_dir / "hostfile").write_text("gpu-a slots=8\ngpu-b slots=8\n")
        overrides += ["cluster.num_nodes=2", f"cluster.launcher={launcher}", f"cluster.hostfile={submit_dir}/hostfile"]
    profile, cluster = str(submit_dir / "parity.yaml"), str(submit_dir / "my cluster.yaml")
    return compose(load_resolved(profile, cluster, overrides), profile, cluster, overrides, workdir=submit_dir)


def remote_rank_env(env_text: str, launcher: str) -> dict[str, str]:
    """What a rank on another host gets from .deepspeed_env: DeepSpeed 0.19.8's runner reads the file line by line
    (key, value split at the first '=') into MultiNodeRunner.add_export, its own code run here; pdsh sends
    `export K=V;` through the remote shell (bash evaluates it here), mpirun's `-x K=V` is taken as it stands."""
    from types import SimpleNamespace

    from deepspeed.launcher.multinode_runner import MultiNodeRunner

    runner = SimpleNamespace(exports={})
    for line in env_text.splitlines(keepends=True):
        key, value = line.split("=", 1)
        MultiNodeRunner.add_export(runner, key, value)
    if launcher != "pdsh":
        return dict(runner.exports)
    script = "".join(f"export {key}={value}; " for key, value in runner.exports.items())
    script += "".join(f'printf "%s\\0" "${key}"; ' for key in runner.exports)
    shown = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    return dict(zip(runner.exports, shown.split("\0")[:-1], strict=True))


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_ranks_get_the_same_cluster_env_from_mixmae_launch_and_the_slurm_scripts(script, slurm, monkeypatch):
    """cluster.env (profile < cluster file < --set; 010 and 1:30 as typed) and, on several nodes, the launching
    shell's MIXMAE_* and AWS settings (s3:// data): each value `mixmae launch` gives the ranks (one node: the
    launched environment; two, pdsh and openmpi: .deepspeed_env as DeepSpeed's runner passes it on) is the value the
    sbatch script's step has. Slurm simulated (variables, stand-in srun/python); DeepSpeed's runner code run for the
    file, no launcher started."""
    _, _, submit_dir = slurm
    step = slurm_step_env(script, slurm, PARITY_SETS)
    assert {k: step[k] for k in ("NCCL_IB_TIMEOUT", "NCCL_ASYNC", "OVERRIDDEN", "FROM_PROFILE")} == {
        "NCCL_IB_TIMEOUT": "010", "NCCL_ASYNC": "1:30", "OVERRIDDEN": "set", "FROM_PROFILE": "kept"}
    one_node = launch_plan(submit_dir, PARITY_SETS, None, monkeypatch)
    assert one_node.env and {k: step.get(k) for k in one_node.env} == one_node.env
    for launcher in ("pdsh", "openmpi"):
        plan = launch_plan(submit_dir, PARITY_SETS, launcher, monkeypatch)
        remote = remote_rank_env(plan.env_text, launcher)
        assert set(remote) == {*one_node.env, *PARITY_SHELL}, launcher
        assert {k: step.get(k) for k in remote} == remote, launcher


@pytest.mark.parametrize("value", ["a b'c", 'say "hi"', "$HOME/x", " padded"])
def test_a_cluster_env_value_deepspeed_would_change_on_several_nodes_is_refused_naming_it(value, slurm,
                                                                                          monkeypatch):
    """The sbatch scripts (shlex-quoted exports) and a one-node `mixmae launch` (the launched environment) give the
    ranks the value as typed; on several nodes DeepSpeed's runner strips it and wraps one with other characters than
    letters, digits and @%+=:,./- in double quotes, which mpirun's -x keeps in the value and pdsh's remote shell
    expands ($, `, \\, "): the ranks got another value, silently. The ranks get the value as typed, or that launch
    is refused naming the key; the one-node launch and the scripts pass it as typed. Slurm simulated as above."""
    _, _, submit_dir = slurm
    sets = (*PARITY_SETS, f"cluster.env.NCCL_NET={json.dumps(value)}")  # a YAML double-quoted string
    step = slurm_step_env("pretrain_srun.sbatch", slurm, sets)
    assert step["NCCL_NET"] == value
    assert launch_plan(submit_dir, sets, None, monkeypatch).env["NCCL_NET"] == value
    for launcher in ("pdsh", "openmpi"):
        try:
            plan = launch_plan(submit_dir, sets, launcher, monkeypatch)
        except ConfigError as refused:
            assert str(refused).startswith(f"cluster.env.NCCL_NET={value!r}: on several nodes DeepSpeed's {launcher} "
                                           "launcher"), str(refused)
            continue
        assert remote_rank_env(plan.env_text, launcher)["NCCL_NET"] == value, launcher


@pytest.mark.parametrize("key, setting", [("MASTER_PORT", "cluster.master_port"),
                                          ("MASTER_ADDR", "cluster.master_addr")])
def test_a_rendezvous_variable_in_cluster_env_is_refused_by_both_paths_naming_its_setting(key, setting, slurm,
                                                                                          monkeypatch):
    """cluster.env.MASTER_PORT became the Slurm job's port (the scripts evaluate their exports before reading
    MASTER_PORT), while `mixmae launch` passes cluster.master_port to DeepSpeed's launcher, which sets MASTER_PORT
    for each rank over it: one configuration, two rendezvous. Both refuse it before anything starts, naming the
    setting. Slurm simulated (variables, stand-in srun/python)."""
    env, records, submit_dir = slurm
    (submit_dir / "parity.yaml").write_text(PARITY_PROFILE)
    value = "23000" if key == "MASTER_PORT" else "gpu-z"
    result = submit("pretrain_srun.sbatch", {**env, "SLURM_GPUS_PER_NODE": "8"}, "--set", f"cluster.env.{key}={value}")
    assert result.returncode == 2 and not (records / "srun.args").exists(), result.stderr
    expected = (f"cluster.env.{key}: the rendezvous is set by {setting} (the launcher or the Slurm script gives "
                f"every rank {key} from it); set {setting} instead")
    assert expected in result.stderr, result.stderr
    with pytest.raises(ConfigError, match=re.escape(expected)):
        launch_plan(submit_dir, ("--set", f"cluster.env.{key}={value}"), None, monkeypatch)


def test_every_variable_the_scripts_read_after_taking_cluster_env_is_refused_as_a_cluster_env_key():
    """The scripts evaluate cluster.env's exports in their own shell, then read their variables (and pretrain.sbatch's
    node step reads its own on every node): each of those names is in shell_env.SCRIPT_VARIABLES, read here from the
    scripts' text, so a new one in a script cannot slip past the refusal."""
    from mixmae_scale.cluster.shell_env import SCRIPT_VARIABLES

    read = re.compile(r"\$\{?[#!]?([A-Za-z_][A-Za-z0-9_]*)")
    for script in SCRIPTS:
        text = (SLURM / script).read_text()
        after = text[text.index('eval "$EXPORTS"'):]
        names = {name for line in after.splitlines() if not line.lstrip().startswith("#")
                 for name in read.findall(line)}
        names -= {"EXPORTS", "MASTER_PORT", "MASTER_ADDR", "MIXMAE_CLUSTER_MASTER_PORT"}  # refused or set by shell_env
        assert len(names) > 10 and names <= SCRIPT_VARIABLES, (script, sorted(names - SCRIPT_VARIABLES))


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("key", ["PROFILE", "SLURM_JOB_NODELIST"])
def test_a_cluster_env_key_the_script_reads_itself_is_refused_before_the_step(script, key, slurm):
    """cluster.env.PROFILE=x became the script's profile for the step and the requeue decision, and
    SLURM_JOB_NODELIST its host list (the rendezvous), not only the ranks' variable as under `mixmae launch`.
    Slurm simulated (variables, stand-in srun/python/scontrol)."""
    env, records, submit_dir = slurm
    (submit_dir / "parity.yaml").write_text(PARITY_PROFILE)
    result = submit(script, {**env, "SLURM_GPUS_PER_NODE": "8"}, "--set", f"cluster.env.{key}=other")
    assert result.returncode == 2 and not (records / "srun.args").exists(), result.stderr
    assert (f"cluster.env.{key}: the Slurm scripts (launch/slurm/*.sbatch) take cluster.env into their own shell and "
            f"then read {key} themselves") in result.stderr, result.stderr
