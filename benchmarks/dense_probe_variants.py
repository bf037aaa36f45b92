"""The dense probe's read-out variants on the same features (results/demo_dense_probe_iterations.json): 100 or 300
L-BFGS iterations, and the deepest two stages' channels alone, for one demo pretraining run and random encoders
1-5. Each encoder is encoded once and every variant fitted on its features.

    python benchmarks/dense_probe_variants.py runs/seed0 demo_data
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F

from mixmae_scale.finetune import dense_probe as dp
from mixmae_scale.finetune.pretrained import load_encoder
from mixmae_scale.finetune.probe import fit_linear
from mixmae_scale.finetune.segmentation_metrics import confusion_matrix, miou

CLASSES = 11
VARIANTS = (("all100", slice(0, 480), 100), ("all300", slice(0, 480), 300), ("deep100", slice(96, 480), 100))


def features(backbone, train, val) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    xs, ys, vf = [], [], []
    with torch.no_grad():
        for i in range(0, len(train.images), 64):
            f = dp.grid_features(backbone, train.images[i:i + 64])
            x, y = dp.sample_cells(f, dp._cell_labels(train.masks[i:i + 64], 8), generator)
            xs.append(x)
            ys.append(y)
        for i in range(0, len(val.images), 64):
            vf.append(dp.grid_features(backbone, val.images[i:i + 64]).half())
    return torch.cat(xs), torch.cat(ys), torch.cat(vf)


def variant(x, y, vf, val, channels: slice, iterations: int) -> float:
    x = x[:, channels]
    mean, std = x.mean(0), x.std(0) + 1e-6
    with torch.enable_grad():
        head = fit_linear((x - mean) / std, y, CLASSES, max_iter=iterations)
    confusion = torch.zeros(CLASSES, CLASSES, dtype=torch.long)
    with torch.no_grad():
        for i in range(0, len(vf), 64):
            f = (vf[i:i + 64, channels].float() - mean[:, None, None]) / std[:, None, None]
            logits = F.conv2d(f, head.weight[:, :, None, None], head.bias)
            logits = F.interpolate(logits, size=val.masks.shape[-2:], mode="bilinear", align_corners=False)
            confusion += confusion_matrix(logits.argmax(1), val.masks[i:i + 64], CLASSES)
    return miou(confusion)[0]


def run(backbone, train, val) -> dict:
    x, y, vf = features(backbone, train, val)
    out = {}
    for name, channels, iterations in VARIANTS:
        start = time.perf_counter()
        out[name] = (variant(x, y, vf, val, channels, iterations), time.perf_counter() - start)
    return out


def main() -> None:
    state, arch = load_encoder(sys.argv[1], "run")
    train, val = dp.load_splits(f"{sys.argv[2]}/shards", arch["img_size"], 64, "dali", 2)
    results = {"pretrained": run(dp.build_backbone(state, arch, 0), train, val)}
    print(results, flush=True)
    for seed in range(1, 6):
        results[f"random{seed}"] = run(dp.build_backbone(None, arch, seed), train, val)
        print(seed, results[f"random{seed}"], flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
