"""Shard conversion on real files made here: odd inputs, labels, determinism, resume, verification."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from mixmae_scale.shards.convert import ConvertOptions, convert, parse_size
from mixmae_scale.shards.jpeg_check import prepare_image, scan_jpeg
from mixmae_scale.shards.sources import SourceError
from mixmae_scale.shards.verify import verify


def _jpeg(path: Path, colour=(200, 30, 30), size=(64, 48), mode="RGB", **save) -> bytes:
    image = Image.new(mode, size, colour if mode != "L" else 128)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **save)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _imagenet_tree(root: Path, per_class: int = 3, classes=("n01", "n02", "n03")) -> Path:
    for c, wnid in enumerate(classes):
        for i in range(per_class):
            _jpeg(root / "train" / wnid / f"{wnid}_{i}.JPEG", colour=(40 * c, 100, 10 * i))
            _jpeg(root / "val" / wnid / f"{wnid}_val_{i}.JPEG", colour=(40 * c, 50, 10 * i))
    return root


def _samples(out: Path, split: str) -> dict[str, dict]:
    found = {}
    for tar_path in sorted(out.glob(f"{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                found.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return found


def test_odd_inputs_are_converted_or_rejected_and_counted(tmp_path):
    src = tmp_path / "src"
    cls = src / "train" / "n01"
    _jpeg(cls / "good.JPEG")
    _jpeg(cls / "cmyk.JPEG", colour=(10, 200, 30, 0), mode="CMYK")
    _jpeg(cls / "gray.JPEG", mode="L")
    _jpeg(cls / "progressive.JPEG", progressive=True)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, format="PNG")
    (cls / "png_inside.JPEG").write_bytes(buf.getvalue())
    full = _jpeg(cls / "nested" / "deeper" / "nested.JPEG", size=(200, 200))
    (cls / "truncated.JPEG").write_bytes(full[: len(full) // 2])
    (cls / "empty.JPEG").write_bytes(b"")
    (cls / "notes.JPEG").write_text("this is not an image")
    _jpeg(src / "val" / "n01" / "v.JPEG")
    out = tmp_path / "out"
    manifest = convert(src, out, ConvertOptions(layout="imagenet", samples_per_shard=4, shard_bytes=None,
                                                max_rejected=1.0)).manifest.to_dict()
    train = manifest["splits"]["train"]
    assert train["found"] == 9 and train["samples"] == 6 and train["rejected"] == 3
    assert train["copied"] == 2  # good.JPEG and nested/deeper/nested.JPEG
    assert sum(train["converted"].values()) == 4
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    reasons = {Path(r["source"]).name: r["reason"] for r in rejected}
    assert set(reasons) == {"truncated.JPEG", "empty.JPEG", "notes.JPEG"}
    assert "zero-byte" in reasons["empty.JPEG"] and "truncated" in reasons["truncated.JPEG"]
    for sample in _samples(out, "train").values():
        header = scan_jpeg(sample["jpg"])
        assert header is not None and header.components == 3 and header.sof in (0xC0, 0xC1)
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            assert image.mode == "RGB"
        meta = json.loads(sample["json"])
        assert meta["wnid"] == "n01" and int(sample["cls"]) == 0 and meta["width"] > 0
    assert verify(out, decode=True)["ok"]


def test_strict_stops_at_the_first_bad_file_and_names_it(tmp_path):
    src = tmp_path / "src"
    _jpeg(src / "train" / "n01" / "a.JPEG")
    (src / "train" / "n01" / "b.JPEG").write_bytes(b"")
    with pytest.raises(ValueError, match="b.JPEG: zero-byte file"):
        convert(src, tmp_path / "out", ConvertOptions(layout="imagenet", splits=("train",), strict=True))


def test_labels_follow_sorted_wnids_and_flat_validation_files(tmp_path):
    src = _imagenet_tree(tmp_path / "src", per_class=2, classes=("n03", "n01", "n02"))
    # Replace val/ by a flat folder labelled by Kaggle's CSV.
    for path in (src / "val").rglob("*.JPEG"):
        path.unlink()
    for wnid in ("n01", "n02", "n03"):
        (src / "val" / wnid).rmdir()
    rows = ["ImageId,PredictionString"]
    for i, wnid in enumerate(["n02", "n03", "n01", "n02"]):
        _jpeg(src / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
        rows.append(f"ILSVRC2012_val_{i + 1:08d},{wnid} 1 2 3 4")
    (src / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    (src / "LOC_synset_mapping.txt").write_text("n01 tench, Tinca tinca\nn02 goldfish\nn03 shark\n")
    out = tmp_path / "out"
    manifest = convert(src, out, ConvertOptions(layout="imagenet")).manifest.to_dict()
    assert [c["wnid"] for c in manifest["classes"]] == ["n01", "n02", "n03"]
    assert manifest["classes"][0]["name"] == "tench, Tinca tinca"
    labels = {json.loads(s["json"])["source"]: int(s["cls"]) for s in _samples(out, "val").values()}
    assert labels == {"val/ILSVRC2012_val_00000001.JPEG": 1, "val/ILSVRC2012_val_00000002.JPEG": 2,
                      "val/ILSVRC2012_val_00000003.JPEG": 0, "val/ILSVRC2012_val_00000004.JPEG": 1}
    train = {json.loads(s["json"])["source"]: int(s["cls"]) for s in _samples(out, "train").values()}
    assert all(label == ["n01", "n02", "n03"].index(Path(src_path).parent.name) for src_path, label in train.items())


def test_devkit_ground_truth_maps_ids_through_the_devkit_order(tmp_path):
    src = _imagenet_tree(tmp_path / "src", per_class=1)
    for path in (src / "val").rglob("*.JPEG"):
        path.unlink()
    for wnid in ("n01", "n02", "n03"):
        (src / "val" / wnid).rmdir()
    for i in range(3):
        _jpeg(src / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    # The devkit numbers classes in its own order: ID 1 = n03, 2 = n01, 3 = n02.
    (src / "ILSVRC2012_devkit_order.txt").write_text("n03\nn01\nn02\n")
    (src / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n2\n3\n")
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(layout="imagenet"))
    labels = {json.loads(s["json"])["source"]: json.loads(s["json"])["wnid"] for s in _samples(out, "val").values()}
    assert labels == {"val/ILSVRC2012_val_00000001.JPEG": "n03", "val/ILSVRC2012_val_00000002.JPEG": "n01",
                      "val/ILSVRC2012_val_00000003.JPEG": "n02"}


def test_clear_errors_for_wrong_layouts(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(SourceError, match="not an ImageNet layout: expected"):
        convert(tmp_path / "photos", tmp_path / "out", ConvertOptions(layout="imagenet"))
    src = _imagenet_tree(tmp_path / "src", per_class=1)
    (src / "train" / "n09").mkdir()
    with pytest.raises(SourceError, match=r"1 class folder without images: n09"):
        convert(src, tmp_path / "out2", ConvertOptions(layout="imagenet", splits=("train",)))
    (src / "train" / "n09").rmdir()
    with pytest.raises(SourceError, match="inside the source folder"):
        convert(src, src / "shards", ConvertOptions(layout="imagenet"))
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_flat_unlabeled_folder(tmp_path):
    for i in range(5):
        _jpeg(tmp_path / "flat" / f"img{i}.jpg")
    split = convert(tmp_path / "flat", tmp_path / "out", ConvertOptions(layout="folder", splits=("train",))
                    ).manifest.splits["train"]
    assert split.samples == 5 and not split.labeled
    assert all(s["cls"] == b"-1" for s in _samples(tmp_path / "out", "train").values())


def test_linked_subfolders_are_followed_once_unlabeled_and_inside_class_folders(tmp_path):
    from mixmae_scale.shards.sources import folder_images

    for disk, name in (("disk1", "a"), ("disk2", "b")):
        _jpeg(tmp_path / disk / name / "deep.jpg")
    _jpeg(tmp_path / "flat" / "own" / "top.jpg")
    (tmp_path / "flat" / "part1").symlink_to(tmp_path / "disk1", target_is_directory=True)
    (tmp_path / "flat" / "part2").symlink_to(tmp_path / "disk2", target_is_directory=True)
    (tmp_path / "flat" / "own" / "loop").symlink_to(tmp_path / "flat", target_is_directory=True)  # no loop, no twice
    images, _ = folder_images(tmp_path / "flat", unlabeled=True)
    assert sorted(image.rel for image in images) == ["own/top.jpg", "part1/a/deep.jpg", "part2/b/deep.jpg"]

    _jpeg(tmp_path / "classes" / "cat" / "c.jpg")
    _jpeg(tmp_path / "classes" / "dog" / "d.jpg")
    (tmp_path / "classes" / "cat" / "more").symlink_to(tmp_path / "disk1", target_is_directory=True)
    images, classes = folder_images(tmp_path / "classes")
    assert classes == ["cat", "dog"]
    assert sorted((image.rel, image.label) for image in images) == [
        ("cat/c.jpg", 0), ("cat/more/a/deep.jpg", 0), ("dog/d.jpg", 1)]


def test_img2dataset_files_output_is_not_read_as_classes_and_unlabeled_converts_every_image(tmp_path, capsys):
    """img2dataset's `files` output (00000/000000000.jpg with .json and .txt, 00000_stats.json, 00000.parquet)
    was converted as classes "00000", "00001": labels that were download shard numbers."""
    from mixmae_scale.cli import main

    src = tmp_path / "download"
    for shard in range(2):
        (src / f"{shard:05d}_stats.json").parent.mkdir(parents=True, exist_ok=True)
        (src / f"{shard:05d}_stats.json").write_text("{}")
        (src / f"{shard:05d}.parquet").write_bytes(b"PAR1")
        for i in range(3):
            key = f"{shard:05d}{i:04d}"
            _jpeg(src / f"{shard:05d}" / f"{key}.jpg", colour=(60 * shard, 20 * i, 5))
            (src / f"{shard:05d}" / f"{key}.json").write_text('{"status": "success"}')
            (src / f"{shard:05d}" / f"{key}.txt").write_text("a caption")
    argv = ["shards", "folder", "--src", str(src), "--out", str(tmp_path / "out"), "--workers", "1"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "00000/ beside 00000_stats.json is img2dataset's `files` output" in error and "--unlabeled" in error
    assert main([*argv, "--unlabeled"]) == 0
    split = json.loads((tmp_path / "out" / "dataset.json").read_text())["splits"]["train"]
    assert split["samples"] == 6 and not split["labeled"]
    assert all(s["cls"] == b"-1" for s in _samples(tmp_path / "out", "train").values())


def test_same_input_gives_byte_identical_shards_and_seed_changes_order(tmp_path):
    src = _imagenet_tree(tmp_path / "src", per_class=5)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    options = ConvertOptions(layout="imagenet", samples_per_shard=4, shard_bytes=None)
    sums = lambda result: [s.sha256 for s in result.manifest.splits["train"].shards]  # noqa: E731
    manifest_a = convert(src, a, replace(options, workers=2))
    manifest_b = convert(src, b, options)
    manifest_c = convert(src, c, replace(options, seed=1))
    assert sums(manifest_a) == sums(manifest_b)
    assert sums(manifest_a) != sums(manifest_c)
    assert (a / "train-000000.idx").read_text() == (b / "train-000000.idx").read_text()


def test_resume_with_other_options_is_refused(tmp_path):
    src = _imagenet_tree(tmp_path / "src", per_class=2)
    convert(src, tmp_path / "out", ConvertOptions(layout="imagenet", samples_per_shard=2, shard_bytes=None))
    with pytest.raises(SourceError, match="--samples-per-shard 2 there, 3 now"):
        convert(src, tmp_path / "out", ConvertOptions(layout="imagenet", samples_per_shard=3, shard_bytes=None))


def test_resume_with_other_options_names_each_option_by_its_flag_with_both_values(tmp_path):
    """`mixmae shards folder ... --val-fraction 0.3` over a folder begun with 0.5 said `other options (val_fraction)`:
    neither the value the folder was begun with, which resuming needs, nor the flag to give it with."""
    src = _imagenet_tree(tmp_path / "src", per_class=2)
    begun = ConvertOptions(layout="imagenet", samples_per_shard=2, shard_bytes=None, max_pixels=1_000_000,
                           resize_shorter=32)
    convert(src, tmp_path / "out", begun)
    with pytest.raises(SourceError) as caught:
        convert(src, tmp_path / "out", replace(begun, quality=90, max_pixels=None, resize_shorter=None, strict=True,
                                                workers=2))
    said = str(caught.value)
    for words in ("--quality 95 there, 90 now", "--max-megapixels 1 there, 0 (no limit) now",
                  "--resize-shorter 32 there, not given now", "--strict: not given there, given now",
                  f"{tmp_path / 'out'} holds shards made with other options"):
        assert words in said, said
    assert "workers" not in said and "\n" not in said


def test_killed_conversion_resumes_to_the_same_bytes(tmp_path):
    src = _imagenet_tree(tmp_path / "src", per_class=40)
    reference = convert(src, tmp_path / "ref", ConvertOptions(layout="imagenet", samples_per_shard=5,
                                                              shard_bytes=None, splits=("train",))).manifest.to_dict()
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mixmae_scale.cli", "shards", "imagenet", "--src", str(src), "--out", str(out),
           "--split", "train", "--samples-per-shard", "5"]
    # Slow each shard down so the kill lands mid-run (the hook only sleeps; the writing is the real code).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent / "helpers"),
                                                                     os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd + ["--workers", "1"], env={**env, "MIXMAE_TEST_SHARD_DELAY": "0.15"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((out / ".progress").glob("train-*.json"))) < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / ".progress").glob("train-*.json")))
    assert 4 <= done_before < len(reference["splits"]["train"]["shards"])
    assert not (out / "dataset.json").exists()
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "done earlier" in result.stderr
    resumed = json.loads((out / "dataset.json").read_text())
    assert [s["sha256"] for s in resumed["splits"]["train"]["shards"]] == [
        s["sha256"] for s in reference["splits"]["train"]["shards"]]
    assert not list(out.glob("*.tmp*"))
    assert verify(out)["ok"]


def test_verify_finds_corruption(tmp_path):
    src = _imagenet_tree(tmp_path / "src", per_class=2)
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(layout="imagenet"))
    shard = out / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = verify(out)
    assert not report["ok"] and any("sha256" in e for e in report["errors"])
    (out / "train-000000.idx").write_text("")  # an emptied index is one finding, not the end of the check
    report = verify(out)
    assert not report["ok"] and any(e.startswith(f"{out / 'train-000000.idx'}: empty") for e in report["errors"])


def test_prepare_image_keeps_good_jpeg_bytes(tmp_path):
    data = _jpeg(tmp_path / "x.jpg")
    assert prepare_image(data).data == data
    resized = prepare_image(_jpeg(tmp_path / "big.jpg", size=(400, 300)), resize_shorter=100)
    assert (resized.width, resized.height) == (133, 100) and resized.action == "resized"


def _dali_decode(data: bytes):
    """The image as DALI's CPU decoder gives it (RGB uint8), the reference for every pixel conversion."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def graph():
        encoded = fn.external_source(source=lambda: [np.frombuffer(data, np.uint8)], batch=True)
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

    pipe = graph()
    pipe.build()
    return np.array(pipe.run()[0][0]).astype(float)


def test_sixteen_bit_and_float_images_are_scaled_as_dali_decodes_them_not_saturated(tmp_path):
    import numpy as np

    gradient = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    buf = io.BytesIO()
    Image.fromarray(gradient).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    prepared = prepare_image(buf.getvalue())
    assert prepared.action == "converted:PNG (I;16)"
    written = np.asarray(Image.open(io.BytesIO(prepared.data)).convert("RGB"), dtype=float)
    assert abs(written.mean() - _dali_decode(buf.getvalue()).mean()) < 1.0  # convert("RGB") gave 254.4 vs 127.5

    unit = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    buf = io.BytesIO()
    Image.fromarray(unit, mode="F").save(buf, format="TIFF")
    prepared = prepare_image(buf.getvalue())
    written = np.asarray(Image.open(io.BytesIO(prepared.data)).convert("RGB"), dtype=float)
    assert abs(written.mean() - _dali_decode(buf.getvalue()).mean()) < 1.0  # convert("RGB") gave 0

    buf = io.BytesIO()
    Image.fromarray(unit * 255, mode="F").save(buf, format="TIFF")  # DALI would clip it to white
    prepared = prepare_image(buf.getvalue())
    assert prepared.action == "rejected" and "mode F" in prepared.reason and "0..1" in prepared.reason


def test_a_converted_jpeg_is_counted_with_its_format_and_mode():
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="JPEG", progressive=True)
    assert prepare_image(buf.getvalue()).action == "converted:progressive or non-baseline JPEG (JPEG RGB)"


def test_every_re_encoded_image_keeps_its_exif_orientation_tag_as_a_copied_one_does():
    """Baseline JPEGs are copied with their orientation tag; progressive, CMYK, gray and PNG sources, resized and
    downscaled ones were re-encoded without it, so data.exif_orientation rotated some images of a set and not
    others."""
    def tagged(format: str, mode: str = "RGB", **save) -> bytes:
        exif = Image.Exif()
        exif[0x0112] = 6
        buf = io.BytesIO()
        Image.new(mode, (96, 48), 128 if mode in ("L", "CMYK") else (0, 0, 255)).save(buf, format=format,
                                                                                      exif=exif.tobytes(), **save)
        return buf.getvalue()

    cases = {"baseline": (tagged("JPEG"), {}), "progressive": (tagged("JPEG", progressive=True), {}),
             "cmyk": (tagged("JPEG", "CMYK"), {}), "gray": (tagged("JPEG", "L"), {}), "png": (tagged("PNG"), {}),
             "resized": (tagged("JPEG"), {"resize_shorter": 24}), "downscaled": (tagged("JPEG"), {"max_pixels": 1000})}
    for name, (data, options) in cases.items():
        prepared = prepare_image(data, **options)
        assert prepared.data is not None, (name, prepared.reason)
        assert Image.open(io.BytesIO(prepared.data)).getexif().get(0x0112) == 6, (name, prepared.action)
    untagged = io.BytesIO()
    Image.new("RGB", (32, 32)).save(untagged, format="PNG")
    assert 0x0112 not in Image.open(io.BytesIO(prepare_image(untagged.getvalue()).data)).getexif()


def test_index_matches_dalis_own_wds2idx_and_shards_read_with_webdataset(tmp_path):
    import webdataset as wds
    from wds2idx import IndexCreator

    src = _imagenet_tree(tmp_path / "src", per_class=4)
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(layout="imagenet", samples_per_shard=5, shard_bytes=None))
    for tar_path in sorted(out.glob("*.tar")):
        dali_idx = tmp_path / (tar_path.stem + ".dali.idx")
        with IndexCreator(str(tar_path), str(dali_idx), verbose=False) as creator:
            creator.create_index()
        assert (out / f"{tar_path.stem}.idx").read_text() == dali_idx.read_text()
    keys = [s["__key__"] for s in wds.WebDataset(str(out / "train-{000000..000002}.tar"), shardshuffle=False)]
    assert len(keys) == len(set(keys)) == 12


def _class_folder_tree(root: Path, per_class: int = 10, classes=("cat", "dog", "eel")) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            _jpeg(root / name / f"{name}_{i}.jpg", colour=(60 * c, 20 * i, 90))
    buf = io.BytesIO()
    Image.new("RGBA", (32, 32), (1, 2, 3, 255)).save(buf, format="PNG")
    (root / "cat" / "drawing.png").write_bytes(buf.getvalue())
    return root


def _split_sources(out: Path, split: str) -> dict[str, int]:
    return {json.loads(s["json"])["source"]: int(s["cls"]) for s in _samples(out, split).values()}


def test_folder_val_fraction_holds_out_each_class_with_the_seed_and_says_it_readably(tmp_path, capsys):
    from mixmae_scale.cli import main

    src = _class_folder_tree(tmp_path / "src")
    args = ["shards", "folder", "--src", str(src), "--val-fraction", "0.2", "--workers", "1",
            "--samples-per-shard", "8"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("train: found 25 = written 25 + rejected 0; 24 copied as they are, 1 converted (PNG: 1); "
                        "4 shards")  # cat has 11 images: 9 train, 2 val; dog and eel 8 + 2
    assert lines[1] == ("val (held out: 20% of each class): found 6 = written 6 + rejected 0; 6 copied as they are, "
                        "0 converted; 1 shard")
    train, val = _split_sources(tmp_path / "a", "train"), _split_sources(tmp_path / "a", "val")
    assert not set(train) & set(val) and len(train) + len(val) == 31
    assert sorted(val.values()) == [0, 0, 1, 1, 2, 2]  # stratified: two of each class
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert _split_sources(tmp_path / "b", "val") == val  # the same seed draws the same split
    assert main([*args, "--seed", "1", "--out", str(tmp_path / "c")]) == 0
    assert _split_sources(tmp_path / "c", "val") != val
    capsys.readouterr()
    assert main(["shards", "folder", "--src", str(src), "--out", str(tmp_path / "d"), "--val-fraction", "1.5"]) == 2
    assert "--val-fraction 1.5: must lie in [0, 1)" in capsys.readouterr().err


def test_a_val_fraction_conversion_resumed_on_a_changed_folder_writes_no_file_to_both_splits(tmp_path, capsys):
    """The partition was drawn again over the folder as it was on each run, with one generator for every class:
    one image added moved files across, and a rerun wrote 11 of 41 files to both splits (exit 0). The partition a
    conversion began with now holds; only the new files are drawn. Both splits' plans are saved before any shard
    (val's was saved after train's shards, so an interruption during train drew val again)."""
    from mixmae_scale.cli import main
    from mixmae_scale.shards.convert import ConversionSource
    from mixmae_scale.shards.saved_plan import plan_url

    src = _class_folder_tree(tmp_path / "src", per_class=20, classes=("cat", "dog"))
    out = tmp_path / "out"
    options = ConvertOptions(layout="folder", splits=("train", "val"), val_fraction=0.2, workers=1,
                             samples_per_shard=8)
    ConversionSource(src, str(out), options).discover()
    assert all(Path(plan_url(str(out), split)).exists() for split in ("train", "val"))
    args = ["shards", "folder", "--src", str(src), "--out", str(out), "--val-fraction", "0.2", "--workers", "1",
            "--samples-per-shard", "8"]
    assert main(args) == 0
    before = {split: set(_split_sources(out, split)) for split in ("train", "val")}
    _jpeg(src / "cat" / "cat_00_new.jpg", colour=(1, 2, 3))  # sorts first: every later file's draw moved
    for i in range(5):
        _jpeg(src / "dog" / f"dog_new_{i}.jpg", colour=(3, 2, i))
    capsys.readouterr()
    assert main(args) == 0
    assert "the source changed since this conversion began" in capsys.readouterr().err
    train, val = set(_split_sources(out, "train")), set(_split_sources(out, "val"))
    assert not train & val and len(train) + len(val) == 41 + 6
    assert before["train"] <= train and before["val"] <= val  # nothing written before moved
    assert len(val - before["val"]) == 1  # round(0.2 x 5) of dog's new files; cat's one new file trains


def test_a_val_fraction_conversion_with_unreadable_images_says_the_share_val_keeps_after_rejections(tmp_path, capsys):
    """The draw of --val-fraction is made from the file list, before any image is read: unreadable files it held out
    are rejected while writing, and val ended under its share while the summary said `held out: 20% of each class`
    alone. The summary and dataset.json say what each split kept and lost."""
    from mixmae_scale.cli import main

    src = _class_folder_tree(tmp_path / "src")  # 31 files: cat 11, dog 10, eel 10
    args = ["shards", "folder", "--src", str(src), "--val-fraction", "0.2", "--workers", "1", "--max-rejected", "0.5"]
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    val, train = sorted(_split_sources(tmp_path / "clean", "val")), sorted(_split_sources(tmp_path / "clean", "train"))
    for number, rel in enumerate([*val[:3], train[0]]):  # 3 of val's 6 and 1 of train's 25 made unreadable
        (src / rel).write_bytes(b"\xff\xd8\xff\xe0 truncated %d" % number)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("val (held out: 20% of each class): found 6 = written 3 + rejected 3;"), lines
    assert lines[2] == ("val: held out 6 of the 31 images drawn (19.4%); after the rejections (train 1, val 3) it "
                        "holds 3 of the 27 images written (11.1%), under the share drawn (rejected.jsonl names the "
                        "files)"), lines
    manifest = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert manifest["splits"]["val"]["held_out"] == {
        "drawn": {"train": 25, "val": 6}, "written": {"train": 24, "val": 3}, "rejected": {"train": 1, "val": 3},
        "share_drawn": round(6 / 31, 4), "share_written": round(3 / 27, 4)}
    clean = json.loads((tmp_path / "clean" / "dataset.json").read_text())["splits"]["val"]["held_out"]
    assert clean["share_written"] == clean["share_drawn"] == round(6 / 31, 4)


def test_a_val_fraction_that_holds_out_nothing_is_refused_saying_why(tmp_path, capsys):
    """round(0.1 x 5) is 0 (half to even): the val split was empty, and the rejection ceiling said "0 of 0 files
    rejected (all)" and suggested a --max-rejected that could not help."""
    from mixmae_scale.cli import main

    src = _class_folder_tree(tmp_path / "src", per_class=4, classes=("cat", "dog"))
    assert main(["shards", "folder", "--src", str(src), "--out", str(tmp_path / "out"), "--val-fraction", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "--val-fraction 0.1 holds out no image" in err and "the largest has 5" in err and "max-rejected" not in err


def test_another_src_into_a_converted_folder_is_refused_and_the_same_folder_moved_resumes(tmp_path, capsys):
    """Neither the options nor the plan recorded --src: converting B into A's output folder merged the two sets
    (B's images taken as files that appeared), with one WARNING. The same images at another path (a mount point
    that differs between nodes) resume, said."""
    from mixmae_scale.cli import main

    a = _class_folder_tree(tmp_path / "a", per_class=3)
    b = _class_folder_tree(tmp_path / "b", per_class=3, classes=("cat", "dog", "eel"))
    for image in b.rglob("*.jpg"):
        _jpeg(image, colour=(9, 9, 9), size=(70, 50))  # other images under the same names
    out = tmp_path / "out"
    args = ["--out", str(out), "--workers", "1"]
    assert main(["shards", "folder", "--src", str(a), *args]) == 0
    before = (out / "dataset.json").read_text()
    capsys.readouterr()
    assert main(["shards", "folder", "--src", str(b), *args]) == 2
    err = capsys.readouterr().err
    assert f"holds a conversion of {a.resolve()}, not of --src {b}" in err and f"resume with --src {a.resolve()}" in err
    assert (out / "dataset.json").read_text() == before
    moved = a.rename(tmp_path / "a-moved")
    assert main(["shards", "folder", "--src", str(moved), *args]) == 0
    assert "taken as the same folder moved" in capsys.readouterr().err
    assert json.loads((out / "dataset.json").read_text())["splits"]["train"]["samples"] == 10


def test_image_names_are_those_torchvision_image_folder_accepts():
    """A file ImageFolder would skip (notes.txt) is ignored and counted, never a rejected image."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from mixmae_scale.shards.sources import IMAGE_SUFFIXES

    assert set(IMAGE_SUFFIXES) == set(IMG_EXTENSIONS)


def test_a_shard_is_on_the_disk_before_its_progress_record_says_it_is_done(tmp_path, monkeypatch):
    """A resume skips the shards its records call done, so a power loss between a tar's rename and its flush
    would leave a short tar that no rerun rewrites: the tar is fsync'd before its rename, the folder after it
    (the rename itself), and only then is the record written. Events are read off os.fsync and os.replace."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace_(src, dst, *args, **kwargs):
        events.append(("replace", str(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace_)
    for i in range(3):
        _jpeg(tmp_path / "flat" / f"img{i}.jpg")
    out = (tmp_path / "out").resolve()
    convert(tmp_path / "flat", out, ConvertOptions(layout="folder", splits=("train",)))
    tar = str(out / "train-000000.tar")
    record = next(str(p) for p in out.rglob("train-000000.json"))
    renamed, recorded = events.index(("replace", tar)), events.index(("replace", record))
    assert ("fsync", f"{tar}.tmp") in events[:renamed], events
    assert ("fsync", str(out)) in events[renamed:recorded], events



def _shard_contents(out: Path, named: dict[bytes, str], split: str = "train") -> list[list[tuple[str, int]]]:
    """Each shard's stored images, shard by shard, as (source name, stored bytes); `named` maps a source's bytes
    to its name (copied images are stored as read), so a failure lists names rather than bytes."""
    shards = []
    for tar_path in sorted(out.glob(f"{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            stored = [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
        shards.append([(named.get(data, "not a source"), len(data)) for data in stored])
    return shards


def test_shard_size_cuts_shards_by_the_images_bytes_and_keeps_every_image_once(tmp_path, capsys):
    """`--shard-size` (ConvertOptions.shard_bytes) cuts a split where the next image's bytes would take the
    shard past the limit. Seven copied images of near-equal size under a limit of 2.5 images: two per shard,
    four shards, and the stored bytes of every shard within the limit (copied images are stored as read)."""
    from mixmae_scale.cli import main

    named = {_jpeg(tmp_path / "src" / f"img{i}.jpg", colour=(30 * i, 200 - 20 * i, 90)): f"img{i}" for i in range(7)}
    sizes = [len(data) for data in named]
    assert len(named) == 7  # seven distinct files
    limit = int(2.5 * sum(sizes) / len(sizes))
    assert 2 * max(sizes) <= limit < 3 * min(sizes)  # the images are as alike in size as this test needs
    out = tmp_path / "out"
    assert main(["shards", "folder", "--src", str(tmp_path / "src"), "--out", str(out), "--workers", "1",
                 "--shard-size", str(limit)]) == 0
    capsys.readouterr()
    shards = _shard_contents(out, named)
    assert sorted(len(s) for s in shards) == [1, 2, 2, 2], shards
    assert all(sum(size for _, size in shard) <= limit for shard in shards), (limit, shards)
    assert sorted(name for shard in shards for name, _ in shard) == sorted(named.values())


def test_an_image_larger_than_the_shard_size_gets_a_shard_of_its_own(tmp_path):
    """The cut happens before an image that would overflow a non-empty shard, so an image larger than the
    limit is never refused or split: it starts a shard and the next image starts another. Every other shard
    stays within the limit, and is cut only where the next image would not have fitted."""
    import random as random_module

    named = {_jpeg(tmp_path / "src" / f"img{i}.jpg", colour=(30 * i, 200 - 20 * i, 90)): f"img{i}" for i in range(7)}
    limit = int(2.5 * max(len(data) for data in named))
    buf = io.BytesIO()
    Image.frombytes("RGB", (96, 96), random_module.Random(0).randbytes(96 * 96 * 3)).save(buf, format="JPEG")
    (tmp_path / "src" / "large.jpg").write_bytes(buf.getvalue())
    named[buf.getvalue()] = "large"
    assert len(buf.getvalue()) > limit
    out = tmp_path / "out"
    convert(tmp_path / "src", out, ConvertOptions(layout="folder", splits=("train",), shard_bytes=limit))
    shards = _shard_contents(out, named)
    assert [("large", len(buf.getvalue()))] in shards, shards
    for shard in shards:
        assert [name for name, _ in shard] == ["large"] or sum(size for _, size in shard) <= limit, (limit, shards)
    for shard, following in zip(shards, shards[1:], strict=False):
        # no cut before an image that fitted
        assert sum(size for _, size in shard) + following[0][1] > limit, (limit, shards)
    assert sorted(name for shard in shards for name, _ in shard) == sorted(named.values())


def test_kaggle_layout_finds_its_labels_and_names_at_the_challenge_root(tmp_path):
    # Kaggle's imagenet-object-localization-challenge: the CSVs at the top, the images three folders down.
    root = tmp_path / "imagenet-object-localization-challenge"
    src = _imagenet_tree(root / "ILSVRC" / "Data" / "CLS-LOC", per_class=1, classes=("n01", "n02"))
    for wnid in ("n01", "n02"):
        for path in (src / "val" / wnid).iterdir():
            path.unlink()
        (src / "val" / wnid).rmdir()
    _jpeg(src / "val" / "ILSVRC2012_val_00000001.JPEG")
    _jpeg(src / "val" / "ILSVRC2012_val_00000002.JPEG")
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000002,n01 1 2 3 4 \n"
                                               "ILSVRC2012_val_00000001,n02 1 2 3 4 n02 5 6 7 8 \n")
    (root / "LOC_synset_mapping.txt").write_text("n01 tench, Tinca tinca\nn02 goldfish, Carassius auratus\n")
    out = tmp_path / "out"
    manifest = convert(src, out, ConvertOptions(layout="imagenet")).manifest.to_dict()
    assert [c.get("name") for c in manifest["classes"]] == ["tench, Tinca tinca", "goldfish, Carassius auratus"]
    labels = {json.loads(s["json"])["source"]: int(s["cls"]) for s in _samples(out, "val").values()}
    assert labels == {"val/ILSVRC2012_val_00000001.JPEG": 1, "val/ILSVRC2012_val_00000002.JPEG": 0}


def test_flat_val_without_labels_names_the_folders_searched(tmp_path):
    src = _imagenet_tree(tmp_path / "src", per_class=1, classes=("n01",))
    (src / "val" / "n01" / "n01_val_0.JPEG").rename(src / "val" / "ILSVRC2012_val_00000001.JPEG")
    (src / "val" / "n01").rmdir()
    with pytest.raises(SourceError, match=r"looked in .*src.*; put LOC_val_solution.csv"):
        convert(src, tmp_path / "out", ConvertOptions(layout="imagenet"))


def test_class_tars_left_unextracted_in_train_are_refused_not_dropped(tmp_path):
    # ILSVRC2012_img_train.tar holds one tar per class; a loop extracting them that stopped left some as tars,
    # which were skipped as files not named like images: fewer classes, every later class index shifted.
    src = _imagenet_tree(tmp_path / "src", per_class=1, classes=("n01", "n03"))
    with tarfile.open(src / "train" / "n02.tar", "w") as tar:
        tar.add(src / "train" / "n01" / "n01_0.JPEG", arcname="n02_0.JPEG")
    with pytest.raises(SourceError, match=r"n02.tar: a class tar not extracted.*mkdir n02 && tar xf n02.tar -C n02"):
        convert(src, tmp_path / "out", ConvertOptions(layout="imagenet", splits=("train",)))
    for wnid in ("n01", "n03"):
        for path in (src / "train" / wnid).iterdir():
            path.unlink()
        (src / "train" / wnid).rmdir()
    with pytest.raises(SourceError, match=r"1 class tar not extracted \(n02.tar\)"):
        convert(src, tmp_path / "out", ConvertOptions(layout="imagenet", splits=("train",)))


def test_a_split_converted_later_joins_the_set(tmp_path):
    """`--split train` first (the error for a flat val without labels suggests it), `--split val` once the labels
    are there: the second run was refused ('other options (splits)'), leaving only a full reconversion."""
    src = _imagenet_tree(tmp_path / "src", per_class=2)
    out = tmp_path / "out"
    first = convert(src, out, ConvertOptions(layout="imagenet", splits=("train",), samples_per_shard=2,
                                             shard_bytes=None)).manifest
    train_tars = {p.name: p.read_bytes() for p in out.glob("train-*.tar")}
    second = convert(src, out, ConvertOptions(layout="imagenet", splits=("val",), samples_per_shard=2,
                                              shard_bytes=None)).manifest.to_dict()
    assert list(second["splits"]) == ["train", "val"] and second["options"]["splits"] == ["train", "val"]
    assert second["splits"]["train"] == first.to_dict()["splits"]["train"]
    assert second["splits"]["val"]["samples"] == 6 and second["classes"] == first.to_dict()["classes"]
    assert {p.name: p.read_bytes() for p in out.glob("train-*.tar")} == train_tars
    assert verify(out, decode=True)["ok"]
    # Both at once, after: nothing is rewritten; other options are still refused.
    again = convert(src, out, ConvertOptions(layout="imagenet", samples_per_shard=2, shard_bytes=None))
    assert again.done_now == 0 and again.manifest.to_dict()["splits"] == second["splits"]
    with pytest.raises(SourceError, match=r"other options \(--quality 95 there, 80 now\)"):
        convert(src, out, ConvertOptions(layout="imagenet", splits=("val",), samples_per_shard=2, shard_bytes=None,
                                         quality=80))
    # A split added after the class folders changed would mean other classes by the same labels: refused.
    _jpeg(src / "train" / "n00" / "n00_0.JPEG")
    _jpeg(src / "val" / "n00" / "n00_val_0.JPEG")
    with pytest.raises(SourceError, match=r"holds train, converted with other classes"):
        convert(tmp_path / "src", out, ConvertOptions(layout="imagenet", splits=("val",), samples_per_shard=2,
                                                      shard_bytes=None))


def test_a_split_converted_later_joins_a_set_on_s3(tmp_path, s3_bucket):
    """The join above into an s3:// prefix (a real S3-protocol server on the loopback): the second run finds the
    first one's manifest, options record, plans and rejected.jsonl in the store, not in a folder, and the set
    verifies as one. A train rejection is there so that rejected.jsonl's kept lines are read back from S3 too."""
    from mixmae_scale.data import storage

    src = _imagenet_tree(tmp_path / "src", per_class=2)
    (src / "train" / "n02" / "empty.JPEG").write_bytes(b"")
    url = f"s3://{s3_bucket}/imagenet-wds"
    options = ConvertOptions(layout="imagenet", splits=("train",), samples_per_shard=2, shard_bytes=None,
                             staging=str(tmp_path / "staging"), max_rejected=0.5)
    first = convert(src, url, options).manifest.to_dict()
    assert list(first["splits"]) == ["train"] and first["splits"]["train"]["samples"] == 6
    assert first["splits"]["train"]["rejected"] == 1
    train_tars = {f.name: storage.read_bytes(f"{url}/{f.name}") for f in storage.list_files(url, ".tar")}
    assert sorted(train_tars) == [s["name"] for s in first["splits"]["train"]["shards"]]

    second = convert(src, url, replace(options, splits=("val",))).manifest.to_dict()
    stored = json.loads(storage.read_text(f"{url}/dataset.json"))
    assert stored["splits"] == second["splits"] and list(second["splits"]) == ["train", "val"]
    assert second["options"]["splits"] == ["train", "val"]
    assert second["splits"]["train"] == first["splits"]["train"]
    assert second["splits"]["val"]["samples"] == 6 and second["splits"]["val"]["rejected"] == 0
    assert [c["wnid"] for c in second["classes"]] == ["n01", "n02", "n03"] == [c["wnid"] for c in first["classes"]]
    assert json.loads(storage.read_text(f"{url}/classes.json")) == second["classes"]
    assert {f.name: storage.read_bytes(f"{url}/{f.name}") for f in storage.list_files(url, ".tar")
            if f.name.startswith("train-")} == train_tars
    rejected = [json.loads(line) for line in storage.read_text(f"{url}/rejected.jsonl").splitlines()]
    assert [(r["split"], r["source"]) for r in rejected] == [("train", "train/n02/empty.JPEG")]
    report = verify(url, decode=True)
    assert report["ok"], report["errors"]
    assert report["splits"] == {"train": {"samples": 6, "shards": len(train_tars), "decoded": 6},
                                "val": {"samples": 6, "shards": 3, "decoded": 6}}

    # Class folders changed since train was converted: val would label other classes by the same indexes.
    _jpeg(src / "train" / "n00" / "n00_0.JPEG")
    _jpeg(src / "val" / "n00" / "n00_val_0.JPEG")
    with pytest.raises(SourceError, match=rf"s3://{s3_bucket}/imagenet-wds holds train, converted with other "
                                          r"classes than .* \(3 then, 4 now; class 0 differs\)"):
        convert(src, url, replace(options, splits=("val",)))
    assert json.loads(storage.read_text(f"{url}/dataset.json")) == stored


def test_a_val_fraction_that_leaves_classes_out_of_val_warns_naming_them(tmp_path, capsys):
    """A folder of 7 images (cats 4, dogs 3) at --val-fraction 0.15 held out 1 cat and no dog, and said `val (held
    out: 15% of each class)`: the fine-tuning's and eval's top-1 then covered one class of two without a word."""
    from mixmae_scale.cli import main

    src = _class_folder_tree(tmp_path / "src", per_class=3)  # cat 4 (with its drawing.png), dog 3, eel 3
    assert main(["shards", "folder", "--src", str(src), "--out", str(tmp_path / "out"), "--val-fraction", "0.15",
                 "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert ("WARNING val: 2 of 3 classes have no image in it (dog, eel): --val-fraction 0.15 holds out "
            "round(0.15 x a class's images), 0 for these (3 images); a top-1 on 'val' does not cover them: raise "
            "--val-fraction (each class keeps one image for training)") in err
    assert sorted(_split_sources(tmp_path / "out", "val").values()) == [0]
    capsys.readouterr()
    assert main(["shards", "folder", "--src", str(src), "--out", str(tmp_path / "every"), "--val-fraction", "0.3",
                 "--workers", "1"]) == 0
    assert "no image in it" not in capsys.readouterr().err  # every class held out: nothing to say


def test_images_in_hidden_folders_are_not_part_of_the_set_and_the_folders_are_said(tmp_path):
    """Hidden files were skipped, but the images inside hidden folders were converted as the class's own: a
    `.thumbs/` of thumbnails (each image twice, once small), a drive's `.Trash-1000/` (deleted photos trained on)."""
    _jpeg(tmp_path / "src" / "cat" / "a.jpg")
    _jpeg(tmp_path / "src" / "cat" / ".thumbs" / "a_small.jpg", size=(16, 12))
    _jpeg(tmp_path / "src" / "dog" / "b.jpg", colour=(10, 200, 10))
    _jpeg(tmp_path / "flat" / "x.jpg")
    _jpeg(tmp_path / "flat" / ".Trash-1000" / "files" / "deleted.jpg")
    labeled = convert(tmp_path / "src", tmp_path / "out1", ConvertOptions(layout="folder", splits=("train",)))
    flat = convert(tmp_path / "flat", tmp_path / "out2", ConvertOptions(layout="folder", splits=("train",)))
    assert labeled.manifest.splits["train"].samples == 2 and flat.manifest.splits["train"].samples == 1
    assert {s["json"] and json.loads(s["json"])["source"] for s in _samples(tmp_path / "out1", "train").values()} == \
        {"cat/a.jpg", "dog/b.jpg"}
    assert any("1 hidden folder" in note and "cat/.thumbs/" in note for note in labeled.notes), labeled.notes
    assert any("1 hidden folder" in note and ".Trash-1000/" in note for note in flat.notes), flat.notes
    counts = flat.manifest.splits["train"].counts
    assert counts["ignored_not_images"] == 0 and counts["ignored_hidden_folders"] == 1, counts


def test_a_val_labels_csv_saved_with_a_byte_order_mark_and_crlf_reads_its_columns(tmp_path):
    """LOC_val_solution.csv saved by Excel or a Windows editor starts with a UTF-8 byte-order mark: its first column
    read as '\\ufeffImageId', and the conversion was refused with 'expected the columns ImageId,PredictionString',
    which the file visibly has."""
    src = _imagenet_tree(tmp_path / "src", per_class=1, classes=("n01", "n02"))
    shutil.rmtree(src / "val")
    _jpeg(src / "val" / "ILSVRC2012_val_00000001.JPEG")
    (src / "LOC_val_solution.csv").write_bytes(b"\xef\xbb\xbfImageId,PredictionString\r\n"
                                               b"ILSVRC2012_val_00000001,n02 1 2 3 4\r\n")
    (src / "LOC_synset_mapping.txt").write_bytes(b"\xef\xbb\xbfn01 tench\r\nn02 goldfish\r\n")
    out = tmp_path / "out"
    classes = convert(src, out, ConvertOptions(layout="imagenet")).manifest.classes
    assert [int(s["cls"]) for s in _samples(out, "val").values()] == [1]
    assert [c.get("name") for c in classes] == ["tench", "goldfish"], classes
    (src / "LOC_val_solution.csv").write_text("Id,Label\nILSVRC2012_val_00000001,n02\n")
    with pytest.raises(SourceError, match=r"expected the columns ImageId,PredictionString; it has Id, Label"):
        convert(src, tmp_path / "out2", ConvertOptions(layout="imagenet"))


def test_an_output_that_is_a_file_and_an_adopted_tar_named_alone_say_what_to_name_instead(tmp_path):
    """`--out` naming a file failed 'File exists ... free space or fix the folder' (no disk was full); `mixmae shards
    adopt x.tar` said 'a file, not a folder' without the folder to name."""
    from mixmae_scale.shards.adopt import AdoptOptions, adopt

    src = _imagenet_tree(tmp_path / "src", per_class=1)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SourceError, match=rf"--out {tmp_path / 'afile'}: a file, not a folder; name a new or empty "
                                          "folder for the shards"):
        convert(src / "train", tmp_path / "afile", ConvertOptions(layout="folder", splits=("train",)))
    tar = tmp_path / "tars" / "shard-0.tar"
    tar.parent.mkdir()
    with tarfile.open(tar, "w"):
        pass
    with pytest.raises(SourceError, match=rf"{tar}: a file, not a folder: adopt the folder that holds it "
                                          rf"\(`mixmae shards adopt {tar.parent} --out DIR`\)"):
        adopt(tar, tmp_path / "idx", AdoptOptions(workers=1))
