"""Reconstruction pictures: panel layout, and that pasting puts the input back exactly where visible."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixmae_scale.models.mixing import upsample_mask
from mixmae_scale.visualize.reconstruction import FROM_A, FROM_B, PANELS, grid, panels, reconstruct


def test_grid_has_a_title_named_columns_and_one_row_per_pair(small_mixmae, monkeypatch):
    """The title and the column names are checked on the pixels: another title changes only the top band of the
    picture, and blank column names change only the band between it and the first row of images, over each of
    the seven columns (128-pixel cells from x = 15 at this image size)."""
    from mixmae_scale.visualize import reconstruction

    images = torch.randn(6, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    mask = small_mixmae.sample_mask(torch.Generator().manual_seed(1))
    rec = reconstruct(small_mixmae, images, mask)
    three, one = grid(rec, title="run x, step 7"), grid(rec, pairs=1, title="run x, step 7")
    assert three.dtype.name == "uint8" and three.shape[2] == 3 and three.shape[1] == one.shape[1]
    assert three.shape[0] - one.shape[0] == 2 * 128  # a 128-pixel row per pair
    assert PANELS[:4] == ("original A", "original B", "mask", "mixed input")
    assert PANELS[4:6] == ("A reconstructed", "B reconstructed") and len(PANELS) == 7
    title_rows = np.nonzero((grid(rec, pairs=1, title="") != one).any(axis=(1, 2)))[0]
    assert len(title_rows) and title_rows.max() < 40  # the head is 75 pixels: title on top, column names below
    monkeypatch.setattr(reconstruction, "PANELS", ("",) * len(PANELS))
    changed = grid(rec, pairs=1, title="run x, step 7") != one
    name_rows = np.nonzero(changed.any(axis=(1, 2)))[0]
    assert len(name_rows) and name_rows.min() >= 40 and name_rows.max() < 80  # the images start at row 80
    named = changed.any(axis=(0, 2))
    assert all(named[15 + 128 * col:15 + 128 * (col + 1)].any() for col in range(len(PANELS))), "a column unnamed"


def test_mask_panel_is_drawn_in_its_key_colours_where_the_mixed_input_shows_each_image(small_mixmae):
    images = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    rec = reconstruct(small_mixmae, images, small_mixmae.sample_mask(torch.Generator().manual_seed(5)))
    original_a, original_b, mask, mixed, *_ = panels(rec, 1)
    from_b = rec.mask_image.numpy() == 1
    assert from_b.any() and (~from_b).any()
    assert np.allclose(mask[~from_b], FROM_A) and np.allclose(mask[from_b], FROM_B)
    assert np.array_equal(mixed[~from_b], original_a[~from_b]) and np.array_equal(mixed[from_b], original_b[from_b])


def test_pasting_reproduces_the_input_exactly_where_it_was_visible(small_mixmae):
    images = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    mask = small_mixmae.sample_mask(torch.Generator().manual_seed(3))
    rec = reconstruct(small_mixmae, images, mask)
    visible = upsample_mask(mask, 128) == 0
    for i in range(4):
        assert torch.equal(rec.pasted[i][:, visible], rec.originals[i][:, visible])
        assert torch.equal(rec.pasted[i][:, ~visible], rec.stream1[i][:, ~visible])
        assert torch.equal(rec.mixed[i][:, ~visible], rec.originals[3 - i][:, ~visible])
    # The hidden cells are predictions, not the input: an untrained decoder cannot match it there.
    assert not torch.allclose(rec.pasted[0][:, ~visible], rec.originals[0][:, ~visible], atol=0.05)


def _metrics(run, rows: int, batch: int, every: int = 5):
    from mixmae_scale.engine.monitor import MetricsLog

    run.mkdir()
    log = MetricsLog(run / "metrics.csv")
    for step in range(every, every * rows + 1, every):  # a CPU run: no MFU, as MetricsLog writes it (empty)
        log.write({"step": step, "images_seen": step * batch, "loss": 1 / step, "lr": 1e-3, "images_per_s": 30.0,
                   "mfu": None})
    log.close()
    return str(run)


def test_runs_plot_leaves_out_empty_panels_and_draws_one_row_against_step_and_images_seen(tmp_path):
    from PIL import Image

    from mixmae_scale.visualize.curves import plot_runs

    long, single = _metrics(tmp_path / "long", 8, 32), _metrics(tmp_path / "single", 1, 32)
    result = plot_runs([long, single], tmp_path / "curves.png")
    assert result["panels"] == ["training loss", "learning rate", "images/s"] and result["x"] == "step"
    assert result["left_out"] and result["left_out"][0].startswith("MFU")
    with Image.open(tmp_path / "curves.png") as image:
        width, height = image.size
    assert width == 1200 and height < 400  # three panels in one row: steps below, images seen above
    other = _metrics(tmp_path / "other-batch", 4, 64)  # another global batch: compared at equal images seen
    assert plot_runs([long, other], tmp_path / "mixed.png")["x"] == "images_seen"


def test_runs_plot_draws_a_fine_tuning_runs_evaluations_in_an_eval_top1_panel(tmp_path, capsys):
    import json

    from PIL import Image

    from mixmae_scale.cli import main
    from mixmae_scale.visualize.curves import plot_runs, read_evals

    finetune, pretrain = _metrics(tmp_path / "finetune", 8, 32), _metrics(tmp_path / "pretrain", 8, 32)
    # eval.jsonl as FinetuneJob.after_step writes it: one object per evaluation.
    (tmp_path / "finetune" / "eval.jsonl").write_text("".join(
        json.dumps({"step": step, "epoch": step / 10, "samples": 80, "top1": top1, "top5": 90.0, "loss": 1.0}) + "\n"
        for step, top1 in ((10, 12.5), (20, 31.25), (40, 47.5))))
    assert read_evals(finetune) == {"step": [10.0, 20.0, 40.0], "eval_top1": [12.5, 31.25, 47.5]}
    assert read_evals(pretrain) == {}
    alone = plot_runs([pretrain], tmp_path / "pretrain.png")
    assert "eval top-1 (%)" not in alone["panels"] and not any("eval" in why for why in alone["left_out"])
    assert main(["runs", "plot", finetune, pretrain, "--out", str(tmp_path / "both.png")]) == 0
    line = capsys.readouterr().out.strip()
    assert line == (f"wrote {tmp_path / 'both.png'}: 2 runs against step; panels: training loss, learning rate, "
                    "images/s, eval top-1 (%); left out (no run logged it): MFU (needs a device peak: "
                    "logging.peak_tflops, or a known GPU)")
    with Image.open(tmp_path / "both.png") as image:
        assert image.size[0] == 1600  # four panels of 4 inches at 100 dpi
    other = _metrics(tmp_path / "other-batch", 4, 64)  # compared at images seen: evaluations at step x 32 images
    assert "eval top-1 (%)" in plot_runs([finetune, other], tmp_path / "mixed.png")["panels"]


def test_runs_plot_names_the_file_and_line_of_a_value_that_is_not_a_number(tmp_path, capsys):
    from mixmae_scale.cli import main

    (tmp_path / "metrics.csv").write_text("step,epoch,loss\n1,0.1,1.5\n2,0.2,abc\n")
    assert main(["runs", "plot", str(tmp_path), "--out", str(tmp_path / "curves.png")]) == 2
    assert capsys.readouterr().err.strip() == (f"mixmae: error: {tmp_path / 'metrics.csv'}:3: column 'loss' holds "
                                               "'abc', not a number")
    (tmp_path / "metrics.csv").write_text("step,epoch,loss\n1,0.1,1.5\n")
    (tmp_path / "eval.jsonl").write_text('{"top1": 3}\n')
    assert main(["runs", "plot", str(tmp_path), "--out", str(tmp_path / "curves.png")]) == 2
    assert "eval.jsonl: not one evaluation per line with its step" in capsys.readouterr().err


def test_runs_plot_labels_tell_runs_of_the_same_name_apart():
    """Labelled by the last path name, two metrics.csv files or `run-1` of two sweeps drew two curves under one
    legend entry."""
    from mixmae_scale.visualize.curves import curve_labels

    assert curve_labels(["/s/sweep-a/run-1", "/s/sweep-b/run-1", "/s/other"]) == ["sweep-a/run-1", "sweep-b/run-1",
                                                                               "s/other"]
    assert curve_labels(["/w/r1/metrics.csv", "/w/r2/metrics.csv"]) == ["r1", "r2"]
    assert curve_labels(["/w/runs/tiny"]) == ["tiny"]


def _shards_with_val(root, val: int):
    """A folder set of `val` classes of 4 images each, a quarter of each class held out: `val` validation images."""
    from PIL import Image

    from mixmae_scale.shards.convert import ConvertOptions, convert

    rng = np.random.default_rng(0)
    for c in range(val):
        folder = root / "src" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    convert(root / "src", root / "shards", ConvertOptions(layout="folder", val_fraction=0.25))
    return root / "shards"


@pytest.mark.parametrize("val", [1, 3])
def test_grids_of_a_validation_split_smaller_than_the_grid_draw_its_pairs_or_none_said(tmp_path, val, caplog):
    """A folder of 7 images converted with --val-fraction has 1 validation image: pretraining stopped at its start
    with a traceback (`ValueError: split 'val' of <ShardMixture object at 0x...> has fewer than 8 images`) while the
    held-out loss on the same split said `not measured` and trained. The grids take the split's whole pairs."""
    import logging

    from mixmae_scale.config import load_resolved
    from mixmae_scale.models.mixmae import build_mixmae
    from mixmae_scale.visualize.snapshots import ReconstructionSnapshots

    shards = _shards_with_val(tmp_path, val)
    config = load_resolved("tiny", overrides=[f"data.shards={shards}"]).config
    with caplog.at_level(logging.INFO, logger="mixmae.visualize"):
        snapshots = ReconstructionSnapshots(config, tmp_path / "run", 0, torch.device("cpu"))
    torch.manual_seed(0)
    snapshots.write(build_mixmae(config.model).eval(), 5)
    written = list((tmp_path / "run" / "reconstructions").glob("*.png"))
    if val == 1:
        assert written == [] and "no reconstruction grids: split 'val' of " in caplog.text
        assert "has 1 image; a grid pairs images, 2 at the least" in caplog.text
    else:
        assert [p.name for p in written] == ["step00000005.png"] and len(snapshots.images) == 2
        assert "reconstruction grids on 2 images: split 'val' of " in caplog.text and "has 3" in caplog.text


def test_visualize_on_a_split_smaller_than_the_images_asked_for_names_the_option(tmp_path, small_mixmae):
    """`mixmae visualize` on a folder whose --val-fraction held out 2 images said `has 2 images, fewer than the 8
    asked for`, not which option asks."""
    from mixmae_scale.data.errors import DataError
    from mixmae_scale.models.convert_official import infer_architecture, save_weights
    from mixmae_scale.visualize.reconstruction import visualize

    weights = tmp_path / "mixmae.safetensors"
    state = small_mixmae.state_dict()
    save_weights(weights, state, infer_architecture(state), "pretrain")
    shards = _shards_with_val(tmp_path, 2)
    with pytest.raises(DataError, match=r"split 'val' of .* has 2 images, fewer than the 8 asked for: ask for 2 with "
                                        r"--images 2, or show another split \(--split train\)"):
        visualize(str(weights), str(shards), tmp_path / "rec.png", pairs=4)
    assert visualize(str(weights), str(shards), tmp_path / "rec.png", pairs=1)["pairs"] == 1
