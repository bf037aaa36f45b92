"""Fine-tuning, evaluation and linear probing for real: deepspeed launcher, 2 CPU ranks, demo shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deepspeed_launcher import launcher
from free_port import free_port

pytestmark = pytest.mark.slow


def run(*args: str, ranks: int = 2, port: int | None = None, threads: int = 1) -> subprocess.CompletedProcess:
    """`mixmae_scale.cli ARGS` on `ranks` ranks through DeepSpeed's per-node launcher (tests/deepspeed_launcher.py)."""
    command = [*launcher(ranks, port or free_port()), "--module", "mixmae_scale.cli"]
    result = subprocess.run(command + list(args), env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


# The official recipe's augmentations (finetune_b's), which the demo profile turns off: the runs here exercise them.
OFFICIAL_AUGMENTATION = ("optim.base_learning_rate=2e-3", "schedule.epochs=3", "schedule.warmup_epochs=0.5",
                         "finetune.mixup=0.8", "finetune.cutmix=1.0", "finetune.rand_augment_ops=2",
                         "finetune.random_erasing=0.25")


def finetune_command(run_dir: Path, shards: Path, port: int, max_steps: int, *overrides: str,
                     init: str | Path = "random") -> list[str]:
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "--module",
            "mixmae_scale.cli", "finetune", "--profile", "finetune_tiny", "--run-dir", str(run_dir),
            "--max-steps", str(max_steps), "--set", f"data.shards={shards}", f"finetune.init={init}", "batch.micro=8",
            "batch.global_batch=16", "logging.every_steps=1", "data.shuffle_buffer=64",
            "finetune.eval_every_epochs=0.5", "checkpoint.every_steps=6", *OFFICIAL_AUGMENTATION, *overrides]


def random_encoder(path: Path) -> Path:
    """An encoder of finetune_tiny's shape with seeded random weights, written as `mixmae export` writes one: a
    finetune.init file that the same seed writes again byte for byte."""
    import torch

    from mixmae_scale.config import load_resolved
    from mixmae_scale.models.convert_official import infer_architecture, save_weights
    from mixmae_scale.models.mixmae import swin_shape
    from mixmae_scale.models.swin import SwinEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = SwinEncoder(swin_shape(load_resolved("finetune_tiny").config.model))
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    save_weights(path, state, infer_architecture(state), "encoder")
    return path


@pytest.fixture(scope="module")
def finetuned(demo_shards, tmp_path_factory):
    """A short fine-tune (from an encoder file of random weights, mixup + cutmix + RandAugment + erasing, the
    profile's precision), checkpoints every 6 steps, and its export: also the uninterrupted run of the
    kill-and-resume test."""
    root = tmp_path_factory.mktemp("finetune")
    result = subprocess.run(finetune_command(root / "run", demo_shards, free_port(), 20,
                                             init=random_encoder(root / "encoder.safetensors")),
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (root / "finetune.log").write_text(result.stdout + result.stderr)
    from mixmae_scale.engine.export import export_run

    export_run(root / "run", root / "classifier.safetensors")
    return root


def test_finetune_evaluates_every_sample_once_on_schedule_and_keeps_the_best(finetuned):
    """20 steps from a random init learn nothing yet (the next test measures learning); what this run checks is the
    evaluation around the training: on schedule, over the whole split on 2 ranks, the best one kept. That every
    sample counted once is the evaluation's own check (the ids out of the decoder against the split's): a row
    exists only where it held."""
    evals = [json.loads(line) for line in (finetuned / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [9, 18, 20]  # every half epoch (18 steps/epoch) and at the end
    assert all(e["samples"] == 80 for e in evals)  # 80 validation images, none twice, none lost
    summary = json.loads((finetuned / "run" / "summary.json").read_text())
    assert summary["best"]["top1"] == max(e["top1"] for e in evals)
    assert (finetuned / "run" / "best").is_dir() and any((finetuned / "run" / "best").glob("*/COMPLETE"))
    assert all(e["loss"] == e["loss"] for e in evals)


def test_the_run_records_the_classes_it_learns_and_its_export_carries_them(finetuned, demo_shards):
    """RUN/trained_classes.json, written when the run starts, and the export's metadata: what `mixmae eval` checks
    the shards' classes against (finetune/trained_classes.py)."""
    from mixmae_scale.data.manifest import load_manifest
    from mixmae_scale.finetune.trained_classes import class_identities, recorded_classes

    names = class_identities(load_manifest(demo_shards).classes)
    assert len(names) == 10 and None not in names
    assert recorded_classes(finetuned / "run") == names == recorded_classes(finetuned / "classifier.safetensors")


def test_finetuning_log_has_no_deprecation_warnings_or_deepspeed_build_lines(finetuned):
    """DALI's RandAugment used deprecated `fn.experimental` operators: eight warnings, half of this log."""
    log = (finetuned / "finetune.log").read_text()
    written = yaml.safe_load((finetuned / "run" / "config.yaml").read_text())
    assert written["finetune"]["rand_augment_ops"] > 0
    assert written["data"]["crop_scale"] == [0.08, 1.0]  # the scale it cropped with (the profile leaves it null)
    assert "is now deprecated" not in log and "built successfully" not in log
    assert "eval at step 20" in log  # the log is the run's


def test_export_best_writes_the_best_checkpoints_classifier(finetuned, tmp_path):
    """README: `best/` keeps the best checkpoint; `mixmae export RUN --best` (or RUN/best) exports it."""
    from mixmae_scale.engine.export import export_run
    from mixmae_scale.models.convert_official import load_weights, read_metadata

    summary = json.loads((finetuned / "run" / "summary.json").read_text())
    best = export_run(finetuned / "run", tmp_path / "best.safetensors", best=True)
    assert best["kind"] == "finetune" and Path(best["checkpoint"]).parent == finetuned / "run" / "best"
    assert read_metadata(tmp_path / "best.safetensors")["step"] == str(summary["best"]["step"])
    export_run(finetuned / "run" / "best", tmp_path / "folder.safetensors")
    a, b = load_weights(tmp_path / "best.safetensors")[0], load_weights(tmp_path / "folder.safetensors")[0]
    assert "head.weight" in a and a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_a_finetune_on_two_ranks_continues_on_one_with_its_evaluations_and_best(finetuned, demo_shards, tmp_path):
    """Fine-tuning 2 -> 1 ranks at the same global batch (8 x 2 accumulated): the optimizer state goes through
    DeepSpeed's universal checkpoint, and the job's own state carries over: eval.jsonl keeps its rows and grows,
    and the best top-1 so far (with its checkpoint in best/) is kept unless a new evaluation beats it."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finetuned / "run", run_dir)
    before = json.loads((run_dir / "summary.json").read_text())["best"]
    result = run("finetune", "--profile", "finetune_tiny", "--run-dir", str(run_dir), "--set",
                 f"data.shards={demo_shards}", f"finetune.init={finetuned / 'encoder.safetensors'}", "batch.micro=8",
                 "batch.global_batch=16", "logging.every_steps=5", "data.shuffle_buffer=64",
                 "finetune.eval_every_epochs=0.5",
                 *OFFICIAL_AUGMENTATION, "--max-steps", "24", ranks=1)
    text = result.stdout + result.stderr
    assert "across a change of layout (world size 2 -> 1)" in text and "resumed from" in text, text[-3000:]
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [9, 18, 20, 24] and all(e["samples"] == 80 for e in evals)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["best"]["top1"] == max(e["top1"] for e in evals)
    assert summary["best"]["top1"] >= before["top1"]
    if summary["best"]["step"] == before["step"]:
        assert summary["best"] == before


def test_eval_counts_each_sample_once_over_two_ranks_with_uneven_shards_and_a_split_under_one_batch(
        finetuned, demo_shards, capsys):
    # The val split is 80 images in shards of 64 and 16: the ranks' shares straddle the shard boundary. On two
    # ranks at --batch 64 each rank's 40 images are less than one batch: evaluated whole, in a smaller batch.
    # The one-rank reference runs in this process (a process alone needs no launcher).
    from mixmae_scale.cli import main

    weights = str(finetuned / "classifier.safetensors")
    out = run("eval", "--init", weights, "--data", str(demo_shards), "--batch", "64", "--json", ranks=2,
              port=free_port())
    text = out.stdout
    two = json.loads(text[text.rindex("\n{\n") + 1:text.rindex("}") + 1])  # the printed report
    assert "Detected checkpoint" not in out.stdout + out.stderr and "built successfully" not in out.stdout
    capsys.readouterr()
    assert main(["eval", "--init", weights, "--data", str(demo_shards), "--batch", "16", "--json"]) == 0
    printed = capsys.readouterr().out
    one = json.loads(printed[printed.index("{"):])
    assert two["samples"] == one["samples"] == 80 and two["batch"] == 40
    assert two["top1"] == pytest.approx(one["top1"]) and two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    assert one["precision"] == "fp32"  # the default, whatever the run computed in


def test_eval_in_the_runs_precision_gives_the_runs_own_last_evaluation(finetuned, demo_shards, capsys):
    """`mixmae eval --precision auto` makes the run's precision choice on this machine and holds the weights in it,
    as the run's DeepSpeed engine did: the exported last step then scores what the run's last evaluation wrote
    (where the run trained in bf16, fp32 weights under bf16 autocast scored 2 images of 1500 apart on the demo,
    and fp32 itself 10: docs/training.md)."""
    from mixmae_scale.cli import main

    last = json.loads((finetuned / "run" / "eval.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 20 and last["precision"] in ("bf16", "fp32")
    capsys.readouterr()
    weights = str(finetuned / "classifier.safetensors")  # the last step's (the fixture's export)
    assert main(["eval", "--init", weights, "--data", str(demo_shards), "--precision", "auto", "--batch", "8",
                 "--json"]) == 0  # in this process, one rank, the run's per-rank batch
    printed = capsys.readouterr().out
    report = json.loads(printed[printed.index("{"):])
    assert report["precision"] == last["precision"] and report["samples"] == 80
    assert report["top1"] == last["top1"] and report["top5"] == last["top5"]
    # The top-1 and top-5 above are equal. The loss was equal to the last bit alone (AMD EPYC, native bf16) and within
    # 1e-7 in a full CI run, but once 3.0e-6 apart in another full CI run, so it is held to 1e-5; the cause is not
    # found. Tried on this test's own run on that machine (benchmarks/eval_agreement.py,
    # benchmarks/results/eval_agreement_demo_cpu.json), each bit-equal to the run's loss, so not the cause there:
    # 2 intra-op threads instead of 1 (CI and tests/conftest.py run both sides at 1 anyway); the ranks' partial sums
    # against one process (each rank's 40 images are this process's batches 0-4 or 5-9, the same 8 images each, and
    # the rank sums meet in float64); an fp32 `mixmae eval` earlier in the same process, as this module runs one.
    # In bf16 any change of fp32 arithmetic can move roundings: batches of 1, 5 or 16 and oneDNN without native bf16
    # moved the loss 6.5e-9 to 2.1e-8, ATen's AVX2 kernels instead of AVX-512 2.7e-7, all with top-1 and top-5
    # equal, still 10x under what CI saw; a CI machine of another CPU was not tried. The bound no longer tells bf16
    # weights from fp32 weights under bf16 autocast (2.8e-7 apart in the same file); the precision field does.
    assert report["loss"] == pytest.approx(last["loss"], rel=1e-5)


def metric_losses(run_dir: Path) -> dict[int, float]:
    import csv

    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), f"duplicate metric rows: {steps}"
    return {int(r["step"]): float(r["loss"]) for r in rows}


def test_finetune_killed_and_resumed_matches_the_uninterrupted_run(finetuned, demo_shards, tmp_path):
    """The module's 20 steps in one go against 6 + kill -9 (mid-run, after the step-6 checkpoint) + resume: the same
    losses, evaluations and weights. Mixup, cutmix, random erasing and RandAugment all draw random numbers every
    step. The init file is gone by the resume (cleaned up, as a scratch file may be): the checkpoint holds every
    weight, so the same command goes on without it."""
    import signal
    import time

    import torch

    from mixmae_scale.engine.export import export_run
    from mixmae_scale.models.convert_official import load_weights

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed, init = tmp_path / "killed", random_encoder(tmp_path / "encoder.safetensors")  # the fixture's bytes
    proc = subprocess.Popen(finetune_command(killed, demo_shards, free_port(), 20, init=init), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = killed / "checkpoints" / "step00000006" / "COMPLETE"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not marker.exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # launcher and both ranks, as a node failure would
    proc.wait()
    assert marker.exists() and not (killed / "summary.json").exists()
    init.unlink()
    resumed = subprocess.run(finetune_command(killed, demo_shards, free_port(), 20, init=init), env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = metric_losses(finetuned / "run"), metric_losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert b == a  # the same layout resumes bit-exact
    evals = [[json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
             for run in (finetuned / "run", killed)]
    assert [e["step"] for e in evals[1]] == [e["step"] for e in evals[0]] == [9, 18, 20]
    for full, again in zip(*evals, strict=True):
        assert (again["top1"], again["samples"]) == (full["top1"], full["samples"])
        assert again["loss"] == full["loss"]
    export_run(killed, tmp_path / "killed.safetensors")
    wa = load_weights(finetuned / "classifier.safetensors")[0]
    wb = load_weights(tmp_path / "killed.safetensors")[0]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_finetune_sigterm_saves_a_checkpoint_and_exits_zero(demo_shards, tmp_path):
    import signal
    import time

    import psutil

    run_dir = tmp_path / "preempted"
    proc = subprocess.Popen(finetune_command(run_dir, demo_shards, free_port(), 400, "checkpoint.every_steps=1000",
                                             "precision.dtype=fp32", "finetune.eval_every_epochs=100"),
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (run_dir / "metrics.csv").exists():
        time.sleep(0.2)
    time.sleep(1)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "finetune" in " ".join(p.cmdline())
             and "deepspeed.launcher" not in " ".join(p.cmdline())]
    assert len(ranks) == 2
    for p in ranks:
        p.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by_signal"] and 0 < summary["steps"] < 400
    assert (Path(summary["checkpoint"]) / "COMPLETE").exists()
    assert Path(summary["checkpoint"]).name == f"step{summary['steps']:08d}"


def test_a_mistake_every_rank_makes_is_said_once_in_one_line_after_the_launchers_output(demo_shards, tmp_path):
    """`finetune.init` naming a text file, through the launcher on 2 ranks: one line, not an 18-line traceback per
    rank, and not two ranks' error lines run together on one line. Started as `mixmae launch` and the sbatch
    script start it (the signal relay around DeepSpeed's runner), the refusal comes after DeepSpeed's "Killing
    subprocess" lines: it is the last line the user sees."""
    import re

    (tmp_path / "notes.txt").write_text("my notes\n")
    command = [sys.executable, "-m", "mixmae_scale.cluster.signal_relay",
               str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               "--module", "mixmae_scale.cli", "finetune", "--profile", "finetune_tiny", "--run-dir",
               str(tmp_path / "run"), "--set", f"data.shards={demo_shards}", "finetune.init=notes.txt"]
    result = subprocess.run(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=300)  # one stream: the order as seen
    output = result.stdout
    ours = [line for line in output.splitlines() if "mixmae:" in line]
    # 2: the refusal's code, through DeepSpeed's launcher and the relay (a resubmitting script does not retry it)
    assert result.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert output.rstrip("\n").split("\n")[-1] == ours[-1] and "Killing subprocess" in output, output[-3000:]
    assert len(ours) == 1 and re.fullmatch(
        r"mixmae: error( \(rank 1\))?: finetune\.init=notes\.txt: expected a \.safetensors file \(`mixmae export`\), "
        rf"a run folder or an official MixMIM \.pth; {re.escape(str(tmp_path / 'notes.txt'))} is none of these",
        ours[0]), output[-3000:]
    assert not (tmp_path / "run").exists()  # refused before the run folder is made
