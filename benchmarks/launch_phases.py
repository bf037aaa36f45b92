"""A rank of `mixmae pretrain` with time stamps: what `launch_startup.py` starts through the deepspeed launcher
(`--module launch_phases`) instead of `mixmae_scale.cli`.

It runs the unchanged command line and records, per rank, when the process started (from /proc) and the first
call of each start-up step (its start and end), as each module is imported (an import hook wraps the functions
then, so nothing is imported earlier than the job itself imports it). At the end of the first optimizer step it
writes `<PHASES_OUT>/rank<r>.json`, then lets the run go on.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import json
import os
import sys
import time

WRAPPER_IMPORTED = time.time()
EVENTS: dict[str, tuple[float, float]] = {}

# module -> (attribute path, event name): the functions whose first call is timed. Missing ones are skipped, so the
# same wrapper times other commits of the project.
TIMED = {
    "mixmae_scale.engine.loop": [("start_run", "start_run"), ("compile_model", "compile_model"),
                                 ("TrainingLoop.__init__", "training_loop_init")],
    "mixmae_scale.engine.distributed": [("init", "init_distributed")],
    "mixmae_scale.models.mixmae": [("build_mixmae", "build_model")],
    "mixmae_scale.engine.optimizer": [("build_optimizer", "build_optimizer")],
    "mixmae_scale.pretrain.heldout_loss": [("heldout_loss", "heldout_loss")],
    "mixmae_scale.pretrain.job": [("PretrainJob.loss", "first_loss")],
    "mixmae_scale.visualize.snapshots": [("ReconstructionSnapshots.__init__", "snapshots_init")],
    "mixmae_scale.data.dali_pipeline": [("build_pipeline", "dali_pipeline_build")],
    "deepspeed": [("initialize", "deepspeed_initialize")],
    "deepspeed.runtime.engine": [("DeepSpeedEngine.step", "first_step")],
}


def _proc_start() -> float:
    """This process's start (wall clock), from /proc: the interpreter's own start-up included."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _write(rank: str) -> None:
    folder = os.environ.get("PHASES_OUT")
    if folder:
        record = {"rank": int(rank), "proc_start": _proc_start(), "wrapper_imported": WRAPPER_IMPORTED,
                  "events": EVENTS}
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)


def _timed(function, name: str):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.time()
        try:
            return function(*args, **kwargs)
        finally:
            if name not in EVENTS:
                EVENTS[name] = (start, time.time())
                if name == "first_step":
                    _write(os.environ.get("RANK", "0"))
    return wrapper


def _patch(module) -> None:
    for path, name in TIMED.get(module.__name__, []):
        owner, _, attribute = path.rpartition(".")
        target = getattr(module, owner, None) if owner else module
        if target is not None and hasattr(target, attribute):
            setattr(target, attribute, _timed(getattr(target, attribute), name))


class _Loader(importlib.abc.Loader):
    def __init__(self, inner) -> None:
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in TIMED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


sys.meta_path.insert(0, _Finder())

if __name__ == "__main__":
    from mixmae_scale.cli import main

    sys.exit(main())
