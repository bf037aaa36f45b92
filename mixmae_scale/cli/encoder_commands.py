"""`mixmae export|probe`: a run's weights as a file, and probes (linear, k-NN) of them."""

from __future__ import annotations

import argparse
import json


def _export(args: argparse.Namespace) -> int:
    from mixmae_scale.engine.export import export_line, export_run

    result = export_run(args.run_dir, args.out, args.tag, args.with_decoder, best=args.best, fmt=args.format)
    print(export_line(result))
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def _probe(args: argparse.Namespace) -> int:
    import dataclasses

    from mixmae_scale.data.manifest import load_split
    from mixmae_scale.finetune.evaluate import require_folder
    from mixmae_scale.finetune.pretrained import load_encoder
    from mixmae_scale.finetune.probe import compare_with_random_init, linear_probe

    require_folder(args.data, "--data")
    state, arch = load_encoder(args.init, "--init")
    num_classes = load_split(args.data, "train").num_classes
    if not args.baseline:
        result = dataclasses.asdict(linear_probe(state, arch, args.data, num_classes, args.loader, args.batch,
                                                 args.threads, args.seed))
        if result["not_meaningful"]:
            print(f"probe of {args.init}: not meaningful ({result['not_meaningful']}); no top-1 reported"
                  f"{' (--json shows the numbers)' if not args.json else ''}")
        else:
            print(f"probe of {args.init}: linear top-1 {result['top1']:.1f}%, k-NN top-1 {result['knn_top1']:.1f}% on "
                  f"{result['val_samples']} validation images ({num_classes} classes)")
        if args.json:
            print(json.dumps({"pretrained": result}, indent=2))
        return 0
    report = compare_with_random_init(state, arch, args.data, num_classes, args.baseline_seeds, args.loader,
                                      args.batch, args.threads, args.seed)
    if report["not_meaningful"]:
        print(f"probes of {args.init} against {args.baseline_seeds} random encoders: not meaningful "
              f"({report['not_meaningful']}); no top-1 or margin reported"
              f"{' (--json shows the numbers)' if not args.json else ''}")
        if args.json:
            print(json.dumps(report, indent=2))
        return 0
    for readout, name in (("linear", "linear probe"), ("knn", "k-NN probe")):
        print(f"{name}: {probe_line(report[readout])}")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def probe_line(readout: dict) -> str:
    """One probe's result as one line: the pretrained top-1 against the random encoders' mean and spread."""
    spread = readout["random_init"]
    times = f", {readout['margin_in_spread']:.1f}x their spread" if readout["margin_in_spread"] is not None else ""
    return (f"{readout['pretrained']:.1f}% pretrained vs {spread['mean']:.1f} +- {spread['std']:.1f}% random encoders "
            f"({readout['margin']:+.1f} points{times})")


def register(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="a run's encoder (or encoder+decoder) as one safetensors file")
    export.add_argument("run_dir", help="run folder (or its checkpoints/ or best/ folder, or one checkpoint's folder)")
    export.add_argument("--out", help="the .safetensors file to write (default: in the run folder, "
                        "encoder.safetensors; encoder_decoder.safetensors with --with-decoder; classifier.safetensors "
                        "for a fine-tuning run, classifier-best.safetensors with --best)")
    choice = export.add_mutually_exclusive_group()
    choice.add_argument("--tag", help="checkpoint tag, e.g. step00000405 (default: the latest complete one)")
    choice.add_argument("--best", action="store_true", help="the best fine-tuning checkpoint (RUN/best/): encoder "
                        "+ head")
    export.add_argument("--with-decoder", action="store_true", help="keep the decoder (for visualisation)")
    export.add_argument("--format", choices=("safetensors", "official"), default="safetensors",
                        help="official: a .pth with {'model': ...} in the official MixMIM key layout, as its "
                             "fine-tuning script loads it")
    export.add_argument("--json", action="store_true", help="also print the full report as JSON")
    export.set_defaults(handler=_export)

    probe = sub.add_parser("probe", help="linear probe of an encoder on labeled shards (top-1)")
    probe.add_argument("--init", required=True, help="exported .safetensors, a run folder or an official .pth")
    probe.add_argument("--data", required=True, help="shard folder with train and val splits")
    probe.add_argument("--baseline", action="store_true",
                       help="compare with randomly initialised encoders of the same shape (mean and spread)")
    probe.add_argument("--baseline-seeds", type=int, default=3, help="random initialisations to compare with")
    probe.add_argument("--loader", choices=["dali", "torch"], default="dali",
                       help="data loader (torch: the PyTorch fallback)")
    probe.add_argument("--batch", type=int, default=64, help="images per batch when extracting features")
    probe.add_argument("--threads", type=int, default=2, help="decoding threads")
    probe.add_argument("--seed", type=int, default=0, help="seed of the random encoders and the probes")
    probe.add_argument("--json", action="store_true", help="also print the full report as JSON")
    probe.set_defaults(handler=_probe)
