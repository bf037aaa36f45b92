"""`python -m mixmae_scale.cli`: how the deepspeed launcher and torchrun start a rank."""

import gc
import sys

from mixmae_scale.cluster.signal_relay import restore_sigterm

restore_sigterm()  # before the slow imports: under the relay a rank is started with SIGTERM ignored

from mixmae_scale.cli import main  # noqa: E402

code = main()
# The interpreter's final collections walk every torch, DALI and DeepSpeed object still alive: about 2 s per
# process on a CPU, for nothing, since the process is ending. Frozen objects are left to the operating system.
gc.freeze()
sys.exit(code)
