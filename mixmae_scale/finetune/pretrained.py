"""Encoder weights from wherever they come from: an exported .safetensors, one of our run folders
(ZeRO shards gathered on the fly), or an official MixMIM .pth (mapped like `convert-official`).

Every command that takes weights names them differently (`finetune.init=` in a profile, `--init` for
eval and probe, a positional SOURCE for visualize), so each caller passes the name the user typed and
every error about the weights says it, with the absolute path that was tried.

What no tensor's shape says, the decoder's head count, is read where the source keeps it: an export's metadata,
the record in an official-layout file this package wrote, a run folder's config.yaml; else the official 16.

A segmentation model (a `mixmae segment` run or its export) holds an encoder too, under `backbone.`, beside its
UperNet head: named where an encoder or a classifier goes, it is called what it is, with the command that
measures it and what to name instead, rather than "holds no encoder weights".
"""

from __future__ import annotations

from pathlib import Path

import torch

from mixmae_scale.models.convert_official import (
    OFFICIAL_SUFFIXES,
    WeightsError,
    infer_architecture,
    load_weights,
    map_official_keys,
    read_official_checkpoint,
)

WEIGHT_SUFFIXES = (".safetensors", *OFFICIAL_SUFFIXES)


def _named(option: str, source: str | Path) -> str:
    """How the user gave it: `finetune.init=x` for a config key, `--init x` for an option."""
    return f"{option}={source}" if "." in option and not option.startswith("-") else f"{option} {source}"


def load_encoder_weights(source: str | Path, option: str = "finetune.init") -> dict[str, torch.Tensor]:
    """Weights under our key names (`encoder.*`, maybe `decoder.*`, `head.*`)."""
    return _load(source, option)[0]


def _load(source: str | Path, option: str) -> tuple[dict[str, torch.Tensor], int | None]:
    """The weights and the decoder head count their source records (None: it says none)."""
    path = Path(source)
    named = _named(option, source)
    if not path.exists():
        raise FileNotFoundError(f"{named}: not found (tried {path.absolute()})")
    state, decoder_heads = _read_weights(path, named, option)
    _refuse_segmentation_model(state, path, named)
    return state, decoder_heads


def _read_weights(path: Path, named: str, option: str) -> tuple[dict[str, torch.Tensor], int | None]:
    if path.is_dir():
        from mixmae_scale.engine.export import find_checkpoint, gather_weights

        folder, tag = find_checkpoint(path, option=option)
        heads = ((_run_config(folder.parent) or {}).get("model") or {}).get("decoder_heads")
        return gather_weights(folder, tag), heads
    if path.suffix not in WEIGHT_SUFFIXES:
        raise WeightsError(f"{named}: expected a .safetensors file (`mixmae export`), a run folder or an official "
                           f"MixMIM .pth; {path.absolute()} is none of these")
    try:
        if path.suffix == ".safetensors":
            state, arch = load_weights(path)
            return state, arch.get("decoder_heads")
        state, record = read_official_checkpoint(path)
        return map_official_keys(state), record.get("decoder_heads")
    except WeightsError as exc:
        raise WeightsError(f"{named}: {exc}") from exc


def _run_config(folder: Path) -> dict | None:
    """The config.yaml of the run folder `folder` (what `mixmae pretrain|finetune|segment` wrote), if readable."""
    import yaml

    try:
        config = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def _refuse_segmentation_model(state: dict[str, torch.Tensor], path: Path, named: str) -> None:
    """A segmentation model's weights (its UperNet head's `decode_head.*`) named as an encoder or a classifier."""
    if not any(key.startswith("decode_head.") for key in state):
        return
    what = (f"{path.absolute()} is a segmentation model (a `mixmae segment` run's export: an encoder under a "
            "UperNet head), not an encoder or a classifier: `mixmae eval --init "
            f"{path} --data SHARDS_WITH_MASKS` measures its mIoU")
    started = "its run's segment.init"
    if path.is_dir():
        what = (f"{path.absolute()} is a segmentation run (`mixmae segment`: an encoder under a UperNet head), not "
                f"an encoder or a classifier: `mixmae export {path}` writes its segmenter.safetensors, which "
                "`mixmae eval --init` measures (mIoU on shards with masks)")
        init = _segment_init(path)
        started = f"its segment.init, {init}" if init else "its segment.init"
    raise WeightsError(f"{named}: {what}; to fine-tune, probe or classify, name the encoder it started from "
                       f"({started}): a pretraining run folder or its export")


def _segment_init(path: Path) -> str | None:
    """The `segment.init` in the config.yaml of the segmentation run holding `path` (the run folder, its
    checkpoints/ or best/ folder, or one checkpoint), if it can be read."""
    for folder in (path, *list(path.parents)[:2]):
        config = _run_config(folder)
        if config is not None:
            init = (config.get("segment") or {}).get("init")
            return str(init) if init else None
    return None


def load_encoder(source: str | Path, option: str = "finetune.init") -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and the architecture read off them (image size, widths, depths, heads, windows)."""
    state, decoder_heads = _load(source, option)
    try:
        return state, infer_architecture(state, decoder_heads)
    except WeightsError as exc:
        raise WeightsError(f"{_named(option, source)}: {Path(source).absolute()} {exc}") from exc
