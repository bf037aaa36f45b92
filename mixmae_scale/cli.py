"""The `mixmae` command. Each subcommand parses its arguments and calls into the library, nothing more.

Heavy imports (torch, DeepSpeed, DALI) happen inside the handlers so that `mixmae --help` and
`mixmae config show` stay fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict


def _add_profile_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", required=True, help="profile name under launch/profiles/ or a YAML path")
    parser.add_argument("--cluster", help="cluster YAML merged after the profile")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key, e.g. --set optim.base_learning_rate=1e-4 (repeatable)")
    parser.add_argument("--world-size", type=int, help="world size for the batch arithmetic "
                        "(default: cluster.num_nodes x cluster.gpus_per_node)")


def _config_show(args: argparse.Namespace) -> int:
    import yaml

    from mixmae_scale.config import load_resolved
    from mixmae_scale.config.deepspeed_config import build_deepspeed_config

    resolved = load_resolved(args.profile, args.cluster, args.overrides, world_size=args.world_size)
    data = resolved.to_dict()
    data["deepspeed_config"] = build_deepspeed_config(resolved)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0


def _model_info(args: argparse.Namespace) -> int:
    from mixmae_scale.config import load_resolved
    from mixmae_scale.models.flops import model_report

    profile = {"tiny": "tiny", "base": "swin_b", "large": "swin_l", "huge": "swin_h"}.get(args.size, "base")
    overrides = [f"model.size={args.size}", *args.overrides]
    if args.img_size:
        overrides.append(f"model.img_size={args.img_size}")
    # Batch arithmetic is irrelevant here: one rank, one accumulation step.
    overrides += ["batch.global_batch=null", "batch.accumulation=1"]
    resolved = load_resolved(profile, overrides=overrides, world_size=1, train_samples=10**9)
    report = model_report(resolved.config.model, num_classes=args.num_classes)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(len(k) for k in report)
        for key, value in report.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _model_convert(args: argparse.Namespace) -> int:
    from mixmae_scale.models.convert_official import convert_official_checkpoint

    summary = convert_official_checkpoint(args.src, args.out)
    print(json.dumps(summary, indent=2))
    return 0


def _shards_convert(args: argparse.Namespace) -> int:
    from mixmae_scale.shards.convert import ConvertOptions, convert, parse_size, summary_lines

    options = ConvertOptions(
        layout=args.shards_command, splits=tuple(s for s in args.split.split(",") if s), seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        shard_bytes=None if args.samples_per_shard else parse_size(args.shard_size),
        quality=args.quality, resize_shorter=args.resize_shorter, strict=args.strict, workers=args.workers)
    manifest = convert(args.src, args.out, options)
    for line in summary_lines(manifest):
        print(line)
    print(f"manifest: {args.out}/dataset.json; rejected files: {args.out}/rejected.jsonl")
    return 0


def _shards_verify(args: argparse.Namespace) -> int:
    from mixmae_scale.shards.verify import verify

    report = verify(args.folder, decode=args.decode)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for split, info in report["splits"].items():
            decoded = f", {info['decoded']} decoded" if info["decoded"] is not None else ""
            print(f"{split}: {info['samples']} samples in {info['shards']} shard(s){decoded}")
        for error in report["errors"]:
            print(f"ERROR {error}")
        print("OK" if report["ok"] else f"{len(report['errors'])} problem(s)")
    return 0 if report["ok"] else 1


def _shards_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mixmae_scale.shards.convert import ConvertOptions, convert, summary_lines
    from mixmae_scale.shards.demo import build_demo_images

    out = Path(args.out)
    images = out / "images"
    counts = build_demo_images(images, args.train_per_class, args.val_per_class, args.seed)
    print(f"demo images: {counts} under {images}")
    options = ConvertOptions(layout="imagenet", splits=("train", "val"), seed=args.seed,
                             samples_per_shard=args.samples_per_shard, shard_bytes=None, workers=args.workers)
    manifest = convert(images, out / "shards", options)
    for line in summary_lines(manifest):
        print(line)
    print(f"demo shards: {out / 'shards'}")
    return 0


def _distributed_job(args: argparse.Namespace, job) -> int:
    """Environment and shutdown shared by the jobs that run under a launcher (or alone)."""
    import logging
    import os
    import socket

    from mixmae_scale.engine import distributed

    if "RANK" not in os.environ:  # started without a launcher: a world of one
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rank = int(os.environ["RANK"])
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")
    try:
        return job(rank, int(os.environ.get("LOCAL_RANK", args.local_rank)))
    finally:
        distributed.shutdown()


def _train_job(args: argparse.Namespace, kind: str) -> int:
    from pathlib import Path

    from mixmae_scale.config import load_config

    def job(rank: int, local_rank: int) -> int:
        config, sources = load_config(args.profile, args.cluster, args.overrides)
        run_dir = Path(args.run_dir or Path(config.run.output_dir) / config.run.name)
        if kind == "pretrain":
            from mixmae_scale.engine.pretrain import pretrain

            summary = pretrain(config, sources, run_dir, max_steps=args.max_steps, local_rank=local_rank)
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


def _export(args: argparse.Namespace) -> int:
    from mixmae_scale.engine.export import export_run

    print(json.dumps(export_run(args.run_dir, args.out, args.tag, args.with_decoder), indent=2))
    return 0


def _probe(args: argparse.Namespace) -> int:
    import dataclasses

    from mixmae_scale.data.manifest import load_split
    from mixmae_scale.finetune.pretrained import load_encoder
    from mixmae_scale.finetune.probe import linear_probe

    state, arch = load_encoder(args.init)
    num_classes = load_split(args.data, "train").num_classes
    results = {}
    for name, weights in (("pretrained", state), ("random_init", None)) if args.baseline else (("pretrained", state),):
        results[name] = dataclasses.asdict(linear_probe(weights, arch, args.data, num_classes, args.loader,
                                                        args.batch, args.threads, args.seed))
        print(f"linear probe, {name:>11}: top-1 {results[name]['top1']:.1f}% on {results[name]['val_samples']} "
              f"validation images ({num_classes} classes)")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def _visualize(args: argparse.Namespace) -> int:
    from mixmae_scale.visualize.reconstruction import visualize

    print(json.dumps(visualize(args.source, args.data, args.out, args.images // 2, args.split, args.seed,
                               args.loader), indent=2))
    return 0


def _runs_plot(args: argparse.Namespace) -> int:
    from mixmae_scale.visualize.curves import plot_runs

    print(json.dumps(plot_runs(args.runs, args.out), indent=2))
    return 0


def _launch(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from mixmae_scale.cluster.compose import batch_report, compose
    from mixmae_scale.config import load_resolved

    resolved = load_resolved(args.profile, args.cluster, args.overrides)
    plan = compose(resolved, args.profile, args.cluster, args.overrides, job=args.job, check_files=not args.dry_run)
    for line in batch_report(resolved):
        print(line)
    if plan.env_file:
        print(f"environment for every rank ({plan.env_file}):\n" + "".join(f"  {line}\n" for line in
                                                                          plan.env_text.splitlines()), end="")
    print("command:\n  " + plan.shell())
    if args.dry_run:
        return 0
    if plan.env_file:
        from mixmae_scale.atomic_file import write_text

        write_text(plan.env_file, plan.env_text)
    return subprocess.call(plan.command, env=os.environ.copy())


def _plan(args: argparse.Namespace) -> int:
    from mixmae_scale.cluster.plan import plan
    from mixmae_scale.config import load_resolved

    overrides = [*args.overrides, "batch.global_batch=null", "batch.accumulation=1"]
    resolved = load_resolved(args.profile, args.cluster, overrides, world_size=args.gpus)
    gpu_mem_gib = args.gpu_mem_gb * 1e9 / 2**30
    result = plan(resolved, args.profile, args.gpus, gpu_mem_gib)
    if args.json:
        report = result.to_dict()
        if args.recommend:
            from mixmae_scale.cluster.plan import options

            found, chosen = options(args.profile, args.gpus, gpu_mem_gib, args.cluster, args.overrides, args.headroom)
            report["options"] = [asdict(o) for o in found]
            report["recommended"] = asdict(chosen) if chosen else None
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.profile}: {result.params / 1e6:.1f}M parameters, ZeRO-{result.zero_stage}, {result.dtype}, "
          f"checkpointing {'on' if result.checkpointing else 'off'}, {args.gpus} GPU(s) of {args.gpu_mem_gb:g} GB")
    for name, gib in result.components_gib.items():
        print(f"  {name:<26}{gib:8.2f} GiB")
    print("  (activations + gathered weights, and the optimizer step's transient, do not coexist; the peak "
          "takes the larger)")
    print(f"  {'peak':<26}{result.total_gib:8.2f} GiB during the {result.peak_phase}, "
          f"micro-batch {result.micro_batch}: "
          f"{'fits' if result.fits else 'does NOT fit'}; largest micro-batch that fits: {result.max_micro_batch}")
    if args.recommend:
        _print_options(args, gpu_mem_gib)
    return 0


def _print_options(args: argparse.Namespace, gpu_mem_gib: float) -> None:
    from mixmae_scale.cluster.plan import options

    found, chosen = options(args.profile, args.gpus, gpu_mem_gib, args.cluster, args.overrides, args.headroom)
    print(f"\nchoices for the profile's global batch, micro-batches fitting {1 - args.headroom:.0%} of the GPU "
          "(cheapest first):")
    print(f"  {'ZeRO':>4}  {'checkpointing':<14}{'micro':>6}{'accum':>6}{'peak GiB':>10}")
    for o in found:
        mark = "  <- use" if o is chosen else ""
        fits = f"{o.micro_batch:>6}{o.accumulation:>6}{o.peak_gib:>10.2f}" if o.micro_batch else f"{'does not fit':>22}"
        print(f"  {o.zero_stage:>4}  {'on' if o.checkpointing else 'off':<14}{fits}{mark}")
    if chosen is not None:
        print("set: " + " ".join(f"--set {s}" for s in chosen.overrides()))


def _scaling(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mixmae_scale.scaling.spec import expand, load_spec

    out = Path(args.out)
    if args.scaling_command == "plan":
        from mixmae_scale.data.manifest import load_split

        spec = load_spec(args.spec)
        runs = expand(spec, load_split(spec.shards, "train").samples)
        print(f"{'run':<28}{'N':>12}{'D (images)':>12}{'C (FLOPs)':>12}")
        for run in runs:
            print(f"{run.run_id:<28}{run.params:>12,}{run.images_seen:>12,}{run.flops:>12.3g}")
        print(f"{len(runs)} runs, {sum(r.flops for r in runs):.3g} training FLOPs in total")
        return 0
    if args.scaling_command == "run":
        from mixmae_scale.scaling.run import run_sweep

        run_sweep(load_spec(args.spec), out, Path(args.emit_commands) if args.emit_commands else None)
        return 0
    from mixmae_scale.scaling.report import fit_results, read_results, write_report

    rows = read_results(out / "results.jsonl")
    fit = fit_results(rows, bootstrap=args.bootstrap)
    (out / "fit.json").write_text(json.dumps(fit, indent=2))
    if args.scaling_command == "report":
        print(f"report: {write_report(rows, fit, Path(args.report_dir or out / 'report'))}")
    else:
        print(json.dumps(fit, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixmae", description="MixMAE pretraining at cluster scale.")
    # The deepspeed launcher puts --local_rank before the subcommand; LOCAL_RANK in the environment wins.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    config = sub.add_parser("config", help="show the resolved configuration of a profile")
    config_sub = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = config_sub.add_parser("show", help="print the merged, validated configuration and derived values")
    _add_profile_args(show)
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.set_defaults(handler=_config_show)

    model = sub.add_parser("model", help="model sizes, parameter and FLOP counts, official checkpoints")
    model_sub = model.add_subparsers(dest="action", metavar="ACTION", required=True)
    info = model_sub.add_parser("info", help="parameter counts and analytic GFLOPs of a size")
    info.add_argument("--size", default="base", choices=["tiny", "base", "large", "huge", "custom"])
    info.add_argument("--img-size", type=int)
    info.add_argument("--num-classes", type=int, default=1000, help="classifier head for the count")
    info.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="model.* overrides for free shapes, e.g. --set model.embed_dim=96")
    info.add_argument("--json", action="store_true")
    info.set_defaults(handler=_model_info)
    convert = model_sub.add_parser("convert-official",
                                   help="convert an official MixMIM checkpoint to safetensors")
    convert.add_argument("src", help="official .pth (pretraining or fine-tuned)")
    convert.add_argument("out", help="output .safetensors")
    convert.set_defaults(handler=_model_convert)

    for name, text, handler in (
            ("pretrain", "MixMAE pretraining (start with the deepspeed launcher or torchrun)", _pretrain),
            ("finetune", "fine-tune a pretrained encoder (deepspeed launcher or torchrun)", _finetune)):
        job = sub.add_parser(name, help=text)
        _add_profile_args(job)
        job.add_argument("--run-dir", help="default: run.output_dir/run.name")
        job.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (demo, smoke tests)")
        job.set_defaults(handler=handler)

    launch = sub.add_parser("launch", help="compose and run the deepspeed launcher command for a profile")
    launch.add_argument("profile")
    launch.add_argument("--cluster", help="cluster YAML (hostfile, nodes, GPUs, launcher, env)")
    launch.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    launch.add_argument("--job", choices=["pretrain", "finetune"], default="pretrain")
    launch.add_argument("--dry-run", action="store_true", help="print the command and the batch arithmetic only")
    launch.set_defaults(handler=_launch)

    planner = sub.add_parser("plan", help="per-GPU memory of a profile by component; largest micro-batch")
    planner.add_argument("profile")
    planner.add_argument("--gpus", type=int, required=True, help="world size (ZeRO partitions over it)")
    planner.add_argument("--gpu-mem-gb", type=float, default=80.0)
    planner.add_argument("--cluster")
    planner.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    planner.add_argument("--json", action="store_true")
    planner.add_argument("--recommend", action="store_true",
                         help="also rank ZeRO stage x checkpointing with the micro-batch and accumulation each allows")
    planner.add_argument("--headroom", type=float, default=0.25, help="fraction of GPU memory kept free (--recommend)")
    planner.set_defaults(handler=_plan)

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

    export = sub.add_parser("export", help="a run's encoder (or encoder+decoder) as one safetensors file")
    export.add_argument("run_dir")
    export.add_argument("--out", required=True)
    export.add_argument("--tag", help="checkpoint tag (default: the latest complete one)")
    export.add_argument("--with-decoder", action="store_true", help="keep the decoder (for visualisation)")
    export.set_defaults(handler=_export)

    probe = sub.add_parser("probe", help="linear probe of an encoder on labeled shards (top-1)")
    probe.add_argument("--init", required=True, help="exported .safetensors, a run folder or an official .pth")
    probe.add_argument("--data", required=True, help="shard folder with train and val splits")
    probe.add_argument("--baseline", action="store_true", help="also probe a randomly initialised encoder")
    probe.add_argument("--loader", choices=["dali", "torch"], default="dali")
    probe.add_argument("--batch", type=int, default=64)
    probe.add_argument("--threads", type=int, default=2)
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--json", action="store_true")
    probe.set_defaults(handler=_probe)

    vis = sub.add_parser("visualize", help="PNG grid of mixed inputs and both streams' reconstructions")
    vis.add_argument("source", help="run folder, encoder+decoder .safetensors or official pretraining .pth")
    vis.add_argument("--data", required=True, help="shard folder")
    vis.add_argument("--images", type=int, default=8, help="images (pairs x 2)")
    vis.add_argument("--split", default="val")
    vis.add_argument("--seed", type=int, default=0, help="seed of the mask")
    vis.add_argument("--loader", choices=["dali", "torch"], default="dali")
    vis.add_argument("--out", default="reconstruction.png")
    vis.set_defaults(handler=_visualize)

    scaling = sub.add_parser("scaling", help="scaling-law sweeps: plan, run, fit, report")
    scaling_sub = scaling.add_subparsers(dest="scaling_command", metavar="ACTION", required=True)
    for action, text in (("plan", "expand a sweep spec into runs with N, D and C"),
                         ("run", "run the sweep here, one run after another (finished runs are skipped)"),
                         ("fit", "fit L(C) and L(N, D) to results.jsonl"),
                         ("report", "fit, then write figures and a Markdown report")):
        p = scaling_sub.add_parser(action, help=text)
        if action in ("plan", "run"):
            p.add_argument("spec", help="sweep spec YAML")
        p.add_argument("--out", default="runs/scaling", help="sweep folder (results.jsonl, runs/, report/)")
        if action == "run":
            p.add_argument("--emit-commands", help="write one `mixmae launch` line per run instead of running")
        if action in ("fit", "report"):
            p.add_argument("--bootstrap", type=int, default=200)
        if action == "report":
            p.add_argument("--report-dir")
        p.set_defaults(handler=_scaling)

    runs = sub.add_parser("runs", help="look at run folders")
    runs_sub = runs.add_subparsers(dest="runs_command", metavar="ACTION", required=True)
    plot = runs_sub.add_parser("plot", help="loss, lr, images/s and MFU of runs, against steps and images seen")
    plot.add_argument("runs", nargs="+")
    plot.add_argument("--out", default="curves.png")
    plot.set_defaults(handler=_runs_plot)

    shards = sub.add_parser("shards", help="image folders to WebDataset tar shards; verify; demo data")
    shards_sub = shards.add_subparsers(dest="shards_command", metavar="ACTION", required=True)
    for layout, text in (("imagenet", "an ILSVRC2012 tree (train/<wnid>/, val/ by folder or flat + labels)"),
                         ("folder", "class-per-subfolder images, or a flat folder of unlabeled images")):
        p = shards_sub.add_parser(layout, help=f"convert {text}")
        p.add_argument("--src", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--split", default="train,val" if layout == "imagenet" else "train",
                       help="comma-separated splits (for 'folder', 'train' is the source folder itself)")
        p.add_argument("--shard-size", default="1GB", help="target shard size (by the source files' sizes)")
        p.add_argument("--samples-per-shard", type=int, help="fixed sample count per shard instead")
        p.add_argument("--workers", type=int, default=1)
        p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
        p.add_argument("--resize-shorter", type=int, help="re-encode every image with this shorter side")
        p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
        p.add_argument("--strict", action="store_true", help="stop at the first file that cannot be used")
        p.set_defaults(handler=_shards_convert)
    verify = shards_sub.add_parser("verify", help="check a shard folder against its manifest")
    verify.add_argument("folder")
    verify.add_argument("--decode", action="store_true", help="decode every image too")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(handler=_shards_verify)
    demo = shards_sub.add_parser("demo", help="build the built-in demo dataset and its shards")
    demo.add_argument("--out", default="demo_data")
    demo.add_argument("--train-per-class", type=int, default=260)
    demo.add_argument("--val-per-class", type=int, default=50)
    demo.add_argument("--samples-per-shard", type=int, default=256)
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_shards_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mixmae_scale.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"mixmae: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
