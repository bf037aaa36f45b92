"""Arguments every profile-driven command shares."""

from __future__ import annotations

import argparse


def add_profile_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", required=True,
                        help="a shipped profile's name (launch/profiles/ of the repository, inside the installed "
                             "package) or a YAML path, merged onto the shipped base.yaml")
    parser.add_argument("--cluster", help="cluster YAML merged after the profile")
    add_set_arg(parser)
    parser.add_argument("--world-size", type=int, help="world size for the batch arithmetic "
                        "(default: cluster.num_nodes x cluster.gpus_per_node)")


def add_set_arg(parser: argparse.ArgumentParser) -> None:
    """`--set a=1 b=2` and `--set a=1 --set b=2` both work: users try the first."""
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override keys, e.g. --set optim.base_learning_rate=1e-4 batch.micro=64 "
                        "(several pairs at once, or --set repeated)")
