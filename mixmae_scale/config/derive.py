"""Validation of ranges and the values that follow from the configuration, computed once.

Batch arithmetic follows DeepSpeed's rule global = micro x accumulation x world size; the learning
rate follows the MAE/MixMAE linear scaling rule lr = base_lr x global / 256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from mixmae_scale.config.load import ConfigError
from mixmae_scale.config.precision import Hardware, choose_precision, detect_hardware
from mixmae_scale.config.schema import Config, SegmentConfig
from mixmae_scale.data.errors import plural
from mixmae_scale.models.sizes import ARCH_FIELDS, SIZES


@dataclass(frozen=True)
class Derived:
    world_size: int
    micro_batch: int
    accumulation: int
    global_batch: int
    learning_rate: float
    min_learning_rate: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    final_grid: int
    masked_cells: int
    dtype: str  # precision.dtype made concrete for the hardware (see config/precision.py)
    dtype_reason: str
    dtype_warning: str | None  # the requested dtype is emulated or unsupported on this hardware
    compile: bool = False  # model.compile made concrete: "auto" compiles on GPUs only
    compile_whole: bool = False  # model.compile=whole: the whole forward and loss in one graph


@dataclass(frozen=True)
class ResolvedConfig:
    config: Config
    derived: Derived
    sources: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.config), "derived": dataclasses.asdict(self.derived),
                "sources": list(self.sources)}

    def model_shape(self) -> dict[str, Any]:
        """The model keys a checkpoint's tensors depend on (stored with each checkpoint, so that a refusal can
        name the keys that differ)."""
        model = dataclasses.asdict(self.config.model)
        return {k: model[k] for k in ("img_size", "patch_size", "mlp_ratio", *ARCH_FIELDS)}

    def model_digest(self) -> str:
        """Changes exactly when a change would make checkpoints incompatible."""
        return hashlib.sha256(json.dumps(self.model_shape(), sort_keys=True).encode()).hexdigest()[:16]


def fill_model_preset(config: Config) -> None:
    model = config.model
    if model.size == "custom":
        missing = [f"model.{name}" for name in ARCH_FIELDS if getattr(model, name) is None]
        if missing:
            raise ConfigError(f"model.size is 'custom', so these keys must be set: {', '.join(missing)}")
        return
    for name, value in SIZES[model.size].items():
        if getattr(model, name) is None:
            setattr(model, name, list(value) if isinstance(value, list) else value)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: Config) -> None:
    m = config.model
    stages = len(m.depths)
    _require(stages >= 1, "model.depths must name at least one stage")
    for name in ("num_heads", "window_size"):
        _require(len(getattr(m, name)) == stages,
                 f"model.{name} has {len(getattr(m, name))} entries but model.depths has {stages}")
    _require(all(d >= 1 for d in m.depths), f"model.depths must be >= 1, got {m.depths}")
    # checked before the arithmetic below, where a zero or negative width failed as a ZeroDivisionError or a
    # torch error while building the model, naming no key
    _require(m.embed_dim >= 1, f"model.embed_dim must be >= 1, got {m.embed_dim}")
    for name in ("num_heads", "window_size"):
        _require(all(v >= 1 for v in getattr(m, name)), f"model.{name} must be >= 1 each, got {getattr(m, name)}")
    _require(m.mlp_ratio > 0, f"model.mlp_ratio must be positive, got {m.mlp_ratio:g}")
    for name in ("decoder_dim", "decoder_heads"):
        _require(getattr(m, name) >= 1, f"model.{name} must be >= 1, got {getattr(m, name)}")
    _require(m.decoder_depth >= 0, f"model.decoder_depth must be >= 0, got {m.decoder_depth}")
    _require(m.patch_size >= 1 and m.img_size >= 1, "model.img_size and model.patch_size must be positive")
    reduction = m.patch_size * 2 ** (stages - 1)
    _require(m.img_size % reduction == 0,
             f"model.img_size={m.img_size} must be divisible by patch_size x 2^(stages-1) = {reduction} "
             "so that every stage has a whole number of tokens")
    for s in range(stages):
        dim = m.embed_dim * 2**s
        _require(dim % m.num_heads[s] == 0,
                 f"model.num_heads[{s}]={m.num_heads[s]} does not divide the stage width {dim}")
        res = m.img_size // m.patch_size // 2**s
        window = min(m.window_size[s], res)
        _require(res % window == 0,
                 f"model.window_size[{s}]={m.window_size[s]} does not tile the {res}x{res} stage grid")
    _require(m.decoder_dim % m.decoder_heads == 0, "model.decoder_heads must divide model.decoder_dim")
    _require(0.0 < m.mask_ratio < 1.0, f"model.mask_ratio must be in (0, 1), got {m.mask_ratio}")
    _require(m.range_mask_ratio >= 0.0 and m.mask_ratio + m.range_mask_ratio < 1.0,
             f"model.range_mask_ratio must be >= 0 and model.mask_ratio + model.range_mask_ratio < 1, got "
             f"range_mask_ratio={m.range_mask_ratio} with mask_ratio={m.mask_ratio}")
    _require(0.0 <= m.drop_path < 1.0, f"model.drop_path must be in [0, 1), got {m.drop_path}")
    _require(m.checkpoint_every >= 0, "model.checkpoint_every must be >= 0 (0 disables checkpointing)")

    b = config.batch
    _require(b.micro >= 2 and b.micro % 2 == 0,
             f"batch.micro must be even and >= 2 (images are mixed in pairs i, B-1-i), got {b.micro}")
    _require(b.global_batch is not None or b.accumulation is not None,
             "set batch.global_batch or batch.accumulation")
    o = config.optim
    _require(o.base_learning_rate > 0, "optim.base_learning_rate must be positive")
    _require(o.weight_decay >= 0, "optim.weight_decay must be >= 0")
    _require(len(o.betas) == 2 and all(0 <= x < 1 for x in o.betas),
             f"optim.betas must be two values in [0, 1), got {o.betas}")
    _require(o.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)")
    s = config.schedule
    _require(s.epochs > 0 and 0 <= s.warmup_epochs <= s.epochs,
             f"schedule: need 0 <= warmup_epochs <= epochs, got {s.warmup_epochs} and {s.epochs}")
    _require(config.zero.stage in (0, 1, 2, 3), f"zero.stage must be 0, 1, 2 or 3, got {config.zero.stage}")
    _require(not (m.compile == "whole" and config.zero.stage == 3),
             "model.compile=whole would trace through ZeRO-3's parameter gathering hooks: with zero.stage=3 use "
             "model.compile=true (per-block graphs)")
    _require(not (config.zero.offload_optimizer and config.zero.stage == 0),
             "zero.offload_optimizer needs zero.stage >= 1")
    d = config.data
    _require(d.train_samples >= 1, "data.train_samples must be positive")
    _require(d.crop_scale is None or len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1,
             f"data.crop_scale must be [min, max] within (0, 1], got {d.crop_scale}")
    _require(len(d.crop_ratio) == 2 and 0 < d.crop_ratio[0] <= d.crop_ratio[1],
             f"data.crop_ratio must be [min, max] with 0 < min <= max, got {d.crop_ratio}")
    c = config.cluster
    for key in ("num_nodes", "gpus_per_node"):  # each named with its value: a cluster file sets both
        _require(getattr(c, key) >= 1, f"cluster.{key} must be >= 1, got {getattr(c, key)}")
    _require(c.master_port is None or 1 <= c.master_port <= 65535,
             f"cluster.master_port={c.master_port} is not a TCP port (1-65535)")
    _require(config.checkpoint.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {config.checkpoint.keep_last}")
    _require(config.checkpoint.every_steps >= 1,
             f"checkpoint.every_steps must be >= 1, got {config.checkpoint.every_steps}")
    _require(config.logging.every_steps >= 1, f"logging.every_steps must be >= 1, got {config.logging.every_steps}")
    f = config.faults
    _require(f.data_stall_s > 0, f"faults.data_stall_s must be a positive number of seconds, got {f.data_stall_s}")
    _require(f.nonfinite_skip_limit >= 1,
             f"faults.nonfinite_skip_limit must be >= 1 (consecutive non-finite attempts), "
             f"got {f.nonfinite_skip_limit}")
    _validate_wandb(config)
    _validate_segment(config)


def _validate_segment(config: Config) -> None:
    """The segmentation keys, checked for every run (their defaults pass) so that a typo fails at start."""
    seg = config.segment
    _require(seg.num_classes >= 1, f"segment.num_classes must be >= 1, got {seg.num_classes}")
    _require(not 0 <= seg.ignore_index < seg.num_classes,
             f"segment.ignore_index={seg.ignore_index} is one of the {seg.num_classes} class labels; use a value "
             "outside 0..num_classes-1 (255, the convention of ADE20K's and the demo's masks)")
    _require(seg.crop_size >= 32 and seg.crop_size % 32 == 0,
             f"segment.crop_size must be a positive multiple of 32 (the backbone's last stride), got {seg.crop_size}")
    _require(seg.head_channels >= 32 and seg.head_channels % 32 == 0,
             f"segment.head_channels must be a positive multiple of 32 (GroupNorm groups), got {seg.head_channels}")
    _require(all(s >= 1 for s in seg.pool_scales), f"segment.pool_scales must be >= 1, got {seg.pool_scales}")
    _require(0.0 <= seg.head_dropout < 1.0, f"segment.head_dropout must be in [0, 1), got {seg.head_dropout}")
    _require(0.0 < seg.layer_decay <= 1.0, f"segment.layer_decay must be in (0, 1], got {seg.layer_decay}")
    _require(seg.head_lr_scale > 0, f"segment.head_lr_scale must be positive, got {seg.head_lr_scale}")
    _require(seg.eval_every_steps >= 1, "segment.eval_every_steps must be >= 1")


def _validate_wandb(config: Config) -> None:
    """Said at start, before any rank or GPU is touched, not at the first logged step."""
    import importlib.util

    settings = config.logging.wandb
    if settings.mode == "off":
        return
    _require(bool(settings.project.strip()), "logging.wandb.project must not be empty")
    _require(importlib.util.find_spec("wandb") is not None,
             f"logging.wandb.mode={settings.mode} needs the wandb package: pip install \"mixmae-scale[wandb]\" "
             "(or set logging.wandb.mode=off)")


def _largest_micro(global_batch: int, micro_ceiling: int, world: int) -> int:
    """The largest even micro-batch up to the ceiling that divides each GPU's share of `global_batch`; 0 if none."""
    share, remainder = divmod(global_batch, world)
    if remainder:
        return 0
    return max((m for m in range(2, min(micro_ceiling, share) + 1, 2) if share % m == 0), default=0)


class BatchSplitError(ConfigError):
    """A global batch this many GPUs cannot split. Its own type, with the numbers, because the way out differs for a
    run folder that already holds checkpoints: another global batch is another run there (checkpointing/resume.py
    refuses it), so a resume is told the GPU counts instead (engine/run_folder.py `unsplittable_resume`)."""

    def __init__(self, message: str, global_batch: int, world: int, gpus: str) -> None:
        super().__init__(message)
        self.global_batch, self.world, self.gpus = global_batch, world, gpus


def solve_batch(global_batch: int, micro_ceiling: int, world: int) -> tuple[int, int]:
    """(micro, accumulation) reaching `global_batch` on `world` GPUs: the largest even micro-batch up to the
    profile's ceiling (the planner's per-GPU limit) that divides each GPU's share, so the fewest
    accumulation steps. A share that no even micro-batch divides is one error naming the nearest
    global batches that work on this many GPUs, and the GPU counts that work for this global batch.
    Each nearest global batch says the micro-batch x accumulation it gives, the larger micro-batch (the one
    closest to the profile's) first: neighbours are not equal choices (Swin-H on 12 GPUs: 2040 is micro 34 x 5,
    2064 micro 4 x 43, about 10x slower)."""
    micro = _largest_micro(global_batch, micro_ceiling, world)
    if micro:
        return micro, global_batch // world // micro
    step = 2 * world  # each GPU needs an even number of images: MixMAE pairs image i with B-1-i
    below, above = global_batch // step * step, (global_batch // step + 1) * step
    # Sorted by micro-batch, largest first; a tie keeps the lower global batch first (the smaller change).
    ways = sorted(((g, _largest_micro(g, micro_ceiling, world)) for g in (below, above) if g > 0),
                  key=lambda way: -way[1])
    near = [f"{g} (micro {m} x {g // world // m} accumulation step{'s' * (g // world // m != 1)})" for g, m in ways]
    worlds = [w for w in range(1, global_batch // 2 + 1) if global_batch % (2 * w) == 0]
    fewer = max((w for w in worlds if w < world), default=None)
    more = min((w for w in worlds if w > world), default=None)
    gpus = " or ".join(str(w) for w in (fewer, more) if w)
    raise BatchSplitError(
        f"batch.global_batch={global_batch} cannot be split over {plural(world, 'GPU')}: each GPU needs an even "
        f"number of images (MixMAE pairs them). Nearest global batches for {plural(world, 'GPU')}: "
        f"{' or '.join(map(str, near))} (--set batch.global_batch=N; the learning rate follows, base lr x N / 256)"
        + (f"; or use {gpus} GPU{'s' * (gpus != '1')}" if gpus else ""), global_batch, world, gpus)


def too_few_samples(global_batch: int, samples: int, world: int, accumulation_set: bool) -> str:
    """The refusal of a global batch above the training set, naming the largest global batch this many GPUs take
    (each GPU an even number of images: solve_batch); the sample count itself was named, which a small folder's
    count (odd, or not a multiple of 2 x GPUs) often is not."""
    step = 2 * world
    largest = samples // step * step
    said = f"the global batch {global_batch} is larger than the {samples} training samples"
    if not largest:
        fewer = " or on fewer GPUs (one takes a global batch of 2)" if world > 1 and samples >= 2 else ""
        return (f"{said}, and no global batch fits on {plural(world, 'GPU')}: the smallest is {step} (each GPU takes "
                f"an even number of images, MixMAE pairs them); train on more data{fewer}")
    unset = " with batch.accumulation unset" if accumulation_set else ""
    return (f"{said}: the largest global batch on {plural(world, 'GPU')} is {largest} (a multiple of {step}: each "
            f"GPU takes an even number of images, MixMAE pairs them): --set batch.global_batch={largest}{unset}, or "
            "train on more data")


def derive(config: Config, world_size: int | None = None, train_samples: int | None = None,
           hardware: Hardware | None = None) -> Derived:
    """`world_size` and `train_samples` default to the cluster section and data.train_samples; the
    trainer passes the real process-group size and the manifest's count. `hardware` (default: this
    machine's) decides what `precision.dtype: auto` becomes."""
    world = world_size or config.cluster.num_nodes * config.cluster.gpus_per_node
    b = config.batch
    if b.global_batch is not None and b.accumulation is None:
        micro, accumulation = solve_batch(b.global_batch, b.micro, world)
    elif b.global_batch is not None:
        micro, accumulation = b.micro, b.accumulation
        if micro * accumulation * world != b.global_batch:
            raise ConfigError(
                f"batch.accumulation={accumulation} contradicts batch.global_batch={b.global_batch}: "
                f"{micro} x {accumulation} x {world} GPUs = {micro * accumulation * world}; set only one of them")
    else:
        micro, accumulation = b.micro, b.accumulation
        if accumulation < 1:
            raise ConfigError(f"batch.accumulation must be >= 1, got {accumulation}")
    per_step = micro * world
    global_batch = per_step * accumulation
    samples = train_samples or config.data.train_samples
    steps_per_epoch = samples // global_batch
    if steps_per_epoch < 1:
        raise ConfigError(too_few_samples(global_batch, samples, world, b.accumulation is not None))
    m = config.model
    final_grid = m.img_size // (m.patch_size * 2 ** (len(m.depths) - 1))
    scale = global_batch / 256
    hardware = hardware or detect_hardware()
    precision = choose_precision(config.precision.dtype, hardware)
    return Derived(
        world_size=world,
        micro_batch=micro,
        accumulation=accumulation,
        global_batch=global_batch,
        learning_rate=config.optim.base_learning_rate * scale,
        min_learning_rate=config.schedule.min_learning_rate,
        steps_per_epoch=steps_per_epoch,
        total_steps=math.ceil(config.schedule.epochs * steps_per_epoch),
        # At least one: DeepSpeed's WarmupCosineLR refuses 0 ("warmup_num_steps must be a positive integer") in
        # deepspeed.initialize, after the run folder was taken; schedule.warmup_epochs=0 is one step of warm-up.
        warmup_steps=max(1, math.ceil(config.schedule.warmup_epochs * steps_per_epoch)),
        final_grid=final_grid,
        masked_cells=int(final_grid * final_grid * m.mask_ratio),
        dtype=precision.dtype,
        dtype_reason=precision.reason,
        dtype_warning=precision.warning,
        compile=m.compile if isinstance(m.compile, bool) else m.compile == "whole" or hardware.device == "cuda",
        compile_whole=m.compile == "whole",
    )


def resolve(config: Config, sources: list[str] | tuple[str, ...] = (), world_size: int | None = None,
            train_samples: int | None = None, hardware: Hardware | None = None) -> ResolvedConfig:
    fill_model_preset(config)
    validate(config)
    return ResolvedConfig(config, derive(config, world_size, train_samples, hardware), tuple(sources))


def run_kind(profile: str) -> str:
    """The job a profile sets up, read from its own file (over base.yaml), not from a cluster file or --set: a
    profile that sets `segment.*` (seg_demo leaves its init to `--init`) is a segmentation profile; one that names
    the encoder to start from (`finetune.init`, `random` included) is a classification fine-tuning profile. Read off
    the resolved config, `launch finetune_tiny --set finetune.init=null` composed a pretraining launch of the
    fine-tuning recipe, where the user asked for a fine-tuning that lacks its init (which `mixmae finetune` refuses);
    and --set cannot make a pretraining profile a fine-tuning one (cli/job_commands.py refuses that)."""
    from mixmae_scale.config.load import load_config

    config = load_config(profile)[0]
    if config.segment != SegmentConfig():
        return "segment"
    return "finetune" if config.finetune.init else "pretrain"


def load_resolved(profile: str, cluster: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                  world_size: int | None = None, train_samples: int | None = None,
                  hardware: Hardware | None = None) -> ResolvedConfig:
    from mixmae_scale.config.load import load_config

    config, sources = load_config(profile, cluster, overrides)
    return resolve(config, sources, world_size, train_samples, hardware)
