"""`precision.dtype: auto` and the warnings for emulated dtypes, on described hardware (the decision
must be right on machines CI does not have: V100s, AVX2-only CPUs) and on this machine."""

from __future__ import annotations

import pytest
import torch

from mixmae_scale.config import load_resolved
from mixmae_scale.config.deepspeed_config import build_deepspeed_config
from mixmae_scale.config.precision import Hardware, choose_precision, detect_hardware

H100 = Hardware("cuda", "NVIDIA H100", native_bf16=True, native_fp16=True)
V100 = Hardware("cuda", "Tesla V100", native_bf16=False, native_fp16=True)
AVX512_CPU = Hardware("cpu", "this CPU", native_bf16=True, native_fp16=True)
AVX2_CPU = Hardware("cpu", "this CPU", native_bf16=False, native_fp16=False)


@pytest.mark.parametrize("hardware, expected", [(H100, "bf16"), (V100, "fp16"), (AVX512_CPU, "bf16"),
                                                (AVX2_CPU, "fp32")])
def test_auto_picks_the_fastest_native_format(hardware, expected):
    choice = choose_precision("auto", hardware)
    assert choice.dtype == expected and choice.warning is None
    assert choice.reason.startswith("auto:") and hardware.name in choice.reason


def test_auto_reaches_the_deepspeed_config_as_the_chosen_dtype():
    for hardware, bf16, fp16 in ((H100, True, False), (V100, False, True), (AVX2_CPU, False, False)):
        ds = build_deepspeed_config(load_resolved("swin_b", hardware=hardware))
        assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (bf16, fp16), hardware
        if fp16:  # dynamic loss scaling, as the official fp16 training on V100s
            assert ds["fp16"]["loss_scale"] == 0


def test_an_explicit_emulated_dtype_is_kept_with_a_warning_naming_the_slowdown():
    choice = choose_precision("bf16", AVX2_CPU)
    assert choice.dtype == "bf16" and "100x slower" in choice.warning and "precision.dtype=auto" in choice.warning
    assert choose_precision("bf16", H100).warning is None
    assert choose_precision("fp32", AVX2_CPU).warning is None
    assert "DeepSpeed's CPU accelerator" in choose_precision("fp16", AVX512_CPU).warning


def test_this_machine_gets_bf16_exactly_when_onednn_computes_it_natively():
    resolved = load_resolved("tiny")
    native = torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolved.derived.dtype == ("bf16" if native else "fp32"), resolved.derived.dtype_reason
    assert resolved.config.precision.dtype == "auto"  # the request is kept next to the choice


def test_auto_is_fp32_where_onednn_is_held_to_avx2():
    """The decision on a CPU without AVX-512, made for real rather than on a described `Hardware`: oneDNN held to
    AVX2 (ONEDNN_MAX_CPU_ISA, as tests/integration/test_elastic.py runs a resume) reports no native bf16, and
    `auto` must then resolve to fp32 (bf16 would be emulated, ~100x slower). On a machine with AVX-512 this is
    the opposite of what the test above finds in-process; the GPUs are hidden so that the CPU decides."""
    import os
    import subprocess
    import sys

    code = ("import torch\nfrom mixmae_scale.config import load_resolved\n"
            "print(bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))\n"
            "print(load_resolved('tiny').derived.dtype)\n")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "fp32"], result.stdout


def test_planning_assumes_gpus_not_the_cpu_that_plans():
    from mixmae_scale.cluster.plan import planning_dtype

    resolved = load_resolved("swin_b", hardware=AVX2_CPU)
    assert resolved.derived.dtype == "fp32"
    assert planning_dtype(resolved) == ("fp16" if torch.cuda.is_available() and
                                        not detect_hardware("cuda").native_bf16 else "bf16")


def test_config_show_says_what_was_chosen_and_warns_for_emulation(capsys, monkeypatch):
    from mixmae_scale.cli import main
    from mixmae_scale.config import precision

    monkeypatch.setattr(precision, "detect_hardware", lambda device=None: AVX2_CPU)
    monkeypatch.setattr("mixmae_scale.config.derive.detect_hardware", lambda device=None: AVX2_CPU)
    assert main(["config", "show", "--profile", "tiny", "--set", "precision.dtype=bf16", "batch.micro=8"]) == 0
    err = capsys.readouterr().err
    assert "precision: bf16 (precision.dtype=bf16 set explicitly)" in err and "100x slower" in err
    assert main(["config", "show", "--profile", "tiny", "--json"]) == 0
    captured = capsys.readouterr()
    assert "precision: fp32 (auto: this CPU has no native bf16" in captured.err
    assert '"micro_batch": 16' in captured.out


def test_set_takes_several_pairs_at_once(capsys):
    from mixmae_scale.cli import main

    assert main(["config", "show", "--profile", "tiny", "--set", "batch.micro=8", "logging.every_steps=5",
                 "--set", "run.seed=3", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"micro_batch": 8' in out and '"every_steps": 5' in out and '"seed": 3' in out
    assert main(["config", "show", "--profile", "tiny", "--set", "batch.micro=8", "tiny"]) == 2
    assert "put positional arguments before --set" in capsys.readouterr().err
