"""A sweep spec (YAML) and its expansion into runs with N (parameters), D (images seen) and C (FLOPs).

    name: demo-sweep
    profile: tiny                      # every run starts from this profile
    shards: demo_data/shards
    sizes:                             # named sizes or model.* overrides
      - {name: w16, model: {embed_dim: 16, num_heads: [1, 2, 4, 8]}}
      - {name: w32, model: {embed_dim: 32}}
    data_fractions: [0.5, 1.0]         # share of the training shards each run may read
    steps: [60, 120]                   # optimizer steps per run (or epochs: [...])
    seeds: [0]
    set: ["batch.micro=16"]            # overrides for every run

C = training FLOPs per image (3 x the analytic forward FLOPs, forward = 2 x multiply-accumulates)
x images seen; N counts the encoder and decoder parameters that are trained.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mixmae_scale.config import ConfigError, load_resolved
from mixmae_scale.models.flops import model_report

KNOWN_KEYS = {"name", "profile", "shards", "sizes", "data_fractions", "steps", "epochs", "seeds", "set", "probe"}


@dataclass(frozen=True)
class PlannedRun:
    run_id: str
    size: str
    data_fraction: float
    steps: int
    seed: int
    overrides: tuple[str, ...]
    params: int
    images_seen: int
    flops: float


@dataclass
class SweepSpec:
    name: str
    profile: str
    shards: str
    sizes: list[dict[str, Any]]
    data_fractions: list[float]
    steps: list[int] = field(default_factory=list)
    epochs: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: list[str] = field(default_factory=list)
    probe: bool = False


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the sweep spec: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep spec is a mapping with keys {sorted(KNOWN_KEYS)}")
    unknown = set(raw) - KNOWN_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(KNOWN_KEYS)}")
    for key in ("name", "profile", "shards", "sizes", "data_fractions"):
        if key not in raw:
            raise ConfigError(f"{path}: missing '{key}'")
    if ("steps" in raw) == ("epochs" in raw):
        raise ConfigError(f"{path}: give exactly one of 'steps' or 'epochs'")
    sizes = [s if isinstance(s, dict) else {"name": str(s), "model": {"size": str(s)}} for s in raw["sizes"]]
    for i, size in enumerate(sizes):
        if "name" not in size or not isinstance(size.get("model", {}), dict):
            raise ConfigError(f"{path}: sizes[{i}] needs a 'name' and an optional 'model' mapping, got {size}")
    fractions = [float(f) for f in raw["data_fractions"]]
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ConfigError(f"{path}: data_fractions must lie in (0, 1], got {raw['data_fractions']}")
    spec = SweepSpec(str(raw["name"]), str(raw["profile"]), str(raw["shards"]), sizes, fractions,
                     [int(s) for s in raw.get("steps", [])], [float(e) for e in raw.get("epochs", [])],
                     [int(s) for s in raw.get("seeds", [0])], [str(s) for s in raw.get("set", [])],
                     bool(raw.get("probe", False)))
    if any(s < 1 for s in spec.steps) or any(e <= 0 for e in spec.epochs):
        raise ConfigError(f"{path}: steps and epochs must be positive")
    return spec


def size_overrides(size: dict[str, Any]) -> list[str]:
    model = dict(size.get("model", {}))
    return [f"model.{k}={json.dumps(v)}" for k, v in model.items()]  # JSON values are valid YAML


def expand(spec: SweepSpec, train_samples: int) -> list[PlannedRun]:
    """Every combination of size x data fraction x budget x seed, with N, D and C."""
    runs = []
    budgets = spec.steps or spec.epochs
    for size, fraction, budget, seed in itertools.product(spec.sizes, spec.data_fractions, budgets, spec.seeds):
        overrides = (*spec.overrides, *size_overrides(size), f"run.seed={seed}", f"data.shards={spec.shards}")
        resolved = load_resolved(spec.profile, overrides=overrides, world_size=1,
                                 train_samples=max(1, int(train_samples * fraction)))
        steps = int(budget) if spec.steps else int(budget * resolved.derived.steps_per_epoch)
        report = model_report(resolved.config.model)
        images = steps * resolved.derived.global_batch
        run_id = f"{size['name']}-d{fraction:g}-s{steps}-seed{seed}"
        runs.append(PlannedRun(run_id, size["name"], fraction, steps, seed, overrides, int(report["pretrain_params"]),
                               images, float(report["train_flops_per_image"]) * images))
    return runs
