"""The confusion-matrix mIoU on masks whose scores are worked out by hand."""

from __future__ import annotations

import pytest
import torch

from mixmae_scale.finetune.segmentation_metrics import confusion_matrix, miou, pixel_accuracy


def test_confusion_counts_rows_as_truth_and_columns_as_prediction_and_skips_ignored_pixels():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    confusion = confusion_matrix(pred, target, num_classes=3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]


def test_miou_by_hand_and_absent_classes_are_left_out_of_the_mean():
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 2])
    mean, per_class = miou(confusion_matrix(pred, target, num_classes=4))
    # class 0: 1 / (2 + 1 - 1) = 50%; class 1: 2 / (2 + 3 - 2) = 66.7%; class 2: 100%; class 3 absent
    assert per_class[0] == pytest.approx(50.0) and per_class[1] == pytest.approx(200 / 3)
    assert per_class[2] == pytest.approx(100.0) and per_class[3] is None
    assert mean == pytest.approx((50 + 200 / 3 + 100) / 3)


def test_summed_batch_confusions_score_the_same_as_the_whole_split():
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (4, 8, 8), generator=generator)
    pred = torch.randint(0, 5, (4, 8, 8), generator=generator)
    whole = confusion_matrix(pred, target, 5)
    summed = sum(confusion_matrix(pred[i], target[i], 5) for i in range(4))
    assert torch.equal(whole, summed)
    assert pixel_accuracy(whole) == pytest.approx(100 * float((pred == target).float().mean()))


def test_a_label_beyond_the_class_count_is_a_clear_error():
    with pytest.raises(ValueError, match="mask label 7 is outside 0..4"):
        confusion_matrix(torch.zeros(3, dtype=torch.long), torch.tensor([1, 7, 255]), num_classes=5)
