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
    import socket

    from mixmae_scale.cluster.slurm_ranks import ranks_from_slurm
    from mixmae_scale.engine import distributed

    slurm = ranks_from_slurm(os.environ)
    if slurm:  # one srun task per GPU (launch/slurm/pretrain_srun.sbatch): Slurm is the launcher
        os.environ.update(slurm)
    if "RANK" not in os.environ:  # started without a launcher: a world of one
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rank = int(os.environ["RANK"])
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")
    from mixmae_scale.engine.loop import NonFiniteLossError, RunAlreadyComplete

    if int(os.environ.get("LOCAL_RANK", args.local_rank)) == 0:
        removed = distributed.remove_stale_shm_buffers()
        if removed:
            logging.getLogger("mixmae").warning("removed %d DeepSpeed shared-memory buffer(s) a killed run left in "
                                                "/dev/shm: %s", len(removed), ", ".join(removed))

    try:
        code = job(rank, int(os.environ.get("LOCAL_RANK", args.local_rank)))
    except RunAlreadyComplete as exc:  # every rank knows it from the broadcast resume plan; nothing was written
        if rank == 0:
            print(f"mixmae: {exc}")
        distributed.shutdown(os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""))
        return 0
    except NonFiniteLossError as exc:  # every rank stops here together, after a collective checkpoint
        if rank == 0:
            print(f"mixmae: error: {exc}", file=sys.stderr)
        distributed.shutdown(os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""))
        return 3
    except Exception as exc:  # noqa: BLE001 - every failure ends this rank now, reported once
        _report_failure(rank, exc)
        distributed.remove_shm_buffer(os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank)
        # No orderly shutdown: its barrier would wait for ranks that are themselves waiting for this one. Exiting
        # at once makes the launcher stop the others (they see a closed connection, reported in one line).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    distributed.shutdown(os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""))
    return code


def _report_failure(rank: int, exc: Exception) -> None:
    """The failing rank's traceback, once; a rank that fails only because a peer died says so in one line;
    an out-of-memory error gets the ways out."""
    import traceback

    from mixmae_scale.config import ConfigError
    from mixmae_scale.data.manifest import DataError
    from mixmae_scale.engine.checkpoint import ResumeError

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, ConfigError | DataError | ResumeError | FileNotFoundError):  # the message says what to do
        print(f"mixmae: error (rank {rank}): {text}", file=sys.stderr)
        return
    if _peer_failure(exc):
        print(f"mixmae: rank {rank} stopped: another rank failed ({type(exc).__name__}: {text}); its traceback "
              "is above", file=sys.stderr)
        return
    print(f"mixmae: rank {rank} failed:", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)
    if "out of memory" in str(exc).lower():
        print("mixmae: out of memory. Size the run with `mixmae plan PROFILE --gpus N --recommend`; lower "
              "batch.micro (the global batch is kept by accumulation), turn on activation checkpointing "
              "(model.checkpoint_every=1) or shard more (zero.stage=3)", file=sys.stderr)


def _peer_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    kinds = tuple(k for k in (getattr(dist, "DistBackendError", None), getattr(dist, "DistNetworkError", None)) if k)
    text = str(exc)
    return isinstance(exc, kinds) or any(s in text for s in ("Connection closed by peer", "Connection reset by peer",
                                                             "NCCL communicator was aborted", "Broken pipe"))


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
                               snapshot_factory=ReconstructionSnapshots)
            message = (f"held-out reconstruction loss {summary['heldout_loss_start']:.4f} -> "
                       f"{summary['heldout_loss_end']:.4f} after {summary['steps']} steps")
        else:
            from mixmae_scale.finetune.train import finetune

            summary = finetune(config, sources, run_dir, max_steps=args.max_steps, local_rank=local_rank)
            last = summary["last"] or {"top1": float("nan")}
            message = (f"fine-tuned {summary['steps']} steps: top-1 {last['top1']:.2f}% "
                       f"(best {summary['best']['top1']:.2f}% at step {summary['best'].get('step', '-')})")
        if rank == 0:
            print(f"run directory: {run_dir} (config.yaml, metrics.csv, checkpoints/, summary.json)")
            print(message)
        return 0

    return _distributed_job(args, job)


def _pretrain(args: argparse.Namespace) -> int:
    return _train_job(args, "pretrain")


def _finetune(args: argparse.Namespace) -> int:
    return _train_job(args, "finetune")


def _eval(args: argparse.Namespace) -> int:
    def job(rank: int, local_rank: int) -> int:
        from mixmae_scale.engine import distributed
        from mixmae_scale.finetune.evaluate import evaluate_weights

        _, world, device = distributed.init(local_rank)
        result = evaluate_weights(args.init, args.data, args.split, rank, world, device, args.loader, args.batch,
                                  args.threads, args.img_size)
        if rank == 0:
            print(json.dumps(result, indent=2))
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
        job.set_defaults(handler=handler)
    evaluation = sub.add_parser("eval", help="top-1/top-5 of a fine-tuned classifier on labeled shards")
    evaluation.add_argument("--init", required=True, help="fine-tuned .safetensors, a fine-tune run folder or "
                            "an official fine-tuned .pth")
    evaluation.add_argument("--data", required=True)
    evaluation.add_argument("--split", default="val")
    evaluation.add_argument("--img-size", type=int, help="default: the weights' own")
    evaluation.add_argument("--loader", choices=["dali", "torch"], default="dali")
    evaluation.add_argument("--batch", type=int, default=64)
    evaluation.add_argument("--threads", type=int, default=2)
    evaluation.set_defaults(handler=_eval)
