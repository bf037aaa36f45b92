"""`mixmae shards imagenet|folder|adopt|verify|demo`: image folders to WebDataset shards; existing shards indexed."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from mixmae_scale.cli.arguments import at_least, between
from mixmae_scale.data.errors import plural
from mixmae_scale.shards.rejection_limit import DEFAULT_MAX_REJECTED

if TYPE_CHECKING:
    from mixmae_scale.shards.builder import BuildResult, PoolError

RESUMES = "and the same command run again resumes from them"


def _print_notes(result: BuildResult) -> None:
    """What the library handed back for the person: notes on stdout, warnings on stderr."""
    for note in result.notes:
        print(note)
    for warning in result.warnings:
        print(f"WARNING {warning}", file=sys.stderr)


def _worker_died(exc: PoolError, kept: str) -> int:
    """A pool worker died: one line, exit 1. The library's message speaks to a script's author (the main guard,
    workers=N); here the command line is the caller, so --workers, and what a rerun keeps."""
    fewer = f"--workers {max(1, exc.workers // 2)}"
    if "memory" in exc.death:
        how = f"lower --workers (e.g. {fewer}) so that each worker has more memory"
    elif exc.exitcode is not None and exc.exitcode < 0:  # a crash (SIGSEGV in a decoder): fewer workers crash too
        how = "--workers 1 does the work in this process, where what ends it shows"
    else:
        how = f"if memory ran out, lower --workers (e.g. {fewer})"
    print(f"mixmae: error: a worker process (of {exc.workers}) {exc.death} before its work was done; {kept}; {how}",
          file=sys.stderr)
    return 1


def _shards_convert(args: argparse.Namespace) -> int:
    from mixmae_scale.shards.builder import PoolError
    from mixmae_scale.shards.convert import ConvertOptions, convert, parse_size, summary_lines

    val_fraction = getattr(args, "val_fraction", 0.0)
    splits = tuple(s for s in args.split.split(",") if s)
    if not splits:  # wrote a manifest of no split, with exit 0
        print(f"mixmae: error: --split {args.split!r}: name at least one split, e.g. --split train,val",
              file=sys.stderr)
        return 2
    if val_fraction and args.split == "train":  # the default for folders: --val-fraction adds the val split
        splits = ("train", "val")
    options = ConvertOptions(
        layout=args.shards_command, splits=splits, seed=args.seed, val_fraction=val_fraction,
        samples_per_shard=args.samples_per_shard,
        shard_bytes=None if args.samples_per_shard else parse_size(args.shard_size),
        quality=args.quality, resize_shorter=args.resize_shorter, strict=args.strict, workers=args.workers,
        max_pixels=round(args.max_megapixels * 1e6) if args.max_megapixels > 0 else None, oversize=args.oversize,
        max_rejected=args.max_rejected, staging=args.staging, unlabeled=getattr(args, "unlabeled", False))
    try:
        result = convert(args.src, args.out, options)
    except PoolError as exc:
        return _worker_died(exc, f"the shards written so far are kept, {RESUMES}")
    except OSError as exc:  # the output side (disk full, unwritable folder): per-file problems never get here
        print(f"mixmae: error: writing shards to {args.out} failed: {exc}. Finished shards are kept; free space "
              "or fix the folder, then run the same command again to resume", file=sys.stderr)
        return 1
    _print_notes(result)
    for line in summary_lines(result.manifest):
        print(line)
    out = args.out.rstrip("/")
    print(f"manifest: {out}/dataset.json; rejected files: {out}/rejected.jsonl")
    return 0


def _shards_adopt(args: argparse.Namespace) -> int:
    from mixmae_scale.shards.adopt import AdoptOptions, adopt, summary_lines
    from mixmae_scale.shards.builder import PoolError

    options = AdoptOptions(split=args.split, decode=args.decode, workers=args.workers, max_rejected=args.max_rejected,
                           unlabeled=args.unlabeled)
    try:
        result = adopt(args.src, args.out, options)
    except PoolError as exc:
        return _worker_died(exc, f"the tars indexed so far are kept, {RESUMES}")
    except FileNotFoundError:
        raise  # a source path that is not there: said in one line by the CLI
    except OSError as exc:  # the output side (disk full, unwritable folder); a tar that cannot be read is retried
        print(f"mixmae: error: writing the indexes to {args.out} failed: {exc}. Indexed tars are kept; free space "
              "or fix the folder, then run the same command again to resume", file=sys.stderr)
        return 1
    _print_notes(result)
    for line in summary_lines(result, args.split):
        print(line)
    print(f"manifest: {args.out.rstrip('/')}/dataset.json (tars read from {result.manifest.base}); rejections: "
          f"{args.out.rstrip('/')}/rejected.jsonl; train with data.shards={args.out}")
    return 0


def _shards_verify(args: argparse.Namespace) -> int:
    from mixmae_scale.shards.builder import PoolError
    from mixmae_scale.shards.verify import verify

    try:
        report = verify(args.folder, decode=args.decode, workers=args.workers)
    except PoolError as exc:
        return _worker_died(exc, "the set was only read, so the same command can run again")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for split, info in report["splits"].items():
            decoded = f", {info['decoded']} decoded" if info["decoded"] is not None else ""
            print(f"{split}: {plural(info['samples'], 'sample')} in {plural(info['shards'], 'shard')}{decoded}")
        for error in report["errors"]:
            print(f"ERROR {error}")
        print("OK" if report["ok"] else plural(len(report['errors']), 'problem'))
    return 0 if report["ok"] else 1


def _shards_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mixmae_scale.shards.builder import PoolError
    from mixmae_scale.shards.convert import ConvertOptions, convert, summary_lines
    from mixmae_scale.shards.demo import build_demo_images

    out = Path(args.out)
    images = out / "images"
    try:
        counts = build_demo_images(images, args.train_per_class, args.val_per_class, args.seed, args.workers)
        print(f"demo images under {images}: " + ", ".join(f"{split} {count}" for split, count in counts.items()))
        options = ConvertOptions(layout="imagenet", splits=("train", "val"), seed=args.seed,
                                 samples_per_shard=args.samples_per_shard, shard_bytes=None, workers=args.workers)
        result = convert(images, out / "shards", options)
    except PoolError as exc:
        return _worker_died(exc, f"the images and shards made so far are kept, {RESUMES}")
    _print_notes(result)
    for line in summary_lines(result.manifest):
        print(line)
    print(f"demo shards: {out / 'shards'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    shards = sub.add_parser("shards", help="image folders to WebDataset tar shards; verify; demo data")
    shards_sub = shards.add_subparsers(dest="shards_command", metavar="ACTION", required=True)
    for layout, text in (("imagenet", "an ILSVRC2012 tree (train/<wnid>/, val/ by folder or flat + labels)"),
                         ("folder", "class-per-subfolder images, or a flat folder of unlabeled images"),
                         ("ade20k", "ADE20K's layout: images/{training,validation}/*.jpg with their masks in "
                          "annotations/ (0 = other, ignored; 150 classes), as train and val with seg.png masks")):
        p = shards_sub.add_parser(layout, help=f"convert {text}")
        p.add_argument("--src", required=True, help="the source folder")
        p.add_argument("--out", required=True, help="folder, or s3://bucket/prefix (shards are staged locally and "
                       "uploaded one by one)")
        p.add_argument("--split", default="train" if layout == "folder" else "train,val",
                       help="comma-separated splits (for 'folder', 'train' is the source folder itself)")
        p.add_argument("--shard-size", default="1GB", help="target shard size (by the source files' sizes)")
        p.add_argument("--samples-per-shard", type=at_least(1), help="fixed sample count per shard instead")
        p.add_argument("--workers", type=at_least(1), default=os.cpu_count() or 1, help="processes writing shards "
                       "(default: every core)")
        p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
        p.add_argument("--resize-shorter", type=at_least(1), help="re-encode every image with this shorter side")
        p.add_argument("--quality", type=between(1, 100, int), default=95, help="JPEG quality of re-encoded images")
        p.add_argument("--strict", action="store_true", help="stop at the first file that cannot be used")
        p.add_argument("--max-megapixels", type=between(0, 1e6), default=40.0,
                       help="images above this many pixels are downscaled to it (or rejected: --oversize reject); "
                       "0 = no limit. Decompression bombs (> 179 MP) are always rejected")
        p.add_argument("--oversize", choices=["downscale", "reject"], default="downscale",
                       help="what to do with images above --max-megapixels")
        p.add_argument("--max-rejected", type=between(0, 1), default=DEFAULT_MAX_REJECTED,
                       help="exit non-zero when more than this fraction of a split's files is rejected (default: "
                       "%(default)s); a rerun with a higher value redoes nothing")
        p.add_argument("--staging", help="with --out s3://...: the local folder where each shard is written before "
                       "it is uploaded and deleted (default: one under the system's temporary folder)")
        if layout == "folder":
            p.add_argument("--val-fraction", type=float, default=0.0,
                           help="hold out this share of each class as the 'val' split (drawn with --seed), e.g. 0.1; "
                           "finetune, eval and probe need one")
            p.add_argument("--unlabeled", action="store_true", help="every image under SRC, unlabeled: subfolders are "
                           "not classes (img2dataset's `files` output, a photo archive); pretraining needs no labels")
        p.set_defaults(handler=_shards_convert)
    adopt = shards_sub.add_parser("adopt", help="index existing WebDataset .tar shards (a folder or s3:// prefix) "
                                  "for training, without rewriting them")
    adopt.add_argument("src", help="folder or s3://bucket/prefix holding the .tar shards (searched recursively)")
    adopt.add_argument("--out", required=True, help="folder or s3:// prefix for the indexes and dataset.json")
    adopt.add_argument("--split", default="train", help="the split these tars are; adopt val by a second call")
    adopt.add_argument("--decode", action="store_true", help="decode every image; reject those that do not")
    adopt.add_argument("--workers", type=at_least(1), default=os.cpu_count() or 1, help="processes indexing tars")
    adopt.add_argument("--max-rejected", type=between(0, 1), default=DEFAULT_MAX_REJECTED,
                       help="exit non-zero when more than this fraction of samples is rejected (default: "
                       "%(default)s); a rerun with a higher value redoes nothing")
    adopt.add_argument("--unlabeled", action="store_true", help="ignore the tars' .cls (pretraining needs no labels; "
                       "for cls values that are ids, not class indexes 0..N-1)")
    adopt.set_defaults(handler=_shards_adopt)
    verify = shards_sub.add_parser("verify", help="check a shard set (folder, adopted or s3://) against its manifest")
    verify.add_argument("folder", help="the shard set: a folder or an s3:// prefix holding dataset.json")
    verify.add_argument("--decode", action="store_true", help="decode every image too")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.add_argument("--workers", type=at_least(1), default=os.cpu_count() or 1,
                        help="processes reading tars at once (default: every core); the report is the same for any "
                        "count")
    verify.set_defaults(handler=_shards_verify)
    demo = shards_sub.add_parser("demo", help="build the built-in demo dataset and its shards")
    demo.add_argument("--out", default="demo_data", help="folder for images/ and shards/")
    demo.add_argument("--train-per-class", type=at_least(1), default=260, help="training images per class (10 classes)")
    demo.add_argument("--val-per-class", type=at_least(1), default=150, help="validation images per class")
    demo.add_argument("--samples-per-shard", type=at_least(1), default=256, help="images per shard")
    demo.add_argument("--workers", type=at_least(1), default=2, help="processes drawing the images and writing shards")
    demo.add_argument("--seed", type=int, default=0, help="seed of the drawings and the shuffle")
    demo.set_defaults(handler=_shards_demo)
