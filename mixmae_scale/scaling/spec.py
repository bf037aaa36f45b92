"""A sweep spec (YAML) and its expansion into runs with N (parameters), D (images seen) and C (FLOPs).

    name: demo-sweep
    profile: tiny                      # every run starts from this profile (a name, or a YAML path)
    shards: ../demo_data/shards        # relative paths are relative to this file; an s3:// prefix works too
    sources:                           # optional: train on a mixture (data.sources); shards above is then validation
      - {shards: ../demo_data/shards, weight: 2}
      - {shards: s3://bucket/adopted-index, weight: 1}
    train_samples: 2600                # optional: the train split's size (a mixture's weighted), to plan without it
    sizes:                             # named sizes or model.* overrides
      - {name: w16, model: {embed_dim: 16, num_heads: [1, 2, 4, 8]}}
      - {name: w32, model: {embed_dim: 32}}
    data_fractions: [0.5, 1.0]         # share of the training shards each run may read (of every source's)
                                       # (a grid's; an iso-FLOP design takes one)
    steps: [60, 120]                   # a grid: optimizer steps per run (or epochs: [...])
    # or, instead of steps/epochs, an iso-FLOP design (Hoffmann et al. 2022, approach 2): every size
    # trains on each budget, its steps chosen so that it spends that many training FLOPs
    budgets: [2.0e13, 4.0e13, 8.0e13]
    # a size may name the budgets it trains on (a window of sizes per budget, as Hoffmann et al. slide
    # theirs): {name: w64, model: {...}, budgets: [4.0e13, 8.0e13]}; every budget keeps at least 3 sizes
    seeds: [0, 1]
    learning_rate:                     # how the lr follows the width (written into every run's record)
      rule: inverse_width              # muP-style: hidden matrices' lr x base_width / embed_dim
      base_width: 16
      sweep: [3.0e-3, 1.0e-2, 3.0e-2]  # base lrs tried first at the smallest size and budget; the best is kept
    cluster: {gpus_per_node: 8, max_nodes: 16}   # for --emit-commands: the world size of each run; runs on
                                       # several nodes need `file: cluster.yaml` (passed as `mixmae launch --cluster`)
    set: ["batch.micro=16"]            # overrides for every run

C = training FLOPs per image (3 x the analytic forward FLOPs, forward = 2 x multiply-accumulates)
x images seen; N counts the encoder and decoder parameters that are trained.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mixmae_scale.config import ConfigError, load_resolved
from mixmae_scale.data.errors import plural
from mixmae_scale.models.flops import model_report

KNOWN_KEYS = {"name", "profile", "shards", "sizes", "data_fractions", "steps", "epochs", "budgets", "seeds", "set",
              "probe", "learning_rate", "cluster", "train_samples", "sources"}
LR_RULES = ("fixed", "inverse_width")
BUDGET_TOLERANCE = 0.05  # an iso-FLOP run's whole steps may spend its budget this far off, no further
FEW_STEPS = 10  # fewer steps than this: a warm-up and cosine of a step or two (warned of)


@dataclass(frozen=True)
class LearningRateRule:
    """`fixed`: every size at the profile's base lr. `inverse_width`: muP-style transfer, the lr of every
    matrix whose fan-in grows with the width (optim.width_lr_base) scaled by base_width / embed_dim, the
    rest at the base lr; with `sweep`, the base lr is the best of a short sweep at the smallest scale."""

    rule: str = "fixed"
    base_width: int | None = None
    sweep: tuple[float, ...] = ()

    def overrides(self, base_lr: float | None) -> list[str]:
        sets = [f"optim.base_learning_rate={base_lr!r}"] if base_lr is not None else []
        if self.rule == "inverse_width":
            sets.append(f"optim.width_lr_base={self.base_width}")
        return sets

    def describe(self, base_lr: float | None) -> str:
        text = "fixed: every size at one base lr" if self.rule == "fixed" else (
            f"inverse_width: hidden matrices' lr x {self.base_width}/embed_dim (muP-style)")
        if self.sweep:
            text += f"; base lr chosen from the sweep {list(self.sweep)} at the smallest size and budget"
        return text + (f"; base lr {base_lr:g} per 256 images" if base_lr is not None else "")


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
    budget: float | None = None  # the iso-FLOP budget this run spends (flops differs by < one step)
    global_batch: int = 0


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
    budgets: list[float] = field(default_factory=list)
    learning_rate: LearningRateRule = field(default_factory=LearningRateRule)
    cluster: dict[str, Any] = field(default_factory=lambda: {"gpus_per_node": 8, "max_nodes": 16})
    train_samples: int | None = None  # recorded in the spec: plans without the shards
    sources: list[dict[str, Any]] = field(default_factory=list)  # a training mixture: {shards, weight, split}
    file: str | None = None  # the spec's path, for the refusals that come after loading (`expand`)

    def train_samples_for_plan(self, given: int | None = None, option: str | None = "--train-samples") -> int:
        """The training split's size for planning: `given` (--train-samples), else the shards' manifest, else
        the count recorded in the spec; the shards are needed only when neither is there. `option`: the command's
        flag for it, named in the refusal; `scaling run` has none (its count must be the same when its lines are
        written and when their folders are read back: the spec's), and told of `scaling plan`'s, its user had no
        way to give it."""
        from mixmae_scale.data.manifest import DataError, load_split

        if given is not None:
            return given
        try:
            if self.sources:
                return round(sum(s["weight"] * load_split(s["shards"], s.get("split") or "train").samples
                                 for s in self.sources))
            return load_split(self.shards, "train").samples
        except DataError as exc:
            if self.train_samples is not None:
                return self.train_samples
            problem = (f"the sweep spec's shards folder {self.shards} does not exist" if not Path(self.shards).is_dir()
                       else str(exc))
            how = f"give {option} N or record" if option else "record"
            weighted = " (with sources: each set's count times its weight, summed)" if self.sources else ""
            where = f" {self.file}" if self.file else ""
            raise ConfigError(f"{problem}; to plan without the shards {how} 'train_samples: N' in the sweep "
                              f"spec{where}, the training split's sample count{weighted}") from None


def _beside(spec_path: Path, value: str) -> str:
    """A path written in a spec means the same wherever the command is run: relative to the spec file. An
    s3:// prefix stays as it is."""
    if value.startswith("s3://"):
        return value
    path = Path(value).expanduser()
    return os.path.normpath(path if path.is_absolute() else spec_path.absolute().parent / path)


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        # README's example spec is in the repository's docs/, which the wheel does not ship (it is no package data).
        raise ConfigError(f"sweep spec {path}: not found (tried {path.absolute()}): write a spec of your own (its "
                          "keys: docs/scaling.md, 'The spec'), or copy docs/scaling-example/sweep.yaml from the "
                          "repository: a pip install has no docs/ folder")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path.absolute()}: cannot read the sweep spec: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep spec is a mapping with keys {sorted(KNOWN_KEYS)}")
    _unknown_keys(path, "the spec", raw, KNOWN_KEYS)
    for key in ("name", "profile", "shards", "sizes", "data_fractions"):
        if key not in raw:
            raise ConfigError(f"{path}: missing '{key}'")
    if sum(key in raw for key in ("steps", "epochs", "budgets")) != 1:
        raise ConfigError(f"{path}: give exactly one of 'steps' or 'epochs' (a grid) or 'budgets' (iso-FLOP)")
    sizes = [s if isinstance(s, dict) else {"name": str(s), "model": {"size": str(s)}}
             for s in _listed(path, raw, "sizes", object)]
    for i, size in enumerate(sizes):
        _unknown_keys(path, f"sizes[{i}]" + (f" ({size['name']})" if "name" in size else ""), size,
                      {"name", "model", "budgets"})
        if "name" not in size or not isinstance(size.get("model", {}), dict) or set(size) - {"name", "model",
                                                                                              "budgets"}:
            raise ConfigError(f"{path}: sizes[{i}] needs a 'name', an optional 'model' mapping and optional "
                              f"'budgets', got {size}")
    names = [str(size.get("name")) for size in sizes]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: size names repeat ({', '.join(sorted({n for n in names if names.count(n) > 1}))}):"
                          " each names its runs and their folders")
    fractions = _listed(path, raw, "data_fractions", float, unique=True)
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ConfigError(f"{path}: data_fractions must lie in (0, 1], got {raw['data_fractions']}")
    if "budgets" in raw and len(fractions) > 1:
        raise ConfigError(f"{path}: data_fractions {fractions}: an iso-FLOP design (budgets) takes one data fraction; "
                          "its fit pools a budget's runs of one size as seeds, so runs on two fractions would count as "
                          "two seeds of one point. Run one spec per fraction, each with its own --out")
    profile = str(raw["profile"])
    if Path(profile).suffix in (".yaml", ".yml"):
        profile = _beside(path, profile)
    train_samples = raw.get("train_samples")
    if train_samples is not None and (not _integer(train_samples) or train_samples < 1):
        raise ConfigError(f"{path}: train_samples must be a positive integer, got {train_samples!r}")
    probe = raw.get("probe", False)
    if not isinstance(probe, bool):  # bool('no') is True: a quoted 'no' probed every run
        raise ConfigError(f"{path}: 'probe' must be true or false, got {probe!r}")
    spec = SweepSpec(str(raw["name"]), profile, _beside(path, str(raw["shards"])), sizes, fractions,
                     _listed(path, raw, "steps", int, [], unique=True),
                     _listed(path, raw, "epochs", float, [], unique=True),
                     _listed(path, raw, "seeds", int, [0], unique=True), _listed(path, raw, "set", str, []),
                     probe, _listed(path, raw, "budgets", float, [], unique=True),
                     _lr_rule(path, raw.get("learning_rate", {})), _cluster(path, raw.get("cluster", {})),
                     train_samples, _sources(path, raw.get("sources", [])), str(path))
    for key in ("steps", "epochs", "budgets"):
        _finite_above_zero(path, key, getattr(spec, key))
    _check_size_budgets(path, spec)
    return spec


def _integer(value: Any) -> bool:
    """An int written as one: YAML's true is an int to Python, and was taken as 1."""
    return isinstance(value, int) and not isinstance(value, bool)


def _listed(path: Path, raw: dict[str, Any], key: str, kind: type, default: list | None = None,
            name: str | None = None, unique: bool = False) -> list:
    """`key`'s non-empty list, each entry of `kind` (an int must be written as one: 40.7 steps is not 40); `name`:
    the key as the spec writes it (learning_rate.sweep). `unique`: an entry written twice would plan the same runs
    twice under one run id, and the second would be skipped as done or run into the first's folder."""
    name = name or key
    if key not in raw:
        return list(default or [])
    value = raw[key]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{path}: '{name}' must be a non-empty list, e.g. {name}: [{_example(kind)}], got "
                          f"{value!r}")
    accepted = {object: object, str: str, int: int, float: int | float}[kind]
    out = []
    for entry in value:
        if kind is float and isinstance(entry, str):  # YAML reads 1.0e12 (no sign after the e) as a string
            with contextlib.suppress(ValueError):
                entry = float(entry)
        if not isinstance(entry, accepted) or (kind is not object and isinstance(entry, bool)):
            raise ConfigError(f"{path}: '{name}' holds {entry!r}, not {_example(kind, named=True)}")
        out.append(float(entry) if kind is float else entry)
    repeated = sorted({repr(v) for v in out if out.count(v) > 1})
    if unique and repeated:
        raise ConfigError(f"{path}: '{name}' repeats {', '.join(repeated)}: each entry plans runs of their own")
    return out


def _finite_above_zero(path: Path, key: str, values: list | tuple) -> None:
    """YAML's .nan passed `value <= 0` and reached `expand` as a ValueError about integers, .inf as an OverflowError;
    a NaN lr was planned."""
    for value in values:
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{path}: '{key}' holds {value!r}: each must be a finite number above zero")


def _example(kind: type, named: bool = False) -> str:
    words = {int: ("1000", "an integer"), float: ("0.5", "a number"), str: ('"zero.stage=1"', "a string"),
             object: ("{name: w8, model: {embed_dim: 8}}", "a size")}
    return words[kind][named]


def _same_budget(a: float, b: float) -> bool:
    return abs(float(a) - float(b)) <= 1e-9 * float(b)


def size_trains_on(size: dict[str, Any], budget: float) -> bool:
    return "budgets" not in size or any(_same_budget(b, budget) for b in size["budgets"])


def _check_size_budgets(path: Path, spec: SweepSpec) -> None:
    """A size's own `budgets` must be budgets of the spec, and every budget needs 3 sizes for its parabola."""
    for number, size in enumerate(spec.sizes):
        if "budgets" not in size:
            continue
        if not spec.budgets:
            raise ConfigError(f"{path}: size {size['name']!r} lists budgets, but the spec has no 'budgets' "
                              "(per-size budgets belong to an iso-FLOP design)")
        own = _listed(path, size, "budgets", float, name=f"sizes[{number}].budgets", unique=True)
        if any(not any(_same_budget(b, c) for c in spec.budgets) for b in own):
            raise ConfigError(f"{path}: size {size['name']!r} budgets must be a non-empty list drawn from the "
                              f"spec's budgets {spec.budgets}, got {size['budgets']!r}")
        size["budgets"] = own
    for budget in spec.budgets:
        count = sum(size_trains_on(size, budget) for size in spec.sizes)
        if count < 3:
            raise ConfigError(f"{path}: budget {budget:.3g} has {plural(count, 'size')} training on it; its iso-FLOP "
                              "parabola needs at least 3")


def _sources(path: Path, raw: Any) -> list[dict[str, Any]]:
    """A training mixture: each entry a shard set (folder or s3://, relative to the spec), its weight, its split."""
    for number, entry in enumerate(raw if isinstance(raw, list) else []):
        _unknown_keys(path, f"sources[{number}]", entry, {"shards", "weight", "split"})
    if not isinstance(raw, list) or any(not isinstance(s, dict) or "shards" not in s or set(s) - {"shards", "weight",
                                                                                                  "split"}
                                        for s in raw):
        raise ConfigError(f"{path}: sources is a list of {{shards, weight, split}} mappings (shards required), got "
                          f"{raw!r}")
    out = []
    for entry in raw:
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, int | float) or isinstance(weight, bool) or weight <= 0:
            raise ConfigError(f"{path}: sources weight must be a positive number, got {weight!r}")
        out.append({"shards": _beside(path, str(entry["shards"])), "weight": float(weight),
                    **({"split": str(entry["split"])} if entry.get("split") else {})})
    return out


def _unknown_keys(path: Path, where: str, raw: Any, known: set[str]) -> None:
    """A misspelt key inside a section is named, with the nearest known one: the section's whole mapping printed
    back (its keys' values and all) left the user to find the misspelling by eye."""
    if not isinstance(raw, dict):
        return
    unknown = sorted(str(k) for k in set(raw) - known)
    if not unknown:
        return
    named = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        named.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    raise ConfigError(f"{path}: {where}: unknown {'key' if len(unknown) == 1 else 'keys'} {', '.join(named)}; its "
                      f"keys are {', '.join(sorted(known))}")


def _lr_rule(path: Path, raw: Any) -> LearningRateRule:
    _unknown_keys(path, "learning_rate", raw, {"rule", "base_width", "sweep"})
    if not isinstance(raw, dict) or set(raw) - {"rule", "base_width", "sweep"}:
        raise ConfigError(f"{path}: learning_rate is a mapping with keys rule, base_width, sweep; got {raw!r}")
    rule = str(raw.get("rule", "fixed"))
    if rule not in LR_RULES:
        raise ConfigError(f"{path}: learning_rate.rule must be one of {list(LR_RULES)}, got {rule!r}")
    base_width = raw.get("base_width")
    if rule == "inverse_width" and (not _integer(base_width) or base_width < 1):
        raise ConfigError(f"{path}: learning_rate.rule inverse_width needs base_width, a positive integer (the "
                          f"embed_dim whose lr the sweep sets), got {base_width!r}")
    sweep = tuple(_listed(path, raw, "sweep", float, [], name="learning_rate.sweep", unique=True))
    _finite_above_zero(path, "learning_rate.sweep", sweep)
    return LearningRateRule(rule, base_width, sweep)


def _cluster(path: Path, raw: Any) -> dict[str, Any]:
    _unknown_keys(path, "cluster", raw, {"gpus_per_node", "max_nodes", "file"})
    counts = {k: v for k, v in raw.items() if k != "file"} if isinstance(raw, dict) else None
    if counts is None or set(counts) - {"gpus_per_node", "max_nodes"} or not isinstance(raw.get("file", ""), str):
        raise ConfigError(f"{path}: cluster is a mapping of gpus_per_node and max_nodes (positive integers) and "
                          f"optionally file (a cluster file, as for `mixmae launch --cluster`), got {raw!r}")
    for key, value in counts.items():
        if not _integer(value) or value < 1:
            raise ConfigError(f"{path}: cluster.{key} must be a positive integer, got {value!r}")
    cluster: dict[str, Any] = {"gpus_per_node": 8, "max_nodes": 16, **counts}
    if raw.get("file"):
        cluster["file"] = _beside(path, raw["file"])
    return cluster


def size_overrides(size: dict[str, Any]) -> list[str]:
    model = dict(size.get("model", {}))
    return [f"model.{k}={json.dumps(v)}" for k, v in model.items()]  # JSON values are valid YAML


def _whose(spec: SweepSpec, size: dict[str, Any], exc: ConfigError) -> str:
    """The spec's entry a refused setting is in: `set:` where its entries alone give the same refusal (a misspelt key
    there was named as the first size's), else the size."""
    try:
        load_resolved(spec.profile, overrides=list(spec.overrides), world_size=1)
    except ConfigError as alone:
        if str(alone) == str(exc):
            return "set"
    return f"sizes[{spec.sizes.index(size)}] ({size['name']})"


def expand(spec: SweepSpec, train_samples: int, base_lr: float | None = None) -> list[PlannedRun]:
    """Every combination of size x data fraction x budget x seed, with N, D and C. In iso-FLOP mode each run's
    steps are the budget over (training FLOPs per image x global batch), rounded to whole steps."""
    runs = []
    budgets = spec.steps or spec.epochs or spec.budgets
    lr_sets = spec.learning_rate.overrides(base_lr)
    made: dict[str, tuple[float, float]] = {}  # run id -> the (data fraction, budget or steps) it came from
    models: dict[str, str] = {}  # size name -> its resolved model, as JSON
    for size, fraction, budget, seed in itertools.product(spec.sizes, spec.data_fractions, budgets, spec.seeds):
        if spec.budgets and not size_trains_on(size, budget):
            continue
        overrides = (*spec.overrides, *size_overrides(size), *lr_sets, f"run.seed={seed}", f"data.shards={spec.shards}")
        try:
            resolved = load_resolved(spec.profile, overrides=overrides, world_size=1,
                                     train_samples=max(1, int(train_samples * fraction)))
        except ConfigError as exc:  # it named the config key, not the spec or which of its sizes
            raise ConfigError(f"{spec.file or 'the sweep spec'}: {_whose(spec, size, exc)}: {exc}") from None
        _refuse_same_model(spec, size["name"], resolved.config.model, models)
        report = _model_report(resolved.config.model)
        per_image = float(report["train_flops_per_image"])
        batch = resolved.derived.global_batch
        if spec.budgets:
            steps = max(1, round(budget / (per_image * batch)))
            run_id = f"{size['name']}-C{budget:.3g}-seed{seed}"
        else:
            steps = int(budget) if spec.steps else int(budget * resolved.derived.steps_per_epoch)
            run_id = f"{size['name']}-d{fraction:g}-s{steps}-seed{seed}"
        if run_id in made:
            _refuse_same_id(spec, run_id, made[run_id], (fraction, budget))
        made[run_id] = (fraction, budget)
        images = steps * batch
        runs.append(PlannedRun(run_id, size["name"], fraction, steps, seed, overrides, int(report["pretrain_params"]),
                               images, per_image * images, float(budget) if spec.budgets else None, batch))
    return runs


_REPORTS: dict[str, dict[str, float | int | str]] = {}


def _model_report(model: object) -> dict[str, float | int | str]:
    """`model_report` once per resolved model: it builds the model (on the meta device) to count its parameters,
    0.05-0.1 s a build, and a sweep expands its spec several times over (the lr sweep, the study, each pass), each
    size for every budget and seed; a unit test of a sweep built 46 models for 3 sizes. The counts depend on the
    model settings alone."""
    key = json.dumps(asdict(model), sort_keys=True, default=str)
    if key not in _REPORTS:
        _REPORTS[key] = model_report(model)
    return _REPORTS[key]


def _refuse_same_model(spec: SweepSpec, name: str, model: object, models: dict[str, str]) -> None:
    """Two names for one model: `load_spec` counted them as two of a budget's sizes, the runs ran, and the iso-FLOP fit
    (sizes told by N) found one size fewer, leaving a budget of 3 names out after its compute was spent."""
    models.setdefault(name, json.dumps(asdict(model), sort_keys=True, default=str))
    twin = next((other for other, kept in models.items() if other != name and kept == models[name]), None)
    if twin is not None:
        raise ConfigError(f"{spec.file or 'the sweep spec'}: sizes {twin} and {name} give the same model "
                          "(every model.* setting equal once resolved): one size trained twice under two names is no "
                          "size of its own; remove one, or change its model")


def _refuse_same_id(spec: SweepSpec, run_id: str, first: tuple[float, float], second: tuple[float, float]) -> None:
    """Two planned runs under one id: the second would be skipped as done, or run into the first's folder. An id
    shows a budget to 3 significant digits, a fraction to 6, and a grid's steps, which two epochs can share."""
    key = "data_fractions" if first[0] != second[0] else next(k for k in ("steps", "epochs", "budgets") if
                                                               getattr(spec, k))
    values = [first[0], second[0]] if key == "data_fractions" else [first[1], second[1]]
    raise ConfigError(f"{spec.file or 'the sweep spec'}: {key} {values[0]!r} and {values[1]!r} give the same run id "
                      f"{run_id}, which names a run's row and folder: make them differ "
                      f"{'in their first 3 significant digits' if key == 'budgets' else 'by more'}")


def budget_problems(runs: list[PlannedRun]) -> tuple[list[str], list[str]]:
    """(iso-FLOP runs whose whole steps spend more than BUDGET_TOLERANCE off their budget, runs of fewer than
    FEW_STEPS steps). A large size at a small budget takes a step or two, and rounding them spent 70% or 130% of
    the budget without a word: its point then sits in that budget's parabola at another compute."""
    off, few = [], []
    for run in runs:
        if run.budget is None:
            continue
        ratio = run.flops / run.budget
        said = (f"{run.run_id} (size {run.size} at budget {run.budget:.3g}): {plural(run.steps, 'step')} of "
                f"{run.flops / run.steps:.3g} FLOPs spend {ratio:.2f}x the budget")
        if abs(ratio - 1) > BUDGET_TOLERANCE:
            off.append(said)
        elif run.steps < FEW_STEPS:
            few.append(f"{said}, in fewer than {FEW_STEPS} steps")
    return off, few


def check_budgets(spec: SweepSpec, runs: list[PlannedRun], log) -> None:
    """`scaling run` refuses runs off their budget before any run starts (the lr sweep's included) and says
    which take very few steps."""
    off, few = budget_problems(runs)
    for line in few:
        log(f"warning: {line}")
    if off:
        raise ConfigError(f"{spec.file or 'the sweep spec'}: {plural(len(off), 'iso-FLOP run')} would spend more than "
                          f"{BUDGET_TOLERANCE:.0%} off their budget in whole steps: {'; '.join(off)}. Leave those "
                          "budgets out of the size's own list (sizes[i].budgets), or give the runs a smaller global "
                          "batch so that they take more steps; `mixmae scaling plan` lists every run")
