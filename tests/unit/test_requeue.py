"""The Slurm self-requeue decision (cluster/requeue.py) against what a start of the run leaves in its folder."""

from __future__ import annotations

import json
import types

import pytest

from mixmae_scale.cluster import requeue
from mixmae_scale.engine import run_folder


def _start_finding_the_run_complete(monkeypatch, run, total_steps: int, at_step: int, max_steps: int | None = None,
                                    said: str | None = None) -> None:
    """start_run up to the resume plan, with the process group, data, configuration and plan stubbed (no
    DeepSpeed): the newest checkpoint at `at_step`, the current schedule `total_steps` long."""
    from mixmae_scale.engine import loop

    monkeypatch.setattr(loop, "StopFlag", lambda: None)
    monkeypatch.setattr(loop, "job_crop_scale", lambda config, job: None)
    monkeypatch.setattr(loop.distributed, "init", lambda local_rank: (0, 1, "cpu"))
    monkeypatch.setattr(loop, "training_mixture", lambda *a: types.SimpleNamespace(
        expected_samples=1, too_small=lambda split, world, micro: None))
    monkeypatch.setattr(loop, "resolve", lambda *a, **k: types.SimpleNamespace(
        derived=types.SimpleNamespace(total_steps=total_steps, micro_batch=1)))
    monkeypatch.setattr(loop, "engine_config", lambda *a: {})
    monkeypatch.setattr(loop, "optimizer_layout", lambda *a: None)
    monkeypatch.setattr(loop, "agree_on_configuration", lambda *a: None)
    monkeypatch.setattr(run_folder, "agree_on_lock", lambda root: [])
    monkeypatch.setattr(run_folder, "agree_on_shared_folder", lambda root: None)
    monkeypatch.setattr(run_folder, "agree_on_run_folder", lambda root, resume, overwrite, job=None: (None, []))
    monkeypatch.setattr(loop, "plan_resume", lambda *a, **k: types.SimpleNamespace(
        step=at_step, tag=f"step{at_step:08d}", finishes_by=lambda last: at_step >= last))
    config = types.SimpleNamespace(data=types.SimpleNamespace(shards="s", train_split="train", sources=[]),
                                   checkpoint=types.SimpleNamespace(resume="auto"),
                                   schedule=types.SimpleNamespace(epochs=0.5))
    with pytest.raises(loop.RunAlreadyComplete, match=said or f"already complete at step {at_step}"):
        loop.start_run(config, [], run, 0, max_steps)


def test_a_requeued_run_its_shortened_schedule_finds_complete_is_not_requeued_again(tmp_path, monkeypatch):
    """Stopped by a signal at step 11 of 40, then requeued with a schedule that now ends at step 11 (the profile
    edited to fewer epochs): the start says "already complete" and exits 0, and summary.json still said stopped at
    11 of 40, so the batch script requeued the job again, up to MIXMAE_MAX_REQUEUES full job starts. The start
    records, in summary.json, that the run is complete under the current plan; the decision reads it."""
    run = tmp_path / "run"
    run.mkdir()
    stopped = {"steps": 11, "planned_steps": 40, "stopped_by_signal": True, "images_seen": 88}
    (run / "summary.json").write_text(json.dumps(stopped))
    assert requeue.decide(run, {})[0]  # the first stop: requeue
    _start_finding_the_run_complete(monkeypatch, run, total_steps=11, at_step=11)
    again, why = requeue.decide(run, {})
    assert not again
    assert why == (f"{run / 'summary.json'}: a later start found the run complete at step 11 (its schedule now "
                   "ends at step 11)")
    summary = json.loads((run / "summary.json").read_text())
    assert {k: summary[k] for k in stopped} == stopped  # the stop's own record is kept as it was
    assert not list(run.glob("*.tmp*"))


def test_a_finished_runs_summary_is_left_as_it_was_by_a_start_that_finds_it_complete(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    text = json.dumps({"steps": 40, "planned_steps": 40, "stopped_by_signal": False})
    (run / "summary.json").write_text(text)
    _start_finding_the_run_complete(monkeypatch, run, total_steps=40, at_step=40)
    assert (run / "summary.json").read_text() == text
    assert not requeue.decide(run, {})[0]


@pytest.mark.parametrize(("max_steps", "why"), [(None, r"the schedule's 9 steps, schedule.epochs=0.5"),
                                                (12, r"--max-steps 12")])
def test_a_checkpoint_past_a_shortened_schedule_is_not_called_complete_without_the_last_step(tmp_path, monkeypatch,
                                                                                              max_steps, why):
    """Stopped at step 15 of 36 and started again with schedule.epochs mistyped (9 steps) or a lower --max-steps: it
    said "already complete at step 15", as for a finished run. It names this launch's last step and where it came
    from, and what continues the run."""
    run = tmp_path / "run"
    run.mkdir()
    total = 9 if max_steps is None else 36
    _start_finding_the_run_complete(
        monkeypatch, run, total_steps=total, at_step=15, max_steps=max_steps,
        said=rf"nothing to do: the newest checkpoint, step 15 \(.*step00000015\), is past this launch's last step "
             rf"{max_steps or 9} \({why}\); a longer schedule or a higher --max-steps continues it")


@pytest.mark.parametrize("extra, said", [
    (["--overwrite"], "--overwrite"),
    (["--overw"], "--overwrite"),  # argparse's abbreviation
    (["--set", "checkpoint.resume=none"], "checkpoint.resume=none"),
    (["--set=checkpoint={resume: 'none'}"], "checkpoint.resume=none"),
    (["--cluster", "FRESH_YAML"], "checkpoint.resume=none"),  # from a cluster file
])
def test_a_job_whose_fresh_start_the_restart_undoes_is_requeued_and_says_so(tmp_path, capsys, extra, said):
    """A requeued job runs its batch script with the same arguments, but the script runs cluster/restart.py first
    (SLURM_RESTART_COUNT > 0), which drops --overwrite and sets checkpoint.resume=auto: the run continues.
    `sbatch pretrain.sbatch --overwrite` (to replace an old run) stopped by the time-limit warning was not
    requeued, its cycle ended after one segment with a line saying the requeue would start the run anew, which the
    restart no longer does. It is requeued, and the line says what the restart undoes."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"steps": 40, "planned_steps": 100, "stopped_by_signal": True}))
    (tmp_path / "fresh.yaml").write_text("checkpoint:\n  resume: none\n")
    extra = [str(tmp_path / "fresh.yaml") if item == "FRESH_YAML" else item for item in extra]
    assert requeue.main(["--profile", "tiny", "--run-dir", str(run), *extra]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mixmae: requeueing: stopped by a signal at step 40 of 100 (requeue 1 of 20); the "
                          f"requeued job's restart (cluster/restart.py) undoes {said} and continues the run"), out


def test_a_job_whose_fresh_start_the_restart_cannot_undo_is_not_requeued(tmp_path, capsys, monkeypatch):
    """Where cluster/restart.py refuses to rewrite the arguments (its safety net: the rewritten ones would not parse
    to the same job continuing), the requeued job would stop there: not requeued, the line says why and how."""
    from mixmae_scale.cluster import restart
    from mixmae_scale.config import ConfigError

    def refuse(argv, given=()):
        raise ConfigError("could not be undone")

    monkeypatch.setattr(restart, "continuing", refuse)
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"steps": 40, "planned_steps": 100, "stopped_by_signal": True}))
    assert requeue.main(["--profile", "tiny", "--run-dir", str(run)]) == 0  # nothing to undo: requeued
    assert capsys.readouterr().out.endswith("(requeue 1 of 20)\n")
    assert requeue.main(["--profile", "tiny", "--run-dir", str(run), "--overwrite"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("mixmae: not requeueing: stopped by a signal at step 40 of 100, but the job's arguments "
                          "hold --overwrite, which the requeued job's restart (cluster/restart.py) cannot undo"), out
    assert "submit the job again without it to resume" in out


def test_arguments_that_no_longer_load_end_the_cycle_in_one_line(tmp_path, capsys):
    """The decision reads the pretrain arguments' configuration after the step (a cluster file edited or removed
    meanwhile): a ConfigError ended it in a traceback in the job's log; it is one line, and no requeue."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"steps": 40, "planned_steps": 100, "stopped_by_signal": True}))
    assert requeue.main(["--profile", "tiny", "--run-dir", str(run), "--cluster", str(tmp_path / "gone.yaml")]) == 1
    out = capsys.readouterr().out
    assert out.startswith("mixmae: not requeueing: cluster file ") and out.count("\n") == 1
