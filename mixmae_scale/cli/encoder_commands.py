"""`mixmae export|probe`: a run's weights as a file, and probes (linear, k-NN) of them."""

from __future__ import annotations

import argparse
import json

from mixmae_scale.cli.arguments import at_least
from mixmae_scale.data.errors import plural


def _export(args: argparse.Namespace) -> int:
    from mixmae_scale.engine.export import export_line, export_run

    result = export_run(args.run_dir, args.out, args.tag, args.with_decoder, best=args.best, fmt=args.format)
    print(export_line(result))
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def _probe(args: argparse.Namespace) -> int:
    import dataclasses

    if args.dense:
        if args.max_samples:
            from mixmae_scale.config import ConfigError

            raise ConfigError("--max-samples: caps the classification probe's training images; the dense probe "
                              "(--dense) reads every image of both splits")
        return _dense_probe(args)

    from mixmae_scale.data.manifest import load_manifest, load_split
    from mixmae_scale.finetune.evaluate import require_folder, require_labels
    from mixmae_scale.finetune.pretrained import load_encoder
    from mixmae_scale.finetune.probe import compare_with_random_init, linear_probe, refuse_one_class, require_memory
    from mixmae_scale.finetune.trained_classes import class_identities

    require_folder(args.data, "--data")
    state, arch = load_encoder(args.init, "--init")
    train, val = load_split(args.data, "train"), load_split(args.data, "val")
    for split in (train, val):  # before any image is read
        require_labels(args.data, split, "--data ", "the probe fits and scores class labels")
    refuse_one_class(args.data, train, class_identities(load_manifest(args.data).classes))
    num_classes = train.num_classes
    require_memory(args.data, min(train.samples, args.max_samples or train.samples), val.samples, arch, num_classes,
                   1 + args.baseline_seeds * args.baseline, args.batch)
    if not args.baseline:
        result = dataclasses.asdict(linear_probe(state, arch, args.data, num_classes, args.loader, args.batch,
                                                 args.threads, args.seed, args.max_samples))
        if result["not_meaningful"]:
            print(f"probe of {args.init}: not meaningful ({result['not_meaningful']}); no top-1 reported"
                  f"{' (--json shows the numbers)' if not args.json else ''}")
        else:
            print(f"probe of {args.init}: linear top-1 {result['top1']:.1f}%, k-NN top-1 {result['knn_top1']:.1f}% on "
                  f"{plural(result['val_samples'], 'validation image')} ({plural(num_classes, 'class', 'classes')})")
        if args.json:
            print(json.dumps({"pretrained": result}, indent=2))
        return 0
    report = compare_with_random_init(state, arch, args.data, num_classes, args.baseline_seeds, args.loader,
                                      args.batch, args.threads, args.seed, args.max_samples)
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


def _mask_classes(args: argparse.Namespace) -> int:
    from mixmae_scale.data.errors import DataError
    from mixmae_scale.data.manifest import load_split

    split = load_split(args.data, "train")
    if not split.masks:
        raise DataError(f"--data {args.data}: its train split has no segmentation masks, which --dense reads; make "
                        "shards with masks (`mixmae shards demo`, `mixmae shards ade20k`)")
    if args.mask_classes and split.mask_classes and args.mask_classes < split.mask_classes:
        # Else found at the first label past them, once the whole training split was read and encoded.
        raise DataError(f"--mask-classes {args.mask_classes}: the masks of {args.data} label {split.mask_classes} "
                        f"classes (its manifest's mask_classes); pass at least {split.mask_classes}, or leave it out "
                        "to take the manifest's")
    if args.mask_classes:
        return args.mask_classes
    if not split.mask_classes:
        raise DataError(f"--data {args.data}: the manifest does not say how many classes the masks label (adopted "
                        "tars do not); pass --mask-classes N")
    return split.mask_classes


def _dense_probe(args: argparse.Namespace) -> int:
    import dataclasses

    from mixmae_scale.finetune.dense_probe import compare_with_random_init, dense_probe
    from mixmae_scale.finetune.evaluate import require_folder
    from mixmae_scale.finetune.pretrained import load_encoder

    require_folder(args.data, "--data")
    state, arch = load_encoder(args.init, "--init")
    classes = _mask_classes(args)
    if not args.baseline:
        result = dataclasses.asdict(dense_probe(state, arch, args.data, classes, args.loader, args.batch, args.threads,
                                              args.seed))
        report = {"pretrained": result, "not_meaningful": result["not_meaningful"]}
        print(f"dense probe of {args.init}: mIoU {result['miou']:.1f}%, pixel accuracy {result['pixel_accuracy']:.1f}% "
              f"on {result['val_samples']} validation images ({classes} mask classes, {result['seconds']:.0f} s)"
              + (f"; not meaningful: {result['not_meaningful']}" if result["not_meaningful"] else ""))
    else:
        report = compare_with_random_init(state, arch, args.data, classes, args.baseline_seeds, args.loader,
                                          args.batch, args.threads, args.seed)
        seconds = report["pretrained"]["seconds"] + sum(b["seconds"] for b in report["random_init"])
        print(f"dense probe of {args.init} against {args.baseline_seeds} random encoders ({classes} mask classes, "
              f"{report['pretrained']['val_samples']} validation images, {seconds:.0f} s)"
              + (f"; not meaningful: {report['not_meaningful']}" if report["not_meaningful"] else ""))
        for measure, name in (("miou", "mIoU"), ("pixel_accuracy", "pixel accuracy")):
            print(f"{name}: {probe_line(report[measure])}")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def probe_line(readout: dict) -> str:
    """One probe's result as one line: the pretrained top-1 against the random encoders' mean and spread."""
    spread = readout["random_init"]
    if spread["std"] is None:  # one random encoder: no spread, and a margin over one draw is no evidence
        return (f"{readout['pretrained']:.1f}% pretrained vs {spread['mean']:.1f}% for one random encoder "
                f"({readout['margin']:+.1f} points; no spread to weigh them against: --baseline-seeds 2 or more)")
    times = f", {readout['margin_in_spread']:.1f}x their spread" if readout["margin_in_spread"] is not None else ""
    return (f"{readout['pretrained']:.1f}% pretrained vs {spread['mean']:.1f} +- {spread['std']:.1f}% random encoders "
            f"({readout['margin']:+.1f} points{times})")


def register(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="a run's encoder (or encoder+decoder) as one safetensors file")
    export.add_argument("run_dir", help="run folder (or its checkpoints/ or best/ folder, or one checkpoint's folder)")
    export.add_argument("--out", help="the .safetensors file to write, a .pth with --format official (default: in "
                        "the run folder, encoder.safetensors; encoder_decoder.safetensors with --with-decoder; "
                        "classifier.safetensors for a fine-tuning run, segmenter.safetensors for a segmentation "
                        "run; <name>-best.safetensors with --best; <name>-official.pth with --format official)")
    choice = export.add_mutually_exclusive_group()
    choice.add_argument("--tag", help="checkpoint tag, e.g. step00000405 (default: the latest complete one)")
    choice.add_argument("--best", action="store_true", help="the best checkpoint of a fine-tuning or segmentation "
                        "run (RUN/best/): encoder + head")
    export.add_argument("--with-decoder", action="store_true", help="keep the decoder (for visualisation)")
    export.add_argument("--format", choices=("safetensors", "official"), default="safetensors",
                        help="official: a .pth with {'model': ...} in the official MixMIM key layout, as its "
                             "fine-tuning script loads it")
    export.add_argument("--json", action="store_true", help="also print the full report as JSON")
    export.set_defaults(handler=_export)

    probe = sub.add_parser("probe", help="linear and k-NN probes of an encoder on labeled shards (top-1); --dense: "
                           "per-pixel read-out of its feature maps on shards with segmentation masks (mIoU)")
    probe.add_argument("--init", required=True, help="exported .safetensors, a run folder or an official .pth")
    probe.add_argument("--data", required=True, help="shard folder with train and val splits")
    probe.add_argument("--baseline", action="store_true",
                       help="compare with randomly initialised encoders of the same shape (mean and spread)")
    probe.add_argument("--baseline-seeds", type=at_least(1), default=3, help="random initialisations to compare with")
    probe.add_argument("--loader", choices=["dali", "torch"], default="dali",
                       help="data loader (torch: the PyTorch fallback)")
    probe.add_argument("--batch", type=at_least(1), default=64, help="images per batch when extracting features")
    probe.add_argument("--threads", type=at_least(1), default=2, help="decoding threads")
    probe.add_argument("--seed", type=int, default=0, help="seed of the random encoders and the probes")
    # 2: finetune/probe.py's MIN_FIT_IMAGES (not imported here: it would load torch to parse the command line)
    probe.add_argument("--max-samples", type=at_least(2), help="read at most this many training images, the first in "
                       "shard order (`mixmae shards` writes a split shuffled): the probe holds every image's "
                       "features in memory, for each encoder compared (default: the whole split; at least 2: one "
                       "image has no spread to standardise its features by)")
    probe.add_argument("--json", action="store_true", help="also print the full report as JSON")
    probe.add_argument("--dense", action="store_true",
                       help="per-pixel linear read-out of the frozen feature maps (strides 4-32) on the masks "
                       "(seg.png), scored by mIoU on the validation split")
    probe.add_argument("--mask-classes", type=at_least(0), default=0,
                       help="with --dense: how many classes the masks label (default: the manifest's mask_classes)")
    probe.set_defaults(handler=_probe)
