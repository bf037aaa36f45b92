"""Export of a run's weights to one safetensors file, loadable without DeepSpeed.

ZeRO shards are gathered with DeepSpeed's zero_to_fp32; the architecture is read off the weights
and stored in the file's metadata, so the fine-tune model can be built from the file alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mixmae_scale.engine.checkpoint import complete_tags
from mixmae_scale.models.convert_official import infer_architecture, save_weights


def export_run(run_dir: str | Path, out: str | Path, tag: str | None = None, with_decoder: bool = False
               ) -> dict[str, Any]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt_dir = Path(run_dir) / "checkpoints"
    tags = complete_tags(ckpt_dir)
    if not tags:
        raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint to export")
    tag = tag or tags[-1]
    if tag not in tags:
        raise FileNotFoundError(f"{ckpt_dir / tag}: not a complete checkpoint (complete: {', '.join(tags)})")
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    # A fine-tuning run's head always comes along: the file is then a complete classifier.
    keep = ("encoder.", "head.") + (("decoder.",) if with_decoder else ())
    weights = {k: v for k, v in state.items() if k.startswith(keep)}
    arch = infer_architecture(weights)
    if with_decoder:
        arch["decoder_heads"] = _decoder_heads(Path(run_dir))
    kind = "finetune" if "head.weight" in weights else "pretrain" if with_decoder else "encoder"
    save_weights(out, weights, arch, kind)
    return {"run": str(run_dir), "checkpoint": str(ckpt_dir / tag), "out": str(out), "kind": kind,
            "tensors": len(weights), "params": sum(v.numel() for v in weights.values()), "arch": arch}


def _decoder_heads(run_dir: Path) -> int:
    import yaml

    return int(yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["decoder_heads"])
