"""`python -m mixmae_scale`: the `mixmae` command, for an environment whose scripts folder is not on PATH."""

import sys

from mixmae_scale.cli import main

sys.exit(main())
