"""Shard conversion throughput against plain `tar cf` of the same files; prints a table, writes JSON.

Makes an ImageNet-like tree of real JPEG files (photo-sized, ~100 KB each), warms the page cache
with one untimed read, then times, in one run and alternating: `tar cf`, our converter with 1 worker
and with 2 workers (raw-bytes mode, the default). Ratios against tar are the result.

    python benchmarks/shards.py --images 2000
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mixmae_scale.atomic_file import write_text
from mixmae_scale.shards.convert import ConvertOptions, convert

RESULTS = Path(__file__).resolve().parent / "results"


def make_tree(root: Path, images: int, classes: int = 10, seed: int = 0) -> int:
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    total = 0
    for i in range(images):
        wnid = f"n{i % classes:08d}"
        path = root / "train" / wnid / f"{wnid}_{i:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        w, h = rng.choice([(500, 375), (375, 500), (500, 333), (640, 480)])
        # Smooth noise compresses like a photograph (~100 KB at quality 90), unlike flat colour.
        small = nprng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        noise = nprng.integers(-12, 12, size=(h, w, 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
        image.save(path, format="JPEG", quality=90)
        total += path.stat().st_size
    (root / "val").mkdir(exist_ok=True)
    for wnid in sorted((root / "train").iterdir()):
        (root / "val" / wnid.name).mkdir(exist_ok=True)
        first = sorted(wnid.iterdir())[0]
        shutil.copy(first, root / "val" / wnid.name / first.name)
    return total


def time_tar(src: Path, out: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["tar", "cf", str(out), "-C", str(src), "train"], check=True)
    return time.perf_counter() - start


def time_convert(src: Path, out: Path, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    convert(src, out, ConvertOptions(layout="imagenet", splits=("train",), shard_bytes=64_000_000, workers=workers))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "shards.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mixmae-shards-bench-") as tmp:
        tmp_path = Path(tmp)
        src = tmp_path / "src"
        total_bytes = make_tree(src, args.images)
        time_tar(src, tmp_path / "warm.tar")  # page cache warm-up, untimed
        times: dict[str, list[float]] = {"tar cf": [], "convert 1 worker": [], "convert 2 workers": []}
        for _ in range(args.repeats):
            times["tar cf"].append(time_tar(src, tmp_path / "plain.tar"))
            times["convert 1 worker"].append(time_convert(src, tmp_path / "w1", 1))
            times["convert 2 workers"].append(time_convert(src, tmp_path / "w2", 2))
    tar_s = statistics.median(times["tar cf"])
    rows = []
    for name, values in times.items():
        seconds = statistics.median(values)
        rows.append({"method": name, "seconds": seconds, "images_per_s": args.images / seconds,
                     "MB_per_s": total_bytes / 1e6 / seconds, "vs_tar": tar_s / seconds, "repeats": len(values)})
    print(f"{args.images} JPEG files, {total_bytes / 1e6:.1f} MB; median of {args.repeats} alternating runs")
    print(f"{'method':<20}{'seconds':>10}{'images/s':>12}{'MB/s':>10}{'vs tar':>10}")
    for r in rows:
        print(f"{r['method']:<20}{r['seconds']:>10.2f}{r['images_per_s']:>12.0f}{r['MB_per_s']:>10.1f}{r['vs_tar']:>10.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps({"images": args.images, "bytes": total_bytes, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
