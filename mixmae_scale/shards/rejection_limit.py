"""The ceiling on rejections: a conversion or adoption that rejects more than a fraction of what it found
exits non-zero with the counts, instead of handing training a set with a hole in it.

The default, 1%, is far above what a healthy source gives: ImageNet-1k converts with no rejection (its
CMYK and PNG files are converted, not rejected), and img2dataset writes only the images it could fetch.
A source above it has a systematic problem (a file system that went away, files without permission, a
layout the command misreads) that should be seen before training starts. Accepting the rejections costs
nothing: finished shards are kept, so the same command with a higher --max-rejected only rewrites the
manifest.
"""

from __future__ import annotations

import re
from collections import Counter

from mixmae_scale.data.errors import plural

DEFAULT_MAX_REJECTED = 0.01
# The units the sources count in, in the singular.
SINGULAR = {"files": "file", "samples (and unreadable tars)": "sample (or unreadable tar)", "tars": "tar"}


class TooManyRejected(ValueError):
    """More was rejected than --max-rejected allows; the message gives the counts and the way out."""


def _kind(reason: str) -> str:
    """The start of a reason without its specifics (names, numbers), to group the reasons in one line."""
    head = reason.split(":", 1)[0].split(" (", 1)[0]
    head = re.sub(r"\d+", "N", re.sub(r"'[^']*'", "'...'", head))
    return head if len(head) <= 60 else head[:57] + "..."


def reason_counts(reasons: list[str], top: int = 3) -> str:
    counts = Counter(_kind(r) for r in reasons).most_common()
    shown = ", ".join(f"{n} x {kind!r}" for kind, n in counts[:top])  # repr: no quotes inside quotes
    return shown + (f" and {plural(len(counts) - top, 'other reason')}" if len(counts) > top else "")


def check_rejections(what: str, found: int, reasons: list[str], max_rejected: float, rejections_file: str,
                     unit: str = "files") -> None:
    """Raises TooManyRejected when len(reasons) / found exceeds `max_rejected` (or nothing was found)."""
    check_every_split([(what, found, reasons)], max_rejected, rejections_file, unit)


def check_every_split(counts: list[tuple], max_rejected: float, rejections_file: str, unit: str = "files") -> None:
    """One TooManyRejected naming every (split, found, reasons) above `max_rejected`, so that one run tells
    the user about all of them, with the one --max-rejected that accepts them all. A split that found nothing
    is not a share of rejections (no --max-rejected would pass it): the build says it is empty. An entry may name
    its own unit as a fourth item (adoption's tars with no readable sample, a share of the split's tars)."""
    # Here, not at the top: the CLI's parser reads DEFAULT_MAX_REJECTED, and tar_index brings PIL and numpy (0.2 s)
    # into every start of the Slurm scripts' python helpers, which parse arguments with that parser.
    from mixmae_scale.shards.tar_index import KEY_APART, KEY_APART_REMEDY

    over, suggest, apart = [], 0.0, 0
    for what, found, reasons, *own in counts:
        noun = own[0] if own else unit
        rejected = len(reasons)
        if not found or rejected / found <= max_rejected:
            continue
        apart += sum(KEY_APART in reason for reason in reasons)
        grouped = f": {reason_counts(reasons)}" if reasons else ""
        if rejected >= found:
            # Accepting every rejection leaves the split empty, which the build then refuses ("no sample ... can be
            # read"): "accept them with --max-rejected 1" sent the user to a second failure.
            whole = f"every one of its {found} {noun}" if found > 1 else f"its one {SINGULAR.get(noun, noun)}"
            over.append(f"{what}: {whole} was rejected: no --max-rejected keeps any{grouped}")
            continue
        share = f"{100 * rejected / found:.1f}%"
        suggest = max(suggest, min(1.0, round(rejected / found + 0.005, 2)))
        over.append(f"{what}: {rejected} of {found} {noun} rejected ({share}), above --max-rejected {max_rejected:g}"
                    + grouped)
    if over:
        # Keys whose members are apart are not bad images: the tar's member order is, and accepting them loses
        # every such sample, so the way out is to re-tar, not to raise the ceiling.
        retar = (f". {apart} of them are keys whose members are apart in the tar: {KEY_APART_REMEDY}, and run the "
                 "same command again" if apart else "")
        accept = f", or accept them with --max-rejected {suggest:g}" if suggest else ""
        raise TooManyRejected(
            "; ".join(over) + f"; each with its reason in {rejections_file}{retar}. Fix the source and run the same "
            f"command again (finished shards are kept){accept}")
