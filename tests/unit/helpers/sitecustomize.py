"""Test-only hooks, loaded only through PYTHONPATH in the tests that set their variables:
- MIXMAE_TEST_SHARD_DELAY: each shard write sleeps first, so that a test can kill the converter part-way through;
- MIXMAE_TEST_KILL_SHARD: the process that is to write the shard of this name kills itself by SIGKILL first, as the
  kernel's out-of-memory killer ends a pool worker (spawned workers start with the test's environment);
- MIXMAE_TEST_KILL_TAR: likewise for the process that is to verify the tar of this name."""

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

if os.environ.get("MIXMAE_TEST_KILL_TAR"):
    import signal

    from mixmae_scale.shards import verify

    _check = verify._check

    def _hooked_check(unit):
        if unit.tar.endswith("/" + os.environ["MIXMAE_TEST_KILL_TAR"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return _check(unit)

    verify._check = _hooked_check
