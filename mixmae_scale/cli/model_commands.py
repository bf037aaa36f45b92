"""`mixmae model info|convert-official`: sizes, counts, official checkpoints."""

from __future__ import annotations

import argparse
import json
import sys

from mixmae_scale.cli.arguments import add_set_arg, at_least


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
    if summary["replaced"]:  # beside the JSON, which stays one document on stdout
        print(f"{args.out}: replaced {summary['replaced']}", file=sys.stderr)
    print(json.dumps(summary, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="model sizes, parameter and FLOP counts, official checkpoints")
    model_sub = model.add_subparsers(dest="action", metavar="ACTION", required=True)
    info = model_sub.add_parser("info", help="parameter counts and analytic GFLOPs of a size")
    info.add_argument("--size", default="base", choices=["tiny", "base", "large", "huge", "custom"],
                      help="model size (custom: set model.* with --set)")
    info.add_argument("--img-size", type=at_least(1), help="input resolution (default: the size's own)")
    info.add_argument("--num-classes", type=at_least(1), default=1000, help="classifier head for the count")
    add_set_arg(info)
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(handler=_model_info)
    convert = model_sub.add_parser("convert-official",
                                   help="convert an official MixMIM checkpoint to safetensors")
    convert.add_argument("src", help="official .pth (pretraining or fine-tuned)")
    convert.add_argument("out", help="output .safetensors")
    convert.set_defaults(handler=_model_convert)
