"""The fast step's parts: masks made once per forward in the attention dtype, the single-read step decision,
and regional compilation that matches eager and does not recompile when the mask changes."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist

from mixmae_scale.engine.step import step_decision
from mixmae_scale.models import mixing, regional_compile
from mixmae_scale.models.mixing import sample_mask, upsample_mask
from mixmae_scale.models.mixmae import MixMAE
from mixmae_scale.models.swin import SwinShape
from mixmae_scale.models.window_attention import same_source_mask


def _small_mixmae(checkpoint_every: int = 0) -> MixMAE:
    """Two stages, one block each: the smallest model with every kind of block, cheap to compile."""
    torch.manual_seed(0)
    shape = SwinShape(img_size=32, patch_size=4, embed_dim=32, depths=(1, 1), num_heads=(1, 2), window_size=(4, 4))
    return MixMAE(shape, decoder_dim=32, decoder_depth=1, decoder_heads=2, checkpoint_every=checkpoint_every)


def test_same_source_mask_is_made_in_the_attention_dtype():
    source = upsample_mask(sample_mask(7, 0.5, generator=torch.Generator().manual_seed(3)), 56)
    full, half = same_source_mask(source, 14), same_source_mask(source, 14, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and full.dtype == torch.float32
    assert torch.equal(half.float(), full)
    ids = source.view(4, 14, 4, 14).permute(0, 2, 1, 3).reshape(16, 196)  # windows in row-major order
    same = ids[:, :, None] == ids[:, None, :]
    assert torch.equal(full[:, 0] == 0, same) and bool(torch.isneginf(full[:, 0][~same]).all())


def test_stage_masks_are_made_once_per_forward_in_autocast_dtype(monkeypatch):
    made: list[torch.dtype] = []
    original = mixing.same_source_mask

    def counting(source, window, dtype=torch.float32):
        made.append(dtype)
        return original(source, window, dtype)

    monkeypatch.setattr(mixing, "same_source_mask", counting)
    model = _small_mixmae()
    images = torch.randn(4, 3, 32, 32)
    model(images, generator=torch.Generator().manual_seed(0))
    assert made == [torch.float32] * 2  # one per stage, not one per block
    made.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(images, generator=torch.Generator().manual_seed(0))
    assert made == [torch.bfloat16] * 2


def test_mask_from_a_cpu_generator_is_unchanged():
    """Resumed runs and the held-out loss rely on a seed giving the same mask as before the device draw."""
    for seed in range(5):
        order = torch.randperm(49, generator=torch.Generator().manual_seed(seed))
        expected = torch.zeros(49)
        expected[order[:24]] = 1.0
        assert torch.equal(sample_mask(7, 0.5, generator=torch.Generator().manual_seed(seed)), expected)


def test_step_decision_reads_both_flags_and_alone_issues_no_collective(tmp_path, monkeypatch):
    """Several ranks agree in one reduction (test_faults.py's two worker processes: a NaN loss on one rank and a
    stop on the other reach both); a process alone (a sweep's run, the demo) skips the collective."""

    def no_collective(*args, **kwargs):
        raise AssertionError("an all_reduce at world size 1")

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    monkeypatch.setattr(dist, "all_reduce", no_collective)
    try:
        assert step_decision(torch.tensor(1.5), stop_requested=False) == (0, 0)
        assert step_decision(torch.tensor(float("nan")), stop_requested=False) == (1, 0)
        assert step_decision(torch.tensor(float("inf")), stop_requested=True) == (1, 1)
        assert step_decision(torch.tensor(0.5, requires_grad=True) * 2, stop_requested=True) == (0, 1)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("checkpoint_every", [0, 1])
def test_compiled_blocks_match_eager_and_never_recompile(checkpoint_every):
    """Dynamo's capture of the blocks (graphs, guards, recompiles) and AOT autograd's backward, with the
    `aot_eager` backend: what regional compilation itself decides. Inductor's generated code (the C++ compile of
    these graphs took about a minute of CI here) runs in the ZeRO-3 integration test, which compares a compiled
    run with an eager one (tests/integration/test_pretrain.py)."""
    from torch import _dynamo
    from torch._dynamo.utils import counters

    _dynamo.reset()
    counters.clear()
    eager, compiled = _small_mixmae(checkpoint_every), _small_mixmae(checkpoint_every)
    blocks = regional_compile.compile_blocks(compiled, regional_compile.block_types(), backend="aot_eager")
    assert blocks == 3  # 2 Swin + 1 decoder block
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for step in range(3):
        mask = sample_mask(4, 0.5, generator=torch.Generator().manual_seed(step))  # a new mask each step
        with _dynamo.config.patch(error_on_recompile=step > 0):
            losses = []
            for model in (eager, compiled):
                model.zero_grad()
                loss = model(images, mask=mask).loss
                loss.backward()
                losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad(), _dynamo.config.patch(error_on_recompile=False):  # evaluation: its own static graphs
        torch.testing.assert_close(compiled(images, mask=mask).loss, eager(images, mask=mask).loss, rtol=1e-5,
                                   atol=1e-6)
    # One static graph per (block shape, mode): 2 Swin stages + 1 decoder block, training and evaluation. Automatic
    # dynamic shapes would have merged stages into a symbolic graph; a recompile limit hit would show fewer.
    assert counters["stats"]["unique_graphs"] == 6


def test_compile_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(regional_compile, "compiler_unavailable", lambda device: "no C++ compiler (g++) on PATH")
    model = _small_mixmae()
    with caplog.at_level(logging.WARNING, logger=regional_compile.__name__):
        assert regional_compile.maybe_compile(model, True, torch.device("cpu")) == 0
    assert [r.getMessage() for r in caplog.records] == [
        "model.compile: no C++ compiler (g++) on PATH; the blocks run eagerly (set model.compile=false to silence "
        "this)"]
    assert regional_compile.maybe_compile(model, False, torch.device("cpu")) == 0
