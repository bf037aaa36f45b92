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
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from mixmae_scale.data.errors import DataError, plural
from mixmae_scale.data.loader import ShardLoader
from mixmae_scale.data.loaders import eval_spec
from mixmae_scale.data.manifest import SplitShards
from mixmae_scale.models.classifier import SwinClassifier, load_pretrained_encoder
from mixmae_scale.models.swin import SwinShape

KNN_NEIGHBOURS = 20
LINEAR_GRID = 2  # the linear read-out pools each stage's tokens to a LINEAR_GRID x LINEAR_GRID grid ...
LINEAR_LAST_GRID = 3  # ... but the last stage's to a 3 x 3 grid: at the demo's 96 px, its whole 3 x 3 map
KNN_STAGES = 2  # the k-NN read-out averages the first KNN_STAGES stages' tokens
KNN_TEMPERATURE = 0.07
KNN_CHUNK = 1024  # validation images per block of the k-NN vote's similarity matrix
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
    small = [f"{name} has {plural(count, 'image')}" for name, count in (("train", train_samples), ("val", val_samples))
             if count < MIN_PROBE_IMAGES]
    if not small:
        return None
    return (f"{' and '.join(small)}, fewer than {MIN_PROBE_IMAGES}: the 95% interval of a top-1 on "
            f"{plural(val_samples, 'validation image')} is about +-{98 / max(val_samples, 1) ** 0.5:.0f} points")


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


Split = tuple[torch.Tensor, torch.Tensor]  # images, labels


def read_batches(shards: str, split: str, img_size: int, batch: int, backend: str, threads: int,
                 max_samples: int | None = None) -> Iterator[Split]:
    """A split's eval-transformed images, one batch at a time (or its first `max_samples` in shard order)."""
    spec = eval_spec(img_size, batch, threads)
    held = 0
    for loaded, valid in ShardLoader(shards, split, spec, backend, threads).eval_batches():
        keep = valid if max_samples is None else min(valid, max_samples - held)
        yield loaded.images[:keep].clone(), loaded.labels[:keep].clone()
        held += keep
        if max_samples is not None and held >= max_samples:
            break


def stage_dims(arch: dict) -> list[int]:
    return [arch["embed_dim"] * 2**s for s in range(len(arch["depths"]))]


def linear_dims(arch: dict) -> int:
    """The linear read-out's inputs per image: every stage's 2x2 grid but the last's 3x3 (12,800 for Swin-B)."""
    dims = stage_dims(arch)
    return LINEAR_GRID**2 * sum(dims[:-1]) + LINEAR_LAST_GRID**2 * dims[-1]


def knn_dims(arch: dict) -> int:
    """The k-NN read-out's inputs per image: the first KNN_STAGES stages' means (384 for Swin-B)."""
    return sum(stage_dims(arch)[:KNN_STAGES])


def feature_dims(arch: dict) -> int:
    """Floats the read-outs keep per image and encoder (`readout_features`): 13,184 for Swin-B, whatever the image
    size."""
    return linear_dims(arch) + knn_dims(arch)


# What fit_linear's L-BFGS (torch.optim.LBFGS's step, torch 2.14) holds, in vectors of the linear read-out's
# parameter count: its history, LBFGS_HISTORY pairs (a step and the gradient's change), and LBFGS_MORE_VECTORS
# more, counted from its code: the parameters and their gradient, the flat gradient and the previous one, the search
# direction in its two forms (d, q), the parameters' copy the line search starts from (x_init), the strong-Wolfe
# search's gradients (g, g_prev, g_new, the two of its bracket, the one being gathered), and a new pair before the
# oldest is dropped. tests/unit/test_probe.py holds it against a fit's measured peak.
LBFGS_HISTORY = 20
LBFGS_MORE_VECTORS = 15
# The most one encoder holds encoding a batch (no grad), in maps of its first stage's tokens: at the first stage's
# MLP, its hidden layer twice (fc1's output and GELU's, mlp_ratio maps each) and 5 maps of the stage's width (the
# block's input, the stage's input the callers still hold, the attention's residual sum, its normalised copy the
# MLP reads, and one more the linear layers make). Later stages hold half as much (a quarter of the tokens at twice
# the width), earlier there are fewer maps. Measured by the test, not derived from torch's code.
ENCODER_MAPS_BESIDES_MLP = 5


def encoder_activation_bytes(arch: dict, batch: int) -> int:
    """What one encoder holds at once, in fp32, encoding `batch` images without gradients (`model_features`):
    (5 + 2 x mlp_ratio) maps of the first stage's (size / patch)^2 tokens of embed_dim floats."""
    tokens = (arch["img_size"] // arch["patch_size"]) ** 2
    maps = ENCODER_MAPS_BESIDES_MLP + 2 * arch.get("mlp_ratio", 4.0)
    return int(batch * tokens * arch["embed_dim"] * maps * 4)


def linear_fit_bytes(train: int, inputs: int, classes: int) -> int:
    """What `fit_linear` holds at once beside its features, in fp32: L-BFGS's vectors of the (inputs + 1) x classes
    parameters, and the training images' logits three times (the logits, their log-softmax, which the backward
    keeps, and its gradient)."""
    params = (inputs + 1) * classes
    return (2 * LBFGS_HISTORY + LBFGS_MORE_VECTORS) * params * 4 + 3 * train * classes * 4


def encoders_at_once(models: int) -> int:
    """How many encoders `model_features` runs side by side: one per thread."""
    return min(models, torch.get_num_threads())


def probe_memory(train: int, val: int, arch: dict, classes: int, models: int = 1, batch: int = 64,
                 at_once: int = 1) -> dict[str, int]:
    """What the probe holds, in fp32 bytes: `features`, held throughout, and the transient of each phase after it.

    `features`: both splits' for every encoder compared, plus one encoder's again (a split's batches being joined,
    then standardised for the fit: `feature_dims` x 4 bytes each, 53 KB for Swin-B). Images are encoded as they are
    read and dropped, so their count does not matter, only the features'.
    `encoding`: one batch of images (3 x size x size x 4 bytes each: 602 KB at 224 px) and the activations of the
    `at_once` encoders that encode it side by side (`encoders_at_once`).
    `linear fit`: `linear_fit_bytes`, the L-BFGS state and the logits.
    `k-NN vote`: one block of its similarity matrix (KNN_CHUNK validation images x train x 4 bytes) and the training
    features normalised for it.
    Not counted: the weights of the encoders, labels and each batch's read-outs (a few floats an image), the k-NN
    vote's per-block top-k and votes, PyTorch's and the loader's own memory."""
    size = arch["img_size"]
    return {"features": (train + val) * (models + 1) * feature_dims(arch) * 4,
            "encoding": batch * 3 * size * size * 4 + at_once * encoder_activation_bytes(arch, batch),
            "linear fit": linear_fit_bytes(train, linear_dims(arch), classes),
            "k-NN vote": min(KNN_CHUNK, val) * train * 4 + train * knn_dims(arch) * 4}


def probe_bytes(train: int, val: int, arch: dict, classes: int, models: int = 1, batch: int = 64,
                at_once: int = 1) -> int:
    """The most the probe holds at once: its features and the largest of its phases' transients (the phases follow
    one another: encoding, then each encoder's linear fit, then its k-NN vote)."""
    memory = probe_memory(train, val, arch, classes, models, batch, at_once)
    return memory.pop("features") + max(memory.values())


def require_memory(shards: str, train: int, val: int, arch: dict, classes: int, models: int = 1, batch: int = 64,
                   available: int | None = None, at_once: int | None = None) -> None:
    """Refuses, before any image is decoded, splits whose `probe_bytes` exceed the memory available (psutil's
    estimate unless `available` is given); says how many training images would fit (`--max-samples`). `at_once`:
    `encoders_at_once(models)` unless given."""
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    at_once = encoders_at_once(models) if at_once is None else at_once
    need = probe_bytes(train, val, arch, classes, models, batch, at_once)
    if need <= available:
        return

    def fit(count: int) -> bool:
        return probe_bytes(count, val, arch, classes, models, batch, at_once) <= available

    low, high = 0, train  # the most training images that fit: probe_bytes grows with their count
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fit(middle) else (low, middle - 1)
    fits = low if fit(low) else 0
    way_out = (f"--max-samples {fits} reads at most that many training images, which fit" if fits >= MIN_PROBE_IMAGES
               else f"its {val} validation images alone leave no room: probe a smaller set")
    memory = probe_memory(train, val, arch, classes, models, batch, at_once)
    features = memory.pop("features")
    gb = {phase: f"{value / 1e9:.1f} GB" for phase, value in memory.items()}
    raise DataError(f"--data {shards}: the probe holds the features of every image for each of its {models} "
                    f"encoder{'s' * (models != 1)} and one more copy, in fp32: ({train} train + {val} val) x "
                    f"{models + 1} x {feature_dims(arch)} x 4 B = {features / 1e9:.1f} GB, and at most "
                    f"{max(memory.values()) / 1e9:.1f} GB more at once (encoding: {gb['encoding']} for a batch of "
                    f"images and {at_once} encoder{'s' * (at_once != 1)}' activations; the linear fit: "
                    f"{gb['linear fit']} for its L-BFGS state and logits; the k-NN vote: {gb['k-NN vote']}) = "
                    f"{need / 1e9:.1f} GB, more than the {available / 1e9:.1f} GB available; {way_out}")


def readout_features(maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage token maps (B, h, w, C) -> (linear read-out features, k-NN read-out features)."""
    sizes = [LINEAR_GRID] * (len(maps) - 1) + [LINEAR_LAST_GRID]
    grids = [F.adaptive_avg_pool2d(t.permute(0, 3, 1, 2), size).flatten(1) for t, size in zip(maps, sizes, strict=True)]
    return torch.cat(grids, dim=1), torch.cat([t.mean(dim=(1, 2)) for t in maps[:KNN_STAGES]], dim=1)


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
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=LBFGS_HISTORY,
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
    """The weighted k-NN vote, KNN_CHUNK validation images at a time: the val x train similarity matrix is never
    whole, only a block of it and each block's top k."""
    train_x, correct = F.normalize(train_x, dim=1), 0
    for i in range(0, len(val_x), KNN_CHUNK):
        similarity = F.normalize(val_x[i:i + KNN_CHUNK], dim=1) @ train_x.T
        nearest = similarity.topk(min(KNN_NEIGHBOURS, len(train_x)), dim=1)
        votes = torch.zeros(len(similarity), num_classes).scatter_add_(1, train_y[nearest.indices],
                                                                       (nearest.values / KNN_TEMPERATURE).exp())
        correct += int((votes.argmax(1) == val_y[i:i + KNN_CHUNK]).sum())
    return 100 * float(torch.tensor(float(correct)) / len(val_x))  # in fp32, as the linear top-1's mean


def standardise(train_x: torch.Tensor, val_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both splits scaled by the training split's statistics: a BatchNorm without affine."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    return (train_x - mean) / std, (val_x - mean) / std


@torch.no_grad()
def probe_features(features: Features, num_classes: int) -> ProbeResult:
    train_n = len(features.train_y)
    if train_n < MIN_FIT_IMAGES:
        raise DataError(f"the probe has {train_n} training image{'s' * (train_n != 1)}, fewer than the "
                        f"{MIN_FIT_IMAGES} it needs to standardise its features by their spread; read more "
                        f"(--max-samples {MIN_FIT_IMAGES} or more, or a train split of at least {MIN_FIT_IMAGES})")
    classes = features.train_y.unique()
    if len(classes) < 2:
        # A read-out that saw one label answers it for every image: top-1 100% on a set of that class, whatever
        # the encoder. Counted on the images read, not the manifest's classes: --max-samples over a set sorted by
        # class reads one class of several.
        raise DataError(f"every one of the probe's {train_n} training images is of class {int(classes[0])}; a "
                        "read-out of one class answers it for every image (top-1 100% whatever the encoder): probe "
                        "on a set of two classes or more"
                        + (", or raise --max-samples past the first class's images" if num_classes > 1 else ""))
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


def refuse_one_class(shards: str, split: SplitShards, classes: list[str | None]) -> None:
    """A set whose manifest lists one class, refused before any image is encoded (`probe_features` refuses it too,
    but only after every image of both splits was read and encoded, minutes on a CPU for nothing). A manifest that
    names no classes (adopted tars) says nothing here: the images' labels are checked once read."""
    if split.num_classes != 1:
        return
    name = f" ({classes[0]})" if classes and classes[0] else ""
    raise DataError(f"--data {shards}: split '{split.split}' has 1 class{name} in the set's manifest; a read-out of "
                    "one class answers it for every image (top-1 100% whatever the encoder): probe on a set of two "
                    "classes or more")


def build_encoder(state: dict[str, torch.Tensor] | None, arch: dict, num_classes: int, seed: int) -> SwinClassifier:
    """`state` None: a randomly initialised encoder of the same shape, drawn from `seed`."""
    torch.manual_seed(seed)
    model = SwinClassifier(shape_from_arch(arch), num_classes, drop_path=0.0)
    if state is not None:
        report = load_pretrained_encoder(model, state)
        if report.missing:
            raise ValueError(f"encoder weights lack {report.missing[:5]}")
    return model


@torch.no_grad()
def model_features(models: list[SwinClassifier], train: Iterable[Split], val: Iterable[Split]) -> list[Features]:
    """Every model's features of both splits, each batch encoded by every model as it is read, then dropped: the
    images are read once and only their features kept.

    The models encode a batch one per thread (each op single-threaded) rather than one at a time on every thread:
    the tiny encoder's ops are too small to keep several threads busy (on 2 cores, 2 encoders at once ran 1.4x the
    images per second of one encoder on 2 threads), and each model's features come out the same bit for bit. The
    batches are read between, on every thread. The models are built before, in this thread, because building one
    draws its weights from the global RNG."""
    for model in models:
        model.eval()
    threads = torch.get_num_threads()
    workers = encoders_at_once(len(models))

    @torch.no_grad()  # in each worker thread: grad mode is per thread (with it on, other kernels and a graph kept)
    def readouts(model: SwinClassifier, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return readout_features(model.encoder.stage_maps(images))

    def encode_split(batches: Iterable[Split], pool: ThreadPoolExecutor | None) -> tuple[list, list, torch.Tensor]:
        parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in models]
        labels = []
        for images, batch_labels in batches:
            if pool is None:
                encoded = [readouts(model, images) for model in models]
            else:
                torch.set_num_threads(max(1, threads // workers))
                try:
                    encoded = list(pool.map(readouts, models, [images] * len(models)))
                finally:
                    torch.set_num_threads(threads)
            for kept, features in zip(parts, encoded, strict=True):
                kept.append(features)
            labels.append(batch_labels)
            del images, encoded  # this batch's images go before the next is read
        linear, knn = [], []
        for kept in parts:  # joined one model at a time, each model's parts freed as it goes
            linear.append(torch.cat([p[0] for p in kept]))
            knn.append(torch.cat([p[1] for p in kept]))
            kept.clear()
        return linear, knn, torch.cat(labels)

    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        train_linear, train_knn, train_y = encode_split(train, pool)
        val_linear, val_knn, val_y = encode_split(val, pool)
    finally:
        if pool is not None:
            pool.shutdown()
    return [Features(train_linear[m], train_y, val_linear[m], val_y, train_knn[m], val_knn[m])
            for m in range(len(models))]


def probe_models(models: list[SwinClassifier], train: Iterable[Split], val: Iterable[Split], num_classes: int
                 ) -> list[ProbeResult]:
    """Every model's probe, from one read of `train` and `val` (batches of images and labels, as `read_batches`
    yields them). The read-outs are fitted one at a time on every thread: a fit on one thread
    sums in another order, and the linear probe's top-1 moved by up to 0.5 points."""
    return [probe_features(f, num_classes) for f in model_features(models, train, val)]


def probe_model(model: SwinClassifier, train: Iterable[Split], val: Iterable[Split], num_classes: int) -> ProbeResult:
    return probe_models([model], train, val, num_classes)[0]


def linear_probe(state: dict[str, torch.Tensor] | None, arch: dict, shards: str, num_classes: int,
                 backend: str = "dali", batch: int = 64, threads: int = 2, seed: int = 0,
                 max_samples: int | None = None) -> ProbeResult:
    """`state` None probes a randomly initialised encoder of the same shape. `max_samples` caps the training images
    read (the first ones in shard order)."""
    model = build_encoder(state, arch, num_classes, seed)
    return probe_model(model, read_batches(shards, "train", arch["img_size"], batch, backend, threads, max_samples),
                       read_batches(shards, "val", arch["img_size"], batch, backend, threads), num_classes)


def _spread(values: list[float]) -> dict[str, float | None]:
    """Mean, sample standard deviation, min and max. One value has no spread: its std is None, not 0.0, which read
    as random encoders that all score the same (`--baseline-seeds 1`)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def compare_with_random_init(state: dict[str, torch.Tensor], arch: dict, shards: str, num_classes: int,
                             baseline_seeds: int = 3, backend: str = "dali", batch: int = 64, threads: int = 2,
                             seed: int = 0, max_samples: int | None = None) -> dict:
    """The pretrained encoder against `baseline_seeds` random initialisations, on both read-outs.

    `margin` is pretrained minus the baselines' mean; `margin_in_spread` divides it by the baselines'
    standard deviation (how many times the seed-to-seed noise the gain is)."""
    models = [build_encoder(state, arch, num_classes, seed),
              *(build_encoder(None, arch, num_classes, seed + 1 + i) for i in range(baseline_seeds))]
    pretrained, *baselines = probe_models(
        models, read_batches(shards, "train", arch["img_size"], batch, backend, threads, max_samples),
        read_batches(shards, "val", arch["img_size"], batch, backend, threads), num_classes)
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
            "margin_in_spread": margin / spread["std"] if spread["std"] else None}
