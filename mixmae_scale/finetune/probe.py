"""Linear probing: a frozen encoder's pooled features, standardised, and a linear classifier on top.

A quick check of what pretraining learned (the scaling tools use it as their accuracy axis): no
augmentation, features computed once, the head trained full-batch on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mixmae_scale.data.loader import ShardLoader
from mixmae_scale.data.spec import PipelineSpec
from mixmae_scale.models.classifier import SwinClassifier, load_pretrained_encoder
from mixmae_scale.models.swin import SwinShape


@dataclass
class ProbeResult:
    top1: float
    train_top1: float
    train_samples: int
    val_samples: int


def shape_from_arch(arch: dict) -> SwinShape:
    return SwinShape(arch["img_size"], arch["patch_size"], arch["embed_dim"], tuple(arch["depths"]),
                     tuple(arch["num_heads"]), tuple(arch["window_size"]), arch.get("mlp_ratio", 4.0))


@torch.no_grad()
def extract_features(model: SwinClassifier, shards: str, split: str, img_size: int, batch: int,
                     backend: str, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    spec = PipelineSpec(mode="eval", img_size=img_size, batch_size=batch, num_threads=threads)
    loader = ShardLoader(shards, split, spec, backend, threads)
    features, labels = [], []
    model.eval()
    for images, valid in loader.eval_batches():
        features.append(model.pooled_features(images.images[:valid]))
        labels.append(images.labels[:valid])
    return torch.cat(features), torch.cat(labels)


def fit_linear(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, epochs: int = 300,
               lr: float = 0.05, weight_decay: float = 1e-4, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    head = torch.nn.Linear(train_x.shape[1], num_classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        optimizer.zero_grad()
        F.cross_entropy(head(train_x), train_y).backward()
        optimizer.step()
    return head


def linear_probe(state: dict[str, torch.Tensor] | None, arch: dict, shards: str, num_classes: int,
                 backend: str = "dali", batch: int = 64, threads: int = 2, seed: int = 0) -> ProbeResult:
    """`state` None probes a randomly initialised encoder of the same shape (the baseline)."""
    torch.manual_seed(seed)
    model = SwinClassifier(shape_from_arch(arch), num_classes, drop_path=0.0)
    if state is not None:
        report = load_pretrained_encoder(model, state)
        if report.missing:
            raise ValueError(f"encoder weights lack {report.missing[:5]}")
    train_x, train_y = extract_features(model, shards, "train", arch["img_size"], batch, backend, threads)
    val_x, val_y = extract_features(model, shards, "val", arch["img_size"], batch, backend, threads)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6  # standardise: a BatchNorm without affine
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    head = fit_linear(train_x, train_y, num_classes, seed=seed)
    with torch.no_grad():
        top1 = 100 * float((head(val_x).argmax(1) == val_y).float().mean())
        train_top1 = 100 * float((head(train_x).argmax(1) == train_y).float().mean())
    return ProbeResult(top1, train_top1, len(train_y), len(val_y))
