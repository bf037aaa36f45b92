"""Semantic-segmentation scores from a confusion matrix: exact under any split of the pixels into batches.

Per-batch mIoUs do not average to the mIoU of the whole split (a class absent from a batch would count
as 0 or be skipped depending on convention), so the dense probe and the segmentation job sum confusion
matrices over batches (and ranks) and score the sum once.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = 255  # mask value for pixels that carry no label (ADE20K's "other", the demo's padding)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore: int = IGNORE_INDEX) -> torch.Tensor:
    """`[num_classes, num_classes]` int64 counts, rows = true class, columns = predicted class.

    `pred` and `target` are integer tensors of the same shape; pixels whose target is `ignore` are
    left out. A target outside [0, num_classes) that is not `ignore` is an error: it would be silently
    dropped or alias another class."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    target, pred = target.reshape(-1).long(), pred.reshape(-1).long()
    keep = target != ignore
    target, pred = target[keep], pred[keep]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        bad = target[(target < 0) | (target >= num_classes)][0]
        raise ValueError(f"mask label {int(bad)} is outside 0..{num_classes - 1} and is not the ignore "
                         f"value {ignore}: check num_classes against the data set's class count")
    pred = pred.clamp(0, num_classes - 1)
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def miou(confusion: torch.Tensor) -> tuple[float, list[float | None]]:
    """Mean intersection-over-union (in %) and the per-class IoU (None for a class absent from both
    target and prediction, which the mean leaves out, as mmseg's `nanmean` does)."""
    confusion = confusion.double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    per_class = [100 * float(i / u) if u > 0 else None for i, u in zip(intersection, union, strict=True)]
    present = [v for v in per_class if v is not None]
    mean = sum(present) / len(present) if present else 0.0
    return mean, per_class


def pixel_accuracy(confusion: torch.Tensor) -> float:
    """Share of labelled pixels predicted correctly, in %."""
    total = float(confusion.sum())
    return 100 * float(confusion.diag().sum()) / total if total else 0.0
