"""The dense probe: what pretraining put into the feature maps, read per pixel by a linear layer.

The frozen backbone's four maps (strides 4-32, models/backbone.py) are brought to one grid (stride 8: the
stride-4 map average-pooled, the coarser maps upsampled bilinearly), concatenated and standardised on the
training split, as the classification probe standardises its pooled features (a few wide channels would
dominate otherwise). A linear layer on them (a 1x1 convolution) is fitted with cross-entropy by L-BFGS from
zero weights, deterministic like the classification probe's, on a fixed sample of each training image's grid
cells (the label at a cell's centre; ignored pixels left out), which keeps the fit's memory at a few hundred MB
on the demo. Validation: every image's logits on the grid, upsampled bilinearly to the mask's size, argmax,
summed into one confusion matrix (finetune/segmentation_metrics.py) and read as mIoU. Both splits take the
evaluation view (resize, centre crop) with no augmentation, so every encoder compared reads the same pixels.

`compare_with_random_init` probes several random initialisations of the same shape, as the classification
probe does, and reports the pretrained encoder's margin over their mean in units of their spread.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from mixmae_scale.data.loader import ShardLoader
from mixmae_scale.data.loaders import eval_spec
from mixmae_scale.data.spec import MASK_IGNORE
from mixmae_scale.finetune.probe import fit_linear, not_meaningful_because, readout_margin, shape_from_arch
from mixmae_scale.finetune.segmentation_metrics import confusion_matrix, miou, pixel_accuracy
from mixmae_scale.models.backbone import SwinBackbone

GRID_STRIDE = 8
CELLS_PER_IMAGE = 48  # training cells sampled per image: 2600 demo images x 48 x 480 channels = 240 MB
# L-BFGS iterations of the read-out's fit, as the classification probe's. 100 stopped short: on the demo they gave
# the pretrained encoder 1.7 points of mIoU less and the random encoders 0.6-0.8 less
# (benchmarks/results/demo_dense_probe_iterations.json), which took its margin below 3x their spread.
FIT_ITERATIONS = 300
# The per-cell read-out's L2, pinned: its figures (benchmarks/results/demo_dense_probe_cpu_fp32.json) were measured
# with it, apart from the classification probe's default.
FIT_L2 = 1e-3


@dataclass
class DenseProbeResult:
    miou: float  # validation, %
    pixel_accuracy: float
    per_class_iou: list[float | None]  # None: a class absent from both the masks and the predictions
    train_pixel_accuracy: float  # on the sampled training cells
    train_samples: int
    val_samples: int
    num_classes: int
    seconds: float  # encoding both splits and fitting, for this encoder
    not_meaningful: str | None = None


@dataclass
class MaskedSplit:
    images: torch.Tensor  # (N, 3, S, S) evaluation view
    masks: torch.Tensor  # (N, S, S) int64 class indices, MASK_IGNORE where unlabelled


def load_masked_split(shards: str, split: str, img_size: int, batch: int, backend: str, threads: int) -> MaskedSplit:
    """A whole split with its masks, decoded once and probed by every encoder compared."""
    spec = eval_spec(img_size, batch, threads, masks=True)
    images, masks = [], []
    loader = ShardLoader(shards, split, spec, backend, threads)
    for loaded, valid in loader.eval_batches():
        images.append(loaded.images[:valid].clone())
        masks.append(loaded.masks[:valid].clone())
    return MaskedSplit(torch.cat(images), torch.cat(masks))


def build_backbone(state: dict[str, torch.Tensor] | None, arch: dict, seed: int) -> SwinBackbone:
    """`state` None: a randomly initialised backbone of the same shape, drawn from `seed`."""
    torch.manual_seed(seed)
    backbone = SwinBackbone(shape_from_arch(arch))
    if state is not None:
        encoder = {k: v for k, v in state.items() if k.startswith("encoder.") and not k.startswith("encoder.norm.")}
        backbone.load_state_dict(encoder, strict=True)
    return backbone.eval()


@torch.no_grad()
def grid_features(backbone: SwinBackbone, images: torch.Tensor, stride: int = GRID_STRIDE) -> torch.Tensor:
    """(B, sum C_i, H / stride, W / stride): every map brought to the grid and concatenated."""
    size = (images.shape[-2] // stride, images.shape[-1] // stride)
    maps = []
    for feature in backbone(images.float()):
        if feature.shape[-1] > size[1]:
            maps.append(F.adaptive_avg_pool2d(feature, size))
        else:
            maps.append(F.interpolate(feature, size=size, mode="bilinear", align_corners=False))
    return torch.cat(maps, dim=1)


def _cell_labels(masks: torch.Tensor, stride: int) -> torch.Tensor:
    """The label at each grid cell's centre pixel."""
    return masks[:, stride // 2::stride, stride // 2::stride]


def sample_cells(features: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                 cells: int = CELLS_PER_IMAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `cells` labelled cells per image, drawn with `generator`: (vectors (n, C), labels (n,))."""
    b, c = features.shape[:2]
    flat_x, flat_y = features.flatten(2).transpose(1, 2), labels.flatten(1)  # (B, cells, C), (B, cells)
    scores = torch.rand(flat_y.shape, generator=generator).masked_fill(flat_y == MASK_IGNORE, -1.0)
    top = scores.topk(min(cells, flat_y.shape[1]), dim=1)
    keep = top.values >= 0
    x = flat_x.gather(1, top.indices[..., None].expand(-1, -1, c))[keep]
    return x, flat_y.gather(1, top.indices)[keep]


@dataclass
class _Readout:
    head: torch.nn.Linear
    mean: torch.Tensor
    std: torch.Tensor
    train_accuracy: float


def fit_readout(backbone: SwinBackbone, train: MaskedSplit, num_classes: int, batch: int, seed: int,
                stride: int = GRID_STRIDE) -> _Readout:
    generator = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for i in range(0, len(train.images), batch):
        features = grid_features(backbone, train.images[i:i + batch], stride)
        x, y = sample_cells(features, _cell_labels(train.masks[i:i + batch], stride), generator)
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    if int(y.max()) >= num_classes:
        raise ValueError(f"a training mask holds label {int(y.max())}, but the probe has {num_classes} classes: "
                         "pass --mask-classes with the data set's class count")
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / std
    with torch.enable_grad():
        head = fit_linear(x, y, num_classes, weight_decay=FIT_L2, max_iter=FIT_ITERATIONS)
    with torch.no_grad():
        accuracy = 100 * float((head(x).argmax(1) == y).float().mean())
    return _Readout(head, mean, std, accuracy)


@torch.no_grad()
def score(backbone: SwinBackbone, readout: _Readout, val: MaskedSplit, num_classes: int, batch: int,
          stride: int = GRID_STRIDE) -> torch.Tensor:
    """The validation confusion matrix: logits on the grid, upsampled to the masks, argmax."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    weight = readout.head.weight[:, :, None, None]
    for i in range(0, len(val.images), batch):
        features = grid_features(backbone, val.images[i:i + batch], stride)
        features = (features - readout.mean[:, None, None]) / readout.std[:, None, None]
        logits = F.conv2d(features, weight, readout.head.bias)
        masks = val.masks[i:i + batch]
        logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        confusion += confusion_matrix(logits.argmax(1), masks, num_classes)
    return confusion


def probe_backbone(backbone: SwinBackbone, train: MaskedSplit, val: MaskedSplit, num_classes: int, batch: int = 64,
                   seed: int = 0) -> DenseProbeResult:
    start = time.perf_counter()
    readout = fit_readout(backbone, train, num_classes, batch, seed)
    confusion = score(backbone, readout, val, num_classes, batch)
    mean, per_class = miou(confusion)
    train_n, val_n = len(train.images), len(val.images)
    return DenseProbeResult(mean, pixel_accuracy(confusion), per_class, readout.train_accuracy, train_n, val_n,
                            num_classes, time.perf_counter() - start, not_meaningful_because(train_n, val_n))


def load_splits(shards: str, img_size: int, batch: int, backend: str, threads: int) -> tuple[MaskedSplit, MaskedSplit]:
    return tuple(load_masked_split(shards, split, img_size, batch, backend, threads)  # type: ignore[return-value]
                 for split in ("train", "val"))


def dense_probe(state: dict[str, torch.Tensor] | None, arch: dict, shards: str, num_classes: int,
                backend: str = "dali", batch: int = 64, threads: int = 2, seed: int = 0) -> DenseProbeResult:
    """`state` None probes a randomly initialised backbone of the same shape."""
    train, val = load_splits(shards, arch["img_size"], batch, backend, threads)
    return probe_backbone(build_backbone(state, arch, seed), train, val, num_classes, batch, seed)


def compare_with_random_init(state: dict[str, torch.Tensor], arch: dict, shards: str, num_classes: int,
                             baseline_seeds: int = 3, backend: str = "dali", batch: int = 64, threads: int = 2,
                             seed: int = 0) -> dict:
    """The pretrained backbone against `baseline_seeds` random initialisations (seeds seed+1, ...); the read-outs
    sample the same training cells (`seed`) for every encoder."""
    train, val = load_splits(shards, arch["img_size"], batch, backend, threads)
    pretrained = probe_backbone(build_backbone(state, arch, seed), train, val, num_classes, batch, seed)
    baselines = [probe_backbone(build_backbone(None, arch, seed + 1 + i), train, val, num_classes, batch, seed)
                 for i in range(baseline_seeds)]
    return dense_margin_report(pretrained, baselines)


def dense_margin_report(pretrained: DenseProbeResult, baselines: list[DenseProbeResult]) -> dict:
    """Per measure (mIoU, pixel accuracy): the pretrained value, the random encoders' spread, the margin."""
    report: dict = {"pretrained": asdict(pretrained), "random_init": [asdict(b) for b in baselines],
                    "not_meaningful": pretrained.not_meaningful}
    for measure in ("miou", "pixel_accuracy"):
        report[measure] = readout_margin(getattr(pretrained, measure), [getattr(b, measure) for b in baselines])
    return report
