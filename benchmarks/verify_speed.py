"""`mixmae shards verify` throughput: --workers 1 and 2, with and without --decode, local disk and an S3-protocol
store, in one run.

Builds a shard set of photo-sized JPEGs (benchmarks/shards.py's generator, about 100 KB each, `--shard-samples` per
tar), uploads it to a real S3-protocol server on the loopback (moto's server mode in this process, its WSGI app
wrapped to count requests: benchmarks/object_storage_resume.py), and times `verify()` (what the command calls) in
a fresh Python process per measurement, so that its worker processes fork from a process without the server's
thread (and interpreter start-up, about the same for every row, is not timed). Rounds alternate the eight
settings; the table gives medians, images/s and MB/s of tar bytes, and each row against --workers 1 on the same
source and decode setting. A loopback server has no network latency: the S3 rows show the client's and the
server's own cost (moto shares this machine's cores with the workers).

    python benchmarks/verify_speed.py --images 2048 --shard-samples 128 --rounds 5
"""

from __future__ import annotations

import argparse
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

DRIVER = """
import json, sys, time
from mixmae_scale.shards.verify import verify
location, decode, workers = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
start = time.perf_counter()
report = verify(location, decode=decode, workers=workers)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "ok": report["ok"], "errors": report["errors"][:3],
                  "samples": sum(s["samples"] for s in report["splits"].values())}))
"""


def timed(location: str, decode: bool, workers: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", DRIVER, location, "1" if decode else "0", str(workers)], env=env,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["ok"]:
        raise RuntimeError(f"verify found problems in {location}: {result['errors']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--shard-samples", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mixmae-verify-bench")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from object_storage import build_shards, upload_set
    from object_storage_resume import start_server

    local = build_shards(args.work, args.images, args.shard_samples)
    server, recorder = start_server()
    upload_set(local)
    manifest = json.loads((local / "dataset.json").read_text())
    tar_bytes = sum(shard["bytes"] for split in manifest["splits"].values() for shard in split["shards"])
    tars = sum(len(split["shards"]) for split in manifest["splits"].values())
    settings = [(source, decode, workers) for source in ("local", "s3") for decode in (False, True)
                for workers in (1, 2)]
    seconds: dict[str, list[float]] = {}
    gets: dict[str, list[int]] = {}
    samples = 0
    for _ in range(args.rounds):
        for source, decode, workers in settings:
            name = f"{source} {'decode' if decode else 'bytes'} w{workers}"
            mark = recorder.mark()
            result = timed(str(local) if source == "local" else "s3://bench/shards", decode, workers)
            samples = result["samples"]
            seconds.setdefault(name, []).append(result["seconds"])
            gets.setdefault(name, []).append(sum(1 for r in recorder.since(mark) if r["method"] == "GET"))
    server.stop()
    table = {}
    for source, decode, workers in settings:
        name = f"{source} {'decode' if decode else 'bytes'} w{workers}"
        median = statistics.median(seconds[name])
        one = statistics.median(seconds[f"{source} {'decode' if decode else 'bytes'} w1"])
        table[name] = {"source": source, "decode": decode, "workers": workers, "seconds": median,
                       "images_per_s": samples / median, "mb_per_s": tar_bytes / 1e6 / median,
                       "speedup_over_1_worker": one / median, "gets": statistics.median(gets[name])}
    for name, row in table.items():
        local_twin = table[name.replace("s3", "local", 1)]
        row["s3_over_local"] = row["images_per_s"] / local_twin["images_per_s"]
    print(f"\nverify: {samples} photo-sized JPEGs ({tar_bytes / 1e6:.1f} MB) in {tars} tars, S3 = moto on the "
          f"loopback, {args.rounds} alternating rounds (median), {os.cpu_count()} cores")
    print(f"{'source':>6} {'--decode':>8} {'workers':>7} {'seconds':>8} {'img/s':>8} {'MB/s':>7} {'x w1':>6} "
          f"{'x local':>8} {'GETs':>5}")
    for row in table.values():
        print(f"{row['source']:>6} {'yes' if row['decode'] else 'no':>8} {row['workers']:>7} {row['seconds']:>8.2f} "
              f"{row['images_per_s']:>8.0f} {row['mb_per_s']:>7.1f} {row['speedup_over_1_worker']:>6.2f} "
              f"{row['s3_over_local']:>8.2f} {row['gets']:>5.0f}")
    result = {"benchmark": "verify_speed", "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "samples": samples,
              "tar_bytes": tar_bytes, "tars": tars, "server": "moto ThreadedMotoServer on 127.0.0.1",
              "timed": "verify() in a fresh process per measurement (interpreter start-up not timed)",
              "rounds": seconds, "median": table}
    from mixmae_scale.atomic_file import write_text

    RESULTS.mkdir(exist_ok=True)
    write_text(RESULTS / "verify_speed.json", json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'verify_speed.json'}")


if __name__ == "__main__":
    main()
