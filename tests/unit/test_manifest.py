"""The typed manifest (data/manifest.py), the one reader and writer of dataset.json: what is written reads back
the same, and a damaged manifest names its file and the key at fault."""

from __future__ import annotations

import json

import pytest

from mixmae_scale.data.manifest import (
    DataError,
    Manifest,
    ShardEntry,
    SplitEntry,
    load_manifest,
    load_split,
    read_manifest,
    write_manifest,
)


def adopted_set() -> Manifest:
    shards = (ShardEntry("train/a.tar", "train/a.idx", 3, 4096, "ab" * 32), ShardEntry("s3://b/x.tar", "x.idx", 2))
    train = SplitEntry(5, True, shards, {"adopted_from": "/data/train", "found": 6, "rejected": 1})
    val = SplitEntry(2, False, (ShardEntry("val/v.tar", "val/v.idx", 2, 10, "cd" * 32),), {"found": 2})
    return Manifest({"train": train, "val": val}, [{"index": 0}, {"index": 1}], base="/data",
                    options=None, tool_version="1.2.3")


def test_a_written_manifest_reads_back_equal_and_keeps_each_sources_counts(tmp_path):
    written = adopted_set()
    path = write_manifest(tmp_path, written)
    assert path == str(tmp_path / "dataset.json") and not list(tmp_path.glob("*.tmp*"))
    read = load_manifest(tmp_path)
    assert read == written
    assert read.splits["train"].adopted and not read.splits["val"].adopted
    raw = json.loads((tmp_path / "dataset.json").read_text())
    assert raw["format"] == "mixmae-scale-shards" and raw["version"] == 2 and raw["splits"]["train"]["found"] == 6
    assert read_manifest(tmp_path) == raw  # the dict view is the file as written


def test_split_urls_resolve_tar_names_against_base_and_indexes_against_the_manifests_folder(tmp_path):
    write_manifest(tmp_path, adopted_set())
    train = load_split(tmp_path, "train")
    assert train.tars == ("/data/train/a.tar", "s3://b/x.tar")
    assert train.indexes == (str(tmp_path / "train/a.idx"), str(tmp_path / "x.idx"))
    assert (train.samples, train.labeled, train.num_classes, train.bytes_per_shard) == (5, True, 2, (4096, 0))


def test_a_version_1_manifest_without_base_or_labeled_reads_with_the_defaults(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({
        "format": "mixmae-scale-shards", "version": 1, "classes": [{"index": 0}],
        "splits": {"train": {"shards": [{"name": "t.tar", "index": "t.idx", "samples": 4}]}}}))
    manifest = load_manifest(tmp_path)
    assert manifest.base is None and manifest.version == 1
    split = manifest.splits["train"]
    assert (split.samples, split.labeled, split.shards[0].bytes, split.shards[0].sha256) == (4, True, 0, "")


@pytest.mark.parametrize(("change", "key"), [
    (lambda m: m["splits"]["train"]["shards"][1].pop("index"), "'splits.train.shards[1].index' is missing"),
    (lambda m: m["splits"]["train"]["shards"][0].update(samples="3"), "'splits.train.shards[0].samples' is str"),
    (lambda m: m["splits"]["val"].update(labeled="no"), "'splits.val.labeled' is str"),
    (lambda m: m.update(splits=["train"]), "'splits' is list"),
    (lambda m: m.update(classes={"0": "cat"}), "'classes' is dict"),
    (lambda m: m["splits"].update(test=7), "'splits.test' is int"),
])
def test_a_bad_key_names_the_file_and_the_key(tmp_path, change, key):
    raw = adopted_set().to_dict()
    change(raw)
    (tmp_path / "dataset.json").write_text(json.dumps(raw))
    with pytest.raises(DataError) as error:
        load_manifest(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'dataset.json'}: key ") and key in message
    assert "\n" not in message and "mixmae shards" in message  # one line, with the way forward


def test_a_manifest_of_another_format_without_splits_or_not_json_is_refused_with_its_path(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"format": "something-else", "splits": {}}))
    with pytest.raises(DataError, match="not a mixmae-scale shard manifest .format 'something-else'"):
        load_manifest(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=f"{tmp_path / 'dataset.json'}: not valid JSON"):
        read_manifest(tmp_path)
    for empty in ({}, {"format": "mixmae-scale-shards", "splits": {}}):  # `shards verify` said OK to these
        (tmp_path / "dataset.json").write_text(json.dumps(empty))
        with pytest.raises(DataError, match=f"{tmp_path / 'dataset.json'}: lists no splits"):
            load_manifest(tmp_path)


def test_a_folder_whose_tars_are_in_split_subfolders_is_told_to_adopt_them(tmp_path):
    """A download laid out as train/*.tar and val/*.tar (as many Hugging Face webdatasets are), given as a shard set,
    was said to hold 'no shards, .tar files or images (train, val)' and sent to `mixmae shards folder|imagenet`,
    though `mixmae shards adopt` finds those tars (it lists recursively)."""
    for split in ("train", "val"):
        (tmp_path / "dl" / split).mkdir(parents=True)
        (tmp_path / "dl" / split / "000.tar").write_bytes(b"\0" * 1024)
    with pytest.raises(DataError) as caught:
        load_manifest(tmp_path / "dl")
    said = str(caught.value)
    assert "2 .tar files are there (train/000.tar, val/000.tar)" in said and "no shards" not in said, said
    assert f"`mixmae shards adopt {tmp_path / 'dl'} --out DIR`" in said and "--split val" in said, said


def test_a_tar_in_a_hidden_folder_is_not_offered_for_adoption(tmp_path):
    """`.Trash-1000/old.tar` (a drive's deleted shard) was said to be '1 .tar file ... there' with the `mixmae shards
    adopt` command, which then skips it as hidden: the hint sent the user to a command that finds nothing."""
    (tmp_path / "dl" / ".Trash-1000").mkdir(parents=True)
    (tmp_path / "dl" / ".Trash-1000" / "old.tar").write_bytes(b"\0" * 1024)
    (tmp_path / "dl" / "photo.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(DataError) as caught:
        load_manifest(tmp_path / "dl")
    said = str(caught.value)
    assert "old.tar" not in said and "shards adopt" not in said, said
