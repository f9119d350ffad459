"""The local launcher's restart policy (issue 21): a service that dies is restarted after a back-off, becomes
healthy again, and a crash loop ends the run; the dashboard shows the restarts (deploy/supervisor.py,
deploy/dashboard.py). Real child processes."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from deploy.dashboard import Snapshot, plain_line, services_line
from deploy.supervisor import ProcSpec, RestartPolicy, ServiceCrashed, Supervisor

PY = sys.executable
FAST = RestartPolicy(backoff_s=0.2, backoff_max_s=1.0, max_restarts=3, window_s=30.0)


def _spec(name: str, code: str, **kw: object) -> ProcSpec:
    return ProcSpec(name, [PY, "-c", code], dict(os.environ), lambda: True, **kw)  # type: ignore[arg-type]


def _check_until(sup: Supervisor, cond: object, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sup.check()
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


@pytest.fixture
def sup(tmp_path: Path):
    s = Supervisor(tmp_path)
    yield s
    s.stop_all(timeout_s=2)


def test_a_sigkilled_service_is_restarted_after_a_backoff(sup: Supervisor) -> None:
    sup.start_all([_spec("svc", "import time; time.sleep(600)", restart=FAST)], poll_s=0.05)
    first = sup.procs["svc"].popen.pid
    os.killpg(first, signal.SIGKILL)
    sup.procs["svc"].popen.wait(5)
    sup.check()  # sees the exit, schedules the restart
    assert sup.status()["svc"]["state"].startswith("restarting")
    _check_until(sup, lambda: sup.procs["svc"].popen.pid != first and sup.status()["svc"]["state"] == "running")
    st = sup.status()["svc"]
    assert st["restarts"] == 1 and st["last_exit"] == -signal.SIGKILL
    assert sup.procs["svc"].popen.poll() is None


def test_a_service_without_a_policy_still_ends_the_run(sup: Supervisor) -> None:
    sup.start_all([_spec("svc", "import time; time.sleep(600)")], poll_s=0.05)
    os.killpg(sup.procs["svc"].popen.pid, signal.SIGKILL)
    sup.procs["svc"].popen.wait(5)
    with pytest.raises(ServiceCrashed):
        sup.check()


def test_a_crash_loop_ends_the_run_with_doubling_backoff(sup: Supervisor) -> None:
    sup.start_all([_spec("loop", "import time; time.sleep(0.1); raise SystemExit(3)", restart=FAST)], poll_s=0.05)
    starts = [time.monotonic()]
    pid = sup.procs["loop"].popen.pid
    with pytest.raises(ServiceCrashed, match="crash loop") as ei:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            sup.check()
            if sup.procs["loop"].popen.pid != pid:
                pid = sup.procs["loop"].popen.pid
                starts.append(time.monotonic())
            time.sleep(0.02)
    assert ei.value.returncode == 3
    assert len(starts) == 1 + FAST.max_restarts
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    # exit after ~0.1 s, then 0.2, 0.4, 0.8 s of back-off
    assert gaps[-1] > gaps[0] + 0.3, gaps


def test_a_clean_exit_of_a_service_that_may_exit_is_not_restarted(sup: Supervisor) -> None:
    sup.start_all([_spec("learner", "pass", may_exit=True, restart=FAST)], poll_s=0.05)
    sup.procs["learner"].popen.wait(5)
    for _ in range(10):
        sup.check()
        time.sleep(0.05)
    assert sup.exited_ok("learner") and sup.status()["learner"]["restarts"] == 0


def test_dashboard_shows_restarts() -> None:
    snap = Snapshot(wall_s=1.0, services={
        "redis": {"state": "running", "restarts": 0, "last_exit": None},
        "actor-0": {"state": "restarting in 2s", "restarts": 2, "last_exit": -9},
    })
    assert services_line(snap) == "restarts: actor-0 2 (last exit -9, restarting in 2s)"
    assert "actor-0 2" in plain_line(snap)
    assert snap.record()["restarts"] == {"redis": 0, "actor-0": 2}
    assert services_line(Snapshot(wall_s=1.0, services={"redis": {"state": "running", "restarts": 0}})) == ""


def test_a_service_that_dies_during_start_up_is_restarted(sup: Supervisor, tmp_path: Path) -> None:
    """Issue 21: a crash before the service is healthy (e.g. an actor that dies loading its model) is restarted
    like a later one, and what depends on it starts once the new incarnation is healthy."""
    tried, ready = tmp_path / "tried", tmp_path / "ready"
    code = (f"import pathlib, sys, time\ntried, ready = pathlib.Path({str(tried)!r}), pathlib.Path({str(ready)!r})\n"
            "if not tried.exists():\n    tried.touch()\n    sys.exit(4)\nready.touch()\ntime.sleep(600)\n")
    svc = ProcSpec("svc", [PY, "-c", code], dict(os.environ), ready.exists, restart=FAST)
    after = _spec("after", "import time; time.sleep(600)", depends_on=["svc"])
    healthy: list[str] = []
    sup.start_all([svc, after], on_healthy=lambda name, took: healthy.append(name), poll_s=0.05)
    assert healthy == ["svc", "after"]
    st = sup.status()["svc"]
    assert st == {"state": "running", "restarts": 1, "last_exit": 4}
    assert sup.order == ["svc", "after"]


def test_a_crash_loop_during_start_up_ends_the_start(sup: Supervisor) -> None:
    spec = ProcSpec("loop", [PY, "-c", "raise SystemExit(5)"], dict(os.environ), lambda: False, restart=FAST)
    with pytest.raises(ServiceCrashed, match="crash loop") as ei:
        sup.start_all([spec], poll_s=0.02)
    assert ei.value.returncode == 5
    assert sup.status()["loop"]["restarts"] == FAST.max_restarts


def test_without_a_policy_a_start_up_crash_still_ends_the_start(sup: Supervisor) -> None:
    spec = ProcSpec("svc", [PY, "-c", "raise SystemExit(6)"], dict(os.environ), lambda: False,
                    restart=RestartPolicy(mode="no"))
    with pytest.raises(ServiceCrashed, match="status 6"):
        sup.start_all([spec], poll_s=0.02)
    assert sup.status()["svc"]["restarts"] == 0
