"""A rendezvous port nobody is listening on, so that test runs side by side never meet in one process group.

Not one the kernel hands out for `bind(0)`: that comes from the ephemeral range, from which the kernel also gives
the other test process's outgoing connections (gloo's pairs between its ranks, clients) their local ports, so in a
full CI run one such connection took a port between the test choosing it and the ranks binding it (EADDRINUSE).
Ports below the ephemeral range are never handed out that way; each pytest-xdist worker draws from a band of its
own, and a port is taken only if it can be bound now.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

FIRST = 10000  # the well-known and registered ports below are left alone
_draw = random.SystemRandom()  # not the `random` module's: tests seed that


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _band() -> range:
    """This test process's share of FIRST .. the ephemeral range's start."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    workers = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1), index + 1)
    width = (max(_ephemeral_start(), FIRST + 1000 * workers) - FIRST) // workers
    return range(FIRST + index * width, FIRST + (index + 1) * width)


def _bindable(port: int) -> bool:
    with socket.socket() as probe:  # on every address, as torch's TCPStore listens
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    band = _band()
    for _ in range(1000):
        port = _draw.choice(band)
        if _bindable(port):
            return port
    raise RuntimeError(f"no free port in {band.start}-{band.stop - 1}")


class Ports:
    """`next(PORTS)` hands out a fresh free port each time (replaces a fixed range shared by concurrent runs)."""

    def __iter__(self) -> Ports:
        return self

    def __next__(self) -> int:
        return free_port()
