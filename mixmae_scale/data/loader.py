"""The training loader: which samples (data/shard_sets.py), read ahead (data/shard_reader.py), decoded by
DALI or the PyTorch fallback, in equal numbers on every rank, with a position that survives any resume.

Every rank takes exactly `batches_per_epoch` micro-batches of its run of the epoch, so uneven shards can
never leave one rank waiting in a ZeRO collective. The loader's whole state is the epoch's layout and
the micro-batches consumed in it (plus, for fine-tuning, DALI's generators): the same on every rank. A
resume on the same ranks continues exactly; a resume on another number of ranks or another micro-batch
lays the rest of the interrupted epoch out over the new ranks (`restore` says what it did). The position is
a typed `LoaderPosition`; engine/checkpointing/state.py stores it.

Segmentation masks are checked against the model's classes (`PipelineSpec.mask_classes`): a split whose manifest
names more mask classes is refused when the loader is made, and where the manifest does not say (tars adopted from
another tool), a decoded label past them names its sample, before the loss's IndexError (a device-side assert on
a GPU) could. Both backends hand batches back in the order they were fed, so each batch's samples are known.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from mixmae_scale.data.crop_params import sample_augmentation
from mixmae_scale.data.dali_builds import require_one_dali_build
from mixmae_scale.data.errors import DataError, plural
from mixmae_scale.data.manifest import load_split
from mixmae_scale.data.sample_ids import Coverage, sample_id, split_coverage
from mixmae_scale.data.shard_reader import DECODER_PREFETCH, RankStream, RawBatch, RawSample, ordered_samples
from mixmae_scale.data.shard_sets import Layout, ShardMixture, WeightedSet
from mixmae_scale.data.spec import MASK_IGNORE, PipelineSpec

log = logging.getLogger(__name__)


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S) normalised, float32 or float16 (PipelineSpec.output_dtype)
    labels: torch.Tensor | None  # (B,) int64; -1 for unlabeled data; None where the spec asks for no labels
    meta: list[dict] | None = None
    # (B, S, S) int64 class indices, MASK_IGNORE (255) where a pixel has no label; on the images' device. None
    # unless the spec asks for masks (PipelineSpec.with_masks).
    masks: torch.Tensor | None = None
    # (B,) int64 ids of the samples (data/sample_ids.py), as they came out of the decoder; evaluation batches only.
    ids: torch.Tensor | None = None


@dataclass(frozen=True)
class LoaderPosition:
    """The loader's whole state, the same on every rank: the epoch's layout and the micro-batches consumed in it,
    the shuffle window and what names the samples (seed, data digest), plus DALI's generators where a
    fine-tuning pipeline draws augmentations. A checkpoint stores it as JSON under the keys of `to_dict`, which
    older checkpoints share; `layout` is None only in a position written before positions were global samples."""

    backend: str
    layout: Layout | None
    batch: int  # micro-batches consumed in the layout's epoch
    window: int | None
    order_seed: int
    data: str | None  # mixture_digest of the shards read
    batches_consumed: int  # over the run's life: what the fault switches and the non-finite skip count
    generators: bytes | None = None  # DALI's checkpoint
    legacy_epoch: int = 0  # the epoch of a position without a layout

    @property
    def epoch(self) -> int:
        return self.layout.epoch if self.layout is not None else self.legacy_epoch

    def without_generators(self) -> LoaderPosition:
        """DALI's generators are per rank: a resume on another layout restarts them from the run's seeds."""
        return replace(self, generators=None)

    def samples_since(self, earlier: LoaderPosition) -> int:
        """Samples every rank together read between `earlier` and this position, counted in this layout."""
        micro, world = (self.layout.micro, self.layout.world) if self.layout is not None else (0, 0)
        return max(self.batches_consumed - earlier.batches_consumed, 0) * micro * world

    def to_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"backend": self.backend, "batch": self.batch, "window": self.window,
                                 "order_seed": self.order_seed, "data": self.data,
                                 "batches_consumed": self.batches_consumed, "epoch": self.epoch}
        if self.layout is not None:
            state["layout"] = self.layout.to_dict()
        if self.generators:
            state["dali"] = base64.b64encode(self.generators).decode()
        return state

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> LoaderPosition:
        layout = Layout.from_dict(state["layout"]) if "layout" in state else None
        window = state.get("window")
        return cls(str(state.get("backend", "dali")), layout, int(state.get("batch", 0)),
                   None if window is None else int(window), int(state.get("order_seed", -1)), state.get("data"),
                   int(state.get("batches_consumed", 0)),
                   base64.b64decode(state["dali"]) if state.get("dali") else None,
                   0 if layout is not None else int(state.get("epoch", 0)))


def choose_decode_device(requested: str, gpu: int, backend: str = "dali") -> int | None:
    """GPU index for DALI's mixed decoding, or None for the CPU; says which once (the PyTorch loader decodes on the
    CPU in any case)."""
    available = torch.cuda.is_available()
    if requested == "gpu" and not available:
        raise DataError("data.decode_device is 'gpu' but no CUDA device is visible; use 'auto' or 'cpu'")
    if backend == "torch":
        log.info("the PyTorch loader decodes images on the CPU (data.loader=torch)")
        return None
    device_id = gpu if (available and requested != "cpu") else None
    log.info("DALI decodes images on %s", f"GPU {device_id} (mixed)" if device_id is not None else "the CPU")
    return device_id


def as_mixture(shards: str | ShardMixture, split: str) -> ShardMixture:
    """A shard set's location (a folder or s3:// prefix) or a mixture already made (data.sources)."""
    if isinstance(shards, ShardMixture):
        return shards
    return ShardMixture([WeightedSet(load_split(shards, split), 1.0, str(shards))])


def mixture_digest(mixture: ShardMixture) -> str:
    """Changes when positions would name other samples: other shards, counts or weights."""
    digest = hashlib.sha256()
    for entry in mixture.sets:
        digest.update(repr((entry.weight, entry.shards.names, entry.shards.samples_per_shard)).encode())
    return digest.hexdigest()[:16]


class ShardLoader:
    def __init__(self, shards: str | ShardMixture, split: str, spec: PipelineSpec, backend: str = "dali",
                 workers: int = 2, batches: int | None = None) -> None:
        """`batches`: the micro-batches the caller will take at most, where it knows (the held-out loss): the reader
        then stops after the window that holds them (and the decoder's prefetch) instead of reading two windows
        ahead, which on a split smaller than a window was two more passes over it, each a GET per tar."""
        if backend not in ("dali", "torch"):
            raise DataError(f"data.loader must be 'dali' or 'torch', got {backend!r}")
        self.mixture = as_mixture(shards, split)
        if spec.with_masks:
            require_masks(self.mixture, split, spec.mask_classes)
        # Each batch's decoded masks are checked only where a set's manifest does not bound its labels: where every
        # set's does, require_masks has checked them all, and the training loop need not pass over every mask.
        unbounded = spec.with_masks and any(not entry.shards.mask_classes for entry in self.mixture.sets)
        self._mask_label_limit = spec.mask_classes if unbounded else 0
        self._digest = mixture_digest(self.mixture)
        self.spec, self.backend, self.workers, self.batches_wanted = spec, backend, workers, batches
        self.window = max(spec.shuffle_buffer, 1)
        self.layout = Layout.whole_epoch(0, self.mixture.visits(spec.order_seed, 0).samples, spec.num_shards,
                                         spec.batch_size)
        # Decided from the smallest epoch any seed draws, not epoch 0's: with a fractional weight that made the refusal
        # hang on run.seed, and an accepted run met the short epochs later.
        too_small = self.mixture.too_small(split, spec.num_shards, spec.batch_size) if spec.mode != "eval" else None
        if too_small:
            raise DataError(too_small)
        self.batch_in_epoch = 0
        self.batches_consumed = 0
        self._epoch_samples = (0, self.layout.length)  # (epoch, its samples): epoch_progress's
        self.resume_note: str | None = None
        self._dali_checkpoint: bytes | None = None
        self._stream: RankStream | None = None
        self._pipe = None
        self._decoder = None
        self._fed: deque[RawBatch] = deque(maxlen=4)
        self._coverage: Coverage | None = None

    @property
    def epoch(self) -> int:
        return self.layout.epoch

    @property
    def batches_per_epoch(self) -> int:
        return self.layout.batches

    @property
    def epoch_progress(self) -> float:
        """The epoch the batches handed out so far reach, with its fraction (shard_sets.Layout.progress): what
        metrics.csv's and the evaluations' epoch column say."""
        epoch = self.layout.epoch
        if self._epoch_samples[0] != epoch:  # one planning per epoch, not per logged row
            self._epoch_samples = (epoch, self.mixture.visits(self.spec.order_seed, epoch).samples)
        return self.layout.progress(self.batch_in_epoch, self._epoch_samples[1])

    # -- state ---------------------------------------------------------------------------------------------------
    def position(self, with_generators: bool = False) -> LoaderPosition:
        """Where the data stands. Without DALI's generators it is cheap enough to take at every step (a non-finite
        stop stores the position of its step's start); a checkpoint stores them too."""
        generators = None
        if with_generators and self._pipe is not None and self.spec.rand_augment is not None:
            generators = self._pipe.checkpoint()
        elif with_generators:
            generators = self._dali_checkpoint or None
        return LoaderPosition(self.backend, self.layout, self.batch_in_epoch, self.window, self.spec.order_seed,
                              self._digest, self.batches_consumed, generators)

    def state_dict(self) -> dict[str, Any]:
        return self.position(with_generators=True).to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restore(LoaderPosition.from_dict(state))

    def restore(self, position: LoaderPosition) -> None:
        """Continue where `position` (any rank's: they are the same) left off. Sets `resume_note` when the rest of an
        epoch had to be laid out anew (another world size, micro-batch or window) or the data changed."""
        self.close()
        self.batches_consumed = position.batches_consumed
        saved, batch, seed = position.layout, position.batch, self.spec.order_seed
        if saved is None:  # written by the DALI-reader loader before positions were global samples
            self._start_epoch(position.epoch + 1)
            self.resume_note = (f"the checkpoint's loader position is from the earlier reader: the rest of epoch "
                                f"{position.epoch} is skipped and epoch {self.epoch} starts from its beginning")
            return
        if position.data != self._digest or position.order_seed != seed:
            self._start_epoch(saved.epoch + 1)
            self.resume_note = (f"the shard set or run.seed differs from the checkpoint's: epoch {saved.epoch} is "
                                f"left where it was and epoch {saved.epoch + 1} starts from its beginning")
            return
        window = self.window if position.window is None else position.window
        if (saved.world, saved.micro, window) == (self.spec.num_shards, self.spec.batch_size, self.window):
            self.layout, self.batch_in_epoch = saved, batch
            self._dali_checkpoint = position.generators
            return
        rest = saved.remaining(batch, window)
        repeated = saved.repeated_on_relayout(batch, window)
        self.layout = Layout(saved.epoch, rest, self.spec.num_shards, self.spec.batch_size)
        self.batch_in_epoch = 0
        self._dali_checkpoint = None
        self.resume_note = (f"epoch {saved.epoch} continues on {plural(self.spec.num_shards, 'rank')} x "
                            f"{self.spec.batch_size} "
                            f"(was {saved.world} x {saved.micro}): {self.layout.length} of its samples are left, "
                            f"{repeated} of them read a second time (the read part of each rank's shuffle window), "
                            f"{self.layout.length - self.layout.batches * self.spec.num_shards * self.spec.batch_size}"
                            " left out to keep batches whole")

    # -- batches -------------------------------------------------------------------------------------------------
    def _augment(self, sample: RawSample) -> None:
        spec = self.spec
        try:
            sample.crop, sample.flip = sample_augmentation(spec.order_seed, sample.uid, sample.image, spec.crop_scale,
                                                           spec.crop_ratio, spec.hflip)
        except Exception as exc:  # noqa: BLE001 - any header Pillow cannot read: name the sample
            raise DataError(f"{sample.key}: not a readable image ({type(exc).__name__}: {exc}). `mixmae shards verify "
                            "--decode` lists every such file") from exc

    def _next_raw(self) -> RawBatch:
        batch = self._stream.next()
        self._fed.append(batch)
        return batch

    def _training_batches(self) -> Iterator[Batch]:
        limit = None if self.batches_wanted is None else self.batches_wanted + DECODER_PREFETCH
        self._stream = RankStream(self.mixture, self.spec.shard_id, self.layout, self.batch_in_epoch,
                                  self.spec.order_seed, self.window, self._augment, self.spec.with_meta,
                                  with_masks=self.spec.with_masks, limit=limit)
        if self.backend == "torch":
            from mixmae_scale.data.torch_pipeline import TorchDecoder

            decoder = TorchDecoder(self.spec, self.workers)
            while True:
                raw = self._next_raw()
                yield self._torch_batch(*decoder(raw), raw)
        else:
            require_one_dali_build(gpu=self.spec.device_id is not None)
            from mixmae_scale.data.dali_pipeline import build_pipeline

            in_flight: deque[RawBatch] = deque()

            def feed() -> RawBatch:
                in_flight.append(self._next_raw())
                return in_flight[-1]

            self._pipe = build_pipeline(self.spec, feed, checkpoint=self._dali_checkpoint)
            while True:
                yield self._dali_batch(self._pipe, in_flight)[0]

    def _dali_batch(self, pipe, in_flight: deque[RawBatch]) -> tuple[Batch, RawBatch]:
        """The next batch out of DALI and the raw batch it was decoded from; `in_flight`: the raw batches fed to it
        and not yet handed back (DALI hands them back in the order it was fed them)."""
        try:
            outputs = pipe.run()
        except RuntimeError as exc:
            raise unreadable_sample_error(self._fed, exc) from exc
        raw = in_flight.popleft()
        if self.spec.device_id is not None:
            tensor = _to_torch(outputs[0], self.spec.device_id, getattr(torch, self.spec.output_dtype))
        else:
            tensor = torch.from_numpy(np.array(outputs[0].as_tensor()))
        rest = list(outputs[1:])
        masks = None
        if self.spec.with_masks:  # decoded on the CPU (H, W, 1): checked there, then moved to the images' device
            decoded = np.array(rest.pop(0).as_tensor())[..., 0]
            require_mask_labels(decoded, raw, self._mask_label_limit)
            masks = torch.from_numpy(decoded.astype(np.int64)).to(tensor.device)
        labels = torch.from_numpy(np.array(rest.pop(0).as_tensor())).long().reshape(-1) if self.spec.with_labels \
            else None
        meta = [_json(np.array(t)) for t in rest.pop(0)] if self.spec.with_meta else None
        ids = torch.from_numpy(np.array(rest.pop(0).as_tensor())).reshape(-1) if self.spec.mode == "eval" else None
        return Batch(tensor, labels, meta, masks, ids), raw

    def _torch_batch(self, images: torch.Tensor, labels: torch.Tensor, meta: list[dict],
                     masks: torch.Tensor | None, raw: RawBatch) -> Batch:
        """The PyTorch loader's batch of `raw` as the spec asks (DALI's pipeline does this in its graph)."""
        if masks is not None and self.spec.with_masks:
            require_mask_labels(masks.numpy(), raw, self._mask_label_limit)
        return Batch(images.to(getattr(torch, self.spec.output_dtype)), labels if self.spec.with_labels else None,
                     meta if self.spec.with_meta else None, masks if self.spec.with_masks else None)

    def __iter__(self) -> Iterator[Batch]:
        """One epoch: the remaining batches of the current epoch's layout, then the next epoch begins."""
        if self._stream is None:
            self._batches = self._training_batches()
        while self.batch_in_epoch < self.layout.batches:
            batch = next(self._batches)
            self.batch_in_epoch += 1
            self.batches_consumed += 1
            yield batch
        self._start_epoch(self.layout.epoch + 1)

    def _start_epoch(self, epoch: int) -> None:
        self.layout = Layout.whole_epoch(epoch, self.mixture.visits(self.spec.order_seed, epoch).samples,
                                         self.spec.num_shards, self.spec.batch_size)
        self.batch_in_epoch = 0

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._stream, self._pipe = None, None

    # -- evaluation ----------------------------------------------------------------------------------------------
    def split_coverage(self) -> Coverage:
        """What one evaluation pass over all ranks must count: the split's samples and the sum of their ids.

        Computed once per loader (it hashes every key of the split's indexes); the mixture is fixed when the loader
        is made, and a shard that changes afterwards stops the reader by name."""
        if self._coverage is None:
            self._coverage = split_coverage(self.mixture)
        return self._coverage

    def eval_batches(self) -> Iterator[tuple[Batch, int]]:
        """One pass over the split for evaluation: (batch, how many of its samples are real).

        Each rank reads its contiguous share in shard order; every rank yields the same number of batches
        (ZeRO-3 forwards are collective), the last ones padded by repeating a sample, which does not count."""
        spec = self.spec
        samples, world = self.layout.length, spec.num_shards
        counts = [samples * (r + 1) // world - samples * r // world for r in range(world)]
        mine, micro = counts[spec.shard_id], spec.batch_size
        total = math.ceil(max(counts) / micro)
        raw = self._padded_eval_batches(mine, total)
        if self.backend == "torch":
            from mixmae_scale.data.torch_pipeline import TorchDecoder

            decoder = TorchDecoder(spec, self.workers)
            for batch in raw:
                ids = torch.tensor([sample_id(s.key) for s in batch.samples], dtype=torch.int64)
                yield replace(self._torch_batch(*decoder(batch), batch), ids=ids), batch.real
            return
        require_one_dali_build(gpu=self.spec.device_id is not None)
        from mixmae_scale.data.dali_pipeline import build_pipeline

        pending: deque[RawBatch] = deque()
        feed = iter(raw)
        last: list[RawBatch] = []

        def next_raw() -> RawBatch:  # DALI prefetches past the end: it gets the last batch again, never used
            batch = next(feed, None)
            if batch is None:
                return last[0]
            last[:] = [batch]
            pending.append(batch)
            self._fed.append(batch)
            return batch

        pipe = build_pipeline(spec, next_raw)
        for _ in range(total):
            batch, fed = self._dali_batch(pipe, pending)
            yield batch, fed.real

    def _padded_eval_batches(self, mine: int, total: int) -> Iterator[RawBatch]:
        spec = self.spec
        stream = ordered_samples(self.mixture, spec.shard_id, spec.num_shards, spec.with_meta, spec.with_masks)
        filler = None
        if mine == 0:  # more ranks than samples: this rank only keeps the others company
            filler = next(ordered_samples(self.mixture, 0, 1, spec.with_meta, spec.with_masks))
        for number in range(total):
            batch = [s for _, s in zip(range(spec.batch_size), stream, strict=False)]
            real = len(batch)
            filler = filler or (batch[-1] if batch else None)
            batch += [filler] * (spec.batch_size - real)
            yield RawBatch(batch, 0, number, real)


def require_masks(mixture: ShardMixture, split: str, classes: int = 0) -> None:
    """A loader asked for masks reads only splits whose every sample has one (the manifest says so), and, for a
    model of `classes` classes (0: not checked), whose manifest names no more mask classes than that."""
    missing = [entry.name or entry.shards.location for entry in mixture.sets if not entry.shards.masks]
    if missing:
        raise DataError(f"{missing[0]}: split '{split}' has no segmentation masks (its manifest does not say "
                        "'masks'); make shards with masks with `mixmae shards demo` or `mixmae shards ade20k`, or "
                        "adopt tars whose samples carry seg.png")
    for entry in mixture.sets:
        labelled = entry.shards.mask_classes
        if classes and labelled > classes:
            raise DataError(f"{entry.name or entry.shards.location}: the masks of split '{split}' label {labelled} "
                            f"classes (its manifest's mask_classes), more than the model's {classes} "
                            f"(segment.num_classes); set segment.num_classes to {labelled}, or use a model of "
                            f"{labelled} classes")


def require_mask_labels(masks: np.ndarray, raw: RawBatch, classes: int) -> None:
    """Every label of a batch's decoded masks (B, H, W) is a class of the model's `classes` (0: not checked) or
    MASK_IGNORE; the first sample holding another is named, with its largest such label."""
    if not classes or classes >= MASK_IGNORE:  # 8-bit masks: no label can be past the classes
        return
    bad = (masks >= classes) & (masks != MASK_IGNORE)
    if not bad.any():
        return
    sample = int(np.flatnonzero(bad.reshape(len(bad), -1).any(axis=1))[0])
    value = int(masks[sample][bad[sample]].max())
    raise DataError(f"{raw.samples[sample].key}: its segmentation mask holds label {value}, past the model's {classes} "
                    f"classes (0-{classes - 1}, {MASK_IGNORE} = unlabelled); a model of at least {value + 1} classes "
                    f"(segment.num_classes) reads these masks, or label such pixels {MASK_IGNORE} (ignored)")


def unreadable_sample_error(fed: deque[RawBatch], exc: Exception) -> DataError:
    """DALI cannot skip a sample it fails to decode, and its report does not name the sample: this names the
    samples of the batches it was given last (one of them is the culprit) and the command that finds it."""
    keys = [s.key for batch in list(fed)[-2:] for s in batch.samples]
    shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
    detail = " ".join(str(exc).split())[:800]
    return DataError(
        f"DALI could not decode a sample of the last batches ({shown}): {detail}. `mixmae shards verify --decode` "
        "lists every such file; rebuild or re-adopt the shards, then run the same command again to resume from the "
        "last checkpoint")


def _json(array: np.ndarray) -> dict:
    import json

    return json.loads(bytes(array)) if array.size else {}


def _to_torch(tensor_list, device_id: int, dtype: torch.dtype) -> torch.Tensor:
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=dtype, device=f"cuda:{device_id}")
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device_id))
    return out
