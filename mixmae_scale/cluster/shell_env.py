"""What a Slurm batch script takes from the cluster file before it starts anything: `cluster.env` as `export`
lines, and the rendezvous port if the file names one.

The sbatch scripts start ranks through srun, which hands the batch step's environment to every task; DeepSpeed's
`.deepspeed_env` is read only where its runner starts other hosts itself, which these scripts never ask of it.
So the only way NCCL_SOCKET_IFNAME and the like from `cluster.env` reach the ranks is for the batch script to
export them: `exports=$(python -m mixmae_scale.cluster.shell_env CLUSTER_FILE) && eval "$exports"`.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from mixmae_scale.config.load import ConfigError, build_dataclass, read_yaml, require_port
from mixmae_scale.config.schema import ClusterConfig

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PORT_VARIABLE = "MIXMAE_CLUSTER_MASTER_PORT"  # a shell variable the scripts read, not exported


def env_problems(env: dict[str, object], where: str) -> None:
    """Refuses a `cluster.env` key no shell or `.deepspeed_env` line could carry, and a value read as null, a
    boolean or a mapping/list: every rank gets str(value), so a blank (null) became 'None' and yes/on 'True'. Numbers
    and dates arrive as the text typed (config/load.py keep_env_text: 010 stays 010, not 8)."""
    for key, value in env.items():
        if not NAME.fullmatch(str(key)):
            raise ConfigError(f"{where}: cluster.env key '{key}' is not an environment variable name "
                              "(letters, digits, _; not starting with a digit)")
        if value is None:
            raise ConfigError(f"{where}: cluster.env.{key} has no value (YAML reads a blank as null, which every "
                              f"rank would get as 'None'); for an empty value write {key}: '' in a YAML file or "
                              f"--set cluster.env.{key}= on the command line, or remove it")
        if isinstance(value, bool):
            words = "yes/true/on" if value else "no/false/off"
            raise ConfigError(f"{where}: cluster.env.{key}: {words} reads as a YAML boolean, which every rank "
                              f"would get as '{value}'; quote the text the variable wants: {key}: '1' in a YAML file, "
                              f"--set cluster.env.{key}=1 on the command line")
        if isinstance(value, dict | list):
            raise ConfigError(f"{where}: cluster.env.{key} is a {type(value).__name__}, not one value; an "
                              "environment variable holds text")


def export_lines(cluster_file: str) -> list[str]:
    path = Path(cluster_file)
    if not path.is_file():
        raise ConfigError(f"cluster file '{cluster_file}' does not exist or is not a file (tried {path.absolute()})")
    section = read_yaml(path).get("cluster") or {}
    require_port(section, cluster_file)
    cluster = build_dataclass(ClusterConfig, section, "cluster.")
    env_problems(cluster.env, cluster_file)
    lines = [f"export {key}={shlex.quote(str(value))}" for key, value in sorted(cluster.env.items())]
    if section.get("master_port") is not None:
        lines.append(f"{PORT_VARIABLE}={cluster.master_port}")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m mixmae_scale.cluster.shell_env CLUSTER_FILE", file=sys.stderr)
        return 2
    try:
        lines = export_lines(argv[0])
    except ConfigError as exc:
        print(f"mixmae: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
