"""What `mixmae eval` accepts of a classifier's head against the split it scores: a head with more classes than
the split's labels (a split of a subset of its classes) is evaluated, one with fewer is refused; and a top-k of a
head with k classes or fewer (every label is among them, a sure 100%) is reported as n/a, not as a score."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mixmae_scale.data.sample_ids import Coverage
from mixmae_scale.finetune.evaluate import evaluate, load_classifier, top5_text


def save_classifier(path, classes: int) -> None:
    from mixmae_scale.config import load_resolved
    from mixmae_scale.models.classifier import SwinClassifier
    from mixmae_scale.models.convert_official import infer_architecture, save_weights
    from mixmae_scale.models.mixmae import swin_shape

    torch.manual_seed(0)
    state = SwinClassifier(swin_shape(load_resolved("tiny").config.model), classes).state_dict()
    save_weights(path, state, infer_architecture(state), "finetune")


def test_a_head_with_more_classes_than_the_split_is_evaluated_and_one_with_fewer_is_refused(demo_shards, tmp_path):
    from mixmae_scale.models.convert_official import WeightsError

    save_classifier(tmp_path / "head12.safetensors", 12)
    model = load_classifier(str(tmp_path / "head12.safetensors"), str(demo_shards), "val")
    assert model.head.out_features == 12  # the demo's 10 classes are labels 0-9 of its 12
    save_classifier(tmp_path / "head9.safetensors", 9)
    with pytest.raises(WeightsError, match="its head has 9 classes, fewer than the 10 of the shards"):
        load_classifier(str(tmp_path / "head9.safetensors"), str(demo_shards), "val")


@dataclass
class LabelBatch:
    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor


class FixedLogits(torch.nn.Module):
    """Logits that rank class 0 first, then 1, 2, ...: top-1 is right for label 0 alone."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.order = torch.nn.Parameter(-torch.arange(classes, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.order.expand(len(images), -1)


class OneBatch:
    """What `evaluate` reads of a loader: one batch of the given labels, its coverage, where it is."""

    def __init__(self, labels: list[int]) -> None:
        ids = torch.arange(1, len(labels) + 1)
        self.batch = LabelBatch(torch.zeros(len(labels), 3, 4, 4), torch.tensor(labels), ids)
        self.coverage = Coverage(len(labels), int(ids.sum()))
        self.mixture = type("M", (), {"sets": [type("S", (), {"shards": type("L", (), {"location": "x"})})]})

    def eval_batches(self):
        yield self.batch, len(self.batch.labels)

    def split_coverage(self) -> Coverage:
        return self.coverage


@pytest.fixture
def world_of_one(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("classes, top5", [(3, None), (5, None), (6, 75.0)])
def test_top5_is_a_score_only_for_a_head_of_more_than_5_classes(classes, top5, world_of_one):
    labels = [0, 1, 2, 5 if classes == 6 else 2]  # the last one outside the top 5 of a 6-class head
    result = evaluate(FixedLogits(classes), OneBatch(labels), torch.device("cpu"), "fp32")
    assert result["top1"] == 25.0 and result["top5"] == top5
    assert top5_text(result) == ("n/a" if top5 is None else "75.00")

