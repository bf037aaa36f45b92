"""A ZeRO-0 run's checkpoint, as DeepSpeed and our store write it (a real engine in a world of one, one step): its
weights are what `mixmae export`, `mixmae probe --init RUN` and `finetune.init=RUN` read. DeepSpeed's zero_to_fp32,
which every one of them went through, stopped with a TypeError on a checkpoint without ZeRO shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixmae_scale.engine.checkpointing import store
from mixmae_scale.models.classifier import SwinClassifier


def trained_checkpoint(model: torch.nn.Module, run: Path, stage: int, dtype: str, images: torch.Tensor | None
                       ) -> tuple[Path, dict[str, torch.Tensor]]:
    """One optimizer step of `model` on `images` (None: no step) under DeepSpeed at ZeRO `stage`, saved as a run's
    checkpoint (store.save, as the loop saves); returns the checkpoint and the engine's module state. Needs the
    `world_of_one` fixture (tests/conftest.py)."""
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
        config={"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2,
                "zero_optimization": {"stage": stage}, "bf16": {"enabled": dtype == "bf16"}})
    if images is not None:
        loss = engine(images.to(next(engine.module.parameters()).dtype)).float().square().mean()
        engine.backward(loss)
        engine.step()
    checkpoint = store.save(engine, run / "checkpoints", store.SaveRequest(step=1), client_state={}, rank_state={})
    return checkpoint, {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_zero0_runs_weights_are_exported_and_read_as_an_init(world_of_one, small_shape, tmp_path, dtype):
    from mixmae_scale.engine.export import export_run
    from mixmae_scale.finetune.pretrained import load_encoder
    from mixmae_scale.models.convert_official import load_weights

    torch.manual_seed(0)
    model = SwinClassifier(small_shape, num_classes=5, drop_path=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint, after = trained_checkpoint(model, tmp_path / "run", 0, dtype, torch.randn(2, 3, 128, 128))
    assert sorted(p.name for p in checkpoint.iterdir() if p.suffix == ".pt") == ["mp_rank_00_model_states.pt"]
    assert not torch.equal(after["head.weight"].float(), before["head.weight"])  # the step moved the weights

    result = export_run(tmp_path / "run", tmp_path / "classifier.safetensors")
    assert (result["kind"], result["step"]) == ("finetune", 1)
    exported, arch = load_weights(tmp_path / "classifier.safetensors")
    assert arch["depths"] == list(small_shape.depths) and arch["num_classes"] == 5
    assert exported.keys() == after.keys()
    for key, value in after.items():  # at bf16: the module's bf16 weights (the ones the run computed with), in fp32
        expected = value.float() if value.is_floating_point() else value
        assert exported[key].dtype == expected.dtype and torch.equal(exported[key], expected), key

    state, _ = load_encoder(tmp_path / "run")  # finetune.init=RUN, probe --init RUN
    assert all(torch.equal(state[key], exported[key]) for key in exported)


def test_a_finetuning_from_a_run_folder_says_which_checkpoint_it_took(world_of_one, tmp_path, caplog):
    """`finetune.init=RUN` takes the run's newest intact checkpoint, which a pretraining still running moves on
    from: the log and run.json named the folder alone, so which step a fine-tuning started from was lost."""
    import logging

    from mixmae_scale.config import load_resolved
    from mixmae_scale.finetune.job import build_classifier, started_from
    from mixmae_scale.finetune.pretrained import finetune_start
    from mixmae_scale.models.mixmae import swin_shape

    run = tmp_path / "pretrain-run"
    config = load_resolved("finetune_tiny", overrides=[f"finetune.init={run}"]).config
    torch.manual_seed(0)
    checkpoint, _ = trained_checkpoint(SwinClassifier(swin_shape(config.model), 10), run, 0, "fp32", None)
    pretrained = finetune_start(config.finetune.init)
    assert pretrained.checkpoint == checkpoint and pretrained.step == 1
    with caplog.at_level(logging.INFO, logger="mixmae.finetune"):
        build_classifier(config, 10, pretrained)
    assert f"loaded {run} (checkpoint step00000001, step 1: {checkpoint})" in caplog.text
    assert started_from(config, pretrained) == {"key": "finetune.init", "path": str(run.resolve()),
                                                "checkpoint": str(checkpoint.resolve()), "tag": "step00000001",
                                                "step": 1}
    config.finetune.init = "random"
    assert started_from(config, finetune_start("random")) == {"key": "finetune.init", "path": "random"}
    config.finetune.init = str(run)
    assert started_from(config, finetune_start(str(run), resuming=True)) is None  # a resume: the record keeps its own
