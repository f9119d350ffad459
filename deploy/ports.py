"""Ports of a local run: the documented defaults where free, reserved against other launchers on the machine.

"Is the port free?" alone races between two `tbrm up` on one machine: an actor binds its port only once vLLM has
loaded, up to a minute later, so a second launcher would pick the same port and talk to the first run's actor.
`PortReservations` holds an exclusive `flock` on `<tmp>/tbrm-ports/<port>.lock` for each port a launcher hands
out, released when the launcher exits or dies; `pick_ports` skips ports another launcher holds.
"""

from __future__ import annotations

import fcntl
import tempfile
from pathlib import Path
from typing import Any

from deploy import topology
from deploy.supervisor import free_port, pick_port, pick_port_range


class PortReservations:
    """Ports a launcher hands to its services, reserved machine-wide for its lifetime: an exclusive `flock` on
    `<tmp>/tbrm-ports/<port>.lock`, released when the launcher exits (or dies). "Is the port free?" alone races
    between two `tbrm up` on one machine: an actor binds its port only once vLLM has loaded, up to a minute later, so
    a second launcher would pick the same port and talk to the first run's actor."""

    def __init__(self, lock_dir: Path | None = None) -> None:
        self.lock_dir = lock_dir or Path(tempfile.gettempdir()) / "tbrm-ports"
        self.files: dict[int, Any] = {}

    def reserve(self, port: int) -> bool:
        """True if this launcher now holds `port` (or already did); False if another launcher holds it."""
        if port in self.files:
            return True
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.lock_dir / f"{port}.lock", "a")  # held open: the lock lives with the file
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        self.files[port] = f
        return True

    def release(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


def pick_ports(
    n_actors: int, reservations: PortReservations | None = None, defaults: bool = True
) -> topology.Ports:
    """The default ports where free, else free ones (so `tbrm up` runs beside a system Redis or another run); with
    `reservations`, also none that another launcher on this machine holds; `defaults=False`: OS-assigned ports."""
    default = topology.Ports()
    taken: set[int] = set()
    chosen = {}
    for name in ("redis", "reward", "buffer", "learner"):
        while True:
            p = pick_port(getattr(default, name) if defaults else free_port(), taken)
            taken.add(p)
            if reservations is None or reservations.reserve(p):
                break
        chosen[name] = p
    while True:
        base = pick_port_range(default.actor_base if defaults else free_port(), n_actors, taken)
        ports = range(base, base + n_actors)
        if reservations is None or all([reservations.reserve(p) for p in ports]):
            break
        taken.update(ports)
    chosen["actor_base"] = base
    return topology.Ports(**chosen)
