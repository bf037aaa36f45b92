"""Synthetic iso-FLOP sweeps whose optimum is known: what the fit's verdicts are checked against
(tests/unit/test_isoflop.py, benchmarks/scaling_line_check.py), never results of training."""

from __future__ import annotations

import numpy as np

FACTORS = (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8)  # sizes as factors of each budget's optimum
FLOPS_PER_PARAMETER_IMAGE = 6.0


def bent_power_law_sweep(offsets, budgets=(1e12, 1e13, 1e14), seeds: int = 2, noise: float = 0.003,
                         seed: int = 0) -> list[dict]:
    """Each budget's loss a parabola in log N about N* = 1e5 (C / 1e12)^0.5 x its offset, with relative noise per
    run: offsets of 1 put the minima on a power law (only seed noise is left), others put them off it."""
    rng = np.random.default_rng(seed)
    rows = []
    for c, offset in zip(budgets, offsets, strict=True):
        n_star = 1e5 * (c / 1e12) ** 0.5 * offset
        for factor in FACTORS:
            for s in range(seeds):
                loss = (0.4 + 2.0 * c**-0.05 + 0.02 * np.log(factor) ** 2) * (1 + noise * rng.standard_normal())
                rows.append({"budget": c, "params": int(n_star * factor), "flops": c, "heldout_loss": loss, "seed": s,
                             "images_seen": int(c / (FLOPS_PER_PARAMETER_IMAGE * n_star * factor)),
                             "run_id": f"{c:g}-{factor:g}-{s}"})
    return rows
