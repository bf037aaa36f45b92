"""Reading shards from an S3-protocol store against reading them from local disk, in one run.

Starts a real S3-protocol server on the loopback (moto's server mode), uploads a shard set of photo-sized
JPEGs (benchmarks/shards.py's generator, about 100 KB each, `--shard-samples` per tar), and then,
alternating local and S3 rounds: (1) pulls pretraining batches through the DALI loader (CPU decoding) and
counts the requests the loader sent per sample while it streams (after its first batch: index and byte-range
GETs, read-ahead included); (2) with --pretrain, runs the tiny profile's real
pretraining (2 CPU ranks through the deepspeed launcher) from each and reads its images/s from
summary.json. Prints a table, writes results/object_storage.json. A loopback server has no network
latency: the ratio shows the reader's own cost, the requests per sample what a real store would bill
and throttle.

    python benchmarks/object_storage.py --images 2048 --shard-samples 256 --pretrain
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def start_server() -> tuple[object, str]:
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    return server, endpoint


def build_shards(work: Path, images: int, per_shard: int) -> Path:
    from shards import make_tree  # benchmarks/shards.py: ~100 KB photo-like JPEGs

    from mixmae_scale.shards.convert import ConvertOptions, convert

    out = work / "shards"
    if not (out / "dataset.json").exists():
        make_tree(work / "images", images)
        convert(work / "images", out, ConvertOptions(layout="imagenet", samples_per_shard=per_shard, shard_bytes=None,
                                                     workers=2))
    return out


def upload_set(local: Path, bucket: str = "bench") -> str:
    """The shard set under `local` (its .progress/ left out) into a new bucket; its s3:// URL."""
    import boto3

    from mixmae_scale.data import storage

    boto3.client("s3").create_bucket(Bucket=bucket)
    for path in (p for p in local.rglob("*") if p.is_file() and ".progress" not in p.parts):
        storage.upload(path, f"s3://{bucket}/shards/{path.relative_to(local).as_posix()}")
    return f"s3://{bucket}/shards"


def loader_rate(location: str, batches: int, threads: int) -> tuple[float, int]:
    """Images/s of the DALI pretraining loader (after its first batch) and the GETs it sent per sample."""
    from mixmae_scale.data import storage
    from mixmae_scale.data.loader import ShardLoader
    from mixmae_scale.data.spec import PipelineSpec

    spec = PipelineSpec(mode="pretrain", img_size=224, batch_size=64, num_threads=threads, shuffle_buffer=1024)
    loader = ShardLoader(location, "train", spec, "dali", workers=threads)
    stream = itertools.chain.from_iterable(iter(loader) for _ in itertools.count())
    next(stream)  # start-up: the manifest and the first windows
    storage.REQUESTS.clear()  # from here on: what the loader asks for while it streams
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    rate = batches * spec.batch_size / (time.perf_counter() - start)
    gets = storage.REQUESTS["GET"]
    loader.close()
    return rate, gets


def pretrain_rate(location: str, work: Path, steps: int) -> float:
    run = Path(tempfile.mkdtemp(dir=work, prefix="run-"))
    bin_dir = Path(sys.executable).parent
    command = [str(bin_dir / "deepspeed"), "--num_gpus", "2", "--module", "mixmae_scale.cli", "pretrain",
               "--profile", "tiny", "--run-dir", str(run), "--max-steps", str(steps), "--set",
               f"data.shards={location}", "precision.dtype=fp32",
               "logging.heldout_batches=1", "logging.visualize_every_steps=0", "checkpoint.at_end=false",
               "logging.every_steps=5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
    return json.loads((run / "summary.json").read_text())["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--shard-samples", type=int, default=256)
    parser.add_argument("--batches", type=int, default=48, help="batches of 64 timed and counted after the first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pretrain", action="store_true", help="also time pretraining from each (2 CPU ranks)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mixmae-object-storage-bench")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    local = build_shards(args.work, args.images, args.shard_samples)
    server, endpoint = start_server()
    remote = upload_set(local)
    rows: dict[str, dict[str, list[float]]] = {"local": {"loader": [], "gets": [], "pretrain": []},
                                               "s3": {"loader": [], "gets": [], "pretrain": []}}
    samples = args.batches * 64
    for _ in range(args.rounds):
        for name, location in (("local", str(local)), ("s3", remote)):
            rate, gets = loader_rate(location, args.batches, args.threads)
            rows[name]["loader"].append(rate)
            rows[name]["gets"].append(gets / samples)
            if args.pretrain:
                rows[name]["pretrain"].append(pretrain_rate(location, args.work, args.steps))
    server.stop()
    table = {name: {key: statistics.median(values) if values else None for key, values in row.items()}
             for name, row in rows.items()}
    print(f"\n{args.images} photo-sized JPEGs in shards of {args.shard_samples}, S3 = moto on the loopback, "
          f"{args.rounds} alternating rounds (median)")
    print(f"{'source':>7} {'loader img/s':>13} {'GETs/sample':>12} {'pretrain img/s':>15}")
    for name, row in table.items():
        pretrain = f"{row['pretrain']:.1f}" if row["pretrain"] else "-"
        print(f"{name:>7} {row['loader']:>13.1f} {row['gets']:>12.4f} {pretrain:>15}")
    ratio = table["s3"]["loader"] / table["local"]["loader"]
    print(f"loader S3/local: {ratio:.2f}" + (f"; pretraining S3/local: "
                                              f"{table['s3']['pretrain'] / table['local']['pretrain']:.2f}"
                                              if args.pretrain else ""))
    result = {"benchmark": "object_storage", "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "images": args.images, "shard_samples": args.shard_samples,
              "server": "moto ThreadedMotoServer on 127.0.0.1", "rounds": rows, "median": table,
              "loader_ratio_s3_to_local": ratio}
    from mixmae_scale.atomic_file import write_text

    RESULTS.mkdir(exist_ok=True)
    write_text(RESULTS / "object_storage.json", json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'object_storage.json'}")


if __name__ == "__main__":
    main()
