"""A user's mistake is one line naming the option as typed, the absolute path and the way out; no traceback.
Each case goes through the `mixmae` entry point (`cli.main`, what the console script and the launcher's ranks
run); the ranks' side (said once, lines never run together) is tests/integration/test_finetune.py's."""

from __future__ import annotations

import json
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


def test_eval_refuses_a_head_of_fewer_classes_than_the_shards(weights, demo_shards, capfd):
    line = one_error_line(capfd, main(["eval", "--init", str(weights / "head3.safetensors"), "--data",
                                       str(demo_shards)]))
    assert f"its head has 3 classes, fewer than the 10 of the shards in {demo_shards} (classes.json)" in line


def test_finetune_init_that_is_not_weights_is_one_line_before_the_run_folder_is_made(weights, demo_shards, capfd,
                                                                                     tmp_path):
    code = main(["finetune", "--profile", "finetune_tiny", "--run-dir", str(tmp_path / "run"), "--set",
                 f"data.shards={demo_shards}", f"finetune.init={weights / 'notes.txt'}"])
    line = one_error_line(capfd, code)
    assert f"finetune.init={weights / 'notes.txt'}: expected a .safetensors file" in line
    assert not (tmp_path / "run").exists()


def test_finetune_without_finetune_init_is_one_line_naming_the_key_before_the_run_folder_is_made(
        demo_shards, capfd, tmp_path, monkeypatch):
    from mixmae_scale.finetune import job

    def finetune(*args, **kwargs):
        raise AssertionError("fine-tuning started from random weights")

    monkeypatch.setattr(job, "finetune", finetune)
    code = main(["finetune", "--profile", "finetune_tiny", "--run-dir", str(tmp_path / "run"), "--set",
                 f"data.shards={demo_shards}", "finetune.init=null"])
    line = one_error_line(capfd, code)
    assert code == 2 and line == ("mixmae: error: finetune.init is not set: name the encoder to start from (--set "
                                  "finetune.init=RUN_FOLDER, an exported .safetensors or an official MixMIM .pth), or "
                                  "--set finetune.init=random for a randomly initialised encoder (the baseline)")
    assert not (tmp_path / "run").exists()


def test_finetune_resuming_its_own_checkpoint_goes_on_without_its_init_file(demo_shards, capfd, tmp_path,
                                                                            monkeypatch):
    """The init file was read (and refused as not found) before the run looked at its own checkpoint."""
    from mixmae_scale.engine.checkpointing import store
    from mixmae_scale.finetune import job

    run = tmp_path / "run"
    (run / "checkpoints" / "step00000006").mkdir(parents=True)
    store.seal(run / "checkpoints" / "step00000006", {"step": 6, "world_size": 1, "kind": "regular"})
    called = {}

    def finetune(*args, **kwargs):  # stands for the run: what this test checks is what it was given
        called.update(kwargs)
        return {"steps": 20, "last": None, "best": {"top1": 0.0}}

    monkeypatch.setattr(job, "finetune", finetune)
    code = main(["finetune", "--profile", "finetune_tiny", "--run-dir", str(run), "--set",
                 f"data.shards={demo_shards}", f"finetune.init={tmp_path / 'cleaned-up.safetensors'}"])
    assert code == 0, capfd.readouterr().err
    assert "pretrained" in called and called["pretrained"] is None


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
    best = tmp_path / "run" / "best"
    assert f"{best}: no complete best checkpoint; fine-tuning and segmentation runs keep one" in line


def test_a_probe_whose_splits_would_not_fit_in_memory_is_refused_before_decoding(weights, demo_shards, capfd,
                                                                                 monkeypatch):
    import psutil

    from mixmae_scale.finetune import probe

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": 10**6})())
    monkeypatch.setattr(probe, "read_batches", lambda *args: pytest.fail("decoded before the memory was checked"))
    line = one_error_line(capfd, main(["probe", "--init", str(weights / "encoder.safetensors"), "--data",
                                       str(demo_shards)]))
    assert f"--data {demo_shards}: the probe holds the features of every image for each of its 1 encoder " in line
    assert "0 GB available; its 80 validation images alone leave no room: probe a smaller set" in line
    line = one_error_line(capfd, main(["probe", "--init", "x", "--data", "y", "--dense", "--max-samples", "9"]))
    assert line == ("mixmae: error: --max-samples: caps the classification probe's training images; the dense probe "
                    "(--dense) reads every image of both splits")


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


@pytest.mark.parametrize("args, expected", [
    (["shards", "folder", "--src", "a.txt", "--out", "out"], "--src a.txt: a file; name the folder that holds"),
    (["shards", "verify", "a.txt"], "{cwd}/a.txt is a file, not a shard folder (data.shards)"),
    (["shards", "adopt", "a.txt", "--out", "out"], "{cwd}/a.txt: a file, not a folder"),
])
def test_a_file_where_a_folder_goes_is_called_a_file_not_missing(tmp_path, monkeypatch, capfd, args, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("notes\n")
    line = one_error_line(capfd, main(args))
    assert expected.format(cwd=tmp_path) in line


def _jpegs(folder: Path, count: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (8, 8), (i % 256, 40, 90)).save(folder / f"{i:03d}.jpg", quality=80)


@pytest.mark.parametrize("layout, command", [
    ("flat", "mixmae shards folder --src photos --out photos-shards"),
    ("classes", "mixmae shards folder --src photos --out photos-shards"),
    ("imagenet", "mixmae shards imagenet --src photos --out photos-shards"),
])
def test_a_folder_of_images_given_as_shards_names_the_command_that_converts_it(tmp_path, monkeypatch, capfd,
                                                                               layout, command):
    monkeypatch.chdir(tmp_path)
    where = {"flat": "photos", "classes": "photos/cats", "imagenet": "photos/train/n01"}[layout]
    _jpegs(tmp_path / where, 3)
    line = one_error_line(capfd, main(["shards", "verify", "photos"]))
    assert line.startswith(f"mixmae: error: {tmp_path / 'photos'} is not a shard set (it has no dataset.json)")
    assert f"`{command}`" in line and "then use photos-shards as the shard set" in line
    assert "empty" not in line


def test_eval_on_a_folder_of_jpegs_points_to_shards_folder(weights, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    _jpegs(tmp_path / "photos", 4)
    line = one_error_line(capfd, main(["eval", "--init", str(weights / "head3.safetensors"), "--data", "photos/"]))
    assert "is a folder of 4 images; convert it first: `mixmae shards folder --src photos --out photos-shards`" \
        in line and "--data photos-shards" in line


def test_shards_folder_ignores_and_counts_a_file_not_named_like_an_image(tmp_path, monkeypatch, capfd):
    """100 images and a notes.txt: at the default --max-rejected of 1%, one stray file used to fail the folder."""
    monkeypatch.chdir(tmp_path)
    _jpegs(tmp_path / "photos", 100)
    (tmp_path / "photos" / "notes.txt").write_text("where these came from\n")
    assert main(["shards", "folder", "--src", "photos", "--out", "out", "--workers", "1"]) == 0
    out = capfd.readouterr().out
    assert "train: ignored 1 file that is not an image by name" in out and out.rstrip().count("notes.txt") >= 1
    assert "train: found 100 = written 100 + rejected 0" in out
    assert (tmp_path / "out" / "rejected.jsonl").read_text() == ""


def test_shards_imagenet_reports_every_split_over_the_limit_in_one_refusal(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    for split in ("train", "val"):
        _jpegs(tmp_path / "src" / split / "n01", 5)
        (tmp_path / "src" / split / "n01" / "broken.jpg").write_text("a text file named like an image")
    line = last_error_line(capfd, main(["shards", "imagenet", "--src", "src", "--out", "out", "--workers", "1"]))
    assert "train: 1 of 6 files rejected (16.7%)" in line and "val: 1 of 6 files rejected (16.7%)" in line
    assert line.endswith("or accept them with --max-rejected 0.17")
    reasons = [json.loads(r)["reason"] for r in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert reasons == ["not an image: text (no JPEG, PNG, GIF, WebP, BMP or TIFF signature), named .jpg: cannot "
                       "identify image file"] * 2


def test_a_text_file_named_png_is_rejected_as_text_naming_the_suffix_it_claims(tmp_path, monkeypatch, capfd):
    """A text file named .png was rejected as "not an image (not a JPEG stream)": what it is not, in the words of a
    JPEG check, which sent the user looking for a broken JPEG. The reason says what the bytes are and what the
    name claims; the console's counts include it."""
    monkeypatch.chdir(tmp_path)
    _jpegs(tmp_path / "photos", 4)
    (tmp_path / "photos" / "scan.png").write_text("this was saved from a browser\n")
    assert main(["shards", "folder", "--src", "photos", "--out", "out", "--workers", "1", "--max-rejected", "0.5"]) == 0
    assert "train: found 5 = written 4 + rejected 1" in capfd.readouterr().out
    rows = [json.loads(r) for r in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["source"], r["reason"]) for r in rows] == [
        ("scan.png", "not an image: text (no JPEG, PNG, GIF, WebP, BMP or TIFF signature), named .png: cannot "
                     "identify image file")]


@pytest.mark.parametrize("data, said", [
    (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", "not an image: a PDF document, named .jpg: "),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 8, "not an image: a PNG signature, but the data after it is not a readable "
                                          "PNG, named .jpg: "),
    (b"\x00\x01\x02\x03\xfe\xff\x00\x10", "not an image: no JPEG, PNG, GIF, WebP, BMP or TIFF signature (it "
                                          "starts 00 01 02 03 fe ff 00 10), named .jpg: "),
])
def test_a_file_that_is_no_image_is_rejected_saying_what_its_bytes_are(data, said):
    from mixmae_scale.shards.jpeg_check import prepare_image

    prepared = prepare_image(data, name="a/b.jpg")
    assert prepared.data is None and prepared.reason.startswith(said), prepared.reason


def test_shards_folder_names_the_problems_of_both_splits_before_writing_anything(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "readme.md").write_text("x")
    line = last_error_line(capfd, main(["shards", "folder", "--src", "src", "--split", "train,val", "--out", "out"]))
    assert line.startswith("mixmae: error: src: no images found (ignored 1 file that is not an image by name")
    assert line.endswith("readme.md); src/val: not a folder")
    assert not list((tmp_path / "out").glob("*.tar"))


def last_error_line(capfd, code: int) -> str:
    """The refusal after a conversion's progress bars: the last thing on stderr, one line, no traceback."""
    err = capfd.readouterr().err
    assert code != 0 and "Traceback" not in err, err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("mixmae: error: "), err
    return last


def evaluation_gives(monkeypatch, result: dict) -> None:
    """`mixmae eval`'s classifier and evaluation stood in for, in a world of one on the CPU, so that `result` is what
    the command prints from (the evaluation's own results are tests/integration's)."""
    from mixmae_scale.engine import distributed
    from mixmae_scale.finetune import evaluate

    monkeypatch.setattr(evaluate, "load_classifier", lambda *args: torch.nn.Identity())
    monkeypatch.setattr(evaluate, "evaluate_classifier", lambda *args: result)
    monkeypatch.setattr(distributed, "init", lambda local_rank: (0, 1, torch.device("cpu")))


def test_eval_and_visualize_print_one_line_and_json_on_request(capsys, monkeypatch):
    """What a user reads after `mixmae eval` and `mixmae visualize`: one line, not a JSON dump (--json gives it).
    The evaluation and the drawing are stood in for (their results are tests/integration's); the lines are not."""
    import json

    from mixmae_scale.visualize import reconstruction

    result = {"weights": "ft.safetensors", "split": "val", "batch": 40, "samples": 800, "top1": 41.25, "top5": 87.5,
              "loss": 1.9, "precision": "fp32"}
    evaluation_gives(monkeypatch, result)
    assert main(["eval", "--init", "ft.safetensors", "--data", "shards"]) == 0
    assert capsys.readouterr().out == ("top-1 41.25%, top-5 87.50% (fp32) on the 800 images of split 'val' of "
                                       "shards (ft.safetensors)\n")
    assert main(["eval", "--init", "ft.safetensors", "--data", "shards", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == result
    result["top5"] = None  # a head of 5 classes or fewer: every label is in its top 5
    assert main(["eval", "--init", "ft.safetensors", "--data", "shards"]) == 0
    assert capsys.readouterr().out.startswith("top-1 41.25%, top-5 n/a (fp32) on the 800 images")
    drawn = {"source": "run", "title": "...", "out": "grid.png", "pairs": 2, "size": [1, 2, 3]}
    monkeypatch.setattr(reconstruction, "visualize", lambda *args: drawn)
    assert main(["visualize", "run", "--data", "shards", "--images", "4", "--out", "grid.png"]) == 0
    assert capsys.readouterr().out == ("wrote grid.png: 4 images of split 'val' of shards, each masked (seed 0) and "
                                       "reconstructed by run\n")
    assert main(["visualize", "run", "--data", "shards", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == drawn


def test_launch_refuses_a_folder_of_images_as_shards_before_starting_any_rank(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    _jpegs(tmp_path / "photos" / "train" / "n01", 2)
    line = one_error_line(capfd, main(["launch", "tiny", "--set", "data.shards=photos", "--dry-run"]))
    assert "it is an ImageNet-style image tree (train/ with a folder per class); convert it first: `mixmae shards " \
           "imagenet --src photos --out photos-shards`" in line


def test_an_export_out_that_cannot_be_written_is_refused_before_the_weights_are_gathered(tmp_path, monkeypatch):
    """Gathering a large ZeRO-3 run's weights takes minutes: a folder or a missing parent as --out is said first."""
    from mixmae_scale.engine import export

    monkeypatch.setattr(export, "find_checkpoint", lambda run, tag, best: (tmp_path / "run" / "checkpoints", "step9"))

    def gather(folder, tag):
        raise AssertionError("the weights were gathered before --out was checked")

    monkeypatch.setattr(export, "gather_weights", gather)
    with pytest.raises(ValueError, match=f"--out {tmp_path}: is a folder; name the file to write"):
        export.export_run(tmp_path / "run", out=tmp_path)
    with pytest.raises(FileNotFoundError, match=f"its folder {tmp_path / 'nowhere'} does not exist"):
        export.export_run(tmp_path / "run", out=tmp_path / "nowhere" / "encoder.safetensors")


@pytest.mark.parametrize("fmt, out, said", [
    ("safetensors", "x.pth", "--format safetensors writes our safetensors file, which is read back by its suffix; name "
                             "it *.safetensors"),
    ("official", "x.safetensors", "--format official writes a PyTorch pickle in the official layout, which is read "
                                  "back by its suffix; name it *.pth or *.pt or *.bin"),
])
def test_an_export_out_whose_suffix_is_not_its_formats_is_refused_before_the_weights_are_gathered(
        tmp_path, monkeypatch, capfd, fmt, out, said):
    """`--out x.pth` wrote safetensors bytes (and `--format official --out x.safetensors` a pickle), which every
    loader, going by the suffix, later refused as damaged or not weights."""
    from mixmae_scale.engine import export

    monkeypatch.setattr(export, "find_checkpoint", lambda run, tag, best: (tmp_path / "run" / "checkpoints", "step9"))
    monkeypatch.setattr(export, "gather_weights", lambda folder, tag: pytest.fail("gathered before --out was checked"))
    line = one_error_line(capfd, main(["export", str(tmp_path / "run"), "--format", fmt, "--out", str(tmp_path / out)]))
    assert line == f"mixmae: error: --out {tmp_path / out}: {said}"


def test_a_garbage_pth_is_named_in_one_line_without_torchs_advice_to_load_it_unsafely(tmp_path):
    """torch's refusal runs to several lines and suggests weights_only=False (which runs the file's code): the
    error keeps the file and the unpickler's complaint."""
    from mixmae_scale.models.convert_official import WeightsError, read_official

    for name, data in (("random.pth", bytes(range(7, 250)) * 4), ("text.pth", b"hello\n")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightsError) as error:
            read_official(tmp_path / name)
        said = str(error.value)
        assert said.startswith(f"{tmp_path / name}: not a loadable weights-only checkpoint (") and "\n" not in said
        assert "weights_only" not in said.split("(", 1)[1]
    (tmp_path / "folder.pth").mkdir()
    with pytest.raises(WeightsError, match="folder.pth: a folder, not a checkpoint file"):
        read_official(tmp_path / "folder.pth")


def test_eval_at_a_size_the_encoder_cannot_take_is_one_line_naming_its_own(demo_shards, capfd, tmp_path):
    from mixmae_scale.config import load_resolved
    from mixmae_scale.models.classifier import SwinClassifier
    from mixmae_scale.models.convert_official import infer_architecture, save_weights
    from mixmae_scale.models.mixmae import swin_shape

    state = SwinClassifier(swin_shape(load_resolved("tiny").config.model), 10).state_dict()
    save_weights(tmp_path / "head10.safetensors", state, infer_architecture(state), "finetune")
    line = one_error_line(capfd, main(["eval", "--init", str(tmp_path / "head10.safetensors"), "--data",
                                       str(demo_shards), "--img-size", "100"]))  # a shape error traceback before
    assert line.startswith("mixmae: error: --img-size 100: the encoder needs a multiple of 32")
    assert "its own size is" in line


def test_a_refused_conversion_leaves_no_empty_output_folder_and_keeps_an_existing_one(tmp_path, capfd):
    (tmp_path / "src" / "cats").mkdir(parents=True)
    (tmp_path / "src" / "cats" / "notes.txt").write_text("no images here\n")
    line = one_error_line(capfd, main(["shards", "folder", "--src", str(tmp_path / "src"), "--out",
                                       str(tmp_path / "out")]))
    assert "1 class folder without images: cats" in line and not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()
    one_error_line(capfd, main(["shards", "folder", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "kept")]))
    assert (tmp_path / "kept").is_dir()  # the user's own folder is not removed


def test_a_rank_command_without_dali_says_which_extra_to_install_in_one_line(demo_shards, tmp_path):
    """A plain `pip install mixmae-scale` has no DALI (an extra per CUDA version): `mixmae pretrain` printed a
    traceback ending in ModuleNotFoundError where the other commands name the extra and the PyTorch loader."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['nvidia.dali'] = None\n"  # any DALI import now raises ModuleNotFoundError
            "from mixmae_scale.cli import main\n"
            f"sys.exit(main(['pretrain', '--profile', 'tiny', '--run-dir', {str(tmp_path / 'run')!r}, '--set', "
            f"'data.shards={demo_shards}', '--max-steps', '1']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-2000:]  # a refusal, as the other commands'
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("mixmae: ")]
    assert len(errors) == 1 and "DALI" in errors[0] and "mixmae-scale[cuda12]" in errors[0] \
        and "data.loader=torch" in errors[0], result.stderr[-2000:]


def test_shards_imagenet_without_a_val_folder_points_to_converting_train_alone(tmp_path, capfd):
    _jpegs(tmp_path / "imgs" / "train" / "n01", 3)
    line = one_error_line(capfd, main(["shards", "imagenet", "--src", str(tmp_path / "imgs"), "--out",
                                       str(tmp_path / "out")]))
    assert f"split 'val' has no folder {tmp_path / 'imgs' / 'val'}; --split train converts the training images" \
        in line


def test_botocore_saying_where_it_found_credentials_is_not_a_log_line_of_every_rank(caplog):
    import logging

    from mixmae_scale.cli import third_party_noise

    third_party_noise.silence()
    with caplog.at_level(logging.INFO):
        logging.getLogger("botocore.credentials").info("Found credentials in environment variables.")
        logging.getLogger("botocore.credentials").info("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_commands_outside_a_launch_exit_as_the_ranks_do_and_keep_a_torch_errors_traceback(monkeypatch, capsys,
                                                                                          tmp_path):
    """`main` said every ValueError or RuntimeError in one line with exit 2 ("refused, do not retry"): running out
    of memory in `mixmae probe` lost its traceback and read as the user's mistake, and a file not found exited 2
    here but 1 from the rank commands; an output path through a file was a traceback."""
    import torch

    from mixmae_scale.cli import shard_commands

    def fails_with(exc):
        def handler(args):
            raise exc
        return handler

    cases = [(torch.OutOfMemoryError("CUDA out of memory"), None), (RuntimeError("internal: counts differ"), None),
             (FileNotFoundError("--data x: not found"), 1), (NotADirectoryError("out/x: not a folder"), 1),
             (ValueError("--out y: is a folder"), 2)]
    for exc, code in cases:
        monkeypatch.setattr(shard_commands, "_shards_verify", fails_with(exc))
        if code is None:
            with pytest.raises(type(exc)):
                main(["shards", "verify", str(tmp_path)])
        else:
            assert main(["shards", "verify", str(tmp_path)]) == code, exc
            assert capsys.readouterr().err == f"mixmae: error: {exc}\n"


def test_finetune_with_a_pretraining_profile_is_refused_naming_its_recipe(demo_shards, capfd, tmp_path, monkeypatch):
    """`--profile swin_b --set finetune.init=...` fine-tuned with pretraining's recipe (600 epochs, betas 0.95, no
    drop path), unsaid. A fine-tuning profile (one whose own file names finetune.init) is the control: it trains."""
    from mixmae_scale.finetune import job

    started = []

    def finetune(*args, **kwargs):  # stands for the run: what this test checks is whether it started
        started.append(args[0].schedule.epochs)
        return {"steps": 1, "last": None, "best": {"top1": 0.0}}

    monkeypatch.setattr(job, "finetune", finetune)
    code = main(["finetune", "--profile", "swin_b", "--run-dir", str(tmp_path / "run"), "--set",
                 f"data.shards={demo_shards}", "finetune.init=random"])
    line = one_error_line(capfd, code)
    assert code == 2 and "--profile swin_b is not a fine-tuning profile (its file sets no finetune.init)" in line
    assert "schedule.epochs=600, optim.betas=[0.9, 0.95], model.drop_path=0.0" in line
    assert "--profile finetune_l --set model.size=huge" in line
    assert not started and not (tmp_path / "run").exists()
    code = main(["finetune", "--profile", "finetune_tiny", "--run-dir", str(tmp_path / "run"), "--set",
                 f"data.shards={demo_shards}", "finetune.init=random"])
    assert code == 0 and started == [10], capfd.readouterr().err


def test_an_unfinished_conversion_is_called_one_not_tars_to_adopt(tmp_path, monkeypatch, capfd):
    """A conversion stopped above --max-rejected keeps its shards but writes no dataset.json: training on it was
    told to `mixmae shards adopt` them (which refuses a converted folder) instead of rerunning the conversion."""
    monkeypatch.chdir(tmp_path)
    _jpegs(tmp_path / "photos", 20)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["shards", "folder", "--src", "photos", "--out", "out", "--workers", "1"]) != 0
    capfd.readouterr()
    line = one_error_line(capfd, main(["shards", "verify", "out"]))
    assert "is not a shard set (it has no dataset.json)" in line and "adopt" not in line
    assert "an unfinished conversion of" in line and str(tmp_path / "photos") in line
    assert "run the `mixmae shards folder` command again" in line and "out/rejected.jsonl" in line


def test_an_unfinished_adoption_is_called_one(tmp_path, monkeypatch, capfd):
    import tarfile

    monkeypatch.chdir(tmp_path)
    _jpegs(tmp_path / "x", 1)
    (tmp_path / "x" / "000.cls").write_text("0")
    (tmp_path / "x" / "001.cls").write_text("1")  # a sample without an image: rejected, 50% > --max-rejected
    (tmp_path / "tars").mkdir()
    with tarfile.open(tmp_path / "tars" / "s-000.tar", "w") as tar:
        for name in ("000.cls", "000.jpg", "001.cls"):
            tar.add(tmp_path / "x" / name, arcname=name)
    assert main(["shards", "adopt", "tars", "--out", "index", "--workers", "1"]) != 0
    capfd.readouterr()
    line = one_error_line(capfd, main(["shards", "verify", "index"]))
    assert "it holds an unfinished adoption (`mixmae shards adopt ... --out index`): run that command again" in line


def probe_refusal(capfd, monkeypatch, reader: tuple[object, str], weights: Path, data: Path, *more: str) -> str:
    """The one error line of `mixmae probe --init WEIGHTS --data DATA MORE`, with `reader` (a module and the name of
    what reads its images) failing the test if called: these refusals are made from the manifest, before any image
    is read (which took minutes on a CPU)."""
    def read(*args, **kwargs):
        raise AssertionError("an image was read")

    monkeypatch.setattr(*reader, read)
    return one_error_line(capfd, main(["probe", "--init", str(weights / "encoder.safetensors"), "--data", str(data),
                                       *more]))


def test_probe_refuses_a_one_class_set_from_its_manifest_before_reading_an_image(weights, tmp_path, monkeypatch,
                                                                                 capfd):
    """`mixmae probe` of a folder of one class encoded every image of both splits (minutes on a CPU) before it
    refused the set: the manifest says it has one class, so it is refused first, naming the split and the set."""
    from tiny_sets import tiny_set

    from mixmae_scale.finetune import probe

    shards = tiny_set(tmp_path, {"cats": 8}, val_fraction=0.25)
    capfd.readouterr()  # the conversion's progress bars
    line = probe_refusal(capfd, monkeypatch, (probe, "read_batches"), weights, shards)
    assert line == (f"mixmae: error: --data {shards}: split 'train' has 1 class (cats) in the set's manifest; a "
                    "read-out of one class answers it for every image (top-1 100% whatever the encoder): probe on a "
                    "set of two classes or more")


@pytest.mark.parametrize("unlabeled", ["train", "val"])
def test_probe_refuses_a_split_without_labels_from_its_manifest_before_reading_an_image(weights, tmp_path, monkeypatch,
                                                                                       capfd, unlabeled):
    """`mixmae probe` of a set converted with --unlabeled encoded every image of both splits, then said "every one of
    the probe's training images is of class -1"; an unlabeled validation split beside a labeled train split was
    scored against labels of -1: top-1 0% whatever the encoder. The manifest says which splits are labeled."""
    from tiny_sets import tiny_set

    from mixmae_scale.finetune import probe

    shards = tiny_set(tmp_path, {"cats": 6, "dogs": 6}, val_fraction=0.34)
    manifest = json.loads((shards / "dataset.json").read_text())
    manifest["splits"][unlabeled]["labeled"] = False  # as `mixmae shards folder --unlabeled` writes a split
    (shards / "dataset.json").write_text(json.dumps(manifest))
    capfd.readouterr()  # the conversion's progress bars
    line = probe_refusal(capfd, monkeypatch, (probe, "read_batches"), weights, shards)
    assert line == (f"mixmae: error: --data {shards}: split '{unlabeled}' has no labels (no .cls members, its "
                    "manifest says); the probe fits and scores class labels: give it a labeled split (`mixmae shards "
                    "folder` of class subfolders, `mixmae shards adopt` without --unlabeled)")


def test_eval_of_a_split_of_few_images_says_how_wide_its_top1_is(capsys, monkeypatch):
    """`mixmae eval` of a folder's tiny validation split (`--val-fraction` of a few images) printed `top-1 100.00% ...
    on the 2 images`, a result with nothing said of it, where the fine-tuning's own last line and the probe say a
    top-1 on fewer than 100 images is too few to read. It says so too, with the interval."""
    result = {"weights": "ft.safetensors", "split": "val", "batch": 2, "samples": 2, "top1": 100.0, "top5": None,
              "loss": 0.1, "precision": "fp32"}
    evaluation_gives(monkeypatch, result)
    assert main(["eval", "--init", "ft.safetensors", "--data", "shards"]) == 0
    assert capsys.readouterr().out == ("top-1 100.00%, top-5 n/a (fp32) on the 2 images of split 'val' of shards "
                                       "(ft.safetensors), too few to read: its 95% interval is about +-69 points\n")


def test_a_dense_probe_of_fewer_mask_classes_than_the_manifests_is_refused_before_reading_an_image(
        weights, demo_shards, monkeypatch, capfd):
    """`mixmae probe --dense --mask-classes 5` on the demo's masks (11 classes, its manifest says) read and encoded the
    whole training split, then stopped on the first label past 4. The manifest's count is known before: refused."""
    from mixmae_scale.finetune import dense_probe

    line = probe_refusal(capfd, monkeypatch, (dense_probe, "load_masked_split"), weights, demo_shards, "--dense",
                         "--mask-classes", "5")
    assert line == (f"mixmae: error: --mask-classes 5: the masks of {demo_shards} label 11 classes (its manifest's "
                    "mask_classes); pass at least 11, or leave it out to take the manifest's")
