"""How often the L(C) extrapolation check's 5-95% error interval excludes 0 on an exact law: a simulation on
synthetic sweeps, not a measurement of training. Each sweep puts L = 0.5 + 3e4 C^-0.3 (scaling_c_coverage.py's law)
at 6 or 8 compute levels over C = 1e14-1e18, 2 seeds each, 0.3% noise; `extrapolation_error` holds out the 2 largest
levels and draws 100 rounds. On an exact law the interval should exclude 0 about 1 time in 10; the error's size
alone (median, 90th percentile) is what noise gives, for reading the check's "max, mean" without an interval.

    python benchmarks/scaling_c_check_coverage.py --sweeps 100
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mixmae_scale.atomic_file import write_text
from mixmae_scale.scaling.fit import compute_law, extrapolation_error

TRUTH = {"E": 0.5, "A": 3.0e4, "alpha": 0.3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweeps", type=int, default=100)
    parser.add_argument("--bootstrap", type=int, default=100)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scaling_c_check_coverage.json"))
    args = parser.parse_args()
    results = []
    for levels in (6, 8):
        start = time.time()
        c = np.repeat(np.logspace(14, 18, levels), 2)
        groups = np.repeat(np.arange(levels), 2)
        excludes, with_interval, sizes = 0, 0, []
        for i in range(args.sweeps):
            rng = np.random.default_rng(4000 + i)
            loss = compute_law(c, *TRUTH.values()) * (1 + 0.003 * rng.standard_normal(len(c)))
            check = extrapolation_error(c, loss, 2, groups, rounds=args.bootstrap, seed=i)
            sizes.append(check["mean_relative_error"])
            if check["mean_error_5_95"] is not None:
                with_interval += 1
                low, high = check["mean_error_5_95"]
                excludes += not low <= 0 <= high
        results.append({"levels": levels, "sweeps": args.sweeps, "with_interval": with_interval,
                        "interval_excludes_0": excludes, "mean_relative_error_median": float(np.median(sizes)),
                        "mean_relative_error_p90": float(np.quantile(sizes, 0.9)),
                        "seconds": round(time.time() - start, 1)})
        print(f"{levels} levels: the error's 5-95% excludes 0 in {excludes} of {with_interval}; mean |error| median "
              f"{100 * np.median(sizes):.2f}%, 90th percentile {100 * np.quantile(sizes, 0.9):.2f}%", flush=True)
    write_text(args.out, json.dumps({"truth": TRUTH, "seeds": 2, "noise": 0.003, "holdout_levels": 2,
                                     "bootstrap": args.bootstrap, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
