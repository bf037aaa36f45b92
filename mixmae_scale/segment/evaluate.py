"""Distributed mIoU: one confusion matrix per rank over its share of the split, summed over ranks and scored once.

Per-batch or per-rank mIoUs do not average to the split's mIoU, so nothing is averaged: the counts are summed
(finetune/segmentation_metrics.py) and the padding that gives every rank the same number of batches is left
out before they are. The loss is the pixel-mean cross-entropy over labelled pixels.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mixmae_scale.engine.distributed import autocast
from mixmae_scale.finetune.segmentation_metrics import confusion_matrix, miou, pixel_accuracy


def pixel_loss(logits: torch.Tensor, masks: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the per-pixel cross-entropies, labelled pixels): a batch whose pixels are all unlabelled adds
    nothing instead of a 0/0 that the loop would take for a diverged loss."""
    total = F.cross_entropy(logits.float(), masks, ignore_index=ignore_index, reduction="sum")
    return total, (masks != ignore_index).sum()


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels of a micro-batch (0 with a gradient when none is labelled)."""
    total, labelled = pixel_loss(logits, masks, ignore_index)
    return total / labelled.clamp(min=1)


def _summed(tensor: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    reduced = tensor.to(on)
    dist.all_reduce(reduced)
    return reduced.cpu()


def evaluate_segmentation(model: Any, batches: Iterable, device: torch.device, dtype: str, num_classes: int,
                          ignore_index: int, expected_samples: int | None = None) -> dict[str, Any]:
    """`model` maps images to `[B, K, H, W]` logits (a DeepSpeed engine or a plain module); `batches` yields
    (batch with .images and .masks, real samples in it), as `ShardLoader.eval_batches()`. Collective when a
    process group is up: every rank must pass the same number of batches."""
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    param_dtype = next(module.parameters()).dtype
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    sums = torch.zeros(3, dtype=torch.float64)  # samples, loss sum, labelled pixels
    with torch.no_grad():
        for batch, valid in batches:
            with autocast(device, dtype):
                logits = model(batch.images.to(device, dtype=param_dtype)).float()
            if valid == 0:
                continue
            logits, masks = logits[:valid], batch.masks[:valid].to(device)
            if logits.shape[-2:] != masks.shape[-2:]:
                logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
            confusion += confusion_matrix(logits.argmax(1), masks, num_classes, ignore_index).cpu()
            loss, labelled = pixel_loss(logits, masks, ignore_index)
            sums += torch.tensor([valid, float(loss), float(labelled)], dtype=torch.float64)
    module.train(was_training)
    confusion, sums = _summed(confusion), _summed(sums)
    samples = int(sums[0])
    if expected_samples is not None and samples != expected_samples:
        raise RuntimeError(f"evaluation counted {samples} samples, the split has {expected_samples}")
    mean, per_class = miou(confusion)
    return {"samples": samples, "miou": mean, "pixel_accuracy": pixel_accuracy(confusion),
            "loss": float(sums[1] / sums[2].clamp(min=1)), "per_class_iou": per_class}
