"""The demo's classes are told apart by structure, not by colour: what a random encoder passes on is colour."""

from __future__ import annotations

import random

import numpy as np
import torch

from mixmae_scale.finetune.probe import Features, probe_features
from mixmae_scale.shards.demo import CLASSES, draw_image


def colour_statistics(cls: int, rng: random.Random) -> np.ndarray:
    """An image's 4x4x4 RGB histogram with its per-channel mean and standard deviation: colour, no layout."""
    pixels = np.asarray(draw_image(cls, rng), dtype=np.float32).reshape(-1, 3) / 256
    bins = (pixels * 4).astype(int) @ np.array([16, 4, 1])
    histogram = np.bincount(bins, minlength=64) / len(bins)
    return np.concatenate([histogram, pixels.mean(0), pixels.std(0)])


def split(name: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, labels = [], []
    for cls in range(len(CLASSES)):
        rng = random.Random(f"colour-test-{name}-{cls}")
        rows += [colour_statistics(cls, rng) for _ in range(per_class)]
        labels += [cls] * per_class
    return torch.tensor(np.stack(rows), dtype=torch.float32), torch.tensor(labels)


def test_a_classifier_of_colour_statistics_stays_near_chance_on_the_demo_classes():
    (train_x, train_y), (val_x, val_y) = split("train", 40), split("val", 20)
    result = probe_features(Features(train_x, train_y, val_x, val_y), len(CLASSES))
    assert result.top1 < 25 and result.knn_top1 < 25, result  # chance is 10%


def test_drawing_the_demo_in_two_processes_writes_the_same_files_as_one(tmp_path):
    """Each (split, class) has its own seeded stream, so the worker that draws it does not change a byte."""
    from mixmae_scale.shards.demo import build_demo_images

    trees = {}
    for workers in (1, 2):
        root = tmp_path / f"workers{workers}"
        build_demo_images(root, train_per_class=2, val_per_class=1, seed=3, workers=workers)
        trees[workers] = {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    assert trees[1] == trees[2] and len(trees[1]) == 2 + 2 * 10 * (2 + 1)  # words, classes.json, JPEG + PNG each
