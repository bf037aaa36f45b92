"""Initialisation as the official code: each parameter family's empirical statistics against its formula
(Swin-B at full size, so every family has enough elements for a tight estimate)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mixmae_scale.config import load_resolved
from mixmae_scale.models.mixmae import build_mixmae


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return build_mixmae(load_resolved("swin_b").config.model)


def test_every_linear_is_xavier_uniform_with_zero_bias(base_model):
    linears = [(n, m) for n, m in base_model.named_modules() if isinstance(m, nn.Linear)]
    families = {"encoder.layers.0.blocks.0.attn.qkv", "encoder.layers.2.blocks.5.mlp.fc1",
                "encoder.layers.1.downsample", "decoder.decoder_embed", "decoder.decoder_blocks.3.attn.proj",
                "decoder.decoder_pred"}
    assert families <= {n.removesuffix(".reduction") for n, _ in linears}
    for name, module in linears:
        fan_out, fan_in = module.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        w = module.weight.detach()
        assert w.abs().max() <= bound, name
        if w.numel() >= 4096:
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05), name
        if module.bias is not None:
            assert torch.count_nonzero(module.bias) == 0, name


def test_norms_are_one_and_zero_and_tables_and_mask_token_are_trunc_normal(base_model):
    for name, module in base_model.named_modules():
        if isinstance(module, nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name
    tables = torch.cat([p.detach().flatten() for n, p in base_model.named_parameters()
                        if n.endswith("relative_position_bias_table")])
    assert tables.std().item() == pytest.approx(0.02, rel=0.05) and tables.abs().max() <= 2.0
    token = base_model.decoder.mask_token.detach()
    assert token.std().item() == pytest.approx(0.02, rel=0.2) and torch.count_nonzero(token) == token.numel()


def test_patch_embedding_keeps_pytorch_conv_default(base_model):
    conv = base_model.encoder.patch_embed.proj
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert conv.weight.abs().max() <= bound and conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert conv.bias.abs().max() <= bound and torch.count_nonzero(conv.bias) > 0
