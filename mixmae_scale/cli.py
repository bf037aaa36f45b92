"""The `mixmae` command. Each subcommand parses its arguments and calls into the library, nothing more.

Heavy imports (torch, DeepSpeed, DALI) happen inside the handlers so that `mixmae --help` and
`mixmae config show` stay fast.
"""

from __future__ import annotations

import argparse
import json
import sys


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixmae", description="MixMAE pretraining at cluster scale.")
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
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"mixmae: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
