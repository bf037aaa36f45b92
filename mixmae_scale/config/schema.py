"""Typed run configuration.

Every knob a run has lives here, with its default and its allowed range, so that a profile typo or
an out-of-range value fails before any process group or GPU is touched. Values that follow from
others (learning rate, accumulation, step counts) are not fields here: `derive.py` computes them
once, and nobody can set them by accident.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SizeName = Literal["tiny", "base", "large", "huge", "custom"]
# `finetune.init` / `segment.init`: a randomly initialised encoder of model.*, the baseline; said, never assumed.
RANDOM_INIT = "random"


@dataclass
class ModelConfig:
    """Shape of the MixMAE encoder and decoder."""

    size: SizeName = "base"
    img_size: int = 224
    patch_size: int = 4
    # Architecture fields left unset (None) are filled from the size preset in
    # `mixmae_scale.models.sizes`; a set field overrides the preset (e.g. windows for 384 px).
    embed_dim: int | None = None
    depths: list[int] | None = None
    num_heads: list[int] | None = None
    window_size: list[int] | None = None
    mlp_ratio: float = 4.0
    decoder_dim: int | None = None
    decoder_depth: int | None = None
    decoder_heads: int | None = None
    drop_path: float = 0.0
    mask_ratio: float = 0.5
    range_mask_ratio: float = 0.0
    norm_pix_loss: bool = True
    # "fused": one SDPA call under an additive same-source mask; "reference": the same, written out (the
    # reference); "grouped": each window's tokens regrouped by source, cross-source pairs skipped
    # (models/source_groups.py). Fine-tuning has no mixing: "grouped" runs the fused path there.
    attention: Literal["fused", "reference", "grouped"] = "fused"
    # 0: no activation checkpointing; k >= 1: checkpoint every k-th encoder block.
    checkpoint_every: int = 0
    # Regional torch.compile of the encoder and decoder blocks (models/regional_compile.py). "auto": on GPUs;
    # off on CPUs, where compiling Swin-B's blocks takes several minutes on two cores (benchmarks/model_step.py
    # measures both), longer than a CPU demo or test run lasts. true compiles on CPUs too.
    # "whole": one graph of the whole forward and loss instead of per-block graphs (GPUs; not with ZeRO-3, whose
    # parameter hooks must stay outside the graph). Pair it with model.attention=grouped, whose FlexAttention
    # kernel keeps the graph free of breaks and of mask-dependent shapes.
    compile: bool | Literal["auto", "whole"] = "auto"


@dataclass
class ShardSource:
    """One shard set of a training mixture (`data.sources`)."""

    shards: str  # a folder or s3:// prefix holding a dataset.json (made by `mixmae shards` or `mixmae shards adopt`)
    # open_clip's upsampling factor: each epoch visits every shard of this set `weight` times (0.5: half of its
    # shards, another half each epoch); the run log prints each set's resulting share of the samples.
    weight: float = 1.0
    split: str | None = None  # default: data.train_split


@dataclass
class DataConfig:
    # A folder or s3:// prefix with dataset.json: training reads its train_split (unless data.sources is set),
    # held-out losses and fine-tuning evaluation its val_split.
    shards: str = "demo_data/shards"
    # Several shard sets mixed by weight for training (data.shards still provides the validation split).
    sources: list[ShardSource] = field(default_factory=list)
    loader: Literal["dali", "torch"] = "dali"
    train_split: str = "train"
    val_split: str = "val"
    # Where pretraining's held-out images (the held-out loss at the start and the end, the reconstruction grids)
    # come from. "auto": data.val_split when data.shards has it, else the last logging.heldout_batches x batch.micro
    # samples (at least 8) of data.train_split in manifest order, which training then leaves out on every rank: a
    # function of the manifest and these keys, the same on every run and world size (data/heldout.py, docs/heldout.md).
    # "split": data.val_split or an error; "train": that tail even when a validation split exists.
    heldout: Literal["auto", "split", "train"] = "auto"
    # Used for step arithmetic before a manifest is read (ImageNet-1K train by default); the
    # trainer replaces it with the manifest's count.
    train_samples: int = 1_281_167
    # The random-resized-crop scale; None: the job's recipe (data/loaders.py: pretraining 0.2-1, fine-tuning
    # 0.08-1, segmentation 0.25-1). A value given applies to whichever job runs. A run's config.yaml records the
    # scale used (engine/loop.start_run fills it).
    crop_scale: list[float] | None = None
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    hflip: float = 0.5
    num_threads: int = 4
    # Samples per shuffled window of a rank's run of the epoch (encoded bytes held in memory, as DALI's buffer).
    shuffle_buffer: int = 4096
    decode_device: Literal["auto", "cpu", "gpu"] = "auto"
    # Resampling after the random crop: bicubic as the official recipe. "linear" (antialiased) is opt-in:
    # DALI's CPU pipeline ran 1.4x faster with it (benchmarks/loader.py), which matters only where the
    # CPU decodes (no GPU); the published numbers were obtained with bicubic.
    interpolation: Literal["bicubic", "linear"] = "bicubic"
    # Rotate images by their EXIF orientation tag before cropping. Off, as the official code (PIL's open ignores the
    # tag); on is opt-in for photo collections (phones write the tag instead of rotating the pixels). Conversion keeps
    # the tag on every image, copied or re-encoded (`--resize-shorter`, downscaling, PNG...: shards/jpeg_check.py
    # writes the source's tag into the new JPEG), so the setting applies to a whole set alike.
    exif_orientation: bool = False


@dataclass
class BatchConfig:
    """Batch arithmetic. With `global_batch` (and no `accumulation`), `micro` is a per-GPU ceiling (the
    planner's): each launch takes the largest even micro-batch up to it that divides the global batch
    over its GPUs, and accumulates the rest, so one profile runs on 8 or 256 GPUs. With `accumulation`,
    `micro` is used as given."""

    micro: int = 128
    global_batch: int | None = 2048
    accumulation: int | None = None


@dataclass
class OptimConfig:
    base_learning_rate: float = 1.5e-4  # per 256 images; lr = base x global_batch / 256
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 0.0  # 0 disables clipping (the published recipe does not clip)
    # Opt-in: no weight decay on relative-position bias tables and the mask token (timm Swin's habit);
    # the official MixMAE decays them (see engine/optimizer.py and docs/recipe.md).
    exempt_tables_from_decay: bool = False
    # Opt-in muP-style width transfer for scaling studies (pretraining): the lr of every matrix whose fan-in grows
    # with the width (Linear weights; not the patch embedding, norms, biases, bias tables, mask token) is
    # scaled by width_lr_base / model.embed_dim, so one base lr tuned at that width serves every width.
    width_lr_base: int | None = None


@dataclass
class ScheduleConfig:
    epochs: float = 600
    warmup_epochs: float = 40
    min_learning_rate: float = 0.0


@dataclass
class PrecisionConfig:
    # auto: bf16 where the device computes it natively, fp16 on GPUs without bf16, fp32 otherwise
    # (config/precision.py); the choice is `derived.dtype`, with its reason.
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"


@dataclass
class ZeroConfig:
    stage: int = 1
    offload_optimizer: bool = False


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    resume: str = "auto"  # auto | none | path to a checkpoint tag folder
    at_end: bool = True  # also save when the run ends (benchmarks turn it off)
    # After a resume on another world size or precision (through DeepSpeed's universal checkpoint), save the loaded
    # state at once in the new layout (tag step...-relayout): the next restart on this layout loads it directly.
    save_after_layout_change: bool = False
    # A resume compares the configuration with the one the checkpoint recorded (engine/checkpointing/recipe.py):
    # changed keys are noted; one that changes what the loss means at the same step (model.mask_ratio, the data's
    # augmentation, ...) is refused unless this is true. The schedule and learning rate may change without it.
    allow_recipe_change: bool = False


@dataclass
class WandbConfig:
    """Weights & Biases beside TensorBoard and CSV (engine/wandb_sink.py): rank 0 logs the same scalars, the config,
    the run record and the reconstruction grids; a resumed run continues the same W&B run. Needs the `wandb` extra."""

    mode: Literal["off", "online", "offline"] = "off"  # offline: files under WANDB_DIR (default: the run folder)
    project: str = "mixmae-scale"
    entity: str | None = None  # team or user; None: the logged-in user's default
    group: str | None = None  # `mixmae scaling run` sets the sweep's name
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    every_steps: int = 20
    heldout_batches: int = 4  # validation batches scored with fixed masks at start and end (none fit: null + reason)
    visualize_every_steps: int = 1000  # reconstruction grid of fixed validation images (0: never)
    tensorboard: bool = True  # metrics.csv is always written: resume, `mixmae plot` and scaling sweeps read it
    # Peak dense bf16 FLOP/s of one device for MFU; 0 looks it up from the device name.
    peak_tflops: float = 0.0
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class FinetuneConfig:
    """Fine-tuning and evaluation (the published B recipe by default; see launch/profiles/finetune_*.yaml)."""

    # The encoder to start from: an exported .safetensors, a pretraining run folder or an official MixMIM .pth, or
    # "random" for a randomly initialised encoder of model.* (the baseline). No default: unset is refused at the
    # start (finetune/pretrained.py), as a fine-tuning from random weights is never an accident.
    init: str | None = None
    num_classes: int | None = None  # None: from the shards' classes.json
    layer_decay: float = 0.7
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    # timm's rand-m9-mstd0.5-inc1 (the official --aa): 2 ops, magnitude 9 on timm's 0-10 scale with
    # per-op noise of std 0.5, the increasing-severity op set, each op applied with probability 0.5. 0 ops
    # disables it. The PyTorch loader runs timm's own transform, DALI its rebuild (data/rand_augment.py).
    rand_augment_ops: int = 2
    rand_augment_magnitude: int = 9
    rand_augment_magnitude_std: float = 0.5
    random_erasing: float = 0.25
    eval_every_epochs: float = 1.0


@dataclass
class SegmentConfig:
    """Semantic-segmentation fine-tuning (`mixmae segment`): the dense backbone (models/backbone.py) under a UperNet
    head (models/segmentation_head.py), trained on image and mask crops. The published ADE20K recipe by default
    (launch/profiles/seg_ade20k.yaml)."""

    # The encoder to start from: an exported .safetensors, a pretraining run folder or an official MixMIM .pth, or
    # "random" for a randomly initialised encoder of model.* (the baseline). No default: a segmentation run from
    # random weights is never an accident.
    init: str | None = None
    num_classes: int = 150  # ADE20K's; labels are 0..num_classes-1, ignore_index marks unlabeled pixels
    ignore_index: int = 255
    crop_size: int = 512  # training crops and evaluation size (height = width), a multiple of 32
    head_channels: int = 512  # the UperNet head's width at every level (a multiple of 32: GroupNorm groups)
    pool_scales: list[int] = field(default_factory=lambda: [1, 2, 3, 6])  # the pyramid pooling module's; [] drops it
    head_dropout: float = 0.1
    layer_decay: float = 0.9  # the encoder's layer-wise lr decay; the head learns at the full rate x head_lr_scale
    # The head's lr as a multiple of the full rate (mmseg's `lr_mult` on the decode head, 10 in SegFormer's recipe):
    # 1 in the published UperNet recipe; a short run's new head needs more than the encoder it reads (seg_demo).
    head_lr_scale: float = 1.0
    eval_every_steps: int = 1000  # mIoU on data.val_split, and at the last step; the best keeps its checkpoint


@dataclass
class FaultConfig:
    """How a run reacts to trouble, and the switches that provoke it (for tests of that reaction)."""

    # Consecutive non-finite attempts (a loss, or the gradients of a step DeepSpeed then does not apply) skipped
    # before the run stops with a checkpoint (engine/faults.py). fp16 loss-scale overflows do not count: they are
    # the dynamic loss scaler's normal work.
    nonfinite_skip_limit: int = 5
    # What a resume after such a stop does: "rollback" to the newest regular checkpoint before the stop and skip
    # every sample read since it (PaLM's and OPT's remedy for divergence); "skip" keeps the stop's weights (the
    # last good ones: no non-finite update is ever applied) and skips only the failed attempts' samples;
    # "replay" re-reads them from the step's start, which only helps if the cause was outside the data.
    on_nonfinite_stop: Literal["rollback", "skip", "replay"] = "rollback"
    data_stall_s: float = 300.0  # a batch that takes longer than this to arrive is reported
    # Testing only: the run's n-th micro-batch (counted from 0 over the whole run, on every rank) gets a NaN loss,
    # or a finite loss with NaN gradients. A rolled-back or skipping resume never reads these batches again.
    inject_nan_loss_at_batches: list[int] = field(default_factory=list)
    inject_nan_grad_at_batches: list[int] = field(default_factory=list)
    # Testing only: [rank, step] raises an exception on that rank after that step (a failing rank).
    inject_exception_at: list[int] = field(default_factory=list)


@dataclass
class ClusterConfig:
    """Where the run goes; the world size used for batch arithmetic comes from here."""

    num_nodes: int = 1
    gpus_per_node: int = 8
    hostfile: str | None = None
    include: str | None = None  # deepspeed --include, e.g. "worker-0:0,1@worker-1"
    exclude: str | None = None
    # "slurm" is read (a cluster file shared with the sbatch scripts may say it) but `mixmae launch` refuses it on
    # several nodes: DeepSpeed's slurm backend drops --module and the port (cluster/compose.py, SLURM_REFUSAL).
    launcher: Literal["pdsh", "openmpi", "mvapich", "slurm", "local"] = "pdsh"
    master_addr: str | None = None
    # None: `mixmae launch` derives one from the run folder (cluster/rendezvous.py launch_port), the sbatch scripts from
    # the job id, so that two runs on one node do not share it.
    master_port: int | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class RunConfig:
    name: str = "mixmae"
    output_dir: str = "runs"
    seed: int = 0


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # Free-form keys merged last into the DeepSpeed config dict (e.g. zero_optimization.*):
    # DeepSpeed validates them itself when the engine starts.
    deepspeed: dict[str, Any] = field(default_factory=dict)


# Sections whose contents are free-form dictionaries rather than typed fields.
FREE_FORM_SECTIONS = ("deepspeed",)
FREE_FORM_FIELDS = ("cluster.env",)
