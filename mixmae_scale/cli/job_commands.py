"""`mixmae pretrain|finetune|eval`: the jobs that run under a launcher, one process per rank."""

from __future__ import annotations

import argparse
import json
import os
import sys

from mixmae_scale.cli.arguments import add_profile_args


def _distributed_job(args: argparse.Namespace, job) -> int:
    """Environment and shutdown shared by the jobs that run under a launcher (or alone)."""
    import logging

    from mixmae_scale.cluster.slurm_ranks import ranks_from_slurm

    slurm = ranks_from_slurm(os.environ)
    if slurm:  # one srun task per GPU (launch/slurm/pretrain_srun.sbatch): Slurm is the launcher
        os.environ.update(slurm)
    alone = "RANK" not in os.environ  # started without a launcher: a world of one, set up here and undone after
    saved_env = {key: os.environ.get(key) for key in WORLD_OF_ONE}
    if alone:
        os.environ.update(WORLD_OF_ONE, MASTER_PORT=str(_free_port()))
    rank = int(os.environ["RANK"])
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")
    try:
        return _run_rank(args, job, rank, alone)
    finally:
        if alone:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


WORLD_OF_ONE = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": ""}


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_rank(args: argparse.Namespace, job, rank: int, alone: bool) -> int:
    import logging

    from mixmae_scale.cli.failure_report import deliver, report_failure
    from mixmae_scale.engine import distributed
    from mixmae_scale.engine.faults import NonFiniteStop
    from mixmae_scale.engine.loop import RunAlreadyComplete

    if int(os.environ.get("LOCAL_RANK", args.local_rank)) == 0:
        removed = distributed.remove_stale_shm_buffers()
        if removed:
            logging.getLogger("mixmae").warning("removed %d DeepSpeed shared-memory buffer(s) a killed run left in "
                                                "/dev/shm: %s", len(removed), ", ".join(removed))
    rendezvous = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    try:
        code = job(rank, int(os.environ.get("LOCAL_RANK", args.local_rank)))
    except RunAlreadyComplete as exc:  # every rank knows it from the broadcast resume plan; nothing was written
        if rank == 0:
            print(f"mixmae: {exc}")
        distributed.shutdown(*rendezvous)
        return 0
    except NonFiniteStop as exc:  # every rank stops here together, after a collective checkpoint
        if rank == 0:
            deliver(f"mixmae: error: {exc}\n", alone)
        distributed.shutdown(*rendezvous)
        return 3
    except Exception as exc:  # noqa: BLE001 - every failure ends this rank now, reported once
        report_failure(rank, exc, alone)
        if alone:  # no peers to wait for: an orderly end, and the caller gets the exit code
            distributed.shutdown(*rendezvous)
            return 1
        distributed.remove_shm_buffer(*rendezvous, rank)
        # No orderly shutdown: its barrier would wait for ranks that are themselves waiting for this one. Exiting
        # at once makes the launcher stop the others (they see a closed connection and stay silent).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    distributed.shutdown(*rendezvous)
    return code


def _train_job(args: argparse.Namespace, kind: str) -> int:
    from pathlib import Path

    from mixmae_scale.config import load_config

    def job(rank: int, local_rank: int) -> int:
        config, sources = load_config(args.profile, args.cluster, args.overrides)
        run_dir = Path(args.run_dir or Path(config.run.output_dir) / config.run.name)
        if kind == "pretrain":
            from mixmae_scale.engine.pretrain import pretrain
            from mixmae_scale.visualize.snapshots import ReconstructionSnapshots

            summary = pretrain(config, sources, run_dir, max_steps=args.max_steps, local_rank=local_rank,
                               snapshot_factory=ReconstructionSnapshots, overwrite=args.overwrite)
            message = pretrain_message(summary)
        else:
            from mixmae_scale.finetune.pretrained import load_encoder

            # Before the fine-tuning stack (timm) is imported: a wrong finetune.init is said within seconds.
            pretrained = load_encoder(config.finetune.init) if config.finetune.init else None
            from mixmae_scale.finetune.train import finetune

            summary = finetune(config, sources, run_dir, max_steps=args.max_steps, local_rank=local_rank,
                               pretrained=pretrained, overwrite=args.overwrite)
            last = summary["last"] or {"top1": float("nan")}
            message = (f"fine-tuned {summary['steps']} steps: top-1 {last['top1']:.2f}% "
                       f"(best {summary['best']['top1']:.2f}% at step {summary['best'].get('step', '-')})")
        if rank == 0:
            print(f"run directory: {run_dir} (config.yaml, metrics.csv, checkpoints/, summary.json)")
            print(message)
        return 0

    return _distributed_job(args, job)


def pretrain_message(summary: dict) -> str:
    """The last line of a pretraining run; a held-out loss that was not measured says why, never a number."""
    start, end, steps = summary["heldout_loss_start"], summary["heldout_loss_end"], summary["steps"]
    if end is None:
        return (f"held-out reconstruction loss: not measured ({summary['heldout_not_measured']}); {steps} "
                f"step{'' if steps == 1 else 's'} trained")
    if start is None:
        return f"held-out reconstruction loss {end:.4f} after {steps} steps (not measured at the start)"
    return f"held-out reconstruction loss {start:.4f} -> {end:.4f} after {steps} steps"


def _pretrain(args: argparse.Namespace) -> int:
    return _train_job(args, "pretrain")


def _finetune(args: argparse.Namespace) -> int:
    return _train_job(args, "finetune")


def _eval(args: argparse.Namespace) -> int:
    def job(rank: int, local_rank: int) -> int:
        from mixmae_scale.engine import distributed
        from mixmae_scale.finetune.evaluate import evaluate_classifier, load_classifier

        model = load_classifier(args.init, args.data, args.split, args.img_size)  # mistakes found before the group
        _, world, device = distributed.init(local_rank)
        result = evaluate_classifier(model, args.init, args.data, args.split, rank, world, device, args.loader,
                                     args.batch, args.threads)
        if rank == 0 and args.json:
            print(json.dumps(result, indent=2))
        elif rank == 0:
            print(f"top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}% on the {result['samples']} images of "
                  f"split '{args.split}' of {args.data} ({args.init})")
        return 0

    return _distributed_job(args, job)


def register(sub: argparse._SubParsersAction) -> None:
    for name, text, handler in (
            ("pretrain", "MixMAE pretraining (start with the deepspeed launcher or torchrun)", _pretrain),
            ("finetune", "fine-tune a pretrained encoder (deepspeed launcher or torchrun)", _finetune)):
        job = sub.add_parser(name, help=text)
        add_profile_args(job)
        job.add_argument("--run-dir", help="default: run.output_dir/run.name")
        job.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (demo, smoke tests)")
        job.add_argument("--overwrite", action="store_true", help="start a new run even if the run folder holds one: "
                         "the earlier run is moved, whole, to RUN.old-N (nothing is deleted)")
        job.set_defaults(handler=handler)
    evaluation = sub.add_parser("eval", help="top-1/top-5 of a fine-tuned classifier on labeled shards")
    evaluation.add_argument("--init", required=True, help="fine-tuned .safetensors, a fine-tune run folder or "
                            "an official fine-tuned .pth")
    evaluation.add_argument("--data", required=True, help="shard folder (from `mixmae shards`) with labels")
    evaluation.add_argument("--split", default="val", help="split of the shard folder to evaluate")
    evaluation.add_argument("--img-size", type=int, help="evaluation resolution (default: the weights' own)")
    evaluation.add_argument("--loader", choices=["dali", "torch"], default="dali",
                            help="data loader (torch: the PyTorch fallback)")
    evaluation.add_argument("--batch", type=int, default=64, help="images per rank and batch (a smaller split is "
                            "evaluated in smaller batches)")
    evaluation.add_argument("--threads", type=int, default=2, help="decoding threads per rank")
    evaluation.add_argument("--json", action="store_true", help="print the result as JSON instead of one line")
    evaluation.set_defaults(handler=_eval)
