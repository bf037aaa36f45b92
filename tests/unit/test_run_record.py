"""The run record says where a run came from: the commit and dirty flag of a real git checkout, the versions that
are installed, the digests of the shard sets read, the resumes; and the scaling report warns when the points of
one fit come from different code or data. W&B asked for without its package is a one-line error."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from mixmae_scale.config import ConfigError, load_config, resolve
from mixmae_scale.engine import run_record
from mixmae_scale.engine.checkpointing.resume import ResumePlan
from mixmae_scale.scaling.report import provenance_warnings, report_markdown


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t", *args], check=True,
                          capture_output=True, text=True).stdout.strip()


def test_code_version_names_the_checkouts_commit_and_only_tracked_changes_make_it_dirty(tmp_path):
    repo = tmp_path / "checkout"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "module.py").write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "first")
    head = _git(repo, "rev-parse", "HEAD")
    (repo / "pkg" / "untracked_run_output.txt").write_text("a run folder in the checkout")
    clean = run_record.code_version(repo / "pkg")
    assert (clean["commit"], clean["dirty"]) == (head, False)
    assert run_record.describe_commit(clean) == head[:12]
    (repo / "pkg" / "module.py").write_text("x = 2\n")
    dirty = run_record.code_version(repo / "pkg")
    assert (dirty["commit"], dirty["dirty"]) == (head, True)
    assert run_record.describe_commit(dirty) == head[:12] + "+dirty"


def test_outside_a_checkout_the_installed_version_stands_for_the_code(tmp_path):
    import mixmae_scale

    code = run_record.code_version(tmp_path)
    assert code == {"source": "installed", "version": mixmae_scale.__version__, "commit": None, "dirty": None}
    assert run_record.describe_commit(code) == f"v{mixmae_scale.__version__}"


def test_package_versions_are_the_installed_ones_and_absent_packages_are_left_out():
    import deepspeed
    import torch

    versions = run_record.package_versions(("torch", "deepspeed", "no-such-distribution-xyz"))
    assert sorted(versions) == ["deepspeed", "torch"]
    assert versions["deepspeed"] == deepspeed.__version__ and torch.__version__.startswith(versions["torch"])


def _manifest(folder: Path, val_sha: str = "v0") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shard = {"index": "x.idx", "samples": 10, "bytes": 100}
    manifest = {"format": "mixmae-scale-shards", "version": 2, "classes": [],
                "splits": {"train": {"samples": 20, "shards": [{**shard, "name": "train-0.tar", "sha256": "t0"},
                                                               {**shard, "name": "train-1.tar", "sha256": "t1"}]},
                           "val": {"samples": 10, "shards": [{**shard, "name": "val-0.tar", "sha256": val_sha}]}}}
    (folder / "dataset.json").write_text(json.dumps(manifest))
    return folder


def test_split_digests_follow_the_shards_content_and_a_sweeps_subset_keeps_the_held_out_one(tmp_path):
    from mixmae_scale.scaling.subsets import subset_shards

    full = _manifest(tmp_path / "full")
    half = subset_shards(full, 0.5, tmp_path / "sweep")  # names rewritten to absolute paths into the full set
    regenerated = _manifest(tmp_path / "regenerated", val_sha="v1")  # a val shard with other bytes
    val = {name: run_record.shard_set_digest(str(folder), "val", "held-out")
           for name, folder in (("full", full), ("half", half), ("regenerated", regenerated))}
    train = {name: run_record.shard_set_digest(str(folder), "train", "train")
             for name, folder in (("full", full), ("half", half))}
    assert val["full"]["split_digest"] == val["half"]["split_digest"] != val["regenerated"]["split_digest"]
    assert train["full"]["split_digest"] != train["half"]["split_digest"]
    assert (train["full"]["shards"], train["half"]["shards"], train["full"]["samples"]) == (2, 1, 20)
    assert val["full"]["manifest_sha256"] != val["regenerated"]["manifest_sha256"]


def _context(tmp_path: Path, world: int, resume: ResumePlan | None):
    config, sources = load_config("tiny", overrides=[f"data.shards={_manifest(tmp_path / 'shards')}",
                                                     "precision.dtype=fp32"])
    resolved = resolve(config, sources, world_size=world, train_samples=2000)
    layout = {"zero_stage": 2, "dtype": "fp32", "offload": False}
    return SimpleNamespace(root=tmp_path / "run", resolved=resolved, config=config, world=world, layout=layout,
                           resume=resume)


def test_the_record_keeps_every_launch_and_each_resumes_step_and_layouts(tmp_path):
    first = _context(tmp_path, 2, None)
    first.root.mkdir()
    record = run_record.RunRecord.begin(first, "pretrain", 0, ["cpu"] * 2, argv=["mixmae", "pretrain"])
    assert json.loads((first.root / "run.json").read_text())["status"] == "running"  # written at the start
    record.finish({"steps": 4, "planned_steps": 4, "stopped_by_signal": True})
    plan = ResumePlan("step00000004", saved_world=2, saved_layout={"zero_stage": 2, "dtype": "fp32", "offload": False},
                      load_tag="step00000004-universal", universal=True, same_layout=False)
    second = run_record.RunRecord.begin(_context(tmp_path, 1, plan), "pretrain", 4, ["cpu"], argv=["mixmae"])
    second.finish({"steps": 8, "planned_steps": 8, "stopped_by_signal": False})
    saved = run_record.read_record(first.root)
    assert [(x["start_step"], x["end_step"], x["outcome"], x["world_size"]) for x in saved["launches"]] == [
        (0, 4, "stopped by a signal", 2), (4, 8, "ended at --max-steps", 1)]
    (resume,) = saved["resumes"]
    assert (resume["step"], resume["checkpoint"], resume["universal"]) == (4, "step00000004", True)
    assert resume["old_layout"]["world_size"] == 2 and resume["new_layout"]["world_size"] == 1
    assert [d["role"] for d in saved["data"]] == ["train", "held-out"]
    assert saved["precision"]["dtype"] == "fp32" and saved["precision"]["reason"]
    text = run_record.describe(saved)
    assert "step 4 from step00000004, layout world_size 2 -> 1 (through DeepSpeed's universal checkpoint)" in text
    assert "steps 0 -> 4, stopped by a signal, world size 2" in text


def test_the_record_keeps_which_checkpoint_of_a_run_folder_a_finetuning_started_from_across_resumes(tmp_path):
    """A resume reads no init weights (its checkpoint holds them): the first launch's record of them stays."""
    init = {"key": "finetune.init", "path": "/runs/mixmae-b", "checkpoint": "/runs/mixmae-b/checkpoints/step00000405",
            "tag": "step00000405", "step": 405}
    first = _context(tmp_path, 2, None)
    first.root.mkdir()
    run_record.RunRecord.begin(first, "finetune", 0, ["cpu"] * 2, argv=["mixmae"], init=init).finish(
        {"steps": 4, "planned_steps": 4, "stopped_by_signal": True})
    plan = ResumePlan("step00000004", saved_world=2, saved_layout={"zero_stage": 2, "dtype": "fp32", "offload": False},
                      load_tag="step00000004")
    run_record.RunRecord.begin(_context(tmp_path, 2, plan), "finetune", 4, ["cpu"] * 2, argv=["mixmae"])
    saved = run_record.read_record(first.root)
    assert saved["init"] == init and len(saved["launches"]) == 2
    assert "init:       finetune.init=/runs/mixmae-b: checkpoint step00000405 (step 405)" in run_record.describe(saved)


def _row(run_id: str, commit: str | None, data: str | None) -> dict:
    row = {"run_id": run_id, "params": 1000, "images_seen": 100, "flops": 1e9, "heldout_loss": 0.5}
    return {**row, "commit": commit, "data_digest": data} if commit or data else row


def test_the_report_warns_when_a_fits_points_come_from_different_commits_or_data():
    same = [_row("a", "abc", "d1"), _row("b", "abc", "d1")]
    assert provenance_warnings(same) == []
    (code,) = provenance_warnings([_row("a", "abc", "d1"), _row("b", "def", "d1")])
    assert "2 different code commits" in code and "abc: a" in code and "def: b" in code
    (data,) = provenance_warnings([_row("a", "abc", "d1"), _row("b", "abc", "d2")])
    assert "2 different held-out data" in data
    (dirty,) = provenance_warnings([_row("a", "abc+dirty", "d1")])
    assert "uncommitted changes (a)" in dirty
    fit = {"bootstrap": {"rounds": 0, "seed": 0}, "compute_fit_on": "-", "L_of_C": "x", "L_of_N_D": "x",
           "extrapolation": {"law": "-", "method": "-", "result": "-"}, "compute_optimal": "x"}
    table = report_markdown([_row("a", "abc", "d1"), _row("b", "def", "d1")], fit, [])
    assert "| a | 1,000 | 100 | 1e+09 | 0.5000 | abc | d1 |" in table and "**Warning:** the points" in table


def test_wandb_without_its_package_is_a_one_line_error_naming_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    config, _ = load_config("tiny", overrides=["logging.wandb.mode=offline"])
    with pytest.raises(ConfigError) as error:
        resolve(config, world_size=1, train_samples=2000)
    assert str(error.value) == ('logging.wandb.mode=offline needs the wandb package: pip install '
                                '"mixmae-scale[wandb]" (or set logging.wandb.mode=off)')
    off, _ = load_config("tiny")
    resolve(off, world_size=1, train_samples=2000)  # the default asks for nothing


def test_a_sweeps_runs_are_one_wandb_group_named_after_the_sweep(tmp_path):
    import shlex

    from mixmae_scale.scaling.commands import launch_line
    from mixmae_scale.scaling.spec import expand, load_spec

    path = tmp_path / "spec.yaml"
    path.write_text("name: width-sweep\nprofile: tiny\nshards: nowhere\nsizes: [tiny]\ndata_fractions: [1]\n"
                    "steps: [5]\ncluster: {max_nodes: 1}\n")
    spec = load_spec(path)
    (run,) = expand(spec, train_samples=2560)
    words = shlex.split(launch_line(spec, run, tmp_path / "out", 2560))
    overrides = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    config, _ = load_config("tiny", overrides=overrides)
    assert config.logging.wandb.group == "width-sweep"


def test_runs_show_on_a_folder_without_a_record_or_with_a_broken_one_says_so_in_one_line(tmp_path, capsys):
    from mixmae_scale.cli import main

    assert main(["runs", "show", str(tmp_path / "nowhere")]) == 2  # said the folder was older than run records
    assert capsys.readouterr().err.strip() == f"mixmae: error: {tmp_path.resolve() / 'nowhere'}: no such run folder"
    assert main(["runs", "show", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"mixmae: error: {tmp_path.resolve() / 'run.json'} not found: the run "
                                               "folder was written before run records, or is not a run folder")
    for text, missing in (("{}", "no run, job, created"), ("[1]", "no run, job"), ('{"run": "x"}', "no job, created")):
        (tmp_path / "run.json").write_text(text)  # used to end in a KeyError or TypeError traceback
        assert main(["runs", "show", str(tmp_path)]) == 2
        said = capsys.readouterr().err.strip()
        assert said.startswith(f"mixmae: error: {tmp_path.resolve() / 'run.json'}: not a run record ({missing}")


def test_the_record_digests_the_held_out_images_the_run_chose_not_an_absent_val_split(tmp_path):
    """A set without a validation split holds out its train tail: run.json recorded "val" with 0 shards, one digest
    for every such run, so a sweep's data fractions (each its own tail) looked scored on the same images."""
    from mixmae_scale.data.heldout import choose_heldout
    from tests.unit.test_heldout import write_set

    tails = [choose_heldout(str(write_set(tmp_path / name, sizes)), "train", "val", "auto", 6)
             for name, sizes in (("a", (7, 5, 9, 3)), ("b", (6, 6, 6, 6)))]
    a, b = (run_record.heldout_digest(tail) for tail in tails)
    assert (a["split"], a["train_tail"], a["samples"], a["shards"]) == ("train", 6, 6, 2)  # 3 of the last, 3 before
    assert len(a["manifest_sha256"]) == 64  # as every entry: `runs show` prints it
    assert a["split_digest"] != b["split_digest"]
    assert run_record.heldout_digest(tails[0]) == a  # the same choice, the same digest
    val = run_record.heldout_digest(choose_heldout(str(write_set(tmp_path / "v", with_val=True)), "train", "val",
                                                   "auto", 2))
    assert (val["split"], val["train_tail"], val["samples"]) == ("val", 0, 4)
    whole = run_record.shard_set_digest(str(tmp_path / "v"), "val", "held-out")  # what runs recorded before
    assert val["split_digest"] == whole["split_digest"] and val["manifest_sha256"] == whole["manifest_sha256"]
    config = load_config("tiny", overrides=[f"data.shards={tmp_path / 'a'}"])[0]
    assert run_record.data_read(config, tails[0])[-1] == a


def test_a_run_that_holds_nothing_out_records_no_held_out_set(tmp_path):
    """A set below 16 images without a validation split trains with nothing held out (data/heldout.py): its record
    lists its training set alone, not an absent 'val' of 0 shards that every such run would share a digest of."""
    from types import SimpleNamespace

    from mixmae_scale.data.heldout import choose_heldout
    from tests.unit.test_heldout import write_set

    folder = str(write_set(tmp_path / "tiny", (7, 5)))
    nothing = choose_heldout(folder, "train", "val", "auto", 8)
    assert nothing.images is None
    config = SimpleNamespace(data=SimpleNamespace(shards=folder, train_split="train", val_split="val", sources=[]))
    assert [d["role"] for d in run_record.data_read(config, nothing)] == ["train"]
    assert run_record.data_digest(run_record.data_read(config, nothing)) is None


def test_a_signal_during_the_last_step_leaves_a_completed_run_not_a_stopped_one(tmp_path, monkeypatch):
    """The stop flag is read at the last micro-batch of each step: one raised during the run's last step used to mark
    the finished run `stopped_by_signal: true` and run.json "stopped by a signal". It is complete; the relay's report
    is still written (it waits for it to exit 0)."""
    from mixmae_scale.engine.loop import TrainingLoop

    report = tmp_path / "stop-report.json"
    monkeypatch.setenv("MIXMAE_STOP_REPORT", str(report))
    for step, stopped in ((36, False), (35, True)):
        loop = SimpleNamespace(step=step, ctx=SimpleNamespace(last_step=36, local_rank=0, rank=0),
                               derived=SimpleNamespace(total_steps=36), stopped_by_signal=False)
        TrainingLoop._stop_for_signal(loop, tmp_path / "checkpoints" / f"step{step:08d}")
        assert loop.stopped_by_signal is stopped
        assert json.loads(report.read_text())["step"] == step
    context = _context(tmp_path, 2, None)
    context.root.mkdir()
    record = run_record.RunRecord.begin(context, "pretrain", 0, ["cpu"] * 2, argv=["mixmae", "pretrain"])
    total = record.record["total_steps"]
    record.finish({"steps": total, "planned_steps": total, "stopped_by_signal": True})  # a summary of before the fix
    saved = run_record.read_record(context.root)
    assert (saved["status"], saved["launches"][-1]["outcome"]) == ("completed", "completed")


def test_a_launch_that_never_finished_is_not_left_running_once_the_next_one_starts(tmp_path):
    """A launch killed (SIGKILL, a node lost) or failed never reaches `finish`: its entry said "running" for ever,
    beside the launches after it. The next launch holds the folder's lock, so that one is gone: its entry says so."""
    context = _context(tmp_path, 2, None)
    context.root.mkdir()
    run_record.RunRecord.begin(context, "pretrain", 0, ["cpu"] * 2, argv=["mixmae", "pretrain"])  # then killed
    plan = ResumePlan("step00000010", saved_world=2, saved_layout={"zero_stage": 2, "dtype": "fp32", "offload": False})
    from mixmae_scale.engine import run_lock

    lock = run_lock.take(context.root)  # as the next launch's start holds it (run_folder.agree_on_lock)
    try:
        second = run_record.RunRecord.begin(_context(tmp_path, 2, plan), "pretrain", 10, ["cpu"] * 2, argv=["mixmae"])
    finally:
        lock.release()
    first, now = run_record.read_record(context.root)["launches"]
    assert first["outcome"] != "running" and "killed" in first["outcome"] and now["outcome"] == "running"
    second.finish({"steps": 12, "planned_steps": 20, "stopped_by_signal": True})
    saved = run_record.read_record(context.root)
    assert [x["outcome"] for x in saved["launches"]] == [first["outcome"], "stopped by a signal"]
    assert f"steps 0 -> ?, {first['outcome']}, world size 2" in run_record.describe(saved)


def test_an_earlier_launch_is_marked_ended_only_where_this_launch_holds_the_folders_lock(tmp_path):
    """Only the run lock says an earlier "running" launch is gone. On a file system that refuses flock the start runs
    unlocked (engine/run_lock.py warns), so a second launch there may run beside a live first one: marking that one
    "ended without a record" was a claim nothing checked. Locked, it is marked; unlocked, it stays "running"."""
    from mixmae_scale.engine import run_lock

    for locked in (True, False):
        context = _context(tmp_path / str(locked), 2, None)
        context.root.mkdir(parents=True)
        run_record.RunRecord.begin(context, "pretrain", 0, ["cpu"] * 2, argv=["mixmae", "pretrain"])  # alive or not
        lock = run_lock.take(context.root) if locked else None
        try:
            run_record.RunRecord.begin(context, "pretrain", 0, ["cpu"] * 2, argv=["mixmae", "pretrain"])
        finally:
            if lock is not None:
                lock.release()
        first, _ = run_record.read_record(context.root)["launches"]
        assert first["outcome"] == (run_record.UNENDED if locked else "running"), locked


def test_a_signal_during_the_last_step_of_a_shortened_launch_is_not_told_as_a_completed_run(tmp_path, monkeypatch,
                                                                                             caplog):
    """--max-steps 12 of a 36-step schedule, a SIGUSR1 during step 12: the launch ends where it was to end, but the
    run is not complete. The log said "the run is complete" and the relay's report `complete: true` (the relay then
    printing "the run reached its last step ... complete") for a run 24 steps short."""
    from mixmae_scale.engine.loop import TrainingLoop

    report = tmp_path / "stop-report.json"
    monkeypatch.setenv("MIXMAE_STOP_REPORT", str(report))
    for total, complete in ((36, False), (12, True)):
        loop = SimpleNamespace(step=12, ctx=SimpleNamespace(last_step=12, local_rank=0, rank=0),
                               derived=SimpleNamespace(total_steps=total), stopped_by_signal=False)
        caplog.clear()
        with caplog.at_level("WARNING", logger="mixmae.loop"):
            TrainingLoop._stop_for_signal(loop, tmp_path / "checkpoints" / "step00000012")
        assert loop.stopped_by_signal is False  # nothing left to do in this launch: no requeue for it
        assert json.loads(report.read_text())["complete"] is complete, total
        assert ("the run is complete" in caplog.text) is complete, caplog.text
    from mixmae_scale.engine.checkpointing import store

    saved = tmp_path / "checkpoints" / "step00000012"
    saved.mkdir(parents=True)
    store.seal(saved, {"step": 12, "world_size": 2, "kind": "regular"})
    for total, complete in ((36, False), (12, True)):  # the signal after the last step, during the final evaluation
        report.unlink()
        loop = SimpleNamespace(step=12, ctx=SimpleNamespace(last_step=12, local_rank=0, stop=SimpleNamespace(
            signal=10)), derived=SimpleNamespace(total_steps=total), stop_reported=False, last_saved=saved)
        TrainingLoop._report_a_stop_after_the_last_step(loop)
        assert json.loads(report.read_text())["complete"] is complete, total
