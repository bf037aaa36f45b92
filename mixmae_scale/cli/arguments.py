"""Arguments every profile-driven command shares."""

from __future__ import annotations

import argparse


def add_profile_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", required=True, help="profile name under launch/profiles/ or a YAML path")
    parser.add_argument("--cluster", help="cluster YAML merged after the profile")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key, e.g. --set optim.base_learning_rate=1e-4 (repeatable)")
    parser.add_argument("--world-size", type=int, help="world size for the batch arithmetic "
                        "(default: cluster.num_nodes x cluster.gpus_per_node)")
