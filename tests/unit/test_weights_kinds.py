"""Which weights a file or run folder holds, read off it where its tensors do not say: a segmentation model named
where an encoder or classifier goes is called what it is, and the decoder's head count (no tensor's shape gives
it) survives an export, the official layout and a conversion back."""

from __future__ import annotations

import pytest
import torch

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



def pretraining_run(tmp_path, monkeypatch, model, decoder_heads: int):
    """A pretraining run folder whose checkpoint gathers to `model`'s weights and whose config.yaml says its decoder's
    head count, as `mixmae export` reads them."""
    import yaml

    from mixmae_scale.engine import export

    run = tmp_path / "pretrain-run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"decoder_heads": decoder_heads}}))
    monkeypatch.setattr(export, "find_checkpoint", lambda *a, **k: (run / "checkpoints", "step00000010"))
    monkeypatch.setattr(export, "gather_weights", lambda folder, tag: dict(model.state_dict()))
    return run


def same_loss(model, rebuilt) -> bool:
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    mask = model.sample_mask(torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(rebuilt.eval()(images, mask=mask).loss, model(images, mask=mask).loss)


def test_the_decoder_head_count_survives_the_official_layout_and_a_conversion_back(small_mixmae, tmp_path,
                                                                                   monkeypatch):
    """The official decoder has 16 heads and no tensor says how many: a 2-head decoder exported in the official layout
    came back with 16, and reconstructed other pictures than the run's (same tensors, other attention)."""
    from mixmae_scale.engine.export import export_run
    from mixmae_scale.models.convert_official import build_from_architecture, convert_official_checkpoint

    assert small_mixmae.decoder.decoder_blocks[0].attn.num_heads == 2
    run = pretraining_run(tmp_path, monkeypatch, small_mixmae, decoder_heads=2)
    official = tmp_path / "official.pth"
    export_run(run, official, with_decoder=True, fmt="official")
    assert set(torch.load(official, weights_only=True)["model"]) >= {"decoder_embed.weight", "mask_token"}
    summary = convert_official_checkpoint(official, tmp_path / "back.safetensors")
    assert summary["arch"]["decoder_heads"] == 2
    rebuilt = build_from_architecture(summary["arch"])
    rebuilt.load_state_dict(small_mixmae.state_dict())
    assert same_loss(small_mixmae, rebuilt)


def test_every_loader_of_an_encoder_and_decoder_reads_its_decoder_head_count(small_mixmae, tmp_path, monkeypatch):
    """`load_encoder` (pictures: `mixmae visualize`) read the weights' shapes alone and built 16 decoder heads for an
    export, an official-layout file or a run folder whose decoder has 2."""
    from mixmae_scale.engine.export import export_run
    from mixmae_scale.finetune.pretrained import load_encoder
    from mixmae_scale.models.convert_official import build_from_architecture

    run = pretraining_run(tmp_path, monkeypatch, small_mixmae, decoder_heads=2)
    export_run(run, tmp_path / "ours.safetensors", with_decoder=True)
    export_run(run, tmp_path / "official.pth", with_decoder=True, fmt="official")
    for source in (tmp_path / "ours.safetensors", tmp_path / "official.pth", run):
        state, arch = load_encoder(source, "source")
        assert arch["decoder_heads"] == 2, source
        rebuilt = build_from_architecture(arch)
        rebuilt.load_state_dict(state)
        assert same_loss(small_mixmae, rebuilt), source


def test_an_official_checkpoint_without_our_record_has_the_official_16_decoder_heads(small_mixmae, tmp_path):
    from mixmae_scale.models.convert_official import convert_official_checkpoint, to_official_keys

    torch.save({"model": to_official_keys(small_mixmae.state_dict()), "epoch": 599}, tmp_path / "released.pth")
    assert convert_official_checkpoint(tmp_path / "released.pth", tmp_path / "x.safetensors")["arch"][
        "decoder_heads"] == 16


def _tiny_encoder_state() -> dict[str, torch.Tensor]:
    from mixmae_scale.models.swin import SwinEncoder, SwinShape

    encoder = SwinEncoder(SwinShape(64, 4, 16, (1, 1, 1, 1), (1, 1, 1, 1), (4, 4, 2, 1)))
    return {f"encoder.{k}": v for k, v in encoder.state_dict().items()}


def test_our_own_export_given_to_convert_official_is_called_ours_not_a_dump_of_its_keys(tmp_path):
    """`mixmae model convert-official runs/x/encoder.safetensors y.safetensors` said "120 keys of the official
    checkpoint have no place in our model: encoder.absolute_pos_embed, ..." with every one of the 120 keys."""
    from mixmae_scale.models.convert_official import convert_official_checkpoint

    state = _tiny_encoder_state()
    ours = tmp_path / "encoder.safetensors"
    save_weights(ours, state, infer_architecture(state), "encoder")
    with pytest.raises(WeightsError) as refused:
        convert_official_checkpoint(ours, tmp_path / "out.safetensors")
    said = str(refused.value)
    assert "already a mixmae-scale weights file" in said and "needs no conversion" in said
    assert "have no place" not in said and not (tmp_path / "out.safetensors").exists()
    # Our key names in a pickle (a state dict saved by hand) say so too, in a line of a few keys, not all of them.
    pickled = tmp_path / "mine.pth"
    torch.save({"model": state}, pickled)
    with pytest.raises(WeightsError) as refused:
        convert_official_checkpoint(pickled, tmp_path / "out.safetensors")
    said = str(refused.value)
    assert "this package's key names (encoder.*), not the official layout" in said
    assert len(said) < 600 and "more" in said


def test_a_deepspeed_model_states_file_given_as_weights_names_its_checkpoint_folder(tmp_path):
    """`--init RUN/checkpoints/step00000162/mp_rank_00_model_states.pt` said "expected a dict of tensors under
    'model'": it is a DeepSpeed checkpoint's file, whose folder (or run folder) every loader reads."""
    from mixmae_scale.finetune.pretrained import load_encoder

    folder = tmp_path / "run" / "checkpoints" / "step00000162"
    folder.mkdir(parents=True)
    states = folder / "mp_rank_00_model_states.pt"
    torch.save({"module": _tiny_encoder_state(), "buffer_names": [], "ds_version": "0.16", "dp_world_size": 1},
               states)
    with pytest.raises(WeightsError) as refused:
        load_encoder(states, "--init")
    said = str(refused.value)
    assert "a DeepSpeed checkpoint's file" in said
    assert f"`mixmae export {folder} --out FILE.safetensors` writes this checkpoint's" in said
    assert f"`mixmae export {tmp_path / 'run'}` the run's newest" in said
    assert f"--init also take the checkpoint folder {folder} or the run folder" in said
    assert "expected a dict of tensors" not in said


def test_convert_official_of_a_missing_file_names_the_path_tried(tmp_path, capfd, monkeypatch):
    """It said `mixmae: error: [Errno 2] No such file or directory: 'nothere.pth'`, unlike every other loader."""
    from mixmae_scale.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["model", "convert-official", "nothere.pth", "out.safetensors"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code != 0 and err[-1] == f"mixmae: error: nothere.pth: not found (tried {tmp_path / 'nothere.pth'})"
