"""Adopting WebDataset shards written by other tools: webdataset's own ShardWriter, img2dataset's layout
(with a truncated tar and bad samples), from and into the loopback S3 server, resumed after an
interruption. Indexes are checked against DALI's own wds2idx."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mixmae_scale.cli import main
from mixmae_scale.data import storage
from mixmae_scale.data.manifest import load_split
from mixmae_scale.shards import adopt as adopt_module
from mixmae_scale.shards.adopt import AdoptOptions, adopt
from mixmae_scale.shards.rejection_limit import TooManyRejected
from mixmae_scale.shards.sources import SourceError
from mixmae_scale.shards.verify import verify

FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "JPG": "JPEG", "png": "PNG", "webp": "WEBP"}


def image_bytes(ext: str, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format=FORMATS[ext])
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar with exactly these members in this order (for layouts no writer library would make)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def wds2idx(tar: Path, tmp: Path) -> list[str]:
    """DALI's own index of a tar, as lines (its tool indexes every sample it finds, good or bad)."""
    from wds2idx import IndexCreator

    out = tmp / f"{tar.stem}.dali.idx"
    with IndexCreator(str(tar), str(out), verbose=False) as creator:
        creator.create_index()
    return out.read_text().splitlines()


def index_lines(out: str | Path, name: str) -> list[str]:
    return storage.read_text(storage.join(str(out), name)).splitlines()


@pytest.fixture(scope="session")
def wds_sets(tmp_path_factory):
    """`shardwriter/`: 12 labeled samples in 3 tars written by webdataset's ShardWriter, every image
    extension, keys with folder paths, classes mixed across shards. `img2dataset/`: img2dataset's layout
    (9-digit keys, .jpg/.txt/.json, a .parquet and _stats.json beside each tar): 00000.tar good,
    00001.tar with one bad sample of each kind, 00002.tar cut inside its last sample."""
    import webdataset as wds

    root = tmp_path_factory.mktemp("wds")
    (root / "shardwriter").mkdir()
    exts = ["jpg", "jpeg", "png", "webp", "JPG"]
    with wds.ShardWriter(str(root / "shardwriter" / "shard-%06d.tar"), maxcount=4, verbose=0) as sink:
        for i in range(12):
            ext = exts[i % len(exts)]
            sink.write({"__key__": f"n0{i % 3}/img_{i:04d}", ext: image_bytes(ext, (20 * i, 0, 0)), "cls": i % 3})
    i2d = root / "img2dataset"
    i2d.mkdir()
    for shard in range(3):
        (i2d / f"{shard:05d}.parquet").write_bytes(b"PAR1 not really parquet PAR1")
        (i2d / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 4, "successes": 4}))
    jpg, txt, meta = image_bytes("jpg"), b"a caption", b'{"url": "http://example.com/x.jpg"}'
    with wds.TarWriter(str(i2d / "00000.tar")) as sink:
        for i in range(4):
            sink.write({"__key__": f"{i:09d}", "jpg": jpg, "txt": txt, "json": meta})
    write_tar(i2d / "00001.tar", [
        ("000010000.txt", txt), ("000010000.json", meta),  # no image
        ("000010001.jpg", jpg), ("000010001.png", image_bytes("png")),  # two images
        ("000010002.jpg", b"\xff\xd8 these are not JPEG bytes"), ("000010002.txt", txt),  # only --decode sees it
        ("000010003.jpg", jpg), ("000010003.txt", txt),  # good
        ("._000010003.jpg", b"macOS resource fork"),  # hidden: belongs to no sample
        ("000010004.jpg", jpg),  # its key comes back after another sample
        ("000010005.jpg", jpg), ("000010005.txt", txt),  # good
        ("000010004.txt", txt),
        ("../000010006.jpg", jpg),  # unsafe
    ])
    with wds.TarWriter(str(i2d / "00002.tar")) as sink:
        for i in range(4):
            sink.write({"__key__": f"{20000 + i:09d}", "jpg": image_bytes("jpg", (0, 9 * i, 0)), "txt": txt})
    whole = (i2d / "00002.tar").read_bytes()
    cut_at = whole.rindex(b"000020003.jpg") + 512 + 100  # inside the last sample's image data
    (i2d / "00002.tar").write_bytes(whole[:cut_at])
    return root


def test_shardwriter_set_is_indexed_exactly_like_dalis_wds2idx(wds_sets, tmp_path):
    out = tmp_path / "adopted"
    result = adopt(wds_sets / "shardwriter", out, AdoptOptions(workers=2, decode=True))
    manifest = result.manifest.to_dict()
    split = manifest["splits"]["train"]
    assert (split["found"], split["samples"], split["rejected"], split["labeled"]) == (12, 12, 0, True)
    assert manifest["version"] == 2 and manifest["base"] == str((wds_sets / "shardwriter").resolve())
    assert [c["index"] for c in json.loads((out / "classes.json").read_text())] == [0, 1, 2]
    assert not result.warnings
    for entry in split["shards"]:
        tar = wds_sets / "shardwriter" / entry["name"]
        assert entry["index"] == f"train/{tar.stem}.idx" and entry["bytes"] == tar.stat().st_size
        assert index_lines(out, entry["index"]) == wds2idx(tar, tmp_path)
        assert entry["samples"] == 4
    shards = load_split(out, "train")
    assert shards.samples == 12 and shards.labeled and shards.num_classes == 3
    assert shards.tars[0] == str((wds_sets / "shardwriter" / "shard-000000.tar").resolve())
    # Keys keep their folders; the image is whichever of jpg/jpeg/png/webp (any case) the sample has.
    first = index_lines(out, "train/shard-000000.idx")[1].split(" ")
    assert first[3] == "n00/img_0000.cls" and first[7] == "n00/img_0000.jpg"
    report = verify(out, decode=True)
    assert report["ok"], report["errors"]
    assert report["splits"]["train"] == {"samples": 12, "shards": 3, "decoded": 12}


def test_img2dataset_layout_every_bad_sample_has_its_reason_and_counts_reconcile(wds_sets, tmp_path):
    out = tmp_path / "adopted"
    manifest = adopt(wds_sets / "img2dataset", out, AdoptOptions(max_rejected=0.5)).manifest.to_dict()
    split = manifest["splits"]["train"]
    # 00000: 4 good. 00001: 7 samples (000010004, apart, is one), 3 usable without decoding. 00002: 3 complete
    # before the cut, 1 cut.
    assert (split["found"], split["samples"], split["rejected"]) == (15, 10, 5)
    assert split["members"] == 12 + 14 + 7 and split["ignored_members"] == 1
    assert not split["labeled"] and manifest["classes"] == [] and not (out / "classes.json").exists()
    assert split["ignored_files"] == {".parquet": 3, ".json": 3}
    lines = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    reasons = {(r["shard"], r.get("key") or r.get("member")): r.get("reason") or r["problem"] for r in lines}
    assert "no image member" in reasons["00001.tar", "000010000"]
    assert "more than one image (2 images: jpg, png)" in reasons["00001.tar", "000010001"]
    assert "appears 2 times apart" in reasons["00001.tar", "000010004"]
    assert "unsafe member name '../000010006.jpg'" in reasons["00001.tar", "../000010006"]
    assert "hidden file" in reasons["00001.tar", "._000010003.jpg"]
    assert "the tar is cut" in reasons["00002.tar", "000020003"] and "00002.tar" in {r["shard"] for r in lines
                                                                                        if "problem" in r}
    assert sum(1 for r in lines if "key" in r) == split["rejected"]
    # The indexed samples are exactly DALI's own index of those samples.
    for entry in split["shards"]:
        ours = index_lines(out, entry["index"])
        keys = {line.split(" ")[3].split(".")[0] for line in ours[1:]}
        dalis = [line for line in wds2idx(wds_sets / "img2dataset" / entry["name"], tmp_path)[1:]
                 if line.split(" ")[3].split(".")[0] in keys]
        assert ours[0] == f"v1.2 {entry['samples']}" and ours[1:] == dalis
    assert [e["samples"] for e in split["shards"]] == [4, 3, 3]
    report = verify(out)
    assert report["ok"], report["errors"]
    # With --decode the image that is not a JPEG is rejected too; a later verify --decode of the first
    # adoption names it.
    decoded = adopt(wds_sets / "img2dataset", tmp_path / "decoded", AdoptOptions(max_rejected=0.5, decode=True))
    assert decoded.manifest.splits["train"].samples == 9
    errors = verify(out, decode=True)["errors"]
    assert len(errors) == 1 and "000010002" in errors[0] and "does not decode" in errors[0]


def test_too_many_rejections_exit_nonzero_and_accepting_them_redoes_nothing(wds_sets, tmp_path, capsys):
    out = tmp_path / "adopted"
    assert main(["shards", "adopt", str(wds_sets / "img2dataset"), "--out", str(out), "--workers", "1"]) == 2
    error = capsys.readouterr().err
    assert "train: 5 of 15 samples (and unreadable tars) rejected (33.3%), above --max-rejected 0.01" in error
    assert "--max-rejected 0.34" in error and "1 of them are keys whose members are apart" in error
    assert not (out / "dataset.json").exists()
    assert len((out / "rejected.jsonl").read_text().splitlines()) == 5 + 1 + 1  # samples, hidden file, cut tar
    assert main(["shards", "adopt", str(wds_sets / "img2dataset"), "--out", str(out), "--max-rejected", "0.4"]) == 0
    printed = capsys.readouterr().out
    assert "(0 indexed now); samples found 15 = indexed 10 + rejected 5" in printed
    assert (out / "dataset.json").exists()


def test_an_interrupted_adoption_indexes_only_what_is_missing(wds_sets, tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(wds_sets / "shardwriter", src)
    out = tmp_path / "adopted"
    real, calls, interruptions = adopt_module.index_shard, [], []

    def interrupted(job):
        calls.append(job.name)
        if len(calls) == 2 and not interruptions:
            interruptions.append(job.name)
            raise KeyboardInterrupt  # the user's Ctrl-C while the second tar is read
        return real(job)

    monkeypatch.setattr(adopt_module, "index_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        adopt(src, out, AdoptOptions())
    assert not (out / "dataset.json").exists()
    calls.clear()
    adopt(src, out, AdoptOptions())
    assert calls == ["shard-000001.tar", "shard-000002.tar"]
    # A tar that changed since it was indexed (here: grown by a zero block after its end) is indexed again.
    with (src / "shard-000002.tar").open("ab") as handle:
        handle.write(b"\0" * 512)
    calls.clear()
    manifest = adopt(src, out, AdoptOptions()).manifest.to_dict()
    assert calls == ["shard-000002.tar"] and manifest["splits"]["train"]["samples"] == 12
    fresh = adopt(src, tmp_path / "fresh", AdoptOptions()).manifest.to_dict()
    assert manifest["splits"] == {**fresh["splits"], "train": {**fresh["splits"]["train"],
                                                               "adopted_from": str(src.resolve())}}
    for entry in manifest["splits"]["train"]["shards"]:
        assert index_lines(out, entry["index"]) == index_lines(tmp_path / "fresh", entry["index"])
    # Rewritten in place at the same size (its samples in another order): the old index would read the old
    # offsets, and a rerun said "0 indexed now". Its mtime changed, so it is indexed again.
    tar_path = src / "shard-000001.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    keys = list(dict.fromkeys(name.split(".", 1)[0] for name, _ in members))
    size, mtime = tar_path.stat().st_size, tar_path.stat().st_mtime
    write_tar(tar_path, [m for key in reversed(keys) for m in members if m[0].split(".", 1)[0] == key])
    os.utime(tar_path, (mtime + 5, mtime + 5))
    assert tar_path.stat().st_size == size
    calls.clear()
    adopt(src, out, AdoptOptions())
    assert calls == ["shard-000001.tar"]
    again = adopt(src, tmp_path / "fresh-again", AdoptOptions()).manifest.to_dict()["splits"]["train"]["shards"]
    assert [index_lines(out, e["index"]) for e in again] == [index_lines(tmp_path / "fresh-again", e["index"])
                                                             for e in again]


def test_adoption_from_s3_into_s3_reads_each_tar_with_one_request(wds_sets, s3_bucket):
    import boto3

    client = boto3.client("s3")
    for split, folder in (("train", "shardwriter"), ("val", "img2dataset")):
        for path in sorted((wds_sets / folder).iterdir()):
            client.upload_file(str(path), s3_bucket, f"data/{split}/{path.name}")
    src, out = f"s3://{s3_bucket}/data", f"s3://{s3_bucket}/sets/mine"
    before = dict(storage.REQUESTS)
    adopt(f"{src}/train", out, AdoptOptions())
    gets = storage.REQUESTS["GET"] - before.get("GET", 0)
    assert gets == 3, f"{gets} GETs to index 3 tars"
    manifest = adopt(f"{src}/val/", out, AdoptOptions(split="val", max_rejected=0.5)).manifest.to_dict()
    assert manifest["base"] == src  # moved up to the prefix both splits share
    assert [s["name"] for s in manifest["splits"]["train"]["shards"]][0] == "train/shard-000000.tar"
    assert [s["name"] for s in manifest["splits"]["val"]["shards"]][0] == "val/00000.tar"
    assert manifest["splits"]["train"]["labeled"] and not manifest["splits"]["val"]["labeled"]
    train, val = load_split(out, "train"), load_split(out, "val")
    assert train.tars[1] == f"{src}/train/shard-000001.tar" and train.indexes[1] == f"{out}/train/shard-000001.idx"
    assert (train.samples, val.samples) == (12, 10)
    (error,) = verify(out, decode=True)["errors"]  # the image only decoding finds (adopted without --decode)
    assert error == (f"{src}/val/00001.tar: sample 000010002 (line 2 of {out}/val/00001.idx): image does not "
                     "decode: not a format Pillow can identify")
    assert verify(out)["ok"]


def test_a_set_sorted_by_class_is_warned_about_by_the_library_and_printed_by_the_cli(tmp_path, capsys):
    import webdataset as wds

    (tmp_path / "sorted").mkdir()
    with wds.ShardWriter(str(tmp_path / "sorted" / "s-%03d.tar"), maxcount=3, verbose=0) as sink:
        for i in range(9):
            sink.write({"__key__": f"{i:04d}", "jpg": image_bytes("jpg"), "cls": i // 3})
    (warning,) = adopt(tmp_path / "sorted", tmp_path / "out", AdoptOptions()).warnings
    assert warning.startswith("train: 3 of 3 shards hold one class") and "sorted by class" in warning
    assert not capsys.readouterr().err.count("WARNING")  # the library returns it and prints nothing
    assert main(["shards", "adopt", str(tmp_path / "sorted"), "--out", str(tmp_path / "cli"), "--workers", "1"]) == 0
    assert f"WARNING {warning}\n" in capsys.readouterr().err


def test_a_tar_cut_at_a_member_boundary_or_with_a_damaged_header_is_caught_where_tarfile_stops_quietly(tmp_path):
    from mixmae_scale.shards.tar_index import index_tar

    write_tar(tmp_path / "t.tar", [(f"{key}.{ext}", image_bytes("jpg") if ext == "jpg" else b"1")
                                   for key in ("a", "b", "c") for ext in ("jpg", "cls")])
    whole = (tmp_path / "t.tar").read_bytes()
    complete = index_tar(io.BytesIO(whole))
    assert (complete.samples, complete.problem, complete.labels) == (3, "", [1, 1, 1])
    end_of_members = whole.index(b"\0" * 1024, whole.index(b"c.cls") + 1024)  # c.cls's data is 1 byte + padding
    cut = index_tar(io.BytesIO(whole[:end_of_members]))  # every member whole, the end marker gone
    assert cut.keys == ["a", "b"] and cut.rejected[0]["key"] == "c"
    assert "without the end-of-archive marker" in cut.rejected[0]["reason"]
    damaged = bytearray(whole)
    header_b = whole.index(b"b.jpg")
    damaged[header_b:header_b + 100] = b"x" * 100  # tarfile ends its listing here without an error
    found = index_tar(io.BytesIO(bytes(damaged)))
    assert found.samples == 0 and found.problem == f"unreadable header at byte {header_b}: the rest of the tar " \
                                                   "cannot be read"
    assert found.rejected[0]["key"] == "a" and found.bytes_read == len(whole)


def test_tars_named_for_another_split_are_not_adopted_into_this_one(wds_sets, tmp_path):
    """Adopting a download's folder as train took its validation tars along (validation images trained on) without
    a word; adopting a folder of validation tars without --split made them training data. Now each split takes the
    tars named for it (and unnamed ones), says what it left out, and a folder with nothing for the split is refused;
    a split name of the set's own choosing claims nothing."""
    tar = next((wds_sets / "shardwriter").glob("*.tar"))
    src = tmp_path / "download"
    src.mkdir()
    for name in ("imagenet1k-train-0000.tar", "imagenet1k-validation-0000.tar", "imagenet1k-validation-0001.tar"):
        shutil.copy(tar, src / name)
    train = adopt(src, tmp_path / "out", AdoptOptions())
    assert [e.name for e in train.manifest.splits["train"].shards] == ["imagenet1k-train-0000.tar"]
    assert any("2 tars named for 'val' (e.g. imagenet1k-validation-0000.tar) left out; adopt them with --split val"
               in w for w in train.warnings)
    (src / "imagenet1k-train-0001.tar").write_bytes(b"not a tar")  # refused: the left-out tars are still said
    with pytest.raises(TooManyRejected, match=r"above --max-rejected.*Also: train: 2 tars named for 'val'"):
        adopt(src, tmp_path / "refused-train", AdoptOptions())
    (src / "imagenet1k-train-0001.tar").unlink()
    val = adopt(src, tmp_path / "out", AdoptOptions(split="validation"))  # a spelling of val: the same split
    assert [e.name for e in val.manifest.splits["validation"].shards] == ["imagenet1k-validation-0000.tar",
                                                                          "imagenet1k-validation-0001.tar"]
    assert len(adopt(src, tmp_path / "own", AdoptOptions(split="holdout")).manifest.splits["holdout"].shards) == 3
    only_val = tmp_path / "held-out"
    only_val.mkdir()
    (only_val / "val-0000.tar").write_bytes(b"")
    with pytest.raises(SourceError, match=r"its 1 tar is named for 'val' \(e.g. val-0000.tar\), not for --split "
                                          r"train: add --split val"):
        adopt(only_val, tmp_path / "refused", AdoptOptions())
    assert not (tmp_path / "refused" / "dataset.json").exists()


def _labeled_tar(path: Path, count: int, label: int = 0) -> None:
    write_tar(path, [m for i in range(count)
                     for m in ((f"s{i}.jpg", image_bytes("jpg")), (f"s{i}.cls", b"%d" % label))])


def test_tars_under_a_linked_folder_are_adopted(tmp_path):
    """Path.rglob does not follow linked folders: a set spread over linked disks lost their tars, said nowhere
    (every folder linked: "no .tar files found ... it is empty"). A link back up the tree is listed once."""
    _labeled_tar(tmp_path / "src" / "local-000.tar", 3)
    _labeled_tar(tmp_path / "elsewhere" / "part1" / "remote-000.tar", 4)
    (tmp_path / "src" / "part1").symlink_to(tmp_path / "elsewhere" / "part1", target_is_directory=True)
    (tmp_path / "src" / "loop").symlink_to(tmp_path / "src", target_is_directory=True)
    result = adopt(tmp_path / "src", tmp_path / "out", AdoptOptions(split="train", workers=1))
    assert result.manifest.splits["train"].samples == 7
    assert sorted(s.name for s in result.manifest.splits["train"].shards) == ["local-000.tar", "part1/remote-000.tar"]


def test_adopting_over_a_converted_split_or_converting_over_an_adopted_one_is_refused(tmp_path, capsys):
    """`adopt --split train` into a converted train-only set replaced it (and gave the adopted labels the old set's
    class names); a conversion into a folder holding an adopted split wrote a manifest without it. Both silent."""
    from tests.unit.test_shards import _class_folder_tree

    src = _class_folder_tree(tmp_path / "images", per_class=3)
    converted = tmp_path / "converted"
    assert main(["shards", "folder", "--src", str(src), "--out", str(converted), "--workers", "1"]) == 0
    _labeled_tar(tmp_path / "tars" / "train-000.tar", 3)
    before = (converted / "dataset.json").read_text()
    with pytest.raises(SourceError, match="already holds split 'train' converted by `mixmae shards`"):
        adopt(tmp_path / "tars", converted, AdoptOptions(split="train", workers=1))
    assert (converted / "dataset.json").read_text() == before
    adopted = tmp_path / "adopted"
    _labeled_tar(tmp_path / "valtars" / "val-000.tar", 2)
    adopt(tmp_path / "valtars", adopted, AdoptOptions(split="val", workers=1))
    capsys.readouterr()
    assert main(["shards", "folder", "--src", str(src), "--out", str(adopted), "--workers", "1"]) == 2
    assert "holds 1 split adopted with `mixmae shards adopt` (val)" in capsys.readouterr().err
    assert list(json.loads((adopted / "dataset.json").read_text())["splits"]) == ["val"]


def test_tars_that_hold_no_sample_are_said_to_be_empty_not_over_the_rejection_ceiling(tmp_path):
    """found 0 was "0 of 0 rejected (all), above --max-rejected; accept them with --max-rejected 1", which
    failed the same way again."""
    write_tar(tmp_path / "src" / "train-000.tar", [])
    with pytest.raises(SourceError, match=r"no sample of its 1 tar can be read"):
        adopt(tmp_path / "src", tmp_path / "out", AdoptOptions(split="train", workers=1, max_rejected=1))


def test_an_output_folder_that_cannot_be_written_is_one_line_not_a_traceback(tmp_path, capsys):
    _labeled_tar(tmp_path / "src" / "train-000.tar", 2)
    (tmp_path / "a-file").write_text("not a folder")
    assert main(["shards", "adopt", str(tmp_path / "src"), "--out", str(tmp_path / "a-file" / "out"),
                 "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert f"mixmae: error: writing the indexes to {tmp_path / 'a-file' / 'out'} failed: " in err
    assert "Traceback" not in err and err.endswith("then run the same command again to resume\n")


def test_frames_whose_names_share_a_dotted_key_count_as_the_images_they_are_and_say_why(tmp_path):
    """clip7.f0001.jpg ... share the key 'clip7' (webdataset's rule: the name up to its first dot): one sample with
    no plain image extension, rejected as one of 201 samples (0.5%, under the 1% ceiling), so 30 of 230 images were
    lost with exit 0. Each image it held now counts, and the reason says what happened."""
    members = [m for i in range(200) for m in ((f"s{i:03d}.jpg", image_bytes("jpg")), (f"s{i:03d}.cls", b"1"))]
    members += [(f"clip7.f{i:04d}.jpg", image_bytes("jpg")) for i in range(30)]
    write_tar(tmp_path / "src" / "train-000.tar", members)
    with pytest.raises(TooManyRejected, match=r"train: 30 of 230 samples \(and unreadable tars\) rejected .*30 x "
                                              r"\"N images share the key"):
        adopt(tmp_path / "src", tmp_path / "out", AdoptOptions(split="train", workers=1))
    row = json.loads((tmp_path / "out" / "rejected.jsonl").read_text().splitlines()[0])
    assert row["images"] == 30 and "a key is the name up to its first dot" in row["reason"]
    result = adopt(tmp_path / "src", tmp_path / "out", AdoptOptions(split="train", workers=1, max_rejected=0.2))
    assert result.manifest.splits["train"].samples == 200


def test_a_key_with_a_double_slash_under_a_prefix_stays_in_the_bucket():
    """Listing `data//x.tar` under `s3://bucket/data` gives `/x.tar`, which join turned into the local /x.tar."""
    listed = "/x.tar"
    assert storage.join("s3://bucket/data", listed) == "s3://bucket/data//x.tar"
    assert storage.join("s3://bucket/data/", "y/z.tar") == "s3://bucket/data/y/z.tar"
    assert storage.join("/local/set", "/elsewhere/a.tar") == "/elsewhere/a.tar"  # an adopted set's absolute names
    assert storage.join("/local/set", "s3://b/k.tar") == "s3://b/k.tar"


def test_cls_values_that_are_ids_not_class_indexes_are_refused_and_unlabeled_adopts_them_reading_nothing_again(
        tmp_path, monkeypatch, capsys):
    """A cls of 14,000,000 (an id, not an index) made a classes.json of 14,000,001 entries. Refused naming the tar
    and the value, with the indexes kept; --unlabeled adopts the set for pretraining without reading a tar again."""
    write_tar(tmp_path / "src" / "a.tar", [(f"s{i}.{ext}", data) for i in range(3)
                                          for ext, data in (("jpg", image_bytes("jpg")), ("cls", b"7"))])
    write_tar(tmp_path / "src" / "b.tar", [("t0.jpg", image_bytes("jpg")), ("t0.cls", b"14000000")])
    out = tmp_path / "out"
    argv = ["shards", "adopt", str(tmp_path / "src"), "--out", str(out), "--workers", "1"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "train: cls reaches 14000000 in b.tar: classes.json would list 14,000,001 classes" in error
    assert "--unlabeled" in error and not (out / "dataset.json").exists()
    monkeypatch.setattr(adopt_module, "index_shard", lambda job: pytest.fail(f"{job.name} read again"))
    assert main([*argv, "--unlabeled"]) == 0
    split = load_split(out, "train")
    assert split.samples == 4 and not split.labeled


def test_decode_rejects_images_dali_cannot_decode_naming_their_format(tmp_path):
    """GIF, TGA and ICO decode with Pillow but not with DALI's decoder: --decode passed them and training stopped."""
    def encoded(format: str) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, format=format)
        return buf.getvalue()

    members = [("good.jpg", encoded("JPEG")), ("bitmap.jpg", encoded("BMP")), ("anim.jpg", encoded("GIF")),
               ("targa.png", encoded("TGA")), ("icon.jpg", encoded("ICO"))]
    write_tar(tmp_path / "src" / "part-0.tar", members)
    result = adopt(tmp_path / "src", tmp_path / "out", AdoptOptions(decode=True, max_rejected=1.0))
    assert result.manifest.splits["train"].samples == 2  # JPEG and BMP, which DALI reads
    reasons = {r["key"]: r["reason"] for r in map(json.loads, (tmp_path / "out" / "rejected.jsonl").read_text()
                                                                .splitlines()) if "key" in r}
    assert set(reasons) == {"anim", "targa", "icon"}
    for key, format in (("anim", "GIF"), ("targa", "TGA"), ("icon", "ICO")):
        assert f"image is {format}, which DALI's decoder does not read" in reasons[key]
    adopt(tmp_path / "src", tmp_path / "plain", AdoptOptions(max_rejected=1.0))  # without decoding: all indexed
    errors = verify(tmp_path / "plain", decode=True)["errors"]
    assert len(errors) == 3 and all("which DALI's decoder does not read" in e for e in errors), errors


def test_a_rerun_after_tars_vanished_warns_naming_them_and_the_samples_lost(wds_sets, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(wds_sets / "shardwriter", src)
    out = tmp_path / "adopted"
    first = adopt(src, out, AdoptOptions())
    before = first.manifest.splits["train"].samples
    lost = next(e.samples for e in first.manifest.splits["train"].shards if e.name == "shard-000001.tar")
    (src / "shard-000001.tar").unlink()  # a disk not mounted, a prefix moved
    assert main(["shards", "adopt", str(src), "--out", str(out)]) == 0
    warning = capsys.readouterr().err
    assert "WARNING train: 1 tar of the manifest is no longer in" in warning and "shard-000001.tar" in warning
    assert f"their {lost} indexed samples leave it ({before} before)" in warning
    assert load_split(out, "train").samples == before - lost
    again = adopt(src, out, AdoptOptions())  # said once: the manifest no longer holds them
    assert not [w for w in again.warnings if "no longer in" in w]


def test_compressed_tars_are_warned_about_by_name_saying_to_decompress(wds_sets, tmp_path, capsys):
    import gzip

    src = tmp_path / "src"
    shutil.copytree(wds_sets / "shardwriter", src)
    (src / "extra-000009.tar.gz").write_bytes(gzip.compress((src / "shard-000001.tar").read_bytes()))
    (src / "extra-000010.tgz").write_bytes(gzip.compress((src / "shard-000002.tar").read_bytes()))
    assert main(["shards", "adopt", str(src), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "WARNING 2 compressed tars ignored (extra-000009.tar.gz, extra-000010.tgz)" in err
    assert "decompress them" in err
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(src / "extra-000009.tar.gz", only)
    with pytest.raises(SourceError, match=r"no \.tar files found.*1 compressed tar ignored.*gunzip"):
        adopt(only, tmp_path / "out2", AdoptOptions())


def test_a_tar_in_directory_order_counts_its_keys_once_and_says_to_retar_sorted(tmp_path):
    """`tar cf x.tar .` writes members in directory order: a key's jpg and cls apart. Each run was counted as a
    sample ("40 of 40 samples rejected" for 20 images) and the way out offered was --max-rejected 1."""
    members = [(f"{i:03d}.jpg", image_bytes("jpg")) for i in range(20)] + [(f"{i:03d}.cls", b"1") for i in range(20)]
    write_tar(tmp_path / "src" / "part-0.tar", members)
    with pytest.raises(TooManyRejected) as refused:
        adopt(tmp_path / "src", tmp_path / "out", AdoptOptions())
    message = str(refused.value)
    assert "every one of its 20 samples (and unreadable tars) was rejected: no --max-rejected keeps any" in message
    assert "20 of them are keys whose members are apart in the tar" in message and "tar --sort=name" in message
    lines = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert len(lines) == 20 and all(sorted(r["members"]) == [f"{r['key']}.cls", f"{r['key']}.jpg"] for r in lines)


def test_cls_must_be_plain_decimal_digits_or_minus_one_and_a_refusal_names_the_tar_and_key(tmp_path):
    """int() read "-3" (counted unlabeled at adoption, class -3 in training) and "1_000" (class 1000)."""
    values = {"good": b"3\n", "unlabeled": b"-1", "negative": b"-3", "underscore": b"1_000", "plus": b"+7",
              "arabic": "\u0663".encode(), "padded": b" 12 "}
    write_tar(tmp_path / "src" / "part-0.tar",
              [m for key, value in values.items() for m in ((f"{key}.jpg", image_bytes("jpg")), (f"{key}.cls", value))])
    adopt(tmp_path / "src", tmp_path / "out", AdoptOptions(max_rejected=1.0))
    rows = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    rejected = {r["key"]: r for r in rows}
    assert set(rejected) == {"negative", "underscore", "plus", "arabic"}
    for key, row in rejected.items():
        assert row["shard"] == "part-0.tar" and f"sample '{key}': cls" in row["reason"], row
        assert "is not a class index: plain decimal digits" in row["reason"]
    assert load_split(tmp_path / "out", "train").samples == 3


def test_the_reader_refuses_a_cls_that_is_not_a_plain_index():
    from mixmae_scale.data.labels import parse_cls

    assert [parse_cls(b"0"), parse_cls(b"42\n"), parse_cls(b"-1")] == [0, 42, -1]
    for bad in (b"-3", b"1_000", b"+7", b"3.0", b"", b"n01440764"):
        with pytest.raises(ValueError, match="is not a class index"):
            parse_cls(bad)


def test_verify_of_an_s3_set_names_a_tar_replaced_or_deleted_in_the_bucket_after_adoption_in_one_line_each(
        tmp_path, s3_bucket):
    """A tar rewritten at another size is one line with both sizes, as on disk (not one line per sample that the
    shorter object no longer holds at its offsets); a deleted one is named by its URL."""
    import boto3

    client = boto3.client("s3")
    for n in range(3):
        _labeled_tar(tmp_path / f"{n}.tar", 4)
        client.upload_file(str(tmp_path / f"{n}.tar"), s3_bucket, f"src/{n}.tar")
    src, out = f"s3://{s3_bucket}/src", f"s3://{s3_bucket}/set"
    adopt(src, out, AdoptOptions())
    assert verify(out)["ok"]
    size = (tmp_path / "1.tar").stat().st_size
    client.put_object(Bucket=s3_bucket, Key="src/1.tar", Body=(tmp_path / "1.tar").read_bytes()[:size // 2])
    client.delete_object(Bucket=s3_bucket, Key="src/2.tar")
    assert verify(out)["errors"] == [
        f"{src}/1.tar: {size // 2} bytes, the manifest says {size}: the tar changed since it was indexed",
        f"{src}/2.tar: GET failed: no such object",
        "split train: 4 samples in readable shards, the manifest says 12"]


def test_tars_with_odd_key_names_in_a_bucket_adopt_and_verify(tmp_path, s3_bucket):
    """Keys as other tools and people name them: a space, '+', '#', '?', '%', non-ASCII letters, a double slash."""
    import boto3

    _labeled_tar(tmp_path / "x.tar", 2)
    names = ["a b.tar", "c+d.tar", "h#1.tar", "q?x=1.tar", "p%20q.tar", "é ü.tar", "sub//dbl.tar"]
    for name in names:
        boto3.client("s3").upload_file(str(tmp_path / "x.tar"), s3_bucket, f"src/{name}")
    src, out = f"s3://{s3_bucket}/src", f"s3://{s3_bucket}/set"
    manifest = adopt(src, out, AdoptOptions()).manifest
    assert sorted(s.name for s in manifest.splits["train"].shards) == sorted(names)
    assert manifest.splits["train"].samples == 2 * len(names)
    assert verify(out)["ok"]


def test_hidden_tars_are_said_skipped_by_name_and_why_not_counted_as_ignored_files(tmp_path, capsys):
    """A set copied from a Mac holds an AppleDouble `._x.tar` beside each tar; they were skipped, and the summary said
    only `ignored files beside the tars: {'.tar': 2}`: neither which files nor why."""
    src = tmp_path / "src"
    _labeled_tar(src / "shard-000.tar", 3)
    _labeled_tar(src / "shard-001.tar", 3)
    for name in ("._shard-000.tar", "._shard-001.tar", ".tar", "part/._shard-002.tar"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(b"\x00\x05\x16\x07 Mac OS X metadata")
    (src / "_stats.json").write_text("{}")
    assert main(["shards", "adopt", str(src), "--out", str(tmp_path / "out")]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train: ")]
    assert line.endswith("; ignored files beside the tars: {'.json': 1}; 4 hidden tars skipped (._shard-000.tar, "
                         "._shard-001.tar, .tar and 1 more): a name starting with '.' is a hidden file, such as the "
                         "AppleDouble '._*' files macOS leaves beside copied files, not a shard; rename a real shard "
                         "without the leading dot")
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(src / "._shard-000.tar", only)
    with pytest.raises(SourceError, match=r"no \.tar files found \(searched recursively\)\. 1 hidden tar "
                                          r"skipped \(\._shard-000\.tar\): a name starting with '\.' is a hidden file"):
        adopt(only, tmp_path / "out2", AdoptOptions())


def test_a_file_named_tar_that_is_not_one_is_said_for_what_it_is_with_the_way_out(tmp_path):
    """A Hugging Face webdataset cloned without git-lfs holds 130-byte pointer files named 00000.tar; a gzip stream
    named .tar (webdataset's TarWriter(compress=True)), a failed download's HTML page, a zip: each was 'not a tar
    archive (truncated header)' or '(invalid header)', and the refusal offered --max-rejected 1. Each is said for
    what its bytes are, with the command that gets the real tar, and the summary groups the tars by that."""
    import gzip

    from mixmae_scale.shards.rejection_limit import reason_counts
    from mixmae_scale.shards.tar_index import index_tar

    good = tmp_path / "good.tar"
    write_tar(good, [("a.jpg", image_bytes("jpg")), ("a.cls", b"0")])
    pointer = (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258da"
               b"aa5e2ca24d17e2393\nsize 1073741824\n")
    html = b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head><body>" + b"x" * 600 + b"</body></html>\n"
    problems = {name: index_tar(io.BytesIO(data)).problem for name, data in {
        "pointer": pointer, "gzip": gzip.compress(good.read_bytes()), "html": html,
        "zip": b"PK\x03\x04" + b"\0" * 600}.items()}
    assert problems["pointer"].startswith("a Git LFS pointer file, not the tar") and "git lfs pull" in \
        problems["pointer"], problems
    assert problems["gzip"].startswith("gzip-compressed data named .tar") and "gunzip" in problems["gzip"], problems
    assert problems["html"].startswith("an HTML page, not a tar") and "download it again" in problems["html"], problems
    assert problems["zip"].startswith("a ZIP archive"), problems
    assert "'a Git LFS pointer file, not the tar'" in reason_counts(list(problems.values()))
    assert index_tar(io.BytesIO(good.read_bytes())).problem == ""


def test_a_split_with_every_unit_rejected_is_not_offered_a_ceiling_that_keeps_nothing(tmp_path):
    """Every tar an LFS pointer: the refusal said "or accept them with --max-rejected 1", and that command then
    failed with "no sample of its 2 tars can be read". A split rejected whole is told that no ceiling keeps any of
    it; a split rejected in part beside it still gets the ceiling that accepts it."""
    from mixmae_scale.shards.rejection_limit import check_every_split

    for name in ("00000.tar", "00001.tar"):
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / name).write_bytes(b"version https://git-lfs.github.com/spec/v1\nsize 10\n")
    with pytest.raises(TooManyRejected) as caught:
        adopt(tmp_path / "src", tmp_path / "out", AdoptOptions(split="train", workers=1))
    said = str(caught.value)
    assert "--max-rejected 1" not in said and "accept them" not in said, said
    assert "train: every one of its 2 samples (and unreadable tars) was rejected: no --max-rejected keeps any" in said
    with pytest.raises(SourceError, match="no sample of its 2 tars can be read"):  # what the old advice led to
        adopt(tmp_path / "src", tmp_path / "out", AdoptOptions(split="train", workers=1, max_rejected=1))
    with pytest.raises(TooManyRejected) as both:
        check_every_split([("train", 10, ["bad"] * 3), ("val", 2, ["bad"] * 2)], 0.01, "rejected.jsonl")
    assert "or accept them with --max-rejected 0.3" in str(both.value) and "val: every one of its 2" in str(both.value)


def test_a_tar_with_no_readable_sample_weighs_as_a_tar_against_the_ceiling(tmp_path):
    """10 tars of 200 samples and one Git LFS pointer named 00010.tar: the pointer counted as 1 of 2,001 rejected
    (0.05%, under 1%), so a tenth of the set was lost with exit 0 and a summary's '1 tar cut or unreadable'. A tar
    from which nothing can be read is also a share of the split's tars: 1 of 11 is above the ceiling, said so."""
    for t in range(10):
        write_tar(tmp_path / "src" / f"{t:05d}.tar", [m for i in range(200) for m in (
            (f"{t}_{i:04d}.jpg", image_bytes("jpg")), (f"{t}_{i:04d}.cls", str(i % 2).encode()))])
    (tmp_path / "src" / "00010.tar").write_bytes(b"version https://git-lfs.github.com/spec/v1\nsize 10\n")
    with pytest.raises(TooManyRejected) as caught:
        adopt(tmp_path / "src", tmp_path / "out", AdoptOptions(workers=1))
    said = str(caught.value)
    assert "train: 1 of 11 tars rejected (9.1%), above --max-rejected 0.01: 1 x 'a Git LFS pointer file, not the tar'" \
        in said, said
    assert said.endswith("or accept them with --max-rejected 0.1"), said
    result = adopt(tmp_path / "src", tmp_path / "out", AdoptOptions(workers=1, max_rejected=0.1))
    assert result.manifest.splits["train"].samples == 2000 and result.done_now == 0


def test_tars_inside_a_hidden_folder_are_skipped_as_hidden_tars_are(tmp_path):
    """A drive's `.Trash-1000/files/old.tar` (a deleted shard) was adopted into the set: only a tar whose own name
    starts with a dot was hidden. A tar under a hidden folder is skipped and named as hidden tars are."""
    src = tmp_path / "src"
    _labeled_tar(src / "shard-000.tar", 3)
    _labeled_tar(src / ".Trash-1000" / "files" / "shard-old.tar", 3)
    result = adopt(src, tmp_path / "out", AdoptOptions(workers=1))
    entry = result.manifest.splits["train"]
    assert [s.name for s in entry.shards] == ["shard-000.tar"] and entry.samples == 3
    assert entry.counts["hidden_tars"] == 1 and entry.counts["hidden_tar_names"] == [".Trash-1000/files/shard-old.tar"]
    assert "in a hidden folder" in adopt_module.hidden_note(1, [".Trash-1000/files/shard-old.tar"])


def test_a_tar_that_holds_no_sample_is_named_in_the_summary(tmp_path, capsys):
    """img2dataset writes a tar for a shard whose downloads all failed: no member, or only .txt/.json. It left the set
    unsaid: the summary read '2 shards (3 indexed now)' and no count or name told which tar held nothing."""
    src = tmp_path / "src"
    _labeled_tar(src / "00000.tar", 3)
    _labeled_tar(src / "00001.tar", 3)
    write_tar(src / "00002.tar", [])
    assert main(["shards", "adopt", str(src), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train: ")]
    assert "2 shards (3 indexed now)" in line and "; 1 tar holds no sample (00002.tar)" in line, line
    counts = json.loads((tmp_path / "out" / "dataset.json").read_text())["splits"]["train"]
    assert counts["empty_tars"] == 1 and counts["empty_tar_names"] == ["00002.tar"], counts


def test_a_rerun_over_a_set_that_held_a_tar_of_a_hidden_folder_says_it_is_skipped_not_gone(wds_sets, tmp_path,
                                                                                          monkeypatch):
    """A set adopted before hidden folders were skipped holds `.Trash-1000/files/shard-000001.tar`; the rerun said
    that tar was 'no longer in' the source, 'if they moved or a mount is missing, put them back', though it lies
    where it was: it is skipped now, as in a hidden folder, and the warning says so."""
    src = tmp_path / "src"
    shutil.copytree(wds_sets / "shardwriter", src)
    (src / ".Trash-1000" / "files").mkdir(parents=True)
    (src / "shard-000001.tar").rename(src / ".Trash-1000" / "files" / "shard-000001.tar")
    out = tmp_path / "adopted"
    with monkeypatch.context() as older:  # as the older version listed tars: only a dotted name was hidden
        older.setattr(adopt_module, "_hidden", lambda name: name.rsplit("/", 1)[-1].startswith("."))
        first = adopt(src, out, AdoptOptions())
    assert ".Trash-1000/files/shard-000001.tar" in [e.name for e in first.manifest.splits["train"].shards]
    again = adopt(src, out, AdoptOptions())
    said = " ".join(again.warnings)
    assert "no longer in" not in said and "put them back" not in said, said
    assert ".Trash-1000/files/shard-000001.tar" in said and "hidden folder" in said, said


def test_member_names_with_spaces_are_rejected_naming_the_tar_and_member_with_the_way_out(tmp_path, capsys):
    """A hand-made tar of `n01440764 1.jpg` and its cls: webdataset's key is `n01440764 1`, and DALI's index, whose
    fields are space-separated (its own wds2idx writes the name as it is), cannot hold it. Every sample was rejected
    and the refusal grouped them as `member name '...' has whitespace or non-UTF-N bytes, whic...`: neither the tar
    nor the member, nor what to do."""
    jpg = image_bytes("jpg")
    write_tar(tmp_path / "src" / "train-000000.tar", [
        *[(f"n01440764 {i}.{ext}", data) for i in range(4) for ext, data in (("jpg", jpg), ("cls", b"0"))]])
    out = tmp_path / "out"
    assert main(["shards", "adopt", str(tmp_path / "src"), "--out", str(out), "--workers", "1"]) == 2
    error = capsys.readouterr().err
    assert ("train: 4 samples rejected for whitespace in their member names (e.g. 'n01440764 0.jpg' in "
            "train-000000.tar): DALI's index separates its fields by spaces and cannot hold them; extract the tar and "
            "convert its images with `mixmae shards folder` (it names the samples itself), or rename the members "
            "without whitespace (e.g. spaces to '_') and write the tar again") in error, error
    assert "4 x \"member name '...' has whitespace\"" in error, error
    rows = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [row["members"] for row in rows][0] == ["n01440764 0.jpg", "n01440764 0.cls"]
    # Beside good samples, within the ceiling: adopted, and the same line said as a warning.
    write_tar(tmp_path / "mixed" / "train-000000.tar", [
        *[(f"n01440764_{i}.{ext}", data) for i in range(3) for ext, data in (("jpg", jpg), ("cls", b"0"))],
        ("n01440764 9.jpg", jpg), ("n01440764 9.cls", b"0")])
    result = adopt(tmp_path / "mixed", tmp_path / "mixed-out", AdoptOptions(max_rejected=0.5))
    assert result.manifest.splits["train"].samples == 3
    assert any(w.startswith("train: 1 sample rejected for whitespace in its member names (e.g. 'n01440764 9.jpg' in "
                            "train-000000.tar)") for w in result.warnings), result.warnings


def test_tar_file_names_that_are_not_utf8_are_refused_naming_them_before_anything_is_written(tmp_path, capsys):
    """A tar named in Latin-1 (`caf\\xe9.tar`) was adopted: dataset.json held its name as a lone surrogate (JSON that
    strict readers refuse), and evaluation then stopped on a UnicodeEncodeError inside DALI's pipeline (the PyTorch
    loader in sample_id), naming no file. Refused like a converted image's name: the bytes escaped, convmv."""
    src = tmp_path / "src"
    _labeled_tar(src / "ok-000.tar", 2)
    _labeled_tar(src / os.fsdecode(b"caf\xe9.tar"), 2)
    _labeled_tar(src / os.fsdecode(b"d\xfcr") / "000.tar", 2)  # a folder's name: named once, as the folder
    out = tmp_path / "out"
    assert main(["shards", "adopt", str(src), "--out", str(out), "--workers", "1"]) == 2
    error = capsys.readouterr().err
    assert error.strip().splitlines()[-1] == (
        f"mixmae: error: {src}: 2 tar names are not UTF-8 (the bytes that are not shown escaped): 'caf\\xe9.tar', "
        "'d\\xfcr/'; a tar's name is written into dataset.json as text, which every loader reads it by: rename them "
        f"in UTF-8 (for names written in Latin-1: `convmv -r -f latin1 -t utf8 --notest {src}`) and run the same "
        "command again"), error
    assert not out.exists() or not any(out.iterdir())


def test_tar_file_names_with_whitespace_adopt_and_verify_as_they_are(tmp_path):
    """A tar's file name is not in its DALI index (only member names are, space-separated): `part 1.tar` adopts,
    its index is DALI's own, and verify reads it back. Reading it through DALI and the PyTorch loader:
    tests/integration/test_loader.py."""
    src = tmp_path / "src"
    _labeled_tar(src / "part 1.tar", 2)
    _labeled_tar(src / "sub dir" / "tab\tname.tar", 2)
    manifest = adopt(src, tmp_path / "out", AdoptOptions()).manifest
    assert sorted(s.name for s in manifest.splits["train"].shards) == ["part 1.tar", "sub dir/tab\tname.tar"]
    assert index_lines(tmp_path / "out", "train/part 1.idx") == wds2idx(src / "part 1.tar", tmp_path)
    assert verify(tmp_path / "out")["ok"]
