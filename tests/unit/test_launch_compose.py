"""The deepspeed launcher command composed from a profile and a cluster file."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from mixmae_scale.cluster.compose import batch_report, compose
from mixmae_scale.config import ConfigError, load_resolved

EXAMPLE_CLUSTER = str(Path(__file__).resolve().parents[2] / "launch" / "cluster.example.yaml")


def _cluster(tmp_path, **extra) -> str:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-0 slots=8\nworker-1 slots=8\n")
    lines = ["cluster:", f"  hostfile: {hostfile}", "  num_nodes: 2", "  gpus_per_node: 8", "  launcher: openmpi",
             "  master_addr: worker-0", "  master_port: 29555", "  env:", "    NCCL_DEBUG: WARN",
             "    NCCL_IB_HCA: mlx5"] + [f"  {k}: {v}" for k, v in extra.items()]
    path = tmp_path / "cluster.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_command_carries_cluster_settings_and_overrides(tmp_path):
    cluster = _cluster(tmp_path, include="worker-0@worker-1:0,1")
    overrides = ["batch.micro=64"]
    resolved = load_resolved("swin_b", cluster, overrides)
    plan = compose(resolved, "swin_b", cluster, overrides, workdir=tmp_path)
    cmd = plan.command
    assert cmd[0].endswith("deepspeed")
    for flag, value in (("--hostfile", str(tmp_path / "hostfile")), ("--launcher", "openmpi"), ("--num_nodes", "2"),
                        ("--num_gpus", "8"), ("--master_addr", "worker-0"), ("--master_port", "29555"),
                        ("--include", "worker-0@worker-1:0,1")):
        assert cmd[cmd.index(flag) + 1] == value
    assert cmd[cmd.index("--module") + 1:] == ["mixmae_scale.cli", "pretrain", "--profile", "swin_b", "--cluster",
                                               cluster, "--set", "batch.micro=64"]
    assert plan.env_file == tmp_path / ".deepspeed_env"
    assert plan.env_text == "NCCL_DEBUG=WARN\nNCCL_IB_HCA=mlx5\n"
    report = "\n".join(batch_report(resolved))
    assert "world size       16 = 2 node(s) x 8 GPU(s)" in report
    assert "global batch     2048 = 64 x 2 x 16" in report


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
    with pytest.raises(ConfigError, match="lists 1 node\\(s\\), cluster.num_nodes is 2"):
        compose(load_resolved("swin_b", overrides=[f"cluster.hostfile={short}"]), "swin_b", None, [])
    with pytest.raises(ConfigError, match="cluster file .* is a folder; name the YAML file"):  # IsADirectoryError
        load_resolved("swin_b", str(tmp_path))
    with pytest.raises(ConfigError, match=f"cluster.hostfile {tmp_path} is a folder; name the hostfile"):
        compose(load_resolved("swin_b", overrides=[f"cluster.hostfile={tmp_path}"]), "swin_b", None, [])
    # The local launcher (tiny's) starts ranks on this node only: asking it for 2 nodes would train on one, quietly.
    two_local = load_resolved("tiny", overrides=["cluster.num_nodes=2", "cluster.gpus_per_node=4"])
    with pytest.raises(ConfigError, match="num_nodes=2 with cluster.launcher=local: .* on 4 GPU\\(s\\), not 8"):
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
    assert command[1:] == ["--num_gpus", "8", "--master_port", "29500", "--module", "mixmae_scale.cli", "pretrain",
                           "--profile", "swin_h"]


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
