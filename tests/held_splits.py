"""Whole splits in memory, for the tests that compare the probe's streamed reading with something held: the probe
itself never holds one (finetune/probe.py reads and encodes a batch at a time), so this is not the library's."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mixmae_scale.finetune.probe import Split, read_batches


def load_images(shards: str, split: str, img_size: int, batch: int, backend: str, threads: int,
                max_samples: int | None = None) -> Split:
    """A whole split as eval-transformed tensors (or its first `max_samples` in shard order), joined from the
    probe's own `read_batches`."""
    images, labels = zip(*read_batches(shards, split, img_size, batch, backend, threads, max_samples), strict=True)
    return torch.cat(images), torch.cat(labels)


def in_batches(split: Split, batch: int) -> Iterator[Split]:
    """A split held in memory, `batch` images at a time, as `read_batches` yields one read from shards."""
    images, labels = split
    for i in range(0, len(images), batch):
        yield images[i:i + batch], labels[i:i + batch]
