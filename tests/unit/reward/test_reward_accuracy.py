"""Accuracy of the grader vs math-verify's own defaults on the whole case set (reward_case_table.CASES, which
includes the issue-18 hard cases), with false positives counted; prints a table per kind.

    PYTHONPATH=$PWD python -m pytest tests/unit/reward/test_reward_accuracy.py -q -s -m slow

math-verify baseline: ``verify(parse(gold), parse(response))`` with the library defaults (both extraction
configs, its own timeouts); a gold that its default parse finds nothing in is retried wrapped in ``$...$``.
Status: nothing parsed from the response -> no_answer; verify true -> correct; else incorrect.
"""

from __future__ import annotations

import collections
import signal

import pytest
from reward_case_table import CASES
from reward_hard_cases import HARD_CASES

from reward.grading import grade_in_process

pytestmark = pytest.mark.slow

KIND = {cid: kind for cid, kind, *_ in HARD_CASES}


class _Timeout(BaseException):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Timeout()


def _bounded(fn, *args: object) -> str:
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 20.0)
    try:
        return fn(*args)
    except _Timeout:
        return "timeout"
    except Exception:  # noqa: BLE001 - a library failure counts as a wrong verdict
        return "error"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def math_verify_defaults(response: str, gold: str) -> str:
    from math_verify import parse, verify

    gold_parsed = parse(gold) or parse(f"${gold}$")
    pred_parsed = parse(response)
    if not pred_parsed:
        return "no_answer"
    return "correct" if verify(gold_parsed, pred_parsed) else "incorrect"


def ours(response: str, gold: str) -> str:
    return grade_in_process(response, gold)[0]


def test_accuracy_vs_math_verify_defaults() -> None:
    rows: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for cid, response, gold, expected in CASES:
        kind = KIND.get(cid, "earlier table")
        for name, grader in (("ours", ours), ("math_verify", math_verify_defaults)):
            got = _bounded(grader, response, gold)
            for k in {kind, "all", "hard (issue 18)" if cid in KIND else kind}:
                rows[k][f"{name}_ok"] += got == expected
                rows[k][f"{name}_fp"] += got == "correct" and expected != "correct"
                rows[k]["n"] += name == "ours"
    print(f"\n{'kind':<18}{'n':>5}{'ours acc':>10}{'ours FP':>9}{'m-v acc':>10}{'m-v FP':>8}")
    for kind, c in sorted(rows.items()):
        n = c["n"]
        print(f"{kind:<18}{n:>5}{c['ours_ok'] / n:>10.3f}{c['ours_fp']:>9}{c['math_verify_ok'] / n:>10.3f}"
              f"{c['math_verify_fp']:>8}")
    hard, every = rows["hard (issue 18)"], rows["all"]
    assert hard["ours_ok"] / hard["n"] >= 0.95 and hard["ours_fp"] <= 2
    assert every["ours_ok"] >= every["math_verify_ok"] and every["ours_fp"] <= every["math_verify_fp"]
