"""How a sweep's start order fares on one device when the runs cost more than estimated: a simulation, not a
measurement. Each run costs `estimated_seconds` (scaling/workers.py: a fixed cost per step plus FLOPs at a rate, both
from the H100 measurements) times a factor; `--parallel` slots take runs from one queue in the given order. For each
order and factor: when the last run ends, how many runs end before the deadline, and which iso-FLOP budgets have
every run ended by then (a whole curve).

    python benchmarks/sweep_schedule.py docs/scaling-example/gpu-iso-flop/sweep.yaml --parallel 8 --deadline 450
"""

from __future__ import annotations

import argparse
import heapq
import json
from collections import Counter
from pathlib import Path

from mixmae_scale.scaling.spec import expand, load_spec
from mixmae_scale.scaling.workers import estimated_seconds, start_order

ORDERS = {
    "start_order (budgets from the smallest, longest first in each)": start_order,
    "longest first overall": lambda run: -estimated_seconds(run),
}


def simulate(runs, order, slots: int, factor: float, deadline: float) -> dict:
    free = [(0.0, slot) for slot in range(slots)]
    ended = []
    for run in sorted(runs, key=order):
        start, slot = heapq.heappop(free)
        end = start + factor * estimated_seconds(run)
        if end <= deadline:
            ended.append(run)
        heapq.heappush(free, (end, slot))
    planned, done = Counter(r.budget for r in runs), Counter(r.budget for r in ended)
    return {"factor": factor, "last_run_ends_s": round(max(t for t, _ in free), 1), "runs_ended": len(ended),
            "whole_budgets": sorted(b for b in planned if done[b] == planned[b])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec")
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--deadline", type=float, default=450.0, help="seconds of runs before the sweep is cut")
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--out", default="benchmarks/results/sweep_schedule_gpu_iso_flop.json")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    runs = expand(spec, spec.train_samples_for_plan())  # steps and FLOPs do not depend on the lr
    rows = [{"order": name, **simulate(runs, order, args.parallel, factor, args.deadline)}
            for name, order in ORDERS.items() for factor in args.factors]
    print(f"{len(runs)} runs, {args.parallel} slots, cut at {args.deadline:.0f} s (a simulation from estimated costs)")
    print(f"{'order':<62} {'x cost':>6} {'last ends s':>11} {'ended':>5}  whole budgets")
    for row in rows:
        budgets = ", ".join(f"{b:.0e}" for b in row["whole_budgets"]) or "none"
        print(f"{row['order']:<62} {row['factor']:>6.1f} {row['last_run_ends_s']:>11.0f} {row['runs_ended']:>5}  "
              f"{budgets}")
    result = {"what": "simulated, not measured: run costs from scaling/workers.py's estimated_seconds x factor",
              "command": f"python benchmarks/sweep_schedule.py {args.spec} --parallel {args.parallel} --deadline "
                         f"{args.deadline:g}", "runs": len(runs), "slots": args.parallel,
              "deadline_s": args.deadline, "total_estimated_s": round(sum(map(estimated_seconds, runs)), 1),
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
