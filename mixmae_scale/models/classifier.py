"""The fine-tuning model: the pretrained encoder without mixing, average pooling, a linear head.

Loading pretrained weights adapts them to a new resolution or new windows the way the published
384 px models were made: the absolute position embedding and every relative-position bias table
are resized bicubically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from mixmae_scale.models.swin import SwinEncoder, SwinShape


class SwinClassifier(nn.Module):
    def __init__(self, shape: SwinShape, num_classes: int, drop_path: float = 0.1, fused_attention: bool = True,
                 checkpoint_every: int = 0) -> None:
        super().__init__()
        self.encoder = SwinEncoder(shape, drop_path, fused_attention, checkpoint_every)
        self.head = nn.Linear(shape.num_features, num_classes)
        trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images).mean(dim=(1, 2))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled_features(images))


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored_decoder: int = 0
    resized: list[str] = field(default_factory=list)


def resize_position_embedding(pos: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """(1, L, C) on a square grid -> (1, new_tokens, C), bicubic."""
    old = int(round(pos.shape[1] ** 0.5))
    new = int(round(new_tokens**0.5))
    grid = pos.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(pos.dtype)


def resize_bias_table(table: torch.Tensor, new_entries: int) -> torch.Tensor:
    """((2w-1)^2, nH) -> ((2w'-1)^2, nH), bicubic over the relative-offset grid."""
    old = int(round(table.shape[0] ** 0.5))
    new = int(round(new_entries**0.5))
    grid = table.T.reshape(1, -1, old, old).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return grid.reshape(-1, new * new).T.contiguous().to(table.dtype)


def encoder_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Encoder weights under bare names from a MixMAE, classifier or exported-encoder state dict."""
    encoder, decoder = {}, 0
    for key, value in state.items():
        if key.startswith("encoder."):
            encoder[key[len("encoder."):]] = value
        elif key.startswith("decoder."):
            decoder += 1
        elif not key.startswith("head."):
            encoder[key] = value
    return encoder, decoder


def load_pretrained_encoder(model: SwinClassifier, state: dict[str, torch.Tensor]) -> LoadReport:
    weights, decoder_keys = encoder_state_dict(state)
    report = LoadReport(ignored_decoder=decoder_keys)
    target = model.encoder.state_dict()
    for key, value in list(weights.items()):
        if key not in target or target[key].shape == value.shape:
            continue
        if key == "absolute_pos_embed":
            weights[key] = resize_position_embedding(value, target[key].shape[1])
        elif key.endswith("relative_position_bias_table") and value.shape[1] == target[key].shape[1]:
            weights[key] = resize_bias_table(value, target[key].shape[0])
        else:
            raise ValueError(f"pretrained '{key}' has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(target[key].shape)}: the encoders differ in width or depth")
        report.resized.append(key)
    result = model.encoder.load_state_dict(weights, strict=False)
    report.missing = list(result.missing_keys)
    report.unexpected = list(result.unexpected_keys)
    return report
