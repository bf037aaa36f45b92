"""Start-up of one rank at scale: does it grow with the number of shards?

Builds real shard sets (tiny JPEGs, 8 per tar, each with its DALI index and one manifest) of 1,000 and
100,000 shards, then starts rank 0 of a simulated world of 64 (`shard_id` 0 of 64) in a fresh process under
`ulimit -n 1024`, and measures from the process's start to its first decoded batch: the time, the peak
number of open file descriptors and the peak RSS. Each set is measured --rounds times, alternating, so that
the ratio compares like with like on a noisy machine. Prints a table, writes results/startup.json.

    python benchmarks/startup.py                      # 1,000 and 100,000 shards (about 3 minutes to build)
    python benchmarks/startup.py --shards 1000 10000  # a quicker look
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mixmae_scale.atomic_file import write_text
from mixmae_scale.data.manifest import Manifest, ShardEntry, SplitEntry, write_manifest
from mixmae_scale.shards.writer import TarShardWriter

RESULTS = Path(__file__).resolve().parent / "results"
PER_SHARD = 8

CHILD = textwrap.dedent("""
    import json, os, sys, time
    from mixmae_scale.data.loader import ShardLoader
    from mixmae_scale.data.spec import PipelineSpec
    spec = PipelineSpec(mode="pretrain", img_size=64, batch_size=8, shard_id=0, num_shards=64, num_threads=1,
                        shuffle_buffer=64)
    loader = ShardLoader(sys.argv[1], "train", spec, sys.argv[2], workers=1)
    batch = next(iter(loader))
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    print(json.dumps({"first_batch_at": time.time(), "shape": list(batch.images.shape),
                      "peak_rss_mib": int(status["VmHWM"].split()[0]) / 1024}), flush=True)
    os._exit(0)
""")


def build(folder: Path, shards: int) -> Path:
    """A shard set of `shards` real tars (8 distinct JPEGs each, copied byte for byte) with indexes and a manifest."""
    if (folder / "dataset.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    template = folder / "template.tar"
    writer = TarShardWriter(template)
    for i in range(PER_SHARD):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        writer.add(f"sample_{i:02d}", {"jpg": buffer.getvalue(), "cls": str(i % 4).encode()})
    writer.close()
    data, index = template.read_bytes(), writer.index_text()
    entries = []
    for number in range(shards):
        name = f"train-{number:06d}"
        (folder / f"{name}.tar").write_bytes(data)
        (folder / f"{name}.idx").write_text(index)
        entries.append(ShardEntry(f"{name}.tar", f"{name}.idx", PER_SHARD, len(data)))
    template.unlink()
    write_manifest(folder, Manifest({"train": SplitEntry(PER_SHARD * shards, True, tuple(entries))},
                                    [{"index": i} for i in range(4)]))
    return folder


def _limit_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def measure(folder: Path, backend: str) -> dict:
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), backend], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_limit_files,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak_fds = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak_fds
        while not done.is_set():
            with contextlib.suppress(OSError):  # the process has just ended
                peak_fds = max(peak_fds, len(os.listdir(f"/proc/{proc.pid}/fd")))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = proc.communicate(timeout=900)
    done.set()
    watcher.join()
    if proc.returncode:
        raise RuntimeError(f"the rank failed on {folder}:\n{err[-3000:]}")
    report = json.loads(out.strip().splitlines()[-1])
    return {"first_batch_s": report["first_batch_at"] - start, "peak_fds": peak_fds,
            "peak_rss_mib": report["peak_rss_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", choices=["dali", "torch"], default="dali")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mixmae-startup-bench")
    parser.add_argument("--out", type=Path, default=RESULTS / "startup.json")
    parser.add_argument("--label", default="", help="what ran, recorded in the JSON (e.g. another commit's loader)")
    args = parser.parse_args()
    sets = {}
    for count in args.shards:
        start = time.perf_counter()
        sets[count] = build(args.work / f"shards-{count}", count)
        print(f"{count} shards ready in {args.work / f'shards-{count}'} ({time.perf_counter() - start:.0f} s)")
    runs: dict[int, list[dict]] = {count: [] for count in args.shards}
    for _ in range(args.rounds):
        for count in args.shards:  # alternating: every set sees the machine in the same states
            runs[count].append(measure(sets[count], args.backend))
    base = statistics.median(r["first_batch_s"] for r in runs[args.shards[0]])
    rows = []
    for count in args.shards:
        times = [r["first_batch_s"] for r in runs[count]]
        rows.append({"shards": count, "first_batch_s_median": statistics.median(times), "first_batch_s": times,
                     "ratio_to_first": statistics.median(times) / base,
                     "peak_fds": max(r["peak_fds"] for r in runs[count]),
                     "peak_rss_mib": max(r["peak_rss_mib"] for r in runs[count])})
    print(f"\nrank 0 of 64, {args.backend} loader, ulimit -n 1024, {args.rounds} rounds (median; all runs in the JSON)")
    print(f"{'shards':>8} {'first batch s':>14} {'ratio':>6} {'peak fds':>9} {'peak RSS MiB':>13}")
    for row in rows:
        print(f"{row['shards']:>8} {row['first_batch_s_median']:>14.2f} {row['ratio_to_first']:>6.2f} "
              f"{row['peak_fds']:>9} {row['peak_rss_mib']:>13.0f}")
    result = {"benchmark": "startup", "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "backend": args.backend, "world": 64, "rank": 0,
              "samples_per_shard": PER_SHARD, "ulimit_nofile": 1024, "label": args.label, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
