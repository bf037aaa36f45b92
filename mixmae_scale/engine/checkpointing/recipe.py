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

Where the data is (`data.shards`, the `shards` of `data.sources`) is not what it is: a run moved to another cluster
reads the same shards from another mount. Each tag also records what the training data is (`DATA`: a digest of every
shard's name, size and sample count, and each set's split and weight, not where it lies; `CONTENT`: of each tar's
sha256 where the manifest records it), so a changed location whose shards are the same is noted, not refused;
another set at the new location, or a tag saved before tags recorded their data, is refused as any change of the
data read.

The images a run scores but never trains on (pretraining's held-out split or tail, data/heldout.py; a fine-tuning's
validation split) are recorded the same way, apart (`HELDOUT`, `HELDOUT_CONTENT`: `heldout_record`). Another set of
them changes no training step, so a resume with one is not refused; but every held-out loss and evaluation after it
scores other images than the ones before it, and a curve drawn across the resume reads as one. So it is said
(`heldout_change`: a warning in the log, and the resume's entry in run.json names it and its step), and pretraining's
summary says when the loss at step 0 was scored on other images than the loss at the end. The same images at
another location (a moved data.shards) say nothing more than the move; a tag saved before tags recorded them is
resumed without the comparison.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mixmae_scale.engine.checkpointing.store import RECIPE as RECORD  # in each tag: the configuration it trained with

OPT_IN = "checkpoint.allow_recipe_change"

DATA = "data_read"  # a record's digest of its training data wherever it lies (`data_identity`), beside the config
# The digest of its tars' contents (the manifests' sha256 of each tar, `data_content`), where the manifests record
# them: tars are 512-byte padded, so a set rebuilt under the same names can keep every size and count. Kept apart from
# `DATA` so that a tag saved before it was recorded still compares by names, sizes and counts.
CONTENT = "data_content"
# The images a run scores but never trains on (`heldout_record`), and their tars' contents: compared apart, never a
# refusal (`heldout_change`).
# What a release before the held-out cut by sample identity (data/heldout.HeldOut.earlier_cut) read instead: the
# `data_identity` of the sources with the tail left out of the held-out split alone, and their `data_content` where
# the manifests record it (`_reading`), recorded only where it differs from what is read now (a source listing the
# held-out tars and more, which that release read whole). A checkpoint whose `DATA` (and `CONTENT`) is this was
# written by such a release: its resume is told as that, not as a set rebuilt in place (`_read_by`).
EARLIER_CUT = "data_read_earlier_cut"
# What the run would read with nothing held out of its sources (the sources whole, `_reading`), recorded only where the
# held-out cut takes something out. A checkpoint whose `DATA` (and `CONTENT`) is this read those tars whole, the tail
# with them (a release before the tail was cut from a source with data.shards' train tars): told as the cut, not as
# a set rebuilt in place. The tars' digest of what is read (`CONTENT`) told it only while the tail was part of one
# shard: a tail that drops a whole shard changes it, and a manifest without sha256s has none.
UNCUT = "data_read_uncut"
HELDOUT = "heldout_read"
HELDOUT_CONTENT = "heldout_content"
NOTHING_HELD_OUT = "none"  # `HELDOUT` of a run too small to hold anything out
# Where the data lies: a change of these alone, to the same shards (`DATA`), is a move, not other data.
LOCATIONS = ("data.shards", "data.sources")
# What else makes the training data read (`DATA`) another without a location changing: the split and the hold-out
# chosen (refused by name), and the size of a held-out tail (data/heldout.heldout_count), which no refused key says.
SPLIT_CHOICE = ("data.train_split", "data.heldout")
TAIL_SIZE = ("logging.heldout_batches", "batch.micro")
# `sources` (the profile files and --set lines) is not compared: the profiles' paths move with the installed package;
# what another profile sets is compared key by key.
NOT_COMPARED = ("derived", "deepspeed_config", "sources", "checkpoint.resume", "cluster", OPT_IN, DATA, CONTENT,
                HELDOUT, HELDOUT_CONTENT, EARLIER_CUT, UNCUT)
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
    moved: bool = False  # a location changed, to the same shards (`DATA`)
    rebuilt: bool = False  # the location is the same, the shards there are not (`DATA`, `CONTENT`)
    cut: str = ""  # rebuilt: the changes that moved its held-out tail's cut, which also change the samples read
    heldout_only: bool = False  # data.shards beside data.sources, to other held-out images (`HELDOUT`)
    same_tars: bool = False  # rebuilt, yet the tars' sha256s (`CONTENT`) are the checkpoint's: other samples of them
    earlier_cut: bool = False  # rebuilt: the checkpoint read what an earlier release read (`EARLIER_CUT`)
    uncut: bool = False  # rebuilt: the checkpoint read the sources whole, the held-out tail with them (`UNCUT`)

    @property
    def refused(self) -> bool:
        return changes_the_loss(self.key) and not self.moved

    def __str__(self) -> str:
        if self.rebuilt and self.cut:
            return (f"{self.key} {_shown(self.new)}: other training samples than the checkpoint's at the same "
                    f"location, its held-out tail (logging.heldout_batches x batch.micro) cut elsewhere by {self.cut} "
                    "(keep logging.heldout_batches x batch.micro as the checkpoint had it, e.g. twice the held-out "
                    "batches at half the micro-batch, to cut the same tail)")
        if self.rebuilt and self.earlier_cut:
            return (f"{self.key} {_shown(self.new)}: the same shards, other samples of them read than the "
                    "checkpoint's: the held-out tail of data.shards' train split is now left out of every source "
                    "that lists its tars (data/heldout.py, by sample identity), and the checkpoint was written by an "
                    "earlier release that read it from a source listing those tars and more, so that run trained on "
                    "its held-out images (its held-out losses so far scored images it had trained on)")
        if self.rebuilt and self.uncut:
            when = "data.shards had a validation split when it was written"
            if self.key == "data.sources":
                when = ("a run started by an earlier release, which read a data.sources set with data.shards' train "
                        f"tars whole, trained on its held-out images; or {when}")
            return (f"{self.key} {_shown(self.new)}: the same shards at the same location, other samples of them read "
                    "than the checkpoint's: the held-out tail of data.shards' train split (its last "
                    "logging.heldout_batches x batch.micro samples) is now left out of them, and the checkpoint read "
                    f"them whole, the tail with them ({when}): "
                    f"{OPT_IN}=true goes on without the tail, or a validation split for data.shards (data.val_split) "
                    "holds nothing out of the training data and reads it whole again")
        if self.rebuilt and self.same_tars:
            return (f"{self.key} {_shown(self.new)}: the same tars (by sha256) at the same location, other samples of "
                    "them read than the checkpoint's: a held-out tail cut from them where it was not, or the other "
                    "way (data/heldout.py leaves the tail out of a data.sources set with data.shards' train tars; "
                    "a run started by an earlier release trained on it)")
        if self.rebuilt:
            return (f"{self.key} {_shown(self.new)} rebuilt in place (the same location, other shard names, sizes, "
                    "sample counts or tar contents than the checkpoint's)")
        moved = " (the same shards, by name, size and sample count, at another location)" if self.moved else ""
        if self.moved and self.heldout_only:
            moved = (" (the held-out images only, other ones: training reads data.sources, unchanged by name, "
                     "size and sample count)")
        return f"{self.key} {_shown(self.old)} -> {_shown(self.new)}{moved}"


def data_identity(mixture) -> str:
    """What the training data is, not where it lies (a data.shard_sets.ShardMixture, after any held-out tail is
    taken out): each set's split and weight, and each shard's name (relative to its set), size, sample count and
    the line of its index it starts at (a held-out tail's part of a shard). Not the bytes: `data_content`."""
    sets = [[entry.weight, entry.shards.split, list(entry.shards.names), list(entry.shards.bytes_per_shard),
             list(entry.shards.samples_per_shard), list(entry.shards.first_line)] for entry in mixture.sets]
    return hashlib.sha256(json.dumps(sets).encode()).hexdigest()[:16]


def data_content(mixture) -> str | None:
    """A digest of the tars' contents, from each manifest's sha256 of each tar (None where no manifest records one)."""
    digests = [list(entry.shards.sha256) for entry in mixture.sets]
    if not any(any(d) for d in digests):
        return None
    return hashlib.sha256(json.dumps(digests).encode()).hexdigest()[:16]


def heldout_record(images, scored: int | None = None) -> dict[str, str]:
    """What a tag records of the images a run scores but never trains on (a data.manifest.SplitShards: a validation
    split, or a train split's held-out tail; None: nothing is held out), wherever they lie: their split, each shard's
    name, size, sample count and first index line, and `scored`, how many of them a score reads where it reads only
    the first ones (pretraining's logging.heldout_batches x batch.micro); under `HELDOUT_CONTENT`, the digest of the
    tars' sha256s where the manifest records them."""
    if images is None:
        return {HELDOUT: NOTHING_HELD_OUT}
    identity = [images.split, list(images.names), list(images.bytes_per_shard), list(images.samples_per_shard),
                list(images.first_line), scored]
    record = {HELDOUT: hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]}
    if any(images.sha256):
        record[HELDOUT_CONTENT] = hashlib.sha256(json.dumps(list(images.sha256)).encode()).hexdigest()[:16]
    return record


def earlier_cut_record(earlier, data) -> dict[str, str]:
    """`EARLIER_CUT` for a tag: what an earlier release read (`earlier`, a ShardMixture; `_reading`) where it is not
    the data read now (`data`); empty where the two are the same (no source shares the held-out tars but the
    held-out split itself)."""
    before = _reading(earlier)
    return {EARLIER_CUT: before} if before != _reading(data) else {}


def _reading(mixture) -> str:
    """A mixture's `data_identity`, and its `data_content` after a space where the manifests record one: what
    `_read_by` compares with a checkpoint's `DATA` and `CONTENT`. Names, sizes and counts alone called a set converted
    again under the same names (other tar sha256s) the same shards."""
    content = data_content(mixture)
    return data_identity(mixture) + (f" {content}" if content else "")


def _read_by(saved: dict[str, Any], reading: str | None) -> bool:
    """Whether the checkpoint's record (`saved`) read the data of `reading` (`_reading`): the same identity, and the
    same tar contents where both sides know them (as `differences` compares `DATA` and `CONTENT`)."""
    if not reading or saved.get(DATA) is None:
        return False
    identity, _, content = reading.partition(" ")
    return saved[DATA] == identity and (not content or saved.get(CONTENT) is None or saved[CONTENT] == content)


def cut_record(whole, earlier, data) -> dict[str, str]:
    """What a tag records of the held-out cut beside the data read (`data`, a ShardMixture): `EARLIER_CUT` of what an
    earlier release read (`earlier`: `earlier_cut_record`) and `UNCUT` of the sources whole (`whole`), each where it
    is not what is read now."""
    now = _reading(data)
    return {**earlier_cut_record(earlier, data), **({UNCUT: _reading(whole)} if _reading(whole) != now else {})}


def heldout_change(saved: dict[str, Any] | None, current: dict[str, Any], where: str, step: int,
                   same_training: bool = True) -> str | None:
    """The warning for a resume whose held-out images differ from those the tag recorded (None: the same, or either
    side records none, as a tag saved before tags recorded them). The run goes on: training reads what it read, unless
    `same_training` is False (an opted-in change of the training data, said by `compare`'s note)."""
    old, new = (saved or {}).get(HELDOUT), current.get(HELDOUT)
    if old is None or new is None:
        return None
    old_content, new_content = (saved or {}).get(HELDOUT_CONTENT), current.get(HELDOUT_CONTENT)
    if old == new and (old_content is None or new_content is None or old_content == new_content):
        return None
    if NOTHING_HELD_OUT in (old, new):
        what = ("nothing was held out before it, images are now" if old == NOTHING_HELD_OUT
                else "images were held out before it, none are now")
    elif old == new:
        what = "the same names, sizes and counts, other tar contents: the set was rebuilt"
    else:
        what = ("another split, other shards, sample counts or cut of the train split, or another number of them "
                "scored: data.val_split or data.shards; in pretraining also data.heldout, logging.heldout_batches, "
                "batch.micro")
    training = ("training reads the same data" if same_training
                else f"{OPT_IN}=true let the training data change too: see the changed configuration")
    return (f"the held-out images differ from those {where} recorded ({what}): resumed at step {step} all the same "
            f"({training}), but every held-out loss and evaluation from here on scores other "
            f"images than those before step {step}: do not read a curve across it (run.json's resume entry keeps this "
            "note); resume with the checkpoint's held-out images to keep one curve")


def _without_locations(sources: Any) -> Any:
    if not isinstance(sources, list):
        return sources
    return [{k: v for k, v in s.items() if k != "shards"} if isinstance(s, dict) else s for s in sources]


def _moved(key: str, old: Any, new: Any, same_data: bool) -> bool:
    """A change of `key` from `old` to `new` only says where the same shards lie."""
    if not same_data or key not in LOCATIONS:
        return False
    return key == "data.shards" or _shown(_without_locations(old)) == _shown(_without_locations(new))


def same_training_data(saved: dict[str, Any] | None, current: dict[str, Any]) -> bool:
    """Whether the training data read is the tag's as far as the records tell (True where either lacks `DATA`)."""
    old, new = (saved or {}).get(DATA), current.get(DATA)
    if old is None or new is None:
        return True
    old_content, new_content = (saved or {}).get(CONTENT), current.get(CONTENT)
    return old == new and (old_content is None or new_content is None or old_content == new_content)


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[Change]:
    """Every compared key whose value differs (a key one side lacks reads as null), in key order; a location's
    change is `moved` where both records name the same training data."""
    old, new = flatten(saved), flatten(current)
    same_data = saved.get(DATA) is not None and saved.get(DATA) == current.get(DATA)
    if saved.get(CONTENT) is not None and current.get(CONTENT) is not None:  # both know their tars' bytes
        same_data = same_data and saved.get(CONTENT) == current.get(CONTENT)
    keys = sorted(k for k in old.keys() | new.keys() if not _under(k, NOT_COMPARED))
    # With sources, data.shards gives only the held-out images: the same training data is no move of them.
    other_heldout = (bool(new.get("data.sources")) and None not in (saved.get(HELDOUT), current.get(HELDOUT))
                     and saved.get(HELDOUT) != current.get(HELDOUT))
    changes = [Change(k, old.get(k), new.get(k), _moved(k, old.get(k), new.get(k), same_data),
                      heldout_only=k == "data.shards" and other_heldout) for k in keys
               if _shown(old.get(k)) != _shown(new.get(k))]
    # A set converted again where it was: no location key changed, so only the record tells the data apart.
    rebuilt = saved.get(DATA) is not None and current.get(DATA) is not None and not same_data
    # Another split or data.heldout is refused by its own key; the tail's size (`TAIL_SIZE`) changes no key that
    # is refused, yet moves the cut: named as what changed the samples, not as a set converted again.
    if rebuilt and not any(c.key in LOCATIONS or c.key in SPLIT_CHOICE for c in changes):
        key = "data.sources" if new.get("data.sources") else "data.shards"
        cut = "; ".join(str(c) for c in changes if c.key in TAIL_SIZE)
        same_tars = saved.get(CONTENT) is not None and saved.get(CONTENT) == current.get(CONTENT)
        uncut = _read_by(saved, current.get(UNCUT))  # the checkpoint read these sources whole, the tail with them
        earlier = _read_by(saved, current.get(EARLIER_CUT))
        changes.append(Change(key, old.get(key), new.get(key), rebuilt=True, cut=cut, same_tars=same_tars,
                              earlier_cut=earlier, uncut=uncut))
    return changes


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
        located = [c.key for c in changes if c.refused and c.key in LOCATIONS and not c.rebuilt]  # rebuilt says why
        why = ""
        if located and saved.get(DATA) is None:
            why = (f" ({where} was saved before checkpoints recorded their data, so the same shards moved elsewhere "
                   f"cannot be told from other ones)")
        elif located:
            why = (f" ({', '.join(located)}: not the checkpoint's shards; their names, sizes, sample counts, "
                   "weights or contents differ)")
        return Verdict(changes, refusal=(
            f"{where} was trained with another recipe: {'; '.join(loss)} would change what the loss means at the "
            f"same step{why} (all changes: {listed}); resume with the checkpoint's values (its {RECORD} records them), "
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


def as_record(resolved, data=None, heldout: dict[str, str] | None = None) -> dict[str, Any]:
    """What a tag records: the resolved configuration (config.ResolvedConfig.to_dict), as YAML writes it, and, given
    the training data read (`data`, a ShardMixture), its `data_identity` under `DATA`; `heldout`: the images it
    scores (`heldout_record`)."""
    record = yaml.safe_load(yaml.safe_dump(resolved.to_dict(), sort_keys=False))
    record.update(heldout or {})
    if data is not None:
        record[DATA] = data_identity(data)
        content = data_content(data)
        if content is not None:
            record[CONTENT] = content
    return record


# What sets the learning rate of a step: a change of one of these moves the lr at the step a resume goes on from.
SCHEDULE = ("schedule", "optim.base_learning_rate", "optim.width_lr_base")


def schedule_note(changes: tuple[str, ...], step: int, before: float | None, after: float, total_steps: int
                  ) -> str | None:
    """What a resume with another schedule or learning rate does to the lr (None where neither changed): the new
    schedule applies from the resumed step on, so extending a finished cosine (more epochs) goes on at the new
    schedule's lr there, not from where the old one ended. `changes`: the plan's config_changes (`key old -> new`);
    `before`: the lr the checkpoint's step ran at (its metrics.csv row; None where not logged); `after`: the next
    step's under the new schedule."""
    keys = [change.split(" ", 1)[0] for change in changes]
    if not any(_under(key, SCHEDULE) for key in keys):
        return None
    return f"the learning rate follows the new schedule from step {step + 1} on: {_lr_move(step, before, after)}" \
           f" of {total_steps}{_jump(before, after)}"


def _lr_move(step: int, before: float | None, after: float) -> str:
    was = f"{before:.3g} at step {step} under the checkpoint's, " if before is not None else ""
    return f"{was}{after:.3g} at step {step + 1}"


def _jump(before: float | None, after: float) -> str:
    if before is not None and before > 0 and after == 0:
        return " (to 0)"
    if before is not None and before > 0 and not 0.5 <= after / before <= 2:
        return f" ({after / before:.3g}x)"
    if before == 0 and after > 0:
        return " (from 0)"
    return ""


def continuation_note(step: int, saved_total: int | None, total_steps: int, before: float | None, after: float,
                      how: str) -> str | None:
    """What a resume under a schedule of another length than the checkpoint's does (None where the length is the
    same, or the checkpoint did not record it): the same command again with more epochs in a finished run's folder
    continues that run, which read like a new run started, only run.json saying otherwise. DeepSpeed's
    WarmupCosineLR keeps nothing of the checkpoint but its step count (`last_batch_iteration`): the warm-up and
    cosine are the new length's, taken up at the resumed step, not the old curve's end stretched. `before`, `after`:
    as `schedule_note`; `how`: the way to a new run in this folder (run_folder.way_out)."""
    if saved_total is None or saved_total == total_steps:
        return None
    return (f"continuing the earlier run from its checkpoint at step {step} of its {saved_total}-step schedule, now "
            f"{total_steps} steps long (not a new run): the learning rate's warm-up and cosine are recomputed over "
            f"{total_steps} steps and taken up at step {step + 1} (the checkpoint keeps only the scheduler's step "
            f"count): lr {_lr_move(step, before, after)}{_jump(before, after)}; to train a new {total_steps}-step "
            f"run from the start instead, {how}")
