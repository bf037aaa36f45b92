"""Loader throughput: DALI-CPU, the PyTorch fallback and (with a GPU) DALI-GPU on the same shards.

Builds photo-sized JPEG shards (benchmarks/shards.py's generator), then pulls pretraining batches
(RandomResizedCrop 224, flip, normalise) from each loader with the same thread/worker count,
alternating loaders between rounds; prints images/s and the ratio to the fallback, writes JSON.

    python benchmarks/loader.py --images 1024 --batch 64 --threads 2
    python benchmarks/loader.py --shards demo_data/shards --img-size 64 --batch 512   # a sweep's small images
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mixmae_scale.atomic_file import write_text
from mixmae_scale.data.loader import ShardLoader
from mixmae_scale.data.spec import PipelineSpec
from mixmae_scale.shards.convert import ConvertOptions, convert

RESULTS = Path(__file__).resolve().parent / "results"


def throughput(shards: Path, backend: str, spec: PipelineSpec, threads: int, batches: int) -> float:
    loader = ShardLoader(str(shards), "train", spec, backend, workers=threads)
    stream = itertools.chain.from_iterable(iter(loader) for _ in itertools.count())
    next(stream)  # start-up (pipeline build, worker spawn) is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(stream)
    if batch.images.is_cuda:
        torch.cuda.synchronize()
    return batches * spec.batch_size / (time.perf_counter() - start)


def main() -> None:
    from shards import make_tree  # benchmarks/shards.py

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shards", type=Path, default=None,
                        help="read this shard set's train split instead of generated photo-sized JPEGs")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=RESULTS / "loader.json")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="mixmae-loader-bench-") as tmp:
        src, shards = Path(tmp) / "src", args.shards or Path(tmp) / "shards"
        if args.shards is None:
            make_tree(src, args.images)
            convert(src, shards, ConvertOptions(layout="imagenet", splits=("train",), samples_per_shard=128))
        spec = PipelineSpec(mode="pretrain", img_size=args.img_size, batch_size=args.batch, num_threads=args.threads,
                            shuffle_buffer=max(256, args.batch))
        variants = {"dali-cpu": ("dali", spec), "torch-fallback": ("torch", spec)}
        if gpu:
            from dataclasses import replace

            variants["dali-gpu"] = ("dali", replace(spec, device_id=0))
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, (backend, variant_spec) in variants.items():
                rates[name].append(throughput(shards, backend, variant_spec, args.threads, args.batches))
    fallback = statistics.median(rates["torch-fallback"])
    rows = [{"loader": name, "images_per_s": statistics.median(values),
             "vs_fallback": statistics.median(values) / fallback, "runs": values} for name, values in rates.items()]
    source = str(args.shards) if args.shards else f"{args.images} photo-sized JPEGs"
    print(f"{source}, batch {args.batch}, {args.img_size} px, {args.threads} threads/workers")
    print(f"{'loader':<16}{'images/s':>10}{'vs fallback':>13}")
    for r in rows:
        print(f"{r['loader']:<16}{r['images_per_s']:>10.0f}{r['vs_fallback']:>13.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps({"shards": source, "img_size": args.img_size, "batch": args.batch,
                                     "threads": args.threads, "gpu": gpu, "cpus": os.cpu_count(), "rows": rows},
                                    indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
