"""Reconstruction grids written during pretraining: fixed validation images and a fixed mask, as PNG
files in the run folder and images in TensorBoard (and W&B, with logging.wandb), so that runs and steps
compare picture to picture.

The pretraining job takes this as a callback (`ReconstructionSnapshots(config, root, rank, device, images)`,
then `.write(model, step)`), so the engine package never imports the visualisation one. `images`: the run's
held-out images (the validation split, or the train split's held-out tail: data/heldout.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mixmae_scale.config.schema import Config
from mixmae_scale.data.heldout import GRID_IMAGES
from mixmae_scale.data.shard_sets import ShardMixture
from mixmae_scale.engine.wandb_sink import log_image
from mixmae_scale.seeds import stream_seed
from mixmae_scale.visualize.reconstruction import first_images, grid, reconstruct, save_png, where

log = logging.getLogger("mixmae.visualize")


class ReconstructionSnapshots:
    """Every rank runs the forward (ZeRO-3 gathers weights collectively); rank 0 writes."""

    def __init__(self, config: Config, root: Path, rank: int, device: torch.device,
                 images: ShardMixture | None = None) -> None:
        source = images if images is not None else config.data.shards
        split = config.data.val_split if images is None else images.sets[0].shards.split
        # A held-out split smaller than the grid (a small folder's --val-fraction) takes its whole pairs: the
        # held-out loss over it says `not measured` and the run trains, so the grids must not stop it either.
        found = first_images(source, config.data.val_split, GRID_IMAGES, config.model.img_size, config.data.loader,
                             at_least=0)
        self.images = found[:len(found) // 2 * 2].to(device)
        if rank == 0 and len(self.images) < 2:
            log.warning("no reconstruction grids: split '%s' of %s has %d image%s; a grid pairs images, 2 at the "
                        "least", split, where(source), len(found), "s" * (len(found) != 1))
        elif rank == 0 and len(found) < GRID_IMAGES:
            log.info("reconstruction grids on %d images: split '%s' of %s has %d, fewer than the grid's %d",
                     len(self.images), split, where(source), len(found), GRID_IMAGES)
        self.seed, self.rank, self.folder, self.run = config.run.seed, rank, root / "reconstructions", root.name
        self.writer = None
        if rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            if config.logging.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(root / "tensorboard" / "reconstructions"))

    def write(self, model, step: int) -> None:
        if len(self.images) < 2:
            return
        was_training = model.training
        model.eval()
        generator = torch.Generator().manual_seed(stream_seed(self.seed, 777, bits=63))
        mask = model.sample_mask(generator, self.images.device)
        picture = grid(reconstruct(model, self.images, mask), title=f"run {self.run}, step {step}: fixed validation "
                       "images and mask")
        model.train(was_training)
        if self.rank == 0:
            save_png(picture, self.folder / f"step{step:08d}.png")
            log_image("reconstruction", picture, step, f"step {step}: fixed validation images and mask")
            if self.writer is not None:
                self.writer.add_image("reconstruction", picture, step, dataformats="HWC")
                self.writer.flush()
