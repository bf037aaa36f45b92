"""A pretraining run stopped and resumed with W&B in offline mode (no network): one W&B run across both launches
with every step's scalars and the reconstruction grids, read back from the transaction logs wandb writes; and a
run record with the commit, the versions, the manifest digest and the resume. Two short launches, 2 CPU ranks."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
from pathlib import Path

import pytest
from test_pretrain import launch, losses

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def wandb_records(path: Path):
    """The records of a `.wandb` transaction log. wandb 0.31 ships no Python reader (its Go core writes and syncs
    these), so this reads the format itself: a 7-byte header (':W&B', magic 0xBEE1, version), then LevelDB's log
    format (32 KiB blocks of chunks: crc32c, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4), each record a
    protobuf `wandb.proto.wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), path
    block, position, pending = 32768, 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            position += block - position % block
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_wandb_runs(folder: Path) -> tuple[set[str], dict[int, dict[str, str]], set[str], dict[str, str]]:
    """(the run ids, the history by step: key -> JSON value, the files saved, the last launch's summary: key ->
    JSON value) over every offline run folder."""
    ids, history, files, summary = set(), {}, set(), {}
    logs = sorted(folder.rglob("*.wandb"))
    assert len(logs) == 2, logs  # one per launch
    for log in logs:
        for record in wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
                history.setdefault(record.history.step.num, {}).update(items)
            elif kind == "files":
                files.update(item.path for item in record.files.files)
            elif kind == "summary":
                summary.update({item.key or "/".join(item.nested_key): item.value_json
                                for item in record.summary.update})
    return ids, history, files, summary


def test_a_run_stopped_and_resumed_is_one_wandb_run_with_all_steps_and_grids_and_its_record_says_where_it_came_from(
        demo_shards, tmp_path, capsys):
    run, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    wandb_dir.mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    common = ("precision.dtype=fp32", "checkpoint.every_steps=100", "logging.visualize_every_steps=2",
              "logging.wandb.mode=offline", "logging.wandb.tags=[ci]")
    launch(run, demo_shards, *common, max_steps=2, env=env)
    launch(run, demo_shards, *common, max_steps=4, env=env)

    ids, history, files, wandb_summary = read_wandb_runs(wandb_dir)
    assert ids == {json.loads((run / "wandb.json").read_text())["id"]}
    csv_losses = losses(run)
    assert sorted(csv_losses) == [1, 2, 3, 4]
    assert {step: float(history[step]["Train/loss"]) for step in csv_losses} == pytest.approx(csv_losses, rel=1e-9)
    assert all("Train/lr" in history[step] and "Train/images_per_s" in history[step] for step in csv_losses)
    grids = {step: json.loads(history[step]["reconstruction/path"]) for step in history
             if "reconstruction/path" in history[step]}
    assert sorted(grids) == [2, 4]
    for path in grids.values():
        assert len(list(wandb_dir.rglob(Path(path).name))) == 1
    assert "run.json" in files

    record = json.loads((run / "run.json").read_text())
    # The final held-out loss is measured before the records close: run.json and W&B hold summary.json's.
    final = json.loads((run / "summary.json").read_text())["heldout_loss_end"]
    assert final is not None and record["end"]["heldout_loss_end"] == final
    assert float(wandb_summary["Summary/heldout_loss_end"]) == pytest.approx(final, rel=1e-9)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout; an installed package records its version instead
        assert record["code"]["commit"] == head.stdout.strip()
    import deepspeed
    import torch

    assert record["packages"]["deepspeed"] == deepspeed.__version__
    assert torch.__version__.startswith(record["packages"]["torch"])
    manifest = json.loads((demo_shards / "dataset.json").read_text())
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    assert [(d["role"], d["manifest_sha256"]) for d in record["data"]] == [("train", digest), ("held-out", digest)]
    assert record["world_size"] == 2 and record["precision"]["dtype"] == "fp32"
    assert record["platform"]["device_count"] == 2
    (resume,) = record["resumes"]
    assert (resume["step"], resume["checkpoint"], resume["universal"]) == (2, "step00000002", False)
    assert resume["old_layout"] == resume["new_layout"] and resume["new_layout"]["world_size"] == 2
    assert [(x["start_step"], x["end_step"]) for x in record["launches"]] == [(0, 2), (2, 4)]
    assert all("--max-steps" in x["command"] for x in record["launches"])

    from mixmae_scale.cli import main

    assert main(["runs", "show", str(run)]) == 0
    shown = capsys.readouterr().out
    assert "resumes (1):" in shown and "step 2 from step00000002, same layout" in shown
    assert f"manifest sha256 {digest[:16]}" in shown
