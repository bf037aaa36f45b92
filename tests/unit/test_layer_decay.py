"""Layer-wise lr decay: the exact scale of every parameter of a small Swin classifier."""

from __future__ import annotations

import pytest

from mixmae_scale.finetune.layer_decay import layer_id, param_groups_layer_decay
from mixmae_scale.models.classifier import SwinClassifier


def test_every_parameter_gets_its_layers_scale(small_shape):
    model = SwinClassifier(small_shape, num_classes=3)
    depths = small_shape.depths  # (1, 1, 2, 1): 5 blocks, ids 1..5, norm and head 6
    groups = param_groups_layer_decay(model, depths, base_lr=1.0, weight_decay=0.05, decay=0.5)
    scale_of = {name: g["lr_scale"] for g in groups for name in g["names"]}
    wd_of = {name: g["weight_decay"] for g in groups for name in g["names"]}
    assert set(scale_of) == {n for n, _ in model.named_parameters()}
    assert scale_of["encoder.patch_embed.proj.weight"] == pytest.approx(0.5**6)
    assert scale_of["encoder.layers.0.blocks.0.attn.qkv.weight"] == pytest.approx(0.5**5)
    assert scale_of["encoder.layers.2.blocks.1.mlp.fc2.weight"] == pytest.approx(0.5**2)  # block 4
    assert scale_of["encoder.layers.3.blocks.0.norm1.weight"] == pytest.approx(0.5**1)  # block 5
    # Patch merging feeds the next stage's first block and shares its scale.
    merge, first_block = "encoder.layers.0.downsample.reduction.weight", "encoder.layers.1.blocks.0.attn.qkv.weight"
    assert scale_of[merge] == scale_of[first_block]
    assert scale_of["encoder.norm.weight"] == 1.0 and scale_of["head.weight"] == 1.0 and scale_of["head.bias"] == 1.0
    assert all(g["lr"] == pytest.approx(g["lr_scale"]) for g in groups)
    assert wd_of["encoder.layers.0.blocks.0.attn.qkv.weight"] == 0.05
    assert wd_of["encoder.layers.0.blocks.0.attn.qkv.bias"] == 0.0
    assert wd_of["encoder.layers.0.blocks.0.attn.relative_position_bias_table"] == 0.0
    assert wd_of["encoder.norm.weight"] == 0.0


def test_layer_ids_follow_the_blocks_across_stages():
    depths = (2, 2, 18, 2)
    assert layer_id("encoder.absolute_pos_embed", depths) == 0
    assert layer_id("encoder.layers.2.blocks.17.mlp.fc1.weight", depths) == 2 + 2 + 17 + 1
    assert layer_id("encoder.layers.3.blocks.1.attn.proj.bias", depths) == 24
    assert layer_id("head.weight", depths) == 25
