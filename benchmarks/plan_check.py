"""The memory planner's activation figure against measured training-step peaks; table + JSON.

Measured: the growth of peak memory over one forward+backward (weights and gradient buffers already
allocated), from benchmarks/model_step.py's memory worker, in a fresh process per configuration (CPU:
peak RSS; GPU: max_memory_allocated). Planned: mixmae_scale.cluster.plan's activation bytes for the
same micro-batch. GPU rows recorded earlier (benchmarks/results/model_step_gpu_*.json) are compared too.

    python benchmarks/plan_check.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mixmae_scale.atomic_file import write_text
from mixmae_scale.cluster.plan import measure_activations
from mixmae_scale.config import load_resolved

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE = {"tiny": "tiny", "base": "swin_b", "large": "swin_l", "huge": "swin_h"}


def planned_mib(size: str, dtype: str, batch: int, checkpointing: bool) -> float:
    resolved = load_resolved(PROFILE[size], overrides=[f"precision.dtype={dtype}", "batch.global_batch=null",
                                                       "batch.accumulation=1"], world_size=1)
    return batch * measure_activations(resolved, dtype).per_image(checkpointing) / 2**20


def measured_mib(size: str, dtype: str, batch: int, checkpoint_every: int) -> float:
    spec = json.dumps(dict(size=size, batch=batch, dtype=dtype, device="cpu", checkpoint_every=checkpoint_every,
                           attention="fused"))
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "model_step.py"), "--device", "cpu",
                          "--memory-worker", spec], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["step_peak_mib"]


def main() -> None:
    rows = []
    for size, dtype, batch in (("tiny", "fp32", 64), ("base", "fp32", 8)):
        for every in (0, 1):
            rows.append({"size": size, "device": "cpu", "dtype": dtype, "batch": batch, "checkpointing": bool(every),
                         "measured_mib": measured_mib(size, dtype, batch, every),
                         "planned_mib": planned_mib(size, dtype, batch, bool(every))})
    for path in sorted(RESULTS.glob("model_step_gpu_*.json")):
        data = json.loads(path.read_text())
        for row in data["rows"]:
            if row["kind"] == "memory":
                rows.append({"size": row["size"], "device": data["machine"].get("gpu") or "cuda", "dtype": row["dtype"],
                             "batch": row["batch"], "checkpointing": bool(row["checkpoint_every"]),
                             "measured_mib": row["step_peak_mib"],
                             "planned_mib": planned_mib(row["size"], row["dtype"], row["batch"],
                                                        bool(row["checkpoint_every"]))})
    print(f"{'size':<6}{'device':<14}{'dtype':<6}{'batch':>6}{'ckpt':>6}{'measured MiB':>14}{'planned MiB':>13}"
          f"{'planned/measured':>18}")
    for r in rows:
        r["ratio"] = r["planned_mib"] / r["measured_mib"]
        print(f"{r['size']:<6}{r['device'][:13]:<14}{r['dtype']:<6}{r['batch']:>6}{str(r['checkpointing']):>6}"
              f"{r['measured_mib']:>14.0f}{r['planned_mib']:>13.0f}{r['ratio']:>18.2f}")
    out = RESULTS / "plan_check.json"
    write_text(out, json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
