"""A resume with another recipe: every tag records the configuration it was trained with, and a resume compares
the one given now with it (engine/checkpointing/recipe.py): every changed key is named `old -> new` in a note that
the log and run.json keep; a key that changes what the loss means at the same step is refused unless
`checkpoint.allow_recipe_change` opts in; the schedule and learning rate may change (extending a run)."""

from __future__ import annotations

import pytest
import yaml

from mixmae_scale.config.derive import load_resolved
from mixmae_scale.engine.checkpointing import recipe, store
from mixmae_scale.engine.checkpointing.resume import decide_resume
from mixmae_scale.engine.checkpointing.state import RunIdentity
from mixmae_scale.engine.run_record import resume_entry

LAYOUT = {"zero_stage": 1, "dtype": "fp32", "sub_group_size": None, "grad_accum_dtype": None, "offload": False}


def resolved(*overrides: str, profile: str = "tiny"):
    return load_resolved(profile, overrides=["batch.global_batch=16", *overrides], world_size=1, train_samples=300)


class WritingEngine:
    """DeepSpeed's save stood in for: one model file in the tag."""

    def save_checkpoint(self, ckpt_dir, tag, client_state, save_latest):
        (store.Path(ckpt_dir) / tag).mkdir(parents=True, exist_ok=True)
        (store.Path(ckpt_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"m" * 64)


def saved_run(tmp_path, first, data=None, heldout=None):
    """A run folder with one tag saved by the real store with `first`'s recipe, as the trainer saves it (`data`: the
    training data it read, `heldout`: the record of the images it scored, both recorded with the recipe as the loop
    records them)."""
    ckpt_dir = tmp_path / "run" / "checkpoints"
    identity = RunIdentity.of(first, LAYOUT)
    rank_state = {"loader": {"epoch": 0, "batches_consumed": 4}, "rng": {}, "model_digest": identity.model_digest,
                  "model_shape": identity.model_shape, "optimizer_layout": LAYOUT,
                  "global_batch": identity.global_batch, "init": identity.init}
    request = store.SaveRequest(4, recipe=recipe.as_record(first, data, heldout))
    store.save(WritingEngine(), ckpt_dir, request, {"step": 4}, rank_state)
    return ckpt_dir


def plan_for(ckpt_dir, now):
    return decide_resume(ckpt_dir, "auto", "rollback", RunIdentity.of(now, LAYOUT), 1,
                         current_recipe=recipe.as_record(now),
                         allow_recipe_change=now.config.checkpoint.allow_recipe_change)


def test_each_tag_records_its_recipe_and_an_unchanged_resume_says_nothing(tmp_path, gloo_of_one):
    first = resolved()
    ckpt_dir = saved_run(tmp_path, first)
    recorded = yaml.safe_load((ckpt_dir / "step00000004" / store.RECIPE).read_text())
    assert recorded["model"]["mask_ratio"] == first.config.model.mask_ratio
    assert store.RECIPE in store.marker(ckpt_dir, "step00000004")["files"]  # sealed with the tag, size checked
    plan = plan_for(ckpt_dir, resolved())
    assert plan.tag == "step00000004" and plan.notes == () and plan.config_changes == ()


def test_a_longer_schedule_and_another_learning_rate_resume_with_a_note_naming_each_change(tmp_path, gloo_of_one):
    ckpt_dir = saved_run(tmp_path, resolved())
    plan = plan_for(ckpt_dir, resolved("schedule.epochs=50", "optim.base_learning_rate=0.1"))
    assert "optim.base_learning_rate 0.01 -> 0.1" in plan.config_changes
    assert "schedule.epochs 5.0 -> 50.0" in plan.config_changes
    assert len(plan.notes) == 1 and "with a changed configuration" in plan.notes[0]
    assert "optim.base_learning_rate 0.01 -> 0.1" in plan.notes[0]
    entry = resume_entry(plan, 4, 1, LAYOUT)  # what run.json keeps of the resume
    assert entry["config_changes"] == list(plan.config_changes) and entry["notes"] == list(plan.notes)


def test_a_changed_mask_ratio_is_refused_naming_the_key_and_the_opt_in_and_resumes_with_it(tmp_path, gloo_of_one):
    ckpt_dir = saved_run(tmp_path, resolved())
    with pytest.raises(store.ResumeError) as refused:
        plan_for(ckpt_dir, resolved("model.mask_ratio=0.75", "schedule.epochs=50"))
    message = str(refused.value)
    assert "model.mask_ratio 0.5 -> 0.75" in message and "checkpoint.allow_recipe_change=true" in message
    assert str((ckpt_dir / "step00000004").resolve()) in message and "--overwrite" in message
    plan = plan_for(ckpt_dir, resolved("model.mask_ratio=0.75", "checkpoint.allow_recipe_change=true"))
    assert plan.config_changes == ("model.mask_ratio 0.5 -> 0.75",)
    assert "checkpoint.allow_recipe_change=true lets model.mask_ratio change" in plan.notes[0]


def test_another_profile_is_named_and_its_loss_changes_refused(tmp_path, gloo_of_one):
    ckpt_dir = saved_run(tmp_path, resolved())
    now = resolved("model.norm_pix_loss=false", "data.hflip=0.0", "logging.every_steps=7")
    with pytest.raises(store.ResumeError, match="model.norm_pix_loss true -> false; data.hflip|data.hflip 0.5 -> 0.0"):
        plan_for(ckpt_dir, now)


@pytest.mark.parametrize("key, refused", [
    ("model.mask_ratio", True), ("model.norm_pix_loss", True), ("model.drop_path", True), ("data.hflip", True),
    ("data.crop_scale", True), ("finetune.mixup", True), ("model.checkpoint_every", False),
    ("model.compile", False), ("model.attention", False), ("optim.base_learning_rate", False),
    ("schedule.epochs", False), ("schedule.warmup_epochs", False), ("checkpoint.keep_last", False),
    ("batch.micro", False)])
def test_which_keys_change_what_the_loss_means(key, refused):
    assert recipe.changes_the_loss(key) is refused


def test_per_start_keys_and_derived_values_are_not_compared_and_older_tags_fall_back_to_the_run_config(tmp_path):
    saved = {"checkpoint": {"resume": "auto", "keep_last": 3}, "cluster": {"master_port": 1},
             "derived": {"micro_batch": 8}, "model": {"mask_ratio": 0.5}}
    now = {"checkpoint": {"resume": "step00000004", "keep_last": 3, "allow_recipe_change": True},
           "cluster": {"master_port": 2}, "derived": {"micro_batch": 4}, "model": {"mask_ratio": 0.5}}
    assert recipe.differences(saved, now) == []
    verdict = recipe.compare(None, now, False, "x", "y")  # nothing recorded: nothing to compare
    assert verdict.note is None and verdict.refusal is None
    (tmp_path / "checkpoints" / "step00000004").mkdir(parents=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert recipe.saved_recipe(tmp_path / "checkpoints", "step00000004") == saved


def mixture(location: str, bytes_per_shard: tuple[int, ...] = (1000, 700), weight: float = 1.0):
    """The training data as the loop reads it: one set of two shards at `location` (no files are read)."""
    from mixmae_scale.data.manifest import SplitShards
    from mixmae_scale.data.shard_sets import ShardMixture, WeightedSet

    shards = SplitShards("train", location, location, ("train-000000.tar", "train-000001.tar"),
                         ("train-000000.idx", "train-000001.idx"), (64, 36), bytes_per_shard, 100, True, 10)
    return ShardMixture([WeightedSet(shards, weight, location)])


def plan_with_data(ckpt_dir, now, data):
    return decide_resume(ckpt_dir, "auto", "rollback", RunIdentity.of(now, LAYOUT), 1,
                         current_recipe=recipe.as_record(now, data),
                         allow_recipe_change=now.config.checkpoint.allow_recipe_change)


def test_the_same_shards_at_another_location_resume_with_a_note_and_other_shards_there_are_refused(tmp_path,
                                                                                                    gloo_of_one):
    """A run moved to another cluster, where the shards are mounted elsewhere: data.shards names another folder,
    the shards in it are the checkpoint's (same names, sizes and sample counts). It was refused as 'would change
    what the loss means', and the way out offered (the checkpoint's path) does not exist on the new machine."""
    ckpt_dir = saved_run(tmp_path, resolved("data.shards=/old/mount/shards"), mixture("/old/mount/shards"))
    now = resolved("data.shards=/new/mount/shards")
    plan = plan_with_data(ckpt_dir, now, mixture("/new/mount/shards"))
    assert plan.tag == "step00000004"
    assert plan.config_changes == ('data.shards "/old/mount/shards" -> "/new/mount/shards" (the same shards, by '
                                   'name, size and sample count, at another location)',)
    assert "with a changed configuration: data.shards" in plan.notes[0] and "allow_recipe_change" not in plan.notes[0]
    with pytest.raises(store.ResumeError) as refused:  # other shards at the new place: one of them re-encoded
        plan_with_data(ckpt_dir, now, mixture("/new/mount/shards", bytes_per_shard=(1000, 701)))
    assert "their names, sizes, sample counts, weights or contents differ" in str(refused.value)
    assert 'data.shards "/old/mount/shards" -> "/new/mount/shards" would change' in str(refused.value)


def test_a_moved_source_with_another_weight_and_a_tag_without_its_data_are_refused(tmp_path, gloo_of_one):
    def sources(location, weight):
        return f"data.sources=[{{shards: {location}, weight: {weight}}}]"

    ckpt_dir = saved_run(tmp_path, resolved(sources("/a", 1.0)), mixture("/a"))
    plan = plan_with_data(ckpt_dir, resolved(sources("/b", 1.0)), mixture("/b"))
    assert len(plan.config_changes) == 1 and "at another location" in plan.config_changes[0]
    with pytest.raises(store.ResumeError, match="data.sources"):  # the same shards, read in another proportion
        plan_with_data(ckpt_dir, resolved(sources("/b", 2.0)), mixture("/b", weight=2.0))
    older = saved_run(tmp_path / "older", resolved("data.shards=/a"))  # saved before tags recorded their data
    with pytest.raises(store.ResumeError, match="saved before checkpoints recorded their data"):
        plan_with_data(older, resolved("data.shards=/b"), mixture("/b"))


def test_a_resume_with_another_schedule_says_where_the_learning_rate_goes_on(tmp_path, gloo_of_one):
    """A finished cosine run (2 epochs, lr 4.75e-6 at its last step 36) extended to 4 epochs: the new schedule applies
    from step 37, 4.69e-4 there, 99x the lr the checkpoint ended at; the note named only `schedule.epochs 2 -> 4`.
    (Values of the tiny profile's real run, 2 ranks.)"""
    from mixmae_scale.engine.monitor import logged_learning_rate

    ckpt_dir = saved_run(tmp_path, resolved("schedule.epochs=2"))
    plan = plan_for(ckpt_dir, resolved("schedule.epochs=4"))
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,loss,lr\n35,0.65,1.88e-05\n36,0.66,4.747577e-06\n")
    before = logged_learning_rate(metrics, 36)
    assert before == pytest.approx(4.747577e-06) and logged_learning_rate(metrics, 37) is None
    assert recipe.schedule_note(plan.config_changes, 36, before, 0.00046875, 72) == (
        "the learning rate follows the new schedule from step 37 on: 4.75e-06 at step 36 under the checkpoint's, "
        "0.000469 at step 37 of 72 (98.7x)")
    assert recipe.schedule_note(("optim.base_learning_rate 0.01 -> 0.02",), 11, None, 6e-4, 90) == (
        "the learning rate follows the new schedule from step 12 on: 0.0006 at step 12 of 90")
    assert recipe.schedule_note(("logging.every_steps 1 -> 2",), 11, 3e-4, 3.4e-4, 90) is None
    to_zero = recipe.schedule_note(("schedule.epochs 4.0 -> 2.0",), 11, 3e-4, 0.0, 90)
    assert to_zero.endswith(" 0 at step 12 of 90 (to 0)"), to_zero


def test_a_fine_tuning_rerun_with_more_epochs_says_before_training_that_it_continues_the_run_and_how_to_start_anew(
        tmp_path, gloo_of_one, caplog):
    """The same fine-tuning command again in its folder with schedule.epochs raised went on from the checkpoint, the
    log naming a changed key and the lr but not that this is the earlier run continued under a longer schedule, nor
    how to start a new one. The loop's resume (TrainingLoop._resume, the checkpointer stood in for) with DeepSpeed's
    own WarmupCosineLR, stepped to the checkpoint's step under the old schedule and rebuilt for the new one as the
    engine's load does (it restores only last_batch_iteration)."""
    import logging
    import types

    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from mixmae_scale.config.deepspeed_config import engine_config
    from mixmae_scale.engine import run_folder
    from mixmae_scale.engine.loop import TrainingLoop

    first, now = (resolved(f"schedule.epochs={epochs}", profile="finetune_tiny") for epochs in (2, 4))
    assert now.derived.total_steps > first.derived.total_steps
    ckpt_dir = saved_run(tmp_path, first)
    plan = plan_for(ckpt_dir, now)
    assert plan.saved_total_steps == first.derived.total_steps

    def scheduler(config, steps: int) -> WarmupCosineLR:
        weight = torch.nn.Parameter(torch.zeros(1))
        made = WarmupCosineLR(torch.optim.SGD([weight], lr=config.derived.learning_rate),
                              **engine_config(config, tmp_path)["scheduler"]["params"])
        for _ in range(steps):
            made.step()
        return made

    old = scheduler(first, plan.step)
    new = scheduler(now, 0)
    new.load_state_dict(old.state_dict())
    run = ckpt_dir.parent
    (run / "metrics.csv").write_text(f"step,loss,lr\n{plan.step},2.3,{old.get_lr()[0]}\n")
    loop = types.SimpleNamespace(checkpointer=types.SimpleNamespace(resume=lambda plan: plan.step),
                                 ctx=types.SimpleNamespace(rank=0, root=run), derived=now.derived, scheduler=new,
                                 job=types.SimpleNamespace(truncate_logs=lambda step: None))
    with caplog.at_level(logging.WARNING, logger="mixmae.loop"):
        TrainingLoop._resume(loop, plan)
    said = [r.getMessage() for r in caplog.records if r.name == "mixmae.loop"]
    assert len(said) == 1, said
    step, old_total, total = plan.step, first.derived.total_steps, now.derived.total_steps
    assert said[0].startswith(f"continuing the earlier run from its checkpoint at step {step} of its {old_total}-step "
                              f"schedule, now {total} steps long (not a new run): the learning rate's warm-up and "
                              f"cosine are recomputed over {total} steps and taken up at step {step + 1}"), said[0]
    assert (f"(the checkpoint keeps only the scheduler's step count): lr {old.get_lr()[0]:.3g} at step {step} "
            f"under the checkpoint's, {new.get_lr()[0]:.3g} at step {step + 1}") in said[0]
    assert said[0].endswith(f"; to train a new {total}-step run from the start instead, {run_folder.way_out(run)}")
    assert "--overwrite" in said[0]
    # A finished run (its last step, lr at the floor) extended: the jump back up is said.
    extended = recipe.continuation_note(36, 36, 72, 4.747577e-06, 0.00046875, "HOW")
    assert "4.75e-06 at step 36 under the checkpoint's, 0.000469 at step 37 (98.7x); " in extended
    assert recipe.continuation_note(36, 72, 72, 4.7e-06, 4.7e-06, "HOW") is None  # the same length: a plain resume
    assert recipe.continuation_note(36, None, 72, 4.7e-06, 4.7e-06, "HOW") is None  # an older tag's recipe


def test_a_rebuilt_set_with_the_same_names_sizes_and_counts_but_other_tars_is_not_a_move(tmp_path, gloo_of_one):
    """Tars are 512-byte padded: a set rebuilt (re-encoded, relabelled) can keep every name, size and count. The
    manifest's sha256 of each tar tells it apart; a tag saved with a digest of the names alone still reads a move."""
    from dataclasses import replace

    from mixmae_scale.data.shard_sets import ShardMixture, WeightedSet

    def hashed(location, digests):
        entry = mixture(location).sets[0]
        return ShardMixture([WeightedSet(replace(entry.shards, sha256=digests), entry.weight, location)])

    ckpt_dir = saved_run(tmp_path, resolved("data.shards=/old"), hashed("/old", ("a" * 64, "b" * 64)))
    now = resolved("data.shards=/new")
    assert "at another location" in plan_with_data(ckpt_dir, now, hashed("/new", ("a" * 64, "b" * 64))).notes[0]
    with pytest.raises(store.ResumeError, match="not the checkpoint's shards"):
        plan_with_data(ckpt_dir, now, hashed("/new", ("a" * 64, "c" * 64)))
    # a tag saved before the digests were recorded: its names, sizes and counts still match the set now
    older = saved_run(tmp_path / "older", resolved("data.shards=/old"), mixture("/old"))
    plan = plan_with_data(older, now, hashed("/new", ("a" * 64, "c" * 64)))
    assert "at another location" in plan.config_changes[0]


def test_a_set_rebuilt_in_place_is_refused_as_other_data_and_an_older_tag_resumes_as_before(tmp_path, gloo_of_one):
    """The set converted again under the same data.shards: no location key changed, so the tag's record of its data
    was compared with nothing and the run resumed, its positions naming other samples than the checkpoint's. Other
    shards (names, sizes, counts) and other tars (sha256) at the same path are refused as any change of the data."""
    from dataclasses import replace

    from mixmae_scale.data.shard_sets import ShardMixture, WeightedSet

    def hashed(location, digests, weight=1.0):
        entry = mixture(location).sets[0]
        return ShardMixture([WeightedSet(replace(entry.shards, sha256=digests), weight, location)])

    same = resolved("data.shards=/set")
    ckpt_dir = saved_run(tmp_path, same, hashed("/set", ("a" * 64, "b" * 64)))
    assert plan_with_data(ckpt_dir, same, hashed("/set", ("a" * 64, "b" * 64))).notes == ()
    with pytest.raises(store.ResumeError, match="/set.*rebuilt in place") as refused:
        plan_with_data(ckpt_dir, same, hashed("/set", ("a" * 64, "c" * 64)))
    assert "allow_recipe_change" in str(refused.value) and "not the checkpoint's shards" not in str(refused.value)
    grown = ShardMixture([WeightedSet(replace(mixture("/set").sets[0].shards, names=("x.tar", "y.tar")), 1.0, "/set")])
    with pytest.raises(store.ResumeError, match="rebuilt in place"):
        plan_with_data(ckpt_dir, same, grown)
    opted = plan_with_data(ckpt_dir, resolved("data.shards=/set", "checkpoint.allow_recipe_change=true"), grown)
    assert any("rebuilt in place" in note for note in opted.notes)
    older = saved_run(tmp_path / "older", same)  # saved before tags recorded their data: nothing to compare
    assert plan_with_data(older, same, grown).notes == ()


def val_split(location: str, counts: tuple[int, ...] = (40, 24), sha256: tuple[str, ...] = ()):
    """A validation split of `counts` samples per shard at `location` (no files are read)."""
    from mixmae_scale.data.manifest import SplitShards

    names = tuple(f"val-{n:06d}.tar" for n in range(len(counts)))
    return SplitShards("val", location, location, names, tuple(n.replace(".tar", ".idx") for n in names), counts,
                       tuple(500 * c for c in counts), sum(counts), True, 10, sha256=sha256)


def plan_scoring(ckpt_dir, now, data, images, scored=32):
    return decide_resume(ckpt_dir, "auto", "rollback", RunIdentity.of(now, LAYOUT), 1,
                         current_recipe=recipe.as_record(now, data, recipe.heldout_record(images, scored)),
                         allow_recipe_change=False)


def test_other_held_out_images_resume_with_a_warning_kept_in_run_json_and_moved_ones_only_as_the_move(tmp_path,
                                                                                                    gloo_of_one):
    """The held-out split was not in the tag: a resume with another one (a val split rebuilt, another data.val_split)
    went on in silence, and the held-out loss after it scored other images than before it. Not refused (training
    reads the same data): said, with its step, in the log and run.json."""
    first = resolved("data.shards=/old")
    ckpt_dir = saved_run(tmp_path, first, mixture("/old"), recipe.heldout_record(val_split("/old"), 32))
    moved = plan_scoring(ckpt_dir, resolved("data.shards=/new"), mixture("/new"), val_split("/new"))
    assert moved.heldout_change is None and len(moved.notes) == 1 and "at another location" in moved.notes[0]
    assert "heldout_changed" not in resume_entry(moved, 4, 1, LAYOUT)
    other = plan_scoring(ckpt_dir, first, mixture("/old"), val_split("/old", counts=(40, 30)))
    assert other.tag == "step00000004" and other.config_changes == ()
    assert other.notes == (other.heldout_change,) and "the held-out images differ" in other.heldout_change
    assert "resumed at step 4 all the same" in other.heldout_change and "before step 4" in other.heldout_change
    assert resume_entry(other, 4, 1, LAYOUT)["heldout_changed"] == other.heldout_change
    assert plan_scoring(ckpt_dir, first, mixture("/old"), val_split("/old"), scored=64).heldout_change  # more scored
    nothing = plan_scoring(ckpt_dir, first, mixture("/old"), None).heldout_change
    assert "images were held out before it, none are now" in nothing


def test_a_rebuilt_held_out_split_is_told_apart_by_its_tars_and_an_older_tag_is_resumed_without_the_check(
        tmp_path, gloo_of_one):
    first = resolved()
    hashed = val_split("/v", sha256=("a" * 64, "b" * 64))
    ckpt_dir = saved_run(tmp_path, first, mixture("/v"), recipe.heldout_record(hashed, 32))
    rebuilt = plan_scoring(ckpt_dir, first, mixture("/v"), val_split("/v", sha256=("a" * 64, "c" * 64)))
    assert "other tar contents: the set was rebuilt" in rebuilt.heldout_change
    assert plan_scoring(ckpt_dir, first, mixture("/v"), val_split("/v")).heldout_change is None  # contents unknown now
    older = saved_run(tmp_path / "older", first, mixture("/v"))  # saved before tags recorded their held-out images
    plan = plan_scoring(older, first, mixture("/v"), val_split("/v", counts=(1, 2)))
    assert plan.tag == "step00000004" and plan.notes == () and plan.heldout_change is None


def test_the_held_out_record_is_of_the_images_scored_not_where_they_lie_nor_a_compared_config_key():
    from mixmae_scale.data.heldout import split_tail

    train = val_split("/a", counts=(64, 36))
    assert recipe.heldout_record(val_split("/a")) == recipe.heldout_record(val_split("/elsewhere"))
    assert recipe.heldout_record(split_tail(train, 16)[1]) != recipe.heldout_record(split_tail(train, 20)[1])
    assert recipe.heldout_record(None) == {recipe.HELDOUT: recipe.NOTHING_HELD_OUT}
    assert recipe.differences({recipe.HELDOUT: "x", recipe.HELDOUT_CONTENT: "y"},
                              {recipe.HELDOUT: "z", recipe.HELDOUT_CONTENT: "w"}) == []


def test_a_held_out_tail_cut_elsewhere_is_refused_naming_its_setting_not_as_a_set_rebuilt_in_place(tmp_path,
                                                                                                   gloo_of_one):
    """Without a validation split the held-out tail is logging.heldout_batches x batch.micro of the train split: a
    resume with another count trains on another cut of the same shards. Refused (the training data changed), but
    the set was not converted again: the refusal names the setting that moved the cut, not 'rebuilt in place'."""
    from mixmae_scale.data.heldout import split_tail
    from mixmae_scale.data.shard_sets import ShardMixture, WeightedSet

    def cut(count):
        return ShardMixture([WeightedSet(split_tail(mixture("/set").sets[0].shards, count)[0], 1.0, "/set")])

    ckpt_dir = saved_run(tmp_path, resolved("data.shards=/set"), cut(16))
    with pytest.raises(store.ResumeError, match="logging.heldout_batches") as refused:
        plan_with_data(ckpt_dir, resolved("data.shards=/set", "logging.heldout_batches=8"), cut(32))
    assert "rebuilt in place" not in str(refused.value), refused.value
    assert "allow_recipe_change" in str(refused.value)
    assert "keep logging.heldout_batches x batch.micro" in str(refused.value)
    # the way out it names: a smaller micro-batch (smaller GPUs) with as many more held-out batches cuts the same tail
    kept = plan_with_data(ckpt_dir, resolved("data.shards=/set", "batch.micro=8", "logging.heldout_batches=2"), cut(16))
    assert kept.tag == "step00000004" and not any("held-out tail" in c for c in kept.config_changes), kept
    # a data.heldout or data.train_split change is refused by its own name: the set is not said to be rebuilt
    with pytest.raises(store.ResumeError) as split:
        plan_with_data(ckpt_dir, resolved("data.shards=/set", "data.heldout=split"), mixture("/set"))
    assert "data.heldout" in str(split.value) and "rebuilt in place" not in str(split.value), split.value


def test_with_sources_another_data_shards_of_other_held_out_images_is_not_called_the_same_shards_moved(
        tmp_path, gloo_of_one):
    """With data.sources, data.shards gives only the held-out images: the training data is the same whatever it
    names, so its change resumes (held-out images are said, not refused), but the note called it 'the same shards
    ... at another location' beside the warning that the held-out images differ."""
    src = "data.sources=[{shards: /train, weight: 1.0}]"
    ckpt_dir = saved_run(tmp_path, resolved("data.shards=/a", src), mixture("/train"),
                         recipe.heldout_record(val_split("/a"), 32))
    plan = plan_scoring(ckpt_dir, resolved("data.shards=/b", src), mixture("/train"), val_split("/b", (40, 30)))
    assert plan.heldout_change is not None and len(plan.config_changes) == 1, plan
    assert "the same shards" not in plan.config_changes[0], plan.config_changes
    assert "held-out images only" in plan.config_changes[0], plan.config_changes
    moved = plan_scoring(ckpt_dir, resolved("data.shards=/b", src), mixture("/train"), val_split("/b"))
    assert moved.heldout_change is None and "at another location" in moved.config_changes[0]


def test_a_source_now_cut_of_its_held_out_tail_is_not_said_to_be_rebuilt_when_its_tars_are_the_same(tmp_path,
                                                                                                  gloo_of_one):
    """A mixture's source with data.shards' train tars trained on the held-out tail until the tail was cut from it
    too: a run started before resumes with that source cut, the same tars (sha256) at the same place. Refused (other
    samples), but 'rebuilt in place' told the user their set was converted again."""
    from dataclasses import replace

    from mixmae_scale.data.heldout import split_tail
    from mixmae_scale.data.shard_sets import ShardMixture, WeightedSet

    whole = replace(mixture("/set").sets[0].shards, sha256=("a" * 64, "b" * 64))
    src = resolved("data.shards=/set", "data.sources=[{shards: /set, weight: 1.0}]")
    ckpt_dir = saved_run(tmp_path, src, ShardMixture([WeightedSet(whole, 1.0, "/set")]))
    cut = ShardMixture([WeightedSet(split_tail(whole, 16)[0], 1.0, "/set")])
    with pytest.raises(store.ResumeError, match="held-out tail") as refused:
        plan_with_data(ckpt_dir, src, cut)
    assert "rebuilt in place" not in str(refused.value), refused.value


def test_a_held_out_change_opted_in_with_other_training_data_does_not_say_training_reads_the_same_data(
        tmp_path, gloo_of_one):
    """A held-out tail cut elsewhere, resumed with the opt-in: the held-out warning said '(training reads the same
    data)' beside the note that the training samples changed."""
    from mixmae_scale.data.heldout import split_tail
    from mixmae_scale.data.shard_sets import ShardMixture, WeightedSet

    whole = mixture("/set").sets[0].shards
    train16, tail16 = split_tail(whole, 16)
    train32, tail32 = split_tail(whole, 32)
    ckpt_dir = saved_run(tmp_path, resolved("data.shards=/set"), ShardMixture([WeightedSet(train16, 1.0, "/set")]),
                         recipe.heldout_record(tail16, 16))
    now = resolved("data.shards=/set", "logging.heldout_batches=8", "checkpoint.allow_recipe_change=true")
    plan = decide_resume(ckpt_dir, "auto", "rollback", RunIdentity.of(now, LAYOUT), 1,
                         current_recipe=recipe.as_record(now, ShardMixture([WeightedSet(train32, 1.0, "/set")]),
                                                         recipe.heldout_record(tail32, 32)),
                         allow_recipe_change=True)
    assert plan.heldout_change is not None
    assert "training reads the same data" not in plan.heldout_change, plan.heldout_change


def test_a_checkpoint_that_trained_on_held_out_images_through_a_superset_source_is_told_as_that(tmp_path,
                                                                                                 gloo_of_one):
    """A source listing the held-out train split's tars and more read the held-out tail until the cut went by sample
    identity: a run started before resumes with fewer samples of that source. Refused (other samples) unless opted
    in, but as 'rebuilt in place', which told the user their set was converted again."""
    from mixmae_scale.data.heldout import choose_heldout
    from mixmae_scale.data.shard_sets import training_mixture
    from tests.unit.test_heldout import write_set, write_superset

    folder = write_set(tmp_path / "set", sizes=(20, 20))
    superset = write_superset(tmp_path / "superset", folder, order=(0, 1))
    heldout = choose_heldout(str(folder), "train", "val", "auto", 16)
    sources = training_mixture("unused", "train", [(str(superset), 1.0, None)])
    cut, earlier = heldout.exclude_from(sources), heldout.earlier_cut(sources)
    scored = recipe.heldout_record(heldout.images, 16)
    src = [f"data.shards={folder}", f"data.sources=[{{shards: {superset}, weight: 1.0}}]"]
    ckpt_dir = saved_run(tmp_path, resolved(*src), earlier, scored)

    def resume(*overrides):
        now = resolved(*src, *overrides)
        current = recipe.as_record(now, cut, {**scored, **recipe.earlier_cut_record(earlier, cut)})
        return decide_resume(ckpt_dir, "auto", "rollback", RunIdentity.of(now, LAYOUT), 1, current_recipe=current,
                             allow_recipe_change=now.config.checkpoint.allow_recipe_change)

    with pytest.raises(store.ResumeError, match="allow_recipe_change") as refused:
        resume()
    assert "rebuilt in place" not in str(refused.value) and "earlier release" in str(refused.value), refused.value
    opted = resume("checkpoint.allow_recipe_change=true")
    assert any("earlier release" in note for note in opted.notes), opted.notes
    assert opted.heldout_change is None  # the same held-out images: only what training reads changed
    assert recipe.earlier_cut_record(cut, cut) == {}


def test_a_held_out_change_warns_end_to_end_from_the_set_to_run_json_and_the_summary(tmp_path, gloo_of_one, caplog):
    """The held-out change path as a run takes it, without a rank launch: the held-out images chosen from real shard
    sets (data/heldout.py), recorded by pretraining (pretrain/job.scored_images, leave_out_heldout) in a tag the
    store saves, compared by the collective resume plan, kept in run.json's resume entry, and said by the summary.
    Each piece has its own test; this one catches a record key that one of them writes and the next one does not
    read."""
    from types import SimpleNamespace

    import torch

    from mixmae_scale.data.heldout import choose_heldout, heldout_count
    from mixmae_scale.data.shard_sets import training_mixture
    from mixmae_scale.engine.checkpointing.resume import plan_resume
    from mixmae_scale.pretrain import job as module
    from mixmae_scale.pretrain.heldout_loss import HeldOutLoss
    from tests.unit.test_heldout import write_set

    with_val = write_set(tmp_path / "val-set", sizes=(40, 40), with_val=True)
    without = write_set(tmp_path / "tail-set", sizes=(40, 40))

    def start(folder, *overrides):
        now = resolved(f"data.shards={folder}", *overrides)
        config = now.config
        heldout = choose_heldout(str(folder), "train", "val", config.data.heldout,
                                 heldout_count(config.logging.heldout_batches, config.batch.micro))
        data, cut_records = module.leave_out_heldout(heldout, training_mixture(str(folder), "train", []))
        return now, heldout, data, {**module.scored_images(config, heldout), **cut_records}  # as pretrain's scores()

    def resume(ckpt_dir, now, data, scored):
        return plan_resume(ckpt_dir, now, LAYOUT, data=data, heldout=scored)

    # a validation split, scored in 1 batch, then in 2: the same training data, other held-out images scored
    first, heldout, data, scored = start(with_val, "logging.heldout_batches=1")
    ckpt_dir = saved_run(tmp_path / "a", first, data, scored)
    assert resume(ckpt_dir, first, data, scored).heldout_change is None
    more, _, more_data, more_scored = start(with_val, "logging.heldout_batches=2")
    plan = resume(ckpt_dir, more, more_data, more_scored)
    assert plan.heldout_change and "training reads the same data" in plan.heldout_change, plan
    assert resume_entry(plan, 4, 1, LAYOUT)["heldout_changed"] == plan.heldout_change
    monkey = pytest.MonkeyPatch()
    monkey.setattr(module, "heldout_loss", lambda *a: HeldOutLoss(0.8, 4))
    loop = SimpleNamespace(ctx=SimpleNamespace(rank=0), engine=None, device=torch.device("cpu"),
                           derived=SimpleNamespace(dtype="fp32"), step=10)
    try:
        before = module.PretrainJob(first.config, None, heldout)
        before.on_start(loop)
        after = module.PretrainJob(more.config, None, heldout)
        after.load_state(before.state())
        with caplog.at_level("WARNING"):
            assert after.summary(loop)["heldout_same_images"] is False
    finally:
        monkey.undo()
    # a train split's tail, cut at another size: other training data too, refused, then said with the opt-in
    first, _, data, scored = start(without, "logging.heldout_batches=1")
    ckpt_dir = saved_run(tmp_path / "b", first, data, scored)
    cut_elsewhere, _, other_data, other_scored = start(without, "logging.heldout_batches=2")
    with pytest.raises(store.ResumeError, match="held-out tail"):
        resume(ckpt_dir, cut_elsewhere, other_data, other_scored)
    opted, _, opted_data, opted_scored = start(without, "logging.heldout_batches=2",
                                               "checkpoint.allow_recipe_change=true")
    plan = resume(ckpt_dir, opted, opted_data, opted_scored)
    assert plan.heldout_change and "allow_recipe_change=true let the training data change too" in plan.heldout_change
    assert resume_entry(plan, 4, 1, LAYOUT)["heldout_changed"] == plan.heldout_change


def test_a_superset_source_rebuilt_in_place_is_not_told_as_the_earlier_release_s_cut(tmp_path, gloo_of_one):
    """The earlier release's reading (`EARLIER_CUT`) was compared by names, sizes and counts alone: a superset source
    converted again under the same names, sizes and counts (other tar sha256s) since its checkpoint was said to be
    'the same shards' an earlier release read, hiding that the tars themselves changed."""
    from dataclasses import replace

    from mixmae_scale.data.heldout import choose_heldout
    from mixmae_scale.data.shard_sets import ShardMixture, WeightedSet, training_mixture
    from tests.unit.test_heldout import write_set, write_superset

    folder = write_set(tmp_path / "set", sizes=(20, 20))
    superset = write_superset(tmp_path / "superset", folder, order=(0, 1))
    heldout = choose_heldout(str(folder), "train", "val", "auto", 16)

    def sources(digests):
        entry = training_mixture("unused", "train", [(str(superset), 1.0, None)]).sets[0]
        return ShardMixture([WeightedSet(replace(entry.shards, sha256=digests), entry.weight, entry.name)])

    src = [f"data.shards={folder}", f"data.sources=[{{shards: {superset}, weight: 1.0}}]"]
    ckpt_dir = saved_run(tmp_path, resolved(*src), heldout.earlier_cut(sources(("a" * 64, "b" * 64, "c" * 64))))

    def refusal(digests):
        data = sources(digests)
        cut = heldout.exclude_from(data)
        with pytest.raises(store.ResumeError) as refused:
            plan_with_data_recorded(ckpt_dir, resolved(*src), cut,
                                    recipe.earlier_cut_record(heldout.earlier_cut(data), cut))
        return str(refused.value)

    same = refusal(("a" * 64, "b" * 64, "c" * 64))
    assert "earlier release" in same and "rebuilt in place" not in same, same
    rebuilt = refusal(("a" * 64, "b" * 64, "d" * 64))
    assert "rebuilt in place" in rebuilt and "earlier release" not in rebuilt, rebuilt


@pytest.mark.parametrize("tail", [8, 16, 24])  # part of the last shard, all of it, all of it and part of the one before
def test_a_source_read_whole_by_its_checkpoint_and_now_cut_of_the_tail_names_the_cut_whatever_shards_it_drops(
        tmp_path, gloo_of_one, tail):
    """A source over data.shards' train tars at another location (a copy of its manifest) was read whole by a run an
    earlier release started; now the tail is left out of it. The 'same tars' reading compared the tars' sha256 digest
    of what is read, which changes as soon as the tail drops a whole shard (and is absent where the manifest records
    no sha256): such a resume was refused as 'rebuilt in place', though nothing was converted again."""
    from mixmae_scale.data.heldout import choose_heldout
    from mixmae_scale.data.shard_sets import training_mixture
    from mixmae_scale.pretrain.job import leave_out_heldout
    from tests.unit.test_heldout import write_set, write_superset

    folder = write_set(tmp_path / "set", sizes=(40, 16))
    copy = write_superset(tmp_path / "copy", folder, extra=0, order=(0, 1))
    heldout = choose_heldout(str(folder), "train", "val", "auto", tail)
    sources = training_mixture("unused", "train", [(str(copy), 1.0, None)])
    cut, records = leave_out_heldout(heldout, sources)
    assert cut.sets[0].shards.samples == 56 - tail and len(cut.sets[0].shards.names) == (1 if tail >= 16 else 2)
    src = [f"data.shards={folder}", f"data.sources=[{{shards: {copy}, weight: 1.0}}]"]
    ckpt_dir = saved_run(tmp_path, resolved(*src), sources)  # what that release read: the source whole

    def resume(*overrides):
        now = resolved(*src, *overrides)
        return decide_resume(ckpt_dir, "auto", "rollback", RunIdentity.of(now, LAYOUT), 1,
                             current_recipe=recipe.as_record(now, cut, records),
                             allow_recipe_change=now.config.checkpoint.allow_recipe_change)

    with pytest.raises(store.ResumeError, match="allow_recipe_change") as refused:
        resume()
    assert "rebuilt in place" not in str(refused.value), refused.value
    assert "held-out tail" in str(refused.value) and "read them whole" in str(refused.value), refused.value
    assert "goes on without the tail" in str(refused.value) and "data.val_split" in str(refused.value), refused.value
    opted = resume("checkpoint.allow_recipe_change=true")
    assert any("held-out tail" in note and "rebuilt in place" not in note for note in opted.notes), opted.notes


def test_a_whole_shard_cut_off_tars_of_the_same_sha256_is_the_cut_and_of_other_ones_is_a_rebuilt_set(tmp_path,
                                                                                                      gloo_of_one):
    """The same reading where the manifests record each tar's sha256: the tail drops the second shard whole, so the
    digest of the tars read changes; the digest of the tars before the cut tells the cut (the same tars) from a set
    converted again under the same names, sizes and counts (other tars: still 'rebuilt in place')."""
    from dataclasses import replace

    from mixmae_scale.data.heldout import split_tail
    from mixmae_scale.data.shard_sets import ShardMixture, WeightedSet

    def whole(digests):
        return ShardMixture([WeightedSet(replace(mixture("/set").sets[0].shards, sha256=digests), 1.0, "/set")])

    def cut_of(data):
        return ShardMixture([WeightedSet(split_tail(data.sets[0].shards, 40)[0], 1.0, "/set")])

    src = resolved("data.shards=/held", "data.sources=[{shards: /set, weight: 1.0}]")
    ckpt_dir = saved_run(tmp_path, src, whole(("a" * 64, "b" * 64)))
    now = whole(("a" * 64, "b" * 64))
    assert len(cut_of(now).sets[0].shards.names) == 1  # the second shard is gone from what is read
    with pytest.raises(store.ResumeError) as refused:
        plan_with_data_recorded(ckpt_dir, src, cut_of(now), recipe.cut_record(now, cut_of(now), cut_of(now)))
    assert "rebuilt in place" not in str(refused.value) and "held-out tail" in str(refused.value), refused.value
    # another tail size (logging.heldout_batches) that drops the whole shard is named by that setting, as it was
    moved = resolved("data.shards=/held", "data.sources=[{shards: /set, weight: 1.0}]", "logging.heldout_batches=8")
    with pytest.raises(store.ResumeError, match="cut elsewhere by logging.heldout_batches"):
        plan_with_data_recorded(ckpt_dir, moved, cut_of(now), recipe.cut_record(now, cut_of(now), cut_of(now)))
    rebuilt = whole(("a" * 64, "c" * 64))
    with pytest.raises(store.ResumeError, match="rebuilt in place"):
        plan_with_data_recorded(ckpt_dir, src, cut_of(rebuilt),
                                recipe.cut_record(rebuilt, cut_of(rebuilt), cut_of(rebuilt)))


def plan_with_data_recorded(ckpt_dir, now, data, records):
    return decide_resume(ckpt_dir, "auto", "rollback", RunIdentity.of(now, LAYOUT), 1,
                         current_recipe=recipe.as_record(now, data, records),
                         allow_recipe_change=now.config.checkpoint.allow_recipe_change)


def test_a_train_split_read_whole_by_its_checkpoint_and_now_cut_says_so_without_naming_data_sources(tmp_path,
                                                                                                     gloo_of_one):
    """Without data.sources the uncut reading is data.shards' train split whole (its validation split gone since):
    named as the cut, not as a set rebuilt in place, and not as a data.sources set an earlier release read."""
    from mixmae_scale.data.heldout import choose_heldout
    from mixmae_scale.data.shard_sets import training_mixture
    from mixmae_scale.pretrain.job import leave_out_heldout
    from tests.unit.test_heldout import write_set

    folder = write_set(tmp_path / "set", sizes=(40, 16))
    whole = training_mixture(str(folder), "train", [])
    cut, records = leave_out_heldout(choose_heldout(str(folder), "train", "val", "auto", 16), whole)
    first = resolved(f"data.shards={folder}")
    ckpt_dir = saved_run(tmp_path, first, whole)
    with pytest.raises(store.ResumeError) as refused:
        plan_with_data_recorded(ckpt_dir, first, cut, records)
    assert "held-out tail" in str(refused.value) and "rebuilt in place" not in str(refused.value), refused.value
    assert "had a validation split" in str(refused.value) and "earlier release" not in str(refused.value)


def test_a_checkpoint_saved_under_the_old_default_port_resumes_without_a_change_noted():
    """cluster.master_port's default went from 29500 to unset (a port derived per run folder): a run saved before
    records 29500, and its resume under the new default must neither be refused nor noted as a recipe change (the
    launch's cluster.* changes per start by design)."""
    current = yaml.safe_load(yaml.safe_dump(resolved().to_dict()))
    assert current["cluster"]["master_port"] is None
    saved = {**current, "cluster": {**current["cluster"], "master_port": 29500}}
    verdict = recipe.compare(saved, current, False, "ckpt", "a new run folder")
    assert verdict.refusal is None and verdict.changes == () and verdict.note is None, verdict
