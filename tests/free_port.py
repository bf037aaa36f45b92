"""A rendezvous port nobody is listening on, so that test runs side by side never meet in one process group."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Ports:
    """`next(PORTS)` hands out a fresh free port each time (replaces a fixed range shared by concurrent runs)."""

    def __iter__(self) -> Ports:
        return self

    def __next__(self) -> int:
        return free_port()
