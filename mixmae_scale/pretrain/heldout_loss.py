"""The held-out reconstruction loss: fixed masks on the first batches of images training never reads (the
validation split, or a held-out tail of the train split: data/heldout.py), so that it is comparable across steps
and runs.

It is scored on whole micro-batches only. Where none fits (a validation split smaller than one micro-batch, or
`logging.heldout_batches=0`) it is null in summary.json with the reason in `heldout_not_measured` and in the log,
never 0 (which a sweep would read as a perfect model); the run itself goes ahead, as its training is sound. A
sweep refuses such a run when it reads it (scaling/run.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from mixmae_scale.config.schema import Config
from mixmae_scale.data.errors import plural
from mixmae_scale.data.heldout import HeldOut
from mixmae_scale.data.loaders import open_loader, spec_for
from mixmae_scale.engine.distributed import autocast
from mixmae_scale.seeds import stream_seed


@dataclass(frozen=True)
class HeldOutLoss:
    """A held-out reconstruction loss, or None with the reason it was not measured: a mean over no images is
    not a loss, and 0.0 would read as a perfect model."""

    loss: float | None
    images: int
    reason: str | None = None

    def text(self) -> str:
        return f"{self.loss:.4f}" if self.loss is not None else f"not measured ({self.reason})"


def heldout_shortfall(split: str, samples: int, micro: int, batches: int) -> str | None:
    """Why no held-out batch can be scored, or None. The score uses whole micro-batches of the run's size (the
    masks pair images within a batch, so a smaller batch would score another task)."""
    if batches < 1:
        return f"logging.heldout_batches={batches}"
    if samples < micro:
        return f"{split} has {plural(samples, 'image')}, fewer than one micro-batch of {micro}"
    return None


def heldout_loss(engine, config: Config, heldout: HeldOut, device: torch.device, dtype: str) -> HeldOutLoss:
    """Reconstruction loss on the first batches of the held-out images with fixed masks. Every rank scores the
    same batches (ZeRO-3 forwards are collective). A set too small to hold anything out has no loss to measure."""
    if heldout.images is None:
        return HeldOutLoss(None, 0, heldout.none_because)
    spec = spec_for(config, "heldout", config.batch.micro, engine_dtype=dtype)
    # It reads only the windows its batches need: reading ahead (two windows, epoch after epoch on a split smaller
    # than a window) read a 160-image validation split three times per rank at each score
    # (benchmarks/object_storage_resume.py).
    loader = open_loader(config, heldout.mixture, config.data.val_split, spec, config.logging.heldout_batches)
    # Closed however it ends: its reader threads hold the loader, so garbage collection never frees an abandoned one
    # (two readers and pipelines left running per run, more in an in-process sweep).
    try:
        reason = heldout_shortfall(heldout.images.split, loader.layout.length, config.batch.micro,
                                   config.logging.heldout_batches)
        if reason:
            return HeldOutLoss(None, 0, reason)
        model = engine.module
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i, batch in enumerate(itertools.islice(loader, config.logging.heldout_batches)):
                generator = torch.Generator().manual_seed(stream_seed(config.run.seed, 999, i, bits=63))
                mask = model.sample_mask(generator, device)
                with autocast(device, dtype):
                    total += float(engine(batch.images.to(device), mask=mask).loss.detach())
                count += 1
        model.train(was_training)
        return HeldOutLoss(total / count, count * config.batch.micro)
    finally:
        loader.close()
