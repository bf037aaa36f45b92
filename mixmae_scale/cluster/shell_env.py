"""What a Slurm batch script takes from the job's configuration before it starts anything: `cluster.env` as
`export` lines, and the rendezvous port where the job sets one.

The sbatch scripts start ranks through srun, which hands the batch step's environment to every task; DeepSpeed's
`.deepspeed_env` is read only where its runner starts other hosts itself, which these scripts never ask of it.
So the only way NCCL_SOCKET_IFNAME and the like from `cluster.env` reach the ranks is for the batch script to
export them: `exports=$(python -m mixmae_scale.cluster.shell_env CLUSTER_FILE) && eval "$exports"`.

The scripts call it as `shell_env --profile P [--cluster C] -- <the job's arguments>`: the exports and the port are
then `cluster.env` and `cluster.master_port` of the configuration the ranks build (profile, cluster file, `--set` after
the script, on the arguments parsed as `mixmae pretrain` parses them). Read from the cluster file alone, a port or
a variable in the profile or a `--set` was ignored without a word (the job rendezvoused on its job-id port).
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
# Set for every rank by the launcher (DeepSpeed's launch.py from --master_addr/--master_port) or the Slurm scripts,
# from these settings: in cluster.env the two paths disagreed (the scripts' rendezvous took it, DeepSpeed overrode it).
RENDEZVOUS = {"MASTER_PORT": "cluster.master_port", "MASTER_ADDR": "cluster.master_addr"}
# What the sbatch scripts (and pretrain.sbatch's node step) read after they evaluate these exports in their own
# shell: a cluster.env key among them would change what the script runs (PROFILE its profile, PYTHON its
# interpreter, SLURM_JOB_NODELIST its hosts, CUDA_VISIBLE_DEVICES the node step's GPUs), where `mixmae launch` only
# hands it to the ranks. tests/unit/test_slurm_scripts.py reads the scripts and checks that this lists them all.
SCRIPT_VARIABLES = frozenset({
    "CLUSTER_ARGS", "CPUS", "CUDA_VISIBLE_DEVICES", "EXPORTS", "GPUS", "HOSTFILE", "HOSTS", "MIXMAE_GPUS",
    "MIXMAE_HOSTFILE", "MIXMAE_NODES", "NODES", "NODE_STEP", "PROFILE", "PWD", "PYTHON", "SLURM_CPUS_PER_TASK",
    "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NNODES", "SLURM_NODEID",
    "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "hostfile", "hosts", "i", "ids", "item", "items", "listed",
    "placement", "status", "tasks", "top", "usual", "IFS"})


def env_problems(env: dict[str, object], where: str) -> None:
    """Refuses a `cluster.env` key no shell or `.deepspeed_env` line could carry, or one the rendezvous sets, and a
    value read as null, a boolean or a mapping/list: every rank gets str(value), so a blank (null) became 'None' and
    yes/on 'True'. Numbers and dates arrive as the text typed (config/load.py keep_env_text: 010 stays 010, not 8)."""
    for key, value in env.items():
        if not NAME.fullmatch(str(key)):
            raise ConfigError(f"{where}: cluster.env key '{key}' is not an environment variable name "
                              "(letters, digits, _; not starting with a digit)")
        if key in RENDEZVOUS:
            raise ConfigError(f"{where}: cluster.env.{key}: the rendezvous is set by {RENDEZVOUS[key]} (the launcher "
                              f"or the Slurm script gives every rank {key} from it); set {RENDEZVOUS[key]} instead"
                              + ("; under Slurm the scripts take the allocation's first node" if key == "MASTER_ADDR"
                                 else ""))
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


def script_variable_problems(env: dict[str, object], where: str) -> None:
    """Refuses a `cluster.env` key the Slurm scripts use themselves (SCRIPT_VARIABLES): only under Slurm, since
    `mixmae launch` gives it to the ranks without running it through a shell of its own."""
    for key in env:
        if key in SCRIPT_VARIABLES:
            raise ConfigError(f"{where}: cluster.env.{key}: the Slurm scripts (launch/slurm/*.sbatch) take cluster.env "
                              f"into their own shell and then read {key} themselves, so it would change what they run "
                              "(not only what the ranks get); use another name, or set it in the nodes' environment"
                              + (" (the interpreter: MIXMAE_PYTHON=/path/to/python sbatch ...)" if key == "PYTHON"
                                 else " (the profile: PROFILE=NAME sbatch ...)" if key == "PROFILE" else ""))


def export_lines(cluster_file: str) -> list[str]:
    path = Path(cluster_file)
    if not path.is_file():
        raise ConfigError(f"cluster file '{cluster_file}' does not exist or is not a file (tried {path.absolute()})")
    section = read_yaml(path).get("cluster") or {}
    require_port(section, cluster_file)
    cluster = build_dataclass(ClusterConfig, section, "cluster.")
    env_problems(cluster.env, cluster_file)
    script_variable_problems(cluster.env, cluster_file)
    lines = [f"export {key}={shlex.quote(str(value))}" for key, value in sorted(cluster.env.items())]
    if section.get("master_port") is not None:
        lines.append(f"{PORT_VARIABLE}={cluster.master_port}")
    return lines


def job_lines(argv: list[str]) -> list[str]:
    """The lines for a job whose `mixmae pretrain` arguments are `argv` (the script's --profile and --cluster first):
    `cluster.env` and the port of the configuration the ranks read (profile, cluster file, --set), as `mixmae launch`
    takes them; the cluster file's alone left a --set after the script unread. The port
    variable is always assigned, empty where nothing sets a port, so a value left in the submitting shell's
    environment is not taken for one. A usage error exits 2 in argparse's words, as the ranks' would."""
    from mixmae_scale.cluster.restart import parse
    from mixmae_scale.config import load_config

    args = parse(argv)
    if args.cluster:
        export_lines(args.cluster)  # the file's own problems, named by the file
    config, _ = load_config(args.profile, args.cluster, list(args.overrides))
    where = (f"the job's configuration (profile {args.profile}, "
             f"{f'cluster file {args.cluster}, ' if args.cluster else ''}--set)")
    env_problems(config.cluster.env, where)
    script_variable_problems(config.cluster.env, where)
    lines = [f"export {key}={shlex.quote(str(value))}" for key, value in sorted(config.cluster.env.items())]
    port = config.cluster.master_port
    if port is not None and not 1 <= port <= 65535:  # one from the cluster file was refused by export_lines
        raise ConfigError(f"cluster.master_port={port} is not a TCP port (1-65535) (from the profile "
                          f"{args.profile} or a --set)")
    return [*lines, f"{PORT_VARIABLE}={'' if port is None else port}"]


def main(argv: list[str] | None = None) -> int:
    """`shell_env CLUSTER_FILE`, or `shell_env --profile P [--cluster C] -- ARGS` (the sbatch scripts')."""
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv and len(argv) != 1:
        print("usage: python -m mixmae_scale.cluster.shell_env CLUSTER_FILE\n"
              "       python -m mixmae_scale.cluster.shell_env --profile P [--cluster C] -- PRETRAIN_ARGS",
              file=sys.stderr)
        return 2
    try:
        if "--" in argv:
            split = argv.index("--")
            lines = job_lines(argv[:split] + argv[split + 1:])
        else:
            lines = export_lines(argv[0])
    except ConfigError as exc:
        print(f"mixmae: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
