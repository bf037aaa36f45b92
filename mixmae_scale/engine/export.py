"""Export of a run's weights to one safetensors file, loadable without DeepSpeed.

ZeRO shards are gathered with DeepSpeed's zero_to_fp32, and a ZeRO-0 checkpoint (no shards: the whole module is in
one file) is read directly; the architecture is read off the weights
and stored in the file's metadata, so the fine-tune model can be built from the file alone. The run
and step go into the metadata too, so that a picture or an evaluation made from the file can say
where its weights came from.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import torch

from mixmae_scale.engine.checkpointing.store import MARKER, complete_tags, damage, intact_newest_first, is_regular
from mixmae_scale.models.convert_official import (
    OFFICIAL_SUFFIXES,
    WeightsError,
    infer_architecture,
    save_official,
    save_weights,
    what_is_at,
)

BEST = "best"  # a fine-tuning run's best checkpoint (finetune/job.py) lives in RUN/best/


def find_checkpoint(source: str | Path, tag: str | None = None, best: bool = False, option: str = "run folder"
                    ) -> tuple[Path, str]:
    """(checkpoint folder, tag) for what a user may name: a run folder (its latest complete checkpoint, or
    `best=True` / `tag="best"` for the best fine-tuning one), the run's `checkpoints/` or `best/` folder, or
    one checkpoint's folder. `option` is how the user named it, for the error message."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{option} {source}: not found (tried {path.absolute()})")
    if (path / MARKER).exists():  # one checkpoint, e.g. RUN/best/step00000405
        if tag not in (None, path.name) or best:
            raise FileNotFoundError(f"{option} {source} is one checkpoint ({path.name}); name the run folder to "
                                    "choose another")
        _refuse_damaged(path)
        return path.parent, path.name
    if best or tag == BEST:
        folder, tag = path / BEST, None
        if not complete_tags(folder):
            raise FileNotFoundError(f"{folder.absolute()}: no complete best checkpoint; fine-tuning and "
                                    "segmentation runs keep one (`mixmae finetune`, `mixmae segment`: written at each "
                                    "evaluation that improves top-1 or mIoU), a pretraining run none")
    elif (path / "checkpoints").is_dir():
        folder = path / "checkpoints"
    elif complete_tags(path):  # RUN/checkpoints or RUN/best named directly
        folder = path
    else:
        raise FileNotFoundError(f"{option} {source}: not a run folder: {(path / 'checkpoints').absolute()} does not "
                                "exist (a run folder is what `mixmae pretrain`, `finetune` or `segment` writes)")
    tags = complete_tags(folder)
    if not tags:
        raise FileNotFoundError(f"{folder.absolute()}: no complete checkpoint (a step folder with {MARKER}); the run "
                                "has not saved one yet")
    if tag is None:
        return folder, _newest_intact(folder, tags)
    if tag not in tags:
        raise FileNotFoundError(f"{(folder / tag).absolute()}: not a complete checkpoint (complete: {', '.join(tags)}"
                                f"{'; --best exports the best fine-tuning one' if (path / BEST).is_dir() else ''})")
    _refuse_damaged(folder / tag)
    return folder, tag


def _newest_intact(folder: Path, tags: list[str]) -> str:
    """The newest regular tag whose files are as written; each damaged one passed over is said. A non-finite stop's
    tag (a run stopped mid-way by diverging steps, whose weights its default resume rolls back from) is taken only
    where no regular one is left, and said either way."""
    say = logging.getLogger("mixmae").warning
    intact, notes = intact_newest_first(folder, tags)
    for note in notes:
        say("mixmae: %s", note)
    regular = [tag for tag in intact if is_regular(tag)]
    if intact and intact[0] not in regular:
        say("mixmae: %s holds a non-finite stop (%s): %s; name it with --tag to read the stop's own", folder.absolute(),
            intact[0], f"taking {regular[0]}, the newest regular checkpoint" if regular else "no regular checkpoint is "
            "left, so taking it")
    if intact:
        return (regular or intact)[0]
    raise WeightsError(f"{folder.absolute()}: every checkpoint is damaged (a file missing or cut short since it was "
                     "written); nothing to read weights from")


def _refuse_damaged(checkpoint: Path) -> None:
    problem = damage(checkpoint)
    if problem:
        raise WeightsError(f"{checkpoint.absolute()} is damaged: {problem} (a file missing or cut short since it was "
                         "written); name an earlier checkpoint")


MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's module file of a checkpoint at ZeRO 0-2
ZERO_SHARDS = "*_optim_states.pt"  # ZeRO 1-3 optimizer shards (bf16_zero_pp_rank_* at bf16), what zero_to_fp32 reads


def gather_weights(folder: Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 weights of one checkpoint, ZeRO shards gathered. DeepSpeed's gatherer prints its progress
    ("Detected checkpoint of type zero stage ...") with print() and a progress bar: internals that mean
    nothing to someone exporting or evaluating, so they are kept out of this command's output.

    A ZeRO-0 checkpoint has no shards for it to gather (it stopped with a TypeError on the `param_shapes` only ZeRO
    records): its module's whole state dict is in one file, read as it is."""
    if not any((folder / tag).glob(ZERO_SHARDS)):
        return module_weights(folder / tag)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)


def module_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The module's state dict of a checkpoint without ZeRO shards (ZeRO-0), floating-point tensors in fp32 as
    zero_to_fp32 gives them. At fp32 these are the weights the optimizer updates; a bf16 or fp16 run's module holds
    them rounded to its precision (the fp32 master copy sits in the optimizer's flat groups, which name no tensor):
    the weights the run computed with. Read as DeepSpeed reads its own files (not weights-only: they hold its
    config and loss scaler)."""
    path = checkpoint / MODEL_STATES
    if not path.is_file():
        raise WeightsError(f"{checkpoint.absolute()}: neither ZeRO shards ({ZERO_SHARDS}) nor {MODEL_STATES}; not a "
                           "DeepSpeed checkpoint")
    # Mapped, so that the optimizer state beside the module is not read; copied, so that nothing stays mapped.
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)["module"]
    return {key: value.to(torch.float32 if value.is_floating_point() else value.dtype, copy=True)
            for key, value in state.items()}


ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # ZeRO-3's: parameter placeholders and shapes


def tensor_shapes(checkpoint: Path) -> dict[str, torch.Size]:
    """The shape of each tensor of a checkpoint's model, nothing gathered: what a model to load the checkpoint into is
    built in the shape of where nothing else says it (a segmentation run's encoder, whose shape came from weights
    that need not be there when it resumes). ZeRO 0-2 keep the module's state dict in mp_rank_00_model_states.pt;
    ZeRO-3 keeps empty placeholders in its own file and each parameter's shape beside them (`param_shapes`)."""
    path = checkpoint / MODEL_STATES
    if not path.is_file():
        path = checkpoint / ZERO3_MODEL_STATES
    if not path.is_file():
        raise WeightsError(f"{checkpoint.absolute()}: neither {MODEL_STATES} nor {ZERO3_MODEL_STATES}; not a "
                           "DeepSpeed checkpoint")
    saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    shapes = {key: value.shape for key, value in saved["module"].items()}
    for group in saved.get("param_shapes") or []:
        shapes.update(group)
    shapes.update(saved.get("frozen_param_shapes") or {})
    return shapes


def step_of(tag: str) -> int | None:
    digits = tag.removeprefix("step")
    return int(digits) if digits.isdigit() else None


DEFAULT_NAMES = {"encoder": "encoder.safetensors", "pretrain": "encoder_decoder.safetensors",
                 "finetune": "classifier.safetensors", "segment": "segmenter.safetensors"}  # by kind
SEGMENT_PREFIXES = ("backbone.", "decode_head.")  # a segmentation run's model (models/segmentation_head.py)


def default_out(run_root: Path, kind: str, best: bool, fmt: str = "safetensors") -> Path:
    """Where an export goes when no --out is given: the run folder, named by what the file holds (a --best export
    of a classifier: classifier-best.safetensors, of a segmentation model: segmenter-best.safetensors)."""
    best_name = "segmenter-best.safetensors" if kind == "segment" else "classifier-best.safetensors"
    name = Path(best_name if best else DEFAULT_NAMES[kind])
    return run_root / (name.with_name(name.stem + "-official.pth") if fmt == "official" else name)


def export_run(run_dir: str | Path, out: str | Path | None = None, tag: str | None = None, with_decoder: bool = False,
               best: bool = False, fmt: str = "safetensors") -> dict[str, Any]:
    """`out` None: `default_out` in the run folder. `fmt="official"` writes the official MixMIM layout
    (`{"model": ...}` in a .pth) for the official fine-tuning script and the tools built on it; the default is our
    safetensors file with its metadata."""
    folder, tag = find_checkpoint(run_dir, tag, best)
    run_root = folder.parent
    if out is not None:
        require_writable_file(Path(out))
        require_format_suffix(Path(out), fmt)
    state = gather_weights(folder, tag)
    if any(k.startswith("decode_head.") for k in state):
        return _export_segmenter(state, run_root, folder, tag, out, best or folder.name == BEST, fmt)
    # A fine-tuning run's head always comes along: the file is then a complete classifier.
    keep = ("encoder.", "head.") + (("decoder.",) if with_decoder else ())
    weights = {k: v for k, v in state.items() if k.startswith(keep)}
    arch = infer_architecture(weights)
    if with_decoder:
        arch["decoder_heads"] = _decoder_heads(run_root)
    kind = "finetune" if "head.weight" in weights else "pretrain" if with_decoder else "encoder"
    best = best or folder.name == BEST
    out = Path(out) if out is not None else default_out(run_root, kind, best, fmt)
    step = step_of(tag)
    replaced = what_is_at(out)
    # A classifier's classes, which eval checks (finetune/trained_classes.py), go with it in either format.
    from mixmae_scale.finetune.trained_classes import export_metadata, official_record

    if fmt == "official":  # records the decoder's head count too, which no tensor says, and the run and step
        save_official(out, weights, arch, {**(official_record(run_root) if kind == "finetune" else {}),
                                           "run": run_root.name, **({"step": step} if step is not None else {})})
    else:
        save_weights(out, weights, arch, kind, provenance={"run": run_root.name, "checkpoint": str(folder / tag),
                                                           **({"step": str(step)} if step is not None else {}),
                                                           **(export_metadata(run_root) if kind == "finetune" else {})})
    return {"run": str(run_root), "checkpoint": str(folder / tag), "step": step, "best": best, "out": str(out),
            "format": fmt, "kind": kind, "tensors": len(weights), "params": sum(v.numel() for v in weights.values()),
            "arch": arch, "replaced": replaced}


def require_writable_file(out: Path) -> None:
    """--out is checked before the weights are gathered (minutes for a large ZeRO-3 run), not when they are written."""
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; name the file to write (e.g. {out / 'encoder.safetensors'})")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: its folder {out.parent.absolute()} does not exist; create it first")


FORMAT_SUFFIXES = {"safetensors": (".safetensors",), "official": OFFICIAL_SUFFIXES}


def require_format_suffix(out: Path, fmt: str) -> None:
    """Every loader (finetune.init, --init, load_backbone) tells the two formats apart by the suffix: safetensors
    bytes in a .pth, or a pickle in a .safetensors, were later refused as damaged or not weights."""
    if out.suffix not in FORMAT_SUFFIXES[fmt]:
        what = "our safetensors file" if fmt == "safetensors" else "a PyTorch pickle in the official layout"
        raise WeightsError(f"--out {out}: --format {fmt} writes {what}, which is read back by its suffix; name it "
                           f"{' or '.join('*' + suffix for suffix in FORMAT_SUFFIXES[fmt])}")


def _export_segmenter(state: dict[str, torch.Tensor], run_root: Path, folder: Path, tag: str, out: str | Path | None,
                      best: bool, fmt: str) -> dict[str, Any]:
    """A segmentation run's model: the encoder's shape read off its weights, the head's settings and the crop
    size from the run's config.yaml (pool scales are not in any tensor's shape), so `mixmae eval` rebuilds it."""
    if fmt == "official":
        raise ValueError(f"{run_root}: a segmentation run; the official layout holds encoders and classifiers only. "
                         f"Export it as safetensors, or its encoder alone with `mixmae export {run_root}` after a "
                         "pretraining run")
    weights = {k: v for k, v in state.items() if k.startswith(SEGMENT_PREFIXES)}
    arch = infer_architecture({k.removeprefix("backbone."): v for k, v in weights.items()
                               if k.startswith("backbone.encoder.")})
    arch["segment"] = _segment_settings(run_root)
    out = Path(out) if out is not None else default_out(run_root, "segment", best)
    step = step_of(tag)
    replaced = what_is_at(out)
    save_weights(out, weights, arch, "segment", provenance={"run": run_root.name, "checkpoint": str(folder / tag),
                                                             **({"step": str(step)} if step is not None else {})})
    return {"run": str(run_root), "checkpoint": str(folder / tag), "step": step, "best": best, "out": str(out),
            "format": fmt, "kind": "segment", "tensors": len(weights),
            "params": sum(v.numel() for v in weights.values()), "arch": arch, "replaced": replaced}


def _segment_settings(run_dir: Path) -> dict[str, Any]:
    import yaml

    path = run_dir / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path.absolute()}: not found; a segmentation export reads the head's settings "
                                "from the run's config.yaml")
    seg = yaml.safe_load(path.read_text())["segment"]
    return {k: seg[k] for k in ("num_classes", "ignore_index", "crop_size", "head_channels", "pool_scales")}


KIND_WORDS = {"encoder": "encoder", "pretrain": "encoder and decoder", "finetune": "classifier (encoder and head)",
              "segment": "segmentation model (encoder and UperNet head)"}


def export_line(result: dict[str, Any]) -> str:
    """What `mixmae export` says: which step of which run went where."""
    which = f"step {result['step']}" if result["step"] is not None else Path(result["checkpoint"]).name
    source = f"{which}{' (best)' if result['best'] else ''} of run {result['run']}"
    layout = " in the official layout" if result.get("format") == "official" else ""
    replaced = result.get("replaced")
    if replaced and replaced.startswith("step "):
        replaced = f"the export of {replaced}"
    return (f"exported {source} to {result['out']}: {KIND_WORDS[result['kind']]}, {result['params'] / 1e6:.2f}M "
            f"parameters in {result['tensors']} tensors{layout} (checkpoint {result['checkpoint']})"
            + (f"; it replaced {replaced} there" if replaced else ""))


def _decoder_heads(run_dir: Path) -> int:
    import yaml

    path = run_dir / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path.absolute()}: not found; --with-decoder reads the decoder's head count from "
                                "the run's config.yaml")
    return int(yaml.safe_load(path.read_text())["model"]["decoder_heads"])
