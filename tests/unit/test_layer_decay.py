"""Layer-wise lr decay and weight-decay groups against the official `param_groups_lrd`, parameter by
parameter, for the Swin-B classifier."""

from __future__ import annotations

import re

import pytest
import torch

from mixmae_scale.engine.optimizer import build_optimizer
from mixmae_scale.finetune.layer_decay import layer_id, param_groups_layer_decay
from mixmae_scale.models.classifier import SwinClassifier
from mixmae_scale.models.swin import SwinShape

DEPTHS = (2, 2, 18, 2)


def official_layer_id(name: str) -> int:
    """`get_layer_id_for_mixmim` of the official util/lr_decay.py, restated on the official key names."""
    if name in ("cls_token", "pos_embed", "absolute_pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("layers"):
        stage = int(name.split(".")[1])
        if "downsample" in name:
            return sum(DEPTHS[:stage + 1]) + 1
        return sum(DEPTHS[:stage]) + int(name.split(".")[3]) + 1
    return sum(DEPTHS)


@pytest.fixture(scope="module")
def swin_b():
    with torch.device("meta"):
        return SwinClassifier(SwinShape(224, 4, 128, DEPTHS, (4, 8, 16, 32), (14, 14, 14, 7)), num_classes=1000)


def test_every_parameter_of_swin_b_gets_the_official_scale_and_decay(swin_b):
    decay = 0.7
    groups = param_groups_layer_decay(swin_b, DEPTHS, base_lr=1.0, weight_decay=0.05, decay=decay)
    scale_of = {name: g["lr_scale"] for g in groups for name in g["names"]}
    wd_of = {name: g["weight_decay"] for g in groups for name in g["names"]}
    params = dict(swin_b.named_parameters())
    assert set(scale_of) == set(params) and len(params) > 300
    total_layers = sum(DEPTHS) + 1
    official_scales = [decay ** (total_layers - i) for i in range(total_layers + 1)]
    for name, param in params.items():
        official_name = re.sub(r"^encoder\.", "", name)
        assert scale_of[name] == pytest.approx(official_scales[official_layer_id(official_name)]), name
        assert wd_of[name] == (0.0 if param.ndim == 1 else 0.05), name  # official no_weight_decay() is {}
    assert scale_of["head.weight"] == pytest.approx(decay) and scale_of["encoder.norm.weight"] == pytest.approx(decay)
    assert scale_of["encoder.patch_embed.proj.weight"] == pytest.approx(decay ** 25)
    assert wd_of["encoder.layers.2.blocks.3.attn.relative_position_bias_table"] == 0.05


def test_exempting_tables_is_an_option(swin_b):
    groups = param_groups_layer_decay(swin_b, DEPTHS, 1.0, 0.05, 0.7, exempt_tables=True)
    wd_of = {name: g["weight_decay"] for g in groups for name in g["names"]}
    assert wd_of["encoder.layers.2.blocks.3.attn.relative_position_bias_table"] == 0.0
    assert wd_of["encoder.layers.2.blocks.3.attn.qkv.weight"] == 0.05


def test_pretraining_decays_tables_and_mask_token_unless_told(small_mixmae):
    from mixmae_scale.config.schema import OptimConfig

    for exempt, table_wd in ((False, 0.05), (True, 0.0)):
        optimizer = build_optimizer(small_mixmae, OptimConfig(exempt_tables_from_decay=exempt), lr=1e-3)
        wd_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
        named = dict(small_mixmae.named_parameters())
        assert wd_of[id(named["decoder.mask_token"])] == table_wd
        assert wd_of[id(named["encoder.layers.0.blocks.0.attn.relative_position_bias_table"])] == table_wd
        assert wd_of[id(named["encoder.layers.0.blocks.0.attn.qkv.bias"])] == 0.0
        assert wd_of[id(named["encoder.layers.0.blocks.0.norm1.weight"])] == 0.0
        assert wd_of[id(named["decoder.decoder_pred.weight"])] == 0.05


def test_layer_ids_follow_the_blocks_across_stages():
    assert layer_id("encoder.absolute_pos_embed", DEPTHS) == 0
    assert layer_id("encoder.layers.2.blocks.17.mlp.fc1.weight", DEPTHS) == 2 + 2 + 17 + 1
    assert layer_id("encoder.layers.0.downsample.reduction.weight", DEPTHS) == 3
    assert layer_id("encoder.layers.3.blocks.1.attn.proj.bias", DEPTHS) == 24
    assert layer_id("head.weight", DEPTHS) == 24


def test_width_rule_scales_only_the_matrices_whose_fan_in_grows(small_mixmae):
    from mixmae_scale.config.schema import OptimConfig

    lr_of = {}
    for base in (None, 16):
        optimizer = build_optimizer(small_mixmae, OptimConfig(width_lr_base=base), lr=1e-3, width=64)
        lr_of[base] = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(small_mixmae.named_parameters())
    for name in ("encoder.layers.0.blocks.0.attn.qkv.weight", "decoder.decoder_pred.weight",
                 "encoder.layers.0.downsample.reduction.weight"):
        assert lr_of[None][id(named[name])] == 1e-3 and lr_of[16][id(named[name])] == pytest.approx(1e-3 * 16 / 64)
    for name in ("encoder.patch_embed.proj.weight", "encoder.layers.0.blocks.0.attn.relative_position_bias_table",
                 "encoder.layers.0.blocks.0.attn.qkv.bias", "decoder.mask_token", "encoder.norm.weight"):
        assert lr_of[16][id(named[name])] == 1e-3, name
