"""Builds the C++ op DeepSpeed compiles on first use on a CPU host, so no test pays for it.

The CPU Adam of ZeRO-Offload (about 55 s) is a JIT build cached under ~/.cache/torch_extensions. `.ci/run`
starts this in the background with one compile job, at the lowest CPU priority, while the single-threaded unit tests
leave a core idle: it takes only CPU time no test wants. Only the ZeRO-3 offload test of test_elastic.py needs the
op; if it gets there first it waits on torch's build lock (the build then has the CPU) instead of building it twice.
(DeepSpeed's shared-memory all-reduce op is not built at all: engine/distributed.py keeps CPU runs off it.)
"""

import os
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from deepspeed.ops.op_builder.cpu import CPUAdamBuilder  # noqa: E402

for builder in (CPUAdamBuilder(),):
    start = time.perf_counter()
    builder.load(verbose=False)
    print(f"[ci] DeepSpeed op {builder.name} ready in {time.perf_counter() - start:.0f} s", flush=True)
