"""Encoder weights from wherever they come from: an exported .safetensors, one of our run folders
(ZeRO shards gathered on the fly), or an official MixMIM .pth (mapped like `convert-official`)."""

from __future__ import annotations

from pathlib import Path

import torch

from mixmae_scale.models.convert_official import infer_architecture, load_weights, map_official_keys, read_official


def load_encoder_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """Weights under our key names (`encoder.*`, maybe `decoder.*`, `head.*`)."""
    path = Path(source)
    if path.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from mixmae_scale.engine.checkpoint import complete_tags

        tags = complete_tags(path / "checkpoints")
        if not tags:
            raise FileNotFoundError(f"{path}: not a run folder with a complete checkpoint (checkpoints/*/COMPLETE)")
        return get_fp32_state_dict_from_zero_checkpoint(str(path / "checkpoints"), tag=tags[-1])
    if path.suffix == ".safetensors":
        return load_weights(path)[0]
    if path.suffix in (".pth", ".pt", ".bin"):
        return map_official_keys(read_official(path))
    raise ValueError(f"finetune.init={source!r}: expected a .safetensors file, a run folder or an official .pth")


def load_encoder(source: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and the architecture read off them (image size, widths, depths, heads, windows)."""
    state = load_encoder_weights(source)
    if "encoder.patch_embed.proj.weight" not in state:
        raise ValueError(f"{source}: holds no encoder weights (no encoder.patch_embed.proj.weight)")
    return state, infer_architecture(state)
