"""Periodic evaluations of `tbrm up` skip weights already measured (each one takes engine time from generation)."""

from __future__ import annotations

import time

from deploy.dashboard import ActorView, Snapshot
from deploy.evaluation import EvalResult
from deploy.run_config import RunSection
from deploy.run_evals import RunEvals
from deploy.run_summary import RunState

URL = "http://127.0.0.1:8100"


def _evals(served: int | None, last_measured: int | None) -> RunEvals:
    state = RunState()
    if last_measured is not None:
        state.evals.append(EvalResult(accuracy=0.3, n=10, correct=3, policy_version=last_measured))
    state.last_snapshot = Snapshot(wall_s=1.0, actors=[ActorView("actor-0", URL, policy_version=served)])
    ev = RunEvals(RunSection(eval_interval_s=0.01), {}, None, URL, state, None, None, print)  # type: ignore[arg-type]
    ev.eval_now = lambda hold=None: EvalResult(accuracy=0.5, n=10, correct=5, policy_version=served)  # type: ignore[method-assign]
    return ev


def _started(ev: RunEvals) -> bool:
    time.sleep(0.02)  # past eval_interval_s
    ev.maybe_start()
    started = ev.future is not None
    ev.close()
    return started


def test_same_version_as_last_eval_is_not_measured_again():
    ev = _evals(served=0, last_measured=0)
    assert ev.measured()
    assert not _started(ev)


def test_new_version_is_measured():
    assert _started(_evals(served=3, last_measured=0))


def test_unknown_version_or_no_eval_yet_is_measured():
    assert _started(_evals(served=None, last_measured=0))
    assert _started(_evals(served=2, last_measured=None))
