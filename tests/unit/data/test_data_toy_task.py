"""The toy arithmetic generator: deterministic, correct gold answers, distinct problems, disjoint splits."""

from __future__ import annotations

import re

import pytest

from problems import DatasetError
from problems.toy import make_toy_task, toy_space_size, toy_splits

QUESTION = re.compile(r"^What is (\d+)([-+*])(\d+)\?$")


def parse(content: str) -> tuple[int, str, int]:
    m = QUESTION.match(content)
    assert m, content
    return int(m.group(1)), m.group(2), int(m.group(3))


def test_gold_answers_are_the_true_results() -> None:
    prompts = make_toy_task(500, digits=2, ops="+-*", seed=3)
    seen_ops = set()
    for p in prompts:
        assert [m["role"] for m in p.messages] == ["user"]
        a, op, b = parse(p.messages[0]["content"])
        assert 10 <= a < 100 and 10 <= b < 100  # exactly two digits: fixed-width operands
        expected = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert p.gold == str(expected)
        assert p.data_source == "toy_arith"
        seen_ops.add(op)
    assert seen_ops == {"+", "-", "*"}
    assert any(p.gold.startswith("-") for p in prompts)  # subtraction can go negative


def test_same_seed_same_problems_other_seed_other_problems() -> None:
    a = make_toy_task(100, seed=7)
    b = make_toy_task(100, seed=7)
    c = make_toy_task(100, seed=8)
    assert a == b
    assert [p.messages for p in a] != [p.messages for p in c]


def test_digits_fix_the_operand_width() -> None:
    for digits, lo in ((1, 0), (3, 100)):
        operands = set()
        for p in make_toy_task(300, digits=digits, seed=1):
            a, _, b = parse(p.messages[0]["content"])
            assert lo <= a < 10**digits and lo <= b < 10**digits
            operands |= {a, b}
        assert min(operands) < lo + 50 and max(operands) > 10**digits - 50


def test_problems_are_distinct_until_the_space_is_exhausted() -> None:
    space = toy_space_size(1, "+")
    assert space == 100
    prompts = make_toy_task(space, digits=1, ops="+", seed=0)
    assert len({p.messages[0]["content"] for p in prompts}) == space
    more = make_toy_task(space + 30, digits=1, ops="+", seed=0)
    assert len({p.prompt_id for p in more}) == space + 30  # ids stay unique even when problems repeat


def test_splits_are_disjoint_and_deterministic() -> None:
    train, test = toy_splits(5000, 200, seed=0)
    assert len(train) == 5000 and len(test) == 200
    train_q = {p.messages[0]["content"] for p in train}
    test_q = {p.messages[0]["content"] for p in test}
    assert len(test_q) == 200
    assert train_q.isdisjoint(test_q)
    assert toy_splits(5000, 200, seed=0) == (train, test)
    assert toy_splits(5000, 200, seed=1)[1] != test
    ids = [p.prompt_id for p in train + test]
    assert len(set(ids)) == len(ids)


def test_default_splits_fill_the_space_without_leaking_test_problems() -> None:
    # 2-digit +/- has 90 * 90 * 2 = 16,200 problems; the default train split (20,000) must repeat problems,
    # never test ones.
    assert toy_space_size(2, "+-") == 16200
    train, test = toy_splits()
    test_q = {p.messages[0]["content"] for p in test}
    assert not any(p.messages[0]["content"] in test_q for p in train)
    assert len({p.messages[0]["content"] for p in train}) == 16200 - 200


def test_test_split_does_not_depend_on_the_train_size() -> None:
    # The test split depends only on (n_test, digits, ops, seed): the cluster and the warm-up agree on it.
    assert toy_splits(100, 50)[1] == toy_splits(3000, 50)[1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"digits": 0}, "digits must be an integer in 1..9"),
        ({"digits": 2.5}, "digits must be an integer"),
        ({"ops": "/"}, "ops must be a non-empty string"),
        ({"ops": ""}, "ops must be a non-empty string"),
        ({"ops": "++"}, "distinct operators"),
    ],
)
def test_bad_generator_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        make_toy_task(10, **kwargs)


def test_bad_counts_are_refused() -> None:
    with pytest.raises(DatasetError, match="n must be a non-negative integer"):
        make_toy_task(-1)
    with pytest.raises(DatasetError, match="leaves no training problems"):
        toy_splits(10, 100, digits=1, ops="+")
    with pytest.raises(DatasetError, match="non-negative integers"):
        toy_splits(-5, 10)
