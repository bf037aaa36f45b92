"""bf16 against fp32 matrix multiplies on this CPU: the ratio the run log's precision line states.

`precision.dtype: auto` picks fp32 on a CPU whose oneDNN has no native bf16 (no AVX-512) and says why in every
run's log (`config/precision.py`); an explicit bf16 there warns. This times a square fp32 and bf16 matmul
(`torch.matmul`, the threads given, each timed for `--seconds` after a warm-up, the median of `--rounds`) and
writes the ratio with whether oneDNN reports native bf16, so that the figure in that line has a source.

    python benchmarks/bf16_matmul.py [--sizes 256 1024] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from mixmae_scale.atomic_file import write_text

RESULTS = Path(__file__).resolve().parent / "results" / "bf16_matmul_cpu.json"


def seconds_per_matmul(n: int, dtype: torch.dtype, seconds: float) -> float:
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator).to(dtype) for _ in range(2))
    a @ b  # warm-up: oneDNN's primitive creation is not the steady state
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 2:
        a @ b
        count += 1
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024], help="square matrix sizes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per size and dtype (the median is kept)")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per round")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for n in args.sizes:
        times = {name: statistics.median(seconds_per_matmul(n, dtype, args.seconds) for _ in range(args.rounds))
                 for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        rows.append({"n": n, "fp32_s": times["fp32"], "bf16_s": times["bf16"], "bf16_over_fp32": times["bf16"]
                     / times["fp32"]})
        print(f"{n:5d}x{n}: fp32 {times['fp32'] * 1e3:9.3f} ms  bf16 {times['bf16'] * 1e3:9.3f} ms  "
              f"bf16/fp32 {rows[-1]['bf16_over_fp32']:.0f}x")
    result = {"benchmark": "bf16_matmul", "command": "python benchmarks/bf16_matmul.py " + " ".join(
                  f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in
                  (("sizes", args.sizes), ("threads", args.threads), ("rounds", args.rounds))),
              "machine": platform.machine(), "torch": torch.__version__, "threads": args.threads,
              "onednn_native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "rows": rows}
    write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
