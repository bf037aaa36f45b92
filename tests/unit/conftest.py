"""Unit tests compile nothing: a JIT C++ build (DeepSpeed's ops through torch's cpp_extension) costs 40-100 s on a
machine's first use, and a unit test that set one off unknowingly (DeepSpeed's shared-memory op, through
`deepspeed.init_distributed`) cost a CI run 68 s on an empty TORCH_EXTENSIONS_DIR while passing in 0.6 s wherever
an earlier run had left the op built. The integration test that needs a built op (ZeRO-Offload's CPU Adam) builds
it itself."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def no_jit_builds():
    import torch.utils.cpp_extension as cpp_extension

    def refused(name, *args, **kwargs):
        raise AssertionError(f"a unit test started a JIT C++ build of {name!r} (torch.utils.cpp_extension.load): "
                             "keep it off the op (engine/distributed.skip_shm_allreduce_op for DeepSpeed's "
                             "shared-memory op) or test it in tests/integration")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpp_extension, "load", refused)
        yield
