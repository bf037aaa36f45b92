"""What a checkpoint holds and when the checkpointer saves, without DeepSpeed: the typed run state against the keys
checkpoints are written with, the loader position (its JSON form, the samples between two positions, an epoch
continued on another number of ranks), the save schedule, and one save -> plan -> load round trip through the real
store in a world of one (DeepSpeed's own files stand in for by a recording engine; test_pretrain.py and
test_faults.py run the real engine on 2 ranks)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mixmae_scale.config.schema import CheckpointConfig
from mixmae_scale.data.loader import LoaderPosition, ShardLoader
from mixmae_scale.data.manifest import SplitShards
from mixmae_scale.data.shard_sets import Layout, ShardMixture, WeightedSet
from mixmae_scale.data.spec import PipelineSpec
from mixmae_scale.engine.checkpointing import store
from mixmae_scale.engine.checkpointing.checkpointer import Checkpointer
from mixmae_scale.engine.checkpointing.resume import decide_resume
from mixmae_scale.engine.checkpointing.state import RankPosition, RankState, RunIdentity, RunState, StopRecord

LAYOUT = {"zero_stage": 2, "dtype": "fp32", "sub_group_size": None, "grad_accum_dtype": None, "offload": False}
IDENTITY = RunIdentity("digest-a", {"embed_dim": 32}, 16, LAYOUT)


def loader(world: int, micro: int = 8, rank: int = 0, window: int = 64) -> ShardLoader:
    """A loader over 997 samples in two shards that are never read: positions are arithmetic on the manifest."""
    split = SplitShards("train", "/nowhere", "/nowhere", ("a.tar", "b.tar"), ("a.idx", "b.idx"), (500, 497), (0, 0),
                        997, False, 0)
    spec = PipelineSpec("pretrain", 32, micro, shard_id=rank, num_shards=world, shuffle_buffer=window)
    return ShardLoader(ShardMixture([WeightedSet(split, 1.0, "demo")]), "train", spec, backend="torch")


def test_the_run_state_keeps_the_client_keys_and_reads_a_client_from_before_the_job_key():
    state = RunState(12, {"best": {"top1": 0.5}}, "digest-a", 4, skipped_samples=64)
    client = json.loads(json.dumps(state.to_client()))
    assert set(client) == {"step", "job", "model_digest", "world_size", "skipped_samples", "universal_checkpoint_info"}
    assert RunState.from_client(client) == state
    older = RunState.from_client({"step": 3, "best": {"top1": 0.1}})  # the job's state at the top level
    assert (older.step, older.job["best"], older.skipped_samples, older.model_digest) == (3, {"top1": 0.1}, 0, None)


def test_a_rank_state_survives_its_json_file_with_the_dali_generators():
    position = RankPosition(LoaderPosition("dali", Layout.whole_epoch(2, 997, 2, 8), 5, 64, 0, "d", 130, b"\x00gen"),
                            {"python": "x"})
    state = RankState(position, IDENTITY)
    text = json.dumps(state.to_dict())
    assert set(json.loads(text)) == {"loader", "rng", "model_digest", "model_shape", "optimizer_layout",
                                     "global_batch", "init"}
    assert RankState.from_dict(json.loads(text)) == state
    assert json.loads(text)["loader"]["epoch"] == 2 and "dali" in json.loads(text)["loader"]
    older = RankState.from_dict({"loader": {"epoch": 3, "batches_consumed": 7}, "rng": {}})  # before global samples
    assert older.position.loader.layout is None and older.position.loader.epoch == 3
    assert older.identity == RunIdentity(None, None, None, None)


def test_the_samples_between_two_positions_count_every_rank():
    before = LoaderPosition("dali", Layout.whole_epoch(0, 997, 2, 8), 6, 64, 0, "d", 6)
    after = LoaderPosition("dali", Layout.whole_epoch(0, 997, 2, 8), 10, 64, 0, "d", 10, b"gen")
    assert after.samples_since(before) == 4 * 8 * 2 and before.samples_since(after) == 0
    record = StopRecord(7, after)
    assert "dali" not in record.marker_extra()["nonfinite_stop"]["loader_after"]  # generators stay with the tag


@pytest.mark.parametrize("old_world, new_world, consumed", [(2, 3, 20), (2, 1, 33), (4, 2, 5)])
def test_a_loader_restored_on_another_world_size_lays_out_what_is_left_of_the_epoch(old_world, new_world, consumed):
    old = loader(old_world)
    old.batch_in_epoch = old.batches_consumed = consumed
    position = LoaderPosition.from_dict(json.loads(json.dumps(old.position().to_dict())))
    new = loader(new_world)
    new.restore(position)
    left = old.layout.remaining(consumed, 64)
    assert new.layout == Layout(0, left, new_world, 8) and new.batch_in_epoch == 0
    assert new.batches_consumed == consumed
    assert f"continues on {new_world} rank{'' if new_world == 1 else 's'} x 8 (was {old_world} x 8)" in new.resume_note
    same = loader(old_world, rank=1)
    same.restore(position)
    assert (same.layout, same.batch_in_epoch, same.resume_note) == (old.layout, consumed, None)


def test_a_loader_restored_on_other_data_starts_the_next_epoch_and_says_so():
    old = loader(2)
    old.batch_in_epoch = 3
    moved = LoaderPosition.from_dict({**old.position().to_dict(), "data": "another-digest"})
    new = loader(2)
    new.restore(moved)
    assert new.epoch == 1 and new.batch_in_epoch == 0 and "shard set or run.seed differs" in new.resume_note


@pytest.mark.parametrize("every, at_end, step, last, stop, due", [
    (5, True, 10, False, False, True), (5, True, 7, False, False, False), (5, True, 7, True, False, True),
    (5, False, 7, True, False, False), (5, False, 7, False, True, True), (1, True, 3, False, False, True)])
def test_the_checkpointer_saves_on_its_interval_at_the_end_and_on_a_stop(every, at_end, step, last, stop, due):
    settings = CheckpointConfig(every_steps=every, at_end=at_end)
    checkpointer = Checkpointer(None, Path("/nowhere"), settings, IDENTITY, 1, 0, None, None, 0)
    assert checkpointer.due(step, last, stop) is due
    if not due:
        assert checkpointer.maybe_save(step, last, stop) is None and checkpointer.last_saved is None



def test_an_attempt_not_applied_is_saved_only_for_a_stop():
    """A step whose update DeepSpeed skipped leaves the step count where it was: no checkpoint of a step not done,
    except the state as it is when the run must stop."""
    checkpointer = Checkpointer(None, Path("/nowhere"), CheckpointConfig(every_steps=4, at_end=True), IDENTITY, 1, 0,
                                None, None, 0)
    assert not checkpointer.due(4, last=False, stop=False, step_done=False)
    assert not checkpointer.due(10, last=True, stop=False, step_done=False)
    assert checkpointer.due(3, last=False, stop=True, step_done=False)
    assert [s for s in range(1, 11) if checkpointer.due(s, last=s == 10)] == [4, 8, 10]

class RecordingEngine:
    """DeepSpeed's save/load surface: writes the client state where DeepSpeed would write its files."""

    optimizer = None

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mp_rank_00_model_states.pt").write_text(json.dumps(client_state))

    def load_checkpoint(self, load_dir: str, tag: str):
        return None, json.loads((Path(load_dir) / tag / "mp_rank_00_model_states.pt").read_text())


class Job:
    def __init__(self, best: float) -> None:
        self.best = best

    def state(self) -> dict:
        return {"best": self.best}

    def load_state(self, state: dict) -> None:
        self.best = state["best"]


def test_a_saved_run_resumes_its_step_job_data_and_generators_and_a_stop_resumes_past_its_data(tmp_path,
                                                                                                 gloo_of_one):
    ckpt_dir = tmp_path / "checkpoints"
    data, job = loader(1), Job(0.25)
    data.batch_in_epoch = data.batches_consumed = 6
    saving = Checkpointer(RecordingEngine(), ckpt_dir, CheckpointConfig(every_steps=3), IDENTITY, 1, 0, job, data, 0)
    random.seed(7)
    assert saving.maybe_save(6) == ckpt_dir / "step00000006" == saving.last_saved
    expected_draw = random.random()
    start = saving.step_start()
    data.batch_in_epoch = data.batches_consumed = 9  # three failed attempts
    stop_tag = saving.save_nonfinite_stop(7, start)
    assert stop_tag.name == "step00000007-nonfinite" and store.complete_tags(ckpt_dir) == [
        "step00000006", "step00000007-nonfinite"]

    plan = decide_resume(ckpt_dir, "auto", "rollback", IDENTITY, 1)
    resumed_data, resumed_job = loader(1), Job(0.0)
    resuming = Checkpointer(RecordingEngine(), ckpt_dir, CheckpointConfig(), IDENTITY, 1, 0, resumed_job,
                            resumed_data, 0)
    random.seed(99)
    assert resuming.resume(plan) == 6
    assert random.random() == expected_draw  # the generators as they were at the save
    assert resumed_job.best == 0.25 and resuming.skipped_samples == 3 * 8
    assert (resumed_data.batch_in_epoch, resumed_data.batches_consumed) == (9, 9)  # past the failed attempts
    assert torch.equal(torch.tensor(resumed_data.layout.intervals), torch.tensor(data.layout.intervals))


def test_a_save_whose_files_do_not_reach_the_disk_fails_unsealed_and_rotates_nothing(tmp_path, gloo_of_one,
                                                                                     monkeypatch):
    """An EIO or quota error at fsync (where NFS and Lustre report them) was swallowed: the tag was sealed COMPLETE
    over data that never reached the disk, and rotation removed the older good checkpoints for it."""
    import errno
    import os
    import stat

    ckpt_dir = tmp_path / "checkpoints"
    saving = Checkpointer(RecordingEngine(), ckpt_dir, CheckpointConfig(every_steps=3, keep_last=1), IDENTITY, 1, 0,
                          Job(0.25), loader(1), 0)
    saving.maybe_save(3)
    real = os.fsync

    def fsync(fd: int) -> None:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError) as caught:
        saving.maybe_save(6)
    assert caught.value.errno == errno.EDQUOT
    assert store.complete_tags(ckpt_dir) == ["step00000003"] and store.damage(ckpt_dir / "step00000003") is None
    assert not (ckpt_dir / "step00000006.partial" / store.MARKER).exists()


class ShardWriter:
    """DeepSpeed's checkpoint engine: every shard of a save goes through its `save`."""

    def save(self, state_dict: dict, path: str) -> None:
        Path(path).write_text(json.dumps(state_dict))


class ShardingEngine(RecordingEngine):
    """Writes as DeepSpeed does: the model states through the checkpoint engine by keyword, this rank's optimizer
    shard by position, and a recovery script past it (rank 0's, shutil.copyfile)."""

    def __init__(self) -> None:
        self.checkpoint_engine = ShardWriter()

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        import os

        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        self.checkpoint_engine.save(state_dict=client_state, path=os.path.join(save_dir, tag,
                                                                              "mp_rank_00_model_states.pt"))
        self.checkpoint_engine.save({"m": [1.0] * 10}, os.path.join(save_dir, tag,
                                                                    "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
        Path(save_dir, tag, "zero_to_fp32.py").write_text("# recovery script")


def test_each_rank_flushes_the_shards_it_wrote_and_reports_their_sizes(tmp_path, monkeypatch):
    """Rank 0 flushed every file it saw, other ranks' shards too: on NFS or Lustre another client's fsync does not
    flush the writer's cache. Each rank now flushes what DeepSpeed wrote for it, and tells rank 0 the sizes."""
    engine, flushed = ShardingEngine(), []
    real = store.fsync_path
    monkeypatch.setattr(store, "fsync_path", lambda path: (flushed.append(Path(path).name), real(path)))
    partial = tmp_path / "step00000004.partial"
    with store.recording_writes(engine) as written:
        engine.save_checkpoint(str(tmp_path), partial.name, {"step": 4}, False)
    assert "save" not in vars(engine.checkpoint_engine)  # DeepSpeed's own method again
    report = store.flush_own(partial, written)
    assert report == {"mp_rank_00_model_states.pt": len(json.dumps({"step": 4})),
                      "zero_pp_rank_0_mp_rank_00_optim_states.pt": len(json.dumps({"m": [1.0] * 10}))}
    assert flushed == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    flushed.clear()
    store.seal(partial, {"step": 4}, report)
    assert flushed[0] == "zero_to_fp32.py" and "mp_rank_00_model_states.pt" not in flushed  # rank 0: the rest only
    assert set(store.marker(tmp_path, partial.name)["files"]) == {*report, "zero_to_fp32.py"}


def test_a_run_folder_other_nodes_do_not_share_is_refused_before_sealing_or_rotating(tmp_path, gloo_of_one,
                                                                                    monkeypatch):
    """On node-local scratch rank 0 sealed a tag without the other nodes' shards (COMPLETE listed what it saw),
    rotated the older tags away, and the first resume failed on the other nodes. A rank 1 on another node that wrote
    rank_1.json where rank 0 does not see it is named, and nothing is sealed or rotated."""
    ckpt_dir = tmp_path / "checkpoints"
    saving = Checkpointer(ShardingEngine(), ckpt_dir, CheckpointConfig(every_steps=3, keep_last=1), IDENTITY, 1, 0,
                          Job(0.25), loader(1), 0)
    saving.maybe_save(3)
    assert set(store.marker(ckpt_dir, "step00000003")["files"]) == {
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_to_fp32.py", "rank_0.json"}
    gather = dist.all_gather_object

    def across_two_nodes(reports: list, mine) -> None:  # rank 1's report, from a node with its own scratch
        gather(reports, mine)
        reports.append(("node-b", {"rank_1.json": 2345, "zero_pp_rank_1_mp_rank_00_optim_states.pt": 99}))

    monkeypatch.setattr(dist, "all_gather_object", across_two_nodes)
    with pytest.raises(store.UnsharedRunFolder, match=r"the run folder is not shared by all nodes: rank 0 on \S+ does "
                       r"not see in .*step00000006.partial what rank 1 on node-b \(rank_1.json missing\) wrote.*"
                       "--run-dir"):
        saving.maybe_save(6)
    assert store.complete_tags(ckpt_dir) == ["step00000003"]
    assert not (ckpt_dir / "step00000006.partial" / store.MARKER).exists()


def test_the_refusal_names_each_node_its_ranks_and_a_file_that_differs(tmp_path):
    (tmp_path / "rank_0.json").write_text("x" * 10)
    (tmp_path / "rank_1.json").write_text("x" * 7)
    reports = [("node-a", {"rank_0.json": 10}), ("node-a", {"rank_1.json": 10}), ("node-b", {"rank_2.json": 5}),
               ("node-b", {"rank_3.json": 5}), ("node-b", {"rank_4.json": 5}), ("node-c", {"rank_6.json": 1})]
    problem = store.unshared(tmp_path, reports)
    assert ("rank 1 on node-a (rank_1.json has 7 bytes, 10 were written); ranks 2-4 on node-b (rank_2.json "
            "missing); rank 5 on node-c (rank_6.json missing)") in problem
    assert store.unshared(tmp_path, reports[:1]) is None and store.ranges([9, 2, 3, 4, 11, 12]) == "2-4, 9, 11-12"


def test_a_resume_on_more_ranks_seeds_each_ranks_generators_apart_and_the_same_world_restores_them(tmp_path,
                                                                                                    gloo_of_one):
    """Ranks r and r + the old world size restored the same saved generators (rank_file_for is round-robin), so
    mixup, cutmix, random erasing and drop path drew the same numbers on both for the rest of the run. On another
    world size each rank seeds them from (run.seed, rank, step); on the same, its own saved state goes on exactly."""
    import numpy as np

    from mixmae_scale.engine.checkpointing.resume import ResumePlan
    from mixmae_scale.seeds import stream_seed

    ckpt_dir = tmp_path / "checkpoints"
    saving = Checkpointer(RecordingEngine(), ckpt_dir, CheckpointConfig(every_steps=3), IDENTITY, 1, 0, Job(0.5),
                          loader(1), 7)
    random.seed(11)
    saving.maybe_save(3)
    saved_draw = (random.random(), float(np.random.random()), float(torch.rand(())))

    def draws_after_resume(plan: ResumePlan, world: int, rank: int) -> tuple[float, float, float]:
        resuming = Checkpointer(RecordingEngine(), ckpt_dir, CheckpointConfig(), IDENTITY, world, rank, Job(0.0),
                                loader(world, rank=rank), 7)
        random.seed(99)
        assert resuming.resume(plan) == 3
        return random.random(), float(np.random.random()), float(torch.rand(()))

    relaid = ResumePlan("step00000003", saved_world=1, load_tag="step00000003", same_layout=False)
    first, second = draws_after_resume(relaid, 2, 0), draws_after_resume(relaid, 2, 1)
    assert len({first, second, saved_draw}) == 3
    random.seed(stream_seed(7, 1, 3, bits=63))
    assert second[0] == random.random()  # a pure function of the run's seed, the rank and the step
    same = ResumePlan("step00000003", saved_world=1, load_tag="step00000003")
    assert draws_after_resume(same, 1, 0) == saved_draw


def test_a_crash_between_a_new_best_and_the_next_checkpoint_resumes_with_the_previous_best_and_its_weights(
        tmp_path, gloo_of_one):
    """Best at step 300, a regular checkpoint at 400, a new best at 420: saving it deleted best/step00000300 (best/
    kept one). A crash before the next regular checkpoint, a resume from 400 set step 420 aside and left best/ empty:
    the job forgot step 300's best (eval.jsonl still showed its score) and `export --best` had nothing to agree
    with. best/ now keeps the best each resume restores until a regular checkpoint is at or after a newer one."""
    from types import SimpleNamespace

    from mixmae_scale.engine import evaluated_job

    class Scored(evaluated_job.EvaluatedJob):
        metric = "top1"
        scores = {300: 40.0, 420: 45.0, 450: 46.0, 470: 47.0, 480: 30.0}

        def __init__(self, root: Path) -> None:
            self.root, self.eval_every = root, 1
            self.start_evaluations()

        def evaluate(self, loop, step: int) -> dict:
            return {"step": step, "top1": self.scores[step], "samples": 1}

        def describe(self, result: dict) -> str:
            return f"top-1 {result['top1']}"

    def launch(job: Scored) -> tuple[Checkpointer, SimpleNamespace]:
        checkpointer = Checkpointer(RecordingEngine(), tmp_path / "checkpoints", CheckpointConfig(every_steps=100),
                                    IDENTITY, 1, 0, job, loader(1), 0)
        return checkpointer, SimpleNamespace(ctx=SimpleNamespace(rank=0, world=1), save=checkpointer.save)

    def best() -> list[int]:
        return [store.step_of(tag) for tag in store.complete_tags(tmp_path / "best")]

    job = Scored(tmp_path)
    checkpointer, loop = launch(job)
    job.after_step(loop, 300, False)
    checkpointer.maybe_save(400)
    job.after_checkpoint(loop, 400)
    job.after_step(loop, 420, False)
    assert best() == [300, 420]  # step 300's stays: a resume from step 400 restores it
    # the crash; the next launch resumes from step 400
    resumed = Scored(tmp_path)
    checkpointer, loop = launch(resumed)
    assert checkpointer.resume(decide_resume(tmp_path / "checkpoints", "auto", "rollback", IDENTITY, 1)) == 400
    resumed.truncate_logs(400)
    resumed.on_start(loop)
    assert resumed.best == {"step": 300, "top1": 40.0, "samples": 1} and best() == [300]
    for step in (450, 470):
        resumed.after_step(loop, step, False)
    assert best() == [300, 470]  # 450 is restored by no resume: the next regular checkpoint comes after 470
    checkpointer.maybe_save(500)
    resumed.after_checkpoint(loop, 500)
    assert best() == [470]
    victims = evaluated_job.best_victims
    assert victims(["step00000300", "step00000420"], None) == {"step00000300"}  # no regular one: none restores
    assert victims(["step00000300", "step00000350"], 400, frozenset({"step00000350"})) == {"step00000350"}


def test_a_recorded_best_whose_own_step_is_not_in_best_is_forgotten(tmp_path):
    """A resume from a checkpoint older than the newest (named, or past a damaged one) may find best/ holding another
    step's best than the one it restores: taking that for it, `export --best` would disagree with the score."""
    from types import SimpleNamespace

    from mixmae_scale.engine.evaluated_job import EvaluatedJob

    job = EvaluatedJob.__new__(EvaluatedJob)
    job.root, job.metric = tmp_path, "top1"
    (tmp_path / "best" / "step00000250").mkdir(parents=True)
    store.seal(tmp_path / "best" / "step00000250", {"step": 250})
    job.best = {"top1": 40.0, "step": 300}
    job.on_start(SimpleNamespace(ctx=SimpleNamespace(rank=0, world=1)))
    assert job.best == {"top1": -1.0}
    job.best = {"top1": 40.0, "step": 250}
    job.on_start(SimpleNamespace(ctx=SimpleNamespace(rank=0, world=1)))
    assert job.best == {"top1": 40.0, "step": 250}


def test_a_resume_with_other_validation_images_sets_the_best_aside_and_starts_it_again(tmp_path):
    """A fine-tuning resumed with another validation split (recipe.heldout_change: said, not refused) compared its
    next evaluations with a best scored on other images: a lower score on the new split never became the best, and
    `export --best` gave weights chosen on images the run no longer scores. The old best is kept aside, not removed."""
    from types import SimpleNamespace

    from mixmae_scale.engine.evaluated_job import EvaluatedJob

    job = EvaluatedJob.__new__(EvaluatedJob)
    job.root, job.metric = tmp_path, "top1"
    (tmp_path / "best" / "step00000250").mkdir(parents=True)
    store.seal(tmp_path / "best" / "step00000250", {"step": 250})
    job.best = {"top1": 40.0, "step": 250}
    job.on_start(SimpleNamespace(ctx=SimpleNamespace(rank=0, world=1, resume=SimpleNamespace(heldout_change=None))))
    assert job.best == {"top1": 40.0, "step": 250}  # the same images: kept
    changed = SimpleNamespace(heldout_change="the held-out images differ ...")
    job.on_start(SimpleNamespace(ctx=SimpleNamespace(rank=0, world=1, resume=changed)))
    assert job.best == {"top1": -1.0} and store.complete_tags(tmp_path / "best") == []
    assert store.complete_tags(tmp_path / "superseded-best-1") == ["step00000250"]


def test_the_epoch_column_follows_the_loader_through_an_epoch_re_laid_on_another_world_size():
    """metrics.csv's epoch was step / steps_per_epoch: after a resume 2 -> 3 ranks at a global batch of 48 (8 x 3
    accumulated on 2 ranks, 8 x 2 on 3) the re-laid epoch re-reads 64 samples and leaves 5 out, so where the loader
    had finished epoch 0 at step 22 the column said 1.1; it is the loader's own position now."""
    old = loader(2)  # 997 samples, 62 micro-batches of 8 per rank: 7 steps of 3 are 21 of them
    old.batch_in_epoch = old.batches_consumed = 21
    assert old.epoch_progress == pytest.approx(21 * 16 / 997)
    new = loader(3)
    new.restore(LoaderPosition.from_dict(json.loads(json.dumps(old.position().to_dict()))))
    left = new.layout.length  # the rest of epoch 0, from the start of each old rank's window (64 of 2 x 168 read)
    assert left == 997 - 2 * 128 and new.layout.batches == left // 24 == 30
    assert new.epoch_progress == pytest.approx((997 - left) / 997)  # behind the 0.337 read: a window is read again
    new.batch_in_epoch = 14  # 7 steps of 2 on 3 ranks, step 14
    assert new.epoch_progress == pytest.approx((997 - left + 14 * 24) / 997)
    new.batch_in_epoch = 30  # step 22: the loader is done with epoch 0 (22 / (997 // 48) was 1.1)
    assert new.epoch_progress == 1.0
    new._start_epoch(1)
    new.batch_in_epoch = 20
    assert new.epoch_progress == pytest.approx(1 + 20 * 24 / 997)
