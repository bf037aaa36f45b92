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
