"""A sample's `cls` member: the one parser adoption, verification and the training reader share.

A class index is plain ASCII decimal digits (surrounding whitespace allowed: many writers end it with a newline),
or -1, `mixmae shards`' own mark for an unlabeled image. Python's int() accepts more: "-3" (adoption counted it as
unlabeled, training read it as class -3), "1_000" (read as 1000), "+7", non-ASCII digits. Those are refused."""

from __future__ import annotations

import re

UNLABELED = -1
_INDEX = re.compile(rb"[0-9]+")


def parse_cls(data: bytes) -> int:
    """The class index in `data`, or UNLABELED for b"-1"; ValueError naming the value and what is expected."""
    text = data.strip(b" \t\r\n")
    if text == b"-1":
        return UNLABELED
    if not _INDEX.fullmatch(text):
        raise ValueError(f"cls {data[:32]!r} is not a class index: plain decimal digits 0-9 (or -1 for no label) "
                         "are expected, without sign, underscores or other characters")
    return int(text)
