"""Which floating-point format a run computes in, chosen for the hardware it runs on.

`precision.dtype: auto` (the default) picks bf16 where the device computes it natively, fp16 with
DeepSpeed's dynamic loss scaling on GPUs without bf16 (V100, T4: the official MixMAE code trained in
fp16 on V100s), and fp32 otherwise. The trap this avoids: x86 CPUs without AVX-512 (most laptops and
many cloud CPUs) emulate bf16, and a bf16 matmul there runs over 100x slower than fp32 (117x at 256 and 172x
at 1024 square on a 2-core AVX2 CPU: benchmarks/bf16_matmul.py, benchmarks/results/bf16_matmul_cpu.json), so a
bf16 default turned a 3-minute demo into 23 minutes (seen, not kept in a results file) and changed its numbers.

An explicit dtype is kept as asked, with a warning when this hardware emulates it. The choice is made
on the machine that runs the job (each rank decides the same way on identical nodes); `mixmae plan`,
which sizes GPUs from a login node, asks for the GPU answer instead of this machine's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Device = Literal["cuda", "cpu"]


@dataclass(frozen=True)
class PrecisionChoice:
    dtype: str  # bf16 | fp16 | fp32
    reason: str
    warning: str | None = None  # set when the requested dtype is emulated or unsupported here


@dataclass(frozen=True)
class Hardware:
    """What decides the choice; tests pass one in instead of detecting this machine's."""

    device: Device
    name: str
    native_bf16: bool
    native_fp16: bool


def detect_hardware(device: Device | None = None) -> Hardware:
    """This machine's accelerator (or CPU). `device="cuda"` without a visible GPU describes the GPUs a
    plan is made for (Ampere or newer: native bf16), since planning runs on login nodes."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            return Hardware("cuda", "a GPU with bf16 (Ampere or newer; assumed for planning)", True, True)
        name = torch.cuda.get_device_name()
        return Hardware("cuda", name, torch.cuda.is_bf16_supported(including_emulation=False), True)
    return Hardware("cpu", "this CPU", bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    bool(torch.ops.mkldnn._is_mkldnn_fp16_supported()))


def choose_precision(requested: str, hardware: Hardware) -> PrecisionChoice:
    where = hardware.name
    if requested == "auto":
        if hardware.native_bf16:
            return PrecisionChoice("bf16", f"auto: {where} computes bf16 natively")
        if hardware.device == "cuda":
            return PrecisionChoice("fp16", f"auto: {where} has no native bf16; fp16 with dynamic loss scaling")
        return PrecisionChoice("fp32", f"auto: {where} has no native bf16 (oneDNN reports it unsupported: no "
                                       "AVX-512), and emulated bf16 matmuls run over 100x slower than fp32")
    reason = f"precision.dtype={requested} set explicitly"
    warning = None
    if requested == "bf16" and not hardware.native_bf16:
        warning = (f"precision.dtype=bf16 on {where}, which has no native bf16: it is emulated, and a bf16 "
                   "matmul runs over 100x slower than fp32 (CPUs without AVX-512). Use precision.dtype=auto "
                   "(picks fp32 here) unless you mean to measure bf16 numerics")
    elif requested == "fp16" and hardware.device == "cpu":
        warning = (f"precision.dtype=fp16 on {where}: DeepSpeed's CPU accelerator does not train in fp16"
                   + ("" if hardware.native_fp16 else ", and oneDNN emulates it here")
                   + "; use precision.dtype=auto")
    return PrecisionChoice(requested, reason, warning)


def log_choice(log, dtype: str, reason: str, warning: str | None) -> None:
    """One line in the run log says what the run computes in and why; an emulated dtype warns."""
    log.info("precision: %s (%s)", dtype, reason)
    if warning:
        log.warning(warning)
