"""Reconstruction pictures: panel layout, and that pasting puts the input back exactly where visible."""

from __future__ import annotations

import torch

from mixmae_scale.models.mixing import upsample_mask
from mixmae_scale.visualize.reconstruction import GAP, HEADER, PANELS, grid, reconstruct


def test_grid_has_one_row_per_pair_and_seven_panels(small_mixmae):
    images = torch.randn(6, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    mask = small_mixmae.sample_mask(torch.Generator().manual_seed(1))
    picture = grid(reconstruct(small_mixmae, images, mask))
    assert len(PANELS) == 7
    assert picture.shape == (HEADER + 3 * 128 + 4 * GAP, 7 * 128 + 8 * GAP, 3)
    assert picture.dtype.name == "uint8"
    assert grid(reconstruct(small_mixmae, images, mask), pairs=1).shape[0] == HEADER + 128 + 2 * GAP


def test_pasting_reproduces_the_input_exactly_where_it_was_visible(small_mixmae):
    images = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    mask = small_mixmae.sample_mask(torch.Generator().manual_seed(3))
    rec = reconstruct(small_mixmae, images, mask)
    visible = upsample_mask(mask, 128) == 0
    for i in range(4):
        assert torch.equal(rec.pasted[i][:, visible], rec.originals[i][:, visible])
        assert torch.equal(rec.pasted[i][:, ~visible], rec.stream1[i][:, ~visible])
        assert torch.equal(rec.mixed[i][:, ~visible], rec.originals[3 - i][:, ~visible])
    # The hidden cells are predictions, not the input: an untrained decoder cannot match it there.
    assert not torch.allclose(rec.pasted[0][:, ~visible], rec.originals[0][:, ~visible], atol=0.05)
