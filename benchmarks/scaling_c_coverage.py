"""How often L(C)'s 5-95% intervals miss the truth on an exact law: a simulation on synthetic sweeps, not a
measurement of training. Each sweep puts L = 0.5 + 3e4 C^-0.3 at compute levels spread over C = 1e14-1e18, 2 seeds
each, 0.3% noise; `fit_compute` with 100 resamples fits it. A 5-95% interval should miss about 10% of the time.

    python benchmarks/scaling_c_coverage.py --sweeps 100
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mixmae_scale.atomic_file import write_text
from mixmae_scale.scaling.fit import BOOTSTRAP_METHOD, compute_law, fit_compute

TRUTH = {"E": 0.5, "A": 3.0e4, "alpha": 0.3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweeps", type=int, default=100)
    parser.add_argument("--bootstrap", type=int, default=100)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "scaling_c_coverage.json"))
    args = parser.parse_args()
    results = []
    for levels in (4, 8):
        start = time.time()
        c = np.repeat(np.logspace(14, 18, levels), 2)
        missed, identified, identified_missed = (dict.fromkeys(TRUTH, 0) for _ in range(3))
        for i in range(args.sweeps):
            rng = np.random.default_rng(3000 + i)
            loss = compute_law(c, *TRUTH.values()) * (1 + 0.003 * rng.standard_normal(len(c)))
            fit = fit_compute(c, loss, bootstrap=args.bootstrap, seed=i)
            verdicts = fit.verdicts()
            for name, value in TRUTH.items():
                interval = fit.intervals[name]
                miss = interval is None or not interval[0] <= value <= interval[1]
                missed[name] += miss
                identified[name] += verdicts[name] == "identified"
                identified_missed[name] += miss and verdicts[name] == "identified"
        results.append({"levels": levels, "sweeps": args.sweeps, "truth_outside_5_95": missed,
                        "identified": identified, "identified_with_truth_outside_5_95": identified_missed,
                        "seconds": round(time.time() - start, 1)})
        print(f"{levels} levels: truth outside 5-95% {missed} of {args.sweeps}; identified {identified}", flush=True)
    write_text(args.out, json.dumps({"method": BOOTSTRAP_METHOD, "truth": TRUTH, "seeds": 2, "noise": 0.003,
                                     "bootstrap": args.bootstrap, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
