"""`python -m mixmae_scale`: the `mixmae` command, for an environment whose scripts folder is not on PATH."""

import gc
import sys

from mixmae_scale.cli import main

code = main()
gc.freeze()  # skip the interpreter's final collections: see mixmae_scale/cli/__main__.py
sys.exit(code)
