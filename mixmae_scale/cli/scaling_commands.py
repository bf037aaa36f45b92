"""`mixmae scaling plan|run|fit|report`: scaling-law sweeps."""

from __future__ import annotations

import argparse
import json
import sys

from mixmae_scale.cli.arguments import at_least


def _scaling(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mixmae_scale.data.errors import plural
    from mixmae_scale.scaling.spec import BUDGET_TOLERANCE, budget_problems, expand, load_spec

    if args.scaling_command == "plan":
        spec = load_spec(args.spec)
        runs = expand(spec, spec.train_samples_for_plan(args.train_samples))
        print(f"{'run':<30}{'N':>12}{'steps':>8}{'D (images)':>12}{'C (FLOPs)':>12}{'budget':>10}")
        for run in runs:
            budget = f"{run.budget:.3g}" if run.budget else "-"
            print(f"{run.run_id:<30}{run.params:>12,}{run.steps:>8}{run.images_seen:>12,}{run.flops:>12.3g}"
                  f"{budget:>10}")
        print(f"{plural(len(runs), 'run')}, {sum(r.flops for r in runs):.3g} training FLOPs in total; learning rate: "
              f"{spec.learning_rate.describe(None)}")
        off, few = budget_problems(runs)  # said here, refused by `scaling run`: the table shows what to change
        for line in off:
            print(f"mixmae: warning: {line}: more than {BUDGET_TOLERANCE:.0%} off; `mixmae scaling run` refuses it",
                  file=sys.stderr)
        for line in few:
            print(f"mixmae: warning: {line}", file=sys.stderr)
        return 0
    out = Path(args.out)
    if args.scaling_command == "run":
        if args.dry_run:
            from mixmae_scale.config import ConfigError
            from mixmae_scale.scaling.dry_run import dry_run

            if args.emit_commands:
                raise ConfigError("--dry-run and --emit-commands: give one (the dry run lists the runs "
                                 "and their estimated time, --emit-commands writes their launch lines)")
            dry_run(load_spec(args.spec), out, parallel=args.parallel)
            return 0
        from mixmae_scale.scaling.run import run_sweep

        run_sweep(load_spec(args.spec), out, Path(args.emit_commands) if args.emit_commands else None,
                  parallel=args.parallel, per_process=args.runs_per_process)
        return 0
    from mixmae_scale.scaling.report import (
        fit_results,
        provenance_warnings,
        read_results,
        results_file,
        write_fit,
        write_report,
    )
    from mixmae_scale.scaling.sweep_plan import PLAN, missing_line, rows_of_plan

    results = out / "results.jsonl"
    selection = rows_of_plan(read_results(results), out)  # the spec's runs, as `scaling run` planned
    rows = selection.rows
    for warning in [*selection.warnings, *provenance_warnings(rows)]:
        print(f"mixmae: warning: {warning}", file=sys.stderr)
    fit = fit_results(rows, bootstrap=args.bootstrap, seed=args.seed)
    if selection.left_out:
        fit["not_in_plan"] = {"plan": str(out / PLAN), "runs": selection.left_out}
    if selection.missing:
        fit["not_recorded"] = {"plan": str(out / PLAN), "runs": selection.missing,
                               "said": missing_line(selection.missing, selection.planned)}
    fit["results"] = results_file(results, out)  # fit.json's source, named as from its own folder
    write_fit(fit, out / "fit.json")
    if args.scaling_command == "report":
        print(f"report: {write_report(rows, fit, Path(args.report_dir or out / 'report'), results)}")
    else:
        print(json.dumps(fit, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    scaling = sub.add_parser("scaling", help="scaling-law sweeps: plan, run, fit, report")
    scaling_sub = scaling.add_subparsers(dest="scaling_command", metavar="ACTION", required=True)
    for action, text in (("plan", "expand a sweep spec into runs with N, D and C"),
                         ("run", "run the sweep here, one run after another (finished runs are skipped)"),
                         ("fit", "fit L(C) and L(N, D) to results.jsonl"),
                         ("report", "fit, then write figures and a Markdown report")):
        p = scaling_sub.add_parser(action, help=text)
        if action in ("plan", "run"):
            p.add_argument("spec", help="sweep spec YAML (its relative paths are relative to it)")
        if action == "plan":
            p.add_argument("--train-samples", type=at_least(1), help="the training split's size, to plan without "
                           "the shards (default: their manifest's count, else the spec's train_samples)")
        else:
            p.add_argument("--out", default="runs/scaling", help="sweep folder (results.jsonl, runs/, report/)")
        if action == "run":
            p.add_argument("--emit-commands", help="write one `mixmae launch` line per run (with its world size) "
                           "instead of running")
            p.add_argument("--dry-run", action="store_true",
                           help="list each run and what the sweep would do with it (skip, read, resume, run) and "
                                "estimate the time left from runs measured in --out; train and write nothing")
            p.add_argument("--parallel", type=at_least(1), default=1,
                           help="runs at a time sharing this machine's device: the CPU cores shared out, or one GPU, "
                                "their planned peak memory checked against it")
            p.add_argument("--runs-per-process", type=at_least(1), default=1, metavar="K",
                           help="each process runs up to K runs in turn, started once (saves torch/DeepSpeed start-up "
                           "per run; results are those of separate runs)")
        if action in ("fit", "report"):
            p.add_argument("--bootstrap", type=at_least(0), default=200,
                           help="bootstrap resamples for the 5-95%% intervals (0: none; the iso-FLOP fits draw at "
                           "least 200)")
            p.add_argument("--seed", type=int, default=0, help="seeds every bootstrap: the same results and seed "
                           "give the same fit.json and report")
        if action == "report":
            p.add_argument("--report-dir", help="where report.md and the figures go (default: OUT/report)")
        p.set_defaults(handler=_scaling)
