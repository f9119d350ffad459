"""Imported by the worker forkserver (``set_forkserver_preload``): loads math-verify/sympy and runs a few
representative comparisons once, so every forked worker starts with warm sympy caches and lazy imports done.

Without this, the first sqrt/interval/matrix comparison in a fresh worker costs ~0.5-1 s, which on a loaded
machine can exceed the soft timeout and turn a correct answer into `timeout`.
"""

from __future__ import annotations

import logging

WARMUP_PAIRS = [
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
    ("(x+1)^2", "x^2+2x+1"),
    (r"2\pi", r"\pi \cdot 2"),
    ("(1,2]", "(1,2]"),
    (r"(-\infty,1)\cup(2,\infty)", r"(-\infty,1) \cup (2,\infty)"),
    (r"\{1,2\}", r"\{2,1\}"),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
    ("x=5", "5"),
    ("y=2x+3", "y=2x+3"),
    ("x>3", "x>3"),
    ("3+4i", "4i+3"),
    (r"\log_2 8", "3"),
    (r"\sin(\pi/3)", r"\frac{\sqrt{3}}{2}"),
    (r"\binom{5}{2}", "10"),
    ("1,2,3", "3,2,1"),
    ("2-2p", "-2p+2"),
]


def warm_up() -> None:
    from reward.grading import verify_pair

    for pred, gold in WARMUP_PAIRS:
        try:
            verify_pair(pred, gold)
        except Exception:  # - warm-up is best effort; a failure here must not stop the pool
            logging.getLogger(__name__).debug("warm-up pair failed", exc_info=True)


warm_up()
