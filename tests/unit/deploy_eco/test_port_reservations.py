"""Two `tbrm up` runs on one machine never hand the same port to their services."""

from __future__ import annotations

from pathlib import Path


def test_two_launchers_never_share_a_port(tmp_path: Path) -> None:
    """A port one launcher reserved (its actor may bind it only a minute later) is skipped by another."""
    from deploy.ports import PortReservations, pick_ports

    first, second = PortReservations(tmp_path), PortReservations(tmp_path)
    a, b = pick_ports(2, first), pick_ports(2, second)
    used_a = {a.redis, a.reward, a.buffer, a.learner, a.actor_base, a.actor_base + 1}
    used_b = {b.redis, b.reward, b.buffer, b.learner, b.actor_base, b.actor_base + 1}
    assert len(used_a) == 6 and len(used_b) == 6 and not used_a & used_b
    first.release()
    assert second.reserve(a.buffer)  # released with the first run


def test_health_counts_only_the_launchers_own_listener() -> None:
    import os
    import socket
    import subprocess
    import sys

    from deploy.supervisor import listens_on

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert listens_on(os.getpid(), port)
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            assert not listens_on(other.pid, port)  # something answers on the port, but not this process
        finally:
            other.kill()
            other.wait()
