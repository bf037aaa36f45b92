"""Fixes from a review of the shard tools: each test here failed on the code before its fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mixmae_scale.shards.verify import verify


def _without_bytes(shards: Path) -> None:
    """The manifest with no `bytes` for any tar: allowed (the field defaults to 0), as a hand-made manifest has."""
    path = shards / "dataset.json"
    manifest = json.loads(path.read_text())
    for info in manifest["splits"].values():
        for entry in info["shards"]:
            entry.pop("bytes", None)
    path.write_text(json.dumps(manifest))


def test_verify_reports_an_empty_tar_without_bytes_by_name(tmp_path, demo_shards):
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    _without_bytes(shards)
    tar = sorted(shards.glob("train-*.tar"))[1]
    tar.write_bytes(b"")
    report = verify(shards)
    assert not report["ok"]
    assert [e for e in report["errors"] if tar.name in e and "empty" in e], report["errors"]


def test_verify_reads_a_tar_in_a_bucket_whose_manifest_gives_no_bytes(tmp_path, demo_shards, s3_bucket):
    import boto3

    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    _without_bytes(shards)
    client = boto3.client("s3")
    for path in (p for p in shards.iterdir() if p.is_file()):
        client.upload_file(str(path), s3_bucket, f"set/{path.name}")
    assert verify(f"s3://{s3_bucket}/set")["ok"]
    client.put_object(Bucket=s3_bucket, Key="set/train-000001.tar", Body=b"")
    report = verify(f"s3://{s3_bucket}/set")
    assert [e for e in report["errors"] if "train-000001.tar" in e and "empty" in e], report["errors"]


def test_text_that_starts_with_bm_is_said_to_be_text_not_a_damaged_bmp():
    from mixmae_scale.shards.jpeg_check import what_the_bytes_are

    said = what_the_bytes_are(b"BMW,3 series,2019\nAudi,A4,2020\n")
    assert said.startswith("text") and "not a readable BMP" not in said, said


def test_text_with_a_utf8_byte_order_mark_is_said_to_be_text():
    from mixmae_scale.shards.jpeg_check import what_the_bytes_are

    assert what_the_bytes_are("\ufeffname,label\ncat.jpg,1\n".encode()).startswith("text"), \
        what_the_bytes_are("\ufeffname,label\ncat.jpg,1\n".encode())


def test_bytes_invalid_as_utf8_before_the_end_are_not_called_text():
    from mixmae_scale.shards.jpeg_check import what_the_bytes_are

    data = b"abc\xff\xfe" + b"x" * 600  # invalid bytes near the start: no character cut by the 512-byte window
    assert not what_the_bytes_are(data).startswith("text"), what_the_bytes_are(data)
    cut = "é".encode() * 300  # 600 bytes: the 512-byte window ends inside no character, but may: see below
    assert what_the_bytes_are(b"a" + cut).startswith("text")  # 'é' cut in two at byte 512: still text


def test_a_script_without_a_main_guard_is_told_the_guard_or_workers_1(tmp_path, demo_shards):
    """Workers start as fresh interpreters (spawn) that import the caller's script: a script calling verify (or
    convert, adopt) with workers > 1 at its top level starts the call again in each worker, and multiprocessing's
    'bootstrapping phase' RuntimeError in every worker, then BrokenProcessPool, is all the user saw."""
    import subprocess
    import sys

    script = tmp_path / "check_my_set.py"
    script.write_text("from mixmae_scale.shards.verify import verify\n"
                      f"print(verify({str(demo_shards)!r}, workers=2)['ok'])\n")
    root = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**__import__("os").environ, "PYTHONPATH": root})
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mixmae_scale.shards.builder.PoolError") and 'if __name__ == "__main__":' in last \
        and "workers=1" in last, done.stderr[-3000:]


def test_an_image_that_is_a_git_lfs_pointer_is_said_so_with_git_lfs_pull():
    """An image folder cloned from a Hugging Face dataset without git-lfs: every .jpg a 130-byte pointer, each
    rejected as 'text (no JPEG, PNG, ... signature)', which sends no one to `git lfs pull`."""
    from mixmae_scale.shards.jpeg_check import prepare_image

    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 48213\n"
    said = prepare_image(pointer, name="n01440764_10026.JPEG")
    assert said.action == "rejected" and said.reason.startswith("not an image: a Git LFS pointer file"), said.reason
    assert "git lfs pull" in said.reason and "named .JPEG" in said.reason, said.reason
