"""Builds the two C++ ops DeepSpeed compiles on first use on a CPU host, so no test pays for them.

The shared-memory all-reduce (every multi-rank run on the CPU accelerator, about 30 s to build) and the CPU
Adam of ZeRO-Offload (about 55 s) are JIT builds cached under ~/.cache/torch_extensions. `.ci/run` starts
this in the background with one compile job while the single-threaded unit tests leave a core idle; a test
that needs an op before it is ready waits on torch's build lock instead of building it a second time.
"""

import os
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder  # noqa: E402

for builder in (ShareMemCommBuilder(), CPUAdamBuilder()):
    start = time.perf_counter()
    builder.load(verbose=False)
    print(f"[ci] DeepSpeed op {builder.name} ready in {time.perf_counter() - start:.0f} s", flush=True)
