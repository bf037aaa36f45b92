"""The pure logic of a resume, without DeepSpeed: which checkpoint a run trusts (damage, crash leftovers, a
non-finite stop's rollback and the samples it skips), which layout it loads in (the same, another world size or
precision through the universal checkpoint, ZeRO-0 as it is), what it refuses, what rotation keeps, and where
the data stands when an epoch continues on another number of ranks. The engine legs that load what these choose
are in tests/integration/test_faults.py and test_elastic.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixmae_scale.data.loader import LoaderPosition
from mixmae_scale.data.shard_sets import Layout
from mixmae_scale.engine.checkpointing import store as ckpt
from mixmae_scale.engine.checkpointing.resume import choose_tag, decide_resume
from mixmae_scale.engine.checkpointing.state import RunIdentity, init_sources

ZERO2 = {"zero_stage": 2, "dtype": "fp32", "sub_group_size": None, "grad_accum_dtype": None, "offload": False}
IDENTITY = RunIdentity("digest-a", {"embed_dim": 32}, 32, ZERO2)


def make_tag(ckpt_dir: Path, tag: str, batches: int = 0, extra: dict | None = None, micro: int = 8,
             world: int = 2, identity: RunIdentity = IDENTITY) -> Path:
    """A checkpoint folder as `store.save` leaves it: files, per-rank state (under the keys checkpoints are written
    with), the sealed marker."""
    folder = ckpt_dir / tag
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 300)
    layout = Layout.whole_epoch(0, 1000, world, micro).to_dict()
    loader = {"batches_consumed": batches, "batch": batches, "layout": layout}
    recorded = {"init": identity.init} if identity.init is not None else {}  # older checkpoints lack the key
    (folder / "rank_0.json").write_text(json.dumps({
        "loader": loader, "rng": {}, "model_digest": identity.model_digest, "model_shape": identity.model_shape,
        "optimizer_layout": identity.optimizer_layout, "global_batch": identity.global_batch, **recorded}))
    ckpt.seal(folder, {"step": ckpt.step_of(tag), "world_size": world, "kind": "regular", **(extra or {})})
    return folder


def test_the_newest_complete_checkpoint_is_chosen_and_partial_folders_are_never_candidates(tmp_path):
    make_tag(tmp_path, "step00000004")
    make_tag(tmp_path, "step00000006")
    crashed = tmp_path / "step00000008.partial"
    crashed.mkdir()
    (crashed / ckpt.MARKER).write_text("{}")  # sealed-looking, but a crash left it under the temporary name
    choice = choose_tag(tmp_path, "auto", "rollback")
    assert choice.tag == "step00000006" and choice.skipped_samples == 0 and choice.notes == ()
    ckpt.remove_stale_partials(tmp_path)
    assert not crashed.exists() and (tmp_path / "step00000006").exists()


def test_a_checkpoint_cut_short_after_it_was_sealed_falls_back_to_the_one_before_with_a_note(tmp_path):
    make_tag(tmp_path, "step00000006")
    newest = make_tag(tmp_path, "step00000008")
    optimizer = newest / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optimizer.write_bytes(b"o" * 150)
    choice = choose_tag(tmp_path, "auto", "rollback")
    assert choice.tag == "step00000006"
    assert len(choice.notes) == 1 and "has 150 bytes, 300 were written" in choice.notes[0]
    (newest / "mp_rank_00_model_states.pt").unlink()
    assert "model_states.pt is missing" in ckpt.damage(newest)


def test_a_tag_folder_without_its_marker_is_named_when_passed_over_and_alone_is_not_a_fresh_start(tmp_path):
    """A folder named as a checkpoint but never sealed (this tool seals `.partial` folders, so: a copy of the run
    folder cut short or made without the markers) was passed over in silence: the run went back to an older tag
    without a word, and with no sealed tag left it started again from step 0."""
    make_tag(tmp_path, "step00000004")
    copied = make_tag(tmp_path, "step00000008")
    (copied / ckpt.MARKER).unlink()
    (make_tag(tmp_path, "step00000002") / ckpt.MARKER).unlink()  # older than the one resumed: nothing lost
    choice = choose_tag(tmp_path, "auto", "rollback")
    assert choice.tag == "step00000004" and len(choice.notes) == 1
    assert choice.notes[0].startswith(f"step00000008 in {tmp_path.resolve()} has no COMPLETE marker")
    assert choice.notes[0].endswith("not read as a checkpoint: resuming from step00000004, the newest complete one")
    (tmp_path / "step00000004" / ckpt.MARKER).unlink()
    with pytest.raises(ckpt.ResumeError, match=r"no complete checkpoint to resume: step00000002, step00000004, "
                                               r"step00000008 in .* have no COMPLETE marker .*checkpoint.resume=none"):
        choose_tag(tmp_path, "auto", "rollback")
    assert choose_tag(tmp_path, "none", "rollback") is None


def test_every_checkpoint_damaged_is_an_error_that_says_how_to_start_over(tmp_path):
    for tag in ("step00000002", "step00000004"):
        (make_tag(tmp_path, tag) / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(ckpt.ResumeError, match=r"every checkpoint .* is damaged.*checkpoint.resume=none"):
        choose_tag(tmp_path, "auto", "rollback")


def test_a_named_checkpoint_must_be_complete_and_intact(tmp_path):
    make_tag(tmp_path, "step00000002")
    with pytest.raises(ckpt.ResumeError, match=r"step00000009.*not a complete checkpoint.*step00000002"):
        choose_tag(tmp_path, "step00000009", "rollback")
    (tmp_path / "step00000002" / "rank_0.json").write_text("")
    with pytest.raises(ckpt.ResumeError, match="is damaged"):
        choose_tag(tmp_path, str(tmp_path / "step00000002"), "rollback")
    assert choose_tag(tmp_path, "none", "rollback") is None


@pytest.mark.parametrize("policy, tag, skipped", [("rollback", "step00000006", 4 * 8 * 2),
                                                  ("skip", "step00000007-nonfinite", 3 * 8 * 2),
                                                  ("replay", "step00000007-nonfinite", 0)])
def test_a_non_finite_stop_resumes_by_its_policy_and_skips_the_samples_read_since(tmp_path, policy, tag, skipped):
    """Step 6 saved after 6 batches; the stop at step 7 had read 10 (3 failed attempts after batch 7's start):
    rollback goes to step 6 and skips the 4 batches x micro 8 x 2 ranks read since; skip keeps the stop's weights
    (saved at its step's start, 7 batches) and skips the 3 failed attempts; replay reads them again."""
    make_tag(tmp_path, "step00000004", batches=4)
    make_tag(tmp_path, "step00000006", batches=6)
    after = {"batches_consumed": 10, "batch": 10, "layout": Layout.whole_epoch(0, 1000, 2, 8).to_dict()}
    stop = {"nonfinite_stop": {"step": 7, "loader_after": after}}
    make_tag(tmp_path, "step00000007-nonfinite", batches=7, extra=stop)
    choice = choose_tag(tmp_path, "auto", policy)
    assert choice.tag == tag and choice.skipped_samples == skipped
    assert choice.data_position == (None if policy == "replay" else LoaderPosition.from_dict(after))
    assert policy in choice.notes[0]


def test_rotation_keeps_the_newest_regular_tags_and_drops_older_stops_conversions_and_leftovers(tmp_path):
    for tag in ("step00000002", "step00000004", "step00000005-nonfinite", "step00000006", "step00000008"):
        make_tag(tmp_path, tag)
    (tmp_path / "step00000002.universal").mkdir()
    (tmp_path / "step00000008.universal").mkdir()
    (tmp_path / "step00000009.partial").mkdir()
    ckpt.rotate(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000006", "step00000008", "step00000008.universal"]


def covered(intervals) -> list[int]:
    return [i for a, b in intervals for i in range(a, b)]


@pytest.mark.parametrize("samples, old_world, micro, consumed, window, new_world", [
    (1000, 2, 8, 20, 64, 1), (1000, 1, 16, 10, 64, 2), (1000, 2, 8, 33, 64, 3), (997, 4, 4, 50, 0, 3),
    (640, 2, 8, 40, 64, 5)])
def test_an_epoch_continued_on_another_world_size_skips_nothing_and_repeats_only_the_open_windows(
        samples, old_world, micro, consumed, window, new_world):
    """Every position of the epoch is either read before the stop or handed out again, except the final partial
    batch (as drop-last); what is read twice is exactly the consumed part of each old rank's open window."""
    old = Layout.whole_epoch(0, samples, old_world, micro)
    consumed = min(consumed, old.batches)
    read_before = [i for r in range(old_world) for i in covered(old.rank_intervals(r, 0, consumed * micro))]
    left = old.remaining(consumed, window)
    again = set(read_before) & set(covered(left))
    assert len(again) == old.repeated_on_relayout(consumed, window)
    assert set(read_before) | set(covered(left)) == set(range(samples))
    new = Layout(0, left, new_world, micro)
    handed_out = [i for r in range(new_world) for i in covered(new.rank_intervals(r))]
    assert len(handed_out) == len(set(handed_out))  # no position twice among the new ranks
    assert len(covered(left)) - len(handed_out) < new_world * micro  # only a final partial batch is left out


class Converter:
    """Stands in for DeepSpeed's ds_to_universal (a subprocess over real shards, run in test_elastic.py): records
    what it was asked to convert and leaves a sealed folder where the real one would."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, ckpt_dir: Path, tag: str) -> Path:
        self.calls.append(tag)
        folder = ckpt.universal_folder(ckpt_dir, tag)
        folder.mkdir(exist_ok=True)
        ckpt.seal(folder, {"universal_of": tag})
        return folder


def test_a_fresh_start_has_no_plan(tmp_path):
    assert decide_resume(tmp_path / "checkpoints", "auto", "rollback", IDENTITY, 2) is None
    make_tag(tmp_path, "step00000004")
    assert decide_resume(tmp_path, "none", "rollback", IDENTITY, 2) is None


def test_the_same_layout_loads_the_tag_itself_each_rank_its_own_file(tmp_path):
    make_tag(tmp_path, "step00000004")
    convert = Converter()
    plan = decide_resume(tmp_path, "auto", "rollback", IDENTITY, 2, convert)
    assert (plan.tag, plan.load_tag, plan.universal, plan.same_layout, plan.saved_world) == (
        "step00000004", "step00000004", False, True, 2)
    assert convert.calls == [] and plan.notes == () and plan.data_position is None
    ds_config = {"zero_optimization": {"stage": 2}}
    assert plan.deepspeed_config(ds_config) == ds_config
    assert [plan.rank_file_for(r) for r in (0, 1)] == [0, 1]
    assert plan.step == 4 and plan.finishes_by(4) and not plan.finishes_by(5)


def test_another_world_size_goes_through_the_universal_checkpoint_and_tells_deepspeed(tmp_path):
    make_tag(tmp_path, "step00000004", world=2)
    convert = Converter()
    plan = decide_resume(tmp_path, "auto", "rollback", IDENTITY, 3, convert)
    assert convert.calls == ["step00000004"]
    assert (plan.tag, plan.load_tag, plan.universal, plan.same_layout) == (
        "step00000004", "step00000004.universal", True, False)
    assert "world size 2 -> 3" in plan.notes[-1] and "converted in" in plan.notes[-1]
    ds_config = {"zero_optimization": {"stage": 2}, "checkpoint": {"tag_validation": "Warn"}}
    assert plan.deepspeed_config(ds_config)["checkpoint"] == {"tag_validation": "Warn", "load_universal": True}
    assert [plan.rank_file_for(r) for r in range(3)] == [0, 1, 0]  # the old ranks' files, round-robin
    again = decide_resume(tmp_path, "auto", "rollback", IDENTITY, 3, convert)
    assert "reused its earlier conversion" in again.notes[-1]


def test_a_precision_change_on_the_same_ranks_goes_through_the_universal_checkpoint(tmp_path):
    make_tag(tmp_path, "step00000004", identity=RunIdentity("digest-a", {}, 32, {**ZERO2, "dtype": "bf16"}))
    convert = Converter()
    plan = decide_resume(tmp_path, "auto", "rollback", IDENTITY, 2, convert)
    assert plan.universal and convert.calls == ["step00000004"] and "dtype bf16 -> fp32" in plan.notes[-1]
    assert plan.saved_layout["dtype"] == "bf16"


def test_zero0_loads_on_another_world_size_as_it_is_but_refuses_a_precision_change(tmp_path):
    zero0 = {**ZERO2, "zero_stage": 0}
    make_tag(tmp_path, "step00000004", world=2, identity=RunIdentity("digest-a", {}, 32, zero0))
    convert = Converter()
    plan = decide_resume(tmp_path, "auto", "rollback", RunIdentity("digest-a", {}, 32, zero0), 1, convert)
    assert convert.calls == [] and not plan.universal and not plan.same_layout and plan.load_tag == "step00000004"
    assert "(ZeRO-0) on 1 rank, written by 2" in plan.notes[-1]
    with pytest.raises(ckpt.ResumeError, match="cannot be resumed across dtype fp32 -> bf16.*ZeRO-0 keeps none"):
        decide_resume(tmp_path, "auto", "rollback", RunIdentity("digest-a", {}, 32, {**zero0, "dtype": "bf16"}), 2,
                      convert)
    with pytest.raises(ckpt.ResumeError, match="across zero_stage 0 -> 1.*resume with the checkpoint's zero.stage"):
        decide_resume(tmp_path, "auto", "rollback", RunIdentity("digest-a", {}, 32, {**zero0, "zero_stage": 1}), 2,
                      convert)
    assert convert.calls == []


def test_a_finished_run_started_on_another_layout_converts_nothing(tmp_path):
    """Started again on another GPU count once it is done: the loop reports it complete, and no universal copy
    of its last checkpoint (605 files for the tiny model, 24 s for Swin-B) is written on the way."""
    make_tag(tmp_path, "step00000004", world=2)
    convert = Converter()
    plan = decide_resume(tmp_path, "auto", "rollback", IDENTITY, 3, convert, last_step=4)
    assert plan.finishes_by(4) and convert.calls == []
    assert not list(tmp_path.glob("*.universal"))
    decide_resume(tmp_path, "auto", "rollback", IDENTITY, 3, convert, last_step=8)  # not finished: converted
    assert convert.calls == ["step00000004"]


def test_a_change_between_zero_3_and_zero_1_or_2_is_refused_before_converting_and_1_to_2_is_not(tmp_path):
    """DeepSpeed loads ZeRO-3's universal optimizer state only into ZeRO-3 (tried: 2 -> 3 stops with a KeyError,
    3 -> 2 with an assertion, after the conversion); the refusal comes first and names both stages."""
    convert = Converter()
    make_tag(tmp_path, "step00000004", identity=RunIdentity("digest-a", {}, 32, ZERO2))
    zero3 = RunIdentity("digest-a", {}, 32, {**ZERO2, "zero_stage": 3, "sub_group_size": 1_000_000_000})
    with pytest.raises(ckpt.ResumeError, match="written at ZeRO stage 2 and this run has zero.stage=3"):
        decide_resume(tmp_path, "auto", "rollback", zero3, 2, convert)
    assert convert.calls == []
    plan = decide_resume(tmp_path, "auto", "rollback", RunIdentity("digest-a", {}, 32, {**ZERO2, "zero_stage": 1}),
                         2, convert)
    assert plan.universal and "zero_stage 2 -> 1" in plan.notes[-1]
    legacy = tmp_path / "legacy"  # written before the layout was recorded: converted, as before
    make_tag(legacy, "step00000004", identity=RunIdentity("digest-a", {}, 32, None))
    assert decide_resume(legacy, "auto", "rollback", zero3, 2, convert).universal
    other = tmp_path / "zero3"
    make_tag(other, "step00000004", identity=zero3)
    with pytest.raises(ckpt.ResumeError, match="written at ZeRO stage 3 and this run has zero.stage=2"):
        decide_resume(other, "auto", "rollback", IDENTITY, 2, convert)


def test_another_model_or_global_batch_is_refused_with_the_way_out(tmp_path):
    make_tag(tmp_path / "checkpoints", "step00000004")
    other_model = RunIdentity("digest-b", {"embed_dim": 48}, 32, ZERO2)
    with pytest.raises(ckpt.ResumeError, match=r"another model \(model.embed_dim 32 -> 48\).*--overwrite"):
        decide_resume(tmp_path / "checkpoints", "auto", "rollback", other_model, 2)
    other_batch = RunIdentity("digest-a", {"embed_dim": 32}, 64, ZERO2)
    with pytest.raises(ckpt.ResumeError, match="global batch of 32, this run has 64.*batch.global_batch=32"):
        decide_resume(tmp_path / "checkpoints", "auto", "rollback", other_batch, 2)


def started_from(finetune: Path | str | None = None, segment: Path | str | None = None) -> RunIdentity:
    from types import SimpleNamespace

    config = SimpleNamespace(finetune=SimpleNamespace(init=finetune and str(finetune)),
                             segment=SimpleNamespace(init=segment and str(segment)))
    return RunIdentity("digest-a", {"embed_dim": 32}, 32, ZERO2, init_sources(config))


def test_a_finetuning_from_other_weights_is_refused_and_the_same_file_moved_or_an_older_checkpoint_resumes(tmp_path):
    """A fine-tuning profile run again in its folder with another --set finetune.init resumed the old weights (or said
    'already complete' with the old summary): the model and batch were all a resume compared."""
    import shutil

    weights, other = tmp_path / "encoder.safetensors", tmp_path / "other.safetensors"
    weights.write_bytes(bytes(range(256)) * 8192)  # 2 MiB: the digest samples it
    other.write_bytes(bytes(reversed(range(256))) * 8192)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    make_tag(ckpt_dir, "step00000004", identity=started_from(weights))
    assert decide_resume(ckpt_dir, "auto", "rollback", started_from(weights), 2).tag == "step00000004"
    for last_step in (None, 4):  # a finished run is refused too, not reported complete
        with pytest.raises(ckpt.ResumeError, match=rf"trained from other weights \(finetune.init {weights} -> {other}\)"
                                                   ".*resume with the weights it started from.*--overwrite"):
            decide_resume(ckpt_dir, "auto", "rollback", started_from(other), 2, last_step=last_step)
    moved = tmp_path / "moved" / "encoder.safetensors"
    moved.parent.mkdir()
    shutil.copy(weights, moved)
    assert decide_resume(ckpt_dir, "auto", "rollback", started_from(moved), 2).tag == "step00000004"
    weights.write_bytes(weights.read_bytes()[:-1] + b"x")  # trained further and exported over the same file
    with pytest.raises(ckpt.ResumeError, match=rf"finetune.init={weights} holds other weights than when the run "
                                               "started"):
        decide_resume(ckpt_dir, "auto", "rollback", started_from(weights), 2)
    folder = tmp_path / "pretrain-run"  # a run folder: its path alone (it may save newer checkpoints meanwhile)
    folder.mkdir()
    make_tag(tmp_path / "seg" / "checkpoints", "step00000004", identity=started_from(segment=folder))
    assert decide_resume(tmp_path / "seg" / "checkpoints", "auto", "rollback", started_from(segment=folder), 2)
    with pytest.raises(ckpt.ResumeError, match="segment.init .*pretrain-run -> random"):
        decide_resume(tmp_path / "seg" / "checkpoints", "auto", "rollback", started_from(segment="random"), 2)
    make_tag(tmp_path / "old" / "checkpoints", "step00000004")  # written before the weights were recorded
    assert decide_resume(tmp_path / "old" / "checkpoints", "auto", "rollback", started_from(other), 2)


def test_a_run_whose_init_file_is_gone_resumes_and_one_naming_another_missing_file_is_refused(tmp_path, monkeypatch):
    """A killed fine-tuning whose init file was cleaned up since resumed into a refusal ("holds other weights than
    when the run started (digest ... -> None)"), though the checkpoint holds every weight it needs. The same path,
    as typed (relative here) or resolved, is the same start; another path is still another run."""
    monkeypatch.chdir(tmp_path)
    weights = Path("encoder.safetensors")
    weights.write_bytes(bytes(range(256)) * 64)
    for start, ckpt_dir in ((weights, tmp_path / "run" / "checkpoints"),
                            (tmp_path / weights, tmp_path / "run2" / "checkpoints")):
        make_tag(ckpt_dir, "step00000004", identity=started_from(start))
    weights.unlink()
    for again, ckpt_dir in ((weights, tmp_path / "run" / "checkpoints"),
                            (tmp_path / weights, tmp_path / "run2" / "checkpoints")):
        assert decide_resume(ckpt_dir, "auto", "rollback", started_from(again), 2).tag == "step00000004"
    with pytest.raises(ckpt.ResumeError, match=rf"finetune.init {tmp_path / weights} -> {tmp_path / 'other.pth'}"):
        decide_resume(tmp_path / "run" / "checkpoints", "auto", "rollback", started_from("other.pth"), 2)
    make_tag(tmp_path / "run" / "checkpoints", "step00000006", identity=started_from(weights))  # saved after that
    weights.write_bytes(bytes(range(256)) * 64)  # and the file back
    assert decide_resume(tmp_path / "run" / "checkpoints", "auto", "rollback", started_from(weights), 2).step == 6


def test_a_damaged_newest_tag_falls_back_and_the_plan_keeps_the_note_beside_the_layout_change(tmp_path):
    make_tag(tmp_path, "step00000004")
    (make_tag(tmp_path, "step00000006") / "mp_rank_00_model_states.pt").write_bytes(b"")
    plan = decide_resume(tmp_path, "auto", "rollback", IDENTITY, 1, Converter())
    assert plan.tag == "step00000004" and plan.universal
    assert "step00000006 is damaged" in plan.notes[0] and "world size 2 -> 1" in plan.notes[1]


def test_a_rollback_plan_carries_the_stops_data_position_into_the_layout_change(tmp_path):
    make_tag(tmp_path, "step00000006", batches=6)
    after = {"batches_consumed": 10, "batch": 10, "layout": Layout.whole_epoch(0, 1000, 2, 8).to_dict()}
    make_tag(tmp_path, "step00000007-nonfinite", batches=7,
             extra={"nonfinite_stop": {"step": 7, "loader_after": after}})
    plan = decide_resume(tmp_path, "auto", "rollback", IDENTITY, 1, Converter())
    assert plan.tag == "step00000006" and plan.skipped_samples == 4 * 8 * 2 and plan.universal
    assert plan.data_position == LoaderPosition.from_dict(after)


def test_a_rollback_that_saves_again_retires_the_stop_so_the_next_resume_keeps_its_own_data(tmp_path):
    """A stop at step 7 rolls back to step 6; the run trains step 7 again (reading past the stop's batches, to 11)
    and saves step00000007. The stop tag sorts after it: kept, the next resume took the stop again, rolled back to
    step00000007 and moved the data back to batch 10, reading step 7's batch twice."""
    make_tag(tmp_path, "step00000006", batches=6)
    after = {"batches_consumed": 10, "batch": 10, "layout": Layout.whole_epoch(0, 1000, 2, 8).to_dict()}
    stop = {"nonfinite_stop": {"step": 7, "loader_after": after}}
    make_tag(tmp_path, "step00000007-nonfinite", batches=7, extra=stop)
    assert choose_tag(tmp_path, "auto", "rollback").tag == "step00000006"
    make_tag(tmp_path, "step00000007", batches=11)
    ckpt.rotate(tmp_path, keep_last=3, just_written="step00000007")
    assert ckpt.complete_tags(tmp_path) == ["step00000006", "step00000007"]
    again = choose_tag(tmp_path, "auto", "rollback")
    assert (again.tag, again.data_position, again.skipped_samples, again.notes) == ("step00000007", None, 0, ())


def test_a_second_stop_after_a_rollback_retires_the_first_so_the_next_resume_skips_the_second_ones_data(tmp_path):
    """Tags 300 and 400, a stop at step 457 having read 470 batches; the next launch rolls back to 400, moves the data
    to 470 and stops again at step 420, having read 495. The new stop sorts before the old one (by step): kept, every
    later launch took the stop at 457, went back to batch 470, read the batches that caused the second stop again and
    stopped there again (exit 3 for ever, under the default rollback)."""
    def stop(step: int, batches: int) -> dict:
        after = {"batches_consumed": batches, "batch": batches, "layout": Layout.whole_epoch(0, 99999, 2, 8).to_dict()}
        return {"nonfinite_stop": {"step": step, "loader_after": after}}

    make_tag(tmp_path, "step00000300", batches=300)
    make_tag(tmp_path, "step00000400", batches=400)
    make_tag(tmp_path, "step00000457-nonfinite", batches=457, extra=stop(457, 470))
    ckpt.rotate(tmp_path, keep_last=3, just_written="step00000457-nonfinite")
    first = choose_tag(tmp_path, "auto", "rollback")
    assert (first.tag, first.data_position.batches_consumed) == ("step00000400", 470)
    make_tag(tmp_path, "step00000420-nonfinite", batches=420, extra=stop(420, 495))
    ckpt.rotate(tmp_path, keep_last=3, just_written="step00000420-nonfinite")
    assert ckpt.complete_tags(tmp_path) == ["step00000300", "step00000400", "step00000420-nonfinite"]
    second = choose_tag(tmp_path, "auto", "rollback")
    assert (second.tag, second.data_position.batches_consumed) == ("step00000400", 495)
    assert second.skipped_samples == 95 * 8 * 2 and "step00000420-nonfinite" in second.notes[0]


def test_a_damaged_tag_is_saved_again_its_files_and_conversion_moved_aside_and_never_named(tmp_path):
    """A run fell back past a damaged step00000008 and trained to step 8 again: that save used to be skipped ('already
    complete'), leaving the damaged tag as the newest, named by the summary and taken by export. Now the step is
    saved, and the damaged folder (with its universal conversion) moved aside, kept for a look."""
    make_tag(tmp_path, "step00000006")
    damaged = make_tag(tmp_path, "step00000008")
    (damaged / "mp_rank_00_model_states.pt").write_bytes(b"m" * 5)
    (tmp_path / "step00000008.universal").mkdir()
    assert ckpt.existing(damaged) is None  # a summary does not name it
    assert ckpt.free_tag(tmp_path, 8, "") == "step00000008"
    make_tag(tmp_path, "step00000006-relayout")
    assert ckpt.free_tag(tmp_path, 6, ckpt.RELAYOUT) == "step00000006-relayout-2"
    ckpt.publish(make_tag(tmp_path, "step00000008.partial"), damaged)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "damaged-step00000008", "damaged-step00000008.universal", "step00000006", "step00000006-relayout",
        "step00000008"]
    assert ckpt.damage(damaged) is None and ckpt.existing(damaged) == damaged
    assert ckpt.free_tag(tmp_path, 8, "") is None  # intact now: a second save at step 8 is nothing to redo
    (damaged / "mp_rank_00_model_states.pt").write_bytes(b"")
    ckpt.publish(make_tag(tmp_path, "step00000008.partial"), damaged)
    assert (tmp_path / "damaged-step00000008-2").is_dir() and ckpt.complete_tags(tmp_path)[-1] == "step00000008"


def test_export_takes_the_newest_intact_checkpoint_and_refuses_a_damaged_one_named(tmp_path, caplog):
    import logging

    from mixmae_scale.engine.export import find_checkpoint
    from mixmae_scale.models.convert_official import WeightsError

    run = tmp_path / "run"
    make_tag(run / "checkpoints", "step00000006")
    damaged = make_tag(run / "checkpoints", "step00000008")
    (damaged / "rank_0.json").write_text("")
    with caplog.at_level(logging.WARNING, logger="mixmae"):
        assert find_checkpoint(run) == (run / "checkpoints", "step00000006")
    assert any(f"{damaged} is damaged (rank_0.json has 0 bytes" in r.getMessage() for r in caplog.records)
    for named in ((run, "step00000008"), (damaged, None)):
        with pytest.raises(WeightsError, match=r"step00000008 is damaged: rank_0.json has 0 bytes"):
            find_checkpoint(*named)
    (run / "checkpoints" / "step00000006" / "rank_0.json").unlink()
    with pytest.raises(WeightsError, match="every checkpoint is damaged"):
        find_checkpoint(run)


def test_a_stop_outranks_a_relayout_tag_of_its_step_and_repeated_stops_count_past_nine(tmp_path):
    """A resume on a new layout saves step00000400-relayout; its very first step then fails past the limit. By name
    the stop sorted before the relayout tag, so every launch took the relayout tag, replayed the same data and
    failed again, adding another stop tag."""
    assert sorted(["step00000400-nonfinite-10", "step00000400-nonfinite", "step00000401", "step00000400-relayout",
                   "step00000400-nonfinite-2", "step00000400"], key=ckpt.tag_order) == [
        "step00000400", "step00000400-relayout", "step00000400-nonfinite", "step00000400-nonfinite-2",
        "step00000400-nonfinite-10", "step00000401"]
    make_tag(tmp_path, "step00000004", batches=4)
    make_tag(tmp_path, "step00000004-relayout", batches=4)
    after = {"batches_consumed": 7, "batch": 7, "layout": Layout.whole_epoch(0, 1000, 2, 8).to_dict()}
    make_tag(tmp_path, "step00000004-nonfinite", batches=4,
             extra={"nonfinite_stop": {"step": 4, "loader_after": after}})
    choice = choose_tag(tmp_path, "auto", "skip")
    assert choice.tag == "step00000004-nonfinite" and choice.skipped_samples == 3 * 8 * 2
    rollback = choose_tag(tmp_path, "auto", "rollback")
    assert rollback.tag == "step00000004-relayout" and rollback.data_position == LoaderPosition.from_dict(after)


def test_a_damaged_tag_does_not_count_toward_keep_last():
    """keep_last=2 with step 400 damaged: rotation deleted step 300 and kept the damaged one, leaving one usable
    checkpoint. A damaged tag older than those kept goes."""
    tags = ["step00000250", "step00000300", "step00000350", "step00000400"]
    assert ckpt.rotation_victims(tags, 2, "step00000350", damaged=frozenset({"step00000400"})) == {"step00000250"}
    assert ckpt.rotation_victims(tags, 2, "step00000400", damaged=frozenset({"step00000300"})) == {
        "step00000250", "step00000300"}


def test_a_resume_named_by_a_path_into_another_folder_is_refused(tmp_path):
    make_tag(tmp_path / "mine", "step00000004")
    make_tag(tmp_path / "other", "step00000004")
    assert choose_tag(tmp_path / "mine", str(tmp_path / "mine" / "step00000004"), "rollback").tag == "step00000004"
    with pytest.raises(ckpt.ResumeError, match="is a checkpoint of another folder than this run's"):
        choose_tag(tmp_path / "mine", str(tmp_path / "other" / "step00000004"), "rollback")


def test_export_prefers_the_newest_regular_checkpoint_to_a_stop_and_says_so(tmp_path, caplog):
    import logging

    from mixmae_scale.engine.export import find_checkpoint

    run = tmp_path / "run"
    make_tag(run / "checkpoints", "step00000400")
    make_tag(run / "checkpoints", "step00000437-nonfinite")
    with caplog.at_level(logging.WARNING, logger="mixmae"):
        assert find_checkpoint(run) == (run / "checkpoints", "step00000400")
    assert any("holds a non-finite stop (step00000437-nonfinite): taking step00000400" in r.getMessage()
               for r in caplog.records)
    assert find_checkpoint(run, "step00000437-nonfinite")[1] == "step00000437-nonfinite"  # named: its own


def test_a_resume_sets_aside_the_best_checkpoints_of_the_continuation_it_leaves(tmp_path):
    """Fine-tuning rolled back to step 300 after best/ had saved step 500: kept, a new best at step 500 was not
    saved (the name existed) and one at 450 lost to 500 in `export --best`."""
    from mixmae_scale.engine.evaluated_job import EvaluatedJob

    job = EvaluatedJob.__new__(EvaluatedJob)
    job.root = tmp_path
    make_tag(tmp_path / "best", "step00000200")
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (200, 400, 500)))
    job.truncate_logs(300)
    assert not (tmp_path / "superseded-best-1").exists()  # nothing after step 300 in best/
    make_tag(tmp_path / "best", "step00000500")
    job.truncate_logs(300)
    assert ckpt.complete_tags(tmp_path / "best") == ["step00000200"]
    assert ckpt.complete_tags(tmp_path / "superseded-best-1") == ["step00000500"]
    assert [json.loads(line)["step"] for line in (tmp_path / "eval.jsonl").read_text().splitlines()] == [200]
    # best/ keeps one checkpoint: the step-200 one went when step 500 was saved. A resume from step 300 then
    # leaves best/ empty while the restored best (step 200's top-1) had its weights there: it is forgotten on
    # every rank, so that the next evaluation fills best/ again instead of only one that beats step 200.
    from types import SimpleNamespace

    job.metric, job.best = "top1", {"top1": 40.0, "step": 200}
    loop = SimpleNamespace(ctx=SimpleNamespace(rank=0, world=1))
    job.on_start(loop)
    assert job.best == {"top1": 40.0, "step": 200}  # its checkpoint is still there
    (tmp_path / "best" / "step00000200").rename(tmp_path / "superseded-best-1" / "step00000200")
    job.on_start(loop)
    assert job.best == {"top1": -1.0}


def test_the_branch_goes_on_after_rotation_removed_its_branch_point_and_odd_step_folders_are_not_tags(tmp_path):
    """A branch from step 2 saved 4, 6 and 8 and keep_last=3 rotated step 2 away: the same command again refused
    ("not a complete checkpoint") instead of going on. A folder a user named step-old sorted as a tag and crashed
    the ordering."""
    from mixmae_scale.engine import run_folder

    run = tmp_path / "run"
    for tag in ("step00000002", "step00000004", "step00000006", "step00000008"):
        make_tag(run / "checkpoints", tag)
    assert run_folder.set_aside_newer(run, "step00000002") is not None  # 4-8 of the earlier continuation go
    for tag in ("step00000004", "step00000006", "step00000008"):
        make_tag(run / "checkpoints", tag)
    ckpt.rotate(run / "checkpoints", keep_last=3, just_written="step00000008")
    assert ckpt.complete_tags(run / "checkpoints") == ["step00000004", "step00000006", "step00000008"]
    assert run_folder.continuation(run, "step00000002")[0] == "auto"
    (run / "checkpoints" / "step-old").mkdir()
    (run / "checkpoints" / "step-old" / ckpt.MARKER).write_text("{}")
    assert ckpt.complete_tags(run / "checkpoints")[0] == "step00000004"
    assert run_folder.continuation(run, "step-old") == ("step-old", None)  # not a tag: the plan refuses it
    assert run_folder.continuation(run, str(tmp_path / "other" / "step00000002")) == (
        str(tmp_path / "other" / "step00000002"), None)  # another folder's: refused by the plan, not turned auto


def test_a_resume_on_gpus_that_cannot_split_its_global_batch_names_the_gpu_counts_not_another_batch(tmp_path):
    """A run of global batch 32 resumed on 3 GPUs: the plain refusal's way out (--set batch.global_batch=N) would
    only meet the next refusal (another global batch is another run), so the folder's refusal names the GPU counts."""
    from mixmae_scale.config.derive import BatchSplitError, solve_batch
    from mixmae_scale.engine.run_folder import unsplittable_resume

    with pytest.raises(BatchSplitError) as caught:
        solve_batch(32, 8, 3)
    fresh = unsplittable_resume(tmp_path, caught.value, overwrite=False)
    assert fresh is caught.value and "--set batch.global_batch=N" in str(fresh)  # nothing to resume: as it was
    make_tag(tmp_path / "checkpoints", "step00000004")
    refusal = str(unsplittable_resume(tmp_path, caught.value, overwrite=False))
    assert "step00000004 was trained at batch.global_batch=32, which 3 GPUs cannot split" in refusal
    assert "resume it on 2 or 4 GPUs" in refusal and "batch.global_batch=N" not in refusal
    assert "--run-dir" in refusal and "--overwrite" in refusal
    assert unsplittable_resume(tmp_path, caught.value, overwrite=True) is caught.value  # a new run: any batch
    with pytest.raises(BatchSplitError) as other:  # the folder's run has another global batch: resume.py says so
        solve_batch(36, 8, 5)
    assert unsplittable_resume(tmp_path, other.value, overwrite=False) is other.value


def test_a_global_batch_split_refusal_counts_one_gpu_in_the_singular():
    from mixmae_scale.config import ConfigError
    from mixmae_scale.config.derive import solve_batch

    with pytest.raises(ConfigError) as caught:
        solve_batch(15, 8, 1)
    assert "cannot be split over 1 GPU:" in str(caught.value) and "for 1 GPU:" in str(caught.value)
    assert "1 GPUs" not in str(caught.value)


def test_launch_dry_run_on_gpus_that_cannot_split_the_folders_global_batch_says_what_the_ranks_would(tmp_path,
                                                                                                      capsys):
    """`mixmae launch --dry-run` resolves the batch before any rank starts: for a run folder whose checkpoint was
    trained at that global batch it offered another global batch (another run, refused at the resume), where the
    ranks' own refusal names the GPU counts that take it."""
    from mixmae_scale.cli import main

    make_tag(tmp_path / "r" / "checkpoints", "step00000004")  # global batch 32, the tiny profile's
    args = ["launch", "tiny", "--dry-run", "--set", "cluster.gpus_per_node=3", "--set", f"run.output_dir={tmp_path}",
            "--set", "run.name=r", "--set", "data.shards=nowhere"]
    assert main(args) == 2
    said = capsys.readouterr().err
    assert "step00000004 was trained at batch.global_batch=32, which 3 GPUs cannot split" in said, said
    assert "resume it on 2 or 4 GPUs" in said and "batch.global_batch=N" not in said
    assert main([*args, "--overwrite"]) == 2  # a new run in the folder: any global batch, as the ranks would say
    assert "--set batch.global_batch=N" in capsys.readouterr().err
