"""The launcher's process supervisor with real OS processes: health gating, crash reports, clean group stops."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from deploy.supervisor import (
    ProcSpec,
    ServiceCrashed,
    Supervisor,
    free_port,
    http_ok,
    pick_port,
    pick_port_range,
    port_is_free,
    port_is_listening,
)

PY = sys.executable


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): check its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _http_server(port: int) -> list[str]:
    return [PY, "-m", "http.server", str(port), "--bind", "127.0.0.1"]


@pytest.fixture
def sup(tmp_path: Path):
    s = Supervisor(tmp_path)
    yield s
    s.stop_all(timeout_s=2)


def test_dependency_order_and_health_gating(sup: Supervisor, tmp_path: Path) -> None:
    p1, p2 = free_port(), free_port()
    started: list[str] = []
    specs = [
        ProcSpec("b", _http_server(p2), dict(os.environ), lambda: http_ok(f"http://127.0.0.1:{p2}/"), depends_on=["a"]),
        ProcSpec("a", _http_server(p1), dict(os.environ), lambda: http_ok(f"http://127.0.0.1:{p1}/")),
    ]
    sup.start_all(specs, on_healthy=lambda name, took: started.append(name), poll_s=0.05)
    assert started == ["a", "b"]
    assert sup.order == ["a", "b"]  # b was not even spawned before a was healthy
    assert port_is_listening(p1) and port_is_listening(p2)
    codes = sup.stop_all(timeout_s=5)
    assert set(codes) == {"a", "b"}
    assert not port_is_listening(p1) and not port_is_listening(p2)
    assert "start:" in (tmp_path / "a.log").read_text()


def test_crash_is_reported_with_log_tail(sup: Supervisor) -> None:
    code = "import sys; print('booting'); print('boom: bad config', file=sys.stderr); sys.exit(3)"
    spec = ProcSpec("svc", [PY, "-c", code], dict(os.environ), lambda: False, health_timeout_s=30)
    with pytest.raises(ServiceCrashed) as ei:
        sup.start_all([spec], poll_s=0.05)
    assert ei.value.name == "svc" and ei.value.returncode == 3
    assert "boom: bad config" in ei.value.tail and "booting" in ei.value.tail


def test_health_timeout(sup: Supervisor) -> None:
    spec = ProcSpec("slow", [PY, "-c", "import time; time.sleep(60)"], dict(os.environ), lambda: False,
                    health_timeout_s=0.5)
    with pytest.raises(ServiceCrashed, match="not healthy"):
        sup.start_all([spec], poll_s=0.05)


def test_check_detects_a_later_crash_and_may_exit(sup: Supervisor) -> None:
    ok = ProcSpec("done", [PY, "-c", "import time; time.sleep(0.3)"], dict(os.environ), lambda: True, may_exit=True)
    bad = ProcSpec("dies", [PY, "-c", "import time; time.sleep(0.3); raise SystemExit(2)"], dict(os.environ),
                   lambda: True)
    sup.start_all([ok, bad], poll_s=0.05)
    deadline = time.monotonic() + 10
    while sup.procs["dies"].popen.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(ServiceCrashed) as ei:
        sup.check()
    assert ei.value.name == "dies"
    assert sup.exited_ok("done")


def test_stop_kills_the_whole_group_and_escalates(sup: Supervisor, tmp_path: Path) -> None:
    # The child ignores SIGTERM and has a grandchild: stop must SIGKILL both (no orphans).
    pidfile = tmp_path / "grandchild.pid"
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"g = subprocess.Popen([{PY!r}, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(g.pid))\n"
        "time.sleep(120)\n"
    )
    spec = ProcSpec("stubborn", [PY, "-c", code], dict(os.environ), lambda: pidfile.exists() and pidfile.read_text() != "")
    sup.start_all([spec], poll_s=0.05)
    child = sup.procs["stubborn"].popen.pid
    grandchild = int(pidfile.read_text())
    assert _alive(grandchild)
    t = time.monotonic()
    rc = sup.stop("stubborn", timeout_s=0.5)
    assert rc == -signal.SIGKILL
    assert time.monotonic() - t < 5
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child) and not _alive(grandchild)


def test_pick_ports_avoid_taken_ones() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        assert not port_is_free(busy)
        other = pick_port(busy, set())
        assert other != busy and port_is_free(other)
        base = pick_port_range(busy - 1, 3, set())
        assert busy not in range(base, base + 3)
        assert all(port_is_free(p) for p in range(base, base + 3))


def test_launcher_ports_and_thread_budget() -> None:
    import socket

    from deploy.local_services import thread_env
    from deploy.ports import pick_ports
    from deploy.run_config import RunSection

    with socket.socket() as s:  # occupy the default reward port: the launcher must move it, not fail
        # SO_REUSEADDR: a TIME_WAIT socket of a run that just ended must not make this bind fail while the port
        # is in fact free (pick_ports, like the services, reuses such a port)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", 8001))
            s.listen()
        except OSError:
            pass  # already taken by something else: same situation
        ports = pick_ports(3)
    values = [ports.redis, ports.reward, ports.buffer, ports.learner, *range(ports.actor_base, ports.actor_base + 3)]
    assert len(set(values)) == len(values)
    assert ports.reward != 8001
    run = RunSection(actor_threads=2, learner_threads=1)
    assert thread_env("actor", run)["OMP_NUM_THREADS"] == "2"
    assert thread_env("actor", run)["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert thread_env("learner", run)["OMP_NUM_THREADS"] == "1"
    assert thread_env("reward", run) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def test_local_specs_carry_the_restart_policy_and_the_local_start_order(tmp_path: Path) -> None:
    from deploy import topology
    from deploy.local_services import LIGHT_HEALTH_TIMEOUT_S, build_specs
    from deploy.run_config import RunSection
    from deploy.supervisor import RestartPolicy

    run = RunSection(actors=2, restart=RestartPolicy(max_restarts=2))
    plan = topology.local_plan(2, redis_dir=str(tmp_path))
    specs = {s.name: s for s in build_specs(plan, run, {"X": "1"}, tmp_path, Supervisor(tmp_path))}
    assert set(specs) == {"redis", "reward", "buffer", "actor-0", "actor-1", "learner"}
    assert all(s.restart == run.restart for s in specs.values())  # start-up and later crashes alike (issue 21)
    assert specs["actor-0"].depends_on == specs["learner"].depends_on == specs["buffer"].depends_on == ["redis"]
    assert specs["actor-1"].env["TBRM_ACTOR_WEIGHTS_DIR"] == str(tmp_path / "actor-1")
    assert specs["actor-1"].env["X"] == "1" and specs["actor-1"].env["OMP_NUM_THREADS"] == str(run.actor_threads)
    assert specs["reward"].health_timeout_s == LIGHT_HEALTH_TIMEOUT_S
    assert specs["learner"].health_timeout_s == run.health_timeout_s
    assert specs["learner"].may_exit and not specs["actor-0"].may_exit
