"""Which weights a file or run folder holds, read off it where its tensors do not say: a segmentation model named
where an encoder or classifier goes is called what it is, and the decoder's head count (no tensor's shape gives
it) survives an export, the official layout and a conversion back."""

from __future__ import annotations

import pytest

from mixmae_scale.models.convert_official import WeightsError, infer_architecture, save_weights


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    """A segmentation export as `mixmae export` writes it for a `mixmae segment` run, and its state."""
    from mixmae_scale.config import load_resolved
    from mixmae_scale.segment.job import build_model

    config = load_resolved("seg_demo", overrides=["segment.init=random", "segment.head_channels=32"], world_size=1,
                           train_samples=2600).config
    state = build_model(config).state_dict()
    encoder = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.encoder.")}
    settings = {"num_classes": 11, "ignore_index": 255, "crop_size": 96, "head_channels": 32, "pool_scales": [1, 2, 3]}
    path = tmp_path_factory.mktemp("seg") / "segmenter.safetensors"
    save_weights(path, state, {**infer_architecture(encoder), "segment": settings}, "segment")
    return path, state


@pytest.mark.parametrize("option", ["finetune.init", "--init"])
def test_a_segmentation_export_named_as_an_encoder_is_called_a_segmentation_model(segmenter, option):
    """It was "holds no encoder weights (no encoder.patch_embed.proj.weight)": it holds an encoder, under backbone."""
    from mixmae_scale.finetune.pretrained import load_encoder

    path, _ = segmenter
    with pytest.raises(WeightsError) as refused:
        load_encoder(path, option)
    said = str(refused.value)
    assert "is a segmentation model" in said and "mixmae eval --init" in said and "no encoder weights" not in said


def test_a_segmentation_run_folder_named_as_an_encoder_is_called_a_segmentation_run(segmenter, tmp_path, monkeypatch):
    """A run folder's weights come gathered from its checkpoint, with no metadata: told apart by their keys."""
    import yaml

    from mixmae_scale.engine import export
    from mixmae_scale.finetune.pretrained import load_encoder

    _, state = segmenter
    run = tmp_path / "seg-run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"segment": {"init": "runs/demo"}}))
    monkeypatch.setattr(export, "find_checkpoint", lambda path, option=None: (run / "checkpoints", "step00000010"))
    monkeypatch.setattr(export, "gather_weights", lambda folder, tag: dict(state))
    with pytest.raises(WeightsError) as refused:
        load_encoder(run, "--init")
    said = str(refused.value)
    assert "a segmentation run" in said and f"mixmae export {run}" in said and "runs/demo" in said


def test_eval_of_a_segmentation_run_folder_is_one_line_saying_what_it_is(segmenter, tmp_path, monkeypatch, capfd,
                                                                        demo_shards):
    from mixmae_scale.cli import main
    from mixmae_scale.engine import export

    _, state = segmenter
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(export, "find_checkpoint", lambda path, option=None: (tmp_path / "run" / "checkpoints", "s"))
    monkeypatch.setattr(export, "gather_weights", lambda folder, tag: dict(state))
    assert main(["eval", "--init", str(tmp_path / "run"), "--data", str(demo_shards)]) != 0
    err = capfd.readouterr().err
    assert "Traceback" not in err and "a segmentation run" in err and "no encoder weights" not in err

