"""`mixmae shards verify --workers N` reads tars in parallel (the builder's bounded pool) and still prints one report:
the same lines, counts, order and exit code as one worker, on a real set with damaged tars, local and in a bucket.

The command runs in a process of its own, as a user runs it. When the pool forked, a fork of the test process copied
the moto server's thread (tests/conftest.py serves it in this process) mid-request, and a CI run's forked worker
died by a segmentation fault; the pool now spawns its workers (tests/unit/test_pool_start.py), and a process of
its own still keeps the test's threads out of the command's."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def damaged_copy(demo_shards: Path, root: Path) -> Path:
    """The demo set with three problems in three tars: a flipped byte, an emptied index, a deleted tar."""
    out = root / "shards"
    shutil.copytree(demo_shards, out)
    tars = sorted(out.glob("train-*.tar"))
    data = bytearray(tars[1].read_bytes())
    data[600] ^= 0xFF
    tars[1].write_bytes(bytes(data))
    tars[2].with_suffix(".idx").write_text("")
    tars[3].unlink()
    return out


def report(location: str, workers: int) -> tuple[int, list[str]]:
    done = subprocess.run([sys.executable, "-m", "mixmae_scale.cli", "shards", "verify", location, "--workers",
                           str(workers)], capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout.splitlines()


def test_several_workers_give_the_one_worker_report_in_tar_order(tmp_path, demo_shards):
    shards = damaged_copy(demo_shards, tmp_path)
    one = report(str(shards), 1)
    assert one == report(str(shards), 3) == report(str(shards), 8)
    code, lines = one
    assert code == 1 and lines[-1].endswith("problems")
    errors = [line for line in lines if line.startswith("ERROR ")]
    tars = sorted(shards.glob("train-*.tar")) + [shards / "train-000003.tar"]
    named = [name for line in errors for name in sorted({p.name for p in tars}) if name[:-4] in line]
    assert named == sorted(named) and len(set(named)) == 3  # the damaged tars, in the manifest's order
    assert sum("split train:" in line for line in errors) == 1


def test_the_report_of_a_set_in_a_bucket_is_the_same_for_any_worker_count(tmp_path, demo_shards, s3_bucket):
    import boto3

    client = boto3.client("s3")
    shards = damaged_copy(demo_shards, tmp_path)
    for path in (p for p in shards.iterdir() if p.is_file()):
        client.upload_file(str(path), s3_bucket, f"set/{path.name}")
    url = f"s3://{s3_bucket}/set"
    code, lines = report(url, 1)
    assert (code, lines) == report(url, 3)
    assert code == 1 and f"ERROR {url}/train-000003.tar: GET failed: no such object" in lines
