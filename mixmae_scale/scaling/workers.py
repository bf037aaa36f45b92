"""Runs side by side on one device: the queue workers take runs from (in `start_order`), the worker processes
(`in_process`) that run them, and stopping them all on a signal (`SweepStop`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading

from mixmae_scale.scaling.in_process import MARKER, DeviceShare
from mixmae_scale.scaling.spec import PlannedRun

# What a run costs on one GPU, for the order runs start in: a fixed cost per optimizer step plus its FLOPs at the rate
# the real loop reached on Swin-B, both from the H100 run in benchmarks/results/gpu_fast_step/loop_overhead.json
# (Swin-B, batch 64, bf16). The overhead is the real loop's time per step over the bare step's:
# 64/499.8 - 64/794.3 images/s = 0.047 s. The rate is the real loop's 499.8 images/s x 1.14e11 training FLOPs per
# Swin-B image at 224 px (6 x 19.0 GMACs of the pretraining forward, encoder and decoder: models/flops.py's
# train_flops_per_image, `mixmae model info --size base`, benchmarks/results/attention_flops.json) = 5.7e13 FLOP/s.
STEP_OVERHEAD_S = 0.047


FLOP_RATE = 5.7e13


def estimated_seconds(run: PlannedRun) -> float:
    return run.steps * STEP_OVERHEAD_S + run.flops / FLOP_RATE


def start_order(run: PlannedRun) -> tuple[float, float]:
    """Iso-FLOP budgets from the smallest, each budget's runs longest first; a grid's runs longest first.

    Longest first keeps a long run started last from holding up the end. Budgets in turn make a sweep cut short
    (a time limit, a device lent for minutes) leave whole iso-FLOP curves, each a result, rather than parts of every
    curve; that costs the gap a budget's long runs leave at its end. For the GPU study, simulated from its cost
    estimate (benchmarks/results/sweep_schedule_gpu_iso_flop.json): 441 s instead of 316 s, but at 1.5x the
    estimate 4 whole curves by 390 s instead of none."""
    return (run.budget or 0.0, -estimated_seconds(run))


class RunQueue:
    """The runs still to start, shared by the workers: each takes the next when it is free, until it is stopped."""

    def __init__(self, items: list[tuple[int, PlannedRun]]) -> None:
        self._items, self._lock, self.stopped = list(items), threading.Lock(), False

    def take(self) -> tuple[int, PlannedRun] | None:
        with self._lock:
            return self._items.pop(0) if self._items and not self.stopped else None

    def stop(self) -> None:
        with self._lock:
            self.stopped = True

    def left(self) -> int:
        with self._lock:
            return len(self._items)


class SweepStop:
    """Ctrl-C, or a SIGTERM to the sweep's own process (`kill PID`), while runs are under way: no run starts after it,
    and each worker process is sent SIGTERM, on which its run saves at the next step boundary and ends
    (engine/preemption.py); the sweep then says what ran, stopped and did not start. Before, the main thread's
    KeyboardInterrupt left the workers' threads to start every remaining run (a Ctrl-C ran the sweep to its end, then
    printed a traceback), and a SIGTERM killed the sweep alone, its workers training on, orphaned."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, queue: RunQueue) -> None:
        self.queue, self.signal = queue, None
        self._processes: set[subprocess.Popen] = set()
        self._lock = threading.RLock()  # a second signal runs the handler again inside the first

    def __call__(self, signum: int, frame: object = None) -> None:
        self.signal = signum
        self.queue.stop()
        with self._lock:
            for process in list(self._processes):
                _terminate(process)

    def started(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._processes.add(process)
            if self.signal is not None:  # started as the signal came
                _terminate(process)

    def ended(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._processes.discard(process)

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    @contextlib.contextmanager
    def installed(self):
        """Its handlers for SIGINT and SIGTERM while the runs are under way (Python runs handlers in the main thread
        only: elsewhere, as in a thread of a caller's own, nothing is installed)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        before = {sig: signal.signal(sig, self) for sig in self.SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)


def _terminate(process: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):  # already gone
        process.send_signal(signal.SIGTERM)


WORKER = [sys.executable, "-m", "mixmae_scale.scaling.in_process"]


def worker(queue: RunQueue, share: DeviceShare, job_args, finished, command: list[str] = WORKER,
            stop: SweepStop | None = None) -> None:
    """One slot of the device: a process (`in_process`) takes runs from `queue` one at a time, up to
    `share.per_process`, then a fresh one takes over, until the queue is empty (or stopped). Each run is reported by
    `finished` as its marker arrives, with the output it printed (shown when it failed); a run whose process died is
    reported failed, and the next run gets a new process. `stop` is told of each process, to signal it."""
    item = queue.take()  # taken before a process starts: no process is started for an empty queue
    while item is not None:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env={**os.environ, "OMP_NUM_THREADS": str(share.threads)})
        if stop is not None:
            stop.started(process)
        try:
            for _ in range(share.per_process):
                index, run = item
                code, wall_s, output = run_in(process, run, job_args(run))
                finished(index, run, code, wall_s, output)
                item = queue.take()
                if item is None or process.poll() is not None:
                    break
        finally:
            with contextlib.suppress(OSError):
                process.stdin.close()
            process.stdout.read()  # drained: a process that prints on its way out must not block on a full pipe
            process.wait()
            if stop is not None:
                stop.ended(process)


def exit_reason(code: int) -> str:
    """How a run's worker ended, for the sweep's lines: a process killed by a signal has a negative code (Popen's
    -9), which "exit -9" made read as the run's own status. The signal is named, not its cause: SIGKILL comes from
    the kernel's OOM killer, `kill -9` or a scheduler past its grace time alike, and the code cannot tell which."""
    if code >= 0:
        return f"exit {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:  # a number this platform names no signal for
        return f"killed by signal {-code}"


def run_in(process: subprocess.Popen, run: PlannedRun, args: list[str]) -> tuple[int, float, str]:
    """Hands `run` to the worker process and reads its output up to the run's marker: (exit code, wall s, output).
    The marker is looked for anywhere in a line: output written without a newline must not hide it."""
    output: list[str] = []
    try:
        process.stdin.write(json.dumps({"run_id": run.run_id, "args": args}) + "\n")
        process.stdin.flush()
    except OSError:  # the process has died (its output says why)
        return process.wait() or 1, 0.0, process.stdout.read()
    for line in process.stdout:
        at = line.find(MARKER)
        if at < 0:
            output.append(line)
            continue
        output.append(line[:at])
        _, run_id, code, wall_s = line[at:].split()
        if run_id == run.run_id:
            return int(code), float(wall_s), "".join(output)
    return process.wait() or 1, 0.0, "".join(output)  # died during the run
