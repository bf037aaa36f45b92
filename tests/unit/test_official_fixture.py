"""Regression against the official MixMIM code itself: its outputs for a small model, fixed images and
a fixed mask (its README in the shared fixtures folder says how they were made). Our importer
converts its checkpoint; our model must give its loss and both decoder streams, in fp32 on the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mixmae_scale.models.convert_official import build_from_architecture, convert_official_checkpoint, load_weights

# Read in place from the shared folder beside the checkout (CI gets a copy there): 12 MB of official-code
# outputs stay out of the repository.
FIXTURE = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "official-mixmim-small"


def require_fixture(path: Path) -> None:
    """Skips without the fixture, except under CI=true: CI always has it, so there a missing one must fail the run
    instead of quietly skipping the parity check."""
    if path.exists():
        return
    message = f"the official-code fixture is not at {path.parent} (the shared folder beside the checkout)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI=true, and CI always has it: the parity check cannot be skipped there")
    pytest.skip(message)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    require_fixture(FIXTURE / "official_small.pth")
    out = tmp_path_factory.mktemp("official") / "small.safetensors"
    summary = convert_official_checkpoint(FIXTURE / "official_small.pth", out)
    assert summary["kind"] == "pretrain"
    state, arch = load_weights(out)
    reference = torch.load(FIXTURE / "ref_small.pt", weights_only=True)
    return state, arch, reference


@pytest.mark.parametrize("attention", ["fused", "reference"])
def test_loss_and_both_decoder_streams_match_the_official_code(official, attention, monkeypatch):
    from tests.unit.test_model import count_fused_window_attention

    state, arch, reference = official
    model = build_from_architecture(arch).eval()
    model.load_state_dict(state, strict=True)
    model.encoder.set_fused_attention(attention == "fused")
    images, mask = reference["images"], reference["mask_7x7"].flatten()
    fused_calls = count_fused_window_attention(monkeypatch)
    with torch.no_grad():
        loss = model(images, mask=mask).loss
        streams = model.decoder(model.forward_encoder(images, mask).flatten(1, 2), mask)
    # Two encoder forwards: every block on the fused kernel, or none of them on the reference path.
    assert fused_calls.calls == (2 * sum(model.shape.depths) if attention == "fused" else 0)
    expected = reference["loss"]
    assert abs(float(loss) - float(expected)) <= 2e-7 * abs(float(expected)), (float(loss), float(expected))
    assert streams.shape == reference["x_rec"].shape  # rows 0..B-1 stream 1, B..2B-1 stream 2
    assert (streams - reference["x_rec"]).abs().max() <= 2e-6


def test_a_missing_fixture_fails_under_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    absent = tmp_path / "official_small.pth"
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_fixture(absent)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="not at"):
        require_fixture(absent)
