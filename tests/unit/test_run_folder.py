"""A run folder holds one run: what may start in it, what --overwrite moves, what rotation keeps and what a
summary may name. Folder states are built by hand (a tag is a folder with its COMPLETE marker), so these are
the rules alone; tests/integration/test_pretrain.py runs them through DeepSpeed once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mixmae_scale.engine import run_folder
from mixmae_scale.engine.checkpointing import store
from mixmae_scale.engine.checkpointing.store import ResumeError


def tags(root: Path, *names: str) -> Path:
    for name in names:
        folder = root / "checkpoints" / name
        folder.mkdir(parents=True)
        (folder / "rank_0.json").write_text("{}")
        (folder / store.MARKER).write_text(json.dumps({"step": store.step_of(name)}))
    return root


def test_resume_none_over_checkpoints_is_refused_with_both_ways_out(tmp_path):
    run = tags(tmp_path / "run", "step00000004", "step00000010")
    with pytest.raises(ResumeError) as refused:
        run_folder.prepare(run, "none", overwrite=False)
    message = str(refused.value)
    assert "\n" not in message
    assert f"{run} holds checkpoints of an earlier run (newest step00000010)" in message
    assert f"start it in a new --run-dir (run.name with `mixmae launch`), or add --overwrite to move the earlier run " \
           f"to {tmp_path / 'run.old-1'} first" in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step00000004", "step00000010"]


def test_a_finished_run_without_checkpoints_is_refused_and_an_empty_or_new_folder_is_not(tmp_path):
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "summary.json").write_text("{}")
    with pytest.raises(ResumeError, match="holds a finished run \\(summary.json\\) with no checkpoint to resume"):
        run_folder.prepare(finished, "auto", overwrite=False)
    (finished / "checkpoints" / "step00000004").mkdir(parents=True)  # copied without its COMPLETE marker
    with pytest.raises(ResumeError, match="no checkpoint to resume \\(step00000004 in .* has no COMPLETE marker"):
        run_folder.prepare(finished, "auto", overwrite=False)
    (tmp_path / "empty").mkdir()
    assert run_folder.prepare(tmp_path / "empty", "none", overwrite=False) is None
    assert run_folder.prepare(tmp_path / "new", "auto", overwrite=False) is None
    resumable = tags(tmp_path / "resumable", "step00000004")
    assert run_folder.prepare(resumable, "auto", overwrite=False) is None  # the same run resumes as before


def test_overwrite_moves_the_whole_run_aside_to_the_next_free_name_and_repoints_its_summary(tmp_path):
    run = tags(tmp_path / "run", "step00000010")
    (run / "metrics.csv").write_text("step,loss\n10,0.5\n")
    (run / "summary.json").write_text(json.dumps({"steps": 10, "checkpoint": str(run / "checkpoints" /
                                                                                 "step00000010")}))
    (tmp_path / "run.old-1").mkdir()  # an earlier move: taken
    note = run_folder.prepare(run, "none", overwrite=True)
    moved = tmp_path / "run.old-2"
    assert note == f"--overwrite: the earlier run in {run} was moved to {moved}; this run starts in an empty {run}"
    assert not run.exists() and (moved / "metrics.csv").read_text() == "step,loss\n10,0.5\n"
    summary = json.loads((moved / "summary.json").read_text())
    assert summary["checkpoint"] == str(moved / "checkpoints" / "step00000010")
    assert (Path(summary["checkpoint"]) / store.MARKER).exists()
    assert run_folder.prepare(tmp_path / "absent", "auto", overwrite=True) is None  # nothing to move


def test_overwrite_with_an_explicit_tag_to_resume_is_refused(tmp_path):
    run = tags(tmp_path / "run", "step00000004")
    with pytest.raises(ResumeError, match="--overwrite starts a new run .* checkpoint.resume=step00000004 resumes"):
        run_folder.prepare(run, "step00000004", overwrite=True)
    assert (run / "checkpoints" / "step00000004").is_dir()


def test_resuming_an_earlier_tag_moves_the_later_ones_aside_whole_and_the_same_command_again_goes_on(tmp_path):
    """A preempted job resubmitted as it was (still `checkpoint.resume=step00000004`) used to move its own new
    checkpoints aside and start from step 4 each time; now it goes on from the branch's newest."""
    run = tags(tmp_path / "run", "step00000004", "step00000007", "step00000007-nonfinite", "step00000009")
    (run / "checkpoints" / "step00000009.universal").mkdir()
    assert run_folder.prepare(run, "step00000004", overwrite=False) is None  # nothing moves before the plan
    assert run_folder.continuation(run, "step00000004") == ("step00000004", None)
    note = run_folder.set_aside_newer(run, "step00000004")
    assert note == ("checkpoint.resume=step00000004: the later checkpoints (step00000007, step00000007-nonfinite, "
                    f"step00000009) belong to the run's earlier continuation and were moved to {run / 'superseded-1'}")
    assert store.complete_tags(run / "checkpoints") == ["step00000004"]
    assert sorted(p.name for p in (run / "superseded-1").iterdir()) == [
        "step00000007", "step00000007-nonfinite", "step00000009", "step00000009.universal"]
    assert run_folder.continuation(run, "step00000004") == ("step00000004", None)  # preempted before a save
    tags(run, "step00000006", "step00000008")  # the branch's own, then preempted: the same command again
    acting, said = run_folder.continuation(run, "step00000004")
    assert acting == "auto" and said == (
        f"checkpoint.resume=step00000004: this run already went on from step00000004 (step00000006, step00000008 "
        f"since), so it resumes from step00000008; to start from step00000004 once more, move those out of "
        f"{run / 'checkpoints'}")
    assert run_folder.set_aside_newer(run, acting) is None and not (run / "superseded-2").exists()
    assert run_folder.continuation(run, "step00000006") == ("step00000006", None)  # another tag: a new branch


def test_model_differences_name_each_key_with_old_and_new_values():
    saved = {"img_size": 96, "embed_dim": 32, "depths": [2, 2], "num_heads": [1, 2]}
    current = {"img_size": 96, "embed_dim": 16, "depths": (2, 2), "num_heads": (2, 4)}
    assert run_folder.model_differences(saved, current) == ["model.embed_dim 32 -> 16",
                                                            "model.num_heads [1, 2] -> [2, 4]"]


def test_another_model_refusal_reads_the_checkpoints_record_then_config_yaml_then_falls_back_to_digests(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shape = {"embed_dim": 16, "depths": (2, 2)}
    line = run_folder.another_model(run, "step00000010", {"embed_dim": 32, "depths": [2, 2]}, None, shape, "bbbb")
    assert line == (f"{run} holds a run of another model (model.embed_dim 32 -> 16), checkpoint step00000010; it "
                    "cannot be resumed with this configuration: start it in a new --run-dir (run.name with `mixmae "
                    f"launch`), or add --overwrite to move the earlier run to {tmp_path / 'run.old-1'} first")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"embed_dim": 48, "depths": [1, 1]}}))
    assert "(model.embed_dim 48 -> 16; model.depths [1, 1] -> [2, 2])" in run_folder.another_model(
        run, "step00000010", None, "aaaa", shape, "bbbb")
    (run / "config.yaml").unlink()
    assert "(model digest aaaa -> bbbb)" in run_folder.another_model(run, "step00000010", None, "aaaa", shape,
                                                                     "bbbb")


def test_rotation_never_removes_the_tag_just_written_even_below_older_higher_steps():
    old_run = ["step00000007", "step00000009", "step00000010"]
    assert store.rotation_victims(sorted(["step00000004", *old_run]), 3, just_written="step00000004") == set()
    assert "step00000004" in store.rotation_victims(sorted(["step00000004", *old_run]), 3)  # the rule it overrides
    regular = ["step00000002", "step00000004", "step00000006", "step00000008"]
    assert store.rotation_victims(regular, 3, just_written="step00000008") == {"step00000002"}
    with_stop = ["step00000004", "step00000004-nonfinite", "step00000006"]
    assert store.rotation_victims(with_stop, 3, just_written="step00000006") == {"step00000004-nonfinite"}


def test_rotate_on_disk_keeps_the_new_tag_and_removes_crash_leftovers(tmp_path):
    run = tags(tmp_path / "run", "step00000004", "step00000007", "step00000009", "step00000010")
    (run / "checkpoints" / "step00000011.partial").mkdir()
    store.rotate(run / "checkpoints", 3, just_written="step00000004")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step00000004", "step00000007", "step00000009", "step00000010"]


def test_a_summary_names_only_a_complete_checkpoint_on_disk(tmp_path):
    run = tags(tmp_path / "run", "step00000004")
    assert store.existing(run / "checkpoints" / "step00000004") == run / "checkpoints" / "step00000004"
    assert store.existing(run / "checkpoints" / "step00000010") is None
    assert store.existing(None) is None


def test_ranks_that_do_not_see_rank_0s_probe_are_refused_at_the_start_by_node(tmp_path):
    """A run folder on node-local scratch was found only at the first checkpoint, after hours of training."""
    views = [("node-a", True), ("node-a", True), ("node-b", False), ("node-b", False)]
    problem = run_folder.unseen_probe(tmp_path, views)
    assert problem == store.UNSHARED.format(what=f"ranks 2-3 on node-b do not see the file rank 0 on node-a wrote in "
                                           f"{tmp_path.absolute()}")
    assert "not shared by all nodes" in problem and "--run-dir" in problem
    assert run_folder.unseen_probe(tmp_path, views[:2]) is None


def test_a_run_of_another_job_in_the_folder_is_refused_naming_it_not_its_batch_or_weights(tmp_path):
    """`mixmae finetune --run-dir runs/tiny-demo` (the pretraining run's folder) was refused as "trained at a global
    batch of 16, this run has 32: resume with --set batch.global_batch=16", and with that set, as "trained from other
    weights (finetune.init unset -> ...): resume with the weights it started from": advice to resume a pretraining as
    a fine-tuning (the model digest reads the encoder's shape alone, the same for both jobs). run.json says which job
    the folder holds: another job is refused as that, with the ways out; the same job resumes as before."""
    run = tags(tmp_path / "pre", "step00000020")
    (run / "run.json").write_text(json.dumps({"job": "pretrain", "run": "pre"}))
    with pytest.raises(ResumeError) as refused:
        run_folder.prepare(run, "auto", overwrite=False, job="finetune")
    said = str(refused.value)
    assert said == (f"{run} holds a pretraining run (run.json: job pretrain, newest checkpoint step00000020), not a "
                    "fine-tuning: a fine-tuning started there would go on from that run's checkpoints; start it in a "
                    f"new --run-dir (run.name with `mixmae launch`), or add --overwrite to move the earlier run to "
                    f"{tmp_path / 'pre.old-1'} first")
    assert run_folder.prepare(run, "auto", overwrite=False, job="pretrain") is None
    assert run_folder.prepare(run, "auto", overwrite=False) is None  # a caller that names no job checks none
    assert "was moved to" in run_folder.prepare(run, "auto", overwrite=True, job="segment")


def test_a_segmentation_run_whose_older_run_json_says_pretrain_still_resumes(tmp_path):
    """Before d1f7f66 a segmentation run's run.json said job "pretrain" (fixed there: "the job that ran"), and
    run.json is rewritten by each launch, so such a run's record still says pretrain until its next start. The
    folder's config.yaml names the encoder the segmentation started from (segment.init, which it requires): that run
    resumes as a segmentation; a real pretraining run's folder (no segment.init) is still refused."""
    run = tags(tmp_path / "seg", "step00000020")
    (run / "run.json").write_text(json.dumps({"job": "pretrain", "run": "seg"}))
    (run / "config.yaml").write_text(yaml.safe_dump({"segment": {"init": "runs/tiny/export.safetensors"}}))
    assert run_folder.prepare(run, "auto", overwrite=False, job="segment") is None
    with pytest.raises(ResumeError, match="holds a segmentation run"):
        run_folder.prepare(run, "auto", overwrite=False, job="pretrain")
    (run / "config.yaml").write_text(yaml.safe_dump({"segment": {"init": None}}))
    with pytest.raises(ResumeError, match="holds a pretraining run"):
        run_folder.prepare(run, "auto", overwrite=False, job="segment")


def test_another_jobs_folder_without_checkpoints_is_refused_without_naming_checkpoints_it_lacks(tmp_path):
    """A pretraining that stopped before its first checkpoint leaves run.json, metrics.csv and logs: a fine-tuning
    started there is refused as before, but the refusal said it "would go on from that run's checkpoints", which the
    folder does not hold; it says the fine-tuning would write over that run's files."""
    run = tmp_path / "pre"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"job": "pretrain", "run": "pre"}))
    with pytest.raises(ResumeError) as refused:
        run_folder.prepare(run, "auto", overwrite=False, job="finetune")
    said = str(refused.value)
    assert said.startswith(f"{run} holds a pretraining run (run.json: job pretrain, no checkpoint yet), not a "
                           "fine-tuning: a fine-tuning started there would write over that run's files; "), said
    assert "checkpoints" not in said.split(";")[0], said


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for a folder): what a refused start must leave as it was."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in root.rglob("*")}


def test_a_mixture_too_small_for_a_batch_is_refused_before_the_folder_is_touched_and_a_fixed_one_then_starts(
        gloo_of_one, tmp_path, monkeypatch):
    """A mixture whose fractional weight can draw an epoch short of one micro-batch was refused by the loader, after
    start_run had taken the folder's lock and written config.yaml and checkpoints/. start_run here is the real one (the
    configuration resolved, the folder's lock, plan and config.yaml) in a gloo world of one, without DeepSpeed."""
    from tiny_sets import tiny_set

    from mixmae_scale.config.load import load_config
    from mixmae_scale.data.errors import DataError
    from mixmae_scale.engine import loop

    big = tiny_set(tmp_path / "big", {"a": 14})  # one shard: at weight 0.5 some epochs draw none of it
    small = tiny_set(tmp_path / "small", {"a": 2})
    monkeypatch.setattr(loop.distributed, "init", lambda local_rank: (0, 1, torch.device("cpu")))

    def start(weight: float):
        sources = f"data.sources=[{{shards: {big}, weight: {weight}}}, {{shards: {small}, weight: 1.0}}]"
        config, files = load_config("tiny", None, [f"data.shards={big}", sources, "batch.micro=8",
                                                   "batch.global_batch=8"])
        return loop.start_run(config, files, run, 0)

    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("the user's own file")
    before = _tree(run)
    with pytest.raises(DataError, match=r"an epoch can draw as few as 2 samples .* fewer than one batch"):
        start(0.5)
    assert _tree(run) == before
    ctx = start(1.0)  # the same command with a weight that reads the set every epoch
    assert ctx.resume is None and ctx.root == run
    assert {"config.yaml", "checkpoints", "notes.txt"} <= set(_tree(run))
