"""The DeepSpeed config dict: a file from `ds_configs/`, the profile's own values, then overrides."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mixmae_scale._resources import shipped_folder
from mixmae_scale.config.derive import ResolvedConfig
from mixmae_scale.config.load import ConfigError, deep_merge

DS_CONFIGS_DIR = shipped_folder("ds_configs")  # ds_configs/ of the repository, shipped in the wheel
SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")

MIN_LOSS_SCALE = 1  # fp16: skips at this scale count toward faults.nonfinite_skip_limit (engine/step.py)


def ds_config_file(stage: int, offload_optimizer: bool) -> Path | None:
    if stage == 0:
        return None
    name = "zero3_offload.json" if (stage == 3 and offload_optimizer) else f"zero{stage}.json"
    return DS_CONFIGS_DIR / name


def build_deepspeed_config(resolved: ResolvedConfig) -> dict[str, Any]:
    config, derived = resolved.config, resolved.derived
    path = ds_config_file(config.zero.stage, config.zero.offload_optimizer)
    base: dict[str, Any] = {}
    if path is not None:
        try:
            base = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"DeepSpeed config {path}: {exc}") from exc
    dtype = derived.dtype
    owned: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": derived.micro_batch,
        "gradient_accumulation_steps": derived.accumulation,
        "train_batch_size": derived.global_batch,
        "gradient_clipping": config.optim.grad_clip,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": MIN_LOSS_SCALE},
        "zero_optimization": {"stage": config.zero.stage},
    }
    if config.zero.offload_optimizer:
        owned["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if derived.world_size == 1 and config.zero.stage == 1:
        # One rank has no reduction to overlap with the backward pass; with overlap_comm, ZeRO-1 still runs
        # its per-parameter bucket hook on every gradient (loop/bare step 0.77 -> 0.83, Swin-B, CPU).
        owned["zero_optimization"]["overlap_comm"] = False
    if dtype == "bf16" and config.zero.stage > 0:
        # DeepSpeed accumulates gradients in the model's dtype unless told: bf16 keeps 8 mantissa bits, so
        # summing micro-batches (4 for the H profile) and ranks in it loses precision. fp32 accumulation and
        # reduction, as with fp16's master gradients. (Stage 0 has no such mode in DeepSpeed 0.19.8.)
        owned["data_types"] = {"grad_accum_dtype": "fp32"}
    return deep_merge(deep_merge(base, owned), _whole_numbers_as_int(config.deepspeed))


def _whole_numbers_as_int(tree: Any) -> Any:
    """PyYAML reads `1e8` as the string '1e8' (YAML 1.1 wants `1.0e+8`), and DeepSpeed's pydantic
    schema refuses both strings and floats for its integer sizes: `--set
    deepspeed.zero_optimization.stage3_prefetch_bucket_size=1e8` failed validation. Scientific notation
    becomes a number, and whole numbers become ints, which DeepSpeed's float fields accept as well."""
    if isinstance(tree, dict):
        return {key: _whole_numbers_as_int(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_whole_numbers_as_int(value) for value in tree]
    if isinstance(tree, str) and SCIENTIFIC.fullmatch(tree.strip()):
        tree = float(tree)
    if isinstance(tree, float) and tree.is_integer():
        return int(tree)
    return tree


def engine_config(resolved: ResolvedConfig, run_root: Path) -> dict[str, Any]:
    """The dict a training job hands to deepspeed.initialize: the above plus the per-iteration warm-up +
    cosine schedule (DeepSpeed's WarmupCosineLR, which scales every parameter group's own lr, so layer
    decay survives it) and TensorBoard through DeepSpeed's monitor."""
    config, derived = resolved.config, resolved.derived
    ds = build_deepspeed_config(resolved)
    ds["scheduler"] = {"type": "WarmupCosineLR", "params": {
        "total_num_steps": derived.total_steps, "warmup_num_steps": derived.warmup_steps,
        "warmup_min_ratio": 0.0, "warmup_type": "linear",
        "cos_min_ratio": derived.min_learning_rate / derived.learning_rate}}
    if config.logging.tensorboard:
        ds["tensorboard"] = {"enabled": True, "output_path": str(Path(run_root) / "tensorboard"),
                             "job_name": config.run.name}
    return ds
