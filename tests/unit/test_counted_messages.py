"""Messages that count shards, runs or images say "1 shard" and "2 shards", never "1 shard(s)": data/errors.py's
`plural`, used where the count is printed. A tiny set or a one-run sweep is where these lines are read first."""

from __future__ import annotations

from mixmae_scale.data.manifest import _not_a_shard_set
from mixmae_scale.scaling.in_process import DeviceShare
from mixmae_scale.shards.saved_plan import SourceChanges


def test_the_device_share_counts_runs_and_threads():
    one = DeviceShare("2 CPU cores", parallel=1, per_process=1, threads=1).describe()
    assert one == "1 run at a time shares 2 CPU cores, 1 thread each; one process per run"
    two = DeviceShare("2 CPU cores", parallel=2, per_process=1, threads=2).describe()
    assert two == "2 runs at a time share 2 CPU cores, 2 threads each; one process per run"


def test_a_changed_source_counts_files_and_extra_shards():
    one = SourceChanges(["a.jpg"], ["new.jpg"], ["train-000008"]).describe("train")
    assert "1 planned file vanished (first: a.jpg)" in one
    assert "1 new file (first: new.jpg) goes to 1 extra shard after the planned ones (train-000008)" in one
    two = SourceChanges(["a.jpg", "b.jpg"], ["new.jpg", "z.jpg"], ["train-000008", "train-000009"]).describe("train")
    assert "2 planned files vanished (first: a.jpg)" in two
    assert "2 new files (first: new.jpg) go to 2 extra shards after the planned ones (train-000008..train-000009)" \
        in two


def test_a_folder_of_images_is_counted_in_images(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.jpg").write_bytes(b"")
    assert "it is a folder of 1 image; convert it first" in _not_a_shard_set(one, str(one))
    (one / "b.jpg").write_bytes(b"")
    assert "it is a folder of 2 images; convert it first" in _not_a_shard_set(one, str(one))


RUN_PATH_MODULES = ["cluster/compose.py", "cluster/slurm_ranks.py", "cluster/signal_relay.py", "cluster/requeue.py",
                    "engine/runtime.py", "engine/loop.py", "engine/run_folder.py", "engine/checkpointing/resume.py",
                    "engine/checkpointing/store.py", "data/loader.py", "finetune/job.py", "models/convert_official.py",
                    "scaling/report.py", "scaling/spec.py", "scaling/sweep_plan.py", "scaling/recorded.py",
                    "scaling/isoflop.py"]


def test_the_run_and_launch_path_writes_no_counted_noun_with_an_s_in_brackets():
    """`mixmae launch --dry-run` printed "1 node(s) x 1 GPU(s)" and "1 step(s)" on every launch, and the run, resume,
    Slurm and sweep messages "1 rank(s)", "1 row(s)": their strings now count with `plural`. Read from the
    modules' string literals (f-strings included), so that a new one is caught where it is written."""
    import io
    import re
    import tokenize
    from pathlib import Path

    import mixmae_scale

    root = Path(mixmae_scale.__file__).parent
    found = []
    for module in RUN_PATH_MODULES:
        path = root / module
        for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if token.type == tokenize.STRING and re.search(r"\w\(s\)", token.string):
                found.append(f"{module}:{token.start[0]}: {token.string.strip()[:60]}")
    assert found == []


def test_the_launch_plan_counts_nodes_gpus_and_steps():
    from mixmae_scale.cluster.compose import batch_report
    from mixmae_scale.config import load_resolved

    sets = ["batch.micro=8", "batch.global_batch=8", "cluster.gpus_per_node=1"]
    lines = batch_report(load_resolved("tiny", overrides=sets, world_size=1, train_samples=64))
    assert lines[0].endswith("= 1 node x 1 GPU") and lines[2].endswith(" 1 step")
