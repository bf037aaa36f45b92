"""`mixmae visualize|runs plot|runs show`: reconstructions and training curves as images, a run's record."""

from __future__ import annotations

import argparse
import json
import sys

from mixmae_scale.cli.arguments import at_least
from mixmae_scale.data.errors import plural


def _visualize(args: argparse.Namespace) -> int:
    from mixmae_scale.visualize.reconstruction import visualize

    result = visualize(args.source, args.data, args.out, args.images // 2, args.split, args.seed, args.loader)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"wrote {result['out']}: {2 * result['pairs']} images of split '{args.split}' of {args.data}, each "
              f"masked (seed {args.seed}) and reconstructed by {args.source}")
    return 0


def _runs_plot(args: argparse.Namespace) -> int:
    from mixmae_scale.visualize.curves import plot_runs

    result = plot_runs(args.runs, args.out)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        left_out = f"; left out (no run logged it): {'; '.join(result['left_out'])}" if result["left_out"] else ""
        print(f"wrote {result['out']}: {plural(len(result['runs']), 'run')} against "
              f"{'step' if result['x'] == 'step' else 'images seen'}; panels: {', '.join(result['panels'])}{left_out}")
    return 0


def _runs_show(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mixmae_scale.engine.run_record import RECORD, describe, read_record

    if not Path(args.run).is_dir():
        print(f"mixmae: error: {Path(args.run).resolve()}: no such run folder", file=sys.stderr)
        return 2
    record = read_record(args.run)
    if record is None:
        print(f"mixmae: error: {(Path(args.run) / RECORD).resolve()} not found: the run folder was written before "
              "run records, or is not a run folder", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=2) if args.json else describe(record))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    vis = sub.add_parser("visualize", help="PNG grid of mixed inputs and both streams' reconstructions")
    vis.add_argument("source", help="run folder, encoder+decoder .safetensors or official pretraining .pth")
    vis.add_argument("--data", required=True, help="shard folder")
    vis.add_argument("--images", type=at_least(2), default=8, help="images (pairs x 2)")
    vis.add_argument("--split", default="val", help="split whose first images are shown")
    vis.add_argument("--seed", type=int, default=0, help="seed of the mask")
    vis.add_argument("--loader", choices=["dali", "torch"], default="dali",
                     help="data loader (torch: the PyTorch fallback)")
    vis.add_argument("--out", default="reconstruction.png", help="PNG to write")
    vis.add_argument("--json", action="store_true", help="print the details as JSON instead of one line")
    vis.set_defaults(handler=_visualize)
    runs = sub.add_parser("runs", help="look at run folders")
    runs_sub = runs.add_subparsers(dest="runs_command", metavar="ACTION", required=True)
    plot = runs_sub.add_parser("plot", help="loss, lr, images/s, MFU and (fine-tuning) eval top-1 of runs, against "
                               "steps and images seen (panels no run logged are left out)")
    plot.add_argument("runs", nargs="+", help="run folders (or their metrics.csv)")
    plot.add_argument("--out", default="curves.png", help="PNG to write")
    plot.add_argument("--json", action="store_true", help="print the details as JSON instead of one line")
    plot.set_defaults(handler=_runs_plot)
    show = runs_sub.add_parser("show", help="where a run came from: code commit, versions, devices, data digests, "
                               "command, precision, launches and resumes (its run.json)")
    show.add_argument("run", help="run folder")
    show.add_argument("--json", action="store_true", help="print run.json as it is")
    show.set_defaults(handler=_runs_show)
