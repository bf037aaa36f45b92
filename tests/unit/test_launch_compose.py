"""The deepspeed launcher command composed from a profile and a cluster file."""

from __future__ import annotations

import pytest

from mixmae_scale.cluster.compose import batch_report, compose
from mixmae_scale.config import ConfigError, load_resolved


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
    missing = load_resolved("swin_b", overrides=["cluster.hostfile=/nowhere/hostfile"])
    with pytest.raises(ConfigError, match="does not exist"):
        compose(missing, "swin_b", None, [])
    plan = compose(load_resolved("swin_b"), "swin_b", None, [], check_files=False)  # a dry run still composes
    assert "<cluster.hostfile>" in plan.command


def test_launch_dry_run_prints_command_and_arithmetic(capsys):
    from mixmae_scale.cli import main

    assert main(["launch", "swin_h", "--dry-run", "--set", "cluster.num_nodes=2"]) == 0
    out = capsys.readouterr().out
    assert "global batch     2048 = 64 x 2 x 16" in out and "--module mixmae_scale.cli pretrain --profile swin_h" in out


def test_launch_runs_a_finetuning_profile_as_finetuning_unless_told(capsys):
    from mixmae_scale.cli import main

    assert main(["launch", "finetune_tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "job: finetune (from the profile" in out
    assert "--module mixmae_scale.cli finetune --profile finetune_tiny" in out
    assert main(["launch", "finetune_tiny", "--dry-run", "--job", "pretrain"]) == 0
    assert "--module mixmae_scale.cli pretrain --profile finetune_tiny" in capsys.readouterr().out
