"""The builder's shared stages (shards/builder.py) on a toy source, in this process (workers=1): progress records
and resume, reconciliation, rejected.jsonl, the rejection ceiling and the manifest written last."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from mixmae_scale.data.manifest import Manifest, ShardEntry, SplitEntry, load_manifest
from mixmae_scale.shards.builder import (
    SplitOutcome,
    WorkList,
    build,
    read_records,
    reconcile,
    resume,
    write_record,
    write_rejections,
)
from mixmae_scale.shards.rejection_limit import TooManyRejected


@dataclass
class Record:
    name: str
    kept: int = 0
    rejected: list[dict] = field(default_factory=list)


def count_letters(unit: str, out: str) -> Record:
    """A toy unit of work: keeps each letter of `unit`, rejects each digit; records itself after its 'output'."""
    digits = [{"item": c, "reason": "a digit"} for c in unit if c.isdigit()]
    record = Record(unit, sum(c.isalpha() for c in unit), digits)
    write_record(f"{out}/.progress/{unit}.json", record)
    return record


@dataclass
class ToySource:
    out: str
    units: list[str]
    max_rejected: float = 1.0
    lose_one: bool = False  # a bug that drops a rejection: reconciliation must stop the build
    splits: tuple[str, ...] = ("train",)
    unit: str = "letters"
    workers: int = 1
    classes_file: bool = False
    ran: list[str] = field(default_factory=list)

    def discover(self) -> tuple[list[str], list[str]]:
        return ["a note"], []

    def pending(self, split: str) -> tuple[WorkList, list[str]]:
        records = {r.name: r for r in read_records(f"{self.out}/.progress", lambda data: Record(**data))}
        todo, done = resume(self.units, records, key=lambda unit: unit)

        def work(unit: str, out: str) -> Record:
            self.ran.append(unit)
            return count_letters(unit, out)

        return WorkList(todo, done, work, (self.out,), desc=split, size=len), ["a warning"]

    def account(self, split: str, results: list[Record]) -> SplitOutcome:
        found = sum(len(unit) for unit in self.units)
        kept, rejected = sum(r.kept for r in results), sum(len(r.rejected) for r in results) - self.lose_one
        reconcile(split, ("found", found), ("kept", kept), ("rejected", rejected))
        shards = tuple(ShardEntry(f"{r.name}.tar", f"{r.name}.idx", r.kept) for r in results if r.kept)
        rows = [{"shard": r.name, **item} for r in results for item in r.rejected]
        return SplitOutcome(SplitEntry(kept, False, shards, {"found": found}), rows, found,
                            [row["reason"] for row in rows])

    def manifest(self, entries: dict[str, SplitEntry]) -> Manifest:
        return Manifest(entries)


def test_reconcile_passes_when_the_parts_add_up_and_names_every_count_when_not():
    reconcile("train", ("found", 10), ("written", 7), ("rejected", 3))
    with pytest.raises(RuntimeError, match=r"^train: counts do not reconcile: found 10 != written 7 \+ rejected 2$"):
        reconcile("train", ("found", 10), ("written", 7), ("rejected", 2))


def test_resume_keeps_fresh_records_and_redoes_missing_or_stale_ones():
    records = {"a": Record("a", 1), "b": Record("b", 2), "gone": Record("gone")}
    todo, done = resume(["a", "b", "c"], records, key=lambda unit: unit, fresh=lambda unit, record: unit != "b")
    assert todo == ["b", "c"] and [r.name for r in done] == ["a"]  # 'gone' is not asked for: not reported


def test_records_round_trip_and_only_the_wanted_names_are_read(tmp_path):
    write_record(str(tmp_path / "p" / "a.json"), Record("a", 2, [{"item": "1"}]))
    write_record(str(tmp_path / "p" / "b.json"), Record("b"))
    assert read_records(str(tmp_path / "p"), lambda data: Record(**data), lambda name: name == "a.json") == [
        Record("a", 2, [{"item": "1"}])]
    assert read_records(str(tmp_path / "absent"), lambda data: Record(**data)) == []


def test_rejections_of_other_splits_are_kept_and_this_splits_replaced(tmp_path):
    write_rejections(str(tmp_path), {"train": [{"reason": "old"}], "val": [{"reason": "v"}]})
    write_rejections(str(tmp_path), {"train": [{"reason": "new", "shard": "s"}]})
    rows = [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert rows == [{"split": "val", "reason": "v"}, {"split": "train", "reason": "new", "shard": "s"}]


def test_an_interrupted_build_redoes_only_the_units_without_a_record(tmp_path):
    out = str(tmp_path)
    count_letters("ab1", out)  # an earlier run finished this unit, then was interrupted
    source = ToySource(out, ["ab1", "cd", "e22"])
    result = build(source, out)
    assert source.ran == ["cd", "e22"] and result.done_now == 2
    assert (result.notes, result.warnings) == (["a note"], ["a warning"])
    assert load_manifest(tmp_path) == result.manifest and result.manifest.splits["train"].samples == 5
    assert sorted(json.loads(line)["item"] for line in (tmp_path / "rejected.jsonl").read_text().splitlines()) == [
        "1", "2", "2"]
    again = ToySource(out, ["ab1", "cd", "e22"])
    assert build(again, out).done_now == 0 and again.ran == []


def test_counts_that_do_not_reconcile_stop_the_build_before_the_manifest(tmp_path):
    with pytest.raises(RuntimeError, match="counts do not reconcile"):
        build(ToySource(str(tmp_path), ["ab1"], lose_one=True), str(tmp_path))
    assert not (tmp_path / "dataset.json").exists() and not (tmp_path / "rejected.jsonl").exists()


def test_too_many_rejections_write_rejected_jsonl_but_no_manifest(tmp_path):
    with pytest.raises(TooManyRejected, match="train: 2 of 4 letters rejected"):
        build(ToySource(str(tmp_path), ["ab12"], max_rejected=0.1), str(tmp_path))
    assert len((tmp_path / "rejected.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "dataset.json").exists()
