"""The deepspeed launcher command composed from a profile and a cluster file."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
from pathlib import Path

import pytest
from deepspeed_launcher import deepspeed_would_start

from mixmae_scale.cluster.compose import batch_report, compose
from mixmae_scale.config import ConfigError, load_resolved

EXAMPLE_CLUSTER = str(Path(__file__).resolve().parents[2] / "launch" / "cluster.example.yaml")


@pytest.fixture(autouse=True)
def _no_visible_devices(monkeypatch):
    """A one-node launch follows CUDA_VISIBLE_DEVICES: the commands here are those of a shell that sets none (a GPU
    machine's test shell may set it); the tests of that rule set it themselves."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def _cluster(tmp_path, launcher: str = "openmpi", gpus: int = 8, slots: int = 8, **extra) -> str:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"worker-0 slots={slots}\nworker-1 slots={slots}\n")
    lines = ["cluster:", f"  hostfile: {hostfile}", "  num_nodes: 2", f"  gpus_per_node: {gpus}",
             f"  launcher: {launcher}",
             "  master_addr: worker-0", "  master_port: 29555", "  env:", "    NCCL_DEBUG: WARN",
             "    NCCL_IB_HCA: mlx5"] + [f"  {k}: {v}" for k, v in extra.items()]
    path = tmp_path / "cluster.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_command_carries_cluster_settings_and_overrides(tmp_path, monkeypatch):
    cluster = _cluster(tmp_path)
    overrides = ["batch.micro=64"]
    resolved = load_resolved("swin_b", cluster, overrides)
    plan = compose(resolved, "swin_b", cluster, overrides, workdir=tmp_path)
    cmd = plan.command
    assert cmd[0].endswith("deepspeed")
    for flag, value in (("--hostfile", str(tmp_path / "hostfile")), ("--launcher", "openmpi"),
                        ("--master_addr", "worker-0"), ("--master_port", "29555")):
        assert cmd[cmd.index(flag) + 1] == value
    assert cmd[cmd.index("--module") + 1:] == ["mixmae_scale.cli", "pretrain", "--profile", "swin_b", "--cluster",
                                               cluster, "--set", "batch.micro=64"]
    # DeepSpeed's MPI backends refuse --num_nodes/--num_gpus and start a rank on every slot of the hostfile.
    mpirun = deepspeed_would_start(cmd[1:], monkeypatch)
    assert mpirun[mpirun.index("-n") + 1] == "16"
    assert plan.env_file == tmp_path / ".deepspeed_env"
    assert plan.env_text == "NCCL_DEBUG=WARN\nNCCL_IB_HCA=mlx5\n"
    report = "\n".join(batch_report(resolved))
    assert "world size       16 = 2 nodes x 8 GPUs" in report
    assert "global batch     2048 = 64 x 2 x 16" in report


def test_include_leaves_the_counts_to_the_selection_and_the_arithmetic_must_match_it(tmp_path, monkeypatch):
    """DeepSpeed refuses --num_gpus/--num_nodes with --include/--exclude ("Cannot specify num_nodes/gpus with
    include/exclude"); the selection must be what cluster.num_nodes x gpus_per_node says, which sizes the batch."""
    cluster = _cluster(tmp_path, launcher="pdsh", gpus=4, include="worker-0:0,1,2,3@worker-1:4,5,6,7")
    plan = compose(load_resolved("swin_b", cluster), "swin_b", cluster, [], workdir=tmp_path)
    assert "--num_gpus" not in plan.command and "--num_nodes" not in plan.command
    assert plan.command[plan.command.index("--include") + 1] == "worker-0:0,1,2,3@worker-1:4,5,6,7"
    assert "mixmae_scale.cli" in deepspeed_would_start(plan.command[1:], monkeypatch)
    uneven = _cluster(tmp_path, launcher="pdsh", include="worker-0@worker-1:0,1")
    with pytest.raises(ConfigError, match=r"^cluster.include=worker-0@worker-1:0,1 selects 8 GPUs on worker-0, 2 GPUs "
                                          r"on worker-1; cluster.num_nodes=2 x cluster.gpus_per_node=8 must describe"):
        compose(load_resolved("swin_b", uneven), "swin_b", uneven, [])
    nowhere = _cluster(tmp_path, launcher="pdsh", exclude="worker-9")
    with pytest.raises(ConfigError, match="cluster.exclude=worker-9: Hostname 'worker-9' not found in hostfile"):
        compose(load_resolved("swin_b", nowhere), "swin_b", nowhere, [])
    mpi = _cluster(tmp_path, include="worker-0")
    with pytest.raises(ConfigError, match="cluster.include with cluster.launcher=openmpi: DeepSpeed's MPI"):
        compose(load_resolved("swin_b", mpi), "swin_b", mpi, [])


def test_hostfile_slots_must_agree_with_gpus_per_node(tmp_path, monkeypatch):
    """DeepSpeed's runner gives each host range(--num_gpus) whatever its slots= says: slots=4 with
    gpus_per_node=8 would start 8 ranks on a 4-GPU node."""
    cluster = _cluster(tmp_path, launcher="pdsh", slots=4)
    with pytest.raises(ConfigError, match=r"host worker-0 has slots=4, cluster.gpus_per_node is 8; make them agree"):
        compose(load_resolved("swin_b", cluster), "swin_b", cluster, [])
    plan = compose(load_resolved("swin_b", cluster), "swin_b", cluster, [], check_files=False)
    assert "host worker-0 has slots=4" in plan.notes[0]
    agreed = _cluster(tmp_path, launcher="pdsh", gpus=4, slots=4)
    plan = compose(load_resolved("swin_b", agreed), "swin_b", agreed, [])
    assert plan.command[plan.command.index("--num_gpus") + 1] == "4"
    assert "mixmae_scale.cli" in deepspeed_would_start(plan.command[1:], monkeypatch)


@pytest.mark.parametrize("text, said", [
    ("worker-0 gpu slots=8\nworker-1 slots=8\n", "line 'worker-0 gpu slots=8' is not 'HOST slots=N'"),
    ("worker-0 slots=8\nworker-0 slots=8\n", "lists worker-0 twice"),
])
def test_a_hostfile_deepspeed_would_refuse_is_refused_in_one_line(tmp_path, text, said):
    """The hostfile is read by DeepSpeed's rule (runner._parse_hostfile: 'HOST slots=N' at the start of a line, each
    host once): a line with a word before slots= passed here and then stopped the launch with DeepSpeed's
    ValueError traceback; a host listed twice was counted once and reported as "lists 1 node"."""
    cluster = _cluster(tmp_path, launcher="pdsh")
    Path(tmp_path / "hostfile").write_text("# nodes\n\n" + text)
    for check in (True, False):  # a dry run cannot compose a command from an unreadable hostfile either
        with pytest.raises(ConfigError, match=f"cluster.hostfile {tmp_path / 'hostfile'}: .*{said}"):
            compose(load_resolved("swin_b", cluster), "swin_b", cluster, [], check_files=check)
    Path(tmp_path / "hostfile").write_text("# nodes\n  # indented comment\n\nworker-0 slots=8 # gpu\n"
                                           "worker-1\tslots=8\n")
    compose(load_resolved("swin_b", cluster), "swin_b", cluster, [])  # what DeepSpeed reads, read alike


def test_an_mpi_hostfile_with_more_nodes_than_the_run_says_which_way_to_fix_it(tmp_path):
    """openmpi/mvapich start a rank on every slot of the hostfile, so it must list exactly num_nodes hosts. A
    hostfile with one host too many was told to "add the nodes or lower cluster.num_nodes": both make it worse."""
    cluster = _cluster(tmp_path, launcher="openmpi")
    Path(tmp_path / "hostfile").write_text("worker-0 slots=8\nworker-1 slots=8\nworker-2 slots=8\n")
    with pytest.raises(ConfigError, match=r"lists 3 nodes, cluster.num_nodes is 2; remove the extra nodes from "
                                          r"the hostfile or raise cluster.num_nodes \(cluster.launcher=openmpi"):
        compose(load_resolved("swin_b", cluster), "swin_b", cluster, [])
    Path(tmp_path / "hostfile").write_text("worker-0 slots=8\n")
    with pytest.raises(ConfigError, match=r"lists 1 node, cluster.num_nodes is 2; add the nodes or lower"):
        compose(load_resolved("swin_b", cluster), "swin_b", cluster, [])


def test_bad_cluster_settings_are_refused(tmp_path):
    cluster = _cluster(tmp_path, include="worker-0", exclude="worker-1")
    with pytest.raises(ConfigError, match="mutually exclusive"):
        compose(load_resolved("swin_b", cluster), "swin_b", cluster, [])
    missing = load_resolved("swin_b", overrides=["cluster.hostfile=nowhere/hostfile"])
    with pytest.raises(ConfigError, match=f"does not exist \\(tried {Path.cwd() / 'nowhere/hostfile'}\\)"):
        compose(missing, "swin_b", None, [])
    plan = compose(missing, "swin_b", None, [], check_files=False)  # a dry run composes, and says what is missing
    assert plan.command[plan.command.index("--hostfile") + 1] == "nowhere/hostfile"
    assert plan.notes and "nowhere/hostfile does not exist" in plan.notes[0]
    with pytest.raises(ConfigError, match="cluster.num_nodes=2 needs cluster.hostfile"):  # no placeholder command
        compose(load_resolved("swin_b"), "swin_b", None, [], check_files=False)
    short = tmp_path / "one-line-hostfile"
    short.write_text("# nodes\nworker-0 slots=8\n")
    with pytest.raises(ConfigError, match="lists 1 node, cluster.num_nodes is 2"):
        compose(load_resolved("swin_b", overrides=[f"cluster.hostfile={short}"]), "swin_b", None, [])
    with pytest.raises(ConfigError, match="cluster file .* is a folder; name the YAML file"):  # IsADirectoryError
        load_resolved("swin_b", str(tmp_path))
    with pytest.raises(ConfigError, match=f"cluster.hostfile {tmp_path} is a folder; name the hostfile"):
        compose(load_resolved("swin_b", overrides=[f"cluster.hostfile={tmp_path}"]), "swin_b", None, [])
    # The local launcher (tiny's) starts ranks on this node only: asking it for 2 nodes would train on one, quietly.
    two_local = load_resolved("tiny", overrides=["cluster.num_nodes=2", "cluster.gpus_per_node=4"])
    with pytest.raises(ConfigError, match="num_nodes=2 with cluster.launcher=local: .* on 4 GPUs, not 8"):
        compose(two_local, "tiny", None, [], check_files=False)


def test_launch_dry_run_prints_command_and_arithmetic(capsys, tmp_path):
    from mixmae_scale.cli import main

    cluster = _cluster(tmp_path)
    assert main(["launch", "swin_h", "--dry-run", "--cluster", cluster]) == 0
    out = capsys.readouterr().out
    assert "global batch     2048 = 64 x 2 x 16" in out and "--module mixmae_scale.cli pretrain --profile swin_h" in out


def test_one_node_dry_run_prints_the_local_command_that_runs_as_printed(capsys):
    """The base profile's launcher is pdsh, for clusters; one node needs neither a hostfile nor pdsh."""
    from mixmae_scale.cli import main

    assert main(["launch", "swin_h", "--dry-run"]) == 0
    out = capsys.readouterr().out
    command = shlex.split(out.split("command:\n", 1)[1].splitlines()[0])
    assert "--hostfile" not in command and "--launcher" not in command and "note:" not in out
    assert Path(command[0]).is_file() and os.access(command[0], os.X_OK)  # the venv's deepspeed, as printed
    port = command[command.index("--master_port") + 1]
    assert command[1:] == ["--num_gpus", "8", "--master_port", port, "--module", "mixmae_scale.cli", "pretrain",
                           "--profile", "swin_h"]


def test_two_launches_on_one_node_get_different_ports_unless_one_is_set(tmp_path, monkeypatch, capsys):
    """Every `mixmae launch` without cluster.master_port used 29500, so a second run on the node failed with
    EADDRINUSE. The default comes from the run folder: two run folders (two runs) differ, the same folder gives the
    same port (the launcher hands it to every node), in the sbatch scripts' range 10000-29999 (unprivileged, below
    Linux's ephemeral ports); a cluster.master_port set in a file or with --set wins."""
    monkeypatch.chdir(tmp_path)

    def port(*overrides: str, cluster: str | None = None) -> int:
        command = compose(load_resolved("tiny", cluster, list(overrides)), "tiny", cluster, list(overrides)).command
        return int(command[command.index("--master_port") + 1])

    ports = {port("run.output_dir=/scratch/runs", f"run.name=run{i}") for i in range(50)}  # fixed paths: no chance
    assert len(ports) == 50 and all(10000 <= p < 30000 for p in ports)
    assert port("run.name=a") == port("run.name=a") != port("run.name=a", f"run.output_dir={tmp_path / 'other'}")
    assert port("run.name=a", "cluster.master_port=29555") == 29555
    (tmp_path / "cluster.yaml").write_text("cluster:\n  num_nodes: 1\n  master_port: 29600\n")
    assert port("run.name=a", cluster="cluster.yaml") == 29600
    from mixmae_scale.cli import main

    assert main(["launch", "tiny", "--dry-run", "--set", "run.name=a"]) == 0  # the dry run says where it came from
    assert (f"master port      {port('run.name=a')} (from the run folder {tmp_path / 'runs' / 'a'}; --set "
            "cluster.master_port=N sets one)") in capsys.readouterr().out


def test_dry_run_says_a_missing_hostfile_and_the_launch_refuses_it(capsys):
    from mixmae_scale.cli import main

    assert main(["launch", "swin_h", "--dry-run", "--cluster", EXAMPLE_CLUSTER]) == 0
    out = capsys.readouterr().out
    assert "note: cluster.hostfile /job/hostfile does not exist (tried /job/hostfile)" in out
    assert main(["launch", "swin_h", "--cluster", EXAMPLE_CLUSTER]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixmae: error: cluster.hostfile /job/hostfile does not exist")


def test_dry_run_counts_steps_from_the_shards_as_the_run_does(capsys, demo_shards):
    """The run counts the manifest's samples (300 here), not the profile's data.train_samples (2600): so does
    the dry run (the demo test in tests/integration/test_finetune.py compares it with a real run's steps)."""
    from mixmae_scale.cli import main

    assert main(["launch", "tiny", "--dry-run", "--set", f"data.shards={demo_shards}"]) == 0
    out = capsys.readouterr().out
    assert f"steps per epoch  9 (300 samples, counted in {demo_shards / 'dataset.json'})" in out
    assert "total steps      45 (5 epochs, 9 warm-up)" in out
    assert main(["launch", "tiny", "--dry-run", "--set", "data.shards=nowhere"]) == 0
    out = capsys.readouterr().out
    assert f"steps per epoch  81 (2600 samples, data.train_samples: {Path.cwd() / 'nowhere/dataset.json'} is not " \
           "here" in out


def test_plan_refuses_the_gpu_counts_launch_refuses(capsys):
    from mixmae_scale.cli import main

    assert main(["plan", "swin_h", "--gpus", "6"]) == 2
    planned = capsys.readouterr().err
    assert main(["launch", "swin_h", "--dry-run", "--set", "cluster.gpus_per_node=6"]) == 2
    launched = capsys.readouterr().err
    assert planned == launched and planned.count("\n") == 1 and "or use 4 or 8 GPUs" in planned


def test_launch_runs_a_finetuning_profile_as_finetuning_unless_told(capsys):
    from mixmae_scale.cli import main

    assert main(["launch", "finetune_tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "job: finetune (from the profile" in out
    assert "--module mixmae_scale.cli finetune --profile finetune_tiny" in out
    assert main(["launch", "finetune_tiny", "--dry-run", "--job", "pretrain"]) == 0
    assert "--module mixmae_scale.cli pretrain --profile finetune_tiny" in capsys.readouterr().out


def test_a_finetuning_launch_stays_one_when_its_init_is_unset_and_is_refused_as_finetune_refuses_it(capsys):
    """`launch finetune_tiny --set finetune.init=null` composed a pretraining launch: the kind was read off the
    resolved config, which --set had changed. It is what the profile's own file sets up; the unset init is then
    refused in the words of `mixmae finetune`, and `random` (the baseline) launches fine-tuning."""
    from mixmae_scale.cli import main
    from mixmae_scale.finetune.pretrained import finetune_start
    from mixmae_scale.models.convert_official import WeightsError

    with pytest.raises(WeightsError) as refused:
        finetune_start(None)
    assert main(["launch", "finetune_tiny", "--dry-run", "--set", "finetune.init=null"]) == 2
    said = capsys.readouterr()
    assert said.err == f"mixmae: error: {refused.value}\n" and "finetune.init is not set" in said.err
    assert "--module" not in said.out
    assert main(["launch", "finetune_tiny", "--dry-run", "--set", "finetune.init=random"]) == 0
    out = capsys.readouterr().out
    assert "job: finetune (from the profile" in out
    assert "--module mixmae_scale.cli finetune --profile finetune_tiny --set finetune.init=random" in out
    assert main(["launch", "tiny", "--dry-run", "--set", "finetune.init=runs/tiny-demo"]) == 0  # still pretraining
    assert "--module mixmae_scale.cli pretrain --profile tiny" in capsys.readouterr().out
    assert main(["launch", "tiny", "--dry-run", "--job", "finetune", "--set", "finetune.init=runs/tiny-demo"]) == 2
    assert "--profile tiny is not a fine-tuning profile" in capsys.readouterr().err  # as `mixmae finetune` says


def test_cluster_env_reaches_the_ranks_on_one_node_and_several(tmp_path, monkeypatch, capsys):
    """DeepSpeed reads .deepspeed_env only where it starts other hosts, and forwards only NCCL*, PYTHON*, UCX*,
    MV2*, MLFLOW* besides: one node gets cluster.env in the launched environment (no stray file), several get the
    file with the launching shell's MIXMAE_* too, and a warning that stops are not relayed to their ranks."""
    from mixmae_scale.cli import main

    monkeypatch.setenv("MIXMAE_GPUS_PER_NODE", "8")
    one = load_resolved("tiny", overrides=["cluster.env={NCCL_SOCKET_IFNAME: ib0}"])
    plan = compose(one, "tiny", None, [], workdir=tmp_path)
    assert plan.env_file is None and plan.env == {"NCCL_SOCKET_IFNAME": "ib0"}
    cluster = _cluster(tmp_path, launcher="pdsh")
    plan = compose(load_resolved("swin_b", cluster), "swin_b", cluster, [], workdir=tmp_path)
    assert plan.env_file == tmp_path / ".deepspeed_env"
    assert plan.env_text == "MIXMAE_GPUS_PER_NODE=8\nNCCL_DEBUG=WARN\nNCCL_IB_HCA=mlx5\n"
    assert main(["launch", "swin_b", "--dry-run", "--cluster", cluster]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mixmae: warning: cluster.num_nodes=2: SIGUSR1/SIGTERM to this command does not reach the ranks "
                   "(pdsh starts them on every node); use launch/slurm/*.sbatch (`mixmae templates DIR` writes them "
                   "out) or signal the ranks on every node"]
    assert main(["launch", "tiny", "--dry-run"]) == 0 and "warning" not in capsys.readouterr().err


def test_launcher_slurm_is_refused_with_the_sbatch_scripts_as_the_remedy(tmp_path):
    """DeepSpeed 0.19.8's SlurmRunner.get_cmd drops `--module` and runs `python -u mixmae_scale.cli ...` ("can't
    open file") and passes no --master_port: `mixmae launch` must not compose it, and must point at the sbatch
    scripts. The refusal for launcher=local on several nodes must not recommend slurm either."""
    cluster = _cluster(tmp_path, launcher="slurm")
    with pytest.raises(ConfigError) as refused:
        compose(load_resolved("swin_b", cluster), "swin_b", cluster, [], workdir=tmp_path)
    message = str(refused.value)
    assert message.startswith("cluster.launcher=slurm: ")
    assert "launch/slurm/pretrain_srun.sbatch" in message and "launch/slurm/pretrain.sbatch" in message
    local = _cluster(tmp_path, launcher="local")
    with pytest.raises(ConfigError) as refused:
        compose(load_resolved("swin_b", local), "swin_b", local, [], workdir=tmp_path)
    assert "slurm)" not in str(refused.value) and "(pdsh, openmpi, mvapich)" in str(refused.value)


def test_one_node_launch_keeps_to_cuda_visible_devices(monkeypatch):
    """DeepSpeed's runner follows CUDA_VISIBLE_DEVICES on one node only without --num_gpus ("Detected
    VISIBLE_DEVICES=2,3 but ignoring it"): with --num_gpus 2 it starts ranks on GPUs 0,1, the devices of someone
    else. The composed command says `--include localhost:2,3` instead; DeepSpeed's own `main` runs on it (a
    4-GPU node stood in by its device count) and must start the ranks on GPUs 2 and 3."""
    from deepspeed.launcher.runner import get_accelerator

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    overrides = ["cluster.gpus_per_node=2"]
    plan = compose(load_resolved("swin_h", None, overrides), "swin_h", None, overrides)
    assert "--num_gpus" not in plan.command
    assert plan.command[plan.command.index("--include") + 1] == "localhost:2,3"
    monkeypatch.setattr(get_accelerator(), "device_count", lambda: 4)
    launch = deepspeed_would_start(plan.command[1:], monkeypatch)
    world = next(a for a in launch if a.startswith("--world_info="))
    assert json.loads(base64.urlsafe_b64decode(world.split("=", 1)[1])) == {"localhost": [2, 3]}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # the runner deleted it from this process's environment
    with pytest.raises(ConfigError) as refused:
        compose(load_resolved("swin_h"), "swin_h", None, [])
    assert str(refused.value).startswith("CUDA_VISIBLE_DEVICES=2,3 makes 2 GPUs visible, cluster.gpus_per_node "
                                         "is 8: ")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5f3a,GPU-77b1")
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES=GPU-5f3a,GPU-77b1: .*cluster.include"):
        compose(load_resolved("swin_h", None, overrides), "swin_h", None, overrides)


def test_a_segmentation_launch_without_its_init_is_refused_by_launch_naming_the_key(capsys):
    """`launch seg_demo` without `segment.init` composed and started the ranks, each of which then refused it: the
    launch itself refuses it (as it does a fine-tuning launch without `finetune.init`), in words that say how to set
    it on this command line (launch has no --init)."""
    from mixmae_scale.cli import main

    assert main(["launch", "seg_demo", "--dry-run"]) == 2
    said = capsys.readouterr()
    assert said.err == ("mixmae: error: segment.init is not set: name the encoder to start from (--set "
                        "segment.init=RUN_FOLDER, an exported .safetensors or an official MixMIM .pth), or --set "
                        "segment.init=random for a randomly initialised encoder (the baseline)\n")
    assert "--module" not in said.out
    assert main(["launch", "seg_demo", "--dry-run", "--set", "segment.init=random"]) == 0
    assert "--module mixmae_scale.cli segment --profile seg_demo --set segment.init=random" in capsys.readouterr().out


def test_dry_run_counts_steps_from_an_s3_set_and_says_why_when_it_cannot_read_it(capsys, demo_shards, s3_bucket):
    """data.shards=s3://... is counted from the bucket as the run counts it; one that cannot be read says the URL
    and why (the store's error), not a local path made of the URL (`/cwd/s3:/bucket/...`) that "is not here"."""
    from mixmae_scale.cli import main
    from mixmae_scale.data import storage

    for path in sorted(demo_shards.rglob("*")):
        if path.is_file():
            storage.upload(path, f"s3://{s3_bucket}/demo/{path.relative_to(demo_shards).as_posix()}")
    assert main(["launch", "tiny", "--dry-run", "--set", f"data.shards=s3://{s3_bucket}/demo"]) == 0
    out = capsys.readouterr().out
    assert f"steps per epoch  9 (300 samples, counted in s3://{s3_bucket}/demo/dataset.json)" in out
    assert main(["launch", "tiny", "--dry-run", "--set", "data.shards=s3://no-such-bucket-here/demo"]) == 0
    out = capsys.readouterr().out
    assert ("steps per epoch  81 (2600 samples, data.train_samples: s3://no-such-bucket-here/demo/dataset.json could "
            "not be read here (s3://no-such-bucket-here/demo/dataset.json: GET failed: the bucket no-such-bucket-here "
            "does not exist at http://127.0.0.1:") in out, out


def test_several_nodes_reading_s3_get_the_shells_aws_settings_but_not_its_keys(tmp_path, monkeypatch):
    """DeepSpeed forwards no AWS_* variable to other hosts: ranks there went to AWS's own endpoint (or found no
    credentials) where the launching shell pointed at a MinIO. The settings travel in .deepspeed_env; the keys
    do not (a file in the run folder, printed by the dry run): a note says so and where the ranks read them."""
    from mixmae_scale.cluster.compose import AWS_KEYS, AWS_SETTINGS

    for key in AWS_SETTINGS + AWS_KEYS:
        monkeypatch.delenv(key, raising=False)
    for key, value in (("AWS_ENDPOINT_URL", "http://minio.internal:9000"), ("AWS_DEFAULT_REGION", "eu-west-1"),
                       ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE"), ("AWS_SECRET_ACCESS_KEY", "secret")):
        monkeypatch.setenv(key, value)
    cluster = _cluster(tmp_path, launcher="pdsh")
    remote = load_resolved("swin_b", cluster, ["data.shards=s3://bucket/set"])
    plan = compose(remote, "swin_b", cluster, [], workdir=tmp_path, check_files=False)
    assert plan.env_text == ("AWS_DEFAULT_REGION=eu-west-1\nAWS_ENDPOINT_URL=http://minio.internal:9000\n"
                             "NCCL_DEBUG=WARN\nNCCL_IB_HCA=mlx5\n")
    assert [n for n in plan.notes if "AWS" in n] == [
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY of this shell are not written to .deepspeed_env (a file, printed "
        "above): ranks on the other hosts read their keys from the AWS credentials file (~/.aws/credentials, "
        "AWS_SHARED_CREDENTIALS_FILE) or AWS_PROFILE there, or put them in cluster.env"]
    local = compose(load_resolved("swin_b", cluster), "swin_b", cluster, [], workdir=tmp_path, check_files=False)
    assert "AWS" not in local.env_text and not [n for n in local.notes if "AWS" in n]  # a run that reads no store


def test_several_nodes_get_the_shells_object_store_timeouts(tmp_path, monkeypatch):
    """MIXMAE_S3_READ_TIMEOUT and MIXMAE_S3_CONNECT_TIMEOUT are read where each rank makes its client
    (data/storage.py): ranks on other hosts have them only if .deepspeed_env carries them, as it carries the
    shell's other MIXMAE_*."""
    for key in [k for k in os.environ if k.startswith("MIXMAE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MIXMAE_S3_READ_TIMEOUT", "300")
    monkeypatch.setenv("MIXMAE_S3_CONNECT_TIMEOUT", "20")
    cluster = _cluster(tmp_path, launcher="pdsh")
    remote = load_resolved("swin_b", cluster, ["data.shards=s3://bucket/set"])
    plan = compose(remote, "swin_b", cluster, [], workdir=tmp_path, check_files=False)
    assert plan.env_file == tmp_path / ".deepspeed_env"
    assert {"MIXMAE_S3_READ_TIMEOUT=300", "MIXMAE_S3_CONNECT_TIMEOUT=20"} <= set(plan.env_text.splitlines())


def test_a_launch_reading_s3_refuses_a_store_timeout_every_rank_would_refuse(monkeypatch):
    """MIXMAE_S3_READ_TIMEOUT=abc is refused where a client is made (data/storage.py). The launch's own manifest
    read made one, and its refusal was taken for "could not be read here": the launch went on, and carried the
    variable to every rank (.deepspeed_env), where each refused it at its first read."""
    from mixmae_scale.cluster.compose import train_samples_for
    from mixmae_scale.data import storage

    monkeypatch.setattr(storage, "_CLIENTS", {})
    monkeypatch.setenv("MIXMAE_S3_READ_TIMEOUT", "abc")
    config = load_resolved("swin_b", None, ["data.shards=s3://bucket/set"]).config
    with pytest.raises(storage.StorageError, match=r"^MIXMAE_S3_READ_TIMEOUT='abc': not a positive number"):
        train_samples_for(config)
    mixed = load_resolved("swin_b", None, ["data.sources=[{shards: s3://bucket/set}]"]).config  # data.shards local
    with pytest.raises(storage.StorageError, match=r"^MIXMAE_S3_READ_TIMEOUT='abc'"):
        train_samples_for(mixed)


@pytest.mark.parametrize("line, said", [
    ("NCCL_P2P_LEVEL:", "cluster.env.NCCL_P2P_LEVEL has no value"),
    ("TORCH_NCCL_BLOCKING_WAIT: yes", "cluster.env.TORCH_NCCL_BLOCKING_WAIT: yes/true/on reads as a YAML boolean"),
    ("NCCL_IB_DISABLE: off", "cluster.env.NCCL_IB_DISABLE: no/false/off reads as a YAML boolean"),
])
def test_a_blank_or_boolean_cluster_env_value_is_refused(tmp_path, line, said):
    """cluster.env values go to every rank as text: a blank value was exported as 'None' and yes/on as 'True' (YAML
    reads them as null and booleans), in the sbatch scripts' exports and in `mixmae launch`'s environment alike."""
    from mixmae_scale.cluster.shell_env import export_lines

    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(f"cluster:\n  num_nodes: 1\n  env:\n    NCCL_DEBUG: WARN\n    {line}\n")
    with pytest.raises(ConfigError, match=f"{cluster}: {said}"):
        export_lines(str(cluster))
    with pytest.raises(ConfigError, match=said):
        compose(load_resolved("swin_b", str(cluster)), "swin_b", str(cluster), [])
    cluster.write_text("cluster:\n  num_nodes: 1\n  env:\n    A: 'yes'\n    B: ''\n    C: 1\n")
    assert export_lines(str(cluster)) == ["export A=yes", "export B=''", "export C=1"]


@pytest.mark.parametrize("source", ["file", "--set"])
@pytest.mark.parametrize("typed, wanted", [("", ""), ("yes", "1"), ("off", "1")])
def test_the_advice_for_a_refused_cluster_env_value_is_a_command_that_works(tmp_path, source, typed, wanted):
    """The refusal of a blank or boolean cluster.env value advised the YAML file's syntax (`NAME: '1'`) also where
    the value came from --set, where that text is no override at all. The advice names a --set that the CLI's own
    parser and configuration loader take, and that gives the ranks the text."""
    from mixmae_scale.cli import build_parser
    from mixmae_scale.config import load_config

    given: list[str] = []
    if source == "file":
        (tmp_path / "cluster.yaml").write_text(f"cluster:\n  num_nodes: 1\n  env:\n    NCCL_X: {typed}\n")
    else:
        given = [f"cluster.env.NCCL_X={typed}"] if typed else ["cluster.env={NCCL_X: }"]  # a blank --set X= is ''

    cluster = str(tmp_path / "cluster.yaml") if source == "file" else None
    with pytest.raises(ConfigError) as refused:
        compose(load_resolved("tiny", cluster, given), "tiny", cluster, given)
    advice = re.search(r"--set (\S+)", str(refused.value))
    assert advice, str(refused.value)
    args = build_parser().parse_args(["launch", "tiny", *(["--cluster", cluster] if cluster else []),
                                      *(["--set", *given] if given else []), "--set", advice.group(1)])
    config, _ = load_config(args.profile, args.cluster, args.overrides)
    assert config.cluster.env == {"NCCL_X": wanted}
    plan = compose(load_resolved("tiny", cluster, args.overrides), "tiny", cluster, args.overrides)
    assert plan.env == config.cluster.env


TYPED = {"NCCL_IB_TIMEOUT": "010", "NCCL_MIN_NCHANNELS": "0x1F", "NCCL_X_TIME": "1:30", "NCCL_X_VERSION": "1.10",
         "NCCL_X_BIG": "1e3", "NCCL_X_DAY": "2024-01-01", "NCCL_X_COUNT": "1_000", "NCCL_X_INF": ".inf"}


def test_cluster_env_values_reach_the_ranks_as_typed_not_as_yaml_reads_them(tmp_path):
    """YAML 1.1 reads 010 as 8, 1:30 as 90 (sexagesimal), 1.10 as 1.1, 0x1F as 31, 1_000 as 1000 and 2024-01-01 as a
    date: an environment variable is text, and every rank got str() of those. From a cluster file (the sbatch
    scripts' exports, `mixmae launch`'s environment) and from --set, in each form, the ranks get what was typed."""
    from mixmae_scale.cluster.shell_env import export_lines

    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("cluster:\n  num_nodes: 1\n  env:\n" + "".join(f"    {k}: {v}\n" for k, v in TYPED.items()))
    assert export_lines(str(cluster)) == [f"export {k}={v}" for k, v in sorted(TYPED.items())]
    assert compose(load_resolved("tiny", str(cluster)), "tiny", str(cluster), []).env == TYPED
    flow = "cluster.env={" + ", ".join(f"{k}: {v}" for k, v in TYPED.items()) + "}"
    for overrides in ([f"cluster.env.{k}={v}" for k, v in TYPED.items()], [flow]):
        assert compose(load_resolved("tiny", None, overrides), "tiny", None, overrides).env == TYPED, overrides
    assert load_resolved("tiny", None, ["batch.micro=010"]).config.batch.micro == 8  # elsewhere YAML's reading


@pytest.mark.parametrize("port", [70000, 0, -1])
def test_a_cluster_files_master_port_outside_1_to_65535_is_refused_at_load_naming_the_file(tmp_path, port):
    """The sbatch scripts' exports took cluster.master_port: 70000 and every rank failed at the rendezvous; 0 has
    no meaning here either (each node would pick its own port). Both readers of the file refuse it in one line."""
    from mixmae_scale.cluster.shell_env import export_lines
    from mixmae_scale.config import load_config

    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(f"cluster:\n  num_nodes: 1\n  master_port: {port}\n")
    said = f"{cluster}: cluster.master_port={port} is not a TCP port (1-65535)"
    with pytest.raises(ConfigError, match=re.escape(said)):
        export_lines(str(cluster))
    with pytest.raises(ConfigError, match=re.escape(said)):
        load_config("swin_b", str(cluster))
    cluster.write_text("cluster:\n  master_port: 65535\n")
    assert export_lines(str(cluster)) == ["MIXMAE_CLUSTER_MASTER_PORT=65535"]
