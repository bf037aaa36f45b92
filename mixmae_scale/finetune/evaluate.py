"""Distributed evaluation: top-1, top-5 and loss, every validation sample counted exactly once.

Ranks read disjoint parts of the split and run the same number of batches (collectives need that);
the padding that makes the batch counts equal is masked out of the sums before they are reduced. That each
sample was counted once is checked, not assumed: the ids of the samples counted, as they came out of the
decoder, must add up to the split's (data/sample_ids.py), or the evaluation is refused.

Top-5 is a score only for a head of more than 5 classes: with 5 or fewer every label is among the top 5, a sure
100% that said nothing, so it is None there (shown as n/a).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mixmae_scale.data.loader import ShardLoader
from mixmae_scale.data.manifest import DataError, SplitShards
from mixmae_scale.data.sample_ids import Coverage, require_each_sample_once
from mixmae_scale.engine.distributed import all_reduce_int, all_reduce_scalar, autocast

TOP_K = 5  # the second accuracy reported; a score only for a head of more classes than this


def evaluate(model, loader: ShardLoader, device: torch.device, dtype: str, expected_samples: int | None = None
             ) -> dict[str, Any]:
    """`model` maps images to logits (a DeepSpeed engine or a plain module). `dtype` is recorded with the scores:
    a bf16 evaluation and an fp32 one of the same weights differ by a few images (rounding moves near-ties)."""
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    param_dtype = next(module.parameters()).dtype
    sums = {"samples": 0.0, "top1": 0.0, "top5": 0.0, "loss": 0.0}
    id_sum, classes = 0, 0
    with torch.no_grad():
        for batch, valid in loader.eval_batches():
            images = batch.images.to(device, dtype=param_dtype)
            with autocast(device, dtype):
                logits = model(images).float()
            classes = logits.shape[1]  # every rank runs every batch, padding included: all ranks know it
            if valid == 0:
                continue
            logits, labels = logits[:valid], batch.labels[:valid].to(device)
            top = logits.topk(min(TOP_K, classes), dim=1).indices
            sums["samples"] += valid
            id_sum += int(batch.ids[:valid].sum())
            sums["top1"] += float((top[:, 0] == labels).sum())
            sums["top5"] += float((top == labels[:, None]).any(dim=1).sum())
            sums["loss"] += float(F.cross_entropy(logits, labels, reduction="sum"))
    module.train(was_training)
    totals = {k: all_reduce_scalar(v) for k, v in sums.items()}
    n = totals["samples"]
    if expected_samples is not None and int(n) != expected_samples:
        raise RuntimeError(f"evaluation counted {int(n)} samples, the split has {expected_samples}")
    require_each_sample_once(Coverage(int(n), all_reduce_int(id_sum)), loader.split_coverage(),
                             loader.mixture.sets[0].shards.location)
    return {"samples": int(n), "top1": 100 * totals["top1"] / n,
            "top5": 100 * totals["top5"] / n if classes > TOP_K else None, "loss": totals["loss"] / n,
            "precision": dtype}


def top5_text(result: dict[str, Any], unit: str = "") -> str:
    """An evaluation's top-5 as a person reads it: the score with `unit`, or n/a where the head has 5 classes or fewer
    (`evaluate` gives None: every label is then in the top 5)."""
    return "n/a" if result.get("top5") is None else f"{result['top5']:.2f}{unit}"


def load_classifier(source: str, shards: str, split: str, img_size: int | None = None, option: str = "--init"
                    ) -> torch.nn.Module:
    """A classifier (encoder + head) from any weights source, checked against the split it is to be evaluated
    on before any process group starts: a pretraining encoder (no head), a head with fewer classes than the
    shards', or shards of other classes than it was fine-tuned on (its record of them: finetune/trained_classes.py)
    is a user's mistake, said in one line. A head with more classes is evaluated: the split may hold a subset of
    its classes (labels past the split's are never the answer, but the head may still predict them)."""
    from dataclasses import replace

    from mixmae_scale.data import storage
    from mixmae_scale.data.manifest import load_split
    from mixmae_scale.finetune.pretrained import load_pretrained
    from mixmae_scale.finetune.probe import shape_from_arch
    from mixmae_scale.finetune.trained_classes import require_trained_classes
    from mixmae_scale.models.classifier import SwinClassifier, load_pretrained_encoder
    from mixmae_scale.models.convert_official import WeightsError

    require_folder(shards, "--data")
    pretrained = load_pretrained(source, option)
    state, arch = pretrained.state, pretrained.arch
    if "head.weight" not in state:
        raise WeightsError(f"{option} {source}: a pretrained encoder without a classification head; `mixmae eval` "
                           f"measures fine-tuned classifiers. Probe an encoder with `mixmae probe --init {source} "
                           f"--data {shards}`, or fine-tune it first (`mixmae finetune`) and evaluate that")
    head_classes = state["head.weight"].shape[0]
    evaluated = load_split(shards, split)
    require_labels(shards, evaluated, "--data ", "`mixmae eval` scores top-1 against the labels")
    shard_classes = evaluated.num_classes
    where = shards if storage.is_remote(shards) else Path(shards).absolute()  # Path() would make s3://b into s3:/b
    if not shard_classes:
        raise WeightsError(f"{option} {source}: the shards in {where} have no classes "
                           "(classes.json); evaluate on labeled shards of the classes it was fine-tuned on")
    if head_classes < shard_classes:
        raise WeightsError(f"{option} {source}: its head has {head_classes} classes, fewer than the {shard_classes} "
                           f"of the shards in {where} (classes.json); evaluate on shards of the "
                           "classes it was fine-tuned on")
    require_trained_classes(source, shards, option)  # the same classes, in the same order (finetune/trained_classes)
    shape = shape_from_arch(arch)
    if img_size:
        own, shape = shape.img_size, replace(shape, img_size=img_size)
        reduction = shape.patch_size * 2 ** (len(shape.depths) - 1)
        if img_size % reduction or any(res % min(window, res) for res, window in
                                       zip(shape.stage_resolutions, shape.window_size, strict=True)):
            from mixmae_scale.config import ConfigError

            raise ConfigError(f"--img-size {img_size}: the encoder needs a multiple of {reduction} whose stage grids "
                             f"its windows {list(shape.window_size)} tile; its own size is {own}")
    model = SwinClassifier(shape, head_classes, drop_path=0.0)
    report = load_pretrained_encoder(model, state)
    if report.missing:
        raise WeightsError(f"{option} {source}: missing encoder weights {report.missing[:8]}")
    model.head.load_state_dict({"weight": state["head.weight"], "bias": state["head.bias"]})
    # For a run folder, the checkpoint its weights were read from (its newest, not its best): what eval's result names.
    model.weights_checkpoint = pretrained.checkpoint
    return model


def require_labels(shards: str, split: SplitShards, option: str, needs: str) -> None:
    """A split whose manifest says it has no labels (`mixmae shards folder --unlabeled`, `mixmae shards adopt
    --unlabeled`, a validation split adopted unlabeled into a labeled set) refused before an image is read: its
    images carry label -1, which a probe fitted to ("every image is of class -1") and every top-1 was scored against,
    0% whatever the weights. `option`: how the set was named, with its separator ("--data ", "data.shards=");
    `needs`: what the command does with labels ("the probe fits and scores class labels")."""
    if split.labeled:
        return
    raise DataError(f"{option}{shards}: split '{split.split}' has no labels (no .cls members, its manifest says); "
                    f"{needs}: give it a labeled split (`mixmae shards folder` of class subfolders, `mixmae shards "
                    "adopt` without --unlabeled)")


def require_folder(path: str | Path, option: str) -> None:
    """A local shard folder that is not there is named with the absolute path tried; an s3:// set is checked when
    its manifest is read (data/manifest.py), with the URL and what to set."""
    from mixmae_scale.data import storage

    if not storage.is_remote(path) and not Path(path).is_dir():
        raise FileNotFoundError(f"{option} {path}: not found (tried {Path(path).absolute()})")


def eval_batch_size(requested: int, samples: int, world: int, shards: str, split: str, run: str | None = None
                    ) -> int:
    """The batch each rank evaluates with: the requested one, smaller when the split is, so that a split of
    fewer than `requested` images per rank is still evaluated in full (the last batch is partial). `run`: the
    training run that evaluates ("the fine-tuning"), which cannot evaluate on fewer ranks than it trains on, so
    the way out names the run; None for `mixmae eval`."""
    from mixmae_scale.data.manifest import DataError

    what = f"split '{split}' of {shards}"
    if not samples:
        raise DataError(f"{what} has no images: there is nothing to evaluate")
    if samples < world:
        gpus = f"{samples} GPU{'s' * (samples != 1)}"
        way = (f"run {run} on {gpus}{' or fewer' if samples > 1 else ''}, or give '{split}' more images" if run
               else f"evaluate it on {gpus}{' or fewer' if samples > 1 else ''}")
        raise DataError(f"{what} has {samples} image{'s' * (samples != 1)} for {world} ranks (each evaluates a share "
                        f"of at least one); {way}")
    return max(1, min(requested, samples // world))


def evaluation_precision(requested: str, device: torch.device) -> str:
    """What `mixmae eval --precision` computes in on this device. fp32 is the default because the number should
    not depend on the machine that measures it; a run's own evaluations (eval.jsonl) use the run's precision, and
    `--precision auto` makes the choice a run with `precision.dtype: auto` makes here (bf16 where it is native).
    An emulated dtype is kept as asked, with a warning."""
    import logging

    from mixmae_scale.config.precision import choose_precision, detect_hardware

    hardware = detect_hardware("cuda" if device.type == "cuda" else "cpu")
    dtype = choose_precision(requested, hardware).dtype
    native = {"bf16": hardware.native_bf16, "fp16": hardware.native_fp16}.get(dtype, True)
    if not native:
        logging.getLogger("mixmae.eval").warning(
            "--precision %s on %s, which emulates it: the evaluation runs many times slower than in fp32 (CPUs "
            "without AVX-512)", dtype, hardware.name)
    return dtype


def in_precision(model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    """`model` on `device` as a run in `precision` evaluates it: DeepSpeed's bf16 and fp16 engines cast the
    parameters and keep the buffers in fp32 (the sin-cos position embedding among them), and `mixmae eval`
    does the same to give the run's number."""
    model = model.to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is not None:
        for parameter in model.parameters():
            parameter.data = parameter.data.to(dtype)
    return model


def evaluate_classifier(model: torch.nn.Module, source: str, shards: str, split: str, rank: int, world: int,
                        device: torch.device, backend: str = "dali", batch: int = 64, threads: int = 2,
                        precision: str = "fp32") -> dict:
    """Evaluate a classifier (from `load_classifier`) on this rank's share of a split, computing in `precision`
    (fp32, bf16 or fp16: `evaluation_precision`'s answer)."""
    from mixmae_scale.data.loader import choose_decode_device
    from mixmae_scale.data.loaders import LoaderPlace, eval_spec
    from mixmae_scale.data.manifest import load_split

    expected = load_split(shards, split).samples
    batch = eval_batch_size(batch, expected, world, shards, split)
    place = LoaderPlace(rank, world, choose_decode_device("auto", device.index or 0, backend))
    spec = eval_spec(model.encoder.shape.img_size, batch, threads, place)
    loader = ShardLoader(shards, split, spec, backend, threads)
    checkpoint = getattr(model, "weights_checkpoint", None)  # load_classifier's, for a run folder
    return {"weights": str(source), "checkpoint": str(checkpoint) if checkpoint is not None else None, "split": split,
            "batch": batch, **evaluate(in_precision(model, device, precision), loader, device, precision, expected)}
