"""`model.attention=grouped`: attention over each window's same-source groups equals the masked attention.

The dense kernel has forward and backward on the CPU, so it is compared with the masked `fused` path on
both; FlexAttention's CPU backward does not exist on this torch, so its forward alone is compared here
(its backward is checked on a GPU by benchmarks/gpu/step_suite.py)."""

from __future__ import annotations

import pytest
import torch

from mixmae_scale.models.mixing import upsample_mask
from mixmae_scale.models.mixmae import MixMAE
from mixmae_scale.models.source_groups import dense_groups, flex_backward_exists
from mixmae_scale.models.swin import SwinShape

# FlexAttention outside torch.compile (the CPU forward checked here) warns that it is unfused.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# The published 224 px geometry (a 7x7 mask grid; windows 14, 14, 14, 7 over stages of 56, 28, 14, 7 tokens)
# at a toy width: stage 1's 14-token windows straddle the mask's 8-token cells, so splits are uneven there.
OFFICIAL_GRID = SwinShape(img_size=224, patch_size=4, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                          window_size=(14, 14, 14, 7))


def _official_mask() -> torch.Tensor:
    """24 of 49 cells, as ratio 0.5 draws, with the four cells under stage 1's first window all taken from
    the partner, so that window holds one source only."""
    mask = torch.zeros(49)
    rest = [c for c in torch.randperm(49, generator=torch.Generator().manual_seed(3)).tolist()
            if c not in (0, 1, 7, 8)]
    mask[[0, 1, 7, 8, *rest[:20]]] = 1
    return mask


def _model(shape: SwinShape) -> MixMAE:
    torch.manual_seed(0)
    return MixMAE(shape, decoder_dim=32, decoder_depth=1, decoder_heads=2).train()


def _loss_features_grads(model: MixMAE, images: torch.Tensor, mask: torch.Tensor, attention: str):
    model.attention = attention
    model.zero_grad()
    out = model(images, mask=mask)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        features = model.forward_encoder(images, mask)
    return out.loss.detach(), features, grads


def _count_grouped_layouts(monkeypatch) -> list[int]:
    """Counts the calls of the grouped branch's layout builder (`stage_source_groups`, as the model module
    names it): a comparison of `grouped` with `fused` proves nothing if both legs ran the masked path."""
    import mixmae_scale.models.mixmae as mixmae_module

    calls = [0]
    real = mixmae_module.stage_source_groups

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(mixmae_module, "stage_source_groups", counting)
    return calls


def _assert_grouped_equals_masked(model: MixMAE, images: torch.Tensor, mask: torch.Tensor, monkeypatch) -> None:
    grouped_calls = _count_grouped_layouts(monkeypatch)
    loss_m, feat_m, grads_m = _loss_features_grads(model, images, mask, "fused")
    assert grouped_calls[0] == 0  # the masked leg did not build groups
    loss_g, feat_g, grads_g = _loss_features_grads(model, images, mask, "grouped")
    assert grouped_calls[0] == 2  # the grouped leg did, once for the loss and once for the features
    assert grads_m.keys() == grads_g.keys() and "encoder.layers.0.blocks.0.attn.relative_position_bias_table" \
        in grads_g
    assert (loss_m - loss_g).abs().item() <= 1e-6 * loss_m.abs().item()
    assert (feat_m - feat_g).abs().max().item() <= 1e-5 * feat_m.abs().max().item()
    for name in grads_m:
        scale = grads_m[name].abs().max().clamp_min(1e-12)
        assert ((grads_m[name] - grads_g[name]).abs().max() / scale).item() <= 1e-4, name


@pytest.mark.parametrize("checkpoint_every", [0, 1])
def test_grouped_equals_masked_attention_forward_and_gradients_at_the_small_shape(small_shape, checkpoint_every,
                                                                                  monkeypatch):
    model = _model(small_shape)
    model.encoder.checkpoint_every = checkpoint_every  # the groups pass through activation checkpointing too
    mask = model.sample_mask(torch.Generator().manual_seed(1))
    images = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    _assert_grouped_equals_masked(model, images, mask, monkeypatch)


def test_official_mask_has_single_source_windows_and_unequal_splits():
    mask = _official_mask()
    stage1 = dense_groups(upsample_mask(mask, 56), 14)
    stage3 = dense_groups(upsample_mask(mask, 14), 14)
    sizes1 = dict(stage1.buckets)
    assert 196 in sizes1  # a window of one source: one group of all its tokens
    assert len(sizes1) > 3  # windows straddling 8-token cells split unevenly, in many sizes
    assert stage3.buckets == ((96, 1), (100, 1))  # 24 partner cells of 2x2 tokens, 25 own


def test_grouped_equals_masked_attention_at_the_official_mask_granularity(monkeypatch):
    model = _model(OFFICIAL_GRID)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    _assert_grouped_equals_masked(model, images, _official_mask(), monkeypatch)


def test_flex_kernel_forward_equals_masked_attention_on_the_cpu(monkeypatch):
    model = _model(OFFICIAL_GRID).eval()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    mask = _official_mask()
    grouped_calls = _count_grouped_layouts(monkeypatch)
    with torch.no_grad():
        masked = model.forward_encoder(images, mask)
        model.attention, model.group_kernel = "grouped", "flex"
        flex = model.forward_encoder(images, mask)
    assert grouped_calls[0] == 1  # the second forward, and only it, built groups
    assert (flex - masked).abs().max().item() <= 1e-5 * masked.abs().max().item()


def test_flex_kernel_is_chosen_only_where_its_backward_exists():
    assert not flex_backward_exists(torch.device("cpu"))
    assert flex_backward_exists(torch.device("cuda"))


def test_grouped_setting_leaves_the_unmixed_encoder_on_the_fused_path(small_shape):
    grouped, fused = _model(small_shape), _model(small_shape)
    grouped.attention = "grouped"
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(grouped.encoder(images), fused.encoder(images))


@pytest.mark.parametrize("attention,kernel", [("fused", "auto"), ("grouped", "flex")])
def test_pretraining_forward_and_loss_trace_without_graph_breaks(small_shape, attention, kernel):
    import torch._dynamo

    model = _model(small_shape)
    model.attention, model.group_kernel = attention, kernel
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    mask = model.sample_mask(torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    # FlexAttention refuses inputs that require grad on the CPU (no backward there), even to trace them.
    with torch.set_grad_enabled(kernel != "flex"):
        report = torch._dynamo.explain(lambda x, m: model(x, mask=m).loss)(images, mask)
    assert report.graph_count == 1 and report.graph_break_count == 0, report.break_reasons


def test_grouped_attention_and_whole_step_compile_are_settings_that_cpu_defaults_leave_off():
    from mixmae_scale.config import ConfigError, load_resolved
    from mixmae_scale.models.mixmae import build_mixmae

    default = load_resolved("tiny", world_size=1)
    assert default.config.model.attention == "fused" and not default.derived.compile_whole
    chosen = load_resolved("tiny", overrides=["model.attention=grouped", "model.compile=whole"], world_size=1)
    assert chosen.derived.compile and chosen.derived.compile_whole
    with torch.device("meta"):
        assert build_mixmae(chosen.config.model).attention == "grouped"
    with pytest.raises(ConfigError, match="model.compile=whole .* zero.stage=3"):
        load_resolved("tiny", overrides=["model.compile=whole", "zero.stage=3"], world_size=1)


def test_whole_compile_wraps_the_whole_forward_and_not_the_blocks(small_mixmae):
    from mixmae_scale.models import regional_compile

    if regional_compile.compiler_unavailable(torch.device("cpu")):
        pytest.skip(regional_compile.compiler_unavailable(torch.device("cpu")))
    blocks_before = [type(b.forward) for b in small_mixmae.encoder.layers[0].blocks]
    assert regional_compile.maybe_compile(small_mixmae, True, torch.device("cpu"), whole=True) == 1
    assert hasattr(small_mixmae.forward, "_torchdynamo_orig_callable")
    assert [type(b.forward) for b in small_mixmae.encoder.layers[0].blocks] == blocks_before


def test_compiled_blocks_take_flex_groups_as_inputs_without_recompiling_per_mask(small_shape, monkeypatch):
    import torch._dynamo

    from mixmae_scale.models.regional_compile import compile_blocks
    from mixmae_scale.models.swin import SwinBlock

    compiled, reference = _model(small_shape), _model(small_shape)
    compiled.attention, compiled.group_kernel = "grouped", "flex"
    torch._dynamo.reset()
    compile_blocks(compiled, (SwinBlock,), backend="eager")  # dynamo's tracing and guards, no code generation
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    grouped_calls = _count_grouped_layouts(monkeypatch)
    with torch.no_grad():
        for seed in range(3):
            mask = compiled.sample_mask(torch.Generator().manual_seed(seed))
            with torch._dynamo.config.patch(error_on_recompile=seed > 0):
                grouped = compiled.forward_encoder(images, mask)
            masked = reference.forward_encoder(images, mask)
            assert (grouped - masked).abs().max().item() <= 1e-5 * masked.abs().max().item()
    assert grouped_calls[0] == 3  # every compiled forward took groups, the reference none
