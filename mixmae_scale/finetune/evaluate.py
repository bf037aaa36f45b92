"""Distributed evaluation: top-1, top-5 and loss, every validation sample counted exactly once.

Ranks read disjoint parts of the split and run the same number of batches (collectives need that);
the padding that makes the batch counts equal is masked out of the sums before they are reduced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixmae_scale.data.loader import ShardLoader
from mixmae_scale.engine.distributed import all_reduce_scalar, autocast


def evaluate(model, loader: ShardLoader, device: torch.device, dtype: str, expected_samples: int | None = None
             ) -> dict[str, float]:
    """`model` maps images to logits (a DeepSpeed engine or a plain module)."""
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    param_dtype = next(module.parameters()).dtype
    sums = {"samples": 0.0, "top1": 0.0, "top5": 0.0, "loss": 0.0}
    with torch.no_grad():
        for batch, valid in loader.eval_batches():
            images = batch.images.to(device, dtype=param_dtype)
            with autocast(device, dtype):
                logits = model(images).float()
            if valid == 0:
                continue
            logits, labels = logits[:valid], batch.labels[:valid].to(device)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            sums["samples"] += valid
            sums["top1"] += float((top[:, 0] == labels).sum())
            sums["top5"] += float((top == labels[:, None]).any(dim=1).sum())
            sums["loss"] += float(F.cross_entropy(logits, labels, reduction="sum"))
    module.train(was_training)
    totals = {k: all_reduce_scalar(v) for k, v in sums.items()}
    n = totals["samples"]
    if expected_samples is not None and int(n) != expected_samples:
        raise RuntimeError(f"evaluation counted {int(n)} samples, the split has {expected_samples}")
    return {"samples": int(n), "top1": 100 * totals["top1"] / n, "top5": 100 * totals["top5"] / n,
            "loss": totals["loss"] / n}


def evaluate_weights(source: str, shards: str, split: str, rank: int, world: int, device: torch.device,
                     backend: str = "dali", batch: int = 64, threads: int = 2, img_size: int | None = None) -> dict:
    """Evaluate classifier weights (with a head) from any source on this rank's share of a split."""
    from dataclasses import replace

    from mixmae_scale.data.loader import choose_decode_device
    from mixmae_scale.data.manifest import load_split
    from mixmae_scale.data.spec import PipelineSpec
    from mixmae_scale.finetune.pretrained import load_encoder
    from mixmae_scale.finetune.probe import shape_from_arch
    from mixmae_scale.models.classifier import SwinClassifier, load_pretrained_encoder

    state, arch = load_encoder(source)
    if "head.weight" not in state:
        raise ValueError(f"{source}: no classification head (head.weight); evaluate a fine-tuned model")
    shape = shape_from_arch(arch)
    if img_size:
        shape = replace(shape, img_size=img_size)
    model = SwinClassifier(shape, state["head.weight"].shape[0], drop_path=0.0)
    report = load_pretrained_encoder(model, state)
    model.head.load_state_dict({"weight": state["head.weight"], "bias": state["head.bias"]})
    if report.missing:
        raise ValueError(f"{source}: missing encoder weights {report.missing[:8]}")
    spec = PipelineSpec(mode="eval", img_size=shape.img_size, batch_size=batch, shard_id=rank, num_shards=world,
                        num_threads=threads, device_id=choose_decode_device("auto", device.index or 0))
    loader = ShardLoader(shards, split, spec, backend, threads)
    expected = load_split(shards, split).samples
    return {"weights": str(source), "split": split, **evaluate(model.to(device), loader, device, "fp32", expected)}
