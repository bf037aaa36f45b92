"""`mixmae probe`'s memory formula (finetune/probe.py: `encoder_activation_bytes`, `linear_fit_bytes`) against the
bytes a real encoding and a real L-BFGS fit hold at their peak, in a fresh process.

The peak is glibc's bytes in use (mallinfo2: arena blocks plus mapped ones) after every op, above what was in use
before, with Python's garbage collector off inside the window; one intra-op thread. Only ops' results that are
alive between ops are seen, not a kernel's scratch inside one. This is a measurement of the allocator's view on
the machine it runs on, which is why it is a script and not a unit test: inside the whole unit suite (other
tests' state in the same process) the first fit below measured 20.9 MB against 22.0 MB alone (the same data
and a fit from zero weights; the cause was not found). The unit test checks the formula's arithmetic.

    python benchmarks/probe_memory.py --out results/probe_memory_cpu.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mixmae_scale.atomic_file import write_text
from mixmae_scale.finetune.probe import (
    build_encoder,
    encoder_activation_bytes,
    fit_linear,
    linear_fit_bytes,
    readout_features,
)

RESULTS = Path(__file__).resolve().parent / "results"


class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


_mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2  # glibc 2.33 or later
_mallinfo2.restype = Mallinfo2


def bytes_in_use() -> int:
    info = _mallinfo2()
    return info.uordblks + info.hblkhd


class Peak(TorchDispatchMode):
    """The most bytes in use after any op inside the window, above the bytes in use when it opened."""

    def __enter__(self):
        gc.collect()
        gc.disable()
        self.start = self.peak = bytes_in_use()
        return super().__enter__()

    def __exit__(self, *exc):
        gc.enable()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, bytes_in_use())
        return out

    @property
    def held(self) -> int:
        return self.peak - self.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "probe_memory_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []

    arch = dict(img_size=64, patch_size=4, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 4], window_size=[4, 4, 4])
    model = build_encoder(None, arch, 10, 0).eval()
    images = torch.randn(16, 3, 64, 64)
    with torch.no_grad():
        readout_features(model.encoder.stage_maps(images))  # once before: what is made once is not counted
        with Peak() as encoding:
            readout_features(model.encoder.stage_maps(images))
    rows.append({"phase": "encoding", "setting": "64 px, embed 16, depths 2-2-2, batch 16",
                 "counted": encoder_activation_bytes(arch, 16), "measured": encoding.held})

    generator = torch.Generator().manual_seed(0)

    def fit(train: int, inputs: int, classes: int) -> int:
        labels = torch.randint(0, classes, (train,), generator=generator)
        centres = torch.randn(classes, inputs, generator=generator)
        features = torch.randn(train, inputs, generator=generator) + centres[labels]
        with Peak() as peak:
            fit_linear(features, labels, classes, max_iter=30)
        return peak.held

    fit(10, 20, 5)  # once before, as above
    # L-BFGS's vectors the most (fewer images than inputs: its 20 pairs are all kept in 30 iterations), then the
    # logits the most
    for train, inputs, classes in ((50, 2000, 50), (40_000, 20, 50)):
        rows.append({"phase": "linear fit", "setting": f"{train} images x {inputs} inputs x {classes} classes, "
                     "30 L-BFGS iterations", "counted": linear_fit_bytes(train, inputs, classes),
                     "measured": fit(train, inputs, classes)})

    print(f"{'phase':<11} {'setting':<58} {'counted MB':>10} {'measured MB':>11} {'ratio':>6}")
    for row in rows:
        row["counted_over_measured"] = round(row["counted"] / row["measured"], 4)
        print(f"{row['phase']:<11} {row['setting']:<58} {row['counted'] / 1e6:>10.2f} {row['measured'] / 1e6:>11.2f} "
              f"{row['counted_over_measured']:>6.3f}")
    write_text(args.out, json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                                     "threads": 1, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
