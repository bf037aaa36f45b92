"""No single file stops a conversion: every odd file a scraped folder holds ends in a shard or in
rejected.jsonl with a one-line reason, the counts reconcile, and the output verifies with decoding."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import traceback
from pathlib import Path

import pytest
from PIL import Image

from mixmae_scale.shards import convert as convert_module
from mixmae_scale.shards.convert import ConvertOptions, convert
from mixmae_scale.shards.sources import SourceError
from mixmae_scale.shards.verify import verify


def jpeg(path: Path, size: tuple[int, int] = (64, 48), colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG", quality=90)
    return path


@pytest.fixture
def scraped(tmp_path):
    """Two classes of good images, plus one of each trouble a scraped folder brings."""
    src = tmp_path / "src"
    for cls in ("cats", "dogs"):
        for i in range(3):
            jpeg(src / cls / f"good_{i}.jpg")
    # 16000 x 16000 pixels in a 31 KB file, named like a JPEG (Pillow's DecompressionBombError used to abort).
    Image.new("1", (16000, 16000)).save(src / "cats" / "bomb.JPEG", format="PNG")
    jpeg(src / "dogs" / "huge.jpg", size=(1600, 1250))  # 2 MP, above the 1 MP limit these tests set
    (tmp_path / "notes.txt").write_text("not an image")
    (src / "cats" / "link_to_text.jpg").symlink_to(tmp_path / "notes.txt")
    (src / "cats" / "folder.jpg").mkdir()
    jpeg(src / "dogs" / "chien_été_狗.jpg")
    jpeg(src / "dogs" / "vanishes.jpg")
    locked = jpeg(src / "cats" / "locked.jpg")
    locked.chmod(0)
    return src


def run(src: Path, out: Path, monkeypatch, oversize: str = "downscale") -> dict:
    """Converts with a 1 MP limit; `vanishes.jpg` is deleted after listing, before it is read."""
    discover = convert_module._discover

    def list_then_delete(*args):
        found = discover(*args)
        (src / "dogs" / "vanishes.jpg").unlink(missing_ok=True)
        return found

    monkeypatch.setattr(convert_module, "_discover", list_then_delete)
    return convert(src, out, ConvertOptions(layout="folder", splits=("train",), samples_per_shard=4,
                                            shard_bytes=None, max_pixels=1_000_000, oversize=oversize,
                                            max_rejected=1.0)).manifest.to_dict()


def rejected(out: Path) -> dict[str, str]:
    lines = (out / "rejected.jsonl").read_text().splitlines()
    return {json.loads(line)["source"]: json.loads(line)["reason"] for line in lines}


def test_a_folder_of_troubles_converts_to_completion_and_verifies(scraped, tmp_path, monkeypatch):
    manifest = run(scraped, tmp_path / "out", monkeypatch)
    split = manifest["splits"]["train"]
    reasons = rejected(tmp_path / "out")
    root = os.geteuid() == 0  # root reads a file without read permission
    expected_rejects = {"cats/bomb.JPEG", "cats/link_to_text.jpg", "cats/folder.jpg", "dogs/vanishes.jpg"}
    expected_rejects |= set() if root else {"cats/locked.jpg"}
    assert set(reasons) == expected_rejects, reasons
    assert split["found"] == 6 + 7 and split["found"] == split["samples"] + split["rejected"]
    assert split["samples"] == 6 + 2 + (1 if root else 0)  # good ones, huge (downscaled), non-ASCII, locked
    assert "decompression bomb" in reasons["cats/bomb.JPEG"] and "not decoded" in reasons["cats/bomb.JPEG"]
    assert "not an image" in reasons["cats/link_to_text.jpg"]
    assert "Is a directory" in reasons["cats/folder.jpg"]
    assert "No such file" in reasons["dogs/vanishes.jpg"]
    assert all("\n" not in reason for reason in reasons.values())
    assert split["converted"] == {"converted:downscaled": 1}
    report = verify(tmp_path / "out", decode=True)
    assert report["ok"], report["errors"]


NOBODY = 65534  # the conventional uid and gid of `nobody`


def as_unprivileged(work):
    """`work()`'s JSON-able result, computed as `nobody` when this process is root (CI runs tests as root, and
    root reads a file whatever its permission bits say): in a forked child that drops its groups, gid and uid,
    its result sent back through a pipe. A failure in the child is raised here with the child's traceback."""
    if os.geteuid() != 0:
        return work()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read_end)
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                payload, status = {"result": work()}, 0
            except BaseException:  # noqa: BLE001 - any failure goes back to the test
                payload = {"error": traceback.format_exc()}
            with os.fdopen(write_end, "w") as pipe:
                json.dump(payload, pipe)
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    _, wait_status = os.waitpid(pid, 0)
    payload = json.loads(text) if text else {"error": f"the child sent nothing (wait status {wait_status})"}
    if "error" in payload:
        raise AssertionError(f"the unprivileged conversion failed:\n{payload['error']}")
    return payload["result"]


def test_a_file_without_read_permission_is_rejected_by_name_and_the_others_are_written():
    """A scraped folder often holds a file its owner kept to themselves; the conversion must reject that one file
    with a reason that names it and write the rest. The file is really unreadable: mode 000, and the conversion
    runs as an unprivileged user (as root, the CI case, in a forked child that has dropped to `nobody`; see
    as_unprivileged), so the kernel refuses the open inside the converter's own read, not a stand-in for it.
    The folder is outside pytest's tmp_path, whose parent only root may enter."""
    base = Path(tempfile.mkdtemp(prefix="mixmae-permission-"))
    try:
        base.chmod(0o777)  # `nobody` writes the output here
        src, out = base / "src", base / "out"
        good = [jpeg(src / cls / f"good_{i}.jpg") for cls in ("cats", "dogs") for i in range(2)]
        locked = jpeg(src / "cats" / "locked.jpg")
        for folder in (src, src / "cats", src / "dogs"):
            folder.chmod(0o755)
        for path in good:
            path.chmod(0o644)
        locked.chmod(0)
        options = ConvertOptions(layout="folder", splits=("train",), samples_per_shard=2, shard_bytes=None,
                                 max_rejected=1.0)
        split = as_unprivileged(lambda: convert(src, out, options).manifest.to_dict())["splits"]["train"]
        lines = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
        assert [line["source"] for line in lines] == ["cats/locked.jpg"], lines
        assert "Permission denied" in lines[0]["reason"] and str(locked) in lines[0]["reason"], lines[0]
        assert split["found"] == len(good) + 1 and split["rejected"] == 1
        assert split["samples"] == len(good) == split["found"] - split["rejected"]
        report = verify(out, decode=True)
        assert report["ok"], report["errors"]
    finally:
        shutil.rmtree(base)


def test_oversize_images_are_downscaled_to_the_limit_or_rejected_by_choice(scraped, tmp_path, monkeypatch):
    run(scraped, tmp_path / "down", monkeypatch)
    from mixmae_scale.data.manifest import load_split

    shards = load_split(tmp_path / "down", "train").tars
    import tarfile

    sizes = {}
    for tar in shards:
        with tarfile.open(tar) as handle:
            for member in handle.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(handle.extractfile(member).read())
                    sizes[meta["source"]] = (meta["width"], meta["height"], meta["action"])
    width, height, action = sizes["dogs/huge.jpg"]
    assert width * height <= 1_000_000 and width * height > 0.98e6 and action.startswith("converted:downscaled")
    assert abs(width / height - 1600 / 1250) < 0.01
    (scraped / "dogs" / "vanishes.jpg").parent.mkdir(exist_ok=True)
    jpeg(scraped / "dogs" / "vanishes.jpg")
    run(scraped, tmp_path / "reject", monkeypatch, oversize="reject")
    assert "above the limit of 1 MP" in rejected(tmp_path / "reject")["dogs/huge.jpg"]


def test_an_unexpected_exception_in_one_file_is_a_rejection_not_a_crash(tmp_path, monkeypatch):
    from mixmae_scale.shards import writer

    src = tmp_path / "src"
    for i in range(3):
        jpeg(src / "a" / f"{i}.jpg")

    def explode(data, *args):
        if len(data) and explode.calls == 1:
            explode.calls += 1
            raise MemoryError("cannot allocate\\nthe decoder's buffer")
        explode.calls += 1
        return real(data, *args)

    real, explode.calls = writer.prepare_image, 0
    monkeypatch.setattr(writer, "prepare_image", explode)
    manifest = convert(src, tmp_path / "out", ConvertOptions(layout="folder", splits=("train",), shard_bytes=None,
                                                             samples_per_shard=10, max_rejected=1.0)).manifest.to_dict()
    assert manifest["splits"]["train"]["samples"] == 2 and manifest["splits"]["train"]["rejected"] == 1
    (reason,) = rejected(tmp_path / "out").values()
    assert reason.startswith("could not be processed: MemoryError")


def test_a_link_to_an_image_of_the_set_is_skipped_as_a_duplicate_and_a_link_outside_is_an_image(tmp_path):
    """A link in a class folder to another image of the set was written as a second sample of that image (under
    the link's class): the count said one image more than there is. It is skipped, counted and named with its
    reason; the image itself is kept under its own name even where the link sorts first; a link to a file outside
    the set is an image like any other; found = written + rejected + skipped."""
    from mixmae_scale.shards.convert import summary_lines

    src = tmp_path / "src"
    for i in range(3):
        jpeg(src / "cats" / f"cat_{i}.jpg")
        jpeg(src / "dogs" / f"dog_{i}.jpg", colour=(10, 10, 200))
    (src / "dogs" / "a_cat_again.jpg").symlink_to(src / "cats" / "cat_0.jpg")  # another class's image
    (src / "dogs" / "a_dog_again.jpg").symlink_to(src / "dogs" / "dog_2.jpg")  # sorts before its target
    (src / "dogs" / "outside.jpg").symlink_to(jpeg(tmp_path / "elsewhere" / "dog.jpg"))
    result = convert(src, tmp_path / "out", ConvertOptions(layout="folder", splits=("train",), shard_bytes=None))
    split = result.manifest.to_dict()["splits"]["train"]
    assert (split["found"], split["samples"], split["rejected"], split["skipped_duplicates"]) == (9, 7, 0, 2)
    assert split["skipped_examples"] == [
        {"source": "dogs/a_cat_again.jpg", "reason": "a link to cats/cat_0.jpg, an image already in the set "
                                                     "(skipped, not written twice)"},
        {"source": "dogs/a_dog_again.jpg", "reason": "a link to dogs/dog_2.jpg, an image already in the set "
                                                     "(skipped, not written twice)"}]
    assert summary_lines(result.manifest)[0].startswith("train: found 9 = written 7 + rejected 0 + skipped 2 (already "
                                                        "in the set); ")
    assert result.notes == ["train: skipped 2 files already in the set: dogs/a_cat_again.jpg: a link to "
                            "cats/cat_0.jpg, an image already in the set (skipped, not written twice); "
                            "dogs/a_dog_again.jpg: a link to dogs/dog_2.jpg, an image already in the set (skipped, "
                            "not written twice)"]
    sources = sorted(json.loads(member)["source"] for tar in sorted((tmp_path / "out").glob("train-*.tar"))
                     for member in _json_members(tar))
    assert sources == ["cats/cat_0.jpg", "cats/cat_1.jpg", "cats/cat_2.jpg", "dogs/dog_0.jpg", "dogs/dog_1.jpg",
                       "dogs/dog_2.jpg", "dogs/outside.jpg"]
    assert verify(tmp_path / "out", decode=True)["ok"]


def test_a_val_link_to_a_train_image_is_skipped_naming_the_split_it_is_in(tmp_path):
    """ImageNet's layout: a val file linked to a train image was the same image in both splits (a top-1 on it
    scored a training image)."""
    src = tmp_path / "src"
    for split in ("train", "val"):
        for i in range(2):
            jpeg(src / split / "n01" / f"{split}_{i}.jpg")
    (src / "val" / "n01" / "copy.jpg").symlink_to(src / "train" / "n01" / "train_0.jpg")
    result = convert(src, tmp_path / "out", ConvertOptions(layout="imagenet", shard_bytes=None))
    val = result.manifest.to_dict()["splits"]["val"]
    assert (val["found"], val["samples"], val["skipped_duplicates"]) == (3, 2, 1)
    assert val["skipped_examples"][0]["reason"] == ("a link to train/n01/train_0.jpg (split 'train'), an image "
                                                    "already in the set (skipped, not written twice)")
    for i in range(2):  # a val/ of nothing but links into train/ is no split, not an empty one
        (src / "val" / "n01" / f"val_{i}.jpg").unlink()
        (src / "val" / "n01" / f"val_{i}.jpg").symlink_to(src / "train" / "n01" / f"train_{i}.jpg")
    with pytest.raises(SourceError, match=r"^val: nothing to write: every one of its 3 files is an image already in "
                                          r"the set \(a link to train/n01/train_0.jpg \(split 'train'\)"):
        convert(src, tmp_path / "out2", ConvertOptions(layout="imagenet", shard_bytes=None))


def _json_members(tar: Path) -> list[bytes]:
    import tarfile

    with tarfile.open(tar) as opened:
        return [opened.extractfile(m).read() for m in opened.getmembers() if m.name.endswith(".json")]


def test_with_val_fraction_a_link_is_left_out_before_the_draw(tmp_path):
    """--val-fraction draws from the whole folder: the link is left out first (counted in train, where the folder's
    other skipped files are counted), so it neither takes a val place nor puts one image in both splits."""
    src = tmp_path / "src"
    for cls in ("cats", "dogs"):
        for i in range(4):
            jpeg(src / cls / f"{cls}_{i}.jpg")
    (src / "dogs" / "again.jpg").symlink_to(src / "cats" / "cats_0.jpg")
    result = convert(src, tmp_path / "out", ConvertOptions(layout="folder", shard_bytes=None, val_fraction=0.25))
    splits = result.manifest.to_dict()["splits"]
    assert (splits["train"]["found"], splits["train"]["samples"], splits["train"]["skipped_duplicates"]) == (7, 6, 1)
    assert (splits["val"]["found"], splits["val"]["samples"], "skipped_duplicates" in splits["val"]) == (2, 2, False)


def test_a_linked_folder_onto_another_class_keeps_that_class_s_own_files(tmp_path):
    """cats/more -> dogs/: the dog images reached through the link came first in the listing (cats sorts before
    dogs) and are one real file each with dogs/'s: dogs/ keeps them, under its own class, and the linked copies are
    skipped, said as reached through a linked folder. A source root that is itself under a link is no link here."""
    real = tmp_path / "real"
    for i in range(2):
        jpeg(real / "cats" / f"cat_{i}.jpg")
        jpeg(real / "dogs" / f"dog_{i}.jpg", colour=(10, 10, 200))
    (real / "cats" / "more").symlink_to(real / "dogs")
    (tmp_path / "src").symlink_to(real)  # --src reached through a link
    result = convert(tmp_path / "src", tmp_path / "out", ConvertOptions(layout="folder", splits=("train",),
                                                                        shard_bytes=None))
    split = result.manifest.to_dict()["splits"]["train"]
    assert (split["found"], split["samples"], split["skipped_duplicates"]) == (6, 4, 2)
    assert split["skipped_examples"][0] == {
        "source": "cats/more/dog_0.jpg",
        "reason": "reached through a linked folder: the same file as dogs/dog_0.jpg, an image already in the set "
                  "(skipped, not written twice)"}
    written = {json.loads(m)["source"]: json.loads(m)["label"] for tar in (tmp_path / "out").glob("train-*.tar")
               for m in _json_members(tar)}
    assert written == {"cats/cat_0.jpg": 0, "cats/cat_1.jpg": 0, "dogs/dog_0.jpg": 1, "dogs/dog_1.jpg": 1}


def test_skipped_duplicates_do_not_dilute_the_rejection_ceiling(tmp_path):
    """--max-rejected is a share of the files read: 1 of 4 images is 25% whatever links to them sit beside them.
    The skipped links were counted in what the ceiling divides by, so 6 links made the same 1 bad image 10% and let
    it pass a ceiling of 20%."""
    from mixmae_scale.shards.rejection_limit import TooManyRejected

    src = tmp_path / "src"
    for i in range(3):
        jpeg(src / "cats" / f"cat_{i}.jpg")
    (src / "cats" / "broken.jpg").write_text("not an image")
    for i in range(6):
        (src / "cats" / f"link_{i}.jpg").symlink_to(src / "cats" / f"cat_{i % 3}.jpg")
    with pytest.raises(TooManyRejected, match=r"train: 1 of 4 files rejected \(25\.0%\), above --max-rejected 0\.2"):
        convert(src, tmp_path / "out", ConvertOptions(layout="folder", splits=("train",), shard_bytes=None,
                                                      unlabeled=True, max_rejected=0.2))


def test_a_val_converted_alone_after_train_skips_its_links_into_train(tmp_path):
    """Duplicates were found only among the splits of one run: `--split val` into a set whose train was converted
    earlier kept val's links into train/, training images in the held-out split. The earlier split's saved plan
    names its files; where no plan says them, the run warns that it could not look."""
    src, out = tmp_path / "src", tmp_path / "out"
    for split in ("train", "val"):
        for i in range(2):
            jpeg(src / split / "n01" / f"{split}_{i}.jpg")
    (src / "val" / "n01" / "copy.jpg").symlink_to(src / "train" / "n01" / "train_0.jpg")
    convert(src, out, ConvertOptions(layout="imagenet", shard_bytes=None, splits=("train",)))
    result = convert(src, out, ConvertOptions(layout="imagenet", shard_bytes=None, splits=("val",)))
    val = result.manifest.to_dict()["splits"]["val"]
    assert (val["found"], val["samples"], val.get("skipped_duplicates")) == (3, 2, 1)
    assert val["skipped_examples"][0]["reason"] == ("a link to train/n01/train_0.jpg (split 'train'), an image "
                                                    "already in the set (skipped, not written twice)")
    (out / ".progress" / "plan-train.json.gz").unlink()  # as a set converted before plans were saved
    again = convert(src, tmp_path / "out2", ConvertOptions(layout="imagenet", shard_bytes=None, splits=("train",)))
    (tmp_path / "out2" / ".progress" / "plan-train.json.gz").unlink()
    assert again.manifest.splits["train"].samples == 2
    warned = convert(src, tmp_path / "out2", ConvertOptions(layout="imagenet", shard_bytes=None, splits=("val",)))
    assert any("train" in w and "duplicates" in w and "not recorded" in w for w in warned.warnings), warned.warnings


def test_names_that_are_not_utf8_are_refused_by_name_with_their_bytes_escaped_before_anything_is_written(tmp_path,
                                                                                                          capsys):
    """A folder copied from an old Latin-1 system: `dög/` and `cat/café.jpg` named in Latin-1 bytes. Python lists
    them as surrogate escapes ('d\\udcf6g'), which went into classes.json, dataset.json and each sample's json as
    `"d\\udcf6g"`: a lone surrogate, which strict JSON readers refuse and which stops a print of the class names."""
    from mixmae_scale.cli import main

    src = tmp_path / "src"
    for i in range(3):
        jpeg(src / "cat" / f"cat_{i}.jpg")
        jpeg(Path(os.fsdecode(bytes(src) + b"/d\xf6g")) / f"dog_{i}.jpg")
    jpeg(Path(os.fsdecode(bytes(src) + b"/cat/caf\xe9.jpg")))
    assert sorted(os.listdir(bytes(src))) == [b"cat", b"d\xf6g"]  # real bytes names on disk
    out = tmp_path / "out"
    assert main(["shards", "folder", "--src", str(src), "--out", str(out), "--workers", "1"]) == 2
    error = capsys.readouterr().err
    assert (f"{src}: 2 names are not UTF-8 (the bytes that are not shown escaped): 'cat/caf\\xe9.jpg', 'd\\xf6g/'; a "
            "name is written into dataset.json, classes.json and each sample's json as text: rename them in UTF-8 "
            f"(for names written in Latin-1: `convmv -r -f latin1 -t utf8 --notest {src}`) and run the same command "
            "again") in error, error
    assert "\\udc" not in error and not out.exists()


def test_names_in_utf8_beyond_ascii_are_converted_and_kept_as_written(tmp_path):
    """The refusal of names that are not UTF-8 must not reach names that are: `chien_é/café_0.jpg` in UTF-8 bytes
    converts, its class named as typed in classes.json, and every image written."""
    from mixmae_scale.cli import main

    src = tmp_path / "src"
    for i in range(2):
        jpeg(src / "chat" / f"chat_{i}.jpg")
        jpeg(src / "chien_é" / f"café_{i}.jpg")
    assert b"chien_\xc3\xa9" in os.listdir(bytes(src))  # UTF-8 bytes on disk
    out = tmp_path / "out"
    assert main(["shards", "folder", "--src", str(src), "--out", str(out), "--workers", "1"]) == 0
    classes = json.loads((out / "classes.json").read_text(encoding="utf-8"))
    assert "chien_é" in json.dumps(classes, ensure_ascii=False), classes
    assert json.loads((out / "dataset.json").read_text())["splits"]["train"]["samples"] == 4


def test_a_skipped_file_named_in_latin1_is_listed_escaped_not_a_refusal_of_the_set(tmp_path, capsys):
    """The refusal of names that are not UTF-8 is for names the set is written with (images, class folders): a
    Latin-1 `cat/notes_é.txt`, which the conversion skips as not an image, refused the whole source. It converts,
    and the skipped name is listed and recorded with its byte escaped: the summary prints and dataset.json is strict
    JSON (no lone surrogate)."""
    from mixmae_scale.cli import main

    src = tmp_path / "src"
    for i in range(2):
        jpeg(src / "cat" / f"cat_{i}.jpg")
        jpeg(src / "dog" / f"dog_{i}.jpg")
    Path(os.fsdecode(bytes(src) + b"/cat/notes_\xe9.txt")).write_text("a note")
    out = tmp_path / "out"
    assert main(["shards", "folder", "--src", str(src), "--out", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr()
    assert "cat/notes_\\xe9.txt" in printed.out + printed.err
    manifest = (out / "dataset.json").read_text(encoding="utf-8", errors="strict")
    assert "\\udc" not in manifest and "notes_\\\\xe9.txt" in manifest
    assert json.loads(manifest)["splits"]["train"]["samples"] == 4
