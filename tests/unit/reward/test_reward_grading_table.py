"""The grading table (reward_case_table.CASES, >= 150 cases) through the real pipeline, math-verify included.

math-verify runs here in the test process's main thread (as a worker would); each case is bounded by a CPU-time
ITIMER so a regression that makes a case hang fails fast instead of stalling the suite.
"""

from __future__ import annotations

import signal
import time

import pytest
from reward_case_table import CASES

from reward.grading import grade_in_process


class _CaseTimeout(BaseException):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _CaseTimeout()


@pytest.fixture(scope="module", autouse=True)
def _math_verify_loaded() -> None:
    """Import math-verify/sympy once outside the per-case timer (the import alone takes seconds on a busy box)."""
    from reward.grading import load_math_verify

    load_math_verify()


def test_table_is_big_and_unique() -> None:
    ids = [c[0] for c in CASES]
    assert len(CASES) >= 150
    assert len(set(ids)) == len(ids)
    statuses = {c[3] for c in CASES}
    assert statuses == {"correct", "incorrect", "no_answer"}


@pytest.mark.parametrize(("response", "gold", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_grading_case(response: str, gold: str, expected: str) -> None:
    # CPU-time limits (ITIMER_PROF, process_time): a regression that makes a case slow fails, a busy shared
    # machine (other processes taking the cores) does not.
    old = signal.signal(signal.SIGPROF, _alarm)
    signal.setitimer(signal.ITIMER_PROF, 10.0)
    t0 = time.process_time()
    try:
        status, extracted = grade_in_process(response, gold)
    except _CaseTimeout:
        pytest.fail("grading took over 10 s of CPU time")
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)
    assert status == expected, f"extracted={extracted!r}"
    assert time.process_time() - t0 < 5.0
    if expected == "no_answer":
        assert extracted is None or not extracted.strip() or status == "no_answer"
