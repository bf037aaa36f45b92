"""The exact `deepspeed` launcher command for a profile, like gpt-neox's deepy.py.

The command is composed from the cluster section (hostfile, include/exclude, nodes, GPUs per node,
master address and port, launcher backend); without cluster.master_port the port comes from the run folder
(rendezvous.py `launch_port`), and where rank 0 runs on this host the port is tried first (`rendezvous_port`).
Environment variables for every rank (`cluster.env`): on one node they go into the launched process's environment,
which the ranks inherit (DeepSpeed reads `.deepspeed_env` only where it starts other hosts); on several nodes into
`.deepspeed_env`, with the MIXMAE_* variables of the launching shell, since DeepSpeed forwards only NCCL*, PYTHON*,
UCX*, MV2*, MLFLOW* and that file to remote ranks; a run that reads s3:// gets the shell's AWS settings there too,
though not its keys (below).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mixmae_scale.cluster.rendezvous import RendezvousPort, is_this_host, rendezvous_port
from mixmae_scale.config import ResolvedConfig
from mixmae_scale.config.load import ConfigError
from mixmae_scale.config.schema import Config
from mixmae_scale.data import storage
from mixmae_scale.data.errors import plural

ENV_FILE = ".deepspeed_env"
# Where the store is and how to talk to it: what every rank of a run reading s3:// needs as the launching shell has
# it. The keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) are not among them: .deepspeed_env is a
# file in the run's folder and the dry run prints it; other hosts read them from their AWS credentials file.
# The store's timeouts (MIXMAE_S3_CONNECT_TIMEOUT, MIXMAE_S3_READ_TIMEOUT: data/storage.py) travel with the shell's
# other MIXMAE_* variables, which every launch on several nodes carries, so they are not listed here.
AWS_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
                "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# DeepSpeed 0.19.8's MPI backends refuse --num_nodes/--num_gpus and --include/--exclude (validate_args) and start
# `mpirun -n <all slots of the hostfile>`: the hostfile alone says where ranks go.
MPI_LAUNCHERS = ("openmpi", "mvapich")
# DeepSpeed 0.19.8's SlurmRunner.get_cmd drops `--module` (it starts `srun ... python -u mixmae_scale.cli ...`,
# which fails with "can't open file") and passes no --master_port: Slurm runs go through launch/slurm/*.sbatch.
SLURM_REFUSAL = ("cluster.launcher=slurm: DeepSpeed's slurm launcher cannot start this run (it drops --module "
                 "and runs `python -u mixmae_scale.cli`, a file that does not exist, and ignores "
                 "cluster.master_port); submit launch/slurm/pretrain_srun.sbatch (one srun task per GPU) or "
                 "launch/slurm/pretrain.sbatch (one deepspeed launcher per node) with sbatch instead "
                 "(`mixmae templates DIR` writes them out), or set cluster.launcher to pdsh, openmpi or mvapich")


# DeepSpeed 0.19.8's MultiNodeRunner.add_export, which every line of .deepspeed_env goes through: the value is
# stripped, and one with a character outside this class is wrapped in double quotes. pdsh sends `export K="V";`
# through the remote shell, which expands $, `, \ and " inside them; mpirun's -x K="V" and mpiexec's -genv keep
# the quotes as part of the value. A newline splits the value into two lines of the file.
DEEPSPEED_PLAIN = re.compile(r"[\w@%+=:,./-]*")
PDSH_EXPANDED = re.compile(r'[$`"\\]')


def forwarding_problem(value: str, launcher: str) -> str | None:
    """Why DeepSpeed's runner, passing `value` through .deepspeed_env to ranks on other hosts with `launcher`,
    would give them another value; None where they get it as it is. The sbatch scripts and a one-node launch give
    it as typed, so the multi-node launch must not change it without a word."""
    if "\n" in value or "\r" in value:
        return "a line break splits it into two lines of that file"
    if value != value.strip():
        return "DeepSpeed strips the blanks around it"
    if DEEPSPEED_PLAIN.fullmatch(value):
        return None
    if launcher not in MPI_LAUNCHERS:
        return ("DeepSpeed puts it in double quotes, inside which the remote shell expands $, `, \\ and \""
                if PDSH_EXPANDED.search(value) else None)
    return "DeepSpeed puts it in double quotes, which mpirun keeps as part of the value"


@dataclass
class LaunchPlan:
    command: list[str]
    env_file: Path | None
    env_text: str
    env: dict[str, str] = field(default_factory=dict)  # for every rank: the launched process's environment
    notes: list[str] = field(default_factory=list)  # what a dry run found that the real launch would refuse
    port: RendezvousPort | None = None  # the --master_port given, where it came from, whether it was tried here

    def shell(self) -> str:
        return shlex.join(self.command)


# DeepSpeed 0.19.8's runner._parse_hostfile: a line that is not a comment or blank must start 'HOST slots=N'.
HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")


def hostfile_slots(path: Path) -> dict[str, int]:
    """Hosts and their `slots=` by DeepSpeed's own rule (HOSTFILE_LINE, each host once), so that a hostfile passed
    here is one its runner reads: it raises a bare ValueError (a traceback) for a line like 'worker-0 gpu slots=8'
    or a host listed twice, and the dict a looser reading made of the latter counted one node fewer."""
    slots: dict[str, int] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = HOSTFILE_LINE.search(line)
        if not match:
            raise ConfigError(f"cluster.hostfile {path}: line '{line}' is not 'HOST slots=N' (DeepSpeed's runner "
                              "refuses it; see launch/hostfile.example)")
        if match.group(1) in slots:
            raise ConfigError(f"cluster.hostfile {path}: lists {match.group(1)} twice (DeepSpeed's runner refuses "
                              "it); one line per node")
        slots[match.group(1)] = int(match.group(2))
    return slots


def local_gpus(gpus_per_node: int) -> int:
    """This node's devices as DeepSpeed's runner counts them on a one-node launch; gpus_per_node where none is
    seen (a dry run on a login node)."""
    try:
        import torch

        return torch.cuda.device_count() or gpus_per_node
    except ImportError:
        return gpus_per_node


def selected_gpus(pool: dict[str, int], include: str | None, exclude: str | None, num_nodes: int,
                  gpus_per_node: int) -> list[str]:
    """Refuses an include/exclude whose selection is not num_nodes hosts of gpus_per_node GPUs: the run's batch
    arithmetic (world size, learning rate) uses those two numbers, DeepSpeed starts what the selection says. The
    selection is DeepSpeed's own (parse_inclusion_exclusion), so its errors are its errors. Returns its hosts in
    DeepSpeed's order: rank 0 starts on the first."""
    from deepspeed.launcher.runner import parse_inclusion_exclusion

    key, value = ("cluster.include", include) if include else ("cluster.exclude", exclude)
    try:
        chosen = parse_inclusion_exclusion(pool, include or "", exclude or "")
    except ValueError as exc:
        raise ConfigError(f"{key}={value}: {exc}") from None
    counts = {host: len(slots) for host, slots in chosen.items()}
    if len(counts) != num_nodes or any(n != gpus_per_node for n in counts.values()):
        said = ", ".join(f"{plural(n, 'GPU')} on {host}" for host, n in counts.items()) or "no GPU"
        raise ConfigError(f"{key}={value} selects {said}; cluster.num_nodes={num_nodes} x "
                          f"cluster.gpus_per_node={gpus_per_node} must describe it (the batch arithmetic uses them)")


def visible_devices(gpus_per_node: int) -> str | None:
    """The GPUs CUDA_VISIBLE_DEVICES gives this shell, as DeepSpeed's --include wants them ('2,3'), or None where it
    is unset. DeepSpeed's runner follows the variable on one node only when given no --num_gpus ("Detected
    VISIBLE_DEVICES=2,3 but ignoring it" otherwise) and then starts the ranks on GPUs 0..N-1, which may be another
    user's or job's: a one-node launch names the visible GPUs itself, and their count must be gpus_per_node, which
    the batch arithmetic uses."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not value:
        return None
    ids = [item.strip() for item in value.split(",")]
    if not all(item.isdigit() for item in ids):
        raise ConfigError(f"CUDA_VISIBLE_DEVICES={value}: DeepSpeed's launcher selects GPUs by index only; list "
                          "indices (CUDA_VISIBLE_DEVICES=0,1), or unset it and set cluster.include=localhost:0,1")
    if len(ids) != gpus_per_node:
        raise ConfigError(f"CUDA_VISIBLE_DEVICES={value} makes {plural(len(ids), 'GPU')} visible, "
                          f"cluster.gpus_per_node is "
                          f"{gpus_per_node}: make them agree (--set cluster.gpus_per_node={len(ids)}, which the batch "
                          "arithmetic uses, or list that many GPUs), or unset CUDA_VISIBLE_DEVICES to use GPUs "
                          f"0-{gpus_per_node - 1}")
    return ",".join(ids)


def compose(resolved: ResolvedConfig, profile: str, cluster_file: str | None, overrides: list[str],
            job: str = "pretrain", workdir: Path = Path("."), check_files: bool = True) -> LaunchPlan:
    """The command as it must run. One node needs no hostfile and no remote launcher: the command is the
    plain local form, which runs as printed. Several nodes need the hostfile; `check_files=False` (a dry run)
    reports a hostfile that is missing here in `notes` instead of refusing, since it is often written by the
    scheduler at job start."""
    c = resolved.config.cluster
    if c.include and c.exclude:
        raise ConfigError("cluster.include and cluster.exclude are mutually exclusive (a deepspeed launcher rule)")
    if c.num_nodes > 1 and c.launcher == "slurm":
        raise ConfigError(SLURM_REFUSAL)
    if c.num_nodes > 1 and c.launcher == "local":
        raise ConfigError(f"cluster.num_nodes={c.num_nodes} with cluster.launcher=local: the local launcher starts "
                          f"ranks on this node only, so the run would train on {plural(c.gpus_per_node, 'GPU')}, not "
                          f"{c.num_nodes * c.gpus_per_node}; set cluster.launcher (pdsh, openmpi, mvapich) "
                          "and cluster.hostfile, or under Slurm submit launch/slurm/pretrain_srun.sbatch or "
                          "launch/slurm/pretrain.sbatch (`mixmae templates DIR` writes them out)")
    launcher = [str(Path(sys.executable).parent / "deepspeed")]
    notes: list[str] = []
    rank0_host: str | None = None  # where rank 0 (and so the rendezvous store) starts; None: this host
    if c.num_nodes > 1 and c.launcher != "local":
        if not c.hostfile:
            raise ConfigError(f"cluster.num_nodes={c.num_nodes} needs cluster.hostfile, one line per node like "
                              f"'worker-0 slots={c.gpus_per_node}' (see launch/hostfile.example; `mixmae templates "
                              "DIR` writes it out); or set cluster.num_nodes=1 to run on this node")
        if (c.include or c.exclude) and c.launcher in MPI_LAUNCHERS:
            raise ConfigError(f"cluster.{'include' if c.include else 'exclude'} with cluster.launcher={c.launcher}: "
                              "DeepSpeed's MPI launchers cannot select hosts or GPUs; list the hosts to use in "
                              "cluster.hostfile instead")
        hostfile = Path(c.hostfile)
        rank0_host = f"the first host of {c.hostfile}"  # unknown until the hostfile is read
        if hostfile.is_dir():
            raise ConfigError(f"cluster.hostfile {c.hostfile} is a folder; name the hostfile (launch/hostfile.example; "
                              "`mixmae templates DIR` writes it out)")
        if not hostfile.exists():
            problem = f"cluster.hostfile {c.hostfile} does not exist (tried {hostfile.absolute()})"
            if check_files:
                raise ConfigError(f"{problem}; write it (one line per node, see launch/hostfile.example, which "
                                  "`mixmae templates DIR` writes out) or fix the path")
            notes.append(f"{problem}: the launch will stop unless it exists by then")
        else:
            pool = hostfile_slots(hostfile)
            mpi = c.launcher in MPI_LAUNCHERS
            hosts = list(pool)
            if c.include or c.exclude:
                hosts = selected_gpus(pool, c.include, c.exclude, c.num_nodes, c.gpus_per_node)
            else:
                problem = None
                if len(pool) < c.num_nodes or mpi and len(pool) != c.num_nodes:
                    problem = (f"cluster.hostfile {hostfile.absolute()} lists {plural(len(pool), 'node')}, "
                               f"cluster.num_nodes is {c.num_nodes}")
                    fix = ("add the nodes or lower cluster.num_nodes" if len(pool) < c.num_nodes else
                           "remove the extra nodes from the hostfile or raise cluster.num_nodes") + (
                        f" (cluster.launcher={c.launcher} starts a rank on every slot listed)" if mpi else "")
                else:
                    wrong = [(host, n) for host, n in list(pool.items())[:c.num_nodes] if n != c.gpus_per_node]
                    if wrong:
                        problem = (f"cluster.hostfile {hostfile.absolute()}: host {wrong[0][0]} has "
                                   f"slots={wrong[0][1]}, cluster.gpus_per_node is {c.gpus_per_node}")
                        fix = "make them agree (DeepSpeed would start gpus_per_node ranks there, or every slot)"
                if problem:
                    if check_files:
                        raise ConfigError(f"{problem}; {fix}")
                    notes.append(problem)
            if hosts:
                rank0_host = None if is_this_host(hosts[0]) else hosts[0]
        launcher += ["--hostfile", c.hostfile, "--launcher", c.launcher]
        if not (c.include or c.exclude) and c.launcher not in MPI_LAUNCHERS:
            launcher += ["--num_nodes", str(c.num_nodes)]
    elif c.include or c.exclude:
        selected_gpus({"localhost": local_gpus(c.gpus_per_node)}, c.include, c.exclude, 1, c.gpus_per_node)
    visible = None if c.num_nodes > 1 or c.include or c.exclude else visible_devices(c.gpus_per_node)
    if visible:
        launcher += ["--include", f"localhost:{visible}"]
    if c.include:
        launcher += ["--include", c.include]
    if c.exclude:
        launcher += ["--exclude", c.exclude]
    # DeepSpeed refuses --num_gpus with --include/--exclude, and its MPI launchers refuse it at all.
    if not (c.include or c.exclude or visible) and not (c.num_nodes > 1 and c.launcher in MPI_LAUNCHERS):
        launcher += ["--num_gpus", str(c.gpus_per_node)]
    run_dir = Path(resolved.config.run.output_dir) / resolved.config.run.name
    port = rendezvous_port(c.master_port, resolved.sources, run_dir, rank0_host)
    if port.refusal:
        if check_files:
            raise ConfigError(port.refusal)
        notes.append(f"{port.refusal}: the launch refuses it")
    launcher += ["--master_port", str(port.port)]
    if c.master_addr:
        launcher += ["--master_addr", c.master_addr]
    args = ["--module", "mixmae_scale.cli", job, "--profile", profile]
    if cluster_file:
        args += ["--cluster", cluster_file]
    for item in overrides:
        args += ["--set", item]
    from mixmae_scale.cluster.shell_env import env_problems

    env_problems(c.env, "the cluster section")
    env = {str(k): str(v) for k, v in sorted(c.env.items())}
    remote = c.num_nodes > 1 and c.launcher != "local"
    if remote:
        carried = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MIXMAE_")}
        data = resolved.config.data
        if any(storage.is_remote(where) for where in (data.shards, *(source.shards for source in data.sources))):
            carried.update({k: os.environ[k] for k in AWS_SETTINGS if os.environ.get(k)})
            keys = [k for k in AWS_KEYS if os.environ.get(k) and k not in c.env]
            if keys:
                notes.append(f"{', '.join(keys)} of this shell are not written to {ENV_FILE} (a file, printed above): "
                             "ranks on the other hosts read their keys from the AWS credentials file "
                             "(~/.aws/credentials, AWS_SHARED_CREDENTIALS_FILE) or AWS_PROFILE there, or put them "
                             "in cluster.env")
        env = {**dict(sorted(carried.items())), **env}
        for key, value in env.items():
            problem = forwarding_problem(value, c.launcher)
            if problem:
                where = f"cluster.env.{key}" if key in c.env else f"{key} (this shell's, carried)"
                raise ConfigError(f"{where}={value!r}: on several nodes DeepSpeed's {c.launcher} launcher passes it "
                                  f"to the ranks through {ENV_FILE}, and {problem}, so they would get another "
                                  "value; use a value of letters, digits and @%+=:,./- only, set it in the nodes' own "
                                  "environment, or under Slurm submit launch/slurm/*.sbatch, which pass it as typed")
    env_text = "".join(f"{k}={v}\n" for k, v in env.items())
    env_file = Path(workdir) / ENV_FILE if remote and env_text else None
    return LaunchPlan(launcher + args, env_file, env_text, env, notes, port)


def batch_report(resolved: ResolvedConfig, train_samples: int | None = None, samples_from: str | None = None
                 ) -> list[str]:
    """`train_samples`, `samples_from`: the training sample count the arithmetic used and where it came from
    (the shards' manifest, which the run itself reads, or the profile's data.train_samples)."""
    d, c = resolved.derived, resolved.config.cluster
    samples = train_samples if train_samples is not None else resolved.config.data.train_samples
    return [f"world size       {d.world_size} = {plural(c.num_nodes, 'node')} x {plural(c.gpus_per_node, 'GPU')}",
            f"micro batch      {d.micro_batch} per GPU",
            f"accumulation     {plural(d.accumulation, 'step')}",
            f"global batch     {d.global_batch} = {d.micro_batch} x {d.accumulation} x {d.world_size}",
            f"learning rate    {d.learning_rate:.3g} (base {resolved.config.optim.base_learning_rate:g} x "
            f"{d.global_batch}/256)",
            f"steps per epoch  {d.steps_per_epoch} ({plural(samples, 'sample')}"
            f"{', ' + samples_from if samples_from else ''})",
            f"total steps      {d.total_steps} ({resolved.config.schedule.epochs:g} epochs, "
            f"{d.warmup_steps} warm-up)"]


def train_samples_for(config: Config) -> tuple[int | None, str]:
    """The training sample count a run of `config` will use, and where it comes from: the run reads the
    shards' manifest, so the launch arithmetic does too when the shards are here; otherwise the profile's
    data.train_samples stands in, and the caller says so."""
    from mixmae_scale.data.manifest import MANIFEST, DataError, load_split

    shards = config.data.shards
    if any(storage.is_remote(where) for where in (shards, *(source.shards for source in config.data.sources))):
        storage.timeouts(os.environ)  # one every rank would refuse is no "could not be read here": refuse it now
    manifest = storage.join(shards, MANIFEST) if storage.is_remote(shards) else Path(shards, MANIFEST).absolute()
    try:
        return load_split(shards, config.data.train_split).samples, f"counted in {manifest}"
    except DataError as exc:
        if storage.is_remote(shards):  # unreachable from here (or no credentials) is not "not here": say which
            return None, (f"data.train_samples: {manifest} could not be read here ({exc}), so the run's own count "
                          "may differ and with it the steps")
        if Path(shards).is_dir() and not manifest.exists():
            raise  # a folder here that is not a shard set (images, say): every rank would refuse it, so refuse now
        return None, (f"data.train_samples: {manifest} is not here, so the run's own count may differ and "
                      "with it the steps")
