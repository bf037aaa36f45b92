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

from mixmae_scale.data.errors import plural
from mixmae_scale.data.sample_ids import Coverage, require_each_sample_once
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
                          ignore_index: int, expected_samples: int | None = None, split: Coverage | None = None,
                          where: str = "the split") -> dict[str, Any]:
    """`model` maps images to `[B, K, H, W]` logits (a DeepSpeed engine or a plain module); `batches` yields
    (batch with .images and .masks, real samples in it), as `ShardLoader.eval_batches()`. Collective when a
    process group is up: every rank must pass the same number of batches. `split`: the split's coverage
    (`ShardLoader.split_coverage()`), which the samples counted must match, each once (data/sample_ids.py)."""
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    param_dtype = next(module.parameters()).dtype
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    sums = torch.zeros(3, dtype=torch.float64)  # samples, loss sum, labelled pixels
    ids = torch.zeros(1, dtype=torch.int64)  # exact, where float64 would round
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
            if split is not None:
                ids += batch.ids[:valid].sum()
    module.train(was_training)
    confusion, sums = _summed(confusion), _summed(sums)
    samples = int(sums[0])
    if expected_samples is not None and samples != expected_samples:
        raise RuntimeError(f"evaluation counted {samples} samples, the split has {expected_samples}")
    if split is not None:
        require_each_sample_once(Coverage(samples, int(_summed(ids)[0])), split, where)
    mean, per_class = miou(confusion)
    return {"samples": samples, "miou": mean, "pixel_accuracy": pixel_accuracy(confusion),
            "loss": float(sums[1] / sums[2].clamp(min=1)), "per_class_iou": per_class, "precision": dtype}


def evaluation_size(settings: dict, img_size: int | None, multiple: int) -> int:
    """The side `mixmae eval --img-size` evaluates a segmentation model at: the size given, which its backbone takes
    when it is a multiple of the last stride (`multiple`), else the crop size it was trained at (`segment.crop_size`
    of its run, in the export's settings)."""
    if img_size is None:
        return settings["crop_size"]
    if img_size % multiple:
        from mixmae_scale.config import ConfigError

        raise ConfigError(f"--img-size {img_size}: a segmentation model takes a multiple of {multiple} (its backbone's "
                          f"last stride); it was trained on {settings['crop_size']} px crops")
    return img_size


def evaluate_segmenter(model: torch.nn.Module, settings: dict, source: str, shards: str, split: str, rank: int,
                       world: int, device: torch.device, backend: str = "dali", batch: int = 16,
                       threads: int = 2, precision: str = "fp32") -> dict[str, Any]:
    """`mixmae eval` of a segmentation export (segment/build.py's `load_segmenter`): the evaluation view of the
    split's images and masks at `settings["crop_size"]` (the crop size it was trained with, or `evaluation_size`'s),
    this rank's share, computed in `precision`."""
    from mixmae_scale.data.loader import ShardLoader, choose_decode_device
    from mixmae_scale.data.loaders import LoaderPlace, eval_spec
    from mixmae_scale.data.manifest import load_split
    from mixmae_scale.finetune.evaluate import eval_batch_size, in_precision

    expected = load_split(shards, split).samples
    batch = eval_batch_size(batch, expected, world, shards, split)
    place = LoaderPlace(rank, world, choose_decode_device("auto", device.index or 0, backend))
    spec = eval_spec(settings["crop_size"], batch, threads, place, labels=False, masks=True,
                     mask_classes=settings["num_classes"])
    loader = ShardLoader(shards, split, spec, backend, threads)
    model = in_precision(model, device, precision)
    scores = evaluate_segmentation(model, loader.eval_batches(), device, precision, settings["num_classes"],
                                   settings["ignore_index"], expected, loader.split_coverage(), str(shards))
    return {"weights": str(source), "data": str(shards), "split": split, "batch": batch,
            "img_size": settings["crop_size"], **scores}


def segmentation_line(result: dict[str, Any]) -> str:
    """What `mixmae eval` says of a segmentation model, with the image size it evaluated at (--img-size, else the
    crop it was trained at), which the mIoU depends on: the JSON had it, the line did not."""
    return (f"mIoU {result['miou']:.1f}% ({result['precision']}) at {result['img_size']} px on the "
            f"{plural(result['samples'], 'image')} of split "
            f"'{result['split']}' of "
            f"{result['data']} ({result['weights']})")
