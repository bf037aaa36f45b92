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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixmae_scale.config.schema import RANDOM_INIT
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


@dataclass(frozen=True)
class Pretrained:
    """Encoder weights as loaded: the tensors, the architecture read off them, and where they were read. `source`:
    as the user named it; `checkpoint`: for a run folder, the checkpoint its weights were gathered from (its newest
    intact one when it was read, which a still-running pretraining moves on from), so that a run started from a run
    folder can say which step it took (run.json's "init", the log)."""

    state: dict[str, torch.Tensor]
    arch: dict[str, Any]
    source: str
    checkpoint: Path | None = None

    @property
    def step(self) -> int | None:
        from mixmae_scale.engine.export import step_of

        return step_of(self.checkpoint.name) if self.checkpoint is not None else None

    def record(self, key: str) -> dict[str, Any]:
        """run.json's "init": the key, the path resolved, and for a run folder the checkpoint, its tag and step."""
        entry: dict[str, Any] = {"key": key, "path": str(Path(self.source).resolve())}
        if self.checkpoint is not None:
            entry.update(checkpoint=str(self.checkpoint.resolve()), tag=self.checkpoint.name, step=self.step)
        return entry

    def described(self) -> str:
        """`runs/mixmae-b (checkpoint step00000405, step 405: runs/mixmae-b/checkpoints/step00000405)` for the log."""
        if self.checkpoint is None:
            return self.source
        step = f", step {self.step}" if self.step is not None else ""
        return f"{self.source} (checkpoint {self.checkpoint.name}{step}: {self.checkpoint})"


def load_pretrained(source: str | Path, option: str = "finetune.init") -> Pretrained:
    """Weights under our key names (`encoder.*`, maybe `decoder.*`, `head.*`), the architecture read off them (image
    size, widths, depths, heads, windows), and where they came from."""
    path = Path(source)
    named = _named(option, source)
    if not path.exists():
        raise FileNotFoundError(f"{named}: not found (tried {path.absolute()})")
    checkpoint = None
    if path.is_dir():
        from mixmae_scale.engine.export import find_checkpoint, gather_weights

        folder, tag = find_checkpoint(path, option=option)
        heads = ((_run_config(folder.parent) or {}).get("model") or {}).get("decoder_heads")
        state, checkpoint = gather_weights(folder, tag), folder / tag
    elif path.suffix not in WEIGHT_SUFFIXES:
        raise WeightsError(f"{named}: expected a .safetensors file (`mixmae export`), a run folder or an official "
                           f"MixMIM .pth; {path.absolute()} is none of these")
    else:
        try:
            if path.suffix == ".safetensors":
                state, arch = load_weights(path)
                heads = arch.get("decoder_heads")
            else:
                official, record = read_official_checkpoint(path)
                state, heads = map_official_keys(official), record.get("decoder_heads")
        except WeightsError as exc:
            raise WeightsError(f"{named}: {exc}") from exc
    _refuse_segmentation_model(state, path, named)
    try:
        return Pretrained(state, infer_architecture(state, heads), str(source), checkpoint)
    except WeightsError as exc:
        raise WeightsError(f"{named}: {path.absolute()} {exc}") from exc


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
    pretrained = load_pretrained(source, option)
    return pretrained.state, pretrained.arch


def require_finetune_init(init: str | None) -> None:
    """`finetune.init` unset is refused by `mixmae finetune` and by a launch of it (cli/cluster_commands.py)."""
    if not init:
        raise WeightsError("finetune.init is not set: name the encoder to start from (--set finetune.init=RUN_FOLDER, "
                           "an exported .safetensors or an official MixMIM .pth), or --set finetune.init=random for a "
                           "randomly initialised encoder (the baseline)")


def finetune_start(init: str | None, resuming: bool = False) -> Pretrained | None:
    """The encoder a fine-tuning starts from (`finetune.init`), or None for `finetune.init=random` and for a run that
    resumes from its own checkpoint (`resuming`: run_folder.resumes), which holds every weight: the file is neither
    read nor required (a killed run whose init file was cleaned up since could not resume). Unset is refused, as
    `segment.init` is (segment/build.py): a run that silently started from random weights trained a classifier
    nobody asked for, its top-1 read as the pretrained encoder's."""
    require_finetune_init(init)
    return None if init == RANDOM_INIT or resuming else load_pretrained(init)
