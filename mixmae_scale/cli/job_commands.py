"""`mixmae pretrain|finetune|segment|eval`: the commands that run under a launcher, one process per rank. The process
around the work (environment, /dev/shm, shutdown, exit codes) is engine/runtime.py's; here are the arguments
and what the user reads."""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING

from mixmae_scale.cli.arguments import add_profile_args, at_least
from mixmae_scale.data.errors import plural

if TYPE_CHECKING:
    from mixmae_scale.config.schema import Config


def _as_rank_process(args: argparse.Namespace, work) -> int:
    """`work(rank, local_rank) -> exit code` as this process's rank (engine/runtime.py)."""
    from mixmae_scale.cli.failure_report import is_refused_input
    from mixmae_scale.cluster.slurm_ranks import ranks_from_slurm
    from mixmae_scale.engine.runtime import run_rank

    return run_rank(work, _report_failure, args.local_rank, launcher_ranks=ranks_from_slurm(os.environ),
                    is_mistake=is_refused_input)


def _report_failure(rank: int, exc: BaseException, alone: bool) -> None:
    """What the user reads when a rank's work ends by an exception: a finished run and a non-finite stop are
    said once by rank 0 (every rank knows them), anything else by the first failing rank (cli/failure_report.py)."""
    from mixmae_scale.cli.failure_report import deliver, report_failure
    from mixmae_scale.engine.faults import NonFiniteStop
    from mixmae_scale.engine.loop import RunAlreadyComplete

    if isinstance(exc, RunAlreadyComplete):
        if rank == 0:
            print(f"mixmae: {exc}")
    elif isinstance(exc, NonFiniteStop):
        if rank == 0:
            deliver(f"mixmae: error: {exc}\n", alone)
    else:
        report_failure(rank, exc, alone)


def _train(args: argparse.Namespace, kind: str) -> int:
    from pathlib import Path

    from mixmae_scale.config import load_config

    overrides = list(args.overrides) + ([f"segment.init={args.init}"] if getattr(args, "init", None) else [])

    def train_rank(rank: int, local_rank: int) -> int:
        config, sources = load_config(args.profile, args.cluster, overrides)
        run_dir = Path(args.run_dir or Path(config.run.output_dir) / config.run.name)
        if kind == "segment":
            from mixmae_scale.segment.job import segment

            summary = segment(config, sources, run_dir, max_steps=args.max_steps, local_rank=local_rank,
                              overwrite=args.overwrite)
            message = segment_message(summary)
        elif kind == "pretrain":
            from mixmae_scale.pretrain.job import pretrain
            from mixmae_scale.visualize.snapshots import ReconstructionSnapshots

            summary = pretrain(config, sources, run_dir, max_steps=args.max_steps, local_rank=local_rank,
                               snapshot_factory=ReconstructionSnapshots, overwrite=args.overwrite)
            message = pretrain_message(summary)
        else:
            from mixmae_scale.engine.run_folder import resumes
            from mixmae_scale.finetune.pretrained import finetune_start

            refuse_a_pretraining_profile(args.profile, config)
            # Before the fine-tuning stack (timm) is imported: a wrong or missing finetune.init is said within seconds
            # (not read at all by a run that resumes from its own checkpoint).
            pretrained = finetune_start(config.finetune.init, resumes(run_dir, config.checkpoint.resume,
                                                                      args.overwrite))
            from mixmae_scale.finetune.job import finetune

            summary = finetune(config, sources, run_dir, max_steps=args.max_steps, local_rank=local_rank,
                               pretrained=pretrained, overwrite=args.overwrite)
            message = finetune_message(summary)
        if rank == 0:
            print(f"run directory: {run_dir} (config.yaml, metrics.csv, checkpoints/, summary.json)")
            print(message)
        return 0

    return _as_rank_process(args, train_rank)


def refuse_a_pretraining_profile(profile: str, config: Config) -> None:
    """`mixmae finetune --profile swin_h --set finetune.init=...` ran, silently, with the pretraining profile's
    recipe (600 epochs, betas 0.95, no drop path): a fine-tuning profile is one whose own file names
    the encoder (`finetune.init`, `random` included), as finetune_b, finetune_l and finetune_tiny do; --set cannot
    make a pretraining profile one."""
    from mixmae_scale.config import ConfigError, load_config

    if load_config(profile)[0].finetune.init:
        return
    c = config
    raise ConfigError(f"--profile {profile} is not a fine-tuning profile (its file sets no finetune.init): "
                      f"fine-tuning with it would run its pretraining recipe (schedule.epochs={c.schedule.epochs:g}, "
                      f"optim.betas={list(c.optim.betas)}, model.drop_path={c.model.drop_path}, "
                      f"finetune.layer_decay={c.finetune.layer_decay}); use --profile finetune_b or finetune_l "
                      "(for H: --profile finetune_l --set model.size=huge finetune.init=RUN_FOLDER, L's recipe), "
                      "or a YAML of your own that sets finetune.init")


def finetune_message(summary: dict) -> str:
    """The last line of a fine-tuning run: the last evaluation's top-1 and the best one's."""
    last = summary["last"]
    if last is None:
        return not_evaluated_message("fine-tuned", summary, "top1", "top-1")
    # A bf16 run's top-1 is not `mixmae eval`'s fp32 one (docs/training.md): say which it is.
    precision = f" in {last['precision']}" if "precision" in last else ""
    done, at, again = unfinished(summary, last)
    return (f"fine-tuned {done}: top-1 {last['top1']:.2f}%{precision}{at}{over_images(last)} "
            f"(best {summary['best']['top1']:.2f}% at step {summary['best'].get('step', '-')}{again})")


def unfinished(summary: dict, last: dict) -> tuple[str, str, str]:
    """How far a run that evaluated got, which step its last evaluation is of, and what goes on from it. A run stopped
    by a signal after an evaluation ended `fine-tuned 500 steps: top-1 61.20%`, read as the finished run's result and
    as step 500's while it was step 486's: ("500 of 810 steps, stopped by a signal", " at step 486", "; the same
    command continues it"); a finished run gives ("810 steps", "", "")."""
    step = last.get("step")
    at = f" at step {step}" if step is not None and step != summary["steps"] else ""
    count, why, again = progress(summary)
    return count + why, at, f"; {again}" if again else ""


def progress(summary: dict) -> tuple[str, str, str]:
    """(steps done of how many, why it ended there, what continues it), the last two empty for a finished run. A
    --max-steps launch plans no more than its --max-steps (`planned_steps`), and ended `fine-tuned 2 steps: top-1
    ...` as if the run were done while 322 of the schedule's steps were left: the schedule's count
    (`schedule_steps`) says so."""
    steps, planned, schedule = summary["steps"], summary.get("planned_steps"), summary.get("schedule_steps")
    if planned and steps < planned:
        if summary.get("stopped_by_signal"):
            return f"{steps} of {plural(planned, 'step')}", ", stopped by a signal", "the same command continues it"
        return f"{steps} of {plural(planned, 'step')}", ", stopped", "a rerun continues it"
    if planned and schedule and steps < schedule:
        return (f"{steps} of {plural(schedule, 'step')}", f" (--max-steps {planned})",
                "the same command with a larger --max-steps, or none, continues it")
    return plural(steps, "step"), "", ""


def not_evaluated_message(done: str, summary: dict, metric: str, name: str) -> str:
    """The last line of a fine-tuning or segmentation run that stopped (a signal, `--max-steps`) before evaluating
    in this launch: it read `top-1 nan% (best -1.00% at step -)`. The best of an earlier launch is said if any."""
    count, why, again = progress(summary)
    if not why:  # at its planned end unevaluated: a summary that names no schedule (written before schedule_steps)
        why, again = ", stopped", "a rerun continues it"
    best = summary.get("best")
    if best is None or best.get(metric, -1.0) < 0:  # -1: the job's "no evaluation yet"
        return f"{done} {count}{why} before its first evaluation: no {name} yet ({again})"
    return (f"{done} {count}{why} before its next evaluation (best {best[metric]:.2f}% at step "
            f"{best.get('step', '-')}; {again})")


def over_images(evaluation: dict) -> str:
    """How many validation images a top-1 is over, and, below the probe's floor of a result (finetune/probe.py), how
    wide it is: a folder's one held-out image gave `top-1 100.00%`, which read as a result."""
    n = evaluation.get("samples")
    if not n:
        return ""
    return f" on {n} validation image{'s' * (n != 1)}{too_few(n)}"


def too_few(images: int) -> str:
    """What a top-1 over `images` images is worth when they are below the probe's floor of a result
    (finetune/probe.py's MIN_PROBE_IMAGES): the fine-tuning's last line and `mixmae eval`'s say it alike."""
    from mixmae_scale.finetune.probe import MIN_PROBE_IMAGES

    if not images or images >= MIN_PROBE_IMAGES:
        return ""
    return f", too few to read: its 95% interval is about +-{98 / images ** 0.5:.0f} points"


def segment_message(summary: dict) -> str:
    """The last line of a segmentation run: the last evaluation's mIoU and the best one's."""
    last = summary["last"]
    if last is None:
        return not_evaluated_message("segmentation fine-tuned", summary, "miou", "mIoU")
    precision = f" in {last['precision']}" if "precision" in last else ""
    done, at, again = unfinished(summary, last)
    return (f"segmentation fine-tuned {done}: mIoU {last['miou']:.2f}%{precision}{at} "
            f"(best {summary['best']['miou']:.2f}% at step {summary['best'].get('step', '-')}{again})")


def pretrain_message(summary: dict) -> str:
    """The last line of a pretraining run; a held-out loss that was not measured says why, never a number. A run
    that ended before its schedule (--max-steps, a signal) says how far it got and what continues it (`progress`,
    as fine-tuning's line): `after 3 steps` read as the finished run's loss."""
    start, end = summary["heldout_loss_start"], summary["heldout_loss_end"]
    count, why, again = progress(summary)
    done, more = count + why, f"; {again}" if again else ""
    if end is None:
        return f"held-out reconstruction loss: not measured ({summary['heldout_not_measured']}); {done} trained{more}"
    if start is None:
        return f"held-out reconstruction loss {end:.4f} after {done} (not measured at the start){more}"
    return f"held-out reconstruction loss {start:.4f} -> {end:.4f} after {done}{more}"


def _pretrain(args: argparse.Namespace) -> int:
    return _train(args, "pretrain")


def _finetune(args: argparse.Namespace) -> int:
    return _train(args, "finetune")


def _segment(args: argparse.Namespace) -> int:
    return _train(args, "segment")


def _eval(args: argparse.Namespace) -> int:
    from mixmae_scale.segment.build import is_segmenter_file

    if is_segmenter_file(args.init):
        return _eval_segmenter(args)

    def evaluate_rank(rank: int, local_rank: int) -> int:
        from mixmae_scale.engine import distributed
        from mixmae_scale.finetune.evaluate import evaluate_classifier, evaluation_precision, load_classifier

        model = load_classifier(args.init, args.data, args.split, args.img_size)  # mistakes found before the group
        _, world, device = distributed.init(local_rank)
        result = evaluate_classifier(model, args.init, args.data, args.split, rank, world, device, args.loader,
                                     args.batch, args.threads, evaluation_precision(args.precision, device))
        if rank == 0 and args.json:
            print(json.dumps(result, indent=2))
        elif rank == 0:
            print(eval_line(result, args.split, args.data, args.init))
        return 0

    return _as_rank_process(args, evaluate_rank)


def eval_line(result: dict, split: str, data: str, init: str) -> str:
    """What `mixmae eval` of a classifier says. For a run folder, which checkpoint it scored: its newest, not its best,
    where the line named the folder alone and read as the run's result or its best."""
    from pathlib import Path

    from mixmae_scale.engine.export import step_of
    from mixmae_scale.finetune.evaluate import top5_text

    weights = init
    checkpoint = Path(result["checkpoint"]) if result.get("checkpoint") else None
    if checkpoint is not None:
        step = step_of(checkpoint.name)
        named = f"step {step}" if step is not None else checkpoint.name
        run, hint = checkpoint.parent.parent, ""
        if Path(init).resolve() == checkpoint.resolve():  # one checkpoint named: as named
            which = f"checkpoint {named}"
        elif checkpoint.parent.name == "best":
            which = f"its best checkpoint, {named}"
        else:
            which = f"its newest checkpoint, {named}"
            hint = f"; its best: `mixmae export {run} --best`" if (run / "best").is_dir() else ""
        weights = f"{init}: {which}{hint}"
    images = plural(result["samples"], "image")
    return (f"top-1 {result['top1']:.2f}%, top-5 {top5_text(result, '%')} ({result['precision']}) on the {images} of "
            f"split '{split}' of {data} ({weights}){too_few(result['samples'])}")


def _eval_segmenter(args: argparse.Namespace) -> int:
    def evaluate_rank(rank: int, local_rank: int) -> int:
        from mixmae_scale.engine import distributed
        from mixmae_scale.finetune.evaluate import evaluation_precision, require_folder
        from mixmae_scale.segment.build import load_segmenter
        from mixmae_scale.segment.evaluate import evaluate_segmenter, evaluation_size, segmentation_line

        require_folder(args.data, "--data")
        model, settings = load_segmenter(args.init)  # mistakes found before the group
        settings = {**settings, "crop_size": evaluation_size(settings, args.img_size, model.backbone.strides[-1])}
        _, world, device = distributed.init(local_rank)
        result = evaluate_segmenter(model, settings, args.init, args.data, args.split, rank, world, device,
                                    args.loader, args.batch, args.threads, evaluation_precision(args.precision, device))
        if rank == 0:
            print(json.dumps(result, indent=2) if args.json else segmentation_line(result))
        return 0

    return _as_rank_process(args, evaluate_rank)


def register(sub: argparse._SubParsersAction) -> None:
    for name, text, handler in (
            ("pretrain", "MixMAE pretraining (start with the deepspeed launcher or torchrun)", _pretrain),
            ("finetune", "fine-tune a pretrained encoder (deepspeed launcher or torchrun)", _finetune),
            ("segment", "semantic segmentation: an encoder under a UperNet head on image and mask shards (deepspeed "
                        "launcher or torchrun)", _segment)):
        command = sub.add_parser(name, help=text)
        add_profile_args(command, world_size=False)  # the launcher's world size is the run's
        command.add_argument("--run-dir", help="default: run.output_dir/run.name")
        command.add_argument("--max-steps", type=at_least(1),
                             help="stop after this many optimizer steps (demo, smoke tests)")
        command.add_argument("--overwrite", action="store_true", help="start a new run even if the run folder holds "
                             "one: the earlier run is moved, whole, to RUN.old-N (nothing is deleted)")
        if name == "segment":
            command.add_argument("--init", help="the encoder to start from: a pretraining run folder, an exported "
                                 ".safetensors, an official MixMIM .pth, or 'random' (sets segment.init)")
        command.set_defaults(handler=handler)
    evaluation = sub.add_parser("eval", help="top-1/top-5 of a fine-tuned classifier on labeled shards, or the mIoU "
                                "of a segmentation model on shards with masks")
    evaluation.add_argument("--init", required=True, help="fine-tuned .safetensors, a fine-tune run folder or "
                            "an official fine-tuned .pth; or a segmentation export (RUN/segmenter.safetensors)")
    evaluation.add_argument("--data", required=True, help="shard folder (from `mixmae shards`) with labels (or "
                            "masks, for a segmentation model)")
    evaluation.add_argument("--split", default="val", help="split of the shard folder to evaluate")
    evaluation.add_argument("--img-size", type=at_least(1), help="evaluation resolution (default: the weights' own; "
                            "a segmentation model's: the crop size it was trained at)")
    evaluation.add_argument("--loader", choices=["dali", "torch"], default="dali",
                            help="data loader (torch: the PyTorch fallback)")
    evaluation.add_argument("--batch", type=at_least(1), default=64,
                            help="images per rank and batch (a smaller split is evaluated in smaller batches)")
    evaluation.add_argument("--threads", type=at_least(1), default=2, help="decoding threads per rank")
    evaluation.add_argument("--precision", choices=["fp32", "bf16", "fp16", "auto"], default="fp32",
                            help="what to compute in (default fp32, the same on any machine; a run's own evaluations "
                            "use its precision.dtype: auto makes the run's choice here, bf16 where native)")
    evaluation.add_argument("--json", action="store_true", help="print the result as JSON instead of one line")
    evaluation.set_defaults(handler=_eval)
