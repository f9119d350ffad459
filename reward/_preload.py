"""Imported by the worker forkserver (``set_forkserver_preload``): loads math-verify/sympy and runs a few
representative comparisons once, so every forked worker starts with warm sympy caches and lazy imports done.

Without this, the first sqrt/interval/matrix comparison in a fresh worker costs ~0.5-1 s, which on a loaded
machine can exceed the soft timeout and turn a correct answer into `timeout`.

It also parses a corpus of short answers with every letter, digit and punctuation character (`PARSE_WARMUP`): the
latex parser (ANTLR) builds its lexer and parser DFAs lazily, per character and token sequence, and in a fresh
worker that costs most of the parse of a sampled answer (the toy model's letter soup like `11H`, `1k1`: 7 ms each
cold, half that after this warm-up; measured on 29 such answers of a bench run, 0.22-0.26 s -> 0.10-0.13 s). The
DFAs are a cache of the parser's own decisions: what a parse returns does not depend on them.
"""

from __future__ import annotations

import logging
import string

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


PARSE_WARMUP = [
    "0123456789",
    "-7",
    "+7",
    "1.5",
    "1,000",
    "-1-2-3. 4",
    "12:34",
    "1;2",
    "(1",
    "1)",
    "[1",
    "1]",
    "|1|",
    "1!",
    "1%",
    "1/2",
    "1^2",
    "1_2",
    "1'",
    "x+y",
    "2x-3y",
    "ab12",
    "12ab",
    "a1b2c3",
    "-ab",
    "\ufffd1",
    "1\ufffd",
    "}",
    "1}",
    *(f"{c}1" for c in string.ascii_letters),
    *(f"-1{c}2{c}" for c in string.ascii_letters),
    *(f"1{c}2" for c in string.punctuation if c not in "{}\\$"),
]


def warm_up() -> None:
    from reward.grading import _parse, verify_pair

    for pred, gold in WARMUP_PAIRS:
        try:
            verify_pair(pred, gold)
        except Exception:  # - warm-up is best effort; a failure here must not stop the pool
            logging.getLogger(__name__).debug("warm-up pair failed", exc_info=True)
    for answer in PARSE_WARMUP:
        try:
            _parse(answer)
        except Exception:  # - best effort, as above
            logging.getLogger(__name__).debug("warm-up parse failed", exc_info=True)
    _parse.cache_clear()  # the DFAs stay warm; the workers' parse cache starts empty


warm_up()
