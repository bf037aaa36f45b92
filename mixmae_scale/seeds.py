"""One seed per purpose: every random choice of a run (sample order, crops, masks, each rank's generators) is
drawn from a seed that is a pure function of what it is for, so that a resumed run or another world size draws
the same values."""

from __future__ import annotations

import hashlib


def stream_seed(*parts: int | str, bits: int = 64) -> int:
    """A `bits`-bit seed from any tuple. `bits=63` for seeds that must fit a signed 64-bit integer (the step's
    mask generator, the per-rank Python, NumPy and torch seeds); the data side uses all 64."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") % 2**bits
