"""The exact `deepspeed` launcher command for a profile, like gpt-neox's deepy.py.

The command is composed from the cluster section (hostfile, include/exclude, nodes, GPUs per node,
master address and port, launcher backend); environment variables for every rank go into the
`.deepspeed_env` file that the launcher forwards to all nodes.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from mixmae_scale.config import ResolvedConfig
from mixmae_scale.config.load import ConfigError

ENV_FILE = ".deepspeed_env"


@dataclass
class LaunchPlan:
    command: list[str]
    env_file: Path | None
    env_text: str

    def shell(self) -> str:
        return shlex.join(self.command)


def compose(resolved: ResolvedConfig, profile: str, cluster_file: str | None, overrides: list[str],
            job: str = "pretrain", workdir: Path = Path("."), check_files: bool = True) -> LaunchPlan:
    """`check_files=False` (dry runs) composes even where the hostfile is not written yet."""
    c = resolved.config.cluster
    if c.include and c.exclude:
        raise ConfigError("cluster.include and cluster.exclude are mutually exclusive (a deepspeed launcher rule)")
    launcher = [str(Path(sys.executable).parent / "deepspeed")]
    if c.launcher != "local":
        if check_files and not c.hostfile:
            raise ConfigError(f"cluster.launcher={c.launcher!r} needs cluster.hostfile (see launch/hostfile.example)")
        if check_files and not Path(c.hostfile).exists():
            raise ConfigError(f"cluster.hostfile {c.hostfile} does not exist")
        launcher += ["--hostfile", c.hostfile or "<cluster.hostfile>", "--launcher", c.launcher,
                     "--num_nodes", str(c.num_nodes)]
        if c.include:
            launcher += ["--include", c.include]
        if c.exclude:
            launcher += ["--exclude", c.exclude]
    launcher += ["--num_gpus", str(c.gpus_per_node), "--master_port", str(c.master_port)]
    if c.master_addr:
        launcher += ["--master_addr", c.master_addr]
    args = ["--module", "mixmae_scale.cli", job, "--profile", profile]
    if cluster_file:
        args += ["--cluster", cluster_file]
    for item in overrides:
        args += ["--set", item]
    env_text = "".join(f"{k}={v}\n" for k, v in sorted(c.env.items()))
    return LaunchPlan(launcher + args, Path(workdir) / ENV_FILE if env_text else None, env_text)


def batch_report(resolved: ResolvedConfig) -> list[str]:
    d, c = resolved.derived, resolved.config.cluster
    return [f"world size       {d.world_size} = {c.num_nodes} node(s) x {c.gpus_per_node} GPU(s)",
            f"micro batch      {d.micro_batch} per GPU",
            f"accumulation     {d.accumulation} step(s)",
            f"global batch     {d.global_batch} = {d.micro_batch} x {d.accumulation} x {d.world_size}",
            f"learning rate    {d.learning_rate:.3g} (base {resolved.config.optim.base_learning_rate:g} x "
            f"{d.global_batch}/256)",
            f"steps per epoch  {d.steps_per_epoch} ({resolved.config.data.train_samples} samples)",
            f"total steps      {d.total_steps} ({resolved.config.schedule.epochs:g} epochs, "
            f"{d.warmup_steps} warm-up)"]
