"""Test-only hooks, loaded only through PYTHONPATH in the tests that set their variables:
- MIXMAE_TEST_SHARD_DELAY: each shard write sleeps first, so that a test can kill the converter part-way through;
- MIXMAE_TEST_KILL_SHARD: the process that is to write the shard of this name kills itself by SIGKILL first, as the
  kernel's out-of-memory killer ends a pool worker (spawned workers start with the test's environment)."""

import os

if os.environ.get("MIXMAE_TEST_SHARD_DELAY") or os.environ.get("MIXMAE_TEST_KILL_SHARD"):
    import signal
    import time

    from mixmae_scale.shards import writer

    _write_shard = writer.write_shard
    _delay = float(os.environ.get("MIXMAE_TEST_SHARD_DELAY") or 0)
    _doomed = os.environ.get("MIXMAE_TEST_KILL_SHARD")

    def _hooked_write_shard(plan, *args, **kwargs):
        if plan.name == _doomed:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(_delay)
        return _write_shard(plan, *args, **kwargs)

    writer.write_shard = _hooked_write_shard
