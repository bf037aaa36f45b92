"""Entry point for `mixmae shards ...` as a plain script (for job schedulers that want a file path)."""

import sys

from mixmae_scale.cli import main

if __name__ == "__main__":
    sys.exit(main(["shards", *sys.argv[1:]]))
