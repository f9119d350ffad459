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
def sup(tmp_path: Path):  # noqa: ANN201
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
