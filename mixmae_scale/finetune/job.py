"""The fine-tuning job: pretrained encoder -> classifier -> layer-decayed AdamW; random erasing, mixup/cutmix
and label smoothing -> loss, on the shared loop (`engine/loop.py`, through the `Job` protocol of
engine/job.py), which owns the DeepSpeed step, exact resume, faults, signals, logging and checkpoints, as for
pretraining.

What is fine-tuning's own: the classifier and its layer-decay groups, the batch augmentations (timm's
`RandomErasing` and `Mixup` draw from Python's and NumPy's global generators, which the loop seeds per
rank and checkpoints), the exact distributed evaluation every `finetune.eval_every_epochs`, `eval.jsonl`
(one line per evaluation) and `best/` (the checkpoint with the highest top-1).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from mixmae_scale.atomic_file import write_text
from mixmae_scale.config.schema import RANDOM_INIT, Config
from mixmae_scale.data.errors import plural
from mixmae_scale.data.loader import Batch, ShardLoader
from mixmae_scale.data.loaders import LoaderPlace, open_loader, spec_for
from mixmae_scale.data.manifest import DataError, load_split
from mixmae_scale.data.shard_sets import ShardMixture
from mixmae_scale.data.spec import PipelineSpec
from mixmae_scale.engine import run_folder
from mixmae_scale.engine.checkpointing.recipe import heldout_record
from mixmae_scale.engine.distributed import autocast
from mixmae_scale.engine.evaluated_job import EvaluatedJob, recorded_best
from mixmae_scale.engine.fault_injection import with_injected_faults
from mixmae_scale.engine.job import Loop
from mixmae_scale.engine.loop import RunContext, TrainingLoop, compile_model, start_run
from mixmae_scale.engine.optimizer import adamw
from mixmae_scale.finetune.evaluate import eval_batch_size, evaluate, require_labels, top5_text
from mixmae_scale.finetune.layer_decay import param_groups_layer_decay
from mixmae_scale.finetune.pretrained import Pretrained, finetune_start
from mixmae_scale.finetune.trained_classes import write_run_record
from mixmae_scale.models.classifier import SwinClassifier, load_pretrained_encoder
from mixmae_scale.models.convert_official import WeightsError, mlp_ratio_builds, mlp_widths
from mixmae_scale.models.mixmae import swin_shape

log = logging.getLogger("mixmae.finetune")


def build_classifier(config: Config, num_classes: int, pretrained: Pretrained | None = None) -> SwinClassifier:
    """`pretrained`: the encoder's weights (`finetune_start(config.finetune.init)`); None leaves the classifier's own
    random initialisation (`finetune.init=random`, or a resume, whose checkpoint then loads every weight)."""
    model = SwinClassifier(swin_shape(config.model), num_classes, drop_path=config.model.drop_path,
                           fused_attention=config.model.attention != "reference",
                           checkpoint_every=config.model.checkpoint_every)
    if pretrained is not None:
        report = load_pretrained_encoder(model, pretrained.state)
        if report.missing:
            raise WeightsError(f"finetune.init={config.finetune.init}: the encoder lacks {report.missing[:8]}")
        if report.unexpected:  # decoder and head tensors are not among them (models/classifier.py sets them aside)
            raise WeightsError(unplaced_weights(config, report.unexpected, pretrained.arch))
        log.info("loaded %s (resized: %s; decoder tensors ignored: %d)", pretrained.described(),
                 report.resized or "none", report.ignored_decoder)
    return model


ENCODER_SHAPE = ("embed_dim", "depths", "num_heads", "patch_size", "mlp_ratio")  # what a resize cannot adapt


def refuse_another_encoder_shape(config: Config, pretrained: Pretrained) -> None:
    """Weights of another width, depth or head count than the profile's `model.*`, refused before the run folder is
    made, naming the settings that fit them. It failed once the classifier was built, after the folder was made,
    with `the encoder lacks [8 keys]` (the official small model under finetune_tiny). Image size and windows may
    differ: the position embedding and bias tables are resized (models/classifier.py)."""
    import shlex

    from mixmae_scale.models.sizes import SIZES

    preset = SIZES.get(config.model.size, {})  # the config may not be resolved yet (the CLI's is not)
    ours = {name: getattr(config.model, name) if getattr(config.model, name) is not None else preset.get(name)
            for name in ENCODER_SHAPE}
    theirs = {name: pretrained.arch.get(name) for name in ENCODER_SHAPE}
    differ = [name for name in ENCODER_SHAPE if theirs[name] is not None and ours[name] is not None
              and _shape_value(theirs[name]) != _shape_value(ours[name])]
    if "mlp_ratio" in differ and "embed_dim" not in differ and mlp_ratio_builds(ours["mlp_ratio"], ours["embed_dim"],
                                                                                 mlp_widths(pretrained.state)):
        differ.remove("mlp_ratio")  # the ratio read back off the weights, not the one they were built with
    if not differ:
        return
    said = ", ".join(f"{name} {theirs[name]}" for name in differ)
    profile = ", ".join(f"{name} {ours[name]}" for name in differ)
    sets = " ".join(shlex.quote(f"model.{name}={_shape_text(theirs[name])}") for name in differ)
    raise WeightsError(f"finetune.init={config.finetune.init}: the weights' encoder has {said}; the profile's model "
                       f"has {profile}: fine-tune it with --set {sets} (or name weights of the profile's shape)")


def _shape_value(value: Any) -> Any:
    return [float(v) for v in value] if isinstance(value, list | tuple) else float(value)


def _shape_text(value: Any) -> str:
    return "[" + ",".join(str(v) for v in value) + "]" if isinstance(value, list | tuple) else f"{value:g}"


def started_from(config: Config, pretrained: Pretrained | None) -> dict[str, Any] | None:
    """run.json's "init" (engine/run_record.py): where the encoder's weights came from, with the checkpoint and step
    of a run folder; None for a resume, which loaded none (the record keeps what the run's first launch wrote)."""
    if pretrained is not None:
        return pretrained.record("finetune.init")
    return {"key": "finetune.init", "path": RANDOM_INIT} if config.finetune.init == RANDOM_INIT else None


def unplaced_weights(config: Config, unexpected: list[str], arch: dict) -> str:
    """Why encoder weights that the classifier of `model.*` has no place for are refused: left out, a deeper
    encoder's extra blocks were dropped without a word and the run fine-tuned a truncated encoder."""
    unexpected = sorted(unexpected)
    shown = ", ".join(unexpected[:4]) + (", ..." if len(unexpected) > 4 else "")
    return (f"finetune.init={config.finetune.init}: {plural(len(unexpected), 'encoder tensor')} "
            f"{'has' if len(unexpected) == 1 else 'have'} no place in the "
            f"classifier of model.depths={list(config.model.depths)} ({shown}); the weights' encoder has depths "
            f"{arch.get('depths')}: set model.* to its shape")


def head_classes(configured: int | None, data_classes: int, shards: str) -> int:
    """The classifier's class count: `finetune.num_classes`, or the training data's where it is unset. Fewer classes
    than the data's labels are refused at the start: a label past the head reached mixup's one-hot or the loss
    mid-run (a device-side assert on a GPU). One class is refused too: a softmax over one class is 1 whatever the
    encoder, so the run trained at loss 0 and grad 0 and reported top-1 100% (a wider head fits the one label as
    well)."""
    from mixmae_scale.config.load import ConfigError

    if data_classes == 1:
        raise DataError(f"{shards}: the manifest has 1 class (labels 0-0); a classifier of one class has nothing to "
                        "learn (its loss is 0 and its top-1 100% whatever the encoder): fine-tune on a set of two "
                        "classes or more (a folder of one class can still be pretrained on)")
    if configured == 1:
        raise ConfigError("finetune.num_classes=1: a classifier of one class has nothing to learn (its loss is 0 and "
                          "its top-1 100% whatever the encoder); set at least 2, or leave it unset to take the "
                          "manifest's")
    if configured and data_classes and configured < data_classes:
        raise ConfigError(f"finetune.num_classes={configured}: the manifest of {shards} has {data_classes} classes "
                          f"(labels 0-{data_classes - 1}); set finetune.num_classes to at least {data_classes}, or "
                          "leave it unset to take the manifest's")
    if not (configured or data_classes):
        raise DataError(f"{shards}: no classes in the manifest; set finetune.num_classes")
    return configured or data_classes


class FinetuneJob(EvaluatedJob):
    """Classification with timm's augmentations, evaluated every `eval_every` steps; the best evaluation is
    kept with the checkpoints (its own `best/` checkpoint) so that a resumed run keeps comparing against it."""

    kind = "finetune"
    flops_per_image = None  # not counted for the classifier: no MFU
    metric = "top1"

    def __init__(self, config: Config, root: Path, loader: ShardLoader, num_classes: int, val_spec: PipelineSpec,
                 val_samples: int, device: torch.device, eval_every: int, init: dict[str, Any] | None = None) -> None:
        ft = config.finetune
        self.config, self.root, self.loader, self.started_from = config, root, loader, init
        self.val_spec, self.val_samples = val_spec, val_samples
        self.eval_every, self.compiled_blocks = eval_every, 0
        self.mixup = Mixup(mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, label_smoothing=ft.label_smoothing,
                           num_classes=num_classes) if (ft.mixup > 0 or ft.cutmix > 0) else None
        self.criterion = SoftTargetCrossEntropy() if self.mixup else LabelSmoothingCrossEntropy(ft.label_smoothing)
        self.erasing = RandomErasing(ft.random_erasing, mode="pixel", device=device.type) \
            if ft.random_erasing > 0 else None
        self.start_evaluations()

    def loss(self, loop: Loop, batch: Batch, step: int, micro: int) -> torch.Tensor:
        images, labels = batch.images.to(loop.device), batch.labels.to(loop.device)
        if self.erasing is not None:  # per image, before mixing, as timm's transform in the official code
            images = self.erasing(images)
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        with autocast(loop.device, loop.derived.dtype):
            logits = loop.engine(images.to(next(loop.engine.module.parameters()).dtype))
        return self.criterion(logits.float(), labels)

    def evaluate(self, loop: Loop, step: int) -> dict[str, Any]:
        """Collective: top-1 and top-5 of the whole validation split (every rank its share)."""
        derived = loop.derived
        return {"step": step, "epoch": self.loader.epoch_progress,
                **evaluate(loop.engine, self.val_loader(), loop.device, derived.dtype,
                           expected_samples=self.val_samples)}

    def describe(self, result: dict[str, Any]) -> str:
        return f"top-1 {result['top1']:.2f}  top-5 {top5_text(result)}  loss {result['loss']:.4f}"


def check_finetune_data(config: Config, train_data: ShardMixture, world: int) -> int:
    """What fine-tuning refuses of its data, read off the manifests (start_run calls it before the run folder is
    touched: a refusal made after it left an empty checkpoints/ and a config.yaml of a run that never ran): training
    shards without labels, a classifier of one class, a validation split with fewer images than ranks. Returns the
    head's class count."""
    if not train_data.labeled:  # first: a class count would not help shards without labels
        raise DataError(f"data.shards={config.data.shards}: split '{config.data.train_split}' has no labels (.cls "
                        "members); fine-tuning needs labeled shards (pretraining accepts unlabeled ones)")
    num_classes = head_classes(config.finetune.num_classes, train_data.num_classes, config.data.shards)
    val = load_split(config.data.shards, config.data.val_split)
    require_labels(config.data.shards, val, "data.shards=", "fine-tuning scores its top-1 against the labels")
    eval_batch_size(1, val.samples, world, config.data.shards, config.data.val_split, "the fine-tuning")
    return num_classes


def finetune(config: Config, sources: list[str], run_dir: Path, max_steps: int | None = None,
             local_rank: int = 0, pretrained: Pretrained | None = None, overwrite: bool = False) -> dict[str, Any]:
    """One fine-tuning run to its last step (or a stop); returns the summary it writes to summary.json.
    `pretrained`: `finetune_start(config.finetune.init)` if the caller loaded it already."""
    # Weights that cannot be read, or none named, are the user's mistake, said before a process group or run folder
    # is made; a run that resumes from its own checkpoint reads nothing of them.
    if pretrained is None:
        pretrained = finetune_start(config.finetune.init, run_folder.resumes(run_dir, config.checkpoint.resume,
                                                                             overwrite))
    if pretrained is not None:
        refuse_another_encoder_shape(config, pretrained)
    ctx = start_run(config, sources, run_dir, local_rank, max_steps, overwrite, job="finetune",
                    check=lambda train_data, world: check_finetune_data(config, train_data, world),
                    scores=lambda: heldout_record(load_split(config.data.shards, config.data.val_split)))
    if ctx.resume is None and pretrained is None:  # a fresh start after all (the folder changed since it was read)
        pretrained = finetune_start(config.finetune.init)
    derived, ft = ctx.resolved.derived, config.finetune
    num_classes = head_classes(ft.num_classes, ctx.train_data.num_classes, config.data.shards)
    if ctx.rank == 0:  # which classes its labels are, in order: exports carry the list and `mixmae eval` checks it
        write_run_record(ctx.root, [entry.shards.location for entry in ctx.train_data.sets])
    model = build_classifier(config, num_classes, pretrained).to(ctx.device)
    groups = param_groups_layer_decay(model, config.model.depths, derived.learning_rate, config.optim.weight_decay,
                                      ft.layer_decay, config.optim.exempt_tables_from_decay)
    optimizer = adamw([{k: v for k, v in g.items() if k != "names"} for g in groups], config.optim,
                      derived.learning_rate, ctx.device.type == "cuda", config.zero.offload_optimizer,
                      config.zero.stage)
    job = build_job(config, ctx, model, num_classes, started_from(config, pretrained))
    loop = TrainingLoop(ctx, model, optimizer, with_injected_faults(job, config.faults))
    summary = loop.run()
    summary.update({"best": recorded_best(job.best, job.metric), "last": job.last,
                    "num_classes": num_classes, "init": ft.init})
    if ctx.rank == 0:
        write_text(ctx.root / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def build_job(config: Config, ctx: RunContext, model: torch.nn.Module, num_classes: int,
              init: dict[str, Any] | None = None) -> FinetuneJob:
    """The job on this rank's share of the training data, with the validation it runs every
    `finetune.eval_every_epochs`. `init`: where its encoder came from (`started_from`)."""
    derived = ctx.resolved.derived
    place = LoaderPlace.of(config, ctx.rank, ctx.world, ctx.device.index or 0)
    loader = open_loader(config, ctx.train_data, config.data.train_split,
                         spec_for(config, "finetune", derived.micro_batch, place))
    val_samples = load_split(config.data.shards, config.data.val_split, ctx.world).samples
    # A validation split smaller than one micro-batch per rank is evaluated in smaller batches, not refused.
    val_batch = eval_batch_size(derived.micro_batch, val_samples, ctx.world, config.data.shards,
                                config.data.val_split, "the fine-tuning")
    val_spec = spec_for(config, "val", val_batch, place)
    job = FinetuneJob(config, ctx.root, loader, num_classes, val_spec, val_samples, ctx.device,
                      eval_every=max(1, round(config.finetune.eval_every_epochs * derived.steps_per_epoch)), init=init)
    job.compiled_blocks = compile_model(model, ctx)
    return job
