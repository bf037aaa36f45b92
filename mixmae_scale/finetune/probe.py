"""Probing a frozen encoder: what did pretraining put into its features?

Two read-outs, computed once with no augmentation, each feature standardised on the training split (without it a
few wide features, such as mean colour, which a random encoder passes on as well, dominate):
- a logistic-regression classifier trained to convergence on every stage's tokens average-pooled to a 2x2 grid,
  the last stage's to a 3x3 grid: a global average loses where things are, and the demo's classes differ by
  layout as much as by texture. At the demo's 96 px the last stage's map is 3x3, so it is read whole: pooled to
  2x2, overlapping cells were averaged, and the random encoders reached 44.9 +- 1.8% against 41.6 +- 1.0% read
  whole, while the pretrained encoders lost 1-4 points (benchmarks/results/demo_probe_cpu_fp32.json: the worst
  of seven seeds' margin over the best random encoder went from +4.6 to +8.3 points);
- a weighted k-nearest-neighbour vote (cosine similarity, k=20, temperature 0.07, as DINO's k-NN evaluation) on the
  first two stages' tokens, globally average-pooled: a short pretraining changes the early stages most, while
  the later stages of a barely trained network add hundreds of near-random dimensions that swamp the
  distances (on the demo, benchmarks/results/demo_probe_cpu_fp32.json, the random encoders' k-NN spread fell
  from 1.4 to under 1 point and the five seeds' margins over the best of them rose from +4.8..+7.3 to
  +7.1..+10.7; a sixth seed, trained afterwards, +6.8).

A single random-init baseline is not evidence: random encoders differ by a few points among
themselves, and on the demo one draw happened to beat a pretrained encoder. `compare_with_random_init`
probes several random initialisations and reports the pretrained encoder's margin over their mean, in
units of their spread.
"""

from __future__ import annotations

import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from mixmae_scale.data.loader import ShardLoader
from mixmae_scale.data.loaders import eval_spec
from mixmae_scale.models.classifier import SwinClassifier, load_pretrained_encoder
from mixmae_scale.models.swin import SwinShape

KNN_NEIGHBOURS = 20
LINEAR_GRID = 2  # the linear read-out pools each stage's tokens to a LINEAR_GRID x LINEAR_GRID grid ...
LINEAR_LAST_GRID = 3  # ... but the last stage's to a 3 x 3 grid: at the demo's 96 px, its whole 3 x 3 map
KNN_STAGES = 2  # the k-NN read-out averages the first KNN_STAGES stages' tokens
KNN_TEMPERATURE = 0.07
# Below this many images in either split a probe's top-1 is not a result. On n validation images the 95% interval
# of a top-1 near 50% is about +-98/sqrt(n) points: +-10 at 100 images, already the size of the margins a probe is
# read for (the demo's margins over random encoders, benchmarks/results/demo_probe_cpu_fp32.json, which is why
# the demo has 1500 validation images). Fewer than 100 training images are fewer than 5 sets of k=20
# neighbours for the k-NN vote, and far fewer than the features' dimensions, which any labelling fits linearly.
MIN_PROBE_IMAGES = 100
# Below this many training images the probe cannot run at all: each feature is standardised by the training
# images' spread, which one image does not have (a NaN that stopped L-BFGS with an overflow). `mixmae probe
# --max-samples` takes no less (cli/encoder_commands.py).
MIN_FIT_IMAGES = 2


def not_meaningful_because(train_samples: int, val_samples: int) -> str | None:
    """Why a probe on these split sizes is not a result, or None."""
    small = [f"{name} has {count} images" for name, count in (("train", train_samples), ("val", val_samples))
             if count < MIN_PROBE_IMAGES]
    if not small:
        return None
    return (f"{' and '.join(small)}, fewer than {MIN_PROBE_IMAGES}: the 95% interval of a top-1 on "
            f"{val_samples} validation images is about +-{98 / max(val_samples, 1) ** 0.5:.0f} points")


@dataclass
class ProbeResult:
    top1: float  # linear probe, validation
    knn_top1: float
    train_top1: float
    train_samples: int
    val_samples: int
    not_meaningful: str | None = None  # why the top-1s are not a result (too few images), or None


@dataclass
class Features:
    train_x: torch.Tensor  # the linear read-out's features
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    knn_train_x: torch.Tensor | None = None  # the k-NN read-out's features; None: the linear read-out's
    knn_val_x: torch.Tensor | None = None


def shape_from_arch(arch: dict) -> SwinShape:
    return SwinShape(arch["img_size"], arch["patch_size"], arch["embed_dim"], tuple(arch["depths"]),
                     tuple(arch["num_heads"]), tuple(arch["window_size"]), arch.get("mlp_ratio", 4.0))


def load_images(shards: str, split: str, img_size: int, batch: int, backend: str, threads: int,
                max_samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as eval-transformed tensors (or its first `max_samples` in shard order): decoded once, probed
    by every encoder compared."""
    spec = eval_spec(img_size, batch, threads)
    images, labels, held = [], [], 0
    for loaded, valid in ShardLoader(shards, split, spec, backend, threads).eval_batches():
        keep = valid if max_samples is None else min(valid, max_samples - held)
        images.append(loaded.images[:keep].clone())
        labels.append(loaded.labels[:keep].clone())
        held += keep
        if max_samples is not None and held >= max_samples:
            break
    return torch.cat(images), torch.cat(labels)


def probe_bytes(train: int, val: int, img_size: int) -> int:
    """The least the probe holds at once: every image of both splits as fp32 (3 x size x size x 4 bytes each: 602 KB
    at 224 px, so ImageNet's 1.28M training images are 770 GB) and the k-NN vote's val x train similarity matrix
    (4 bytes an entry). It is made for small sets, such as the demo's."""
    return (train + val) * 3 * img_size**2 * 4 + val * train * 4


def require_memory(shards: str, train: int, val: int, img_size: int, available: int | None = None) -> None:
    """Refuses, before any image is decoded, splits whose `probe_bytes` exceed the memory available (psutil's
    estimate unless `available` is given); says how many training images would fit (`--max-samples`)."""
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    need = probe_bytes(train, val, img_size)
    if need <= available:
        return
    from mixmae_scale.data.errors import DataError

    image = 3 * img_size**2 * 4
    fits = (available - val * image) // (image + 4 * val)
    way_out = (f"--max-samples {fits} reads at most that many training images, which fit" if fits >= MIN_PROBE_IMAGES
               else f"its {val} validation images alone leave no room: probe a smaller set")
    raise DataError(f"--data {shards}: the probe holds every image in memory as fp32 and a val x train k-NN matrix: "
                    f"({train} train + {val} val) x 3 x {img_size} x {img_size} x 4 B + {val} x {train} x 4 B = "
                    f"{need / 1e9:.0f} GB, more than the {available / 1e9:.0f} GB available; {way_out}")


def readout_features(maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage token maps (B, h, w, C) -> (linear read-out features, k-NN read-out features)."""
    sizes = [LINEAR_GRID] * (len(maps) - 1) + [LINEAR_LAST_GRID]
    grids = [F.adaptive_avg_pool2d(t.permute(0, 3, 1, 2), size).flatten(1) for t, size in zip(maps, sizes, strict=True)]
    return torch.cat(grids, dim=1), torch.cat([t.mean(dim=(1, 2)) for t in maps[:KNN_STAGES]], dim=1)


@torch.no_grad()
def encode(model: SwinClassifier, images: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear read-out features, k-NN read-out features) of every image."""
    model.eval()
    parts = [readout_features(model.encoder.stage_maps(images[i:i + batch])) for i in range(0, len(images), batch)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def fit_linear(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, weight_decay: float = 3e-4,
               max_iter: int = 300) -> torch.nn.Linear:
    """Multinomial logistic regression to convergence (L-BFGS from zero weights: deterministic). An L2 of 3e-4
    rather than 1e-3 kept more of the pretrained encoders' margin on the demo (benchmarks/README.md).

    The first version, 300 full-batch AdamW steps at lr 0.05, stopped short and oscillated: its
    accuracy moved by 5-10 points with the head's seed and the training length, which was enough to
    make a random encoder look better than a pretrained one."""
    head = torch.nn.Linear(train_x.shape[1], num_classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head(train_x), train_y) + weight_decay / 2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    return head


def knn_top1(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
             num_classes: int) -> float:
    similarity = F.normalize(val_x, dim=1) @ F.normalize(train_x, dim=1).T
    nearest = similarity.topk(min(KNN_NEIGHBOURS, len(train_x)), dim=1)
    votes = torch.zeros(len(val_x), num_classes).scatter_add_(1, train_y[nearest.indices],
                                                              (nearest.values / KNN_TEMPERATURE).exp())
    return 100 * float((votes.argmax(1) == val_y).float().mean())


def standardise(train_x: torch.Tensor, val_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both splits scaled by the training split's statistics: a BatchNorm without affine."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    return (train_x - mean) / std, (val_x - mean) / std


@torch.no_grad()
def probe_features(features: Features, num_classes: int) -> ProbeResult:
    train_n = len(features.train_y)
    if train_n < MIN_FIT_IMAGES:
        from mixmae_scale.data.errors import DataError

        raise DataError(f"the probe has {train_n} training image{'s' * (train_n != 1)}, fewer than the "
                        f"{MIN_FIT_IMAGES} it needs to standardise its features by their spread; read more "
                        f"(--max-samples {MIN_FIT_IMAGES} or more, or a train split of at least {MIN_FIT_IMAGES})")
    train_x, val_x = standardise(features.train_x, features.val_x)
    with torch.enable_grad():
        head = fit_linear(train_x, features.train_y, num_classes)
    top1 = 100 * float((head(val_x).argmax(1) == features.val_y).float().mean())
    train_top1 = 100 * float((head(train_x).argmax(1) == features.train_y).float().mean())
    if features.knn_train_x is not None and features.knn_val_x is not None:
        train_x, val_x = standardise(features.knn_train_x, features.knn_val_x)
    knn = knn_top1(train_x, features.train_y, val_x, features.val_y, num_classes)
    val_n = len(features.val_y)
    return ProbeResult(top1, knn, train_top1, train_n, val_n, not_meaningful_because(train_n, val_n))


def build_encoder(state: dict[str, torch.Tensor] | None, arch: dict, num_classes: int, seed: int) -> SwinClassifier:
    """`state` None: a randomly initialised encoder of the same shape, drawn from `seed`."""
    torch.manual_seed(seed)
    model = SwinClassifier(shape_from_arch(arch), num_classes, drop_path=0.0)
    if state is not None:
        report = load_pretrained_encoder(model, state)
        if report.missing:
            raise ValueError(f"encoder weights lack {report.missing[:5]}")
    return model


Split = tuple[torch.Tensor, torch.Tensor]  # images, labels


def probe_encoder(state: dict[str, torch.Tensor] | None, arch: dict, train: Split, val: Split, num_classes: int,
                  batch: int = 64, init_seed: int = 0) -> ProbeResult:
    return probe_model(build_encoder(state, arch, num_classes, init_seed), train, val, num_classes, batch)


def probe_model(model: SwinClassifier, train: Split, val: Split, num_classes: int, batch: int = 64) -> ProbeResult:
    return probe_features(model_features(model, train, val, batch), num_classes)


def model_features(model: SwinClassifier, train: Split, val: Split, batch: int = 64) -> Features:
    (train_linear, train_knn), (val_linear, val_knn) = encode(model, train[0], batch), encode(model, val[0], batch)
    return Features(train_linear, train[1], val_linear, val[1], train_knn, val_knn)


def probe_models(models: list[SwinClassifier], train: Split, val: Split, num_classes: int, batch: int = 64
                 ) -> list[ProbeResult]:
    """Every model's probe. The features are extracted one model per thread (each op single-threaded) rather
    than one model at a time on every thread: the tiny encoder's ops are too small to keep several threads busy
    (on 2 cores, 2 encoders at once ran 1.4x the images per second of one encoder on 2 threads), and each
    model's features come out the same bit for bit. The models are built before, in this thread, because
    building one draws its weights from the global RNG. The read-outs are then fitted one at a time on every
    thread: a fit on one thread sums in another order, and the linear probe's top-1 moved by up to 0.5 points."""
    threads = torch.get_num_threads()
    workers = min(len(models), threads)
    if workers <= 1:
        return [probe_model(model, train, val, num_classes, batch) for model in models]
    torch.set_num_threads(max(1, threads // workers))
    try:
        with ThreadPoolExecutor(workers) as pool:
            features = list(pool.map(lambda model: model_features(model, train, val, batch), models))
    finally:
        torch.set_num_threads(threads)
    return [probe_features(f, num_classes) for f in features]


def linear_probe(state: dict[str, torch.Tensor] | None, arch: dict, shards: str, num_classes: int,
                 backend: str = "dali", batch: int = 64, threads: int = 2, seed: int = 0,
                 max_samples: int | None = None) -> ProbeResult:
    """`state` None probes a randomly initialised encoder of the same shape. `max_samples` caps the training images
    read (the first ones in shard order)."""
    train = load_images(shards, "train", arch["img_size"], batch, backend, threads, max_samples)
    val = load_images(shards, "val", arch["img_size"], batch, backend, threads)
    return probe_encoder(state, arch, train, val, num_classes, batch, seed)


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def compare_with_random_init(state: dict[str, torch.Tensor], arch: dict, shards: str, num_classes: int,
                             baseline_seeds: int = 3, backend: str = "dali", batch: int = 64, threads: int = 2,
                             seed: int = 0, max_samples: int | None = None) -> dict:
    """The pretrained encoder against `baseline_seeds` random initialisations, on both read-outs.

    `margin` is pretrained minus the baselines' mean; `margin_in_spread` divides it by the baselines'
    standard deviation (how many times the seed-to-seed noise the gain is)."""
    train = load_images(shards, "train", arch["img_size"], batch, backend, threads, max_samples)
    val = load_images(shards, "val", arch["img_size"], batch, backend, threads)
    models = [build_encoder(state, arch, num_classes, seed),
              *(build_encoder(None, arch, num_classes, seed + 1 + i) for i in range(baseline_seeds))]
    pretrained, *baselines = probe_models(models, train, val, num_classes, batch)
    return margin_report(pretrained, baselines)


def margin_report(pretrained: ProbeResult, baselines: list[ProbeResult]) -> dict:
    """Per read-out: the pretrained top-1, the random encoders' spread, and the margin over their mean."""
    report: dict = {"pretrained": asdict(pretrained), "random_init": [asdict(b) for b in baselines],
                    "not_meaningful": pretrained.not_meaningful}
    for readout, key in (("linear", "top1"), ("knn", "knn_top1")):
        report[readout] = readout_margin(getattr(pretrained, key), [getattr(b, key) for b in baselines])
    return report


def readout_margin(pretrained: float, baselines: list[float]) -> dict:
    """One read-out: the pretrained value, the random encoders' spread, the margin over their mean, and that
    margin in units of their standard deviation (None with a single random encoder)."""
    spread = _spread(baselines)
    margin = pretrained - spread["mean"]
    return {"pretrained": pretrained, "random_init": spread, "margin": margin,
            "margin_in_spread": margin / spread["std"] if spread["std"] > 0 else None}
