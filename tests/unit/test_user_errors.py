"""A user's mistake is one line naming the option as typed, the absolute path and the way out; no traceback.
Each case goes through the `mixmae` entry point (`cli.main`, what the console script and the launcher's ranks
run); the ranks' side (said once, lines never run together) is tests/integration/test_finetune.py's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mixmae_scale.cli import main


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Real files as `mixmae export` writes them: a tiny encoder alone, and one with a 3-class head."""
    from mixmae_scale.config import load_resolved
    from mixmae_scale.models.classifier import SwinClassifier
    from mixmae_scale.models.convert_official import infer_architecture, save_weights
    from mixmae_scale.models.mixmae import swin_shape

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    state = SwinClassifier(swin_shape(load_resolved("tiny").config.model), 3).state_dict()
    encoder = {k: v for k, v in state.items() if k.startswith("encoder.")}
    save_weights(root / "encoder.safetensors", encoder, infer_architecture(encoder), "encoder")
    save_weights(root / "head3.safetensors", state, infer_architecture(state), "finetune")
    (root / "notes.txt").write_text("not weights\n")
    (root / "fake.safetensors").write_text("xx")
    return root


def one_error_line(capfd, code: int) -> str:
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("mixmae: error: ")
    return lines[0]


@pytest.mark.parametrize("name, expected", [
    ("notes.txt", "--init notes.txt: expected a .safetensors file (`mixmae export`), a run folder or an official "
                  "MixMIM .pth; {root}/notes.txt is none of these"),
    ("fake.safetensors", "--init fake.safetensors: {root}/fake.safetensors: not a readable safetensors file"),
    ("missing.safetensors", "--init missing.safetensors: not found (tried {root}/missing.safetensors)"),
    ("encoder.safetensors", "--init encoder.safetensors: a pretrained encoder without a classification head; "
                            "`mixmae eval` measures fine-tuned classifiers. Probe an encoder with `mixmae probe"),
])
def test_eval_of_wrong_weights_is_one_line_naming_the_option(weights, demo_shards, capfd, monkeypatch, name,
                                                              expected):
    monkeypatch.chdir(weights)  # relative, as a user types it; the message shows the absolute path
    line = one_error_line(capfd, main(["eval", "--init", name, "--data", str(demo_shards)]))
    assert expected.format(root=weights) in line
    assert "RANK" not in os.environ  # the world of one is undone


def test_eval_refuses_a_head_of_another_class_count(weights, demo_shards, capfd):
    line = one_error_line(capfd, main(["eval", "--init", str(weights / "head3.safetensors"), "--data",
                                       str(demo_shards)]))
    assert f"its head has 3 classes, the shards in {demo_shards} have 10 (classes.json)" in line


def test_finetune_init_that_is_not_weights_is_one_line_before_the_run_folder_is_made(weights, demo_shards, capfd,
                                                                                     tmp_path):
    code = main(["finetune", "--profile", "finetune_tiny", "--run-dir", str(tmp_path / "run"), "--set",
                 f"data.shards={demo_shards}", f"finetune.init={weights / 'notes.txt'}"])
    line = one_error_line(capfd, code)
    assert f"finetune.init={weights / 'notes.txt'}: expected a .safetensors file" in line
    assert not (tmp_path / "run").exists()


def test_probe_visualize_and_export_mistakes_are_one_line(weights, demo_shards, capfd, tmp_path):
    line = one_error_line(capfd, main(["probe", "--init", str(weights / "notes.txt"), "--data", str(demo_shards)]))
    assert line.startswith(f"mixmae: error: --init {weights / 'notes.txt'}: expected a .safetensors file")
    line = one_error_line(capfd, main(["probe", "--init", str(weights / "encoder.safetensors"), "--data", "nowhere"]))
    assert line == f"mixmae: error: --data nowhere: not found (tried {Path.cwd() / 'nowhere'})"
    line = one_error_line(capfd, main(["visualize", str(weights / "encoder.safetensors"), "--data",
                                       str(demo_shards)]))
    assert "no decoder weights; name the run folder, or export with `mixmae export RUN --with-decoder`" in line
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    line = one_error_line(capfd, main(["export", str(tmp_path / "run"), "--best", "--out", str(tmp_path / "x")]))
    assert f"{tmp_path / 'run' / 'best'}: no complete best checkpoint; only fine-tuning runs keep one" in line


def test_the_first_failing_rank_reports_and_the_others_stay_silent(capfd, monkeypatch, tmp_path):
    """Ranks of one job (same launcher, same rendezvous) share one report; a bug keeps its traceback."""
    import tempfile

    from free_port import free_port

    from mixmae_scale.cli.failure_report import report_failure
    from mixmae_scale.config import ConfigError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the markers go here, not into /tmp
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    report_failure(0, ConfigError("batch.micro=3: must be even"))
    report_failure(1, ConfigError("batch.micro=3: must be even"))
    report_failure(1, RuntimeError("Connection closed by peer"))
    assert capfd.readouterr().err == "mixmae: error: batch.micro=3: must be even\n"
    monkeypatch.setenv("MASTER_PORT", str(free_port()))  # another job
    try:
        {}["a bug"]
    except KeyError as exc:
        report_failure(1, exc)
    err = capfd.readouterr().err
    assert err.startswith("mixmae: rank 1 failed:\nTraceback (most recent call last):") and "KeyError" in err
    assert len(list(tmp_path.glob("mixmae-failed-*"))) == 2  # one marker per job


@pytest.mark.parametrize("args, expected", [
    (["config", "show", "--profile", "nowhere.yaml"], "profile 'nowhere.yaml' not found (tried {cwd}/nowhere.yaml and"),
    (["config", "show", "--profile", "tiny", "--cluster", "c.yaml"], "cluster file 'c.yaml' does not exist (tried "
                                                                     "{cwd}/c.yaml)"),
    (["runs", "plot", "run"], "{cwd}/run: not found (is run a run folder?)"),
    (["shards", "verify", "shards"], "shard folder {cwd}/shards does not exist"),
    (["shards", "folder", "--src", "images", "--out", "out"], "--src images: not found (tried {cwd}/images)"),
    (["scaling", "report", "--out", "sweep"], "{cwd}/sweep/results.jsonl: not found, no results yet"),
    (["export", "run", "--out", "x.safetensors"], "run folder run: not found (tried {cwd}/run)"),
])
def test_not_found_errors_show_the_absolute_path_tried(tmp_path, monkeypatch, capfd, args, expected):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(capfd, main(args))
    assert expected.format(cwd=tmp_path) in line
