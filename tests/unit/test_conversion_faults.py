"""Conversions that meet what real runs meet: a source folder that changed between a stop and a resume,
transient I/O errors, more rejections than a run should accept, and an s3:// output resumed."""

from __future__ import annotations

import errno
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mixmae_scale.cli import main
from mixmae_scale.data import storage
from mixmae_scale.data.manifest import load_split
from mixmae_scale.shards import convert as convert_module
from mixmae_scale.shards import transient, writer
from mixmae_scale.shards.convert import ConvertOptions, convert
from mixmae_scale.shards.sources import SourceError
from mixmae_scale.shards.verify import verify


def jpeg(path: Path, shade: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade % 256, 40, 90)).save(path, format="JPEG", quality=90)
    return path


def sources_in(out: Path) -> list[str]:
    """The source file of every sample in the output's shards, repeats included."""
    found = []
    for tar_path in sorted(out.glob("train-*.tar")):
        with tarfile.open(tar_path) as tar:
            found += [json.loads(tar.extractfile(m).read())["source"] for m in tar if m.name.endswith(".json")]
    return found


def stop_after(monkeypatch, shards: int) -> None:
    """The next conversion stops (as if killed) when it starts its shard number `shards` + 1."""
    real, calls = convert_module.write_shard, []

    def write_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) > shards:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "write_shard", write_then_stop)


def planned_shard(out: Path, rel: str) -> int:
    import gzip

    plan = json.loads(gzip.decompress((out / ".progress" / "plan-train.json.gz").read_bytes()))
    return next(s["index"] for s in plan["shards"] if rel in [im[0] for im in s["images"]])


OPTIONS = ConvertOptions(layout="folder", splits=("train",), samples_per_shard=5, shard_bytes=None, max_rejected=0.05)


def test_a_resume_over_a_changed_source_writes_every_image_exactly_once(tmp_path, monkeypatch, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(40):
        jpeg(src / f"img{i:03d}.jpg", i)
    stop_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, OPTIONS)
    monkeypatch.undo()
    written_before = set(sources_in(out))
    assert len(written_before) == 15
    vanished_written = sorted(written_before)[0]
    vanished_pending = next(f"img{i:03d}.jpg" for i in range(40) if planned_shard(out, f"img{i:03d}.jpg") >= 3)
    (src / vanished_written).unlink()
    (src / vanished_pending).unlink()
    jpeg(src / "new.jpg", 7)
    result = convert(src, out, OPTIONS)
    manifest = result.manifest.to_dict()
    samples = sources_in(out)
    assert len(samples) == len(set(samples)), "an image was written twice"
    expected = {f"img{i:03d}.jpg" for i in range(40)} - {vanished_pending} | {"new.jpg"}
    assert set(samples) == expected
    split = manifest["splits"]["train"]
    assert (split["found"], split["samples"], split["rejected"]) == (41, 40, 1)
    assert split["source_changes"] == {"vanished": 2, "appeared": 1}
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [(r["source"], "No such file" in r["reason"]) for r in rejected] == [(vanished_pending, True)]
    (message,) = result.warnings  # returned for the CLI to print, not printed by the library
    assert "the source changed since this conversion began: 2 planned files vanished" in message
    assert "1 new file (first: new.jpg) goes to 1 extra shard after the planned ones (train-000008)" in message
    assert verify(out)["ok"]


def test_class_folders_that_changed_mid_conversion_are_refused(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    for cls in ("cats", "dogs"):
        for i in range(5):
            jpeg(src / cls / f"{i}.jpg", i)
    stop_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, OPTIONS)
    monkeypatch.undo()
    jpeg(src / "ants" / "0.jpg")  # sorts first: every label would shift by one
    with pytest.raises(SourceError, match=r"class folders changed since this conversion began \(added: \['ants'\]"):
        convert(src, out, OPTIONS)


def test_transient_read_errors_are_retried_and_a_rerun_retries_what_still_failed(tmp_path, monkeypatch, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(10):
        jpeg(src / f"{i}.jpg", i)
    monkeypatch.setattr(transient, "BACKOFF_S", (0.0, 0.0, 0.0))
    real, failures = writer.read_source_file, {"1.jpg": 2, "2.jpg": 99, "3.jpg": 1}

    def flaky(path):  # an NFS server failing over: EIO, ESTALE, a timeout, then the file reads
        name = Path(path).name
        if failures.get(name, 0) > 0:
            failures[name] -= 1
            raise [OSError(errno.EIO, "Input/output error", path), OSError(errno.ESTALE, "Stale file handle", path),
                   TimeoutError(errno.ETIMEDOUT, "Connection timed out", path)][failures[name] % 3]
        return real(path)

    monkeypatch.setattr(writer, "read_source_file", flaky)
    options = ConvertOptions(layout="folder", splits=("train",), samples_per_shard=5, shard_bytes=None,
                             max_rejected=0.1)
    manifest = convert(src, out, options).manifest.to_dict()
    split = manifest["splits"]["train"]
    assert (split["samples"], split["rejected"], split["transient"]) == (9, 1, 1)  # 1.jpg and 3.jpg recovered
    (line,) = (out / "rejected.jsonl").read_text().splitlines()
    assert json.loads(line)["source"] == "2.jpg" and json.loads(line)["transient"] is True
    # The file server is back: the next run writes again the one shard that holds a transient rejection.
    failures.clear()
    manifest = convert(src, out, options).manifest.to_dict()
    assert (manifest["splits"]["train"]["samples"], manifest["splits"]["train"]["rejected"]) == (10, 0)
    assert "1 shard to write, 1 done earlier" in capsys.readouterr().err
    assert (out / "rejected.jsonl").read_text() == "" and sorted(sources_in(out)) == [f"{i}.jpg" for i in range(10)]


def test_a_conversion_above_max_rejected_exits_nonzero_with_the_counts(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(3):
        jpeg(src / f"{i}.jpg", i)
    for i in range(2):
        (src / f"empty{i}.jpg").write_bytes(b"")
    command = ["shards", "folder", "--src", str(src), "--out", str(out), "--workers", "1"]
    assert main(command) == 2
    error = capsys.readouterr().err
    assert "train: 2 of 5 files rejected (40.0%), above --max-rejected 0.01: 2 x 'zero-byte file'" in error
    assert "or accept them with --max-rejected 0.41" in error and not (out / "dataset.json").exists()
    assert main([*command, "--max-rejected", "0.5"]) == 0
    captured = capsys.readouterr()
    assert "0 shards to write, 1 done earlier" in captured.err
    assert "train: found 5 = written 3 + rejected 2" in captured.out


def test_conversion_to_s3_uploads_shard_by_shard_and_a_rerun_skips_uploaded_ones(tmp_path, s3_bucket, monkeypatch):
    src = tmp_path / "src"
    for cls in ("n01", "n02"):
        for i in range(4):
            jpeg(src / "train" / cls / f"{cls}_{i}.JPEG", i)
        jpeg(src / "val" / cls / f"{cls}_val.JPEG")
    url, staging = f"s3://{s3_bucket}/imagenet-wds", tmp_path / "staging"
    options = ConvertOptions(layout="imagenet", samples_per_shard=3, shard_bytes=None, staging=str(staging))
    stop_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        convert(src, url, options)
    monkeypatch.undo()
    uploaded = {f.name for f in storage.list_files(url)}
    assert {"train-000000.tar", "train-000000.idx", ".progress/train-000000.json", "train-000001.tar"} <= uploaded
    assert "train-000002.tar" not in uploaded and "dataset.json" not in uploaded
    assert not list(staging.glob("*.tar")), "a finished shard stays in the staging folder"
    real, written = convert_module.write_shard, []
    monkeypatch.setattr(convert_module, "write_shard", lambda plan, *a: written.append(plan.name) or real(plan, *a))
    manifest = convert(src, url, options).manifest.to_dict()
    assert written == ["train-000002", "val-000000"]
    assert not staging.exists()
    local = convert(src, tmp_path / "local", options).manifest.to_dict()
    assert manifest["splits"] == local["splits"]  # the same bytes, checksums and counts as a local conversion
    assert load_split(url, "train").tars[0] == f"{url}/train-000000.tar"
    report = verify(url, decode=True)
    assert report["ok"], report["errors"]
    assert report["splits"]["train"] == {"samples": 8, "shards": 3, "decoded": 8}


def test_grouped_rejection_reasons_read_without_quotes_in_quotes_or_placeholder_counts():
    from mixmae_scale.shards.rejection_limit import reason_counts

    shown = reason_counts(["unsafe member name 'a/../b.jpg' (absolute or with '..')",
                           "more than one image (2 images: jpg, png): one per sample, so that which one trains ...",
                           "zero-byte file"])
    assert shown == "1 x \"unsafe member name '...'\", 1 x 'more than one image', 1 x 'zero-byte file'"


def _plan_naming_a_copy(tmp_path, monkeypatch, images=20, options=OPTIONS):
    """(src, out): `images` images and dup.jpg, a copy of img005.jpg, planned as a file of its own (as an older
    version planned a link) and the conversion stopped before its first shard; `_link_the_copy` then turns dup.jpg
    into a link."""
    import shutil

    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(images):
        jpeg(src / f"img{i:03d}.jpg", i)
    shutil.copyfile(src / "img005.jpg", src / "dup.jpg")
    stop_after(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, options)
    monkeypatch.undo()
    return src, out


def _link_the_copy(src):
    (src / "dup.jpg").unlink()
    (src / "dup.jpg").symlink_to(src / "img005.jpg")


def test_a_resume_whose_plan_holds_a_link_now_skipped_says_so_and_writes_it_at_most_once(tmp_path, monkeypatch):
    """A plan saved before linked duplicates were skipped names a link that discovery now leaves out: it was said
    to have vanished (it had not), written as planned and also counted as skipped. Written earlier, it stays and
    is counted written; still to write, it is skipped, and the warning says which it is."""
    src, out = _plan_naming_a_copy(tmp_path, monkeypatch)
    _link_the_copy(src)
    result = convert(src, out, OPTIONS)
    split = result.manifest.to_dict()["splits"]["train"]
    samples = sources_in(out)
    assert "dup.jpg" not in samples and samples.count("img005.jpg") == 1
    assert split["found"] == split["samples"] + split["rejected"] + split.get("skipped_duplicates", 0)
    assert (split["found"], split["samples"], split["skipped_duplicates"]) == (21, 20, 1)
    assert split["source_changes"] == {"vanished": 0, "appeared": 0}
    said = " ".join(result.warnings + result.notes)
    assert "vanished" not in said and "dup.jpg" in said, said
    assert verify(out)["ok"]


def test_a_planned_link_already_written_before_the_resume_stays_counted_as_written(tmp_path, monkeypatch):
    src, out = _plan_naming_a_copy(tmp_path, monkeypatch)
    stop_after(monkeypatch, planned_shard(out, "dup.jpg") + 1)  # its shard written, as an older version wrote it
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, OPTIONS)
    monkeypatch.undo()
    _link_the_copy(src)
    result = convert(src, out, OPTIONS)
    split = result.manifest.to_dict()["splits"]["train"]
    assert sources_in(out).count("dup.jpg") == 1
    assert (split["found"], split["samples"], split.get("skipped_duplicates", 0)) == (21, 21, 0)
    said = " ".join(result.warnings)
    assert "vanished" not in said and "0 skipped now, 1 kept in shards written earlier" in said, said


def test_a_planned_shard_left_with_no_image_by_skipped_links_is_not_written(tmp_path, monkeypatch):
    """One image a shard: the shard an older plan gave the link alone has nothing left once the link is skipped. It
    is neither listed in the manifest nor left on disk as an empty tar, and the counts still reconcile."""
    import dataclasses

    options = dataclasses.replace(OPTIONS, samples_per_shard=1)
    src, out = _plan_naming_a_copy(tmp_path, monkeypatch, images=6, options=options)
    empty = planned_shard(out, "dup.jpg")
    _link_the_copy(src)
    split = convert(src, out, options).manifest.to_dict()["splits"]["train"]
    assert [s["samples"] for s in split["shards"]] == [1] * 6
    assert (split["found"], split["samples"], split["skipped_duplicates"]) == (7, 6, 1)
    assert not (out / f"train-{empty:06d}.tar").exists() and len(list(out.glob("train-*.tar"))) == 6
    assert verify(out)["ok"]


def test_a_resume_whose_plan_holds_an_image_of_a_hidden_folder_skips_it_and_says_why(tmp_path, monkeypatch):
    """A plan saved before hidden folders were skipped names `.thumbs/t.jpg`, which discovery now leaves out: the
    resume said it had vanished ('rejected if its shard is still to write'; it had not) and wrote the thumbnail
    into the set all the same. Still to write, it is now skipped, and said to be in a hidden folder."""
    import gzip

    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(20):
        jpeg(src / f"img{i:03d}.jpg", i)
    stop_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, OPTIONS)
    monkeypatch.undo()
    jpeg(src / ".thumbs" / "t.jpg", 3)
    plan_path = out / ".progress" / "plan-train.json.gz"
    plan = json.loads(gzip.decompress(plan_path.read_bytes()))  # as the older version planned it
    plan["shards"][-1]["images"].append([".thumbs/t.jpg", 0, None, (src / ".thumbs" / "t.jpg").stat().st_size])
    plan_path.write_bytes(gzip.compress(json.dumps(plan).encode()))
    result = convert(src, out, OPTIONS)
    split = result.manifest.to_dict()["splits"]["train"]
    assert ".thumbs/t.jpg" not in sources_in(out) and len(sources_in(out)) == 20
    assert (split["found"], split["samples"], split["source_changes"]["vanished"]) == (20, 20, 0)
    said = " ".join(result.warnings + result.notes)
    assert "vanished" not in said and ".thumbs/t.jpg" in said and "hidden folder" in said, said
    assert verify(out)["ok"]
