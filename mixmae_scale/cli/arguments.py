"""Arguments every profile-driven command shares."""

from __future__ import annotations

import argparse


def add_profile_args(parser: argparse.ArgumentParser, world_size: bool = True) -> None:
    """`world_size`: offer --world-size for the batch arithmetic (`config show`); a rank command takes its world
    size from the launcher, and offered it anyway, it was accepted and never read."""
    parser.add_argument("--profile", required=True,
                        help="a shipped profile's name (launch/profiles/ of the repository, inside the installed "
                             "package) or a YAML path, merged onto the shipped base.yaml")
    parser.add_argument("--cluster", help="cluster YAML merged after the profile")
    add_set_arg(parser)
    if world_size:
        parser.add_argument("--world-size", type=at_least(1), help="world size for the batch arithmetic "
                            "(default: cluster.num_nodes x cluster.gpus_per_node)")


def add_set_arg(parser: argparse.ArgumentParser) -> None:
    """`--set a=1 b=2` and `--set a=1 --set b=2` both work: users try the first."""
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override keys, e.g. --set optim.base_learning_rate=1e-4 batch.micro=64 "
                        "(several pairs at once, or --set repeated)")


def at_least(low: int):
    """An argparse type: an integer of at least `low`, refused by argparse with the option's name otherwise (a
    zero or negative count would divide by zero, or write one-pixel images, much later)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        return value

    return parse


def between(low: float, high: float, kind: type = float):
    """An argparse type: a number in [low, high]."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value:g} is not between {low:g} and {high:g}")
        return value

    return parse
