"""Which samples an evaluation saw, checked against its split: a count alone passes a duplicate plus an omission.

Each sample's name (`<tar url>:<key>`, as the reader names it) maps to a 36-bit id that travels through the
decoding pipeline with its image. The ranks' sums of the ids of the samples they counted add up to the split's
own sum exactly when every sample was counted once (up to a 2^-36 chance per duplicate-omission pair). 36 bits
keep the sum of 2^27 samples inside an int64, which gloo and NCCL reduce exactly (float64 would round).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from mixmae_scale.data.shard_sets import ShardMixture

ID_BITS = 36


def sample_id(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> (64 - ID_BITS)


@dataclass(frozen=True)
class Coverage:
    """How many samples, and the sum of their ids."""

    samples: int = 0
    id_sum: int = 0

    def __add__(self, other: Coverage) -> Coverage:
        return Coverage(self.samples + other.samples, self.id_sum + other.id_sum)


def split_coverage(mixture: ShardMixture) -> Coverage:
    """The split's own coverage, from its shard indexes (what evaluation reads: every shard once, in order)."""
    from mixmae_scale.data.shard_reader import SampleSource

    visits, source = mixture.in_order(), SampleSource(mixture)
    total = Coverage()
    for visit in range(len(visits.count)):
        set_number, shard = int(visits.source[visit]), int(visits.shard[visit])
        split = mixture.sets[set_number].shards
        index, url, first = source.index(set_number, shard), split.tar_url(shard), split.first_line_of(shard)
        keys = index.keys[first:first + int(visits.count[visit])]
        total += Coverage(len(keys), sum(sample_id(f"{url}:{key}") for key in keys))
    return total


def require_each_sample_once(counted: Coverage, split: Coverage, where: str) -> None:
    """`counted`: the sums over every rank (reduced exactly: `engine.distributed.all_reduce_int`)."""
    if counted != split:
        raise RuntimeError(f"evaluation counted {counted.samples} samples of {where}, but not each of the split's "
                           f"{split.samples} once (the sums of their ids differ): a sample was counted twice and "
                           "another not at all, or one from elsewhere")
