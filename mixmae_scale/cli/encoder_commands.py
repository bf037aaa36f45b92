"""`mixmae export|probe`: a run's weights as a file, and a linear probe of them."""

from __future__ import annotations

import argparse
import json


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


def register(sub: argparse._SubParsersAction) -> None:
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
