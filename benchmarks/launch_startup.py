"""From the `deepspeed` command to the first training step, phase by phase: a 2-rank tiny pretraining launch.

Runs `deepspeed --num_gpus 2 --module ... pretrain --profile tiny` (two CPU ranks, not the quickstart's launch,
which runs the demo profile in one process; DS_ACCELERATOR=cpu, OMP_NUM_THREADS=1, ONEDNN_MAX_CPU_ISA=AVX2: a CPU
without AVX-512, so `auto` picks fp32) with `--max-steps 1`, each rank started through `launch_phases.py`, which
stamps the first call of every start-up step. Each checkout is launched twice per round:

- cold: an empty TORCH_EXTENSIONS_DIR, as on a fresh machine or clone (DeepSpeed's JIT-compiled ops are built
  then, if the code asks for any);
- warm: the same folder again, holding whatever the cold launch built.

`--before REV` also measures that commit (extracted with `git archive`), alternating with this checkout, so the
ratios compare like with like on a busy machine. Prints a table per checkout (median over rounds, rank 0's
clock; all runs in the JSON) and writes results/launch_startup.json.

    python benchmarks/launch_startup.py --before 468b657 --shards demo_data/shards
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# (row, start event or mark, end event or mark): marks are "launch" (the deepspeed command), "proc" (rank's process
# start); events are launch_phases.py's (start, end) of a first call, ".start"/".end" picks one.
PHASES = [
    ("deepspeed launcher (runner, launch.py)", "launch", "proc"),
    ("python, imports, config", "proc", "start_run.start"),
    ("init_distributed (import deepspeed, ops, gloo)", "init_distributed.start", "init_distributed.end"),
    ("data manifest, config resolve, resume plan", "init_distributed.end", "start_run.end"),
    ("model build", "build_model.start", "build_model.end"),
    ("optimizer groups", "build_optimizer.start", "build_optimizer.end"),
    ("reconstruction-grid images (DALI)", "snapshots_init.start", "snapshots_init.end"),
    ("compile setting", "compile_model.start", "compile_model.end"),
    ("deepspeed.initialize", "deepspeed_initialize.start", "deepspeed_initialize.end"),
    ("held-out loss at step 0", "heldout_loss.start", "heldout_loss.end"),
    ("first batch (train pipeline build, decode)", "heldout_loss.end", "first_loss.start"),
    ("first step (forward, backward, AdamW)", "first_loss.start", "first_step.end"),
]


def _time_of(mark: str, launch: float, record: dict) -> float | None:
    if mark == "launch":
        return launch
    if mark == "proc":
        return record["proc_start"]
    name, _, which = mark.rpartition(".")
    event = record["events"].get(name)
    return None if event is None else event[0 if which == "start" else 1]


def phases(launch: float, record: dict) -> dict[str, float]:
    out = {}
    for row, start, end in PHASES:
        a, b = _time_of(start, launch, record), _time_of(end, launch, record)
        if a is not None and b is not None:
            out[row] = b - a
    total = record["events"]["first_step"][1] - launch
    out["other (between the phases above)"] = total - sum(out.values())
    out["total: launch to end of first step"] = total
    return out


def checkout(rev: str, work: Path) -> Path:
    """Commit `rev` of this repository as files (no git metadata touched)."""
    target = work / f"src-{rev}"
    if not (target / "mixmae_scale").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def launch(root: Path, shards: Path, extensions: Path, work: Path, port: int, isa: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix="phases-", dir=work))
    run_dir = out / "run"
    env = {**os.environ, "PYTHONPATH": f"{root}:{REPO / 'benchmarks'}", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(extensions), "PHASES_OUT": str(out)}
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    deepspeed = Path(sys.executable).parent / "deepspeed"
    command = [str(deepspeed), "--num_gpus", "2", "--master_port", str(port), "--module", "launch_phases",
               "pretrain", "--profile", "tiny", "--run-dir", str(run_dir), "--max-steps", "1",
               "--set", f"data.shards={shards}", "checkpoint.at_end=false"]
    start = time.time()
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode or not (out / "rank0.json").exists():
        raise RuntimeError(f"launch in {root} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"rank0": phases(start, records[0]), "rank1": phases(start, records[1]),
            "built_ops": sorted(p.name for p in extensions.iterdir() if p.is_dir())}


def import_times(root: Path) -> dict[str, float]:
    """`python -X importtime` of what a pretraining rank imports, cumulative seconds per top-level package."""
    code = ("import mixmae_scale.cli, mixmae_scale.pretrain.job, mixmae_scale.visualize.snapshots, deepspeed, "
            "nvidia.dali")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root), "DS_ACCELERATOR": "cpu"}, check=True)
    top: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line[len("import time:"):].split("|")
        if not cumulative.strip().isdigit() or name.startswith("  "):  # nested imports are indented further
            continue
        package = name.strip().split(".")[0]
        top[package] = top.get(package, 0.0) + int(cumulative) / 1e6
    return dict(sorted(top.items(), key=lambda kv: -kv[1])[:12])


def median_rows(runs: list[dict]) -> dict[str, float]:
    rows = runs[0]["rank0"].keys()
    return {row: statistics.median(run["rank0"].get(row, 0.0) for run in runs) for row in rows}


def print_table(results: dict[str, dict[str, list[dict]]]) -> None:
    columns = [(name, kind) for name in results for kind in ("cold", "warm")]
    medians = {column: median_rows(results[column[0]][column[1]]) for column in columns}
    rows = list(dict.fromkeys(row for column in columns for row in medians[column]))
    print(f"\n{'seconds (median, rank 0)':<48}" + "".join(f"{name + ' ' + kind:>22}" for name, kind in columns))
    for row in rows:
        print(f"{row:<48}" + "".join(f"{medians[c].get(row, float('nan')):>22.2f}" for c in columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, default=REPO / "demo_data" / "shards")
    parser.add_argument("--before", help="a commit to compare with (e.g. 468b657)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--isa", default="AVX2", help="ONEDNN_MAX_CPU_ISA ('' leaves it unset)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mixmae-launch-startup")
    parser.add_argument("--out", type=Path, default=RESULTS / "launch_startup.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    shards = args.shards.resolve()
    roots = {"after": REPO}
    if args.before:
        roots = {f"before {args.before}": checkout(args.before, args.work), **roots}
    results: dict[str, dict[str, list[dict]]] = {name: {"cold": [], "warm": []} for name in roots}
    port = 29700
    for number in range(args.rounds):
        for name, root in roots.items():
            extensions = Path(tempfile.mkdtemp(prefix="torch-ext-", dir=args.work))
            for kind in ("cold", "warm"):
                port += 1
                results[name][kind].append(launch(root, shards, extensions, args.work, port, args.isa))
                total = results[name][kind][-1]["rank0"]["total: launch to end of first step"]
                print(f"round {number + 1}: {name} {kind}: {total:.1f} s to the first step", flush=True)
    print_table(results)
    imports = {name: import_times(root) for name, root in roots.items()}
    summary = {name: {kind: median_rows(runs)["total: launch to end of first step"] for kind, runs in by_kind.items()}
               for name, by_kind in results.items()}
    if args.before:
        before, after = summary[f"before {args.before}"], summary["after"]
        summary["ratio after/before"] = {kind: after[kind] / before[kind] for kind in ("cold", "warm")}
        print(f"\nafter/before, launch to first step: cold {summary['ratio after/before']['cold']:.2f}, "
              f"warm {summary['ratio after/before']['warm']:.2f}")
    result = {"benchmark": "launch_startup", "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "onednn_max_cpu_isa": args.isa, "ranks": 2, "profile": "tiny",
              "shards": str(args.shards), "rounds": args.rounds, "summary_s": summary, "runs": results,
              "import_s": imports}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
