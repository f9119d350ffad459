"""The synthetic arithmetic toy task: `a op b` problems with exact integer answers, deterministic in a seed."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Iterator

from buffer.schema import Prompt
from problems import DatasetError

TOY_OPS = "+-*"
"""Operators the toy generator knows (integer results only, so no division)."""


def _check_toy_args(digits: int, ops: str) -> None:
    if not isinstance(digits, int) or isinstance(digits, bool) or not 1 <= digits <= 9:
        raise DatasetError(f"digits must be an integer in 1..9, got {digits!r}")
    if not isinstance(ops, str) or not ops or any(op not in TOY_OPS for op in ops) or len(set(ops)) != len(ops):
        raise DatasetError(f"ops must be a non-empty string of distinct operators from {TOY_OPS!r}, got {ops!r}")


def _operand_range(digits: int) -> tuple[int, int]:
    """Operands have exactly `digits` digits (10..99 for 2), 0..9 for 1 digit. A fixed width keeps every
    operand digit at a fixed offset from the operator, which small models learn much faster."""
    return (10 ** (digits - 1) if digits > 1 else 0), 10**digits


def _toy_problem(index: int, digits: int, ops: str) -> tuple[str, str]:
    """Decode a problem index into (expression, value). The index enumerates every (a, op, b) with a, b in
    `_operand_range(digits)`, so sampling indices without replacement gives distinct problems."""
    op = ops[index % len(ops)]
    rest = index // len(ops)
    lo, hi = _operand_range(digits)
    a, b = lo + rest % (hi - lo), lo + rest // (hi - lo)
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a}{op}{b}", str(value)


def toy_space_size(digits: int = 2, ops: str = "+-") -> int:
    """Number of distinct toy problems for these settings."""
    _check_toy_args(digits, ops)
    lo, hi = _operand_range(digits)
    return (hi - lo) ** 2 * len(ops)


def toy_question(expression: str) -> str:
    """The user turn of a toy problem (short on purpose: the toy model's context is small)."""
    return f"What is {expression}?"


def toy_kind(question: str) -> str | None:
    """The column step a toy question needs: "add carry" when its units digits sum to 10 or more, "sub borrow" when
    the larger operand's units digit is the smaller (subtraction is worked larger minus smaller, as the toy's
    scratchpad does), else "add" / "sub"; "mul"; None for any other text."""
    m = re.fullmatch(r"What is (\d+)([-+*])(\d+)\?", question.strip())
    if m is None:
        return None
    a, op, b = int(m[1]), m[2], int(m[3])
    if op == "*":
        return "mul"
    if op == "+":
        return "add carry" if a % 10 + b % 10 >= 10 else "add"
    return "sub borrow" if max(a, b) % 10 < min(a, b) % 10 else "sub"


def _toy_prompt(prompt_id: str, expression: str, value: str, data_source: str) -> Prompt:
    return Prompt(
        prompt_id=prompt_id,
        messages=[{"role": "user", "content": toy_question(expression)}],
        gold=value,
        data_source=data_source,
    )


def _draw(rng: random.Random, pool: list[int] | range, n: int) -> Iterator[int]:
    """n indices from `pool`: without replacement while the pool lasts, then further shuffled passes
    (so asking for more problems than exist repeats problems instead of failing)."""
    left = n
    while left > 0:
        k = min(left, len(pool))
        yield from rng.sample(pool, k)
        left -= k


def make_toy_task(
    n: int, *, digits: int = 2, ops: str = "+-", seed: int = 0, data_source: str = "toy_arith"
) -> list[Prompt]:
    """`n` arithmetic problems `a op b` with `digits`-digit operands (0..9 for 1), deterministic in `seed`.

    Problems are distinct while `n` does not exceed the problem space (`toy_space_size`), and prompt ids
    (`{data_source}-{i}`) are always unique. Gold answers are exact integers (may be negative for `-`).
    """
    _check_toy_args(digits, ops)
    if not isinstance(n, int) or n < 0:
        raise DatasetError(f"n must be a non-negative integer, got {n!r}")
    rng = random.Random(f"toy:{seed}:{digits}:{ops}")
    space = range(toy_space_size(digits, ops))
    out = []
    for i, idx in enumerate(_draw(rng, space, n)):
        expr, value = _toy_problem(idx, digits, ops)
        out.append(_toy_prompt(f"{data_source}-{i:06d}", expr, value, data_source))
    return out


def toy_splits(
    n_train: int = 20000, n_test: int = 200, *, digits: int = 2, ops: str = "+-", seed: int = 0,
    data_source: str = "toy_arith",
) -> tuple[list[Prompt], list[Prompt]]:
    """Disjoint train/test splits of the toy task: no test problem appears in the train split.

    The test split is `n_test` distinct problems; the train split draws from the remaining problems (distinct
    while they last, then repeated). Ids are `{data_source}-train-{i}` and `{data_source}-test-{i}`.
    The same arguments always give the same splits (the cluster evaluates on this test split).
    """
    _check_toy_args(digits, ops)
    space = toy_space_size(digits, ops)
    if not isinstance(n_test, int) or not isinstance(n_train, int) or n_test < 0 or n_train < 0:
        raise DatasetError(f"n_train and n_test must be non-negative integers, got {n_train!r}, {n_test!r}")
    if n_test >= space:
        raise DatasetError(f"n_test={n_test} leaves no training problems: only {space} distinct problems exist")
    rng = random.Random(f"toy-splits:{seed}:{digits}:{ops}")
    test_idx = rng.sample(range(space), n_test)
    taken = set(test_idx)
    # The remaining indices as a list: fine for the small spaces the toy uses; for large spaces sample by
    # rejection instead of materializing billions of indices.
    test = [
        _toy_prompt(f"{data_source}-test-{i:05d}", *_toy_problem(idx, digits, ops), data_source)
        for i, idx in enumerate(test_idx)
    ]
    if space <= 2_000_000:
        rest = [i for i in range(space) if i not in taken]
        train_idx: Iterable[int] = _draw(rng, rest, n_train)
    else:
        train_idx = _rejection_draw(rng, space, taken, n_train)
    train = [
        _toy_prompt(f"{data_source}-train-{i:06d}", *_toy_problem(idx, digits, ops), data_source)
        for i, idx in enumerate(train_idx)
    ]
    return train, test


def _rejection_draw(rng: random.Random, space: int, excluded: set[int], n: int) -> Iterator[int]:
    seen: set[int] = set()
    while len(seen) < n:
        idx = rng.randrange(space)
        if idx not in excluded and idx not in seen:
            seen.add(idx)
            yield idx
