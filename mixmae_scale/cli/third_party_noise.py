"""Messages from DeepSpeed and PyTorch that tell a user of this toolkit nothing, filtered once per
process before either library is imported.

Each line below was printed by every rank of every CPU run (the quickstart printed eight of them) and
none asks the user to do anything: DeepSpeed falling back to its CPU accelerator (the run log says
which device it uses), its warm-up scheduler reading its own learning rate before step 0, PyTorch's
C++-extension loader noting that a CPU machine has no CUDA runtime, and DeepSpeed's ZeRO calling a
torch.distributed function that PyTorch has deprecated, and botocore saying where it found the AWS
credentials. Anything else still gets through.
"""

from __future__ import annotations

import logging
import re
import warnings

SILENCED = {
    "DeepSpeed": re.compile(r"Setting accelerator to CPU|Attempting to get learning rate from scheduler before it "
                            r"has started"),
    "torch.utils.cpp_extension": re.compile(r"No CUDA runtime is found"),
    "botocore.credentials": re.compile(r"Found credentials in "),  # every rank reading s3://, at INFO
}


class _DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def silence() -> None:
    for name, pattern in SILENCED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
