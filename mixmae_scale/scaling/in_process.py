"""Several runs of a sweep one after another in one process, and how many such processes share the device.

A tiny run's own work takes seconds; starting a process for it (importing torch, DeepSpeed and DALI)
costs more than that, so a sweep of many small runs spends most of its time starting. A worker started
once runs its share of the sweep through the same entry point as `mixmae pretrain`, one run after the
other: each run starts its own process group, seeds every generator from its own seed (engine/loop.py)
and builds its own model, optimizer and pipelines, so its result is the one a separate process gets
(tests/integration/test_scaling.py compares them). Between runs the worker drops what a run leaves in the
process (compiled graphs and their cache entries, freed CUDA blocks). The sweep hands a worker one run at a time
on its standard input, longest first from one queue shared by all workers, so a long run does not wait behind
a fixed batch of others; after each run the worker prints one line `MARKER run_id exit_code wall_s` for the sweep
to record the run and hand over the next.

On a GPU, `parallel` workers share the one device; `device_share` checks that their peak memory, as the
memory planner (cluster/plan.py) estimates it for the largest run, fits in the device's.

    python -m mixmae_scale.scaling.in_process < JOBS   # one {"run_id": ..., "args": [pretrain args]} per line
"""

from __future__ import annotations

import gc
import json
import sys
import time
from dataclasses import dataclass

from mixmae_scale.data.errors import plural

MARKER = "mixmae-sweep-run-done"
HEADROOM = 0.25  # of the device memory kept free: the planner under-estimated a real peak by up to 18%


@dataclass(frozen=True)
class DeviceShare:
    """How the runs of a sweep share this machine: `parallel` workers, each running `per_process` runs in turn."""

    device: str  # "cuda:0 (139.8 GiB)" or "2 CPU cores"
    parallel: int
    per_process: int
    threads: int  # CPU threads per worker
    peak_gib: float | None = None  # the largest run's planned peak, on a GPU

    def describe(self) -> str:
        memory = (f"; the largest run's planned peak is {self.peak_gib:.2f} GiB, {self.parallel} x that fits"
                  if self.peak_gib is not None else f", {plural(self.threads, 'thread')} each")
        per = "one process per run" if self.per_process == 1 else f"up to {self.per_process} runs per process"
        share = "shares" if self.parallel == 1 else "share"
        return f"{plural(self.parallel, 'run')} at a time {share} {self.device}{memory}; {per}"


def runs_that_fit(peak_gib: float, device_gib: float, headroom: float = HEADROOM) -> int:
    """How many runs of `peak_gib` each fit side by side in `device_gib`, keeping `headroom` of it free."""
    return int(device_gib * (1 - headroom) // peak_gib)


def device_share(spec, runs, parallel: int, per_process: int, cpu_count: int) -> DeviceShare:
    """`parallel` workers on this machine's device. On a GPU each worker is a CUDA context of its own: the
    largest run's planned peak (which counts one context's overhead) times `parallel` must fit, else a
    one-line error names the numbers and the largest `parallel` that fits."""
    import torch

    from mixmae_scale.config import ConfigError

    parallel, per_process = max(parallel, 1), max(per_process, 1)
    threads = max(1, cpu_count // parallel)
    if not torch.cuda.is_available() or not runs:
        return DeviceShare(plural(cpu_count, "CPU core"), parallel, per_process, threads)
    device_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    peak = max(planned_peak_gib(spec, run, device_gib) for run in _largest(runs))
    fits = runs_that_fit(peak, device_gib)
    if parallel > fits:
        raise ConfigError(f"--parallel {parallel}: {parallel} runs of up to {peak:.2f} GiB each (the memory plan of "
                          f"the largest) do not fit in {device_gib:.1f} GiB with {HEADROOM:.0%} kept free; use "
                          f"--parallel {max(fits, 1)} or fewer")
    return DeviceShare(f"cuda:0 ({device_gib:.1f} GiB)", parallel, per_process, threads, peak)


def _largest(runs):
    """The runs that decide the peak: the largest model, and the largest per-step batch (they are usually one)."""
    return {max(runs, key=lambda r: r.params).run_id: max(runs, key=lambda r: r.params),
            max(runs, key=lambda r: r.global_batch).run_id: max(runs, key=lambda r: r.global_batch)}.values()


def planned_peak_gib(spec, run, device_gib: float) -> float:
    from mixmae_scale.cluster.plan import plan
    from mixmae_scale.config import load_resolved

    resolved = load_resolved(spec.profile, overrides=list(run.overrides), world_size=1)
    return plan(resolved, spec.profile, gpus=1, gpu_mem_gib=device_gib, job="pretrain").total_gib


def main(jobs=sys.stdin) -> int:
    """Runs each job line of `jobs` as it comes, until it ends; a failed run is reported by its marker line, and
    the worker goes on to the next."""
    import signal

    from mixmae_scale.engine.preemption import record_early_stops

    # The terminal's Ctrl-C reaches every process of the group: the sweep turns it into a SIGTERM to each worker, on
    # which its run saves at the next step boundary; the SIGINT itself killed the run mid-step. A SIGTERM that comes
    # while a run starts (the imports, before its loop's StopFlag) is kept for that flag, as `mixmae pretrain` keeps it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    record_early_stops(["pretrain"])
    from mixmae_scale.cli import main as cli_main  # torch, DeepSpeed: seconds, under the handlers above

    for line in jobs:
        if not line.strip():
            continue
        job = json.loads(line)
        start = time.perf_counter()
        _forget_process_groups()
        try:
            code = cli_main(job["args"])
        except Exception as exc:  # noqa: BLE001 - one run's failure is its own; the worker goes on to the next
            print(f"mixmae: error: run {job['run_id']}: {type(exc).__name__}: {exc}", file=sys.stderr)
            code = 1
        try:
            _forget_compiled_code()
        except Exception as exc:  # noqa: BLE001 - the run's own result stands; the next run starts as it can
            print(f"mixmae: warning: after run {job['run_id']}: clearing compiled code failed: {exc}", file=sys.stderr)
        sys.stderr.flush()
        print(f"\n{MARKER} {job['run_id']} {code} {time.perf_counter() - start:.3f}", flush=True)
    return 0


def _forget_compiled_code() -> None:
    """A run's compiled graphs would stay cached under the code objects every run shares (a Swin block's forward):
    each new width adds entries until dynamo's recompile limit makes later runs fall back to eager without a word.
    The next run compiles for itself, as in a process of its own."""
    import torch

    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _forget_process_groups() -> None:
    """DeepSpeed keeps the process groups it derived (world, data parallel, ...) in module globals, which
    outlive the process group a finished run destroyed: the next run's engine would broadcast over a dead
    group. Re-executing that module restores every global to its state at import."""
    import importlib
    import sys as system

    module = system.modules.get("deepspeed.utils.groups")
    if module is not None:
        importlib.reload(module)


if __name__ == "__main__":
    code = main()
    gc.freeze()  # skip the interpreter's final collections: see mixmae_scale/cli/__main__.py
    sys.exit(code)
