"""The `mixmae` command. Each subcommand parses its arguments and calls into the library, nothing more.

One module per group of subcommands, each with a `register(sub)` that adds its parsers. Heavy imports
(torch, DeepSpeed, DALI) happen inside the handlers so that `mixmae --help` and `mixmae config show`
stay fast. `python -m mixmae_scale.cli` (what the deepspeed launcher runs) is `__main__.py`.
"""

from __future__ import annotations

import argparse
import sys

from mixmae_scale import __version__
from mixmae_scale.cli import (
    cluster_commands,
    config_command,
    encoder_commands,
    inspection_commands,
    job_commands,
    model_commands,
    scaling_commands,
    shard_commands,
)

GROUPS = (config_command, model_commands, job_commands, cluster_commands, encoder_commands, inspection_commands,
          scaling_commands, shard_commands)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in `--help`, except where there is nothing to show (flags, unset options) or the
    help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == [] or default == argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixmae", description="MixMAE pretraining at cluster scale.")
    parser.add_argument("--version", action="version", version=f"mixmae-scale {__version__}")
    # The deepspeed launcher puts --local_rank before the subcommand; LOCAL_RANK in the environment wins.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    for each in all_parsers(parser):
        each.formatter_class = HelpFormatter
    return parser


def all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parser and every subcommand's parser below it."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += all_parsers(child)
    return found


def main(argv: list[str] | None = None) -> int:
    from mixmae_scale.cli import third_party_noise
    from mixmae_scale.cli.failure_report import NO_DALI, missing_dali
    from mixmae_scale.config import ConfigError

    third_party_noise.silence()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):  # no command: usage, and the exit code of a usage error
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except ModuleNotFoundError as exc:
        if not missing_dali(exc):
            raise
        print(f"mixmae: error: {NO_DALI}", file=sys.stderr)
        return 2
    except (ConfigError, ValueError, RuntimeError, OSError) as exc:
        if isinstance(exc, RuntimeError) and not type(exc).__module__.startswith("mixmae_scale."):
            raise  # torch's, DALI's (running out of memory among them) and internal checks: a failure, traced
        print(f"mixmae: error: {exc}", file=sys.stderr)
        # As the rank commands (cli/failure_report.py): a refused input exits 2; a file not found, or an output
        # that cannot be written, is a failure (1) that the same command may pass later.
        return 1 if isinstance(exc, OSError) else 2
