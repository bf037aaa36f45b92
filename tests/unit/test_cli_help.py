"""`--help` of every command: each option says what it is for, and its default."""

from __future__ import annotations

import argparse
import contextlib

from mixmae_scale.cli import all_parsers, build_parser, main


def test_every_option_of_every_command_has_a_help_line():
    missing = [f"{parser.prog} {action.option_strings or action.dest}" for parser in all_parsers(build_parser())
               for action in parser._actions
               if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
               and action.help != argparse.SUPPRESS and not (action.help or "").strip()]
    assert not missing, missing


def test_help_shows_defaults(capsys):
    with contextlib.suppress(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--batch BATCH images per rank and batch" in text and "(default: 64)" in text
    assert "(default: val)" in text and "(default: dali)" in text
    with contextlib.suppress(SystemExit):
        main(["shards", "folder", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "seed of the global shuffle (default: 0)" in text and "(default: 0.0)" in text
    assert "--strict stop at the first file that cannot be used --max" in text  # a flag shows no "default: False"


def test_bare_mixmae_prints_help_and_exits_as_a_usage_error(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: mixmae") and "pretrain" in out and "shards" in out
