"""What `mixmae eval` accepts of a classifier's head against the split it scores: a head with more classes than
the split's labels (a split of a subset of its classes) is evaluated, one with fewer is refused; and a top-k of a
head with k classes or fewer (every label is among them, a sure 100%) is reported as n/a, not as a score."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mixmae_scale.data.sample_ids import Coverage
from mixmae_scale.finetune.evaluate import evaluate, load_classifier, top5_text


def save_classifier(path, classes: int) -> None:
    from mixmae_scale.config import load_resolved
    from mixmae_scale.models.classifier import SwinClassifier
    from mixmae_scale.models.convert_official import infer_architecture, save_weights
    from mixmae_scale.models.mixmae import swin_shape

    torch.manual_seed(0)
    state = SwinClassifier(swin_shape(load_resolved("tiny").config.model), classes).state_dict()
    save_weights(path, state, infer_architecture(state), "finetune")


def test_a_head_with_more_classes_than_the_split_is_evaluated_and_one_with_fewer_is_refused(demo_shards, tmp_path):
    from mixmae_scale.models.convert_official import WeightsError

    save_classifier(tmp_path / "head12.safetensors", 12)
    model = load_classifier(str(tmp_path / "head12.safetensors"), str(demo_shards), "val")
    assert model.head.out_features == 12  # the demo's 10 classes are labels 0-9 of its 12
    save_classifier(tmp_path / "head9.safetensors", 9)
    with pytest.raises(WeightsError, match="its head has 9 classes, fewer than the 10 of the shards"):
        load_classifier(str(tmp_path / "head9.safetensors"), str(demo_shards), "val")


def test_a_refused_head_names_an_s3_set_by_its_url(demo_shards, tmp_path, s3_bucket):
    """`Path(url).absolute()` made `s3://b/set` into `/cwd/s3:/b/set`, a folder that is nowhere."""
    from mixmae_scale.data import storage
    from mixmae_scale.models.convert_official import WeightsError

    for path in sorted(demo_shards.rglob("*")):
        if path.is_file():
            storage.upload(path, f"s3://{s3_bucket}/set/{path.relative_to(demo_shards).as_posix()}")
    save_classifier(tmp_path / "head9.safetensors", 9)
    with pytest.raises(WeightsError) as raised:
        load_classifier(str(tmp_path / "head9.safetensors"), f"s3://{s3_bucket}/set", "val")
    assert f"fewer than the 10 of the shards in s3://{s3_bucket}/set (classes.json)" in str(raised.value)


@dataclass
class LabelBatch:
    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor


class FixedLogits(torch.nn.Module):
    """Logits that rank class 0 first, then 1, 2, ...: top-1 is right for label 0 alone."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.order = torch.nn.Parameter(-torch.arange(classes, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.order.expand(len(images), -1)


class OneBatch:
    """What `evaluate` reads of a loader: one batch of the given labels, its coverage, where it is."""

    def __init__(self, labels: list[int]) -> None:
        ids = torch.arange(1, len(labels) + 1)
        self.batch = LabelBatch(torch.zeros(len(labels), 3, 4, 4), torch.tensor(labels), ids)
        self.coverage = Coverage(len(labels), int(ids.sum()))
        self.mixture = type("M", (), {"sets": [type("S", (), {"shards": type("L", (), {"location": "x"})})]})

    def eval_batches(self):
        yield self.batch, len(self.batch.labels)

    def split_coverage(self) -> Coverage:
        return self.coverage


@pytest.mark.parametrize("classes, top5", [(3, None), (5, None), (6, 75.0)])
def test_top5_is_a_score_only_for_a_head_of_more_than_5_classes(classes, top5, gloo_of_one):
    labels = [0, 1, 2, 5 if classes == 6 else 2]  # the last one outside the top 5 of a 6-class head
    result = evaluate(FixedLogits(classes), OneBatch(labels), torch.device("cpu"), "fp32")
    assert result["top1"] == 25.0 and result["top5"] == top5
    assert top5_text(result) == ("n/a" if top5 is None else "75.00")



def demo_class_names(demo_shards) -> list[str]:
    from mixmae_scale.data.manifest import load_manifest

    return [c["wnid"] for c in load_manifest(demo_shards).classes]


def save_trained_on(path, names: list[str] | None, classes: int = 10) -> None:
    """A fine-tuned classifier whose export says which classes (by identity, in label order) it was trained on."""
    import json

    from mixmae_scale.config import load_resolved
    from mixmae_scale.models.classifier import SwinClassifier
    from mixmae_scale.models.convert_official import infer_architecture, save_weights
    from mixmae_scale.models.mixmae import swin_shape

    torch.manual_seed(0)
    state = SwinClassifier(swin_shape(load_resolved("tiny").config.model), classes).state_dict()
    record = {} if names is None else {"classes": json.dumps(names)}
    save_weights(path, state, infer_architecture(state), "finetune", provenance=record)


def test_a_classifier_trained_on_the_same_classes_in_another_order_is_refused_naming_both(demo_shards, tmp_path):
    """The same count of other classes, or of the same classes in another order, was scored as if its labels were
    the head's: a top-1 near chance, reported as the classifier's."""
    from mixmae_scale.models.convert_official import WeightsError

    names = demo_class_names(demo_shards)
    swapped = [names[1], names[0], *names[2:]]
    save_trained_on(tmp_path / "swapped.safetensors", swapped)
    with pytest.raises(WeightsError) as refused:
        load_classifier(str(tmp_path / "swapped.safetensors"), str(demo_shards), "val")
    said = str(refused.value)
    assert f"class 0 is {names[1]!r} in its training data and {names[0]!r} in the shards" in said
    from mixmae_scale.finetune.trained_classes import classes_digest

    assert classes_digest(swapped) in said and classes_digest(names) in said  # both sets named
    other = [f"n8{i:07d}" for i in range(10)]  # the demo's are n9...
    save_trained_on(tmp_path / "other.safetensors", other)
    with pytest.raises(WeightsError, match=f"class 0 is 'n80000000' in its training data and {names[0]!r}"):
        load_classifier(str(tmp_path / "other.safetensors"), str(demo_shards), "val")


def test_a_classifier_trained_on_the_splits_classes_or_more_is_evaluated(demo_shards, tmp_path, caplog):
    names = demo_class_names(demo_shards)
    save_trained_on(tmp_path / "same.safetensors", names)
    save_trained_on(tmp_path / "more.safetensors", [*names, "n99999999", "n99999998"], classes=12)
    with caplog.at_level("WARNING"):
        for name in ("same", "more"):  # the split's classes are the first of its 10 or 12, in its order
            load_classifier(str(tmp_path / f"{name}.safetensors"), str(demo_shards), "val")
    assert not caplog.records


def test_weights_without_a_record_of_their_classes_are_evaluated_with_a_warning(demo_shards, tmp_path, caplog):
    """Exports written before the record, and official checkpoints, cannot be checked: said, not refused."""
    save_trained_on(tmp_path / "old.safetensors", None)
    with caplog.at_level("WARNING"):
        load_classifier(str(tmp_path / "old.safetensors"), str(demo_shards), "val")
    assert any("does not record which classes it was fine-tuned on" in r.getMessage() for r in caplog.records)


def finetuning_run(tmp_path, demo_shards, monkeypatch):
    """A fine-tuning run folder whose record names the demo's classes (as the run writes it when it starts), with a
    classifier's weights standing in for its checkpoint's in `export_run`."""
    from mixmae_scale.engine import export
    from mixmae_scale.finetune.trained_classes import write_run_record
    from mixmae_scale.models.convert_official import load_weights

    run = tmp_path / "ft-run"
    (run / "checkpoints").mkdir(parents=True)
    write_run_record(run, [str(demo_shards)])
    save_trained_on(tmp_path / "weights.safetensors", None)
    state = load_weights(tmp_path / "weights.safetensors")[0]
    monkeypatch.setattr(export, "find_checkpoint", lambda *a, **k: (run / "checkpoints", "step00000010"))
    monkeypatch.setattr(export, "gather_weights", lambda folder, tag: dict(state))
    return run


def test_a_finetuning_runs_record_goes_into_its_export_and_is_read_from_its_folder(demo_shards, tmp_path,
                                                                                   monkeypatch):
    """RUN/trained_classes.json (written when the run starts) -> the export's metadata; eval of the run folder reads
    the record itself."""
    import json

    from mixmae_scale.engine import export
    from mixmae_scale.finetune.trained_classes import RECORD, recorded_classes
    from mixmae_scale.models.convert_official import WeightsError, read_metadata

    names = demo_class_names(demo_shards)
    run = finetuning_run(tmp_path, demo_shards, monkeypatch)
    result = export.export_run(run, tmp_path / "classifier.safetensors")
    assert result["kind"] == "finetune"
    assert json.loads(read_metadata(tmp_path / "classifier.safetensors")["classes"]) == names
    assert recorded_classes(tmp_path / "classifier.safetensors") == names == recorded_classes(run)
    load_classifier(str(tmp_path / "classifier.safetensors"), str(demo_shards), "val")
    record = json.loads((run / RECORD).read_text())
    (run / RECORD).write_text(json.dumps({**record, "classes": names[::-1]}))
    with pytest.raises(WeightsError, match=f"class 0 is {names[-1]!r} in its training data"):
        load_classifier(str(run), str(demo_shards), "val")


def test_an_export_over_an_earlier_one_says_what_it_replaced(demo_shards, tmp_path, monkeypatch):
    """`mixmae export RUN` writes RUN/encoder.safetensors (or classifier.safetensors) again at every call: an export
    of a later step, or of another run to the same --out, replaced the file there without a word."""
    from mixmae_scale.engine import export

    run = finetuning_run(tmp_path, demo_shards, monkeypatch)
    out = tmp_path / "classifier.safetensors"
    first = export.export_run(run, out)
    assert first["replaced"] is None and "replaced" not in export.export_line(first)
    again = export.export_run(run, out)
    assert again["replaced"] == f"step {first['step']} of run {run.name}"
    assert export.export_line(again).endswith(f"; it replaced the export of step {first['step']} of run {run.name} "
                                              "there")
    out.write_bytes(b"not weights")
    assert export.export_run(run, out)["replaced"] == "a file that is not an export"


def test_classes_named_by_index_alone_are_not_compared(tmp_path):
    from mixmae_scale.finetune.trained_classes import _first_difference, class_identities

    adopted = class_identities([{"index": 0}, {"index": 1}])
    assert adopted == [None, None]
    assert _first_difference(["n01", "n02"], adopted) is None  # nothing to compare: accepted (with a warning)
    assert _first_difference(["n01"], ["n01", "n02"]) == 1  # a class past those it was trained on
    assert _first_difference(["n01", "n02", "n03"], ["n01", "n02"]) is None  # the first of its classes


def test_an_official_layout_export_carries_the_runs_classes_which_eval_checks(demo_shards, tmp_path, monkeypatch,
                                                                               caplog):
    """A .pth classifier export (`--format official`) had no record of its classes, so eval of it could only warn:
    the record now sits beside 'model' in our own key (`mixmae_scale`), which the official script, reading
    checkpoint['model'] alone, never sees; eval reads it and refuses other classes, and convert-official keeps it."""
    import json

    from mixmae_scale.engine import export
    from mixmae_scale.finetune.trained_classes import RECORD, classes_digest, recorded_classes
    from mixmae_scale.models.convert_official import OURS, WeightsError, convert_official_checkpoint

    names = demo_class_names(demo_shards)
    run = finetuning_run(tmp_path, demo_shards, monkeypatch)
    exported = export.export_run(run, tmp_path / "classifier.pth", fmt="official")
    assert exported["kind"] == "finetune"
    saved = torch.load(tmp_path / "classifier.pth", weights_only=True)
    assert set(saved) == {"model", OURS} and "head.weight" in saved["model"]  # what the official script reads
    assert saved[OURS] == {"classes": names, "classes_digest": classes_digest(names), "run": run.name,
                           "step": exported["step"]}  # the run and step: what a later export says it replaced
    assert recorded_classes(tmp_path / "classifier.pth") == names
    with caplog.at_level("WARNING"):
        load_classifier(str(tmp_path / "classifier.pth"), str(demo_shards), "val")
    assert not caplog.records  # checked, so nothing to warn about
    convert_official_checkpoint(tmp_path / "classifier.pth", tmp_path / "converted.safetensors")
    assert recorded_classes(tmp_path / "converted.safetensors") == names
    record = json.loads((run / RECORD).read_text())
    (run / RECORD).write_text(json.dumps({**record, "classes": names[::-1]}))
    export.export_run(run, tmp_path / "reversed.pth", fmt="official")
    with pytest.raises(WeightsError, match=f"reversed.pth: fine-tuned on other classes .* class 0 is {names[-1]!r} in "
                                           "its training data"):
        load_classifier(str(tmp_path / "reversed.pth"), str(demo_shards), "val")


def test_an_official_layout_export_over_an_earlier_one_says_which_step_and_run_it_replaced(demo_shards, tmp_path,
                                                                                           monkeypatch):
    """`--format official` over an earlier .pth said only that 'a file' was replaced: the .pth now records the run
    and step beside 'model', and the one reading of a replaced file (models/convert_official.what_is_at) reads it."""
    from mixmae_scale.engine import export

    run = finetuning_run(tmp_path, demo_shards, monkeypatch)
    out = tmp_path / "classifier.pth"
    first = export.export_run(run, out, fmt="official")
    assert first["replaced"] is None
    again = export.export_run(run, out, fmt="official")
    assert again["replaced"] == f"step {first['step']} of run {run.name}", again["replaced"]
    assert export.export_line(again).endswith(f"; it replaced the export of step {first['step']} of run {run.name} "
                                              "there")
    out.write_bytes(b"not weights")
    assert export.export_run(run, out, fmt="official")["replaced"] == "a file that is not a weights checkpoint"


def test_eval_of_a_run_folder_says_which_checkpoint_it_scored(demo_shards, tmp_path, monkeypatch):
    """`mixmae eval --init RUN` scores the run's newest checkpoint, not its best (`mixmae export RUN --best`), and its
    line named only the folder: `top-1 12.00% ... (runs/ft)`, read as the run's result or its best. The line and
    the JSON say the checkpoint and step, and where the best is when the run keeps one."""
    from mixmae_scale.cli.job_commands import eval_line

    run = finetuning_run(tmp_path, demo_shards, monkeypatch)
    model = load_classifier(str(run), str(demo_shards), "val")
    assert model.weights_checkpoint == run / "checkpoints" / "step00000010"
    result = {"weights": str(run), "checkpoint": str(model.weights_checkpoint), "samples": 800, "top1": 12.0,
              "top5": 50.0, "precision": "fp32"}
    (run / "best" / "step00000008").mkdir(parents=True)
    assert eval_line(result, "val", "shards", str(run)) == (
        f"top-1 12.00%, top-5 50.00% (fp32) on the 800 images of split 'val' of shards ({run}: its newest checkpoint, "
        f"step 10; its best: `mixmae export {run} --best`)")
    file = {**result, "weights": "ft.safetensors", "checkpoint": None}
    assert eval_line(file, "val", "shards", "ft.safetensors") == (
        "top-1 12.00%, top-5 50.00% (fp32) on the 800 images of split 'val' of shards (ft.safetensors)")
