"""The dense backbone: the official fine-tuning model's per-stage outputs at its own size, exact window padding
on other sizes, the position embedding for any grid, the official key layout both ways, and a torchvision
detector that learns from it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from timm.layers import build_sincos2d_pos_embed

from mixmae_scale.models.backbone import (
    SwinBackbone,
    load_backbone,
    official_sincos,
    position_embedding_for,
    run_block_padded,
)
from mixmae_scale.models.convert_official import (
    WeightsError,
    convert_official_checkpoint,
    load_weights,
    read_official,
    save_official,
    save_weights,
)
from mixmae_scale.models.window_attention import relative_position_index
from tests.unit.test_official_fixture import require_fixture

FIXTURE = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "official-mixmim-ft-small"


@pytest.fixture(scope="module")
def official_ft():
    require_fixture(FIXTURE / "official_ft_small.pth")
    return read_official(FIXTURE / "official_ft_small.pth"), torch.load(FIXTURE / "ref_ft_small.pt", weights_only=True)


def test_maps_at_the_pretraining_size_are_the_official_models_stage_outputs(official_ft):
    _, reference = official_ft
    backbone = load_backbone(FIXTURE / "official_ft_small.pth").eval()
    with torch.no_grad():
        maps = backbone(reference["images"])
    assert backbone.out_channels == [32, 64, 128, 256]
    assert [m.shape[-1] for m in maps] == [56, 28, 14, 7]  # strides 4, 8, 16, 32 of 224
    for ours, theirs in zip(maps, reference["stage_tokens"], strict=True):
        assert (ours.flatten(2).transpose(1, 2) - theirs).abs().max() < 1e-5


def test_a_non_square_input_of_another_size_gives_maps_at_strides_4_to_32(small_shape):
    backbone = SwinBackbone(small_shape).eval()
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, 96, 160))  # 128 px pretraining size; windows 8/8/8/4 need padding here
    assert [tuple(m.shape) for m in maps] == [(2, c, 96 // s, 160 // s) for c, s in
                                              zip(backbone.out_channels, (4, 8, 16, 32), strict=True)]
    assert all(torch.isfinite(m).all() for m in maps)


def test_an_input_not_divisible_by_32_is_refused_with_the_size(small_shape):
    with pytest.raises(ValueError, match=r"100x128 is not divisible by 32"):
        SwinBackbone(small_shape)(torch.randn(1, 3, 100, 128))


def reference_block(block, x: torch.Tensor) -> torch.Tensor:
    """The block computed window by window over the real tokens only: what masking the padding must equal."""
    b, h, w, c = x.shape
    window, attn = block.window, block.attn
    normed = block.norm1(x)
    out = torch.zeros_like(x)
    index = relative_position_index(window)
    for top in range(0, h, window):
        for left in range(0, w, window):
            rows = range(top, min(top + window, h))
            cols = range(left, min(left + window, w))
            local = torch.tensor([(r - top) * window + (q - left) for r in rows for q in cols])
            tokens = normed[:, top:top + len(rows), left:left + len(cols)].reshape(b, -1, c)
            qkv = attn.qkv(tokens).view(b, len(local), 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            bias = attn.relative_position_bias_table[index[local][:, local]].permute(2, 0, 1)
            weights = ((qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1) + bias).softmax(-1)
            mixed = (weights @ qkv[2]).transpose(1, 2).reshape(b, len(local), c)
            out[:, top:top + len(rows), left:left + len(cols)] = attn.proj(mixed).view(b, len(rows), len(cols), c)
    x = x + out
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("grid", [(8, 8), (10, 13), (3, 5)])
def test_padded_windows_equal_attention_over_the_real_tokens_alone(small_shape, grid):
    torch.manual_seed(0)
    block = SwinBackbone(small_shape).encoder.layers[0].blocks[0].eval()  # window 8
    x = torch.randn(2, *grid, small_shape.embed_dim)
    with torch.no_grad():
        assert (run_block_padded(block, x) - reference_block(block, x)).abs().max() < 1e-5


@pytest.mark.parametrize("formula", [official_sincos, lambda h, w, d: build_sincos2d_pos_embed([h, w], d)])
def test_the_position_embedding_of_any_grid_continues_the_stored_one(formula):
    stored = formula(6, 6, 16)[None]
    grid = position_embedding_for(stored, 4, 9).view(4, 9, 16)
    wide = formula(9, 9, 16).view(9, 9, 16)
    assert torch.equal(grid, wide[:4, :9])  # token (i, j) gets the same vector on every grid
    assert torch.equal(position_embedding_for(stored, 6, 6), stored)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_position_embedding_stored_in_half_precision_still_continues_the_formula(dtype):
    """A module cast whole to bf16 (DeepSpeed before it kept buffers in fp32) stores the formula rounded: at 1e-5
    it was taken for a resized embedding and resized bicubically, up to 1.9 off on a 96-px crop of a 64-px model."""
    stored = official_sincos(6, 6, 32)[None].to(dtype)
    grid = position_embedding_for(stored, 9, 9)
    assert grid.dtype == dtype and torch.equal(grid, official_sincos(9, 9, 32)[None].to(dtype))


def test_an_embedding_of_neither_layout_is_resized():
    stored = torch.randn(1, 36, 8)
    resized = position_embedding_for(stored, 12, 6)
    assert resized.shape == (1, 72, 8) and not torch.isnan(resized).any()


def test_the_maps_and_the_position_embedding_are_made_on_the_buffers_device(small_shape):
    """The layout check built the formula on the CPU and compared it with the buffer wherever it lived: the first
    forward on a GPU failed ("Expected all tensors to be on the same device"). `meta` stands in for the GPU here:
    the same mix of devices failed the same way on it."""
    backbone = SwinBackbone(small_shape).eval().to("meta")
    with torch.no_grad():
        maps = backbone(torch.empty(1, 3, 96, 160, device="meta"))
    assert all(m.device.type == "meta" for m in maps)
    assert backbone.encoder.absolute_pos_embed.device.type == "meta"  # the stored buffer was not moved
    assert all(e.device.type == "meta" for e in backbone._position_cache.values())


def test_the_position_cache_keeps_the_last_sizes_used_and_no_more(small_shape):
    from mixmae_scale.models.backbone import POSITION_CACHE_SIZES

    backbone = SwinBackbone(small_shape)
    sizes = [(8, 8 + i) for i in range(POSITION_CACHE_SIZES + 3)]
    first = backbone.position(*sizes[0])
    for size in sizes:
        backbone.position(*size)
    backbone.position(*sizes[4])  # used again: kept over older ones
    backbone.position(9, 9)
    kept = [key[:2] for key in backbone._position_cache]
    assert len(kept) == POSITION_CACHE_SIZES and kept[-2:] == [sizes[4], (9, 9)] and sizes[0] not in kept
    assert torch.equal(backbone.position(*sizes[0]), first)  # made again, the same


def test_weights_loaded_through_a_parent_module_replace_the_cached_embedding(small_shape):
    """A segmentation model's or a checkpoint's load reaches the backbone as a submodule, not through its own
    load_state_dict: the cached formula outlived a resized embedding loaded that way."""
    backbone = SwinBackbone(small_shape)
    backbone.position(8, 12)  # cached: the formula of the fresh model's layout
    parent = torch.nn.ModuleDict({"backbone": backbone})
    state = parent.state_dict()
    state["backbone.encoder.absolute_pos_embed"] = torch.randn_like(state["backbone.encoder.absolute_pos_embed"])
    parent.load_state_dict(state)
    assert torch.equal(backbone.position(8, 12),
                       position_embedding_for(state["backbone.encoder.absolute_pos_embed"], 8, 12))


def test_checkpointed_blocks_give_the_same_maps_and_gradients(small_shape, monkeypatch):
    """Equal maps and gradients only mean something if the blocks did run under `checkpoint`: its calls are
    counted, one per block of the small shape's five in the checkpointed backbone, none in the plain one."""
    import mixmae_scale.models.backbone as backbone_module

    calls = [0]
    real = backbone_module.checkpoint

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(backbone_module, "checkpoint", counting)
    torch.manual_seed(0)
    plain = SwinBackbone(small_shape)
    checkpointed = SwinBackbone(small_shape, checkpoint_blocks=True)
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randn(1, 3, 64, 96)
    losses = []
    for model, expected_calls in ((plain, 0), (checkpointed, sum(small_shape.depths))):
        losses.append(sum(m.square().mean() for m in model(images)))
        assert calls[0] == expected_calls
    for loss in losses:
        loss.backward()
    assert torch.allclose(losses[0], losses[1])
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        assert a.grad is not None, f"{name} gets no gradient"  # DDP and DeepSpeed refuse unused parameters
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_the_official_layer_decay_groups_apply_to_the_backbone(small_shape):
    from mixmae_scale.finetune.layer_decay import param_groups_layer_decay

    backbone = SwinBackbone(small_shape)
    groups = param_groups_layer_decay(backbone, backbone.depths, base_lr=1e-3, weight_decay=0.05, decay=0.7)
    by_name = {name: group for group in groups for name in group["names"]}
    assert set(by_name) == {n for n, p in backbone.named_parameters() if p.requires_grad}
    n = sum(small_shape.depths)
    assert math.isclose(by_name["encoder.patch_embed.proj.weight"]["lr_scale"], 0.7 ** (n + 1))
    assert math.isclose(by_name["encoder.layers.0.blocks.0.attn.qkv.weight"]["lr_scale"], 0.7 ** n)


def official_encoder_keys(depths: tuple[int, ...]) -> set[str]:
    """The encoder keys of the official fine-tuning model (`models_mixmim_ft.MixMIM`) of these depths, head aside:
    checked against the official code's own state dict below, used on runs we train in the integration tests."""
    keys = {"absolute_pos_embed", "norm.weight", "norm.bias"}
    keys |= {f"patch_embed.{m}.{p}" for m in ("proj", "norm") for p in ("weight", "bias")}
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "attn.relative_position_bias_table", "attn.relative_position_index", "norm2.weight", "norm2.bias",
             "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    for s, depth in enumerate(depths):
        keys |= {f"layers.{s}.blocks.{b}.{name}" for b in range(depth) for name in block}
        if s < len(depths) - 1:
            keys |= {f"layers.{s}.downsample.{name}" for name in ("norm.weight", "norm.bias", "reduction.weight")}
    return keys


def test_the_official_layout_has_the_official_models_keys_and_shapes_and_imports_back(official_ft, tmp_path):
    official, _ = official_ft
    assert official_encoder_keys((1, 1, 2, 1)) == {k for k in official if not k.startswith("head.")}
    ours = tmp_path / "ours.safetensors"
    convert_official_checkpoint(FIXTURE / "official_ft_small.pth", ours)
    state, _ = load_weights(ours)
    written = tmp_path / "official.pth"
    save_official(written, state)
    exported = torch.load(written, weights_only=True)["model"]
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v.shape) for k, v in official.items()}
    for key, value in official.items():
        assert torch.equal(exported[key], value), key
    back = tmp_path / "back.safetensors"
    convert_official_checkpoint(written, back)
    again, _ = load_weights(back)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)


def test_a_run_folder_gives_its_exported_encoder_and_says_how_to_export_one(small_shape, tmp_path):
    backbone = SwinBackbone(small_shape)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {}\n")  # what every run writes when it starts
    with pytest.raises(WeightsError, match=r"mixmae export .*run"):
        load_backbone(run)
    arch = {"img_size": 128}  # load_backbone reads the shape off the weights, not the metadata
    weights = {**backbone.state_dict(), "encoder.norm.weight": torch.ones(128), "encoder.norm.bias": torch.zeros(128)}
    save_weights(run / "encoder.safetensors", weights, arch, "encoder")  # as an export has it, final norm too
    loaded = load_backbone(run)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in backbone.state_dict().items())


def test_a_fine_tuning_runs_export_gives_its_encoder_and_a_stale_export_is_said(small_shape, tmp_path, caplog):
    """`mixmae export RUN` writes classifier.safetensors for a fine-tuning run, which the run folder's lookup did not
    read: its advice to export looped. An export older than the run's newest checkpoint is used, with a warning."""
    from mixmae_scale.engine.checkpointing.store import MARKER, tag_for

    backbone = SwinBackbone(small_shape)
    run = tmp_path / "finetune"
    run.mkdir()
    (run / "config.yaml").write_text("finetune: {}\n")
    with pytest.raises(WeightsError, match="classifier.safetensors for a fine-tuning run"):
        load_backbone(run)
    weights = {**backbone.state_dict(), "encoder.norm.weight": torch.ones(128), "encoder.norm.bias": torch.zeros(128),
               "head.weight": torch.zeros(3, 128), "head.bias": torch.zeros(3)}
    save_weights(run / "classifier.safetensors", weights, {}, "finetune", provenance={"step": "40"})
    for tag in (tag_for(40), tag_for(80, "-nonfinite")):  # a non-finite stop's is not what export takes
        (run / "checkpoints" / tag).mkdir(parents=True)
        (run / "checkpoints" / tag / MARKER).write_text("{}")
    with caplog.at_level("WARNING"):
        loaded = load_backbone(run)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in backbone.state_dict().items())
    assert not caplog.records
    (run / "checkpoints" / tag_for(60)).mkdir()
    (run / "checkpoints" / tag_for(60) / MARKER).write_text("{}")
    with caplog.at_level("WARNING"):
        load_backbone(run)
    assert "holds step 40 of the run; its newest complete checkpoint is step 60: `mixmae export" in caplog.text


def test_the_fpn_reads_each_map_through_its_own_layernorm_and_the_backbone_keeps_the_raw_maps(small_shape):
    """torchvision's FPN normalises nothing (norm_layer=None) and read the raw stage outputs, where mmdet's Swin and
    the official Swin detection code put a LayerNorm on each output stage (`norm{i}`). The backbone's own maps stay
    raw: the official fixture test above compares them with the official model's stage outputs."""
    from mixmae_scale.models.detection import SwinFPN

    torch.manual_seed(0)
    backbone = SwinBackbone(small_shape).eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        raw = backbone(images)
        normed = SwinFPN(backbone, out_channels=32).stage_maps(images)
        unnormed = SwinFPN(backbone, out_channels=32, stage_norms=False).stage_maps(images)
    for m, n, u in zip(raw, normed, unnormed, strict=True):
        assert torch.equal(u, m)  # opt-out: the raw maps, as before
        channels = n.permute(0, 2, 3, 1)  # a fresh LayerNorm: zero mean, unit variance over each position's channels
        assert channels.mean(-1).abs().max() < 1e-5 and (channels.var(-1, unbiased=False) - 1).abs().max() < 1e-2
    assert [tuple(n.weight.shape) for n in SwinFPN(backbone).norms] == [(c,) for c in backbone.out_channels]


def test_a_faster_rcnn_on_the_backbone_learns_boxes():
    """torchvision's Faster R-CNN with an FPN over the backbone, a few SGD steps on drawn rectangles whose boxes
    are known: its total loss falls."""
    from torchvision.models.detection import FasterRCNN

    from mixmae_scale.models.detection import SwinFPN
    from mixmae_scale.models.swin import SwinShape

    torch.manual_seed(0)
    shape = SwinShape(img_size=128, patch_size=4, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                      window_size=(8, 8, 8, 4))
    model = FasterRCNN(SwinFPN(SwinBackbone(shape), out_channels=32), num_classes=3, min_size=128, max_size=160,
                       rpn_batch_size_per_image=64, box_batch_size_per_image=32)
    generator = torch.Generator().manual_seed(1)
    images, targets = [], []
    for i in range(4):
        image = torch.rand(3, 128, 128, generator=generator) * 0.3
        x0, y0 = (int(v) for v in torch.randint(8, 60, (2,), generator=generator))
        x1, y1 = x0 + 40 + 10 * (i % 2), y0 + 30 + 12 * (i // 2)
        image[i % 3, y0:y1, x0:x1] = 1.0
        images.append(image)
        targets.append({"boxes": torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32),
                        "labels": torch.tensor([1 + i % 2])})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    losses = []
    # 16 steps: with the FPN's per-stage norms 12 steps ended at 0.66 (AVX-512) and 0.68 (AVX2) of the first
    # losses, too near the bound; 16 end at 0.49 and 0.53 (measured here on both).
    for _ in range(16):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


def test_a_checkpoint_folder_is_called_one_and_the_advice_names_an_export_to_a_file_or_its_run(tmp_path):
    """finetune.init and --init take RUN/checkpoints/stepN; load_backbone called it "a run folder without an export"
    and advised `mixmae export RUN/checkpoints/stepN`, which writes RUN/encoder.safetensors: the same call then
    failed the same way. It names the file to export to, or the run folder."""
    from mixmae_scale.engine.checkpointing.store import MARKER, tag_for

    run = tmp_path / "run"
    step = run / "checkpoints" / tag_for(162)
    step.mkdir(parents=True)
    (step / MARKER).write_text("{}")
    for named in (step, run / "checkpoints"):
        with pytest.raises(WeightsError) as refused:
            load_backbone(named)
        said = str(refused.value)
        assert "a run folder without an export" not in said and f"a checkpoint folder of the run {run}" in said
        assert f"`mixmae export {named} --out FILE.safetensors`" in said and f"`mixmae export {run}`" in said


def test_a_step_folder_copied_out_of_its_run_names_no_run(tmp_path):
    """A sealed step folder copied on its own (its grandparent is no run): the advice named the grandparent as the run
    and `mixmae export <grandparent>`, which finds no checkpoint there; only the --out export is offered."""
    from mixmae_scale.engine.checkpointing.store import MARKER, tag_for

    step = tmp_path / "copies" / tag_for(162)
    step.mkdir(parents=True)
    (step / MARKER).write_text("{}")
    with pytest.raises(WeightsError) as refused:
        load_backbone(step)
    said = str(refused.value)
    assert f"`mixmae export {step} --out FILE.safetensors`" in said and "of the run" not in said
    assert f"`mixmae export {tmp_path}`" not in said


def test_a_pth_of_other_keys_is_refused_naming_the_file(tmp_path):
    """A .pth that is not an official checkpoint (the fixture's reference outputs, another model's weights): the
    key mapping's refusal reached the user without the file it was about, as finetune.init's and --init's name it."""
    other = tmp_path / "reference_outputs.pt"
    torch.save({"model": {"images": torch.zeros(2, 3), "loss": torch.tensor(1.0)}}, other)
    with pytest.raises(WeightsError) as refused:
        load_backbone(other)
    assert str(other.absolute()) in str(refused.value) and "no place in our model" in str(refused.value)


def test_a_folder_that_is_no_run_names_the_weights_in_it_not_an_export_that_would_fail(small_shape, tmp_path):
    """A folder of downloaded checkpoints (the official fixtures' folder) was called "a run folder without an export"
    and sent to `mixmae export FOLDER`, which refuses it as not a run folder; a run folder whose one export is
    `mixmae export RUN --best`'s classifier-best.safetensors was told it had none. Both name the files to pass."""
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "mixmim_small.pth").write_bytes(b"")
    (downloads / "notes.txt").write_text("")
    with pytest.raises(WeightsError) as refused:
        load_backbone(downloads)
    said = str(refused.value)
    assert "not a run folder" in said and "mixmim_small.pth" in said and "notes.txt" not in said
    assert "mixmae export" not in said
    run = tmp_path / "finetune"
    (run / "checkpoints").mkdir(parents=True)
    save_weights(run / "classifier-best.safetensors", SwinBackbone(small_shape).state_dict(), {}, "finetune")
    with pytest.raises(WeightsError) as refused:
        load_backbone(run)
    assert "it holds classifier-best.safetensors: name one of them" in str(refused.value)
