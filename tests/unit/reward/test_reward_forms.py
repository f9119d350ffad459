"""Unit tests of the issue-18 building blocks: the tail rule, box groups, answers without a box, exact values,
lists and intervals, number words, invalid Unicode. No sympy here."""

from __future__ import annotations

from fractions import Fraction

import pytest

from reward.exact import MAX_BITS, exact_value, numbers_match, parse_number
from reward.extraction import TAIL_CHARS, extract, tail
from reward.forms import as_interval, as_items
from reward.normalize import EMPTY, normalize, number_from_words
from reward.schema import GradeItem, valid_unicode


def test_tail_keeps_the_end_and_a_straddling_box() -> None:
    text = "a" * 50_000 + "END"
    assert tail(text) == text[-TAIL_CHARS:]
    box = "\\boxed{" + "1+" * 100 + "1}"
    straddled = "b" * 30_000 + box + "c" * (TAIL_CHARS - 50)
    assert tail(straddled).startswith("\\boxed{")  # the cut fell inside the box: read it whole
    closed_before = "b" * 30_000 + "\\boxed{1}" + "c" * (TAIL_CHARS + 100)
    assert "\\boxed" not in tail(closed_before)


@pytest.mark.parametrize(
    ("response", "answer", "items"),
    [
        ("so $x=\\boxed{2}$ or $x=\\boxed{-3}$.", "2, -3", ("2", "-3")),
        ("$\\boxed{1}$, $\\boxed{4}$ and $\\boxed{9}$", "1, 4, 9", ("1", "4", "9")),
        ("First $a=\\boxed{3}$. Then the sum is $\\boxed{7}$.", "7", ()),
        ("\\boxed{3}\n\n\\boxed{4}", "4", ()),
        ("**Answer: 12**", "12", ()),
        ("text\n\n**12**", "12", ()),
        ("Answer — 42", "42", ()),
        ("The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac{3}{4}", ()),
        ("Thus, she has 24 stickers left.", "24", ()),
        ("The area is 35 and the perimeter is 24.", None, ()),
        ("Answer: 5\nWait, that is wrong.", None, ()),
        ("\\boxed{3}. Final answer: 4", "4", ()),  # a phrase after the last box wins
        ("The final answer is $\\boxed{5}$.", "5", ()),
    ],
)
def test_extraction_policy(response: str, answer: str | None, items: tuple[str, ...]) -> None:
    ext = extract(response)
    assert ext.answer == answer and ext.items == items


def test_exact_values_are_exact_and_bounded() -> None:
    assert exact_value("2^{2^3}") == exact_value("2^8") == 256
    assert exact_value("2^{100}") == 2**100
    assert exact_value("1/10^{12}") != exact_value("2/10^{12}")
    assert exact_value("\\frac{3}{2\\cdot 10^{12}}") == Fraction(3, 2 * 10**12)
    assert exact_value("9^{9^{9}}") is None and exact_value(f"2^{{{MAX_BITS + 1}}}") is None  # never computed
    assert exact_value("x+1") is None and exact_value("\\sqrt{2}") is None and exact_value("4 2") is None


def test_decimal_tolerance_is_relative() -> None:
    third = (Fraction(1, 3), None)
    assert numbers_match(third, parse_number("0.3333"))  # type: ignore[arg-type]
    assert not numbers_match((Fraction(1, 3000), None), parse_number("0.000"))  # type: ignore[arg-type]
    assert not numbers_match((Fraction(1, 10**12), None), (Fraction(2, 10**12), None))


@pytest.mark.parametrize(
    ("s", "items"),
    [
        ("\\{2,-3\\}", ["2", "-3"]),
        ("x = 2 and x = -3", ["2", "-3"]),
        ("x_1=4, x_2=-1", ["4", "-1"]),
        ("\\pm 5", ["5", "-5"]),
        ("(1,2), (3,4)", ["(1,2)", "(3,4)"]),
        ("(1,2)", None),
        ("x=5", None),
        ("x=1, y=2", None),
    ],
)
def test_lists_of_solutions(s: str, items: list[str] | None) -> None:
    got = as_items(s)
    assert (got[0] if got else None) == items


@pytest.mark.parametrize(
    ("s", "interval"),
    [
        ("2<x<5", "(2,5)"),
        ("x\\ge 3", "[3,\\infty)"),
        ("-1 \\le x < 4", "[-1,4)"),
        ("5 > x > 2", "(2,5)"),
        ("3 < x", "(3,\\infty)"),
        ("x<-2 or x>2", "(-\\infty,-2)\\cup(2,\\infty)"),
        ("x \\in [0,1)", "[0,1)"),
        ("x<y", None),
        ("y=2x+3", None),
    ],
)
def test_inequalities_as_intervals(s: str, interval: str | None) -> None:
    assert as_interval(s) == interval


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("\\$1\\,000", "1000"),
        ("1\\!000", "1000"),
        ("\\textbf{7}", "7"),
        ("**8**", "8"),
        ("5\\text{ cm}^2", "5"),
        ("5 \\mathrm{m^2}", "5"),
        ("\\varnothing", EMPTY),
        ("\\text{no solution}", EMPTY),
        ("\\text{twenty-one}", "21"),
        ("\\sqrt(2)", "\\sqrt{2}"),
        ("3sqrt(3)", "3\\sqrt{3}"),
        ("no", "no"),  # a yes/no answer is not the empty set
    ],
)
def test_normalization_gaps(raw: str, norm: str) -> None:
    assert normalize(raw) == norm


def test_number_words() -> None:
    assert number_from_words("one hundred and five") == 105
    assert number_from_words("negative three") == -3
    assert number_from_words("twelve apples") is None and number_from_words("and") is None


def test_invalid_unicode_becomes_valid_text() -> None:
    assert valid_unicode("caf\udcc3\udca9") == "café"  # bytes decoded with surrogateescape
    assert valid_unicode("x\ud800y") == "x\ufffdy"
    assert valid_unicode(5) == 5
    item = GradeItem(response="\\boxed{4}\udc80", gold="4")
    item.model_dump_json()  # encodes
    assert len(GradeItem(response="a" * 2_000_000, gold="1").response) == 2_000_000  # no length limit
