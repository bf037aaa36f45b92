"""`mixmae launch|plan|templates`: the deepspeed launcher command, per-GPU memory, the launch templates."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from mixmae_scale.cli.arguments import add_set_arg, at_least, between
from mixmae_scale.data.errors import plural

JOB_REASON = {"segment": "it sets segment.*", "finetune": "its file sets finetune.init",
              "pretrain": "its file sets neither finetune.init nor segment.*"}


def _launch(args: argparse.Namespace) -> int:
    import os

    from mixmae_scale.cluster.compose import batch_report, compose, train_samples_for
    from mixmae_scale.config import load_config, resolve, run_kind
    from mixmae_scale.config.derive import BatchSplitError

    config, sources = load_config(args.profile, args.cluster, args.overrides)
    kind = args.job or run_kind(args.profile)
    if kind == "finetune":  # what every rank of `mixmae finetune` would refuse, refused before anything starts
        from mixmae_scale.cli.job_commands import refuse_a_pretraining_profile
        from mixmae_scale.finetune.pretrained import require_finetune_init

        refuse_a_pretraining_profile(args.profile, config)
        require_finetune_init(config.finetune.init)
    elif kind == "segment":  # as for fine-tuning: every rank of `mixmae segment` would refuse it after the launch
        from mixmae_scale.segment.build import require_segment_init

        require_segment_init(config.segment.init, "--set segment.init=")
    samples, samples_from = train_samples_for(config)  # the run counts the manifest: so does this arithmetic
    try:
        resolved = resolve(config, sources, train_samples=samples)
    except BatchSplitError as exc:  # the ranks' own refusal (engine/loop.py start_run): a folder to resume names GPUs
        from pathlib import Path

        from mixmae_scale.engine.run_folder import unsplittable_resume

        raise unsplittable_resume(Path(config.run.output_dir) / config.run.name, exc, args.overwrite) from None
    print(f"job: {kind}" + ("" if args.job else f" (from the profile: {JOB_REASON[kind]}; --job overrides)"))
    plan = compose(resolved, args.profile, args.cluster, args.overrides, job=kind, check_files=not args.dry_run)
    if args.overwrite:
        plan.command.append("--overwrite")
    for line in batch_report(resolved, samples, samples_from):
        print(line)
    if plan.port is not None:  # where it came from, and whether it was tried here (cluster/rendezvous.py)
        print(plan.port.report())
    if plan.env_text:
        where = plan.env_file or "set in the launcher's environment"
        print(f"environment for every rank ({where}):\n" + "".join(f"  {line}\n" for line in
                                                                   plan.env_text.splitlines()), end="")
    print("command:\n  " + plan.shell())
    for note in plan.notes:
        print(f"note: {note}")
    c = resolved.config.cluster
    one_node = c.num_nodes == 1 or c.launcher == "local"
    if not one_node:
        print(f"mixmae: warning: cluster.num_nodes={c.num_nodes}: SIGUSR1/SIGTERM to this command does not reach the "
              f"ranks ({c.launcher} starts them on every node); use launch/slurm/*.sbatch (`mixmae templates DIR` "
              f"writes them out) or signal the ranks on "
              "every node", file=sys.stderr)
    if args.dry_run:
        return 0
    if plan.env_file:
        from mixmae_scale.atomic_file import write_text

        write_text(plan.env_file, plan.env_text)
    from mixmae_scale.cluster.signal_relay import relay

    # SIGUSR1 or SIGTERM to this process (a scheduler's preemption warning) reaches every rank on this node.
    return relay(plan.command, env={**os.environ, **plan.env}, shield_sigterm=one_node)


def _plan(args: argparse.Namespace) -> int:
    from mixmae_scale.cluster.plan import measure_activations, next_steps, options, plan, planning_dtype
    from mixmae_scale.config import load_resolved, run_kind

    # The run's own batch arithmetic (config/derive.py): the micro-batch and accumulation planned are those the
    # run will use, and a GPU count that `mixmae launch` refuses is refused here with the same message.
    resolved = load_resolved(args.profile, args.cluster, args.overrides, world_size=args.gpus)
    gpu_mem_gib = args.gpu_mem_gb * 1e9 / 2**30
    # One real forward serves the plan and every option (Swin-H: about 15 s and 3 GB on a CPU).
    activations = measure_activations(resolved, planning_dtype(resolved), job=args.job or run_kind(args.profile))
    result = plan(resolved, args.profile, args.gpus, gpu_mem_gib, activations=activations, job=args.job)
    found, chosen = (options(args.profile, args.gpus, gpu_mem_gib, args.cluster, args.overrides, args.headroom,
                             activations=activations, job=args.job) if args.recommend else ([], None))
    # Nothing fitting is a refusal (exit 2, as the CLI's others), with the ways out the planner evaluated.
    steps = (next_steps(args.profile, args.gpus, gpu_mem_gib, args.cluster, args.overrides, args.headroom,
                        activations=activations, job=args.job) if args.recommend and chosen is None else [])
    if args.json:
        report = result.to_dict()
        if args.recommend:
            report["options"] = [asdict(o) for o in found]
            report["recommended"] = asdict(chosen) if chosen else None
            report["next_steps"] = steps
        print(json.dumps(report, indent=2))
        return 2 if steps else 0
    print(f"{args.profile} ({result.job}): {result.params / 1e6:.1f}M parameters, ZeRO-{result.zero_stage}, "
          f"{result.dtype}, checkpointing {checkpointing_text(result.checkpoint_every)}, {plural(args.gpus, 'GPU')} of "
          f"{args.gpu_mem_gb:g} GB")
    for name, gib in result.components_gib.items():
        print(f"  {name:<26}{gib:8.2f} GiB")
    print("  (activations + gathered weights, and the optimizer step's transient, do not coexist; the peak "
          "takes the larger)")
    print(f"  {'peak':<26}{result.total_gib:8.2f} GiB during the {result.peak_phase}, "
          f"micro-batch {result.micro_batch} (x {result.accumulation} accumulation x {plural(args.gpus, 'GPU')} = "
          f"global batch {result.global_batch}, as the run derives it): "
          f"{'fits' if result.fits else 'does NOT fit'}; largest micro-batch that fits: {result.max_micro_batch}")
    if args.recommend:
        print(f"\nchoices for the profile's global batch, micro-batches fitting {1 - args.headroom:.0%} of the GPU "
              "(cheapest first):")
        print(f"  {'ZeRO':>4}  {'checkpointing':<14}{'micro':>6}{'accum':>6}{'peak GiB':>10}")
        for o in found:
            mark = "  <- use" if o is chosen else ""
            fits = (f"{o.micro_batch:>6}{o.accumulation:>6}{o.peak_gib:>10.2f}" if o.micro_batch
                    else f"{'does not fit':>22}")
            print(f"  {o.zero_stage:>4}  {'on' if o.checkpointing else 'off':<14}{fits}{mark}")
        if chosen is not None:
            print("set: " + " ".join(f"--set {s}" for s in chosen.overrides()))
        if steps:
            print(f"{steps[0]}; what would fit instead:\n" + "".join(f"  {step}\n" for step in steps[1:]), end="")
    return 2 if steps else 0


def _templates(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mixmae_scale.cluster.templates import write_templates

    out = Path(args.out)
    done = write_templates(out, force=args.force)
    for name in done.written:
        print(f"wrote {out / name}")
    for name in done.unchanged:
        print(f"unchanged {out / name}")
    for name in done.kept:
        print(f"kept {out / name}: it differs from the shipped template (your edits?); --force replaces it")
    print(f"next: edit {out / 'cluster.example.yaml'} for your nodes, then "
          f"PROFILE=swin_b CLUSTER={out / 'cluster.example.yaml'} sbatch {out / 'slurm' / 'pretrain.sbatch'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    launch = sub.add_parser(
        "launch", help="compose and run the deepspeed launcher command for a profile",
        description="Compose the deepspeed launcher command for a profile and run it. The rendezvous port is "
                    "cluster.master_port, else 10000 + crc32(the run folder's absolute path) % 20000, so that two "
                    "runs on one node differ; where rank 0 runs on this host the port is tried first: a derived one "
                    "that is taken moves to the next free one, a set one that is taken is refused. cluster.env "
                    "values reach every rank as typed (010 stays 010). Under Slurm submit "
                    "launch/slurm/pretrain_srun.sbatch or pretrain.sbatch instead (`mixmae templates DIR` writes "
                    "them out).")
    launch.add_argument("profile", help="profile name under launch/profiles/ or a YAML path")
    launch.add_argument("--cluster", help="cluster YAML (hostfile, nodes, GPUs, launcher, env)")
    add_set_arg(launch)
    launch.add_argument("--job", choices=["pretrain", "finetune", "segment"],
                        help="default: segment if the profile's file sets any segment.* key, finetune if it sets "
                             "finetune.init, else pretrain (--set changes neither)")
    launch.add_argument("--dry-run", action="store_true", help="print the command and the batch arithmetic only")
    launch.add_argument("--overwrite", action="store_true", help="passed to the job: move an earlier run in the run "
                        "folder to RUN.old-N and start this one there")
    launch.set_defaults(handler=_launch)

    planner = sub.add_parser("plan", help="per-GPU memory of a profile by component; largest micro-batch")
    planner.add_argument("profile", help="profile name under launch/profiles/ or a YAML path")
    planner.add_argument("--gpus", type=at_least(1), required=True, help="world size (ZeRO partitions over it)")
    planner.add_argument("--gpu-mem-gb", type=between(0.1, 1e5), default=80.0,
                         help="memory of one GPU in GB (1e9 bytes)")
    planner.add_argument("--cluster", help="cluster YAML merged after the profile")
    add_set_arg(planner)
    planner.add_argument("--job", choices=["pretrain", "finetune"],
                         help="default: finetune if the profile sets finetune.init, pretrain if it sets neither "
                              "that nor segment.* (a segmentation profile is refused: not planned)")
    planner.add_argument("--json", action="store_true", help="print JSON instead of a table")
    planner.add_argument("--recommend", action="store_true",
                         help="also rank ZeRO stage x checkpointing with the micro-batch and accumulation each allows")
    planner.add_argument("--headroom", type=between(0, 0.95), default=0.25,
                         help="fraction of GPU memory kept free (--recommend)")
    planner.set_defaults(handler=_plan)

    templates = sub.add_parser("templates", help="write the Slurm scripts and the cluster-file and hostfile examples "
                               "(launch/ of the repository) into a folder, to edit for a cluster")
    templates.add_argument("out", help="folder to write slurm/*.sbatch, cluster.example.yaml, hostfile.example into")
    templates.add_argument("--force", action="store_true", help="replace files there that differ from the templates")
    templates.set_defaults(handler=_templates)


def checkpointing_text(every: int) -> str:
    """model.checkpoint_every in words: off, every block, one block in k (swin.py checkpoints blocks 0, k, 2k...)."""
    return "off" if every <= 0 else "every block" if every == 1 else f"one block in {every}"
