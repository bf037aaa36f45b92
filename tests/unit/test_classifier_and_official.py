"""Fine-tune model loading (with resolution change) and import of the official checkpoint layout."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from mixmae_scale.models.classifier import SwinClassifier, load_pretrained_encoder
from mixmae_scale.models.convert_official import convert_official_checkpoint, load_weights
from mixmae_scale.models.mixmae import MixMAE
from mixmae_scale.models.swin import SwinShape
from tests.unit.test_official_fixture import require_fixture

# The official fine-tuning model's checkpoint and outputs (tests/unit/test_backbone.py reads the same folder).
FT_FIXTURE = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "official-mixmim-ft-small"


def _official_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our weights written under the official MixMIM key names, with its extra index buffers."""
    state = {}
    for key, value in model.state_dict().items():
        state[key.removeprefix("encoder.").removeprefix("decoder.")] = value.clone()
    for name, module in model.named_modules():
        if hasattr(module, "relative_position_index"):
            flat = name.removeprefix("encoder.")
            state[f"{flat}.relative_position_index"] = module.relative_position_index.clone()
    return state


def test_classifier_on_the_same_shape_reproduces_the_pretrained_encoder(small_mixmae, small_shape):
    classifier = SwinClassifier(small_shape, num_classes=5, drop_path=0.0).eval()
    report = load_pretrained_encoder(classifier, small_mixmae.state_dict())
    assert report.missing == [] and report.unexpected == [] and report.resized == []
    assert report.ignored_decoder > 0
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = small_mixmae.encoder(images)
        assert torch.equal(classifier.encoder(images), expected)
        assert classifier(images).shape == (2, 5)


def test_loading_at_a_new_resolution_and_windows_resizes_tables(small_mixmae):
    # 128 px / W(8,8,8,4) pretraining -> 192 px with windows (12,12,12,6), as 224/W14 -> 384/W16-24-12.
    bigger = SwinShape(img_size=192, patch_size=4, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4),
                       window_size=(12, 12, 12, 6))
    classifier = SwinClassifier(bigger, num_classes=3, drop_path=0.0)
    report = load_pretrained_encoder(classifier, small_mixmae.state_dict())
    assert report.missing == [] and report.unexpected == []
    assert "absolute_pos_embed" in report.resized
    tables = [k for k in report.resized if k.endswith("relative_position_bias_table")]
    assert len(tables) == 5  # one per block
    table = classifier.encoder.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == ((2 * 12 - 1) ** 2, 1)
    # The resized table keeps the centre (zero offset) close to the original's centre value.
    old = small_mixmae.encoder.layers[0].blocks[0].attn.relative_position_bias_table
    assert table[(23 * 23) // 2].item() == pytest.approx(old[(15 * 15) // 2].item(), abs=0.02)
    assert torch.isfinite(classifier(torch.randn(2, 3, 192, 192))).all()


def test_a_wider_encoder_is_refused_with_the_key_named(small_mixmae):
    wider = SwinShape(128, 4, 32, (1, 1, 2, 1), (1, 2, 2, 4), (8, 8, 8, 4))
    with pytest.raises(ValueError, match="patch_embed"):
        load_pretrained_encoder(SwinClassifier(wider, 3), small_mixmae.state_dict())


def test_official_pretraining_checkpoint_converts_and_loads_with_no_missing_keys(small_mixmae, tmp_path):
    src = tmp_path / "mixmim_pretrain.pth"
    torch.save({"model": _official_layout(small_mixmae), "epoch": 599,
                "args": argparse.Namespace(model="mixmim_base", mask_ratio=0.5)}, src)
    summary = convert_official_checkpoint(src, tmp_path / "out.safetensors")
    assert summary["kind"] == "pretrain"
    arch = summary["arch"]
    assert arch["depths"] == [1, 1, 2, 1] and arch["num_heads"] == [1, 2, 2, 4]
    assert arch["window_size"] == [8, 8, 8, 4] and arch["img_size"] == 128
    state, saved_arch = load_weights(tmp_path / "out.safetensors")
    assert saved_arch == arch
    rebuilt = MixMAE(small_mixmae.shape, decoder_dim=32, decoder_depth=1, decoder_heads=2).eval()
    result = rebuilt.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    images, mask = torch.randn(2, 3, 128, 128), small_mixmae.sample_mask(torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(images, mask=mask).loss, small_mixmae(images, mask=mask).loss)


def test_official_finetuned_checkpoint_converts_to_a_classifier_with_the_same_weights_and_logits(small_shape,
                                                                                                 tmp_path):
    """A fine-tuned checkpoint in the official layout must come back as the very classifier that wrote it: every
    tensor in place and the same logits. Each weight is drawn at random first, so that a weight the conversion
    dropped (left at its initial value) or put under another key shows in the outputs."""
    torch.manual_seed(0)
    classifier = SwinClassifier(small_shape, num_classes=7, drop_path=0.0).eval()
    with torch.no_grad():
        for value in classifier.state_dict().values():
            value.copy_(torch.randn_like(value) * 0.2)
    src = tmp_path / "mixmim_ft.pth"
    torch.save({"model": _official_layout(classifier)}, src)
    summary = convert_official_checkpoint(src, tmp_path / "ft.safetensors")
    assert summary["kind"] == "finetune" and summary["arch"]["num_classes"] == 7
    state, arch = load_weights(tmp_path / "ft.safetensors")
    assert arch == summary["arch"]
    torch.manual_seed(1)  # a different initialisation, which every converted tensor must overwrite
    rebuilt = SwinClassifier(small_shape, num_classes=arch["num_classes"], drop_path=0.0).eval()
    rebuilt.load_state_dict(state, strict=True)
    for key, value in classifier.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    images = torch.randn(2, 3, small_shape.img_size, small_shape.img_size)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), classifier(images))


def test_the_official_finetuned_checkpoint_converts_to_a_classifier_giving_the_official_codes_logits(tmp_path):
    """The real thing: the official code's own fine-tuning checkpoint (a small model, in the shared fixtures
    folder with the logits the official code computed from it). Converted and loaded strictly, our classifier
    must give those logits and pooled features, so that an imported fine-tuned model evaluates as published."""
    require_fixture(FT_FIXTURE / "official_ft_small.pth")
    summary = convert_official_checkpoint(FT_FIXTURE / "official_ft_small.pth", tmp_path / "ft.safetensors")
    reference = torch.load(FT_FIXTURE / "ref_ft_small.pt", weights_only=True)
    state, arch = load_weights(tmp_path / "ft.safetensors")
    assert summary["kind"] == "finetune" and arch["num_classes"] == reference["logits"].shape[1]
    shape = SwinShape(arch["img_size"], arch["patch_size"], arch["embed_dim"], tuple(arch["depths"]),
                      tuple(arch["num_heads"]), tuple(arch["window_size"]), arch["mlp_ratio"])
    classifier = SwinClassifier(shape, arch["num_classes"], drop_path=0.0).eval()
    classifier.load_state_dict(state, strict=True)
    with torch.no_grad():
        pooled = classifier.pooled_features(reference["images"])
        logits = classifier.head(pooled)
    assert (pooled - reference["pooled"]).abs().max() < 1e-5
    assert (logits - reference["logits"]).abs().max() < 1e-5


def test_unmappable_official_keys_are_listed(small_mixmae, tmp_path):
    state = _official_layout(small_mixmae)
    state["mix_embed.0"] = torch.zeros(3)
    state["layers.0.extra_gate"] = torch.zeros(1)
    src = tmp_path / "odd.pth"
    torch.save({"model": state}, src)
    with pytest.raises(ValueError, match="mix_embed.0"):
        convert_official_checkpoint(src, tmp_path / "odd.safetensors")
    assert not (tmp_path / "odd.safetensors").exists()


def test_a_swin_without_an_absolute_position_embedding_is_refused_in_one_line_naming_the_file(small_mixmae,
                                                                                            tmp_path, capsys):
    """A timm or official Swin checkpoint maps key for key but for the missing `absolute_pos_embed`: it was a
    KeyError traceback (exit 1) from convert-official, probe, finetune.init, segment.init and load_backbone."""
    from mixmae_scale.cli import main
    from mixmae_scale.finetune.pretrained import load_encoder
    from mixmae_scale.models.backbone import load_backbone
    from mixmae_scale.models.convert_official import WeightsError

    state = {k: v for k, v in _official_layout(small_mixmae).items()
             if not k.startswith(("absolute_pos_embed", "mask_token", "decoder"))}
    src = tmp_path / "swin.pth"
    torch.save({"model": {**state, "head.weight": torch.zeros(3, 128), "head.bias": torch.zeros(3)}}, src)
    said = "has no absolute_pos_embed: not a MixMAE/MixMIM encoder but a Swin without an absolute position embedding"
    assert main(["model", "convert-official", str(src), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mixmae: error: {src}: {said}") and err.count("\n") == 1
    with pytest.raises(WeightsError, match=f"^finetune.init={src}: {src} {said}"):
        load_encoder(src)
    with pytest.raises(WeightsError, match=f"^{src}: {said}"):
        load_backbone(src)


@pytest.mark.parametrize("out, said", [
    ("x.pth", "{out}: convert-official writes our safetensors file, which every loader reads back by its suffix "
              "(a .pth as an official pickle); name it *.safetensors, e.g. {root}/x.safetensors"),
    ("folder.safetensors", "{out}: is a folder; name the file to write (e.g. {out}/encoder.safetensors)"),
    ("nowhere/x.safetensors", "{out}: its folder {root}/nowhere does not exist; create it first"),
])
def test_convert_official_refuses_an_output_it_cannot_write_as_named_before_reading_the_source(
        small_mixmae, tmp_path, capfd, out, said):
    """Asked for `x.pth`, it wrote safetensors bytes there, which finetune.init, --init and load_backbone then read
    as a PyTorch pickle (by the suffix) and refused as damaged."""
    from mixmae_scale.cli import main

    src = tmp_path / "official.pth"
    torch.save({"model": _official_layout(small_mixmae)}, src)
    (tmp_path / "folder.safetensors").mkdir()
    code = main(["model", "convert-official", str(src), str(tmp_path / out)])
    err = capfd.readouterr().err
    assert err == f"mixmae: error: {said.format(out=tmp_path / out, root=tmp_path)}\n"
    assert code == (1 if out.startswith("nowhere") else 2)  # a file not found exits 1 (cli/failure_report.py)
    assert not (tmp_path / "x.pth").exists() and not any((tmp_path / "folder.safetensors").iterdir())


class _Payload:
    """Stands for an object a hostile checkpoint would unpickle to run code."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoints_that_would_run_code_are_refused(small_mixmae, tmp_path, capsys):
    src = tmp_path / "hostile.pth"
    torch.save({"model": _official_layout(small_mixmae), "extra": _Payload()}, src)
    with pytest.raises(ValueError, match="weights-only"):
        convert_official_checkpoint(src, tmp_path / "x.safetensors")
    assert "this must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("precision, dtype",
                         [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_an_evaluation_in_half_precision_holds_the_parameters_in_it_and_the_buffers_in_fp32(small_shape, precision,
                                                                                            dtype):
    """As DeepSpeed's bf16 and fp16 engines do: `mixmae eval --precision bf16` cast buffers too, and with the sin-cos
    position embedding rounded to bf16 a 64-px backbone's maps of a 96-px input were 42-49% off its fp32 ones
    (relative norm), against 0.4-1% this way (measured before test_backbone's half-precision tolerance)."""
    from mixmae_scale.finetune.evaluate import in_precision

    model = in_precision(SwinClassifier(small_shape, 10), torch.device("cpu"), precision)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.encoder.absolute_pos_embed.dtype == torch.float32


def test_convert_official_over_an_earlier_file_says_what_it_replaced(small_mixmae, tmp_path):
    """convert-official wrote over whatever was at its output without a word; it now names it as `mixmae export`
    does: an earlier conversion by its source, an export by its step and run, an official .pth by its shape."""
    src = tmp_path / "mixmim_pretrain.pth"
    torch.save({"model": _official_layout(small_mixmae)}, src)
    out = tmp_path / "out.safetensors"
    assert convert_official_checkpoint(src, out)["replaced"] is None
    assert convert_official_checkpoint(src, out)["replaced"] == f"the conversion of {src.absolute()}"
    from mixmae_scale.models.convert_official import what_is_at

    assert what_is_at(src) == (f"an official-layout checkpoint of an encoder and decoder of width "
                               f"{small_mixmae.shape.embed_dim} (no run or step recorded)")
    out.write_bytes(b"not weights")
    assert convert_official_checkpoint(src, out)["replaced"] == "a file that is not an export"


def test_what_is_at_an_export_of_a_tag_without_a_step_number_names_its_run(small_mixmae, tmp_path):
    """An export records its run always and its step where the tag names one (a non-finite stop's
    step00000010-nonfinite-2 does not): such a file was said to have 'no run or step recorded'."""
    from mixmae_scale.models.convert_official import save_official, save_weights, what_is_at

    state = small_mixmae.state_dict()
    pth, safetensors = tmp_path / "encoder.pth", tmp_path / "encoder.safetensors"
    save_official(pth, state, None, {"run": "my-run"})
    from mixmae_scale.models.convert_official import infer_architecture

    save_weights(safetensors, state, infer_architecture(state), "pretrain", provenance={"run": "my-run"})
    for path in (pth, safetensors):
        said = what_is_at(path)
        assert "no run" not in said and "run my-run" in said and "no step recorded" in said, said
