"""The training loader: DALI or PyTorch backend, equal batches on every rank, exact resume.

Every rank takes exactly `batches_per_epoch = samples // (world_size x batch)` batches per epoch
from a stream that never ends, so uneven shards can never leave one rank waiting in a ZeRO
collective. The state (epoch, batch within it, and DALI's own pipeline checkpoint) goes into the
training checkpoint; a resumed run continues with exactly the samples and augmentations the
uninterrupted run would have seen.
"""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixmae_scale.data.manifest import DataError, SplitShards, load_split
from mixmae_scale.data.spec import PipelineSpec

log = logging.getLogger(__name__)


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S) normalised, float32 or float16 (PipelineSpec.output_dtype)
    labels: torch.Tensor | None  # (B,) int64; -1 for unlabeled data; None where the spec asks for no labels
    meta: list[dict] | None = None


def choose_decode_device(requested: str, local_rank: int) -> int | None:
    """GPU index for DALI's mixed decoding, or None for the CPU; says which once."""
    available = torch.cuda.is_available()
    if requested == "gpu" and not available:
        raise DataError("data.decode_device is 'gpu' but no CUDA device is visible; use 'auto' or 'cpu'")
    device_id = local_rank if (available and requested != "cpu") else None
    log.info("DALI decodes JPEGs on %s", f"GPU {device_id} (mixed)" if device_id is not None else "the CPU")
    return device_id


def parse_labels(padded: np.ndarray) -> torch.Tensor:
    """(B, L) zero-padded ASCII digits (webdataset's .cls) -> (B,) int64."""
    return torch.tensor([int(bytes(row[row > 0]) or b"-1") for row in padded], dtype=torch.long)


def _parse_meta(padded: np.ndarray) -> list[dict]:
    import json

    return [json.loads(bytes(row[row > 0])) for row in padded]


class ShardLoader:
    def __init__(self, shards_dir: str, split: str, spec: PipelineSpec, backend: str = "dali",
                 workers: int = 2) -> None:
        if backend not in ("dali", "torch"):
            raise DataError(f"data.loader must be 'dali' or 'torch', got {backend!r}")
        self.shards: SplitShards = load_split(shards_dir, split, spec.num_shards)
        self.spec = spec
        self.backend = backend
        self.workers = workers
        self.batches_per_epoch = self.shards.samples // (spec.num_shards * spec.batch_size)
        if self.batches_per_epoch < 1:
            raise DataError(f"split '{split}' has {self.shards.samples} samples, fewer than one batch of "
                            f"{spec.batch_size} on each of {spec.num_shards} ranks")
        self.epoch = 0
        self.batch_in_epoch = 0
        self._stream: Iterator[Batch] | None = None
        self._pipe = None
        self._resume_checkpoint: bytes | None = None
        self._torch_skip = 0

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"backend": self.backend, "epoch": self.epoch, "batch": self.batch_in_epoch,
                                 "batches_consumed": self.epoch * self.batches_per_epoch + self.batch_in_epoch}
        if self.backend == "dali" and self._pipe is not None:
            state["dali"] = base64.b64encode(self._pipe.checkpoint()).decode()
        elif self.backend == "dali":
            state["dali"] = base64.b64encode(self._resume_checkpoint).decode() if self._resume_checkpoint else None
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["backend"] != self.backend:
            raise DataError(f"the checkpoint's loader state is from the {state['backend']} loader, this run uses "
                            f"{self.backend}: resume with the same data.loader")
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch"])
        if self.backend == "dali":
            self._resume_checkpoint = base64.b64decode(state["dali"]) if state.get("dali") else None
        else:
            self._torch_skip = int(state["batches_consumed"])
        self._stream, self._pipe = None, None

    # -- batches -------------------------------------------------------------------------------------
    def _dali_stream(self, checkpoint: bytes | None = None) -> Iterator[Batch]:
        from mixmae_scale.data.dali_pipeline import build_pipeline

        self._pipe = build_pipeline(self.shards, self.spec, checkpoint=checkpoint)
        while True:
            try:
                outputs = self._pipe.run()
            except RuntimeError as exc:
                raise unreadable_sample_error(self.shards, exc) from exc
            if self.spec.device_id is not None:
                tensor = _to_torch(outputs[0], self.spec.device_id, getattr(torch, self.spec.output_dtype))
            else:
                tensor = torch.from_numpy(np.array(outputs[0].as_tensor()))
            rest = list(outputs[1:])
            labels = parse_labels(np.array(rest.pop(0).as_tensor())) if self.spec.with_labels else None
            meta = _parse_meta(np.array(rest.pop(0).as_tensor())) if self.spec.with_meta else None
            yield Batch(tensor, labels, meta)

    def _torch_stream(self) -> Iterator[Batch]:
        from mixmae_scale.data.torch_pipeline import torch_batches

        stream = torch_batches(self.shards, self.spec, self.workers)
        for index, (images, labels, meta) in enumerate(stream):
            if index < self._torch_skip:  # resume: the same seeded stream, fast-forwarded
                continue
            yield self._torch_batch(images, labels, meta)

    def _torch_batch(self, images: torch.Tensor, labels: torch.Tensor, meta: list[dict]) -> Batch:
        """The PyTorch loader's batch as the spec asks (DALI's pipeline does this in its graph)."""
        return Batch(images.to(getattr(torch, self.spec.output_dtype)), labels if self.spec.with_labels else None,
                     meta if self.spec.with_meta else None)

    def eval_batches(self) -> Iterator[tuple[Batch, int]]:
        """One pass over the split for evaluation: (batch, how many of its samples are real).

        Every rank yields the same number of batches; samples past a rank's own share (DALI's
        last-batch padding, or batches that only keep the ranks in step) count as padding.
        """
        counts = _eval_counts(self.shards.samples, self.spec.num_shards, self.backend)
        mine = counts[self.spec.shard_id]
        total = math.ceil(max(counts) / self.spec.batch_size)
        if self.backend == "dali":
            stream = self._dali_stream()  # from the start of the split, whatever the training position
        else:
            from mixmae_scale.data.torch_pipeline import torch_batches

            stream = (self._torch_batch(*batch)
                      for batch in torch_batches(self.shards, self.spec, self.workers, repeat=False))
        last = None
        for index in range(total):
            batch = next(stream, None) or last
            last = batch
            yield batch, max(0, min(self.spec.batch_size, batch.images.shape[0], mine - index * self.spec.batch_size))

    def __iter__(self) -> Iterator[Batch]:
        """One epoch: the remaining batches of the current epoch, then the counter moves on."""
        if self._stream is None:
            self._stream = (self._dali_stream(self._resume_checkpoint) if self.backend == "dali"
                            else self._torch_stream())
        while self.batch_in_epoch < self.batches_per_epoch:
            batch = next(self._stream)
            self.batch_in_epoch += 1
            yield batch
        self.epoch += 1
        self.batch_in_epoch = 0


def unreadable_sample_error(shards: SplitShards, exc: Exception) -> DataError:
    """DALI cannot skip a sample it fails to decode (its pipeline has no way to ask the reader for a
    replacement), and its report does not name the sample, so the job stops with the shard folder and
    the command that finds the file. The shard writer checks every JPEG, so this means shards damaged
    after writing or written by another tool."""
    folder = Path(shards.tars[0]).parent if shards.tars else "?"
    detail = " ".join(str(exc).split())[:1500]
    return DataError(
        f"DALI stopped while reading split '{shards.split}' in {folder}: {detail}. If an image could not be "
        f"decoded, `mixmae shards verify --decode {folder}` lists every such file; rebuild the shards, then run "
        "the same command again to resume from the last checkpoint")


def _eval_counts(samples: int, world: int, backend: str) -> list[int]:
    """Samples each rank reads in evaluation: DALI's contiguous shard ranges, or every world-th sample."""
    if backend == "dali":
        return [samples * (r + 1) // world - samples * r // world for r in range(world)]
    return [len(range(r, samples, world)) for r in range(world)]


def _to_torch(tensor_list, device_id: int, dtype: torch.dtype) -> torch.Tensor:
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=dtype, device=f"cuda:{device_id}")
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device_id))
    return out
