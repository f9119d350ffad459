"""`reward.grading.math_verify_rejects`: the shortcut past math-verify's `verify` must never change its verdict.

Every pair the shortcut rejects is also run through math-verify itself, which must say False too; pairs it
declines are math-verify's anyway. The set is adversarial on purpose: numbers in every spelling, expressions that
only look variable (`0x`, `x-x+5`, `\\sin^2 x+\\cos^2 x`), letters that sympy reads as constants (`e`, `i`),
percentages, sets, relations, and the letter soup the toy model samples at high temperature.
"""

from __future__ import annotations

import itertools
import time

import pytest

GOLDS = [
    "7",
    "-8",
    "0",
    "1",
    "12",
    "1000",
    "-1",
    "\\frac{1}{2}",
    "0.5",
    "5\\%",
    "\\pi",
    "x",
    "2",
    "108",
    "-3",
]
PREDS = [
    # letter soup sampled by the toy model (each reached math-verify in a bench run)
    "is0",
    "1k1",
    "int46",
    "-1boxed",
    "1Please18",
    "-q",
    "s06",
    "olut0",
    "8z0",
    "-t0",
    "10Whatx",
    "11H",
    "1\ufffd8",
    "9]0",
    "-2:",
    "&1",
    "`",
    "8:08",
    "-18-1-1. 1",
    "-9-",
    "}",
    "8\x050",
    "-\u22128",
    "\u22128",
    # numbers in other spellings
    "07",
    "+7",
    "-08",
    "007",
    "7.0",
    "7.",
    "1,000",
    "1\\,000",
    "1 000",
    "0.50",
    ".5",
    "1/2",
    "\\frac12",
    "\\dfrac{1}{2}",
    "2/4",
    "50\\%",
    "5%",
    "0.05",
    "12.000",
    "-0",
    "+0",
    "0.0",
    "1e3",
    "10^3",
    "2^3-1",
    "\\sqrt{49}",
    "14/2",
    # expressions that only look variable, or whose letters are constants
    "0x",
    "x-x+7",
    "7+0y",
    "x/x",
    "\\frac{x}{x}",
    "x^0",
    "0^x",
    "7x^0",
    "\\sin^2 x+\\cos^2 x",
    "e^{i\\pi}",
    "e^{i\\pi}+1",
    "e",
    "i",
    "i^2",
    "\\pi",
    "2\\pi",
    "\\frac{\\pi}{\\pi}",
    "|x|/x",
    "\\sqrt{x^2}",
    "n!",
    "\\binom{n}{0}",
    "\\lfloor x \\rfloor",
    "\\ln(e^7)",
    "\\log_x x",
    "x^{\\log_x 7}",
    "7 \\cdot \\frac{y}{y}",
    "\\frac{14a}{2a}",
    # real variables and text
    "7x",
    "x",
    "y",
    "-8y",
    "2x+1",
    "x^2",
    "ab",
    "\\text{seven}",
    "seven",
    "x_1",
    "n",
    "k+1",
    # relations, sets, tuples, intervals
    "x=7",
    "7=7",
    "x = -8",
    "x>7",
    "\\{7\\}",
    "\\{7, x\\}",
    "(7, 8)",
    "[0, 1]",
    "7 \\text{ cm}",
    "7^\\circ",
    "",
]


@pytest.fixture(scope="module")
def mv():
    from reward import grading

    grading.load_math_verify()
    assert grading._MV is not None
    return grading


def test_shortcut_rejects_only_what_math_verify_rejects(mv) -> None:
    verify = mv._MV[1]
    rejected = 0
    for gold, pred in itertools.product(GOLDS, PREDS):
        gp, pp = mv._parse(gold), mv._parse(pred)
        if not gp or not pp or not mv.math_verify_rejects(gp, pp):
            continue
        rejected += 1
        assert not verify(list(gp), list(pp), timeout_seconds=None), (pred, gold)
        assert not mv.verify_pair(pred, gold, fast=False), (pred, gold)
    assert rejected >= 150  # the shortcut is not vacuous


def test_shortcut_declines_what_math_verify_might_accept(mv) -> None:
    """Values equal at the probe point, constants, symbols, relations and sets are left to math-verify."""
    for pred, gold in [
        ("0x", "0"),
        ("x-x+7", "7"),
        ("\\sin^2 x+\\cos^2 x", "1"),
        ("x/x", "1"),
        ("7x^0", "7"),
        ("x", "7"),
        ("e^{i\\pi}", "-1"),
        ("i^2", "-1"),
        ("x=7", "7"),
        ("\\{7, x\\}", "7"),
        ("8:08", "1"),
        ("7x", "x"),
        ("\\frac{14a}{2a}", "7"),
        ("2\\pi", "\\pi"),
    ]:
        assert not mv.math_verify_rejects(mv._parse(gold), mv._parse(pred)), (pred, gold)
    assert mv.verify_pair("0x", "0") == mv.verify_pair("0x", "0", fast=False)


def test_verdicts_unchanged_end_to_end(mv) -> None:
    """Whole responses (boxes, several boxes, text around, units, whitespace) through prepare + verify_pair, with
    and without the shortcut (where the shortcut declines, both run the same code)."""
    wrappers = [
        "\\boxed{{{}}}",
        "The answer is \\boxed{{{}}}.",
        "\\boxed{{1}} so \\boxed{{{}}}",
        "Answer: {}",
        "13-6=7. \\boxed{{ {} }}",
        "\\fbox{{{}}} cm",
    ]
    checked = 0
    for gold, pred, wrap in itertools.product(["7", "-8", "0", "\\frac{1}{2}"], PREDS, wrappers):
        prep = mv.prepare(wrap.format(pred), gold)
        if prep.verdict is None and mv.math_verify_rejects(mv._parse(prep.gold), mv._parse(prep.pred)):
            checked += 1
            assert not mv.verify_pair(prep.pred, prep.gold, fast=False), (pred, gold, wrap)
    assert checked >= 100


def test_shortcut_is_cheap_on_letter_soup(mv) -> None:
    """The point of the shortcut: the toy model's letter soup against a number costs well under math-verify's
    simplify (5-200 ms each)."""
    pairs = [
        (p, g)
        for p, g in zip(
            ["10Whatx", "1Please18", "-1boxed", "int46", "11H", "1k1", "-q", "s06"],
            ["114", "105", "-22", "-56", "102", "150", "-12", "-12"],
            strict=True,
        )
    ]
    for p, g in pairs:
        mv.verify_pair(p, g)  # parse once (cached per worker)
    t0 = time.process_time()
    for p, g in pairs:
        assert mv.math_verify_rejects(mv._parse(g), mv._parse(p)), (p, g)
        assert not mv.verify_pair(p, g)
    assert time.process_time() - t0 < 0.5
