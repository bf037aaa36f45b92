"""How a job Slurm restarts continues its run: `python -m mixmae_scale.cluster.restart <the pretrain arguments>`,
run by launch/slurm/*.sbatch when SLURM_RESTART_COUNT > 0, prints the shell lines that say what changed and set the
arguments the restarted step runs with.

A restart (a node failure, or the scripts' own `scontrol requeue`) reruns the batch script with the job's
arguments as first typed. Any that start the run anew would undo it: --overwrite moves the stopped run aside and
begins at step 0, and checkpoint.resume=none is refused on every rank over the run's checkpoints. Matching those
strings in bash missed the ways argparse and the configuration accept them (`--overw`, resume: none in a profile
or cluster file, `--set=checkpoint.resume=none`, a quoted "none"), so the decision is made on the same parse the
ranks make (`fresh_start`, which cluster/requeue.py uses too), and the rewritten arguments are parsed again to
check that they say the same but continue.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from mixmae_scale.config.load import ConfigError

CONTINUE = "checkpoint.resume=auto"


def pretrain_parser() -> argparse.ArgumentParser:
    from mixmae_scale.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices["pretrain"]


def parse(argv: list[str]) -> argparse.Namespace:
    """`mixmae pretrain <argv>` as the ranks parse it (a usage error exits 2 as theirs would, in argparse's words)."""
    from mixmae_scale.cli import build_parser

    return build_parser().parse_args(["pretrain", *argv])


def fresh_start(argv: list[str]) -> list[str]:
    """What in the job's pretrain arguments starts the run anew, as parsed (an abbreviated --overwrite included) and
    as configured (checkpoint.resume=none from the profile, the cluster file or --set): empty where nothing does."""
    from mixmae_scale.config import load_config

    args = parse(argv)
    config, _ = load_config(args.profile, args.cluster, list(args.overrides))
    return (["--overwrite"] if args.overwrite else []) + (
        ["checkpoint.resume=none"] if config.checkpoint.resume == "none" else [])


def overwrite_tokens(argv: list[str]) -> list[int]:
    """Where --overwrite stands in argv as argparse reads it: in full or as an abbreviation only it begins with."""
    options = [name for action in pretrain_parser()._actions for name in action.option_strings
               if name.startswith("--")]
    found = []
    for index, token in enumerate(argv):
        if token == "--":
            break
        if (len(token) > 2 and token.startswith("--") and "--overwrite".startswith(token)
                and [name for name in options if name.startswith(token)] == ["--overwrite"]):
            found.append(index)
    return found


def continuing(argv: list[str], given: list[str] = ()) -> tuple[list[str], list[str]]:
    """The job's arguments `argv` as a restart runs them, and what was changed, in words: --overwrite removed, and
    `--set checkpoint.resume=auto` added last (the last --set wins) where the configuration says none. `given`: the
    arguments the batch script puts before them (--profile, --cluster), read but not returned. Refuses
    (ConfigError) where the result does not parse to the same job continuing."""
    given = list(given)
    said = fresh_start(given + argv)
    kept, changes = list(argv), []
    if "--overwrite" in said:
        where = overwrite_tokens(argv)
        kept = [token for index, token in enumerate(argv) if index not in where]
        changes.append(f"dropping {' '.join(argv[i] for i in where) or '--overwrite'}")
    if "checkpoint.resume=none" in said:
        kept += ["--set", CONTINUE]
        changes.append(f"checkpoint.resume=none replaced by {CONTINUE}")
    if not said:
        return kept, changes
    before, after = vars(parse(given + argv)), vars(parse(given + kept))
    same = all(before[k] == after[k] for k in before if k not in ("overwrite", "overrides"))
    if not same or fresh_start(given + kept) or after["overrides"][:len(before["overrides"])] != before["overrides"]:
        raise ConfigError(f"Slurm restarted the job, and its arguments {shlex.join(argv)} start the run anew "
                          f"({', '.join(said)}), which could not be undone here; submit the job again without it to "
                          "continue the run")
    return kept, changes


def main(argv: list[str]) -> int:
    """argv: the batch script's own arguments (--profile, --cluster), `--`, then the job's."""
    split = argv.index("--") if "--" in argv else len(argv)
    try:
        kept, changes = continuing(argv[split + 1:], argv[:split])
    except ConfigError as exc:
        print(f"mixmae: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    restart = (f"mixmae: restart {os.environ.get('SLURM_RESTART_COUNT', '?')} of job "
               f"{os.environ.get('SLURM_JOB_ID', '?')} (Slurm requeued it)")
    for change in changes:
        print(f"echo {shlex.quote(f'{restart}: {change}, continuing the run from its last checkpoint')}")
    print(f"set -- {shlex.join(kept)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
