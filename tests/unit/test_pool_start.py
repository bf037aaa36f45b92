"""The builder's pool starts workers that copy none of the caller's threads (shards/builder.py `bounded_pool`).

A forked worker inherits every lock as it was at the fork, held by threads it does not have: a thread holding the
logging lock or an allocator lock, or moto serving from a thread, once left a forked `shards verify` worker dead by
SIGSEGV inside boto3's client creation. Here a thread holds a lock the work also takes; a forked worker would wait
for it forever, so the work waits a few seconds and reports the lock as inherited instead of hanging the suite."""

from __future__ import annotations

import threading

from mixmae_scale.shards.builder import bounded_pool

LOCK = threading.Lock()  # module-level: a fork copies it held, a fresh interpreter imports it free
WAIT_S = 3.0


def take_the_lock(unit: int) -> str:
    if not LOCK.acquire(timeout=WAIT_S):
        return f"unit {unit}: the lock came held from the calling process"
    LOCK.release()
    return "free"


def test_workers_do_not_inherit_a_lock_another_thread_holds():
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with LOCK:
            held.set()
            done.wait(timeout=60)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    held.wait()
    try:
        results = dict(bounded_pool(take_the_lock, [1, 2, 3, 4], workers=2))
    finally:
        done.set()
        holder.join()
    assert results == {unit: "free" for unit in (1, 2, 3, 4)}


def whose(unit: int) -> int:
    import os

    return os.getpid()


def test_one_unit_of_work_starts_no_pool():
    """A pool of fresh interpreters costs about 0.3 s to start (shards/builder.py): one unit (a one-tar verify, a
    conversion resumed with one shard left) runs in this process; two go to the workers."""
    import os

    assert dict(bounded_pool(whose, [7], workers=2)) == {7: os.getpid()}
    assert os.getpid() not in dict(bounded_pool(whose, [7, 8], workers=2)).values()
