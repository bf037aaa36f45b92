"""`python -m mixmae_scale.cli`: how the deepspeed launcher and torchrun start a rank."""

import sys

from mixmae_scale.cli import main

sys.exit(main())
