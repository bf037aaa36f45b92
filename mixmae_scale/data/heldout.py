"""Where pretraining's held-out images come from: the set's validation split, or a fixed tail of its train split.

The held-out reconstruction loss (at the start and the end of a run) and the reconstruction grids score images
training never reads. A shard set made by `mixmae shards` has a validation split for that; one adopted from
another tool (img2dataset writes none) or converted from a folder without one has only `train`. Then the last
`count` samples of the train split, in manifest order (the end of its last shard, or of its last few), are held
out: training reads the rest, on every rank. The choice is a function of the manifest and the configuration
only, so it is the same on every run and every world size, and resuming on another number of ranks keeps it.

Why the tail, not a hash of the sample keys: the manifest knows each shard's sample count but not its keys, and
reading every index at start-up would make a rank's start grow with the number of shards (data/manifest.py). A
tail is cut with the counts alone. It is as representative as the order the tool wrote, which for img2dataset is
its URL list's and for `mixmae shards` a shuffled one; `mixmae shards adopt` warns about sets sorted by class.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from mixmae_scale.data import storage
from mixmae_scale.data.errors import DataError, plural
from mixmae_scale.data.manifest import (
    CONVERT_WITH_VAL,
    MANIFEST,
    SplitShards,
    load_manifest,
    load_split,
    way_to_add_split,
)
from mixmae_scale.data.shard_index import read_index
from mixmae_scale.data.shard_sets import ShardMixture, WeightedSet

GRID_IMAGES = 8  # the reconstruction grids' fixed images (visualize/snapshots.py)
MODES = ("auto", "split", "train")


@dataclass(frozen=True)
class HeldOut:
    """The images the held-out loss and the grids read, and what training must leave out for them; or none
    (`images` None, `none_because` says why): a set too small to spare any, which trains on every image."""

    images: SplitShards | None
    train_tail: int  # samples cut from the end of the train split (0: the images are a split of their own)
    train_samples: int  # the train split's samples before the cut
    none_because: str = ""  # why nothing is held out (images None): the held-out loss's "not measured" reason
    way_to_one: str = ""  # how a set without one gets a hold-out (images None)
    train_tars: tuple[str, ...] = ()  # the tars of the train split the tail was cut from (empty: no tail)

    @property
    def mixture(self) -> ShardMixture:
        if self.images is None:
            raise ValueError(f"no held-out images: {self.none_because}")
        return ShardMixture([WeightedSet(self.images, 1.0, self.images.location)])

    def describe(self, sources: ShardMixture | None = None) -> str:
        """The run log's line about a held-out tail, or about holding out nothing (a validation split needs none).
        `sources`: the training mixture when data.sources gives it (the held-out tail already cut): then training
        does not read data.shards' train split, whose count this would otherwise say, but that mixture."""
        mixture = (f"the data.sources mixture ({plural(sources.expected_samples, 'sample')} per epoch)"
                   if sources is not None else "")
        if self.images is None:
            reads = mixture or f"all {plural(self.train_samples, 'sample')}"
            return (f"held-out: {self.none_because}; training reads {reads}, "
                    f"and no held-out loss or reconstruction grid is made; to measure one, {self.way_to_one}")
        where = self.images.location
        last = self.images.names[-1].rsplit("/", 1)[-1]
        reads = (f"{mixture}, without them" if mixture else f"the other {self.train_samples - self.train_tail:,}")
        return (f"held-out: no separate held-out split in {where}; holding out the last {self.train_tail:,} of "
                f"{self.train_samples:,} '{self.images.split}' samples (the end of {last}, in manifest order: the same "
                f"on every run and world size) for the held-out loss and the reconstruction grids; training reads "
                f"{reads} (data.heldout)")

    def summary(self) -> dict:
        if self.images is None:
            return {"split": None, "location": None, "samples": 0, "train_tail": 0, "none": self.none_because}
        return {"split": self.images.split, "location": self.images.location, "samples": self.images.samples,
                "train_tail": self.train_tail}

    def exclude_from(self, mixture: ShardMixture) -> ShardMixture:
        """The training mixture without the held-out samples, wherever a set reads them: a set with the held-out
        train split's tars (known by its location, or by its tars wherever its manifest lies: a sweep gives a
        mixture's held-out set and the same set among its sources two subset folders) loses the tail; any other set
        that lists one of the tail's tars (a superset: the same folder plus more tars, an adopted index over the
        same tars and others) loses those samples of it, known by where their images lie in the tar. Cutting only a
        set whose tars were exactly the held-out split's let a superset train on the held-out images. Sets sharing no
        tar with the tail are left alone."""
        if not self.train_tail:
            return mixture
        held = self._held_lines()
        sets = []
        for entry in mixture.sets:
            shards = entry.shards
            if self._is_heldout_split(shards):
                shards = split_tail(shards, self.train_tail)[0]
            elif any(tar in held for tar in tar_identities(shards)):
                shards = self._without_held(shards, held, entry.name or shards.location)
            sets.append(WeightedSet(shards, entry.weight, entry.name))
        return ShardMixture(sets)

    def earlier_cut(self, mixture: ShardMixture) -> ShardMixture:
        """What a release before the cut by sample identity trained on: the tail left out of the held-out split
        alone (`_is_heldout_split`), a superset read whole. A tag records its digest beside the data read, so that a
        checkpoint such a release wrote is told apart from a set rebuilt in place on resume (engine/checkpointing/
        recipe.py, `EARLIER_CUT`)."""
        if not self.train_tail:
            return mixture
        return ShardMixture([WeightedSet(split_tail(entry.shards, self.train_tail)[0]
                                         if self._is_heldout_split(entry.shards) else entry.shards,
                                         entry.weight, entry.name) for entry in mixture.sets])

    def _is_heldout_split(self, shards: SplitShards) -> bool:
        return ((same_location(shards.location, self.images.location) and shards.split == self.images.split)
                or (shards.tars == self.train_tars and shards.samples == self.train_samples
                    and not shards.first_line))

    def _held_lines(self) -> dict[str, tuple[str, range]]:
        """Each tail tar (`tar_identities`) -> (its index in the held-out split, the lines of it held out)."""
        images = self.images
        return {tar: (images.index_url(shard), range(images.first_line_of(shard),
                                                     images.first_line_of(shard) + images.samples_per_shard[shard]))
                for shard, tar in enumerate(tar_identities(images))}

    def _without_held(self, shards: SplitShards, held: dict[str, tuple[str, range]], name: str) -> SplitShards:
        """`shards` less the held-out samples of the tars it shares with the tail: by line where it reads the tail's
        own index, else by the offset of each sample's image in the tar (another index of the same tar, made by
        another adoption, may list other lines; a key may repeat within a tar, where a match by key left out a
        sample that was not held out). A shard keeps its other lines, as one or more parts
        (`SplitShards.first_line`)."""
        parts: list[tuple[int, int, int]] = []
        for shard, tar in enumerate(tar_identities(shards)):
            first = shards.first_line_of(shard)
            lines = range(first, first + shards.samples_per_shard[shard])
            if tar not in held:
                parts.append((shard, first, len(lines)))
                continue
            index_url, held_lines = held[tar]
            if same_location(shards.index_url(shard), index_url):
                out = set(held_lines)
            else:  # a sample of the tar is where its image lies in it: a key may repeat within a tar, an offset not
                held_at = {int(read_index(index_url).image_offset[line]) for line in held_lines}
                out = {line for line, offset in enumerate(read_index(shards.index_url(shard)).image_offset.tolist())
                       if offset in held_at}
            run_start = None
            for line in [*lines, None]:
                if line is not None and line not in out:
                    run_start = line if run_start is None else run_start
                    continue
                if run_start is not None:
                    parts.append((shard, run_start, (line if line is not None else lines.stop) - run_start))
                    run_start = None
        kept = _part(shards, parts)
        if not kept.samples:
            raise DataError(f"data.sources: {name} holds only held-out images (the last {self.train_tail} "
                            f"'{self.images.split}' samples of {self.images.location}, data.shards): nothing is left "
                            "to train on; drop it from data.sources, or give data.shards a validation split "
                            "(data.val_split), which holds out nothing from the sources")
        return kept


def tar_identities(split: SplitShards) -> tuple[str, ...]:
    """Each tar of a split as one name wherever its manifest lies: the URL of a remote one, the resolved path of a
    local one (the base resolved once, not each of 100,000 tars). A name that is a URL stands alone under a local base
    too (storage.join): joined under the folder, it was not the same tar as a remote manifest's of that URL."""
    if storage.is_remote(split.base):
        return split.tars
    base = Path(split.base).resolve()
    return tuple(name if storage.is_remote(name) else os.path.normpath(base / name) for name in split.names)


def heldout_count(heldout_batches: int, micro: int) -> int:
    """What a hold-out must hold: the batches the held-out loss scores (logging.heldout_batches x batch.micro, the
    configured micro-batch, not the one a launch derives: the count must not depend on the world size), and at least
    the grids' images."""
    return max(heldout_batches * micro, GRID_IMAGES)


def same_location(a: str, b: str) -> bool:
    if storage.is_remote(a) or storage.is_remote(b):
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def split_tail(split: SplitShards, count: int) -> tuple[SplitShards, SplitShards]:
    """(the first samples - count samples, the last count samples) of a split in manifest order, as two parts whose
    shards name index lines (SplitShards.first_line): together they hold every sample once."""
    if not 0 < count < split.samples:
        raise ValueError(f"cannot hold out {count} of {split.samples} samples")
    keep, hold = [], []  # per shard: (shard, first line, lines)
    left = split.samples - count
    for shard, lines in enumerate(split.samples_per_shard):
        first = split.first_line_of(shard)
        kept = min(lines, max(left, 0))
        left -= kept
        if kept:
            keep.append((shard, first, kept))
        if lines - kept:
            hold.append((shard, first + kept, lines - kept))
    return _part(split, keep), _part(split, hold)


def _part(split: SplitShards, shards: list[tuple[int, int, int]]) -> SplitShards:
    pick = [shard for shard, _, _ in shards]
    return replace(split, names=tuple(split.names[i] for i in pick),
                   index_names=tuple(split.index_names[i] for i in pick),
                   samples_per_shard=tuple(lines for _, _, lines in shards),
                   bytes_per_shard=tuple(split.bytes_per_shard[i] for i in pick),
                   samples=sum(lines for _, _, lines in shards),
                   first_line=tuple(first for _, first, _ in shards),
                   index_lines=tuple(split.index_lines_of(i) for i in pick),
                   sha256=tuple(split.sha256[i] for i in pick) if split.sha256 else ())


def choose_heldout(location: str, train_split: str, val_split: str, mode: str, count: int) -> HeldOut:
    """data.heldout: "auto" reads `val_split` when the set has one, else holds out the train split's tail; "split"
    insists on `val_split`; "train" holds out the tail even when a validation split exists. Refuses a train split
    too small to give `count` samples and still keep at least as many for training, where a lower setting or a
    validation split is the way out.

    "auto" on a set without `val_split` whose train split is below twice the grids' floor (16 images) holds out
    nothing: no setting makes a hold-out that small, and refusing told a user with a folder of 12 images to do
    what could not help. The run trains on every image; its held-out loss is not measured (said with the reason,
    never a number over no images) and it draws no reconstruction grids."""
    if mode not in MODES:
        raise DataError(f"data.heldout must be one of {', '.join(MODES)}, got {mode!r}")
    path = storage.join(str(location), MANIFEST)
    splits = load_manifest(location).splits
    if mode != "train" and val_split in splits:
        return HeldOut(load_split(location, val_split), 0, 0)
    add_one = (way_to_add_split(str(location), splits, val_split)
               or f"{CONVERT_WITH_VAL}, then set data.val_split=val")
    if mode == "split":
        raise DataError(f"{path}: no split '{val_split}' (data.val_split); it has {sorted(splits)}. data.heldout=auto "
                        f"holds out the end of '{train_split}' instead, or {add_one}")
    train = load_split(location, train_split)
    if mode == "auto" and train.samples < 2 * GRID_IMAGES:
        adopted = any(info.adopted for info in splits.values())
        way = (way_to_add_split(str(location), splits, val_split) if adopted else
               "convert the images again with one (`mixmae shards folder --src SRC --out NEW --val-fraction F`, F "
               "large enough to hold out that many)" + ("" if val_split == "val" else ", then set data.val_split=val"))
        return HeldOut(None, 0, train.samples, (
            f"nothing held out: {path} has no split '{val_split}', and '{train_split}' has "
            f"{plural(train.samples, 'sample')}, fewer than the {2 * GRID_IMAGES} a hold-out of its tail needs (the "
            f"{GRID_IMAGES} images the reconstruction grids need at the least, and as many to train on)"),
            f"give the set a '{val_split}' split of at least batch.micro images: {way}")
    if train.samples < 2 * count:
        why = (f"data.heldout=train holds out the end of '{train_split}' (the set's '{val_split}' is not read)"
               if val_split in splits else f"no split '{val_split}'")
        way = f"data.heldout=auto reads '{val_split}' instead" if val_split in splits else add_one
        # heldout_count's floor: at the grids' 8 the count is not the settings' product, and lowering them does
        # not lower it (the message named the settings for the floor's 8).
        if count <= GRID_IMAGES:
            what = (f"the {GRID_IMAGES} images the reconstruction grids need at the least (a hold-out is never "
                    "smaller, whatever logging.heldout_batches x batch.micro)")
            lower = ""
        elif train.samples < 2 * GRID_IMAGES:  # below the floor's own need: no setting lowers the count enough
            what = "logging.heldout_batches x batch.micro"
            lower = (f" (no lower setting helps: a hold-out is never below the {GRID_IMAGES} images the "
                     f"reconstruction grids need, and {plural(train.samples, 'sample')} cannot hold out "
                     f"{GRID_IMAGES} and train on as many)")
        else:
            what = "logging.heldout_batches x batch.micro"
            lower = ", or lower logging.heldout_batches or batch.micro"
        if train.samples < 2 * GRID_IMAGES and val_split not in splits:  # mode "train": auto trains on them all
            lower += (f"; or data.heldout=auto, which holds out nothing from a set this small and trains on all "
                      f"{train.samples} without a held-out loss")
        raise DataError(f"{path}: {why}, and '{train_split}' has {plural(train.samples, 'sample')}, too few to hold "
                        f"out {count} ({what}) and train on the rest; {way}{lower}")
    return HeldOut(split_tail(train, count)[1], count, train.samples, train_tars=train.tars)
