"""The classes a classifier was fine-tuned on, by identity and in label order, kept with its weights: a head scored
on shards whose labels mean other classes (other classes of the same count, or the same ones in another order)
gives a number near chance that reads as the classifier's, so `mixmae eval` refuses such shards instead.

A class's identity is what the shard manifest names it by (data/manifest.py's `classes`): its `wnid` (the folder a
converted set read it from), else its `name`, else nothing (an adopted set's classes are bare indices, which name no
class). A fine-tuning run writes its training data's list to RUN/trained_classes.json when it starts; `mixmae export`
copies it into the classifier's safetensors metadata (`classes`, a JSON list, and `classes_digest`), or, in the
official layout (`--format official`), into our record beside 'model' (models/convert_official.py's `OURS`: the list
itself and its digest), which the official script does not read; eval reads it from the export or from the run
folder.

What eval accepts: shards whose classes are the first k of the recorded ones, in the same order (a split may hold a
subset of a head's classes: its labels 0..k-1). Where either side names no class there is nothing to compare (said,
not refused); weights without a record (exported before it existed, released official checkpoints) are evaluated
with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

RECORD = "trained_classes.json"  # in a fine-tuning run's folder
METADATA_KEY = "classes"  # in an exported classifier's safetensors metadata: the JSON list
DIGEST_KEY = "classes_digest"

log = logging.getLogger("mixmae.eval")

Identities = list[str | None]


def class_identities(classes: list[dict[str, Any]]) -> Identities:
    """A manifest's classes (index order) as the names that identify them; None for a class named by index alone."""
    return [str(c.get("wnid") or c.get("name") or "") or None for c in classes]


def classes_digest(identities: Identities) -> str:
    """A short digest of a class list, identities and order: what a message names a list by."""
    return hashlib.sha256(json.dumps(identities).encode()).hexdigest()[:16]


def training_classes(locations: list[str]) -> Identities | None:
    """The classes of a run's training sets (one, or a mixture's): the longest list, when every set's is its first
    part; None where two sets name the same label differently (which label means what is then not one thing)."""
    from mixmae_scale.data.manifest import load_manifest

    lists = [class_identities(load_manifest(location).classes) for location in locations]
    longest = max(lists, key=len)
    if any(_first_difference(longest, other) is not None for other in lists):
        log.warning("the training sets %s name their classes differently: no record of the classes trained on is "
                    "kept, so `mixmae eval` cannot check them", ", ".join(locations))
        return None
    return longest


def write_run_record(run_root: Path, locations: list[str]) -> None:
    """RUN/trained_classes.json: the classes of the training sets at `locations`, for export and eval (rank 0)."""
    from mixmae_scale.atomic_file import write_text

    identities = training_classes(locations)
    if identities is None:
        return
    write_text(Path(run_root) / RECORD, json.dumps({"shards": locations, "digest": classes_digest(identities),
                                                    "classes": identities}, indent=1) + "\n")


def read_run_record(run_root: Path) -> Identities | None:
    path = Path(run_root) / RECORD
    if not path.is_file():
        return None
    try:
        classes = json.loads(path.read_text()).get("classes")
    except (json.JSONDecodeError, AttributeError) as exc:
        log.warning("%s: not readable (%s); evaluating without a record of the classes trained on", path, exc)
        return None
    return classes if isinstance(classes, list) else None


def export_metadata(run_root: Path) -> dict[str, str]:
    """What an export of the run's classifier adds to its metadata: the list and its digest ({} without a record)."""
    identities = read_run_record(run_root)
    if identities is None:
        return {}
    return {METADATA_KEY: json.dumps(identities), DIGEST_KEY: classes_digest(identities)}


def official_record(run_root: Path) -> dict[str, Any]:
    """What an official-layout export of the run's classifier records beside 'model': the list and its digest ({}
    without a record)."""
    identities = read_run_record(run_root)
    if identities is None:
        return {}
    return {METADATA_KEY: identities, DIGEST_KEY: classes_digest(identities)}


def recorded_classes(source: str | Path) -> Identities | None:
    """The classes the weights at `source` were fine-tuned on: an export's metadata or official-layout record, or
    the record of the run folder named (the run, its checkpoints/ or best/ folder, or one checkpoint); None where
    nothing records them."""
    from mixmae_scale.models.convert_official import OFFICIAL_SUFFIXES, read_metadata, read_official_checkpoint

    path = Path(source)
    if path.is_dir():
        for folder in (path, *list(path.parents)[:2]):
            if (folder / RECORD).is_file():
                return read_run_record(folder)
        return None
    if path.suffix in OFFICIAL_SUFFIXES:
        classes = read_official_checkpoint(path, mapped=True)[1].get(METADATA_KEY)
    elif path.suffix == ".safetensors":
        text = read_metadata(path).get(METADATA_KEY)
        try:
            classes = json.loads(text) if text else None
        except json.JSONDecodeError:
            return None
    else:
        return None
    return classes if isinstance(classes, list) else None


def _first_difference(recorded: Identities, data: Identities) -> int | None:
    """The first label of `data` whose class is not the recorded one (past the recorded list, or named otherwise);
    a label either side names by index alone matches any."""
    for label, name in enumerate(data):
        if label >= len(recorded):
            return label
        if name is not None and recorded[label] is not None and name != recorded[label]:
            return label
    return None


def require_trained_classes(source: str | Path, shards: str | Path, option: str = "--init") -> None:
    """Refuses shards whose classes are not the ones the weights were fine-tuned on, in their order (naming the
    first label that differs and both lists' digests); warns where nothing can be compared."""
    from mixmae_scale.data.manifest import load_manifest
    from mixmae_scale.models.convert_official import WeightsError

    recorded = recorded_classes(source)
    if recorded is None:
        log.warning("%s %s does not record which classes it was fine-tuned on (weights exported before the record "
                    "or a released official checkpoint): the shards' classes are taken to be its classes, in its "
                    "order, unchecked", option, source)
        return
    data = class_identities(load_manifest(shards).classes)
    if all(name is None for name in data) or all(name is None for name in recorded):
        log.warning("%s %s: %s names its classes by index alone, so which classes they are cannot be checked",
                    option, source, "the shards' manifest" if all(name is None for name in data) else "its record")
    label = _first_difference(recorded, data)
    if label is None:
        return
    was = (f"{recorded[label]!r} in its training data" if label < len(recorded)
           else f"not among the {len(recorded)} classes of its training data")
    where = Path(shards).absolute() if "://" not in str(shards) else shards
    raise WeightsError(f"{option} {source}: fine-tuned on other classes than those of the shards in {where}: class "
                       f"{label} is {was} and {data[label]!r} in the shards (its {len(recorded)} classes: digest "
                       f"{classes_digest(recorded)}; the shards' {len(data)}: digest {classes_digest(data)}); "
                       "evaluate on shards of the classes it was fine-tuned on, in their order")
