"""The recipe a checkpoint was trained with, and what a resume with another one may change.

A resumed run goes on at the checkpoint's step with the configuration given now. `_refuse_another_run` (resume.py)
refuses what would not load or would count steps differently (the model's tensors, the global batch, the start
weights); everything else used to pass in silence: a resume with another profile went on with another mask ratio, a
10x learning rate and a config.yaml that no longer said what the first steps ran with. So every save records the
resolved configuration in its tag (`RECORD`, written by store.save into the tag before it is sealed), and a resume
compares it with the one given now (`compare`):

- every changed key is named, `old -> new`, in one note (logged, and kept with the resume in run.json);
- a key that changes what the loss means at the same step (`changes_the_loss`: the masking, the loss target's
  normalisation, drop path, the augmentation, the data read, a fine-tuning's recipe) is refused unless
  `checkpoint.allow_recipe_change: true` opts in: a loss curve whose two halves measure different things looks
  like one run;
- the schedule, the learning rate, the optimizer's other settings, logging and checkpointing may change (extending
  a run is the usual reason to resume with other values): noted only.

Keys that change per start by design (`checkpoint.resume`, the launch's `cluster.*`, the opt-in itself), the list of
sources and the derived values (micro-batch and accumulation follow the world size; the layout is resume.py's) are
not compared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mixmae_scale.engine.checkpointing.store import RECIPE as RECORD  # in each tag: the configuration it trained with

OPT_IN = "checkpoint.allow_recipe_change"

# `sources` (the profile files and --set lines) is not compared: the profiles' paths move with the installed package;
# what another profile sets is compared key by key.
NOT_COMPARED = ("derived", "deepspeed_config", "sources", "checkpoint.resume", "cluster", OPT_IN)
# How a block runs, not what it computes: the same loss at the same step.
EXECUTION_ONLY = ("model.compile", "model.attention", "model.checkpoint_every")
# What a loss value means at a step: the masking, the target, the model's regularisation, the images it sees.
CHANGES_THE_LOSS = ("model", "data.shards", "data.sources", "data.train_split", "data.crop_scale", "data.crop_ratio",
                    "data.hflip", "data.interpolation", "data.exif_orientation", "data.heldout",
                    "finetune.num_classes", "finetune.mixup", "finetune.cutmix", "finetune.label_smoothing",
                    "finetune.rand_augment_ops", "finetune.rand_augment_magnitude",
                    "finetune.rand_augment_magnitude_std", "finetune.random_erasing", "segment.num_classes",
                    "segment.ignore_index", "segment.crop_size", "segment.head_channels", "segment.pool_scales",
                    "segment.head_dropout")


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def changes_the_loss(key: str) -> bool:
    """Whether a change of `key` makes the loss at a step mean something else than the checkpoint's loss did."""
    return _under(key, CHANGES_THE_LOSS) and not _under(key, EXECUTION_ONLY)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists (and tuples) are values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _shown(value: Any) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value, default=str)


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    @property
    def refused(self) -> bool:
        return changes_the_loss(self.key)

    def __str__(self) -> str:
        return f"{self.key} {_shown(self.old)} -> {_shown(self.new)}"


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[Change]:
    """Every compared key whose value differs (a key one side lacks reads as null), in key order."""
    old, new = flatten(saved), flatten(current)
    keys = sorted(k for k in old.keys() | new.keys() if not _under(k, NOT_COMPARED))
    return [Change(k, old.get(k), new.get(k)) for k in keys if _shown(old.get(k)) != _shown(new.get(k))]


@dataclass(frozen=True)
class Verdict:
    changes: tuple[Change, ...] = ()
    note: str | None = None  # to log and record with the resume
    refusal: str | None = None  # the resume must not go on


def compare(saved: dict[str, Any] | None, current: dict[str, Any], allow: bool, where: str, how: str) -> Verdict:
    """`saved`: the recipe the checkpoint recorded (None: not recorded, nothing to compare); `where`: the checkpoint
    named in the messages; `how`: the way out besides the opt-in (another run folder)."""
    if saved is None:
        return Verdict()
    changes = tuple(differences(saved, current))
    if not changes:
        return Verdict()
    listed = "; ".join(map(str, changes))
    loss = [str(c) for c in changes if c.refused]
    if loss and not allow:
        return Verdict(changes, refusal=(
            f"{where} was trained with another recipe: {'; '.join(loss)} would change what the loss means at the "
            f"same step (all changes: {listed}); resume with the checkpoint's values (its {RECORD} records them), "
            f"or set {OPT_IN}=true to go on with the new ones (noted in the log and run.json), or, for another run, "
            f"{how}"))
    opted = f" ({OPT_IN}=true lets {', '.join(c.key for c in changes if c.refused)} change)" if loss else ""
    return Verdict(changes, note=f"resuming {where} with a changed configuration{opted}: {listed}")


def saved_recipe(ckpt_dir: Path, tag: str) -> dict[str, Any] | None:
    """The recipe `tag` recorded; for a checkpoint saved before tags recorded one, the run folder's config.yaml (what
    the launch that wrote it started with, unless a later launch rewrote it); None if neither can be read."""
    for path in (ckpt_dir / tag / RECORD, ckpt_dir.parent / RECORD):
        try:
            record = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(record, dict):
            return record
    return None


def as_record(resolved) -> dict[str, Any]:
    """What a tag records: the resolved configuration (config.ResolvedConfig.to_dict), as YAML writes it."""
    return yaml.safe_load(yaml.safe_dump(resolved.to_dict(), sort_keys=False))
