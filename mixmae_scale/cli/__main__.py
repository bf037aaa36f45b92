"""`python -m mixmae_scale.cli`: how the deepspeed launcher and torchrun start a rank."""

import gc
import sys

from mixmae_scale.cluster.signal_relay import restore_sigterm
from mixmae_scale.engine.preemption import record_early_stops

restore_sigterm()  # before the slow imports: under the relay a rank is started with SIGTERM ignored
# A rank's SIGUSR1/SIGTERM before the training loop's StopFlag (seconds of imports away) is kept for its first
# step boundary, not its death: Slurm's --signal=USR1@300 or scancel can come at any time.
record_early_stops(sys.argv[1:])

from mixmae_scale.cli import main  # noqa: E402

code = main()
# The interpreter's final collections walk every torch, DALI and DeepSpeed object still alive: about 2 s per
# process on a CPU, for nothing, since the process is ending. Frozen objects are left to the operating system.
gc.freeze()
sys.exit(code)
