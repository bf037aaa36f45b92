"""Import of the official MixMIM checkpoints (github.com/Sense-X/MixMIM) into our module tree.

The official tree is flat (`patch_embed`, `layers`, `decoder_blocks`, `head` side by side); ours
groups it under `encoder.` and `decoder.`. Buffers that we recompute (relative-position indices)
are dropped; any other key we cannot place is an error that lists it. Files are read with
`weights_only=True`: a checkpoint downloaded from the internet must not be able to run code.

The decoder's head count is in no tensor's shape (its attention has no per-head parameter). A released official
checkpoint has the official 16; a file this package writes in the official layout records its own count beside
`model` (`OURS`: {"decoder_heads": n}, a key the official script never reads: it takes `checkpoint['model']`), so
that a 2-head decoder comes back with 2 heads, not 16, from `convert-official` and every loader. A classifier's
record holds the classes it was fine-tuned on as well (`classes`, `classes_digest`: finetune/trained_classes.py),
which `mixmae eval` checks the shards against and `convert-official` carries into the safetensors metadata.
"""

from __future__ import annotations

import argparse
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mixmae_scale.atomic_file import replacing

ENCODER_PREFIXES = ("patch_embed.", "layers.", "norm.", "absolute_pos_embed")
DECODER_PREFIXES = ("mask_token", "decoder_embed.", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.",
                    "decoder_pred.")
RECOMPUTED_BUFFERS = ("relative_position_index", "attn_mask", "relative_coords_table")
OFFICIAL_SUFFIXES = (".pth", ".pt", ".bin")  # what the loaders read as a PyTorch pickle (official layout)
OFFICIAL_DECODER_HEADS = 16  # not recoverable from the weights; the official decoder uses 16 heads
OUR_PREFIXES = ("encoder.", "decoder.", "backbone.", "decode_head.")  # our own key names (models/, segment/)
OURS = "mixmae_scale"  # our record in an official-layout file: what no tensor says (the decoder's head count)


class WeightsError(ValueError):
    """A weights file that cannot be used as given (not weights, damaged, the wrong kind); the message names
    the file and what would work."""


def read_official(path: str | Path) -> dict[str, torch.Tensor]:
    return read_official_checkpoint(path)[0]


def read_official_checkpoint(path: str | Path, mapped: bool = False
                             ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights under 'model' and our record (`OURS`; {} in a released official checkpoint). `mapped`: the
    tensors are mapped from the file, not read, where its format allows it (torch's zip format, not the legacy one),
    for a caller that wants the record alone."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True,
                                    mmap=mapped and zipfile.is_zipfile(path))
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise WeightsError(f"{Path(path).absolute()}: a folder, not a checkpoint file") from None
    except Exception as exc:  # unpickling refused or a corrupt file: say which file and why, in one line
        raise WeightsError(f"{Path(path).absolute()}: not a loadable weights-only checkpoint "
                           f"({_load_failure(exc)})") from exc
    if isinstance(checkpoint, dict) and "module" in checkpoint and "model" not in checkpoint:
        # DeepSpeed's mp_rank_*_model_states.pt: its weights may be ZeRO shards, gathered from the folder as a whole.
        folder = Path(path).absolute().parent
        run = folder.parent.parent if folder.parent.name in ("checkpoints", "best") else folder
        newest = f", or `mixmae export {run}` the run's newest" if run != folder else ""
        raise WeightsError(f"{Path(path).absolute()}: a DeepSpeed checkpoint's file, not a weights file: "
                           f"`mixmae export {folder} --out FILE.safetensors` writes this checkpoint's weights as one "
                           f".safetensors (what load_backbone takes){newest}; finetune.init and --init also take the "
                           f"checkpoint folder {folder} or the run folder (their ZeRO shards gathered)")
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{Path(path).absolute()}: expected a dict of tensors under 'model'")
    record = checkpoint.get(OURS) if "model" in checkpoint else None
    return {k.removeprefix("module."): v for k, v in state.items()}, record if isinstance(record, dict) else {}


def _load_failure(exc: Exception) -> str:
    """torch's refusal in a few words: its text runs to many lines and suggests weights_only=False, which would run
    whatever code the file holds; the unpickler's own complaint (the line after "WeightsUnpickler error:") is kept."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for number, line in enumerate(lines):
        if line.endswith("Unpickler error:") and number + 1 < len(lines):
            return lines[number + 1][:200]
        if "Unpickler error:" in line:
            return line.split("Unpickler error:", 1)[1].strip()[:200]
    if isinstance(exc, KeyError | EOFError) or len(lines) != 1:  # the unpickler tripping over bytes it cannot parse
        return f"{type(exc).__name__} {lines[0][:60] if lines else ''}: not a PyTorch checkpoint, or damaged".strip()
    return lines[0][:200]


def map_official_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mapped, unknown = {}, []
    for key, value in state.items():
        if key.split(".")[-1] in RECOMPUTED_BUFFERS:
            continue
        if key.startswith(ENCODER_PREFIXES):
            mapped[f"encoder.{key}"] = value
        elif key.startswith(DECODER_PREFIXES):
            mapped[f"decoder.{key}"] = value
        elif key.startswith("head."):
            mapped[key] = value
        else:
            unknown.append(key)
    if unknown and all(key.startswith(OUR_PREFIXES) for key in unknown):
        raise WeightsError(f"holds this package's key names (encoder.*), not the official layout ({_few(unknown)}): "
                           "`mixmae export` writes a .safetensors that every loader (finetune.init, --init, "
                           "load_backbone) reads as it is, with no conversion")
    if unknown:
        raise WeightsError(f"{len(unknown)} {'key' if len(unknown) == 1 else 'keys'} of the official checkpoint "
                           f"{'has' if len(unknown) == 1 else 'have'} no place in our model: "
                           + _few(unknown))
    return mapped


def _few(keys: list[str], shown: int = 4) -> str:
    """A few of `keys` and how many more: a checkpoint of another layout has hundreds, which made one line of pages."""
    keys = sorted(keys)
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def to_official_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tree back to the official flat one, with the relative-position indices the official modules keep as
    buffers: the layout the official fine-tuning script loads (`checkpoint['model']`, `strict=False`), so that
    no encoder key is missing or left over there."""
    from mixmae_scale.models.window_attention import relative_position_index

    official: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(("encoder.", "decoder.")):
            official[key.split(".", 1)[1]] = value.detach().contiguous().cpu()
        elif key.startswith("head."):
            official[key] = value.detach().contiguous().cpu()
        else:
            raise WeightsError(f"{key}: has no place in the official layout (expected encoder.*, decoder.* or head.*)")
    for key, table in list(official.items()):
        if key.endswith("attn.relative_position_bias_table") and key.startswith("layers."):
            window = (int(round(table.shape[0] ** 0.5)) + 1) // 2
            official[key.replace("relative_position_bias_table", "relative_position_index")] = (
                relative_position_index(window))
    return official


def save_official(path: str | Path, state: dict[str, torch.Tensor], arch: dict[str, Any] | None = None,
                  record: dict[str, Any] | None = None) -> int:
    """`{"model": ...}` in the official layout, written atomically; returns the number of entries. `arch`: the
    architecture (`infer_architecture`'s, with the run's decoder head count), whose decoder head count is recorded
    beside the weights (`OURS`) when there is a decoder. `record`: more of what no tensor says, recorded there too
    (a classifier's classes: finetune/trained_classes.py's `official_record`)."""
    official = to_official_keys(state)
    checkpoint: dict[str, Any] = {"model": official}
    ours = dict(record or {})
    if arch and "decoder_heads" in arch and any(key.startswith("decoder.") for key in state):
        ours["decoder_heads"] = int(arch["decoder_heads"])
    if ours:
        checkpoint[OURS] = ours
    with replacing(path) as tmp:
        torch.save(checkpoint, tmp)
    return len(official)


def mlp_widths(state: dict[str, torch.Tensor]) -> dict[int, tuple[int, ...]]:
    """Each encoder stage's MLP hidden widths (fc1's rows), block by block, of a mapped state dict. The one reading of
    them: `infer_architecture` takes mlp_ratio from the first, and a fine-tuning's shape check
    (finetune/job.py) asks whether a configured mlp_ratio builds them all, since the ratio read back (width /
    embed_dim) is not the one the weights were built with where int(width x ratio) rounded (1.3 at width 32: 41,
    read back as 1.28125)."""
    found: dict[int, dict[int, int]] = {}
    for key, value in state.items():
        match = re.fullmatch(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.weight", key)
        if match:
            found.setdefault(int(match[1]), {})[int(match[2])] = int(value.shape[0])
    return {stage: tuple(blocks[b] for b in sorted(blocks)) for stage, blocks in sorted(found.items())}


def mlp_ratio_builds(ratio: float, embed_dim: int, widths: dict[int, tuple[int, ...]]) -> bool:
    """Whether `ratio` at `embed_dim` builds these MLP widths (`mlp_widths`): int(stage width x ratio) at every stage,
    as models/swin.py makes them; False where there are none to compare."""
    return bool(widths) and all(width == int(embed_dim * 2**stage * ratio)
                                for stage, stage_widths in widths.items() for width in stage_widths)


def infer_architecture(state: dict[str, torch.Tensor], decoder_heads: int | None = None) -> dict[str, Any]:
    """The model shape, read off the weight shapes of a mapped state dict. Weights that do not describe a MixMAE
    encoder are a WeightsError (the caller names the file). `decoder_heads`: the count the file or run records (no
    shape says it); None: the official 16."""
    if "encoder.patch_embed.proj.weight" not in state:
        raise WeightsError("holds no encoder weights (no encoder.patch_embed.proj.weight)")
    if "encoder.absolute_pos_embed" not in state:
        raise WeightsError("has no absolute_pos_embed: not a MixMAE/MixMIM encoder but a Swin without an absolute "
                           "position embedding (such as timm's or the official Swin release's), which a MixMAE model "
                           "cannot hold")
    proj = state["encoder.patch_embed.proj.weight"]
    embed_dim, patch = proj.shape[0], proj.shape[-1]
    blocks: dict[int, set[int]] = {}
    heads: dict[int, int] = {}
    windows: dict[int, int] = {}
    for key, value in state.items():
        match = re.match(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table", key)
        if match:
            s, b = int(match[1]), int(match[2])
            blocks.setdefault(s, set()).add(b)
            heads[s] = value.shape[1]
            windows[s] = (int(round(value.shape[0] ** 0.5)) + 1) // 2
    stages = sorted(blocks)
    tokens = state["encoder.absolute_pos_embed"].shape[1]
    arch: dict[str, Any] = {
        "img_size": int(round(tokens**0.5)) * patch,
        "patch_size": patch,
        "embed_dim": embed_dim,
        "depths": [len(blocks[s]) for s in stages],
        "num_heads": [heads[s] for s in stages],
        "window_size": [windows[s] for s in stages],
        "mlp_ratio": mlp_widths(state)[0][0] / embed_dim,
    }
    if "decoder.decoder_embed.weight" in state:
        arch["decoder_dim"] = state["decoder.decoder_embed.weight"].shape[0]
        arch["decoder_depth"] = len({k.split(".")[2] for k in state if k.startswith("decoder.decoder_blocks.")})
        arch["decoder_heads"] = int(decoder_heads or OFFICIAL_DECODER_HEADS)
        if arch["decoder_dim"] % arch["decoder_heads"]:
            raise WeightsError(f"a decoder of width {arch['decoder_dim']} cannot have {arch['decoder_heads']} heads"
                               + ("" if decoder_heads else " (the official count, which the file does not say "
                                  "otherwise)"))
    if "head.weight" in state:
        arch["num_classes"] = state["head.weight"].shape[0]
    return arch


def build_from_architecture(arch: dict[str, Any]) -> torch.nn.Module:
    from mixmae_scale.models.classifier import SwinClassifier
    from mixmae_scale.models.mixmae import MixMAE
    from mixmae_scale.models.swin import SwinShape

    shape = SwinShape(arch["img_size"], arch["patch_size"], arch["embed_dim"], tuple(arch["depths"]),
                      tuple(arch["num_heads"]), tuple(arch["window_size"]), arch["mlp_ratio"])
    if "num_classes" in arch:
        return SwinClassifier(shape, arch["num_classes"], drop_path=0.0)
    if "decoder_dim" in arch:
        return MixMAE(shape, arch["decoder_dim"], arch["decoder_depth"], arch["decoder_heads"])
    from mixmae_scale.models.swin import SwinEncoder

    return _EncoderOnly(SwinEncoder(shape))


class _EncoderOnly(torch.nn.Module):
    """Gives a bare encoder the `encoder.` prefix that the other trees have."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder


def save_weights(path: str | Path, state: dict[str, torch.Tensor], arch: dict[str, Any], kind: str,
                 provenance: dict[str, str] | None = None) -> None:
    """Atomic write: a reader never sees a half-written file. `provenance` (run, step, checkpoint) goes into
    the metadata, so that what is made from the file can say where its weights came from."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {"format": "mixmae-scale", "kind": kind, "arch": json.dumps(arch), **(provenance or {})}
    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file; a file that is not one is a WeightsError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except SafetensorError as exc:
        raise WeightsError(f"{Path(path).absolute()}: not a readable safetensors file ({exc}); export one with "
                           "`mixmae export`") from exc


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    metadata = read_metadata(path)
    if metadata.get("format") != "mixmae-scale":
        raise WeightsError(f"{Path(path).absolute()}: not a mixmae-scale weights file (no 'format' metadata); "
                           "export one with `mixmae export`, or convert an official checkpoint with "
                           "`mixmae model convert-official`")
    return load_file(str(path)), json.loads(metadata["arch"])


KIND_NAMES = {"encoder": "an encoder", "pretrain": "an encoder and decoder", "finetune": "a classifier",
              "segment": "a segmentation model"}


def what_is_at(out: str | Path) -> str | None:
    """What writing weights to `out` is about to replace (None: nothing), the one reading of it for `mixmae export`
    (either format) and `mixmae model convert-official`: an export by the step and run its metadata or its official
    layout's record names, a conversion by its source, other weights by their shape, or a file that is neither.
    Exports of later steps, or of another run, are written where the last one was, and the file that goes is named,
    so that nobody loses track of a step's weights without being told."""
    out = Path(out)
    if not out.is_file():
        return None
    if out.suffix == ".safetensors":
        try:
            record: dict[str, Any] = read_metadata(out)
        except WeightsError:
            return "a file that is not an export"
        if record.get("format") != "mixmae-scale":
            return "a safetensors file mixmae-scale did not write"
        kind, arch = record.get("kind", ""), _json_or_none(record.get("arch"))
        layout = ""
    elif out.suffix in OFFICIAL_SUFFIXES:
        try:
            state, record = read_official_checkpoint(out, mapped=True)
            arch = infer_architecture(map_official_keys(state), record.get("decoder_heads"))
        except (WeightsError, OSError, KeyError, IndexError):
            return "a file that is not a weights checkpoint"
        kind = "finetune" if "num_classes" in arch else "pretrain" if "decoder_dim" in arch else "encoder"
        layout = "an official-layout checkpoint of "
    else:
        return "a file"
    step, run = record.get("step"), record.get("run")
    if step is not None and run is not None:
        return f"step {step} of run {run}"
    if record.get("source"):
        return f"the conversion of {record['source']}"
    width = f" of width {arch['embed_dim']}" if isinstance(arch, dict) and "embed_dim" in arch else ""
    # An export of a tag that names no step (a non-finite stop's) records its run alone: named, not denied.
    unknown = f"of run {run}, no step recorded" if run is not None else "no run or step recorded"
    return f"{layout}{KIND_NAMES.get(kind, 'weights')}{width} ({unknown})"


def _json_or_none(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def require_safetensors_out(out: Path) -> None:
    """`mixmae model convert-official`'s output, checked before the source is read. Every loader (finetune.init,
    --init, load_backbone) tells our safetensors file from an official pickle by the suffix: safetensors bytes written
    to `x.pth` were later refused as a damaged pickle. A folder, or a folder that does not exist, is said as
    `mixmae export --out` says it."""
    if out.suffix != ".safetensors":
        read_as = f" (a {out.suffix} as an official pickle)" if out.suffix in OFFICIAL_SUFFIXES else ""
        raise WeightsError(f"{out}: convert-official writes our safetensors file, which every loader reads back by "
                           f"its suffix{read_as}; name it *.safetensors, e.g. {out.with_suffix('.safetensors')}")
    if out.is_dir():
        raise WeightsError(f"{out}: is a folder; name the file to write (e.g. {out / 'encoder.safetensors'})")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out}: its folder {out.parent.absolute()} does not exist; create it first")


def convert_official_checkpoint(src: str | Path, out: str | Path) -> dict[str, Any]:
    """An official MixMIM checkpoint (pretraining or fine-tuned) as our safetensors file at `out` (*.safetensors),
    its architecture read off the weights into the metadata."""
    require_safetensors_out(Path(out))
    source = Path(src)
    if not source.exists():
        raise FileNotFoundError(f"{src}: not found (tried {source.absolute()})")
    if source.suffix == ".safetensors" and source.is_file() and read_metadata(source).get("format") == "mixmae-scale":
        raise WeightsError(f"{Path(src).absolute()}: already a mixmae-scale weights file (`mixmae export` or an "
                           "earlier conversion): it needs no conversion; finetune.init, --init and load_backbone read "
                           "it as it is")
    state, record = read_official_checkpoint(src)
    try:
        state = map_official_keys(state)
        arch = infer_architecture(state, record.get("decoder_heads"))
    except WeightsError as exc:
        raise WeightsError(f"{Path(src).absolute()}: {exc}") from exc
    model = build_from_architecture(arch)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{src}: converted weights do not fit the inferred model {arch}: missing "
                         f"{result.missing_keys}, unexpected {result.unexpected_keys}")
    kind = "finetune" if "num_classes" in arch else "pretrain" if "decoder_dim" in arch else "encoder"
    # The rest of our record (a classifier's classes) goes into the metadata, where our loaders look for it; the
    # head count is in `arch`, and what save_weights writes itself is not taken from a file.
    carried = {key: value if isinstance(value, str) else json.dumps(value) for key, value in record.items()
               if key not in ("decoder_heads", "format", "kind", "arch")}
    replaced = what_is_at(out)
    save_weights(out, state, arch, kind, provenance={"source": str(source.absolute()), **carried})
    return {"source": str(src), "out": str(out), "kind": kind, "tensors": len(state), "arch": arch,
            "replaced": replaced}
