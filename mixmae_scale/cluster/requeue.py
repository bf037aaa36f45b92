"""Whether a Slurm job should requeue itself after its step: `python -m mixmae_scale.cluster.requeue <the pretrain
arguments>`, run by launch/slurm/*.sbatch after srun returned 0.

With `--signal=USR1@300` the ranks save and exit 0 five minutes before the time limit, so the job would end
COMPLETED with its schedule unfinished and nobody to start it again. The run folder says what happened:
`summary.json` has `stopped_by_signal: true` and `steps` below `planned_steps` after a stop on a signal, and
neither after the last step. A start that finds the run already complete under its current plan (a schedule
shortened after the stop, or a lower --max-steps) adds `complete_under_plan` to that summary
(engine/run_folder.py `note_complete`), so that the job does not requeue itself for it again.

Exit 0 (and one line saying why) means "requeue", 1 "do not": the run finished, ended at --max-steps, was found
complete by a later start, or left no summary; the job's arguments would start it anew on the requeue (--overwrite
or checkpoint.resume=none that cluster/restart.py, which the requeued script runs, cannot undo; those it drops are
requeued, as the restart continues the run), or the cycle was stopped: `MIXMAE_MAX_REQUEUES` (default 20) against
Slurm's SLURM_RESTART_COUNT caps it, and a file `NO_REQUEUE` in the run folder ends it for a job already in the
queue. A plain `scancel` ends the batch script before it gets here.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from mixmae_scale.data.errors import plural

STOP_FILE = "NO_REQUEUE"
DEFAULT_MAX_REQUEUES = 20


def decide(run_dir: Path, env: Mapping[str, str]) -> tuple[bool, str]:
    """(requeue?, why) from the run folder's summary.json and the job's restart count."""
    summary_path = run_dir / "summary.json"
    try:
        summary = json.loads(summary_path.read_text())
    except FileNotFoundError:
        return False, f"no {summary_path}: the run did not end in order, nothing to resume by requeueing"
    except (OSError, ValueError) as exc:
        return False, f"{summary_path} cannot be read ({exc}); not requeueing"
    steps, planned = summary.get("steps"), summary.get("planned_steps")
    if not summary.get("stopped_by_signal") or not isinstance(steps, int) or not isinstance(planned, int):
        return False, f"{summary_path}: the run was not stopped by a signal (steps {steps} of {planned})"
    if steps >= planned:
        return False, f"{summary_path}: the run reached its planned step {planned}"
    complete = summary.get("complete_under_plan")  # engine/run_folder.py note_complete
    if isinstance(complete, dict):
        return False, (f"{summary_path}: a later start found the run complete at step {complete.get('step')} (its "
                       f"schedule now ends at step {complete.get('planned_steps')})")
    if (run_dir / STOP_FILE).exists():
        return False, f"{run_dir / STOP_FILE} exists: requeueing stopped by hand (remove it to requeue again)"
    limit_text = env.get("MIXMAE_MAX_REQUEUES", str(DEFAULT_MAX_REQUEUES))
    restarts_text = env.get("SLURM_RESTART_COUNT", "0") or "0"
    if not limit_text.isdigit() or not restarts_text.isdigit():
        return False, (f"MIXMAE_MAX_REQUEUES={limit_text!r} / SLURM_RESTART_COUNT={restarts_text!r} is not a "
                       "count; not requeueing")
    if int(restarts_text) >= int(limit_text):
        return False, (f"stopped by a signal at step {steps} of {planned}, but the job was requeued "
                       f"{plural(int(restarts_text), 'time')} already (MIXMAE_MAX_REQUEUES={limit_text}); "
                       f"submit it again to go on")
    return True, f"stopped by a signal at step {steps} of {planned} (requeue {int(restarts_text) + 1} of {limit_text})"


def read_job(argv: list[str]) -> tuple[Path, list[str], bool]:
    """The run folder `mixmae pretrain <argv>` uses (its --run-dir, else run.output_dir/run.name), what in the
    arguments makes a start of it a new run (cluster/restart.py `fresh_start`, the ranks' own parse: an abbreviated
    --overwrite, checkpoint.resume=none from the profile, cluster file or --set; empty if nothing does), and whether
    the restart undoes it. A requeue runs the batch script with the same arguments, where --overwrite would move the
    stopped run aside and begin at step 0 again and checkpoint.resume=none is refused over the run's checkpoints;
    but the requeued script (SLURM_RESTART_COUNT > 0) runs cluster/restart.py `continuing` first, which drops the one
    and overrides the other. Only what it cannot undo keeps the job from requeueing (`sbatch ... --overwrite`, to
    replace an old run, stopped at the time limit ended its cycle there, though its requeue would have continued)."""
    from mixmae_scale.cluster.restart import continuing, fresh_start, parse
    from mixmae_scale.config import ConfigError, load_config

    args = parse(argv)
    config, _ = load_config(args.profile, args.cluster, list(args.overrides))
    run_dir = Path(args.run_dir) if args.run_dir else Path(config.run.output_dir) / config.run.name
    fresh = fresh_start(argv)
    try:
        continuing(argv)
    except ConfigError:
        return run_dir, fresh, False
    return run_dir, fresh, True


def main(argv: list[str]) -> int:
    from mixmae_scale.config import ConfigError

    try:
        run_dir, fresh, undone = read_job(argv)
    except ConfigError as exc:  # a requeue would be refused the same way on every rank
        print(f"mixmae: not requeueing: {' '.join(str(exc).split())}")
        return 1
    requeue, why = decide(run_dir, os.environ)
    if requeue and fresh and not undone:
        requeue, why = False, (f"{why.split(' (requeue')[0]}, but the job's arguments hold {' and '.join(fresh)}, "
                               "which the requeued job's restart (cluster/restart.py) cannot undo: it would start "
                               "the run anew instead of resuming it; submit the job again without it to resume")
    elif requeue and fresh:
        why += (f"; the requeued job's restart (cluster/restart.py) undoes {' and '.join(fresh)} and continues the "
                "run")
    print(f"mixmae: {'requeueing' if requeue else 'not requeueing'}: {why}")
    return 0 if requeue else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
