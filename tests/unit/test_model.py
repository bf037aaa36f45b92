"""MixMAE model behaviour: isolation of the two images, mixing, the dual loss, attention paths, sizes."""

from __future__ import annotations

import pytest
import torch

from mixmae_scale.models.mixing import mix_tokens, sample_mask, stage_source_masks, upsample_mask
from mixmae_scale.models.mixmae import MixMAE, normalized_target, patchify, unmix_predictions, unpatchify


def _images(batch: int, size: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _fixed_mask(model: MixMAE, seed: int = 1) -> torch.Tensor:
    return model.sample_mask(torch.Generator().manual_seed(seed))


def test_mask_has_the_configured_ratio_and_is_reproducible(small_mixmae):
    a = _fixed_mask(small_mixmae, 3)
    b = _fixed_mask(small_mixmae, 3)
    assert torch.equal(a, b)
    assert a.numel() == 16 and int(a.sum()) == 8
    assert int(sample_mask(7, 0.5).sum()) == 24  # the published 7x7 grid: floor(49 * 0.5) cells
    ratios = {int(sample_mask(7, 0.5, 0.3, torch.Generator().manual_seed(s)).sum()) for s in range(20)}
    assert len(ratios) > 1 and min(ratios) >= 24 and max(ratios) <= int(49 * 0.8)


def test_tokens_of_one_image_never_see_the_other(small_mixmae):
    model = small_mixmae
    images = _images(4)
    mask = _fixed_mask(model)
    visible_i = upsample_mask(mask, model.grid) == 0  # where image 0 is visible in mixed[0]
    with torch.no_grad():
        before = model.forward_encoder(images, mask)
        changed = images.clone()
        changed[-1] = torch.randn_like(changed[-1])  # the partner of image 0
        after = model.forward_encoder(changed, mask)
        # Control: with the same-source masks removed, the same change does leak into image 0's tokens,
        # so the assertion below is sensitive to the masks and not vacuous.
        tokens = model.encoder.add_position(mix_tokens(model.encoder.embed(changed), mask))
        leaked = model.encoder.forward_tokens(tokens, None)
        tokens = model.encoder.add_position(mix_tokens(model.encoder.embed(images), mask))
        unmasked = model.encoder.forward_tokens(tokens, None)
    assert torch.allclose(before[0][visible_i], after[0][visible_i], atol=1e-6, rtol=0)
    assert not torch.allclose(before[0][~visible_i], after[0][~visible_i], atol=1e-3)
    assert not torch.allclose(unmasked[0][visible_i], leaked[0][visible_i], atol=1e-3)


def test_each_mixed_token_is_the_embedding_of_its_source_image(small_mixmae):
    images = _images(6)
    mask = _fixed_mask(small_mixmae)
    with torch.no_grad():
        emb = small_mixmae.encoder.embed(images)
        mixed = mix_tokens(emb, mask)
    m = upsample_mask(mask, emb.shape[1]).bool()
    for i in range(6):
        assert torch.equal(mixed[i][~m], emb[i][~m])
        assert torch.equal(mixed[i][m], emb[5 - i][m])


def test_odd_micro_batch_is_rejected(small_mixmae):
    with pytest.raises(ValueError, match="must be even"):
        small_mixmae(_images(3))


def test_loss_equals_its_definition(small_mixmae):
    model = small_mixmae
    images = _images(4)
    mask = _fixed_mask(model)
    with torch.no_grad():
        out = model(images, mask=mask)
        features = model.forward_encoder(images, mask).flatten(1, 2)
        streams = model.decoder(features, mask)
    batch, cell = 4, model.cell
    total, count = 0.0, 0
    for i in range(batch):
        for pos in range(mask.numel()):
            row, col = divmod(pos, model.grid)
            pixels = images[i, :, row * cell:(row + 1) * cell, col * cell:(col + 1) * cell]
            target = pixels.permute(1, 2, 0).reshape(-1)
            target = (target - target.mean()) / (target.var(unbiased=True) + 1e-6).sqrt()
            # hidden in stream 1 (m = 1): predicted there; else from stream 2's row for image i.
            pred = streams[i, pos] if mask[pos] == 1 else streams[batch + (batch - 1 - i), pos]
            total += float(((pred - target) ** 2).sum())
            count += target.numel()
    assert out.loss.item() == pytest.approx(total / count, rel=1e-5)


def test_every_position_is_scored_exactly_once_from_the_stream_where_it_was_hidden():
    batch, cells, width = 6, 16, 1
    mask = sample_mask(4, 0.5, generator=torch.Generator().manual_seed(5))
    ids = torch.arange(2 * batch * cells, dtype=torch.float64).view(2 * batch, cells, width)
    picked = unmix_predictions(ids, mask).flatten().long().tolist()
    assert len(picked) == len(set(picked)) == batch * cells
    for i in range(batch):
        for pos in range(cells):
            row, col = divmod(picked[i * cells + pos], cells)
            if row < batch:  # stream 1 keeps image `row` where m = 0, so it scores m = 1 cells of `row`
                assert row == i and mask[col] == 1
            else:  # stream 2 row j keeps image B-1-j where m = 1, so it scores m = 0 cells of image B-1-j
                assert 2 * batch - 1 - row == i and mask[col] == 0
            assert col == pos


def test_patchify_round_trip_and_target_normalisation():
    images = _images(2, 64)
    patches = patchify(images, 32)
    assert patches.shape == (2, 4, 32 * 32 * 3)
    assert torch.equal(unpatchify(patches, 32), images)
    target = normalized_target(images, 32, True)
    assert torch.allclose(target.mean(-1), torch.zeros(2, 4), atol=1e-5)
    assert torch.allclose(target.var(-1), torch.ones(2, 4), atol=1e-3)


def test_given_mask_makes_the_forward_deterministic(small_mixmae):
    images = _images(4)
    mask = _fixed_mask(small_mixmae)
    with torch.no_grad():
        a, b = small_mixmae(images, mask=mask), small_mixmae(images, mask=mask)
        c = small_mixmae(images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.pred, b.pred)
    assert torch.equal(c.mask, mask) and torch.equal(c.loss, a.loss)


def _loss_and_grads(model: MixMAE, images: torch.Tensor, mask: torch.Tensor):
    model.zero_grad()
    out = model(images, mask=mask)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close_grads(a: dict, b: dict, rel: float) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        scale = a[name].abs().max().clamp_min(1e-12)
        assert (a[name] - b[name]).abs().max() / scale <= rel, name


class _CountingFunctional:
    """Stands in for `torch.nn.functional` inside models/window_attention.py: counts the window attention's
    fused kernel calls (the decoder's attention, which calls the same function, is not counted)."""

    def __init__(self, real):
        self._real, self.calls = real, 0

    def __getattr__(self, name):
        return getattr(self._real, name)

    def scaled_dot_product_attention(self, *args, **kwargs):
        self.calls += 1
        return self._real.scaled_dot_product_attention(*args, **kwargs)


def count_fused_window_attention(monkeypatch) -> _CountingFunctional:
    """The counter of WindowAttention's fused-kernel calls: one per encoder block and forward on the fused
    path, none on the reference path."""
    import mixmae_scale.models.window_attention as window_attention

    counter = _CountingFunctional(window_attention.F)
    monkeypatch.setattr(window_attention, "F", counter)
    return counter


def test_fused_and_reference_attention_agree(small_mixmae, monkeypatch):
    """The two paths agreeing proves nothing unless each ran: the fused kernel's calls are counted, one per
    block (five at the small shape) and forward on the fused path, none on the reference one."""
    fused_calls = count_fused_window_attention(monkeypatch)
    blocks = sum(small_mixmae.shape.depths)
    model = small_mixmae.train()
    images, mask = _images(4), _fixed_mask(small_mixmae)
    model.encoder.set_fused_attention(True)
    loss_fused, grads_fused = _loss_and_grads(model, images, mask)
    assert fused_calls.calls == blocks
    model.encoder.set_fused_attention(False)
    loss_ref, grads_ref = _loss_and_grads(model, images, mask)
    assert fused_calls.calls == blocks
    assert loss_fused.item() == pytest.approx(loss_ref.item(), rel=1e-5)
    _assert_close_grads(grads_fused, grads_ref, 1e-4)
    with torch.no_grad():
        features_ref = model.forward_encoder(images, mask)
        assert fused_calls.calls == blocks
        model.encoder.set_fused_attention(True)
        features_fused = model.forward_encoder(images, mask)
        assert fused_calls.calls == 2 * blocks
    assert ((features_ref - features_fused).abs().max() / features_ref.abs().max()).item() < 1e-5


@pytest.mark.parametrize("every,checkpointed", [(1, 5), (2, 3)])
def test_activation_checkpointing_gives_the_same_gradients(small_mixmae, every, checkpointed, monkeypatch):
    """Equal gradients only mean something if the blocks did run under `checkpoint`: its calls are counted
    (every block of the small shape's five at `every=1`, blocks 0, 2 and 4 at `every=2`, none plain)."""
    import mixmae_scale.models.swin as swin

    calls = [0]
    real = swin.checkpoint

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(swin, "checkpoint", counting)
    model = small_mixmae.train()
    images, mask = _images(4), _fixed_mask(small_mixmae)
    loss_plain, grads_plain = _loss_and_grads(model, images, mask)
    assert calls[0] == 0
    model.encoder.checkpoint_every = every
    loss_ckpt, grads_ckpt = _loss_and_grads(model, images, mask)
    assert calls[0] == checkpointed
    assert torch.equal(loss_plain, loss_ckpt)
    _assert_close_grads(grads_plain, grads_ckpt, 1e-6)


def test_bf16_autocast_forward_and_backward_stay_finite(small_mixmae):
    model = small_mixmae.train()
    images, mask = _images(4), _fixed_mask(small_mixmae)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, mask=mask)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_each_stage_merge_keeps_the_two_images_apart(small_mixmae):
    """MixMAE's isolation of the two images rests on every 2x2 patch merge reading tokens of one image only:
    the mask lives on the final grid and is upsampled per stage. So run each stage's real merging layer on
    tokens mixed as forward_encoder mixes them, then change only the partner image: the merged tokens the next
    stage's mask gives to image 0 must not move. The control (those it gives to the partner do move) keeps the
    check from passing on a merge that ignores its input."""
    model = small_mixmae
    mask = _fixed_mask(model, 2)
    generator = torch.Generator().manual_seed(3)
    merges = [(stage.downsample, res, dim) for stage, res, dim
              in zip(model.encoder.layers, model.shape.stage_resolutions, model.shape.stage_dims, strict=True)
              if stage.downsample is not None]
    assert len(merges) == len(model.shape.depths) - 1
    for merge, res, dim in merges:
        tokens = torch.randn(2, res, res, dim, generator=generator)  # image 0 and its partner, image 1
        changed = tokens.clone()
        changed[1] = torch.randn(res, res, dim, generator=generator)
        with torch.no_grad():
            before, after = merge(mix_tokens(tokens, mask)), merge(mix_tokens(changed, mask))
        partner = upsample_mask(mask, before.shape[1]).bool()  # the stage-(k+1) mask: where mixed[0] is image 1
        moved = (before[0] - after[0]).abs().amax(-1)
        assert moved[~partner].max() <= 1e-6, f"stage at {res}: a merged token of image 0 read the partner"
        assert moved[partner].min() > 1e-3, f"stage at {res}: a merged token of the partner did not change"


def test_each_stage_has_one_same_source_mask_per_window(small_shape):
    """The per-stage masks forward_encoder passes to the blocks: (windows, 1, tokens, tokens) at every stage."""
    mask = sample_mask(4, 0.5, generator=torch.Generator().manual_seed(2))
    masks = stage_source_masks(mask, small_shape.stage_resolutions, small_shape.stage_windows)
    expected = [((r // w) ** 2, 1, w * w, w * w) for r, w in zip(small_shape.stage_resolutions,
                                                                  small_shape.stage_windows, strict=True)]
    assert [tuple(m.shape) for m in masks] == expected


def test_a_half_precision_model_scores_against_the_fp32_pixel_target(small_mixmae):
    """As the official code (loss on fp32 pixels under fp16 autocast): a bf16 model given fp32 images
    makes its target from them, not from their bf16 rounding."""
    import copy

    from mixmae_scale.models.mixmae import normalized_target

    model = copy.deepcopy(small_mixmae).to(torch.bfloat16)
    images, mask = _images(4), _fixed_mask(small_mixmae)
    with torch.no_grad():
        out = model(images, mask=mask)
    fp32_target = normalized_target(images, model.cell, True)
    rounded_target = normalized_target(images.to(torch.bfloat16).float(), model.cell, True)
    assert (fp32_target - rounded_target).abs().max() > 1e-3  # the difference the test can see
    assert out.loss == (out.pred.float() - fp32_target).pow(2).mean()
    assert out.loss != (out.pred.float() - rounded_target).pow(2).mean()
