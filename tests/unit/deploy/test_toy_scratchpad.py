"""deploy.toy_warmup.toy_response: the warm-up's target scratchpad is arithmetic that checks out, for every 2-digit
pair, and subtraction starts with the sign token that says whether the operands were swapped."""

from __future__ import annotations

import itertools
import re

from deploy.toy_warmup import boxed_answer, toy_response
from problems.toy import toy_kind

_SUB = re.compile(r"^([+-]):(\d\d)-(\d\d):(\d+)-(\d)=(\d+),(\d)-(\d)-([01])=(-?\d+)\. \\boxed\{(-?\d+)\}$")
_ADD = re.compile(r"^(\d\d)\+(\d\d):(\d)\+(\d)=(\d+),(\d)\+(\d)\+([01])=(\d+)\. \\boxed\{(\d+)\}$")
_PAIRS = list(itertools.product(range(10, 100), repeat=2))


def test_subtraction_scratchpad_is_signed_and_correct() -> None:
    for a, b in _PAIRS:
        text = toy_response(f"What is {a}-{b}?", str(a - b))
        m = _SUB.match(text)
        assert m, text
        sign, x, y, top, yu, units, xt, yt, borrow, tens, boxed = m.groups()
        assert sign == ("-" if a < b else "+")
        assert (int(x), int(y)) == (max(a, b), min(a, b))
        assert int(top) - int(yu) == int(units) and int(top) == int(x) % 10 + 10 * int(borrow)
        assert int(xt) - int(yt) - int(borrow) == int(tens) and 10 * int(tens) + int(units) == int(x) - int(y)
        assert int(boxed) == a - b == int(boxed_answer(text))


def test_addition_scratchpad_has_no_sign_and_is_correct() -> None:
    for a, b in _PAIRS:
        text = toy_response(f"What is {a}+{b}?", str(a + b))
        m = _ADD.match(text)
        assert m, text
        _, _, au, bu, units, at, bt, carry, tens, boxed = m.groups()
        assert int(au) + int(bu) == int(units) and int(carry) == int(units) // 10
        assert int(at) + int(bt) + int(carry) == int(tens) and int(boxed) == a + b


def test_other_shapes_fall_back_to_the_boxed_answer() -> None:
    assert toy_response("What is 7-3?", "4") == "\\boxed{4}"
    assert toy_response("What is 123+4?", "127") == "\\boxed{127}"


def test_toy_kind_names_the_carry_and_borrow_the_scratchpad_writes() -> None:
    """problems.toy.toy_kind (the per-kind accuracy of live evaluations) agrees with the scratchpad's own carry
    and borrow digit on every 2-digit pair."""
    for a, b in _PAIRS:
        add = _ADD.match(toy_response(f"What is {a}+{b}?", str(a + b)))
        sub = _SUB.match(toy_response(f"What is {a}-{b}?", str(a - b)))
        assert add and sub
        assert toy_kind(f"What is {a}+{b}?") == ("add carry" if add.group(8) == "1" else "add")
        assert toy_kind(f"What is {a}-{b}?") == ("sub borrow" if sub.group(9) == "1" else "sub")
    assert toy_kind("What is 3*4?") == "mul" and toy_kind("Solve x^2 = 4.") is None
