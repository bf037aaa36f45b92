"""A resume's universal conversion meets the signals a preemption sends (engine/checkpointing/universal.py): the
converter runs shielded from the rank's stop signals and finishes, so that the rank's own stop flag decides; a
converter that dies of a signal all the same is named so, and is not a refused input (exit 1, not 2). A stand-in
`deepspeed.checkpoint.ds_to_universal`, first on the converter's PYTHONPATH only (this process keeps the real
DeepSpeed), does what a preemption does to the real one."""

from __future__ import annotations

import os
import signal
import sys
import textwrap

import pytest

from mixmae_scale.cli.failure_report import is_refused_input
from mixmae_scale.engine.checkpointing import store, universal
from mixmae_scale.engine.runtime import EXIT_FAILED, exit_code

STAND_IN = """
import argparse, os, signal, sys, time
parser = argparse.ArgumentParser()
parser.add_argument("--input_folder")
parser.add_argument("--output_folder")
args, _ = parser.parse_known_args()
how = os.environ["STAND_IN_DOES"]
if how == "preempted":  # as a job's preemption: its process group signalled, then every process of the step by id
    os.killpg(0, signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
elif how == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
os.makedirs(os.path.join(args.output_folder, "zero"), exist_ok=True)
with open(os.path.join(args.output_folder, "zero", "fp32.pt"), "wb") as out:
    out.write(b"w" * 32)
"""


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    package = tmp_path / "stand_in" / "deepspeed" / "checkpoint"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "ds_to_universal.py").write_text(textwrap.dedent(STAND_IN))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "stand_in"), os.environ.get("PYTHONPATH", "")]))
    ckpt_dir = tmp_path / "checkpoints"
    (ckpt_dir / "step00000004").mkdir(parents=True)
    return ckpt_dir


@pytest.fixture
def rank_stop_flag():
    """The rank's own handler (engine/preemption.StopFlag's): records the signals that reach this process."""
    seen: list[int] = []
    before = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    yield seen
    signal.signal(signal.SIGUSR1, before)


def test_a_preemption_signal_during_the_conversion_does_not_kill_it(stand_in, monkeypatch, rank_stop_flag):
    monkeypatch.setenv("STAND_IN_DOES", "preempted")
    folder = universal.convert_to_universal(stand_in, "step00000004")
    assert folder == stand_in / "step00000004.universal"
    assert store.damage(folder) is None and (folder / "zero" / "fp32.pt").read_bytes() == b"w" * 32
    assert rank_stop_flag == []  # its own session: the converter's process group is not the rank's


def test_a_converter_killed_by_a_signal_is_named_and_is_not_a_refused_input(stand_in, monkeypatch):
    monkeypatch.setenv("STAND_IN_DOES", "killed")
    with pytest.raises(universal.ConversionInterrupted) as killed:
        universal.convert_to_universal(stand_in, "step00000004")
    message = str(killed.value)
    assert "the converter was killed by SIGKILL (signal 9)" in message and "run the same command again" in message
    assert str(stand_in / "step00000004") in message
    assert not is_refused_input(killed.value) and exit_code(killed.value, is_refused_input(killed.value)) == EXIT_FAILED
    assert not (stand_in / "step00000004.universal.partial").exists()


def test_the_command_given_by_hand_is_the_plain_module_run(tmp_path):
    command = universal.converter_command(tmp_path, "step00000004", tmp_path / "out", 2)
    assert command[:3] == [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
