"""Telling an I/O failure that may pass (a busy NFS server, a dropped connection) from one that will not.

A conversion of a million files meets a few EIO, ESTALE or timeout errors on a shared file system, and an
object store drops a connection now and then. Rejecting such a file for good loses an image that is
fine, so a transient failure is retried with backoff first; if it still fails, the rejection is marked
transient and the next run of the same command tries the file again. A file that does not exist, or
cannot be decoded, fails the same way every time and is rejected at once.
"""

from __future__ import annotations

import errno
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from mixmae_scale.data.storage import StoreUnreachable

T = TypeVar("T")

# Waits between attempts: four attempts over about 20 s ride out a file server's failover or a throttled
# store, while a file system that stays down turns into transient rejections (retried by the next run)
# instead of hanging the conversion.
BACKOFF_S: tuple[float, ...] = (1.0, 4.0, 16.0)

TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR, errno.ECONNRESET,
                              errno.ECONNABORTED, errno.ECONNREFUSED, errno.ENETDOWN, errno.ENETUNREACH,
                              errno.ENETRESET, errno.EHOSTUNREACH, errno.EPIPE, errno.ENOLCK, errno.EREMOTEIO})
_STORE_BUSY_CODES = frozenset({"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable",
                               "ThrottlingException"})


def _is_transient_one(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError | TimeoutError | ConnectionError):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    botocore = sys.modules.get("botocore.exceptions")  # only present when S3 is in use; never imported here
    if botocore is not None:
        if isinstance(exc, botocore.ConnectionError | botocore.ReadTimeoutError | botocore.ResponseStreamingError
                      | botocore.IncompleteReadError):
            return True
        if isinstance(exc, botocore.ClientError):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return status >= 500 or exc.response.get("Error", {}).get("Code") in _STORE_BUSY_CODES
    urllib3 = sys.modules.get("urllib3.exceptions")
    return urllib3 is not None and isinstance(exc, urllib3.ProtocolError | urllib3.TimeoutError)


def is_transient(exc: BaseException) -> bool:
    """True when `exc`, or an exception it was raised from, is a failure that may pass on a later try."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if _is_transient_one(current):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def retrying(action: Callable[[], T], delays: tuple[float, ...] | None = None) -> T:
    """`action()`, tried again after each delay while it fails transiently; the last failure is raised.

    An object store that did not answer (`StoreUnreachable`) is not tried again here: botocore already made its
    attempts at that request (8 unless AWS_MAX_ATTEMPTS says, each waiting up to the connect timeout), and three
    more rounds of them only made a dead store's adoption wait about four times as long before it said so. It is
    still transient (`is_transient`): the next run tries that file or tar again. What botocore does not retry,
    a connection dropped while a tar's body streams (ResponseStreamingError, a read timeout mid-body), is retried
    here as before."""
    waits = BACKOFF_S if delays is None else delays
    for wait in (*waits, None):
        try:
            return action()
        except Exception as exc:
            if wait is None or not is_transient(exc) or isinstance(exc, StoreUnreachable):
                raise
            time.sleep(wait)
    raise AssertionError("unreachable")
