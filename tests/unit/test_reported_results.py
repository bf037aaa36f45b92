"""What a run, an export and a probe report when the data cannot support a number: a held-out loss over no
images is null with its reason, a probe on too few images is not a result, an export names its run and step."""

from __future__ import annotations

import pytest

from mixmae_scale.cli.job_commands import finetune_message, pretrain_message
from mixmae_scale.engine.export import default_out, export_line
from mixmae_scale.finetune.probe import MIN_PROBE_IMAGES, Features, not_meaningful_because, probe_features
from mixmae_scale.pretrain.heldout_loss import HeldOutLoss, heldout_loss, heldout_shortfall


def test_a_split_under_one_micro_batch_or_no_heldout_batches_is_not_measured():
    assert heldout_shortfall("val", 3, 16, 4) == "val has 3 images, fewer than one micro-batch of 16"
    assert heldout_shortfall("val", 0, 16, 4) == "val has 0 images, fewer than one micro-batch of 16"
    assert heldout_shortfall("val", 1, 16, 4) == "val has 1 image, fewer than one micro-batch of 16"  # not "1 images"
    assert heldout_shortfall("val", 500, 16, 0) == "logging.heldout_batches=0"
    assert heldout_shortfall("val", 16, 16, 1) is None


def test_heldout_loss_on_real_shards_smaller_than_a_micro_batch_is_null_with_the_split_size(demo_shards):
    """The demo fixture's val split holds 80 images; a micro-batch of 128 scores none of them. The reason is found
    from the loader's own count before any forward (no engine is needed to get here)."""
    from mixmae_scale.config import load_config
    from mixmae_scale.data.heldout import choose_heldout

    config, _ = load_config("tiny", None, [f"data.shards={demo_shards}", "batch.micro=128"])
    images = choose_heldout(str(demo_shards), "train", "val", "auto", 8)
    result = heldout_loss(None, config, images, None, "fp32")
    assert result == HeldOutLoss(None, 0, "val has 80 images, fewer than one micro-batch of 128")
    assert result.text() == "not measured (val has 80 images, fewer than one micro-batch of 128)"


def test_the_pretrain_summary_line_never_prints_a_number_that_was_not_measured():
    measured = {"heldout_loss_start": 0.9, "heldout_loss_end": 0.5, "steps": 12, "heldout_not_measured": None}
    assert pretrain_message(measured) == "held-out reconstruction loss 0.9000 -> 0.5000 after 12 steps"
    missing = {**measured, "heldout_loss_start": None, "heldout_loss_end": None,
               "heldout_not_measured": "val has 3 images, fewer than one micro-batch of 16"}
    assert pretrain_message(missing) == ("held-out reconstruction loss: not measured (val has 3 images, fewer than one "
                                         "micro-batch of 16); 12 steps trained")
    assert pretrain_message({**measured, "steps": 1}) == "held-out reconstruction loss 0.9000 -> 0.5000 after 1 step"
    assert pretrain_message({**measured, "heldout_loss_start": None, "steps": 1}).endswith(
        "after 1 step (not measured at the start)")


def test_the_last_lines_a_tiny_set_sees_count_one_thing_in_the_singular():
    """A folder of a few images ran 1 step, held out 1 image, probed on 1 validation image: the lines said "1 steps",
    "1 images", "1 shard(s)"."""
    from mixmae_scale.cli.job_commands import segment_message

    summary = {"steps": 1, "last": {"top1": 50.0, "samples": 1}, "best": {"top1": 50.0, "step": 1}}
    assert finetune_message(summary).startswith("fine-tuned 1 step: top-1 50.00% on 1 validation image, too few")
    assert segment_message({"steps": 1, "last": {"miou": 5.0}, "best": {"miou": 5.0, "step": 1}}).startswith(
        "segmentation fine-tuned 1 step: mIoU 5.00%")
    assert not_meaningful_because(1, 1) == ("train has 1 image and val has 1 image, fewer than 100: the 95% interval "
                                            "of a top-1 on 1 validation image is about +-98 points")


def test_a_probe_on_fewer_than_the_threshold_of_images_says_it_is_not_a_result():
    import torch

    assert not_meaningful_because(MIN_PROBE_IMAGES, MIN_PROBE_IMAGES) is None
    assert not_meaningful_because(300, 80) == ("val has 80 images, fewer than 100: the 95% interval of a top-1 on 80 "
                                               "validation images is about +-11 points")
    assert not_meaningful_because(40, 8).startswith("train has 40 images and val has 8 images, fewer than 100")
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(10)
    x = torch.randn(40, 8, generator=generator)
    result = probe_features(Features(x, labels, x, labels), num_classes=4)
    assert result.not_meaningful.startswith("train has 40 images and val has 40 images")


def test_export_defaults_to_the_run_folder_and_its_line_names_run_and_step(tmp_path):
    assert default_out(tmp_path, "encoder", False) == tmp_path / "encoder.safetensors"
    assert default_out(tmp_path, "pretrain", False) == tmp_path / "encoder_decoder.safetensors"
    assert default_out(tmp_path, "finetune", True) == tmp_path / "classifier-best.safetensors"
    result = {"run": "/r/run", "checkpoint": "/r/run/checkpoints/step00000012", "step": 12, "best": False,
              "out": "/r/run/encoder.safetensors", "kind": "encoder", "tensors": 40, "params": 1_234_567}
    assert export_line(result) == ("exported step 12 of run /r/run to /r/run/encoder.safetensors: encoder, 1.23M "
                                   "parameters in 40 tensors (checkpoint /r/run/checkpoints/step00000012)")


def test_export_out_is_optional_and_json_is_asked_for(capsys):
    from mixmae_scale.cli import main

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "[--out OUT]" in text and "default: in the run folder, encoder.safetensors" in text and "--json" in text


def test_export_prints_its_line_and_adds_the_json_report_only_with_json(monkeypatch, capsys):
    """The help promises --json 'also prints the full report': without it the person gets the one line, with it
    the line and then the report as JSON. The export itself is replaced (its work is tested elsewhere); it is
    also shown to get no --out when none is given, so that it picks the run folder's default."""
    import json

    import mixmae_scale.engine.export as export_module
    from mixmae_scale.cli import main

    result = {"run": "/r/run", "checkpoint": "/r/run/checkpoints/step00000012", "step": 12, "best": False,
              "out": "/r/run/encoder.safetensors", "kind": "encoder", "tensors": 40, "params": 1_234_567}
    calls = []

    def fake_export(run_dir, out, tag, with_decoder, best, fmt):
        calls.append((run_dir, out))
        return result

    monkeypatch.setattr(export_module, "export_run", fake_export)
    assert main(["export", "/r/run"]) == 0
    plain = capsys.readouterr().out
    assert plain == export_line(result) + "\n"
    assert main(["export", "/r/run", "--json"]) == 0
    line, _, report = capsys.readouterr().out.partition("\n")
    assert line == export_line(result) and json.loads(report) == result
    assert calls == [("/r/run", None), ("/r/run", None)]


def test_a_finetune_ends_with_its_top1_and_the_precision_it_was_measured_in():
    """A bf16 run's top-1 is not `mixmae eval`'s fp32 one (10 images of 1500 apart on the demo): the line says
    which it is; a summary from before evaluations recorded their precision says nothing of it."""
    summary = {"steps": 810, "last": {"top1": 62.933, "precision": "bf16"}, "best": {"top1": 62.933, "step": 810}}
    assert finetune_message(summary) == "fine-tuned 810 steps: top-1 62.93% in bf16 (best 62.93% at step 810)"
    del summary["last"]["precision"]
    assert finetune_message(summary) == "fine-tuned 810 steps: top-1 62.93% (best 62.93% at step 810)"


def test_a_finetune_top1_says_how_many_validation_images_it_is_over_and_how_wide_it_is_when_few():
    """A folder whose --val-fraction held out 1 image ended `fine-tuned 2 steps: top-1 100.00% in bf16 (best 100.00%
    at step 1)`, read as a result; the probe calls a top-1 on fewer than 100 images not meaningful."""
    summary = {"steps": 2, "last": {"top1": 100.0, "precision": "bf16", "samples": 1},
               "best": {"top1": 100.0, "step": 1, "samples": 1}}
    assert finetune_message(summary) == ("fine-tuned 2 steps: top-1 100.00% in bf16 on 1 validation image, too few "
                                         "to read: its 95% interval is about +-98 points (best 100.00% at step 1)")
    summary["last"]["samples"] = 1500
    assert finetune_message(summary) == ("fine-tuned 2 steps: top-1 100.00% in bf16 on 1500 validation images "
                                         "(best 100.00% at step 1)")


def test_a_finetune_stopped_before_its_first_evaluation_says_so_not_nan_or_minus_one():
    """A fine-tuning preempted (SIGTERM) before its first evaluation ended `fine-tuned 143 steps: top-1 nan% (best
    -1.00% at step -)`, and its summary.json said `"best": {"top1": -1.0}`: -1 is the job's "nothing yet"."""
    from mixmae_scale.cli.job_commands import segment_message

    stopped = {"steps": 143, "planned_steps": 324, "stopped_by_signal": True, "last": None, "best": None}
    assert finetune_message(stopped) == ("fine-tuned 143 of 324 steps, stopped by a signal before its first "
                                         "evaluation: no top-1 yet (the same command continues it)")
    assert segment_message(stopped) == ("segmentation fine-tuned 143 of 324 steps, stopped by a signal before its "
                                        "first evaluation: no mIoU yet (the same command continues it)")
    # Resumed after an evaluation and stopped again before the next: the best so far is the one to say.
    again = {**stopped, "steps": 170, "best": {"top1": 17.93, "step": 162}}
    assert finetune_message(again) == ("fine-tuned 170 of 324 steps, stopped by a signal before its next evaluation "
                                       "(best 17.93% at step 162; the same command continues it)")
    # A summary written before this fix ("best": {"top1": -1.0}) reads the same; --max-steps is no signal.
    assert finetune_message({**stopped, "best": {"top1": -1.0}}) == finetune_message(stopped)
    assert finetune_message({**stopped, "stopped_by_signal": False}).endswith(
        "stopped before its first evaluation: no top-1 yet (a rerun continues it)")
    from mixmae_scale.engine.evaluated_job import recorded_best

    assert recorded_best({"top1": -1.0}, "top1") is None
    assert recorded_best({"top1": 0.0, "step": 5}, "top1") == {"top1": 0.0, "step": 5}


def test_a_finetune_stopped_after_an_evaluation_says_it_is_unfinished_and_which_step_its_top1_is_of():
    """A fine-tuning stopped by a signal after an evaluation ended `fine-tuned 500 steps: top-1 61.20% (best ...)`:
    read as the finished run's result, and as the top-1 of step 500's weights, while it was step 486's and 310 steps
    were left. The line says how far the run got, which step the top-1 is of, and that it goes on."""
    from mixmae_scale.cli.job_commands import segment_message

    stopped = {"steps": 500, "planned_steps": 810, "stopped_by_signal": True,
               "last": {"top1": 61.2, "precision": "fp32", "step": 486}, "best": {"top1": 61.2, "step": 486}}
    assert finetune_message(stopped) == ("fine-tuned 500 of 810 steps, stopped by a signal: top-1 61.20% in fp32 at "
                                         "step 486 (best 61.20% at step 486; the same command continues it)")
    capped = {**stopped, "steps": 486, "stopped_by_signal": False}
    assert finetune_message(capped) == ("fine-tuned 486 of 810 steps, stopped: top-1 61.20% in fp32 (best 61.20% at "
                                        "step 486; a rerun continues it)")
    segmented = {**stopped, "last": {"miou": 20.0, "step": 486}, "best": {"miou": 20.0, "step": 486}}
    assert segment_message(segmented) == ("segmentation fine-tuned 500 of 810 steps, stopped by a signal: mIoU 20.00% "
                                          "at step 486 (best 20.00% at step 486; the same command continues it)")
    finished = {**stopped, "steps": 810, "stopped_by_signal": False, "last": {**stopped["last"], "step": 810}}
    assert finetune_message(finished) == "fine-tuned 810 steps: top-1 61.20% in fp32 (best 61.20% at step 486)"


def test_a_max_steps_launch_says_how_much_of_the_schedule_is_left():
    """A --max-steps launch ended `fine-tuned 2 steps: top-1 50.00% (best 50.00% at step 2)`, read as the finished
    run's result while 322 of the schedule's 324 steps were left (`planned_steps` is the launch's --max-steps)."""
    from mixmae_scale.cli.job_commands import segment_message

    capped = {"steps": 2, "planned_steps": 2, "schedule_steps": 324, "stopped_by_signal": False,
              "last": {"top1": 50.0, "step": 2}, "best": {"top1": 50.0, "step": 2}}
    assert finetune_message(capped) == ("fine-tuned 2 of 324 steps (--max-steps 2): top-1 50.00% (best 50.00% at "
                                        "step 2; the same command with a larger --max-steps, or none, continues it)")
    segmented = {**capped, "last": {"miou": 9.0, "step": 2}, "best": {"miou": 9.0, "step": 2}}
    assert segment_message(segmented).startswith("segmentation fine-tuned 2 of 324 steps (--max-steps 2): mIoU 9.00%")
    unevaluated = {**capped, "last": None, "best": None}
    assert finetune_message(unevaluated) == (
        "fine-tuned 2 of 324 steps (--max-steps 2) before its first evaluation: no top-1 yet (the same command with a "
        "larger --max-steps, or none, continues it)")
    done = {**capped, "steps": 324, "planned_steps": 324, "last": {"top1": 50.0, "step": 324}}
    assert finetune_message(done) == "fine-tuned 324 steps: top-1 50.00% (best 50.00% at step 2)"


def test_a_max_steps_pretraining_launch_says_how_much_of_the_schedule_is_left():
    """A --max-steps pretraining launch ended `held-out reconstruction loss a -> b after 3 steps`, read as the
    finished run's while most of the schedule was left: it says `3 of 500 steps (--max-steps 3)` and what continues
    it, as fine-tuning's line does; a finished run's line is unchanged."""
    capped = {"heldout_loss_start": 0.9, "heldout_loss_end": 0.5, "steps": 3, "heldout_not_measured": None,
              "planned_steps": 3, "schedule_steps": 500, "stopped_by_signal": False}
    assert pretrain_message(capped) == (
        "held-out reconstruction loss 0.9000 -> 0.5000 after 3 of 500 steps (--max-steps 3); the same command with "
        "a larger --max-steps, or none, continues it")
    assert pretrain_message({**capped, "heldout_loss_start": None}) == (
        "held-out reconstruction loss 0.5000 after 3 of 500 steps (--max-steps 3) (not measured at the start); the "
        "same command with a larger --max-steps, or none, continues it")
    assert pretrain_message({**capped, "heldout_loss_end": None, "heldout_not_measured": "logging.heldout_batches=0"}
                            ) == ("held-out reconstruction loss: not measured (logging.heldout_batches=0); 3 of 500 "
                                  "steps (--max-steps 3) trained; the same command with a larger --max-steps, or "
                                  "none, continues it")
    done = {**capped, "steps": 500, "planned_steps": 500}
    assert pretrain_message(done) == "held-out reconstruction loss 0.9000 -> 0.5000 after 500 steps"
