"""Encoder weights from wherever they come from: an exported .safetensors, one of our run folders
(ZeRO shards gathered on the fly), or an official MixMIM .pth (mapped like `convert-official`).

Every command that takes weights names them differently (`finetune.init=` in a profile, `--init` for
eval and probe, a positional SOURCE for visualize), so each caller passes the name the user typed and
every error about the weights says it, with the absolute path that was tried.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mixmae_scale.config.schema import RANDOM_INIT
from mixmae_scale.models.convert_official import (
    OFFICIAL_SUFFIXES,
    WeightsError,
    infer_architecture,
    load_weights,
    map_official_keys,
    read_official,
)

WEIGHT_SUFFIXES = (".safetensors", *OFFICIAL_SUFFIXES)


def _named(option: str, source: str | Path) -> str:
    """How the user gave it: `finetune.init=x` for a config key, `--init x` for an option."""
    return f"{option}={source}" if "." in option and not option.startswith("-") else f"{option} {source}"


def load_encoder_weights(source: str | Path, option: str = "finetune.init") -> dict[str, torch.Tensor]:
    """Weights under our key names (`encoder.*`, maybe `decoder.*`, `head.*`)."""
    path = Path(source)
    named = _named(option, source)
    if not path.exists():
        raise FileNotFoundError(f"{named}: not found (tried {path.absolute()})")
    if path.is_dir():
        from mixmae_scale.engine.export import find_checkpoint, gather_weights

        return gather_weights(*find_checkpoint(path, option=option))
    if path.suffix not in WEIGHT_SUFFIXES:
        raise WeightsError(f"{named}: expected a .safetensors file (`mixmae export`), a run folder or an official "
                           f"MixMIM .pth; {path.absolute()} is none of these")
    try:
        if path.suffix == ".safetensors":
            return load_weights(path)[0]
        return map_official_keys(read_official(path))
    except WeightsError as exc:
        raise WeightsError(f"{named}: {exc}") from exc


def load_encoder(source: str | Path, option: str = "finetune.init") -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and the architecture read off them (image size, widths, depths, heads, windows)."""
    state = load_encoder_weights(source, option)
    try:
        return state, infer_architecture(state)
    except WeightsError as exc:
        raise WeightsError(f"{_named(option, source)}: {Path(source).absolute()} {exc}") from exc


def finetune_start(init: str | None, resuming: bool = False) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The encoder a fine-tuning starts from (`finetune.init`): its weights and architecture, or None for
    `finetune.init=random` and for a run that resumes from its own checkpoint (`resuming`: run_folder.resumes), which
    holds every weight: the file is neither read nor required (a killed run whose init file was cleaned up since
    could not resume). Unset is refused, as `segment.init` is (segment/build.py): a run that silently started from
    random weights trained a classifier nobody asked for, its top-1 read as the pretrained encoder's."""
    if not init:
        raise WeightsError("finetune.init is not set: name the encoder to start from (--set finetune.init=RUN_FOLDER, "
                           "an exported .safetensors or an official MixMIM .pth), or --set finetune.init=random for a "
                           "randomly initialised encoder (the baseline)")
    return None if init == RANDOM_INIT or resuming else load_encoder(init)
