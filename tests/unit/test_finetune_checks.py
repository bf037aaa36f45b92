"""What fine-tuning refuses at its start, without a launch: no encoder named, encoder weights the classifier has no
place for, and a head with fewer classes than the training data's labels."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mixmae_scale.config import load_resolved
from mixmae_scale.config.load import ConfigError
from mixmae_scale.data.errors import DataError
from mixmae_scale.finetune.job import build_classifier, head_classes
from mixmae_scale.finetune.pretrained import Pretrained
from mixmae_scale.models.convert_official import WeightsError, infer_architecture
from mixmae_scale.models.mixmae import MixMAE, swin_shape


def tiny_config(*overrides: str):
    return load_resolved("finetune_tiny", overrides=["finetune.init=deeper.safetensors", *overrides]).config


def pretraining_weights(depths: tuple[int, ...], config) -> Pretrained:
    """A full pretraining model's weights (decoder and mask token too) of the profile's width at `depths`."""
    torch.manual_seed(0)
    shape = replace(swin_shape(config.model), depths=depths)
    state = MixMAE(shape, decoder_dim=32, decoder_depth=1, decoder_heads=2).state_dict()
    return Pretrained(state, infer_architecture(state), config.finetune.init)


def test_a_deeper_encoder_of_the_same_width_is_refused_naming_its_extra_tensors():
    """Its extra blocks were `unexpected` keys, which nothing read: the run fine-tuned a truncated encoder."""
    config = tiny_config()
    depths = tuple(config.model.depths)
    deeper = (*depths[:-1], depths[-1] + 1)
    with pytest.raises(WeightsError) as refused:
        build_classifier(config, 10, pretraining_weights(deeper, config))
    said = str(refused.value)
    last = len(depths) - 1
    assert said.startswith(f"finetune.init=deeper.safetensors: 13 encoder tensors have no place in the classifier "
                           f"of model.depths={list(depths)} (layers.{last}.blocks.{depths[-1]}.")
    assert f"the weights' encoder has depths {list(deeper)}: set model.* to its shape" in said and "\n" not in said


def test_a_pretraining_checkpoint_of_the_same_shape_loads_its_decoder_set_aside():
    config = tiny_config()
    pretrained = pretraining_weights(tuple(config.model.depths), config)
    model = build_classifier(config, 10, pretrained)
    assert torch.equal(model.encoder.patch_embed.proj.weight, pretrained.state["encoder.patch_embed.proj.weight"])


def test_fewer_head_classes_than_the_datas_are_refused_naming_both_counts():
    with pytest.raises(ConfigError, match=r"^finetune.num_classes=5: the manifest of /data/x has 10 classes \(labels "
                                          r"0-9\); set finetune.num_classes to at least 10"):
        head_classes(5, 10, "/data/x")
    assert head_classes(None, 10, "/data/x") == 10 and head_classes(12, 10, "/data/x") == 12  # more is allowed
    with pytest.raises(DataError, match="no classes in the manifest; set finetune.num_classes"):
        head_classes(None, 0, "/data/x")


def test_a_classifier_of_one_class_is_refused_naming_the_count():
    """A folder of one class fine-tuned to loss 0.0000, grad 0.000 and `top-1 100.00%` on every evaluation: a
    softmax over one class is 1 whatever the encoder, so the run learnt nothing and its result read as perfect."""
    with pytest.raises(DataError, match=r"^/data/x: the manifest has 1 class \(labels 0-0\); a classifier of one "
                                        r"class has nothing to learn"):
        head_classes(None, 1, "/data/x")
    with pytest.raises(DataError, match="has 1 class"):  # a wider head does not help: every label is still 0
        head_classes(5, 1, "/data/x")
    with pytest.raises(ConfigError, match=r"^finetune.num_classes=1: a classifier of one class"):
        head_classes(1, 0, "/data/x")
    assert head_classes(None, 2, "/data/x") == 2 and head_classes(2, 0, "/data/x") == 2


class RunStarted(Exception):
    """Stands for everything after the start's checks: the process group, the run folder, the training."""


def test_no_finetune_init_is_refused_naming_the_key_and_random_must_be_said(monkeypatch, tmp_path):
    """`finetune.init` unset started a classifier from random weights without a word (`segment.init` unset is
    refused): its top-1 then read as the pretrained encoder's. `finetune.init=random` says it."""
    from mixmae_scale.finetune import job

    def start_run(*args, **kwargs):
        raise RunStarted

    monkeypatch.setattr(job, "start_run", start_run)
    config = load_resolved("finetune_tiny", overrides=["finetune.init=null"]).config
    with pytest.raises(WeightsError, match=r"^finetune.init is not set: name the encoder to start from \(--set "
                                           r"finetune.init=RUN_FOLDER, .*--set finetune.init=random for a randomly "
                                           r"initialised encoder \(the baseline\)$"):
        job.finetune(config, [], tmp_path / "run")
    config.finetune.init = "random"
    with pytest.raises(RunStarted):  # no weights to read: the run starts, from the classifier's own initialisation
        job.finetune(config, [], tmp_path / "run")
    assert not (tmp_path / "run").exists()


def with_a_checkpoint(run: Path) -> Path:
    """A run folder holding a complete checkpoint (its marker is what a start looks at before the process group)."""
    from mixmae_scale.engine.checkpointing import store

    (run / "checkpoints" / "step00000006").mkdir(parents=True)
    store.seal(run / "checkpoints" / "step00000006", {"step": 6, "world_size": 2, "kind": "regular"})
    return run


def test_a_run_that_resumes_does_not_read_or_need_its_init_file(monkeypatch, tmp_path):
    """A killed fine-tuning whose init file was cleaned up since could not resume: the file was read before the run
    looked at its own checkpoint, which holds every weight. A fresh start still refuses the missing file."""
    from mixmae_scale.finetune import job

    def start_run(*args, **kwargs):
        raise RunStarted

    monkeypatch.setattr(job, "start_run", start_run)
    config = load_resolved("finetune_tiny", overrides=[f"finetune.init={tmp_path / 'gone.safetensors'}"]).config
    with pytest.raises(RunStarted):
        job.finetune(config, [], with_a_checkpoint(tmp_path / "killed"))
    with pytest.raises(FileNotFoundError, match=r"^finetune.init=.*gone.safetensors: not found"):
        job.finetune(config, [], tmp_path / "new")
    with pytest.raises(FileNotFoundError, match="gone.safetensors: not found"):  # --overwrite starts afresh
        job.finetune(config, [], tmp_path / "killed", overwrite=True)


def test_a_validation_split_smaller_than_the_ranks_is_refused_naming_it_and_the_way_out_of_the_run():
    """Fine-tuning a folder whose --val-fraction held out 1 image on 2 ranks said `the split has 1 image(s) for 2
    ranks; evaluate it on 1 rank(s) or fewer`: which split of which set, and a fine-tuning run cannot evaluate on
    fewer ranks than it trains on."""
    from mixmae_scale.finetune.evaluate import eval_batch_size

    with pytest.raises(DataError, match=r"^split 'val' of /data/x has 1 image for 2 ranks \(each evaluates a share "
                                        r"of at least one\); run the fine-tuning on 1 GPU, or give 'val' more "
                                        r"images"):
        eval_batch_size(16, 1, 2, "/data/x", "val", "the fine-tuning")
    with pytest.raises(DataError, match=r"^split 'val' of /data/x has 3 images for 4 ranks .*; evaluate it on 3 "
                                        r"GPUs or fewer"):
        eval_batch_size(16, 3, 4, "/data/x", "val")
    with pytest.raises(DataError, match=r"^split 'val' of /data/x has no images: there is nothing to evaluate"):
        eval_batch_size(16, 0, 1, "/data/x", "val")
    assert eval_batch_size(16, 3, 2, "/data/x", "val") == 1 and eval_batch_size(16, 100, 2, "/data/x", "val") == 16


def fine_tuning_on(shards: Path, monkeypatch, world: int, global_batch: int):
    """The config of finetune_tiny from random weights on `shards`, whose start sees `world` ranks (the process
    group, where there is one, is the test's)."""
    from mixmae_scale.engine import loop

    monkeypatch.setattr(loop.distributed, "init", lambda local_rank: (0, world, torch.device("cpu")))
    from mixmae_scale.config import load_config

    return load_config("finetune_tiny", None, ["finetune.init=random", f"data.shards={shards}",
                                               f"batch.global_batch={global_batch}"])[0]


def test_a_one_class_set_is_refused_before_the_run_folder_is_made(tmp_path, monkeypatch, gloo_of_one):
    """The refusal of a one-class set came after the run folder was made: it left an empty checkpoints/ and a
    config.yaml of a run that never ran. It is made off the manifest first: the refused run leaves nothing."""
    from tiny_sets import tiny_set

    from mixmae_scale.finetune import job

    config = fine_tuning_on(tiny_set(tmp_path, {"cats": 4}, val_fraction=0.25), monkeypatch, world=1, global_batch=2)
    with pytest.raises(DataError, match=r"shards: the manifest has 1 class \(labels 0-0\); a classifier of one class"):
        job.finetune(config, [], tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_validation_split_smaller_than_the_ranks_is_refused_before_the_run_folder_is_made(tmp_path, monkeypatch):
    from tiny_sets import tiny_set

    from mixmae_scale.finetune import job

    shards = tiny_set(tmp_path, {"cats": 5, "dogs": 5}, val_fraction=0.2)  # 1 val image of each class
    config = fine_tuning_on(shards, monkeypatch, world=3, global_batch=6)
    with pytest.raises(DataError, match=rf"^split 'val' of {shards} has 2 images for 3 ranks .*; run the "
                                        "fine-tuning on 2 GPUs or fewer"):
        job.finetune(config, [], tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_encoder_of_another_shape_is_refused_before_the_run_folder_naming_the_settings_that_fit(monkeypatch,
                                                                                                  tmp_path):
    """The official small fixture (depths 1,1,2,1) named as finetune_tiny's init (depths 2,2,2,2) failed after the
    run folder was made (config.yaml, checkpoints/, trained_classes.json left) with `the encoder lacks
    ['layers.0.blocks.1.norm1.weight', ...]`, saying neither what differs nor what to set."""
    from mixmae_scale.finetune import job

    def start_run(*args, **kwargs):
        raise RunStarted

    monkeypatch.setattr(job, "start_run", start_run)
    config = tiny_config()
    shallower = pretraining_weights((1, 1, 2, 1), config)
    with pytest.raises(WeightsError) as refused:
        job.finetune(config, [], tmp_path / "run", pretrained=shallower)
    said = str(refused.value)
    assert said.startswith("finetune.init=deeper.safetensors: the weights' encoder has depths [1, 1, 2, 1]; the "
                           "profile's model has depths [2, 2, 2, 2]")
    assert "--set 'model.depths=[1,1,2,1]'" in said and "\n" not in said
    assert not (tmp_path / "run").exists()
    with pytest.raises(RunStarted):  # the same weights under the profile's shape start
        job.finetune(config, [], tmp_path / "run", pretrained=pretraining_weights((2, 2, 2, 2), config))
    # The command line's config is not resolved yet (model.depths unset, the size's preset): the same refusal.
    from mixmae_scale.config import load_config

    unresolved = load_config("finetune_tiny", None, ["finetune.init=deeper.safetensors"])[0]
    assert unresolved.model.depths is None
    with pytest.raises(WeightsError, match=r"the profile's model has depths \[2, 2, 2, 2\]"):
        job.finetune(unresolved, [], tmp_path / "run", pretrained=shallower)


def test_weights_of_the_profiles_own_mlp_ratio_are_not_refused_for_the_ratio_read_back_off_them(monkeypatch,
                                                                                                tmp_path):
    """The MLP is int(width x model.mlp_ratio) wide, so the ratio read back off the weights (fc1's width / embed_dim)
    is not the one set where the product is no integer: weights pretrained at model.mlp_ratio=1.3 (tiny: width 32,
    MLP 41, read back as 1.28125) were refused under the same model.mlp_ratio=1.3, and the --set it named
    (1.28125) builds other widths at the later stages (int(64 x 1.28125) = 82, the weights' 83)."""
    from mixmae_scale.finetune import job

    def start_run(*args, **kwargs):
        raise RunStarted

    monkeypatch.setattr(job, "start_run", start_run)
    config = tiny_config("model.mlp_ratio=1.3")
    weights = pretraining_weights(tuple(config.model.depths), config)
    assert weights.arch["mlp_ratio"] != 1.3
    build_classifier(config, 10, weights)  # the weights fit the profile's model
    with pytest.raises(RunStarted):
        job.finetune(config, [], tmp_path / "run", pretrained=weights)
    # Another ratio is still refused before the run folder, naming it.
    with pytest.raises(WeightsError, match=r"the weights' encoder has mlp_ratio 4\.0; the profile's model has "
                                           r"mlp_ratio 1\.3"):
        job.finetune(tiny_config("model.mlp_ratio=1.3"), [], tmp_path / "run",
                     pretrained=pretraining_weights(tuple(config.model.depths), tiny_config()))
    assert not (tmp_path / "run").exists()


def test_a_validation_split_without_labels_is_refused_before_the_run_folder_is_made(tmp_path, monkeypatch,
                                                                                   gloo_of_one):
    """A validation split adopted unlabeled into a labeled set (`mixmae shards adopt --split val --unlabeled`) gave
    every image label -1: the run trained to its end and reported top-1 0.00% at every evaluation, its best among
    them. The manifest says the split has no labels: refused at the start, and eval refuses it too."""
    import json

    from tiny_sets import tiny_set

    from mixmae_scale.finetune import job
    from mixmae_scale.finetune.evaluate import load_classifier

    shards = tiny_set(tmp_path, {"cats": 4, "dogs": 4}, val_fraction=0.25)
    manifest = json.loads((shards / "dataset.json").read_text())
    manifest["splits"]["val"]["labeled"] = False
    (shards / "dataset.json").write_text(json.dumps(manifest))
    config = fine_tuning_on(shards, monkeypatch, world=1, global_batch=2)
    said = (rf"^data.shards={shards}: split 'val' has no labels \(no .cls members, its manifest says\); fine-tuning "
            "scores its top-1 against the labels")
    with pytest.raises(DataError, match=said):
        job.finetune(config, [], tmp_path / "run")
    assert not (tmp_path / "run").exists()
    classifier = tmp_path / "classifier.safetensors"
    from mixmae_scale.models.classifier import SwinClassifier
    from mixmae_scale.models.convert_official import save_weights

    state = SwinClassifier(swin_shape(tiny_config().model), 2).state_dict()
    save_weights(classifier, state, infer_architecture(state), "finetune")
    with pytest.raises(DataError, match=rf"^--data {shards}: split 'val' has no labels .*`mixmae eval` scores"):
        load_classifier(str(classifier), str(shards), "val")
