"""The fine-tuning job: pretrained encoder -> classifier -> DeepSpeed with layer decay, RandAugment,
mixup/cutmix, random erasing, label smoothing -> exact distributed evaluation -> best and last.

Same launcher, engine, checkpoints and resume as pretraining; the run directory also gets
`eval.jsonl` (one line per evaluation) and `best/` (the checkpoint with the highest top-1).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from mixmae_scale.atomic_file import write_text
from mixmae_scale.config import resolve
from mixmae_scale.config.deepspeed_config import engine_config
from mixmae_scale.config.precision import log_choice
from mixmae_scale.config.schema import Config
from mixmae_scale.data.loader import ShardLoader, choose_decode_device
from mixmae_scale.data.manifest import DataError, load_split
from mixmae_scale.data.spec import PipelineSpec
from mixmae_scale.engine import checkpoint as ckpt
from mixmae_scale.engine import distributed
from mixmae_scale.engine.distributed import all_reduce_scalar, autocast, seed_for
from mixmae_scale.engine.monitor import MetricsLog, Throughput, peak_memory_mib
from mixmae_scale.finetune.evaluate import evaluate
from mixmae_scale.finetune.layer_decay import param_groups_layer_decay
from mixmae_scale.finetune.pretrained import load_encoder
from mixmae_scale.models.classifier import SwinClassifier, load_pretrained_encoder
from mixmae_scale.models.mixmae import swin_shape

log = logging.getLogger("mixmae.finetune")


def build_classifier(config: Config, num_classes: int) -> SwinClassifier:
    model = SwinClassifier(swin_shape(config.model), num_classes, drop_path=config.model.drop_path,
                           fused_attention=config.model.attention == "fused",
                           checkpoint_every=config.model.checkpoint_every)
    if config.finetune.init:
        state, _ = load_encoder(config.finetune.init)
        report = load_pretrained_encoder(model, state)
        if report.missing:
            raise ValueError(f"finetune.init={config.finetune.init}: the encoder lacks {report.missing[:8]}")
        log.info("loaded %s (resized: %s; decoder tensors ignored: %d)", config.finetune.init,
                 report.resized or "none", report.ignored_decoder)
    return model


def finetune(config: Config, sources: list[str], run_dir: Path, max_steps: int | None = None,
             local_rank: int = 0) -> dict[str, Any]:
    import deepspeed

    rank, world, device = distributed.init(local_rank)
    train_split = load_split(config.data.shards, config.data.train_split, world)
    num_classes = config.finetune.num_classes or train_split.num_classes
    if not num_classes:
        raise DataError(f"{config.data.shards}: no classes in the manifest; set finetune.num_classes")
    resolved = resolve(config, sources, world_size=world, train_samples=train_split.samples)
    derived, ft = resolved.derived, config.finetune
    root = Path(run_dir)
    checkpoints, best_dir = root / "checkpoints", root / "best"
    ds_config = engine_config(resolved, root)
    layout = ckpt.optimizer_layout(ds_config)
    tag = ckpt.find_resume(checkpoints, config.checkpoint.resume)
    if tag is not None:
        ckpt.check_compatible(checkpoints, tag, resolved.model_digest(), world, layout)
    if rank == 0:
        log_choice(log, derived.dtype, derived.dtype_reason, derived.dtype_warning)
        checkpoints.mkdir(parents=True, exist_ok=True)
        write_text(root / "config.yaml", yaml.safe_dump(
            {**resolved.to_dict(), "deepspeed_config": ds_config}, sort_keys=False))
    dist.barrier()

    torch.manual_seed(seed_for(config.run.seed, rank))
    model = build_classifier(config, num_classes).to(device)
    groups = param_groups_layer_decay(model, config.model.depths, derived.learning_rate, config.optim.weight_decay,
                                      ft.layer_decay, config.optim.exempt_tables_from_decay)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                                  lr=derived.learning_rate, betas=tuple(config.optim.betas), eps=config.optim.eps,
                                  fused=device.type == "cuda" or None)  # as in pretraining's build_optimizer
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    device_id = choose_decode_device(config.data.decode_device, local_rank)
    common = dict(img_size=config.model.img_size, batch_size=config.batch.micro, shard_id=rank, num_shards=world,
                  num_threads=config.data.num_threads, device_id=device_id)
    train_spec = PipelineSpec(mode="finetune", seed=seed_for(config.run.seed, rank) % 2**31,
                              shuffle_buffer=config.data.shuffle_buffer, crop_scale=(0.08, 1.0),
                              crop_ratio=tuple(config.data.crop_ratio), hflip=config.data.hflip,
                              rand_augment=(ft.rand_augment_ops, ft.rand_augment_magnitude)
                              if ft.rand_augment_ops > 0 else None, rand_augment_std=ft.rand_augment_magnitude_std,
                              interpolation=config.data.interpolation, **common)
    loader = ShardLoader(config.data.shards, config.data.train_split, train_spec, config.data.loader,
                         config.data.num_threads)
    val_spec = PipelineSpec(mode="eval", **common)
    val_samples = load_split(config.data.shards, config.data.val_split, world).samples

    mixup = Mixup(mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, label_smoothing=ft.label_smoothing,
                  num_classes=num_classes) if (ft.mixup > 0 or ft.cutmix > 0) else None
    criterion = SoftTargetCrossEntropy() if mixup else LabelSmoothingCrossEntropy(ft.label_smoothing)
    erasing = RandomErasing(ft.random_erasing, mode="pixel", device=device.type) if ft.random_erasing > 0 else None

    step, best, result = 0, {"top1": -1.0}, None
    if tag is not None:
        _, client = engine.load_checkpoint(str(checkpoints), tag=tag)
        step, best = int(client["step"]), client.get("best", best)
        state = ckpt.read_rank_state(checkpoints, tag, rank)
        loader.load_state_dict(state["loader"])
        ckpt.restore_rng_state(state["rng"])

    def run_eval() -> dict:
        val_loader = ShardLoader(config.data.shards, config.data.val_split, val_spec, config.data.loader,
                                 config.data.num_threads)
        return evaluate(engine, val_loader, device, derived.dtype, expected_samples=val_samples)

    def save(directory: Path, at_step: int, keep: int) -> Path:
        client = {"step": at_step, "best": best, "model_digest": resolved.model_digest(), "world_size": world}
        rank_state = {"loader": loader.state_dict(), "rng": ckpt.rng_state(), "model_digest": resolved.model_digest(),
                      "optimizer_layout": layout}
        return ckpt.save(engine, directory, at_step, client, rank_state, keep)

    last_step = min(derived.total_steps, max_steps) if max_steps else derived.total_steps
    eval_every = max(1, round(ft.eval_every_epochs * derived.steps_per_epoch))
    metrics = MetricsLog(root / "metrics.csv", getattr(engine, "monitor", None)) if rank == 0 else None
    param_dtype = next(engine.module.parameters()).dtype
    window, loss_sum, loss_count, start = Throughput(), 0.0, 0, time.perf_counter()
    last = None

    def batches():
        while True:
            yield from loader

    stream = batches()
    engine.train()
    while step < last_step:
        for _ in range(derived.accumulation):
            batch = next(stream)
            images, labels = batch.images.to(device), batch.labels.to(device)
            if erasing is not None:  # per image, before mixing, as timm's transform in the official code
                images = erasing(images)
            if mixup is not None:
                images, labels = mixup(images, labels)
            with autocast(device, derived.dtype):
                logits = engine(images.to(param_dtype))
            loss = criterion(logits.float(), labels)
            engine.backward(loss)
            engine.step()
            loss_sum, loss_count = loss_sum + float(loss.detach()), loss_count + 1
            window.images += images.shape[0]
        step += 1
        if step % config.logging.every_steps == 0 or step == last_step:
            rate, wait = window.window()
            rate = all_reduce_scalar(rate)
            mean_loss = all_reduce_scalar(loss_sum) / max(all_reduce_scalar(loss_count), 1)
            if rank == 0:
                metrics.write({"step": step, "epoch": step / derived.steps_per_epoch,
                               "images_seen": step * derived.global_batch, "loss": mean_loss,
                               "lr": scheduler.get_last_lr()[-1], "images_per_s": rate, "data_wait_frac": wait,
                               "peak_mem_mib": peak_memory_mib(), "elapsed_s": time.perf_counter() - start})
                log.info("step %d/%d  loss %.4f  lr %.2e  %.0f img/s", step, last_step, mean_loss,
                         scheduler.get_last_lr()[-1], rate)
            window.reset()
            loss_sum, loss_count = 0.0, 0
        if step % eval_every == 0 or step == last_step:
            result = {"step": step, "epoch": step / derived.steps_per_epoch, **run_eval()}
            if rank == 0:
                with (root / "eval.jsonl").open("a") as handle:
                    handle.write(json.dumps(result) + "\n")
                log.info("eval at step %d: top-1 %.2f  top-5 %.2f  loss %.4f (%d images)", step, result["top1"],
                         result["top5"], result["loss"], result["samples"])
            if result["top1"] > best["top1"]:
                best = result
                save(best_dir, step, keep=1)
        if step % config.checkpoint.every_steps == 0 or step == last_step:
            last = save(checkpoints, step, config.checkpoint.keep_last)
    summary = {"steps": step, "best": best, "last": result, "checkpoint": str(last) if last else None,
               "num_classes": num_classes, "init": ft.init}
    if rank == 0:
        write_text(root / "summary.json", json.dumps(summary, indent=2))
    return summary
