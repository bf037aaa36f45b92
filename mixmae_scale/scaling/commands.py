"""The command each run of a sweep is started with: its overrides (its budget as the whole schedule, its data), the
`mixmae pretrain` arguments a worker here runs it with, and the `mixmae launch` line `--emit-commands` writes for a
cluster, with the world size its global batch allows.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from mixmae_scale.config import ConfigError
from mixmae_scale.data.manifest import DataError
from mixmae_scale.scaling.spec import PlannedRun, SweepSpec
from mixmae_scale.scaling.subsets import run_data, whole_sets


def run_overrides(run: PlannedRun, data: list[str], steps_per_epoch: int, sweep: str | None = None) -> list[str]:
    """The run's budget is its whole schedule: warm-up 10%, cosine to the last step. With W&B on, the sweep's runs
    form one group named after it."""
    epochs = run.steps / steps_per_epoch
    replaced = {item.split("=", 1)[0] for item in data}
    return [*(o for o in run.overrides if o.split("=", 1)[0] not in replaced), *data, f"schedule.epochs={epochs!r}",
            f"schedule.warmup_epochs={0.1 * epochs!r}", "checkpoint.every_steps=1000000",
            "logging.visualize_every_steps=0", "logging.tensorboard=false", f"run.name={run.run_id}",
            *([f"logging.wandb.group={sweep}"] if sweep else [])]


def pretrain_args(spec: SweepSpec, run: PlannedRun, out: Path, threads: int) -> list[str]:
    data, samples = run_data(spec, run.data_fraction, out)
    steps_per_epoch = max(1, samples // run.global_batch)
    sets = [arg for item in run_overrides(run, data, steps_per_epoch, spec.name) for arg in ("--set", item)]
    return ["pretrain", "--profile", spec.profile, "--run-dir", str(out / "runs" / run.run_id), "--max-steps",
            str(run.steps), *sets, "--set", f"data.num_threads={threads}"]


def cluster_shape(global_batch: int, gpus_per_node: int, max_nodes: int) -> tuple[int, int]:
    """(nodes, GPUs per node): the widest data parallelism the run's global batch allows (an even micro-batch
    per GPU, whole nodes where the batch fills them), so that a run is as short as its batch permits."""
    for nodes in range(max_nodes, 0, -1):
        if global_batch % (2 * nodes * gpus_per_node) == 0:
            return nodes, gpus_per_node
    for gpus in range(gpus_per_node, 0, -1):
        if global_batch % (2 * gpus) == 0:
            return 1, gpus
    return 1, 1


def launch_line(spec: SweepSpec, run: PlannedRun, out: Path, train_samples: int) -> str:
    nodes, gpus = cluster_shape(run.global_batch, spec.cluster["gpus_per_node"], spec.cluster["max_nodes"])
    if nodes > 1 and not spec.cluster.get("file"):
        raise ConfigError(f"{run.run_id} spreads its global batch of {run.global_batch} over {nodes} nodes, and "
                          "`mixmae launch` needs a cluster file (hostfile or Slurm, as for its --cluster) for more "
                          "than one: give it in the sweep spec as cluster: {file: cluster.yaml}, or keep every run "
                          "on one node with cluster: {max_nodes: 1}")
    try:
        data, samples = run_data(spec, run.data_fraction, out)
    except DataError as exc:  # planned where the manifests are not (the spec's train_samples)
        data, samples = whole_sets(spec, run.data_fraction, train_samples, exc)
    schedule = run_overrides(run, data, max(1, samples // run.global_batch), spec.name)
    sets = [*schedule, f"cluster.num_nodes={nodes}", f"cluster.gpus_per_node={gpus}",
            f"run.output_dir={out / 'runs'}"]
    cluster = ["--cluster", spec.cluster["file"]] if spec.cluster.get("file") else []
    return "mixmae launch " + shlex.join([spec.profile, *cluster, *[a for item in sets for a in ("--set", item)]])
