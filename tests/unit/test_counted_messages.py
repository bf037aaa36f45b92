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
