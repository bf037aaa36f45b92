"""Parameter and FLOP counts against the published tables (built on the meta device: no memory)."""

from __future__ import annotations

import pytest

from mixmae_scale.config import load_resolved
from mixmae_scale.models.flops import model_report


def _report(size: str) -> dict:
    profile = {"base": "swin_b", "large": "swin_l", "huge": "swin_h", "tiny": "tiny"}[size]
    return model_report(load_resolved(profile).config.model)


@pytest.mark.parametrize("size, params_m, gflops", [("base", 88, 16.3), ("large", 197, 35.9)])
def test_published_sizes_match_the_tables(size, params_m, gflops):
    report = _report(size)
    # The tables count the encoder with its 1000-class head, as the Swin papers do.
    assert report["encoder_params_with_head"] / 1e6 == pytest.approx(params_m, rel=0.01)
    assert report["encoder_gflops"] == pytest.approx(gflops, rel=0.02)


def test_huge_is_about_655m_parameters():
    report = _report("huge")
    assert 650e6 <= report["encoder_params"] <= 660e6
    assert 650e6 <= report["encoder_params_with_head"] <= 660e6


def test_tiny_is_a_few_million_parameters():
    report = _report("tiny")
    assert 1e6 <= report["pretrain_params"] <= 6e6 and report["img_size"] == 96


def test_flops_follow_the_shape_not_a_table():
    base = _report("base")
    wider = model_report(load_resolved("swin_b", overrides=["model.size=custom", "model.embed_dim=256",
                                                            "model.depths=[2,2,18,2]", "model.num_heads=[8,16,32,64]",
                                                            "model.window_size=[14,14,14,7]", "model.decoder_dim=512",
                                                            "model.decoder_depth=8", "model.decoder_heads=16"]
                                       ).config.model)
    # Doubling the width roughly quadruples the linear-layer work (attention terms grow only 2x).
    assert 3.5 < wider["encoder_gflops"] / base["encoder_gflops"] < 4.0
