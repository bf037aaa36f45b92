"""A conversion's plan, saved before its first shard: which source file goes into which shard.

A resumed conversion that planned again from the folder as it is then would go wrong: the split's global shuffle is
a function of the whole file list, so one file that vanished and one that appeared moved every file to
another shard: shards written before and after the change overlapped and left gaps (in one
measured case of 300 images: 39 written twice, 39 lost, exit 0). With the plan saved, a resume writes
exactly what was planned:
- a planned file that vanished is rejected when its shard is written ("No such file"), or stays in the
  shard that was written before it vanished;
- files that appeared go to extra shards after the planned ones (shuffled among themselves), and the
  extended plan is saved in turn;
- class folders that changed are refused: a label is the class's position in the sorted list, so shards
  written before and after would disagree on what label 3 means.
Each file is thus written once, and the summary says what changed.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mixmae_scale.data import storage
from mixmae_scale.data.errors import plural
from mixmae_scale.shards.sources import SourceError, SourceImage
from mixmae_scale.shards.writer import PROGRESS_DIR, ShardPlan

PLAN_VERSION = 1


@dataclass
class SourceChanges:
    vanished: list[str] = field(default_factory=list)  # planned files no longer in the source (relative)
    appeared: list[str] = field(default_factory=list)  # files not in the plan, written to extra shards
    extra_shards: list[str] = field(default_factory=list)

    def describe(self, split: str) -> str:
        if not self.vanished and not self.appeared:
            return ""
        parts = []
        if self.vanished:
            parts.append(f"{plural(len(self.vanished), 'planned file')} vanished (first: {self.vanished[0]}): "
                         "rejected if their shard is still to write, kept if it was written")
        if self.appeared:
            go = "goes" if len(self.appeared) == 1 else "go"
            parts.append(f"{plural(len(self.appeared), 'new file')} (first: {self.appeared[0]}) {go} to "
                         f"{plural(len(self.extra_shards), 'extra shard')} after the planned ones "
                         f"({self.extra_shards[0]}"
                         + (f"..{self.extra_shards[-1]}" if len(self.extra_shards) > 1 else "") + ")")
        return (f"{split}: the source changed since this conversion began: " + "; ".join(parts)
                + ". Every file is written once, as planned at the start; for one shuffle over the folder as it "
                "is now, convert into a new output folder")


def plan_url(out: str, split: str) -> str:
    return storage.join(out, f"{PROGRESS_DIR}/plan-{split}.json.gz")


def _save(out: str, split: str, plans: list[ShardPlan], classes: list[str]) -> None:
    shards = [{"index": p.index, "first": p.first,
               "images": [[im.rel, im.label, im.wnid, im.size] for im in p.images]} for p in plans]
    data = {"version": PLAN_VERSION, "split": split, "classes": classes,
            "labeled": bool(plans and plans[0].labeled), "shards": shards}
    storage.write_bytes(plan_url(out, split), gzip.compress(json.dumps(data).encode(), mtime=0))


def _load(url: str, split: str, root: Path) -> tuple[list[ShardPlan], list[str]]:
    data = json.loads(gzip.decompress(storage.read_bytes(url)))
    plans = [ShardPlan(split, s["index"], s["first"], tuple(SourceImage(str(root / rel), rel, label, wnid, size)
                                                            for rel, label, wnid, size in s["images"]), data["labeled"])
             for s in data["shards"]]
    return plans, data["classes"]


def planned_files(out: str, split: str) -> dict[str, int]:
    """The files the split's saved plan names (relative name -> size); empty when no plan was saved."""
    url = plan_url(out, split)
    if not storage.exists(url):
        return {}
    data = json.loads(gzip.decompress(storage.read_bytes(url)))
    return {rel: size for shard in data["shards"] for rel, _, _, size in shard["images"]}


def resume_plan(out: str, split: str, root: Path, images: list[SourceImage], classes: list[str],
                make_plans: Callable[[list[SourceImage], int, int], list[ShardPlan]],
                started: bool) -> tuple[list[ShardPlan], SourceChanges]:
    """The split's plan: the saved one, extended by files that appeared since, or a new one (saved).
    `make_plans(images, first_index, first_sample)` plans images into shards; `started` says whether
    shards of this output exist already (then a missing plan means an older version began it)."""
    url = plan_url(out, split)
    if not storage.exists(url):
        if started:
            raise SourceError(f"{out} holds shards of a conversion begun by an older version, which saved no plan: "
                              "whether the source changed since cannot be checked. Convert into a new output folder, "
                              f"or remove {storage.join(out, PROGRESS_DIR)} to start this one over")
        plans = make_plans(images, 0, 0)
        _save(out, split, plans, classes)
        return plans, SourceChanges()
    plans, planned_classes = _load(url, split, root)
    if planned_classes != classes:
        added = sorted(set(classes) - set(planned_classes))
        removed = sorted(set(planned_classes) - set(classes))
        raise SourceError(f"{root}: its class folders changed since this conversion began (added: {added or 'none'}; "
                          f"removed: {removed or 'none'}): labels are positions in the class list, so shards written "
                          "before and after would disagree. Restore the folders, or convert into a new output folder")
    current = {im.rel: im for im in images}
    planned = {im.rel for plan in plans for im in plan.images}
    changes = SourceChanges(vanished=sorted(planned - current.keys()), appeared=sorted(current.keys() - planned))
    if changes.appeared:
        extra = make_plans([current[rel] for rel in changes.appeared], len(plans),
                           sum(len(p.images) for p in plans))
        changes.extra_shards = [p.name for p in extra]
        plans = plans + extra
        _save(out, split, plans, classes)
    return plans, changes
