"""Test-only hook: with MIXMAE_TEST_SHARD_DELAY set, each shard write sleeps first, so that a test can
kill the converter part-way through a run. Loaded only through PYTHONPATH in that test."""

import os

if os.environ.get("MIXMAE_TEST_SHARD_DELAY"):
    import time

    from mixmae_scale.shards import writer

    _write_shard = writer.write_shard
    _delay = float(os.environ["MIXMAE_TEST_SHARD_DELAY"])

    def _slow_write_shard(*args, **kwargs):
        time.sleep(_delay)
        return _write_shard(*args, **kwargs)

    writer.write_shard = _slow_write_shard
