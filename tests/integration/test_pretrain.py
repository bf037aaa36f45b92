"""Pretraining for real: the `deepspeed` launcher, 2 CPU ranks (gloo), DALI on demo shards, ZeRO 1-3.

Each run is a real multi-process job, so these tests take tens of seconds each; runs shared by
several tests are module-scoped fixtures.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from deepspeed_launcher import launcher
from free_port import Ports

pytestmark = pytest.mark.slow

PORTS = Ports()


def launch(run_dir: Path, shards: Path, *overrides: str, max_steps: int | None = None, check: bool = True,
           background: bool = False, ranks: int = 2, env: dict[str, str] | None = None, flags: tuple[str, ...] = (),
           runner: bool = False):
    """Pretraining on `ranks` CPU ranks through DeepSpeed's launcher (`runner`: through the `deepspeed` command,
    for tests of the runner itself; tests/deepspeed_launcher.py)."""
    port = next(PORTS)
    cmd = [*launcher(ranks, port, runner),
           "--module", "mixmae_scale.cli", "pretrain", "--profile", "tiny", "--run-dir", str(run_dir),
           "--set", f"data.shards={shards}", "--set", "batch.micro=8", "--set", "batch.global_batch=16",
           "--set", "logging.every_steps=1",
           "--set", "logging.heldout_batches=2", "--set", "data.shuffle_buffer=64",
           "--set", "logging.visualize_every_steps=0"]  # grids: the uninterrupted runs below
    for item in overrides:
        cmd += ["--set", item]
    if max_steps:
        cmd += ["--max-steps", str(max_steps)]
    cmd += flags
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode:
        raise AssertionError(f"pretrain failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    if result.returncode == 0:  # DeepSpeed's CPU all-reduce buffers are RAM; a finished job removes them
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return result


def launch_two_nodes(run_dir: Path, shards: Path | str, *overrides: str, max_steps: int) -> list[str]:
    """Two `deepspeed --no_ssh --node_rank r` launchers on this machine stand in for two hosts of one GPU each (the
    second host is what cannot exist here); the ranks meet over gloo on 127.0.0.1. Returns both outputs."""
    hostfile = run_dir.parent / f"{run_dir.name}.hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = next(PORTS)
    procs = []
    for node in (0, 1):
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh",
               "--node_rank", str(node), "--num_nodes", "2", "--num_gpus", "1", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "--module", "mixmae_scale.cli", "pretrain", "--profile", "tiny",
               "--run-dir", str(run_dir), "--set", f"data.shards={shards}", "batch.micro=8", "batch.global_batch=16",
               "logging.every_steps=1", "logging.heldout_batches=2", "data.shuffle_buffer=64",
               "logging.visualize_every_steps=0", *overrides, "--max-steps", str(max_steps)]
        procs.append(subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-2000:] + outputs[1][-2000:]
    return outputs


def losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "metrics.csv").open() as handle:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(handle)}


def exported(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    from mixmae_scale.engine.export import export_run
    from mixmae_scale.models.convert_official import load_weights

    export_run(run_dir, out, with_decoder=True)
    return load_weights(out)[0]


NATIVE_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
needs_native_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="this CPU emulates bf16 (no AVX-512): a bf16 run "
                                       "takes ~100x longer; the fp32 runs of the same ZeRO stages cover the path")


# ZeRO-3 runs in the resume tests below and in test_elastic.py (with offload too), bf16 in test_elastic.py's bf16 run.
# ZeRO-2 (the tiny profile's stage) runs in most tests below, the signal, resume and fine-tuning ones. ZeRO-1 in fp32
# learns in test_pretrain_zero.py's accumulation test.
@needs_native_bf16
def test_loss_falls_in_bf16_under_zero1(demo_shards, tmp_path):
    run = tmp_path / "zero1"
    launch(run, demo_shards, "zero.stage=1", "precision.dtype=bf16", "optim.base_learning_rate=0.02",
           "checkpoint.every_steps=100", max_steps=40)
    curve = losses(run)
    assert sorted(curve) == list(range(1, 41))
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(36, 41)) / 5
    assert last < 0.97 * first, (first, last)
    assert_summary_shows_learning(run)


def assert_summary_shows_learning(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["heldout_loss_end"] < summary["heldout_loss_start"], summary
    assert len(summary["peak_mem_mib_per_rank"]) == 2 and summary["images_per_s"] > 0


@pytest.fixture(scope="module")
def img2dataset_download(demo_shards, tmp_path_factory) -> Path:
    """The demo's 300 train images as img2dataset leaves a download: 00000.tar ... of 64 samples in its (shuffled) URL
    order, 9-digit keys with .jpg, .txt and .json members, a .parquet and a _stats.json beside each tar, and no
    validation split."""
    import random

    import webdataset as wds

    images = sorted((demo_shards.parent / "images" / "train").glob("*/*.JPEG"))
    random.Random(0).shuffle(images)
    out = tmp_path_factory.mktemp("img2dataset")
    for shard in range(0, len(images), 64):
        number = shard // 64
        with wds.TarWriter(str(out / f"{number:05d}.tar")) as sink:
            for i, path in enumerate(images[shard:shard + 64]):
                sink.write({"__key__": f"{number:05d}{i:04d}", "jpg": path.read_bytes(), "txt": path.stem.encode(),
                            "json": json.dumps({"url": f"http://example.com/{path.name}"}).encode()})
        (out / f"{number:05d}.parquet").write_bytes(b"PAR1 not really parquet PAR1")
        (out / f"{number:05d}_stats.json").write_text(json.dumps({"count": 64, "successes": 64}))
    return out


@pytest.fixture(scope="module")
def train_only(img2dataset_download, tmp_path_factory) -> Path:
    """That download adopted where it lies: a shard set with only a train split."""
    from mixmae_scale.shards.adopt import AdoptOptions, adopt

    out = tmp_path_factory.mktemp("train_only")
    adopt(img2dataset_download, out, AdoptOptions())
    return out


@pytest.fixture(scope="module")
def uninterrupted(train_only, tmp_path_factory):
    """12 steps on a set without a validation split: the held-out loss and the grids use the train split's tail."""
    runs = {}
    for stage in (3,):  # ZeRO-2's runs: the tiny profile's stage, in most other tests
        run = tmp_path_factory.mktemp(f"full{stage}")
        launch(run, train_only, f"zero.stage={stage}", "precision.dtype=fp32", "checkpoint.every_steps=100",
               "logging.visualize_every_steps=6", max_steps=12)
        runs[stage] = run
    return runs


# ZeRO-3 here; ZeRO-2's exact resume through the same loop is the fine-tuning kill-and-resume test's.
@pytest.mark.parametrize("stage", [3])
def test_a_train_only_set_adopted_from_object_storage_trains_stops_and_resumes_like_the_local_run(
        img2dataset_download, tmp_path, uninterrupted, stage, s3_bucket):
    """An img2dataset download without a validation split, uploaded to a real S3-protocol server (moto, on the
    loopback; both ranks read it with the standard AWS variables) and adopted there: its last 16 train samples
    (2 held-out batches of 8) are held out, and 6 steps, then a resume to 12, give the uninterrupted run's losses
    and weights (the same tars adopted on disk) exactly."""
    from mixmae_scale.cli import main
    from mixmae_scale.data import storage

    for path in sorted(img2dataset_download.iterdir()):
        storage.upload(path, f"s3://{s3_bucket}/download/{path.name}")
    shards = f"s3://{s3_bucket}/adopted"
    assert main(["shards", "adopt", f"s3://{s3_bucket}/download", "--out", shards]) == 0
    run = tmp_path / "halves"
    common = (f"zero.stage={stage}", "precision.dtype=fp32", "checkpoint.every_steps=100")
    first = launch(run, shards, *common, max_steps=6)
    assert (f"held-out: no separate held-out split in {shards}; holding out the last 16 of 300 'train' samples (the "
            "end of 00004.tar, in manifest order") in first.stdout + first.stderr
    assert json.loads((run / "checkpoints" / "step00000006" / "COMPLETE").read_text())["step"] == 6
    launch(run, shards, *common, max_steps=12)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["heldout_set"] == {"split": "train", "location": shards, "samples": 16, "train_tail": 16}
    assert summary["derived"]["steps_per_epoch"] == (300 - 16) // 16
    assert summary["heldout_loss_start"] > 0 and summary["heldout_loss_end"] > 0
    full, halves = losses(uninterrupted[stage]), losses(run)
    assert halves == full  # the same layout resumes bit-exact: every logged loss, every weight
    a = exported(uninterrupted[stage], tmp_path / "full.safetensors")
    b = exported(run, tmp_path / "halves.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_export_loads_into_the_finetune_model_without_deepspeed(uninterrupted, tmp_path):
    from mixmae_scale.engine.export import export_run
    from mixmae_scale.models.classifier import SwinClassifier, load_pretrained_encoder
    from mixmae_scale.models.convert_official import load_weights
    from mixmae_scale.models.swin import SwinShape

    summary = export_run(uninterrupted[3], tmp_path / "encoder.safetensors")
    state, arch = load_weights(tmp_path / "encoder.safetensors")
    assert summary["kind"] == "encoder" and all(k.startswith("encoder.") for k in state)
    shape = SwinShape(arch["img_size"], arch["patch_size"], arch["embed_dim"], tuple(arch["depths"]),
                      tuple(arch["num_heads"]), tuple(arch["window_size"]), arch["mlp_ratio"])
    classifier = SwinClassifier(shape, num_classes=10)
    report = load_pretrained_encoder(classifier, state)
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(classifier.encoder.patch_embed.proj.weight, state["encoder.patch_embed.proj.weight"])


def test_an_official_format_export_of_a_trained_run_has_the_official_keys_and_the_same_dense_features(
        uninterrupted, tmp_path):
    """`mixmae export RUN --format official`: the official fine-tuning model's encoder keys exactly (the rule is
    checked against the official code's own state dict in tests/unit/test_backbone.py), and the dense backbone
    loaded from it gives the maps of the one loaded from our own export, on a non-square input."""
    from mixmae_scale.engine.export import export_run
    from mixmae_scale.models.backbone import load_backbone
    from tests.unit.test_backbone import official_encoder_keys

    export_run(uninterrupted[3], tmp_path / "official.pth", fmt="official")
    export_run(uninterrupted[3], tmp_path / "ours.safetensors")
    official = torch.load(tmp_path / "official.pth", weights_only=True)["model"]
    from mixmae_scale.models.convert_official import load_weights

    assert set(official) == official_encoder_keys(tuple(load_weights(tmp_path / "ours.safetensors")[1]["depths"]))
    images = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        theirs, ours = (load_backbone(tmp_path / name).eval()(images) for name in ("official.pth", "ours.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours, strict=True))


def test_a_finished_run_started_again_says_so_and_touches_nothing(uninterrupted, train_only):
    run = uninterrupted[3]
    files = sorted(p for p in run.rglob("*") if p.is_file())
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    result = launch(run, train_only, "zero.stage=3", "precision.dtype=fp32", "checkpoint.every_steps=100",
                    "logging.visualize_every_steps=6", max_steps=12)
    text = result.stdout + result.stderr
    assert f"already complete at step 12 ({run / 'checkpoints' / 'step00000012'}); nothing to do" in text
    assert "resumed from" not in text
    assert sorted(p for p in run.rglob("*") if p.is_file()) == files
    assert all((p.stat().st_mtime_ns, p.read_bytes()) == before[p] for p in files)


def test_another_run_in_a_used_folder_is_refused_and_overwrite_moves_the_earlier_run_aside(uninterrupted, train_only,
                                                                                           tmp_path, capsys):
    """The path a user takes: a finished run's folder reused for another model shape. The resume plan every start
    makes refuses it in one line naming the keys that differ and both ways out, reading nothing but the folder
    (called here as the start calls it, on the trained run's own checkpoint: how a refusal at the start reaches the
    user, once, through the launcher, is tests/integration/test_finetune.py's; that a start touches nothing before
    its plan, the finished-run test's above). With --overwrite the earlier run moves, whole, to RUN.old-1, and the
    new run trains, rotates (keeping the step it has just written), names an existing checkpoint in its summary and
    is what `mixmae export` exports, saying so."""
    import shutil

    from mixmae_scale.cli import main
    from mixmae_scale.config import load_resolved
    from mixmae_scale.config.deepspeed_config import engine_config
    from mixmae_scale.engine.checkpointing.resume import decide_resume
    from mixmae_scale.engine.checkpointing.state import RunIdentity
    from mixmae_scale.engine.checkpointing.store import ResumeError, complete_tags
    from mixmae_scale.engine.checkpointing.universal import optimizer_layout
    from mixmae_scale.models.convert_official import load_weights

    run, moved = tmp_path / "reused", tmp_path / "reused.old-1"
    shutil.copytree(uninterrupted[3], run)
    copied = json.loads((run / "summary.json").read_text())  # as if the run had been made in this folder
    (run / "summary.json").write_text(json.dumps({**copied, "checkpoint": str(run / "checkpoints" / "step00000012")}))
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    other = ("zero.stage=3", "precision.dtype=fp32", "model.embed_dim=16", "checkpoint.every_steps=2",
             "checkpoint.keep_last=1")
    resolved = load_resolved("tiny", None, [f"data.shards={train_only}", "batch.micro=8", "batch.global_batch=16",
                                            *other], world_size=2, train_samples=300 - 16)
    identity = RunIdentity.of(resolved, optimizer_layout(engine_config(resolved, run)))
    with pytest.raises(ResumeError) as refused:
        checkpoint, faults = resolved.config.checkpoint, resolved.config.faults
        decide_resume(run / "checkpoints", checkpoint.resume, faults.on_nonfinite_stop, identity, 2)
    error = str(refused.value)
    assert "\n" not in error
    assert f"{run} holds a run of another model (model.embed_dim 32 -> 16), checkpoint step00000012" in error
    assert f"new --run-dir (run.name with `mixmae launch`), or add --overwrite to move the earlier run to {moved}" \
        in error
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    result = launch(run, train_only, *other, max_steps=4, flags=("--overwrite",))
    assert f"the earlier run in {run} was moved to {moved}" in result.stdout + result.stderr
    assert {p.relative_to(moved) for p in moved.rglob("*") if p.is_file()} == set(before)
    old_summary = json.loads((moved / "summary.json").read_text())
    assert old_summary["checkpoint"] == str(moved / "checkpoints" / "step00000012")
    assert (moved / "checkpoints" / "step00000012" / "COMPLETE").exists()
    assert complete_tags(run / "checkpoints") == ["step00000004"]  # keep_last=1: step 2 went
    summary = json.loads((run / "summary.json").read_text())
    assert summary["checkpoint"] == str(run / "checkpoints" / "step00000004") and summary["steps"] == 4
    assert sorted(losses(run)) == [1, 2, 3, 4]
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["model"]["embed_dim"] == 16 and written["data"]["crop_scale"] == [0.2, 1.0]  # recipe, not null
    assert main(["export", str(run)]) == 0
    assert capsys.readouterr().out.startswith(f"exported step 4 of run {run} to {run / 'encoder.safetensors'}: "
                                              "encoder, ")
    assert load_weights(run / "encoder.safetensors")[1]["embed_dim"] == 16


def test_curves_and_reconstructions_of_real_runs(uninterrupted, demo_shards, tmp_path):
    from PIL import Image

    from mixmae_scale.visualize.curves import plot_runs
    from mixmae_scale.visualize.reconstruction import visualize

    for run in uninterrupted.values():  # the grids written during training, at every 6th step
        assert sorted(p.name for p in (run / "reconstructions").glob("*.png")) == ["step00000006.png",
                                                                               "step00000012.png"]
    # A second, shorter run to compare against: the same run's folder with its first half of metrics.
    import shutil

    short = tmp_path / "short"
    shutil.copytree(uninterrupted[3], short, ignore=shutil.ignore_patterns("checkpoints", "reconstructions"))
    rows = (short / "metrics.csv").read_text().splitlines()
    (short / "metrics.csv").write_text("\n".join(rows[:1 + (len(rows) - 1) // 2]) + "\n")
    curves = plot_runs([str(uninterrupted[3]), str(short)], tmp_path / "curves.png")
    assert curves["panels"] == ["training loss", "learning rate", "images/s"]  # no MFU on a CPU: left out
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size == (1200, 360) and len(image.convert("L").getcolors()) > 10  # 256 grey levels at most
    result = visualize(str(uninterrupted[3]), str(demo_shards), tmp_path / "rec.png", pairs=2)
    assert result["title"].startswith(f"run {uninterrupted[3].name}, step 12:") and result["pairs"] == 2
    with Image.open(tmp_path / "rec.png") as image:
        assert image.size[0] == 7 * 128 + 30  # seven 96-pixel columns drawn at 128 pixels, with their names


def test_a_failure_on_one_rank_ends_the_whole_job_quickly_with_one_traceback(demo_shards, tmp_path):
    """Rank 1 raises after step 3; rank 0 is then inside a collective. The job must end non-zero within
    seconds (not at the 30-minute collective timeout), showing rank 1's traceback once."""
    start = time.time()
    result = launch(tmp_path / "failing", demo_shards, "faults.inject_exception_at=[1,3]", "precision.dtype=fp32",
                    max_steps=400, check=False, runner=True)
    elapsed = time.time() - start
    output = result.stdout + result.stderr
    assert result.returncode == 1  # a failure, not a refused input (2): worth a resubmission if the machine was why
    assert elapsed < 120, f"the job took {elapsed:.0f} s to end"
    assert output.count("Traceback (most recent call last)") == 1, output[-4000:]
    assert "mixmae: rank 1 failed:" in output and "injected fault on rank 1 after step 3" in output
    assert "mixmae: rank 0 failed" not in output
    port = result.args[result.args.index("--master_port") + 1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_1")), "the failing rank left its buffer"


def wait_for_steps(run: Path, proc, count: int = 2) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.csv").exists() and len((run / "metrics.csv").read_text().splitlines()) > count:
            return
        time.sleep(0.3)
    raise AssertionError("the run did not log its first steps in time")


def _assert_saved_on_signal_where_a_resume_starts(run: Path, *overrides: str) -> None:
    """The stop's checkpoint is sealed for both ranks at the step the run stopped, and it is what the resume plan
    of the same configuration picks, in the same layout. (It is written by the same save as every interval
    checkpoint, which the resume tests load through the engine.)"""
    from mixmae_scale.config import load_resolved
    from mixmae_scale.config.deepspeed_config import engine_config
    from mixmae_scale.engine.checkpointing.resume import decide_resume
    from mixmae_scale.engine.checkpointing.state import RunIdentity
    from mixmae_scale.engine.checkpointing.universal import optimizer_layout

    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by_signal"] and 0 < summary["steps"] < 400
    checkpoint = Path(summary["checkpoint"])
    marker = json.loads((checkpoint / "COMPLETE").read_text())
    assert marker["step"] == summary["steps"] and marker["world_size"] == 2
    assert {"rank_0.json", "rank_1.json"} <= set(marker["files"])
    resolved = load_resolved("tiny", None, list(overrides), world_size=2, train_samples=300)
    identity = RunIdentity.of(resolved, optimizer_layout(engine_config(resolved, run)))
    plan = decide_resume(run / "checkpoints", "auto", resolved.config.faults.on_nonfinite_stop, identity, 2)
    assert (plan.tag, plan.step, plan.same_layout) == (checkpoint.name, summary["steps"], True), plan


def test_usr1_to_mixmae_launch_reaches_every_rank(demo_shards, tmp_path):
    """The relay's half of `sbatch --signal=USR1@300` and `scancel --signal=USR1`: Slurm signals every process of
    the job step, the ranks included (`B:` would signal the batch shell only); here USR1 goes to `mixmae launch` alone
    (the relay, as in launch/slurm/pretrain.sbatch), which must pass it on, since DeepSpeed's launchers do not."""
    run = tmp_path / "usr1"
    port = next(PORTS)
    config = [f"data.shards={demo_shards}", "batch.micro=8", "batch.global_batch=16", "logging.every_steps=1",
              "logging.heldout_batches=2", "data.shuffle_buffer=64", "precision.dtype=fp32",
              "checkpoint.every_steps=1000"]
    cmd = [str(Path(sys.executable).parent / "mixmae"), "launch", "tiny", "--set", *config,
           f"cluster.master_port={port}", f"run.output_dir={tmp_path}", "run.name=usr1"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for_steps(run, proc)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    assert "asking 2 ranks to checkpoint" in output
    _assert_saved_on_signal_where_a_resume_starts(run, *config)


def test_sigterm_to_the_plain_deepspeed_launcher_still_saves(demo_shards, tmp_path):
    """DeepSpeed's runner dies of SIGTERM without telling the ranks; they notice their launcher is gone."""
    run = tmp_path / "term"
    proc = launch(run, demo_shards, "precision.dtype=fp32", "checkpoint.every_steps=1000", max_steps=400, runner=True,
                  background=True)
    wait_for_steps(run, proc)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank" in " ".join(p.cmdline())]
    proc.send_signal(signal.SIGTERM)  # the launcher alone
    proc.communicate(timeout=60)
    psutil.wait_procs(ranks, timeout=240)
    summary = json.loads((run / "summary.json").read_text())  # where a resume starts from it: the test above
    assert summary["stopped_by_signal"] and 0 < summary["steps"] < 400
    assert (Path(summary["checkpoint"]) / "COMPLETE").exists()


def test_a_named_resume_refused_moves_nothing_and_the_same_command_again_continues_its_branch(demo_shards,
                                                                                              tmp_path):
    """`checkpoint.resume=<tag>` in a job script: a start refused for the tag itself (damaged here) used to have moved
    the later checkpoints aside already; a preempted branch resubmitted as it was used to move its own new
    checkpoints aside and start from the tag again, every time. One process alone (no launcher: the folder's rules
    are rank 0's, the same on any world size)."""
    def alone(*overrides: str, max_steps: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "mixmae_scale.cli", "pretrain", "--profile", "tiny", "--run-dir", str(run),
               "--set", f"data.shards={demo_shards}", "batch.micro=8", "batch.global_batch=8", "model.embed_dim=8",
               "model.num_heads=[1,1,2,4]", "logging.heldout_batches=1", "data.shuffle_buffer=64",
               "logging.visualize_every_steps=0", "precision.dtype=fp32", "zero.stage=0", "checkpoint.every_steps=2",
               *overrides, "--max-steps", str(max_steps)]
        return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=300)

    run = tmp_path / "run"
    assert alone(max_steps=4).returncode == 0
    checkpoints = run / "checkpoints"
    rank_file = checkpoints / "step00000002" / "rank_0.json"
    kept = rank_file.read_bytes()
    rank_file.write_bytes(kept[:-1])
    refused = alone("checkpoint.resume=step00000002", max_steps=6)
    assert refused.returncode == 2 and "step00000002 is damaged: rank_0.json has" in refused.stderr
    assert (checkpoints / "step00000004" / "COMPLETE").exists() and not (run / "superseded-1").exists()
    rank_file.write_bytes(kept)
    branched = alone("checkpoint.resume=step00000002", max_steps=3)
    assert branched.returncode == 0, branched.stderr[-3000:]
    assert "were moved to " + str(run / "superseded-1") in branched.stderr
    assert sorted(p.name for p in checkpoints.glob("step*")) == ["step00000002", "step00000003"]
    again = alone("checkpoint.resume=step00000002", max_steps=4)  # the job script resubmitted as it was
    assert again.returncode == 0, again.stderr[-3000:]
    assert "this run already went on from step00000002 (step00000003 since), so it resumes from step00000003" \
        in again.stderr
    assert f"resumed from {checkpoints / 'step00000003'} at step 3" in again.stderr
    assert not (run / "superseded-2").exists()
    assert sorted(p.name for p in checkpoints.glob("step*")) == ["step00000002", "step00000003", "step00000004"]
