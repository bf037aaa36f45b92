"""Counts and fractions on the command line are checked where they are parsed: a zero or negative count used to
divide by zero after minutes of work (`plan --gpus 0`, `probe --batch 0`), or to write one-pixel images and exit 0
(`shards folder --resize-shorter -5`)."""

from __future__ import annotations

import pytest

from mixmae_scale.cli import main


@pytest.mark.parametrize("argv,said", [
    (["shards", "folder", "--src", "x", "--out", "y", "--resize-shorter", "-5"], "--resize-shorter: -5 is less than 1"),
    (["shards", "folder", "--src", "x", "--out", "y", "--samples-per-shard", "0"], "--samples-per-shard: 0 is less"),
    (["shards", "imagenet", "--src", "x", "--out", "y", "--quality", "200"], "--quality: 200 is not between 1 and 100"),
    (["shards", "adopt", "x", "--out", "y", "--max-rejected", "-1"], "--max-rejected: -1 is not between 0 and 1"),
    (["plan", "tiny", "--gpus", "0"], "--gpus: 0 is less than 1"),
    (["plan", "tiny", "--gpus", "2", "--headroom", "1.5"], "--headroom: 1.5 is not between 0 and 0.95"),
    (["config", "show", "--profile", "tiny", "--world-size", "0"], "--world-size: 0 is less than 1"),
    (["probe", "--init", "x", "--data", "y", "--batch", "0"], "--batch: 0 is less than 1"),
    (["probe", "--init", "x", "--data", "y", "--baseline-seeds", "0"], "--baseline-seeds: 0 is less than 1"),
    (["probe", "--init", "x", "--data", "y", "--max-samples", "0"], "--max-samples: 0 is less than 2"),
    # one image has no spread to standardise the probe's features by (finetune/probe.py MIN_FIT_IMAGES)
    (["probe", "--init", "x", "--data", "y", "--max-samples", "1"], "--max-samples: 1 is less than 2"),
    (["visualize", "x", "--data", "y", "--images", "1"], "--images: 1 is less than 2"),
    (["scaling", "run", "spec.yaml", "--out", "o", "--parallel", "zero"], "--parallel: 'zero' is not an integer"),
    (["model", "info", "--img-size", "0"], "--img-size: 0 is less than 1"),  # was silently the size's own
    (["eval", "--init", "x", "--data", "y", "--img-size", "0"], "--img-size: 0 is less than 1"),  # was the weights'
    (["eval", "--init", "x", "--data", "y", "--img-size", "-64"], "--img-size: -64 is less than 1"),  # a torch error
    (["scaling", "report", "--bootstrap", "-3"], "--bootstrap: -3 is less than 0"),  # was taken
    (["model", "info", "--num-classes", "-1"], "--num-classes: -1 is less than 1"),  # counted fewer parameters
    (["scaling", "plan", "spec.yaml", "--train-samples", "-5"], "--train-samples: -5 is less than 1"),
    (["probe", "--init", "x", "--data", "y", "--mask-classes", "-2"], "--mask-classes: -2 is less than 0"),
    (["pretrain", "--profile", "tiny", "--world-size", "3"], "unrecognized arguments: --world-size 3"),  # unread
])
def test_an_out_of_range_count_is_refused_by_name_before_any_work(argv, said, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and said in capsys.readouterr().err


def test_an_empty_split_list_is_refused_before_a_manifest_of_no_split_is_written(tmp_path, capsys):
    for split in ("", ","):
        assert main(["shards", "imagenet", "--src", str(tmp_path), "--out", str(tmp_path / "o"), "--split", split]) == 2
        assert f"--split {split!r}: name at least one split" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_master_port_that_is_not_a_port_is_refused(capsys):
    assert main(["config", "show", "--profile", "tiny", "--set", "cluster.master_port=99999"]) == 2
    assert "cluster.master_port=99999 is not a TCP port (1-65535)" in capsys.readouterr().err


def test_max_megapixels_zero_still_means_no_limit(tmp_path, capsys):
    """0 is the documented 'no limit' (shard_commands.py): the range check takes it, and the command goes on to
    its own checks (here: the missing --src)."""
    assert main(["shards", "folder", "--src", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                 "--max-megapixels", "0"]) == 2
    said = capsys.readouterr().err
    assert "--max-megapixels" not in said and f"--src {tmp_path / 'none'}: not found" in said


@pytest.mark.parametrize("megapixels,kept", [("0", (1300, 900)), ("1", None)])
def test_max_megapixels_zero_keeps_an_image_above_one_megapixel_at_its_own_size(tmp_path, capsys, megapixels, kept):
    """`--max-megapixels 0` must reach the conversion as 'no limit': a 1300 x 900 (1.17 MP) image is written at
    its own size. The control, a limit of 1 MP, shows that this image is one a limit would shrink."""
    import io
    import tarfile

    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (1300, 900), (200, 30, 30)).save(src / "wide.jpg", format="JPEG")
    out = tmp_path / "out"
    assert main(["shards", "folder", "--src", str(src), "--out", str(out), "--workers", "1",
                 "--max-megapixels", megapixels]) == 0
    capsys.readouterr()
    sizes = []
    for tar_path in sorted(out.glob("train-*.tar")):
        with tarfile.open(tar_path) as tar:
            sizes += [Image.open(io.BytesIO(tar.extractfile(m).read())).size for m in tar if m.name.endswith(".jpg")]
    assert len(sizes) == 1
    if kept:
        assert sizes[0] == kept
    else:
        assert sizes[0][0] * sizes[0][1] <= 1_000_000 and sizes[0][0] > sizes[0][1]
