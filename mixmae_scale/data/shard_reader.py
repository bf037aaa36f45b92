"""Reading a rank's samples out of tar shards, ahead of training, in two background threads.

A rank's run of the epoch (data/shard_sets.py) is read window by window: a window's samples are a few
contiguous runs of shards, sliced into members with each shard's index out of one byte-range request per
shard (on object storage one GET, left open from one window to the next while the run stays inside the
shard, so a shard costs one request however the windows cut it); the window is then shuffled with a seed
that names it, and cut into micro-batches with each sample's crop and flip (data/crop_params.py). One thread
fetches the next window while the other hands out the current one, so a slow store costs a window of
latency, not a stall per sample. Only the shards a rank reads are ever opened, and only their indexes parsed.

Errors in either thread reach the training thread at its next batch, with the shard and sample named.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from mixmae_scale.data import storage
from mixmae_scale.data.errors import DataError, plural
from mixmae_scale.data.labels import parse_cls
from mixmae_scale.data.shard_index import TAR_HEADER, ShardIndex, read_index, tar_header_holds
from mixmae_scale.data.shard_sets import Interval, Layout, ShardMixture, Visits
from mixmae_scale.seeds import stream_seed

INDEX_CACHE = 16
_END = object()  # the fetch thread's last item where the stream has a limit
DECODER_PREFETCH = 2  # batches DALI's pipeline asks for ahead of the one it runs (its prefetch_queue_depth)
OPEN_STREAMS = 4  # byte-range reads kept open between windows (one per shard the rank's run is inside)


@dataclass
class RawSample:
    key: str  # "<tar url>:<sample key>", for messages
    image: bytes
    label: int  # -1: unlabeled
    meta: bytes | None
    uid: tuple[int, int, int]  # (epoch, visit, index within the shard): what the sample's randomness is drawn from
    crop: tuple[float, float, float, float] | None = None
    flip: bool = False
    mask: bytes | None = None  # the segmentation mask's PNG (`seg.png`), when the loader asks for masks


@dataclass
class RawBatch:
    samples: list[RawSample]
    epoch: int
    batch: int  # micro-batch number within its layout
    real: int  # samples that count (evaluation pads the last batches of a rank)


class _ForwardReader:
    """Members out of one byte-range stream, in increasing offset order, without holding the range in memory."""

    def __init__(self, stream, start: int) -> None:
        self.stream, self.position = stream, start

    def read_at(self, offset: int, size: int) -> bytes:
        if offset < self.position:
            raise DataError(f"index lists a member at {offset} before the previous one ends ({self.position})")
        while self.position < offset:
            skipped = self.stream.read(min(offset - self.position, 1 << 20))
            if not skipped:
                raise EOFError
            self.position += len(skipped)
        parts, left = [], size
        while left:
            chunk = self.stream.read(left)
            if not chunk:
                raise EOFError
            parts.append(chunk)
            left -= len(chunk)
        self.position += size
        return b"".join(parts) if len(parts) > 1 else parts[0]


class SampleSource:
    """Samples by epoch position: which visit holds a position, that shard's index, its bytes."""

    def __init__(self, mixture: ShardMixture, with_meta: bool = False, with_masks: bool = False) -> None:
        self.mixture, self.with_meta, self.with_masks = mixture, with_meta, with_masks
        self._indexes: OrderedDict[tuple[int, int], ShardIndex] = OrderedDict()
        self._open: dict[tuple[int, int], tuple[_ForwardReader, int, int]] = {}
        self._lock = threading.Lock()

    def index(self, source: int, shard: int) -> ShardIndex:
        key = (source, shard)
        with self._lock:
            if key in self._indexes:
                self._indexes.move_to_end(key)
                return self._indexes[key]
        split = self.mixture.sets[source].shards
        index = read_index(split.index_url(shard))
        if len(index) != split.index_lines_of(shard):
            raise DataError(f"{split.index_url(shard)}: {len(index)} samples, the manifest says "
                            f"{split.index_lines_of(shard)}: the index and the manifest do not match")
        with self._lock:
            self._indexes[key] = index
            while len(self._indexes) > INDEX_CACHE:
                self._indexes.popitem(last=False)
        return index

    def read(self, visits: Visits, intervals: list[Interval] | tuple[Interval, ...]) -> Iterator[RawSample]:
        """The samples at these epoch positions, in order: one byte-range read per run within a shard."""
        for a, b in intervals:
            position = a
            while position < b:
                visit, first = visits.locate(position)
                stop = min(first + (b - position), int(visits.count[visit]))
                yield from self._read_run(visits, visit, first, stop)
                position += stop - first

    def _stream(self, visits: Visits, visit: int, first: int, last: int, index: ShardIndex, url: str, expected: int
                ) -> tuple[_ForwardReader, int]:
        """A reader positioned for index line `first` of the visit: the one left open by the previous window when it
        stopped right there (a rank's run crosses window boundaries inside a shard), else one new request from
        this sample to the visit's last line (`last`, exclusive), which a later window of the same visit continues."""
        key = (visits.epoch, visit)
        held = self._open.pop(key, None)
        if held is not None and held[1] == first:
            return held[0], held[2]
        if held is not None:
            held[0].stream.close()
        start, end = index.span(first, last)
        stream = storage.open_range(url, start, end)
        if expected and stream.total is not None and stream.total != expected:
            stream.close()
            raise DataError(f"{url}: {stream.total} bytes, the manifest says {expected}: the shard changed after it "
                            "was indexed (re-run `mixmae shards adopt` or rebuild the shards)")
        return _ForwardReader(stream, start), end

    def _keep_open(self, visits: Visits, visit: int, reader: _ForwardReader, next_sample: int, end: int) -> None:
        self._open[(visits.epoch, visit)] = (reader, next_sample, end)
        while len(self._open) > OPEN_STREAMS:
            stale = next(iter(self._open))
            self._open.pop(stale)[0].stream.close()

    def close(self) -> None:
        for reader, _, _ in self._open.values():
            reader.stream.close()
        self._open.clear()

    def _read_run(self, visits: Visits, visit: int, first: int, stop: int) -> Iterator[RawSample]:
        source, shard = int(visits.source[visit]), int(visits.shard[visit])
        split = self.mixture.sets[source].shards
        index = self.index(source, shard)
        url = split.tar_url(shard)
        offset = split.first_line_of(shard)  # positions in the visit -> lines of the shard's index
        first, stop, last = first + offset, stop + offset, offset + split.samples_per_shard[shard]
        reader, end = self._stream(visits, visit, first, last, index, url, split.bytes_per_shard[shard])
        epoch = visits.epoch
        for i in range(first, stop):
            image_at = int(index.image_offset[i])
            members = [(image_at - TAR_HEADER, TAR_HEADER, "header"), (image_at, int(index.image_size[i]), "image")]
            if index.label_size[i]:
                members.append((int(index.label_offset[i]), int(index.label_size[i]), "label"))
            if self.with_meta and index.meta_size[i]:
                members.append((int(index.meta_offset[i]), int(index.meta_size[i]), "meta"))
            if self.with_masks:
                if not index.mask_size[i]:
                    raise DataError(f"{url}: sample {index.keys[i]} has no segmentation mask (seg.png); segmentation "
                                    "reads shard sets whose manifest says masks (`mixmae shards demo`, `mixmae shards "
                                    "ade20k`)")
                members.append((int(index.mask_offset[i]), int(index.mask_size[i]), "mask"))
            data = {}
            try:
                for offset, size, what in sorted(members):
                    data[what] = reader.read_at(offset, size)
            except EOFError:
                reader.stream.close()
                raise DataError(f"{url}: ends before sample {index.keys[i]} (byte {end} expected): the shard is "
                                "shorter than its index says; it was cut short or replaced") from None
            if not tar_header_holds(data.pop("header"), len(data["image"])):
                reader.stream.close()
                raise DataError(f"{url}: no tar header for sample {index.keys[i]}'s {len(data['image'])}-byte image "
                                f"at byte {int(index.image_offset[i]) - TAR_HEADER}: the shard changed after it was "
                                "indexed (re-run `mixmae shards adopt` or rebuild the shards)")
            label = -1
            if "label" in data:
                try:
                    label = parse_cls(data["label"])
                except ValueError as exc:
                    raise DataError(f"{url}: sample {index.keys[i]}: {exc}; `mixmae shards adopt` rejects such "
                                    "samples: adopt the tars again") from None
            yield RawSample(f"{url}:{index.keys[i]}", data["image"], label, data.get("meta"), (epoch, visit, i),
                            mask=data.get("mask"))
        if stop < last:
            self._keep_open(visits, visit, reader, stop, end)
        else:
            reader.stream.close()


class RankStream:
    """This rank's micro-batches from `layout` on, epoch after epoch, read ahead in background threads.

    `augment(sample)` fills a sample's crop and flip and runs in the batching thread."""

    def __init__(self, mixture: ShardMixture, rank: int, layout: Layout, start_batch: int, seed: int, window: int,
                 augment: Callable[[RawSample], None] | None, with_meta: bool = False, depth: int = 4,
                 with_masks: bool = False, limit: int | None = None) -> None:
        if layout.batches < 1 and (largest := mixture.largest_epoch_samples()) < layout.world * layout.micro:
            # The fetch thread steps past an epoch that gives no rank a whole batch (a fractional weight's small draw,
            # a re-laid epoch's short rest); where every epoch is that short it stepped on without end while the
            # training thread waited for a batch that could never come.
            raise DataError(f"{plural(layout.length, 'sample')} to read in epoch {layout.epoch}, and "
                            f"{plural(largest, 'sample')} in the largest epoch the data can draw: fewer than one "
                            f"micro-batch of {layout.micro} on each of {plural(layout.world, 'rank')}; use fewer ranks "
                            "or a smaller batch.micro, or more data")
        self.source = SampleSource(mixture, with_meta, with_masks)
        self.mixture, self.rank, self.seed, self.window = mixture, rank, seed, max(int(window), 1)
        self.augment = augment
        # `limit`: the micro-batches the caller will take at most (the held-out loss: a few). The fetch thread stops
        # after the window that holds the last of them instead of reading two windows ahead, epoch after epoch; a
        # batch asked for past them is an error, not a wait.
        self.limit = limit
        self._windows: queue.Queue = queue.Queue(maxsize=1)
        self._batches: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._guard, args=(self._fetch, self._windows, layout, start_batch),
                                          daemon=True, name=f"shards-fetch-{rank}"),
                         threading.Thread(target=self._guard, args=(self._batch, self._batches), daemon=True,
                                          name=f"shards-batch-{rank}")]
        for thread in self._threads:
            thread.start()

    # -- the two threads -----------------------------------------------------------------------------------------
    def _guard(self, work: Callable, out: queue.Queue, *args) -> None:
        try:
            work(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread, which raises it
            self._put(out, exc)

    def _put(self, out: queue.Queue, item) -> bool:
        while not self._stop.is_set():
            try:
                out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _fetch(self, layout: Layout, start_batch: int) -> None:
        """Windows of samples, in reading order, with where the first batch starts inside them."""
        try:
            self._fetch_windows(layout, start_batch)
        finally:
            self.source.close()

    def _fetch_windows(self, layout: Layout, start_batch: int) -> None:
        # samples still to fetch, where the caller said how many micro-batches it takes (an epoch's run is whole
        # micro-batches, so the count carries across epochs)
        wanted = None if self.limit is None else self.limit * layout.micro
        while not self._stop.is_set():
            visits = self.mixture.visits(self.seed, layout.epoch)
            run = layout.batches * layout.micro
            first = start_batch * layout.micro
            for window_start in range(first - first % self.window, run, self.window):
                stop = min(window_start + self.window, run)
                samples = list(self.source.read(visits, layout.rank_intervals(self.rank, window_start, stop)))
                rng = np.random.default_rng(stream_seed("window", self.seed, layout.epoch, layout.intervals,
                                                        layout.world, self.rank, window_start))
                order = rng.permutation(len(samples))
                samples = [samples[i] for i in order]
                skip = max(first - window_start, 0)
                if not self._put(self._windows, (layout, window_start, samples[skip:], skip)):
                    return
                if wanted is not None:
                    wanted -= stop - max(first, window_start)
                    if wanted <= 0:
                        self._put(self._windows, _END)
                        return
            layout = Layout.whole_epoch(layout.epoch + 1, self.mixture.visits(self.seed, layout.epoch + 1).samples,
                                        layout.world, layout.micro)
            start_batch = 0

    def _batch(self) -> None:
        pending: list[RawSample] = []
        while not self._stop.is_set():
            try:  # a timeout, so that a close while the fetch thread is between windows ends this thread too
                item = self._windows.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise item
            if item is _END:
                opened = plural(self.limit, "micro-batch", "micro-batches")
                self._put(self._batches, DataError(f"the shard reader was opened for {opened} and asked for more"))
                return
            layout, window_start, samples, skip = item
            micro = layout.micro
            position = window_start + skip
            for sample in samples:
                if self.augment is not None:
                    self.augment(sample)
                pending.append(sample)
                position += 1
                if len(pending) == micro:
                    if not self._put(self._batches, RawBatch(pending, layout.epoch, position // micro - 1, micro)):
                        return
                    pending = []

    # -- the training thread -------------------------------------------------------------------------------------
    def next(self) -> RawBatch:
        """The next micro-batch; a reader thread's error is raised here."""
        while True:
            try:
                item = self._batches.get(timeout=1.0)
            except queue.Empty:
                if not any(t.is_alive() for t in self._threads):
                    raise DataError("the shard reader threads stopped without an error") from None
                continue
            if isinstance(item, BaseException):
                self.close()
                raise item
            return item

    def close(self) -> None:
        self._stop.set()  # the fetch thread closes its open byte ranges as it stops


def ordered_samples(mixture: ShardMixture, rank: int, world: int, with_meta: bool = False,
                    with_masks: bool = False) -> Iterator[RawSample]:
    """Evaluation: this rank's contiguous share of the split in shard order (every sample once over the ranks)."""
    visits = mixture.in_order()
    samples = visits.samples
    source = SampleSource(mixture, with_meta, with_masks)
    try:
        yield from source.read(visits, [(samples * rank // world, samples * (rank + 1) // world)])
    finally:
        source.close()
