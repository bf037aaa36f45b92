"""`mixmae config show`: the merged, validated profile with its derived values."""

from __future__ import annotations

import argparse
import json

from mixmae_scale.cli.arguments import add_profile_args


def _config_show(args: argparse.Namespace) -> int:
    import sys

    import yaml

    from mixmae_scale.config import load_resolved, run_kind
    from mixmae_scale.config.deepspeed_config import build_deepspeed_config
    from mixmae_scale.data.loaders import job_crop_scale

    resolved = load_resolved(args.profile, args.cluster, args.overrides, world_size=args.world_size)
    job = args.job or run_kind(args.profile)
    resolved.config.data.crop_scale = job_crop_scale(resolved.config, job)  # as the run's config.yaml records it
    print(f"job: {job} ({'--job' if args.job else 'what the profile sets up; --job to choose'})", file=sys.stderr)
    data = resolved.to_dict()
    data["deepspeed_config"] = build_deepspeed_config(resolved)
    derived = resolved.derived
    print(f"precision: {derived.dtype} ({derived.dtype_reason})", file=sys.stderr)
    if derived.dtype_warning:
        print(f"warning: {derived.dtype_warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    config = sub.add_parser("config", help="show the resolved configuration of a profile")
    config_sub = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = config_sub.add_parser("show", help="print the merged, validated configuration and derived values")
    add_profile_args(show)
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.add_argument("--job", choices=("pretrain", "finetune", "segment"), default=None,
                      help="the job whose recipe fills what the profile leaves to it (data.crop_scale); by default "
                           "the profile's: segment.* set -> segment, finetune.init set -> finetune, else pretrain")
    show.set_defaults(handler=_config_show)
