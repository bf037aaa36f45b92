"""The rendezvous port of `mixmae launch`, checked where rank 0 will bind it.

A taken port used to surface only after the launch: DeepSpeed 0.19.8's launcher started both ranks, rank 0 failed at
its store's bind (engine/distributed.py port_taken says so in one line), and rank 1, connected to whatever held the
port, ignored the launcher's SIGTERM until it was killed 30 s later (docs/training.md: measured). Where rank 0 runs
on this host the bind is tried here first: a port derived from the run folder moves to the next free one of its
range (nobody chose it, and every node is given the launcher's one port), a port the user set is refused naming
where it was set, since moving it would break whatever else relies on it (another node's firewall rule, a script).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from mixmae_scale.config.load import ConfigError, parse_override, read_yaml

FIRST, LAST = 10000, 29999  # the derived ports' range, the sbatch scripts' too (10000 + job id % 20000)


def launch_port(run_dir: Path) -> int:
    """The rendezvous port of a launch that names none: 10000 + crc32(the run folder's absolute path) % 20000. Two
    runs on one node have two run folders (the run lock refuses a second start in one), so they mostly get different
    ports (29500 for every run made the second fail with EADDRINUSE), and the port is computed once, here, and given
    to every node's ranks by the launcher. The range is the sbatch scripts' (10000 + job id % 20000): unprivileged,
    below Linux's ephemeral ports (32768-60999), where an outgoing connection on the node may hold it."""
    return FIRST + zlib.crc32(os.path.abspath(run_dir).encode()) % (LAST - FIRST + 1)


def bind_problem(port: int) -> str | None:
    """Why rank 0's store could not listen on `port` here, or None if it could. The probe binds every IPv4 address,
    as the store does, with SO_REUSEADDR on, as torch 2.14's store sets it: without it a port whose last run just
    ended (its server side in TIME_WAIT) read as taken, though the store binds it again (tried). A listening socket
    on any address of the port is refused either way."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as exc:
            return "in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
    return None


def is_this_host(name: str) -> bool:
    """Whether `name` is this machine as the launch is started from it: 'localhost', this host's name (whole or its
    first label), or an IP address that is loopback or one of this host's interfaces. Names are not looked up in
    DNS (a slow or broken resolver would hold every launch), so an alias of this host reads as another host and its
    port goes unchecked, as before."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        own = socket.gethostname()
        return name in {"localhost", own, own.split(".")[0]}
    if address.is_loopback:
        return True
    mine = {item.address.split("%")[0] for items in psutil.net_if_addrs().values() for item in items}
    return str(address) in mine


def port_source(sources: Sequence[str]) -> str:
    """Where cluster.master_port was set, for a refusal to name: the last `--set` or file (profile, cluster file)
    of the merge that sets it, as the merge took the last."""
    for source in reversed(sources):
        if source.startswith("--set "):
            section = parse_override(source.removeprefix("--set ")).get("cluster")
            if isinstance(section, dict) and "master_port" in section:
                return source
            continue
        section = read_yaml(Path(source)).get("cluster")
        if isinstance(section, dict) and section.get("master_port") is not None:
            return f"set in {source}"
    return "set"


@dataclass(frozen=True)
class RendezvousPort:
    port: int  # what the launcher is given
    derived: bool  # from the run folder (no cluster.master_port)
    source: str  # the run folder, or where cluster.master_port was set
    rank0_host: str | None  # where rank 0 binds it: None for this host
    moved_from: int | None = None  # the run folder's port, taken here, where `port` is the next free one
    refusal: str | None = None  # a set port that is taken here: the launch refuses it, a dry run notes it

    def report(self) -> str:
        """The `master port` line of `mixmae launch` and its dry run: the port, where it came from, what was
        checked."""
        if self.moved_from is not None:
            said = (f"{self.port} (the run folder {self.source} gives {self.moved_from}, which is in use on this "
                    f"host; the next free port from there; --set cluster.master_port=N sets one)")
        elif self.derived:
            said = f"{self.port} (from the run folder {self.source}; --set cluster.master_port=N sets one)"
        else:
            said = f"{self.port} (cluster.master_port, {self.source})"
        if self.rank0_host is not None:
            said += f"; not checked here: rank 0 starts on {self.rank0_host}"
        return f"master port      {said}"


def rendezvous_port(master_port: int | None, sources: Sequence[str], run_dir: Path, rank0_host: str | None,
                    problem: Callable[[int], str | None] = bind_problem) -> RendezvousPort:
    """The port to launch with. `rank0_host` None means rank 0 runs here, so the port is tried (`problem`); a taken
    derived port moves upward through FIRST-LAST (wrapping) to the first free one, the same one for the same taken
    ports. A taken set port is returned with its refusal: `mixmae launch` raises it, its dry run prints it."""
    run_dir = Path(os.path.abspath(run_dir))
    if master_port is not None:
        source = port_source(sources)
        found = problem(master_port) if rank0_host is None else None
        refusal = None if found is None else (
            f"cluster.master_port={master_port} ({source}) is {found} on this host, where rank 0 would listen on it; "
            f"free it, or set another port: --set cluster.master_port=N (unset, a port is derived from the run "
            f"folder and a taken one skipped)")
        return RendezvousPort(master_port, False, source, rank0_host, refusal=refusal)
    derived = launch_port(run_dir)
    if rank0_host is not None or problem(derived) is None:
        return RendezvousPort(derived, True, str(run_dir), rank0_host)
    span = LAST - FIRST + 1
    for step in range(1, span):
        candidate = FIRST + (derived - FIRST + step) % span
        if problem(candidate) is None:
            return RendezvousPort(candidate, True, str(run_dir), None, moved_from=derived)
    raise ConfigError(f"no port of {FIRST}-{LAST} can be bound on this host (the run folder {run_dir} gives "
                      f"{derived}); free one or set cluster.master_port=N")
