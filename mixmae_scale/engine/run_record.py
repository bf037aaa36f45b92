"""`run.json`: where a run came from, so that a point of a scaling study can be traced back and compared.

A loss is only comparable to another if the code, the libraries, the data and the layout behind both are
known. Rank 0 writes this record when a launch starts (so a run that dies still says what it was) and
completes it when the launch ends; a resume adds an entry and a launch, so the record covers the run's
whole life across stops, crashes and changes of world size. Writes are atomic (atomic_file.py).

Held here: the code (the git commit and whether the tree differed from it, or the installed version when the
package is not in a checkout), library versions, devices, driver and CUDA, the digest of every shard set
read, the command line, the world size and the precision chosen with its reason, the weights a fine-tuning started
from (for a run folder: which checkpoint and step), and each resume's step, old and new layout and time.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from mixmae_scale.engine import run_lock

RECORD = "run.json"
FORMAT = "mixmae-scale-run-record"
# Distributions whose versions change what a run computes or how fast; absent ones are left out.
PACKAGES = ("mixmae-scale", "torch", "torchvision", "deepspeed", "nvidia-dali-cuda130", "nvidia-dali-cuda120", "timm",
            "webdataset", "numpy", "safetensors", "wandb")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _git(folder: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def code_version(package_dir: Path | None = None) -> dict[str, Any]:
    """The commit and whether tracked files differ from it, when the package lives in a git checkout; otherwise
    the installed version. Untracked files are not counted: run folders and data often sit in the checkout."""
    import mixmae_scale

    folder = Path(package_dir or Path(mixmae_scale.__file__).parent).resolve()
    top = _git(folder, "rev-parse", "--show-toplevel")
    commit = _git(folder, "rev-parse", "HEAD") if top else None
    if not commit:
        return {"source": "installed", "version": mixmae_scale.__version__, "commit": None, "dirty": None}
    status = _git(folder, "status", "--porcelain", "--untracked-files=no")
    return {"source": f"git checkout {top}", "version": mixmae_scale.__version__, "commit": commit,
            "dirty": bool(status) if status is not None else None}


def describe_commit(code: dict[str, Any]) -> str:
    """Short form for tables: 12 hex digits, '+dirty' when the tree differed, or the installed version."""
    if not code.get("commit"):
        return f"v{code.get('version')}"
    return code["commit"][:12] + ("+dirty" if code.get("dirty") else "")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _driver_version() -> str | None:
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = result.stdout.strip().splitlines()
    return lines[0].strip() if result.returncode == 0 and lines else None


def platform_info(device_names: list[str]) -> dict[str, Any]:
    """`device_names`: one per rank (gathered by the caller), counted by model."""
    import torch

    counts: dict[str, int] = {}
    for name in device_names:
        counts[name] = counts.get(name, 0) + 1
    return {"python": platform.python_version(), "system": platform.platform(), "host": socket.gethostname(),
            "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available()
            else None, "driver": _driver_version() if torch.cuda.is_available() else None, "devices": counts,
            "device_count": len(device_names)}


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def split_digest(shards: list[dict[str, Any]]) -> str:
    """The content of a split: each shard's sha256 where the manifest has it (else its file name and size) and its
    sample count, in order. A subset that points into the full set, or the same set moved elsewhere, keeps it."""
    identity = [[s.get("sha256") or Path(str(s.get("name", ""))).name, s.get("bytes"), s.get("samples")]
                for s in shards]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def shard_set_digest(location: str, split: str, role: str) -> dict[str, Any]:
    """One shard set as read: the digest of its whole manifest and of the split used."""
    from mixmae_scale.data.manifest import read_manifest

    manifest = read_manifest(location)
    shards = manifest.get("splits", {}).get(split, {}).get("shards") or []
    return {"role": role, "location": str(location), "split": split,
            "manifest_sha256": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
            "split_digest": split_digest(shards), "shards": len(shards),
            "samples": sum(int(s.get("samples", 0)) for s in shards)}


def heldout_digest(heldout) -> dict[str, Any]:
    """The images a pretraining run scores its held-out loss on (data/heldout.HeldOut): a validation split, or the
    tail of the train split. Recorded from what was chosen, not from data.val_split: a set without that split (and
    data.heldout=train) recorded an empty "val", one digest for every such run, so a sweep whose data fractions
    hold out different tails could not see it. A whole split keeps `shard_set_digest`'s digest (rows recorded
    before stay comparable); a tail's digest covers its shards and the lines it starts at."""
    images = heldout.images
    entry = {**shard_set_digest(images.location, images.split, "held-out"), "train_tail": heldout.train_tail}
    if not heldout.train_tail:
        return entry
    identity = [[Path(name).name, size, samples, first] for name, size, samples, first
                in zip(images.names, images.bytes_per_shard, images.samples_per_shard, images.first_line, strict=True)]
    return {**entry, "split_digest": hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16],
            "shards": len(images.names), "samples": images.samples}


def data_read(config, heldout=None) -> list[dict[str, Any]]:
    """Every shard set a run reads: its training sets (one, or each of a mixture) and its held-out images (`heldout`:
    pretraining's data/heldout.HeldOut; otherwise the data.val_split of data.shards, which fine-tuning evaluates
    on)."""
    data = config.data
    train = [(s.shards, s.split or data.train_split) for s in data.sources] or [(data.shards, data.train_split)]
    entries = [shard_set_digest(location, split, "train") for location, split in train]
    if heldout is not None and heldout.images is None:  # a set too small to hold anything out: none read
        return entries
    return entries + [heldout_digest(heldout) if heldout is not None
                      else shard_set_digest(data.shards, data.val_split, "held-out")]


def data_digest(entries: list[dict[str, Any]], role: str = "held-out") -> str | None:
    """One digest for the sets of a role. The held-out split is what a scaling fit compares: every point's loss
    is measured on it, while the training subsets differ by data fraction by design."""
    digests = [e["split_digest"] for e in entries if e["role"] == role]
    return hashlib.sha256("|".join(digests).encode()).hexdigest()[:16] if digests else None


# What every record has from its first launch on (`RunRecord.begin`), and `describe` reads.
RECORD_KEYS = ("run", "job", "created", "status", "code", "packages", "platform", "data", "command", "world_size",
               "precision", "resumes", "launches")


def read_record(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RECORD
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path.resolve()}: not valid JSON ({exc}); it is rewritten at the next launch") from exc
    missing = [key for key in RECORD_KEYS if not isinstance(record, dict) or key not in record]
    if missing:
        raise ValueError(f"{path.resolve()}: not a run record (no {', '.join(missing)}); it is rewritten at the "
                         "next launch")
    return record


def gather_device_names(device) -> list[str]:
    """Collective: every rank's device model, so the record counts the whole job's devices, not rank 0's node."""
    import torch.distributed as dist

    names: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(names, device_name(device))
    return names


def command_line(argv: list[str] | None = None) -> str:
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith("__main__.py"):  # how the launchers start a rank: python -m mixmae_scale.cli
        argv = [sys.executable, "-m", "mixmae_scale.cli", *argv[1:]]
    return shlex.join(argv)


def resume_entry(plan, step: int, world: int, layout: dict[str, Any]) -> dict[str, Any]:
    """`plan`: engine/checkpointing/resume.py's ResumePlan."""
    return {"time": now(), "step": step, "checkpoint": plan.tag, "loaded": plan.load_tag, "universal": plan.universal,
            "old_layout": {"world_size": plan.saved_world, **(plan.saved_layout or {})},
            "new_layout": {"world_size": world, **layout}, "notes": list(plan.notes),
            "config_changes": list(plan.config_changes),
            **({"heldout_changed": plan.heldout_change} if plan.heldout_change else {})}


UNENDED = "ended without a record (killed, or failed)"


class RunRecord:
    """Rank 0's run.json. `begin` at a launch's start (after the resume is loaded), `finish` at its end."""

    def __init__(self, path: Path, record: dict[str, Any]) -> None:
        self.path, self.record = path, record

    @classmethod
    def begin(cls, ctx, run_kind: str, step: int, devices: list[str], argv: list[str] | None = None,
              heldout=None, init: dict[str, Any] | None = None) -> RunRecord:
        """`ctx`: engine/loop.py's RunContext; `run_kind`: the job's kind, "pretrain", "finetune" or "segment"
        (run.json's "job" key); `heldout`: the held-out images pretraining chose (data/heldout.HeldOut); `init`: where
        the weights a fine-tuning started from came from (the job's `started_from`: for a run folder, which checkpoint
        and step). A record from an earlier launch keeps its resumes, launches and init (a resume reads no init)."""
        try:
            earlier = read_record(ctx.root) or {}
        except ValueError:
            earlier = {}
        derived, code = ctx.resolved.derived, code_version()
        launch = {"started": now(), "command": command_line(argv), "world_size": ctx.world,
                  "commit": describe_commit(code), "start_step": step, "outcome": "running"}
        resumes = list(earlier.get("resumes", []))
        # An earlier launch still "running", where this one holds the folder's lock (engine/run_lock.py): that launch
        # is gone without reaching `finish` (killed, or failed); it read "running" for ever after. Unlocked (a file
        # system without flock, which the start warns of) it may be alive beside this one: left as it is.
        locked = run_lock.holds(ctx.root)
        launches = [{**old, "outcome": UNENDED} if locked and old.get("outcome") == "running" else old
                    for old in earlier.get("launches", [])]
        init = init or earlier.get("init")  # a resume reads no init: the first launch's record of it stays
        if ctx.resume is not None:
            resumes.append(resume_entry(ctx.resume, step, ctx.world, ctx.layout))
        record = {"format": FORMAT, "version": 1, "run": ctx.root.name, "job": run_kind,
                  "created": earlier.get("created", launch["started"]), "status": "running", "code": code,
                  "packages": package_versions(), "platform": platform_info(devices),
                  "data": data_read(ctx.config, heldout), **({"init": init} if init else {}),
                  "command": launch["command"], "world_size": ctx.world, "total_steps": derived.total_steps,
                  "precision": {"dtype": derived.dtype, "reason": derived.dtype_reason,
                                "warning": derived.dtype_warning},
                  "layout": ctx.layout, "resumes": resumes, "launches": [*launches, launch]}
        made = cls(ctx.root / RECORD, record)
        made.write()
        return made

    def finish(self, summary: dict[str, Any]) -> None:
        """`summary`: the loop's. Outcome: completed (the schedule's last step), stopped by a signal, or ended at
        --max-steps."""
        if summary["steps"] >= self.record["total_steps"]:  # first: a signal during the last step stops nothing
            outcome = "completed"
        elif summary.get("stopped_by_signal"):
            outcome = "stopped by a signal"
        else:
            outcome = "ended at --max-steps" if summary["steps"] >= summary["planned_steps"] else "ended early"
        self.record["launches"][-1].update(ended=now(), outcome=outcome, end_step=summary["steps"])
        self.record["status"] = outcome
        self.record["end"] = {key: summary.get(key) for key in ("steps", "planned_steps", "images_seen", "wall_s",
                                                                 "images_per_s", "checkpoint")}
        # The job's own end-of-run measurements (pretraining's held-out losses), where it has them.
        self.record["end"].update({key: summary[key] for key in ("heldout_loss_start", "heldout_loss_end")
                                   if key in summary})
        self.write()

    def write(self) -> None:
        from mixmae_scale.atomic_file import write_text

        write_text(self.path, json.dumps(self.record, indent=2, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)


def point_provenance(record: dict[str, Any] | None) -> dict[str, Any]:
    """What a scaling point carries into results.jsonl: the commits its launches ran (more than one where a resume
    ran newer code) and its data digest."""
    if record is None:
        return {"commit": None, "data_digest": None}
    commits = sorted({launch["commit"] for launch in record.get("launches", [])}) or [describe_commit(record["code"])]
    return {"commit": ",".join(commits), "data_digest": data_digest(record.get("data", []))}


def describe(record: dict[str, Any]) -> str:
    """`mixmae runs show`: the record as lines a person reads."""
    code, precision, hw = record["code"], record["precision"], record["platform"]
    devices = ", ".join(f"{count} x {name}" for name, count in hw["devices"].items())
    lines = [f"run {record['run']} ({record['job']}): {record['status']}, created {record['created']}",
             f"code:       {describe_commit(code)} ({code['source']}, mixmae-scale {code['version']})",
             "packages:   " + ", ".join(f"{name} {version}" for name, version in record["packages"].items()),
             f"platform:   {hw['system']}, Python {hw['python']}, host {hw['host']}",
             f"devices:    {devices}; torch built for CUDA {hw['torch_cuda'] or '-'}, driver {hw['driver'] or '-'}",
             f"command:    {record['command']}",
             f"world size: {record['world_size']}; precision {precision['dtype']}: {precision['reason']}"
             + (f" (warning: {precision['warning']})" if precision.get("warning") else ""),
             "data:"]
    lines += [f"  {d['role']:<9} {d['location']} [{d['split']}]: {d['shards']} shards, {d['samples']} samples, "
              f"split digest {d['split_digest']}, manifest sha256 {d['manifest_sha256'][:16]}" for d in record["data"]]
    if record.get("init"):
        lines.append(f"init:       {init_text(record['init'])}")
    lines.append(f"launches ({len(record['launches'])}):")
    unended = "(no end recorded: running, or ended by an error or a kill)"
    lines += [f"  {launch['started']} -> {launch.get('ended', unended)}: steps {launch['start_step']} -> "
              f"{launch.get('end_step', '?')}, {launch['outcome']}, world size {launch['world_size']}, code "
              f"{launch['commit']}" for launch in record["launches"]]
    lines.append(f"resumes ({len(record['resumes'])}):" if record["resumes"] else "resumes: none")
    for resume in record["resumes"]:
        old, new = resume["old_layout"], resume["new_layout"]
        changed = [f"{key} {old.get(key)} -> {new.get(key)}" for key in sorted(set(old) | set(new))
                   if old.get(key) != new.get(key)]
        lines.append(f"  {resume['time']}: step {resume['step']} from {resume['checkpoint']}, "
                     + ("layout " + ", ".join(changed) if changed else f"same layout ({_layout_text(new)})")
                     + (" (through DeepSpeed's universal checkpoint)" if resume["universal"] else ""))
    return "\n".join(lines)


def init_text(init: dict[str, Any]) -> str:
    """`finetune.init=/runs/mixmae-b: checkpoint step00000405 (step 405)`: the weights a run started from."""
    checkpoint = f": checkpoint {init['tag']} (step {init.get('step')})" if init.get("tag") else ""
    return f"{init['key']}={init['path']}{checkpoint}"


def _layout_text(layout: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in layout.items())
