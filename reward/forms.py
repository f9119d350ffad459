r"""Structural forms of a normalized answer (no sympy): lists/sets of solutions and inequalities as intervals.

- ``as_items``: ``\{2,-3\}``, ``2, -3``, ``x = 2 and x = -3``, ``x_1=2, x_2=-3``, ``2 or -3`` -> ``["2", "-3"]``.
  A list of solutions is a set: order and repeats do not matter (tuples and intervals are single items).
- ``as_interval``: ``2<x<5`` -> ``(2,5)``, ``x\ge 3`` -> ``[3,\infty)``, ``x<-1 or x>3`` ->
  ``(-\infty,-1)\cup(3,\infty)``, ``x\in[0,1)`` -> ``[0,1)``. One variable only.
"""

from __future__ import annotations

import re

_OPEN, _CLOSE = "([{", ")]}"


def split_top(s: str, seps: re.Pattern[str]) -> list[str]:
    """Split at matches of `seps` that are outside every bracket (intervals like [0,1) count as brackets)."""
    parts: list[str] = []
    depth = 0
    start = i = 0
    while i < len(s):
        c = s[i]
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth = max(0, depth - 1)
        elif depth == 0:
            m = seps.match(s, i)
            if m and m.end() > i:
                parts.append(s[start:i])
                start = i = m.end()
                continue
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


_LIST_SEP_RE = re.compile(r"\s*(?:,|;|\\lor(?![A-Za-z])|\\vee(?![A-Za-z])|\s(?:and|or)\s)\s*", re.IGNORECASE)
_SPACED_ASSIGN_RE = re.compile(r"\s+(?=(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w+\}?)?\s*=)")
_ASSIGN_RE = re.compile(r"^([A-Za-z]|\\[A-Za-z]+)(?:_\{?\w+\}?)?\s*=\s*(.+)$")
_SET_RE = re.compile(r"^\\\{(.*)\\\}$")
_SET_OWNER_RE = re.compile(r"^(?:[A-Za-z]|\\[A-Za-z]+)\s*(?:=|\\in(?![A-Za-z]))\s*(?=\\\{)")
_TUPLE_RE = re.compile(r"^\((.*)\)$")


def as_items(s: str) -> tuple[list[str], bool] | None:
    """(items, written as a set) for a list/set of answers; None for a single answer.

    `x = 2` alone is a single answer (the grader's relation rules handle it); a set of one `\\{2\\}` is a list."""
    s = _SET_OWNER_RE.sub("", s.strip())  # x = \{2, 3\}, x \in \{2, 3\}
    m = _SET_RE.match(s)
    inner, is_set = (m.group(1), True) if m else (s, False)
    if is_set and not inner.strip():
        return None
    parts = split_top(inner, _LIST_SEP_RE)
    if len(parts) == 1:  # x=1 \quad x=2 (only spacing between assignments)
        parts = split_top(inner, _SPACED_ASSIGN_RE)
        if len(parts) > 1 and not all(_ASSIGN_RE.match(p) for p in parts):
            parts = [inner.strip()]
    if len(parts) == 1 and not is_set:
        parts = _plus_minus(parts[0])
    if any(not p for p in parts) or (len(parts) < 2 and not is_set):
        return None
    assigns = [_ASSIGN_RE.match(p) for p in parts]
    if assigns[0] and not any(assigns[1:]) and len(parts) > 1:  # x = 2 or -3: the name is written once
        parts = [assigns[0].group(2).strip(), *parts[1:]]
        assigns = [None] * len(parts)
    if all(assigns):
        names = {a.group(1) for a in assigns if a}
        if len(names) == 1:  # x = 2, x = -3 (or x_1, x_2): the values; different names are a system/tuple
            parts = [a.group(2).strip() for a in assigns if a]
        elif not is_set:
            return None
    elif any(assigns) or any(re.search(r"[<>]|\\[lg]eq?(?![A-Za-z])|\\ne(?![A-Za-z])", p) for p in parts):
        return None
    return parts, is_set


def strip_assignment(s: str) -> str:
    """`x = 2` -> `2` (any single name on the left); anything else unchanged."""
    m = _ASSIGN_RE.match(s.strip())
    return m.group(2).strip() if m else s


def as_tuple(s: str) -> list[str] | None:
    """The elements of an ordered pair/tuple `(a, b, ...)` (two or more), else None."""
    m = _TUPLE_RE.match(s.strip())
    if not m:
        return None
    parts = split_top(m.group(1), re.compile(r"\s*,\s*"))
    return parts if len(parts) >= 2 and all(parts) else None


def _plus_minus(s: str) -> list[str]:
    r"""`3 \pm \sqrt{2}` -> [`3+\sqrt{2}`, `3-\sqrt{2}`]; `x = \pm 5` -> [`x=5`, `x=-5`] (one top-level \pm)."""
    pieces = split_top(s, re.compile(r"\\pm(?![A-Za-z])"))
    if len(pieces) != 2 or not pieces[1]:
        return [s]
    head, rest = pieces
    if not head or head.endswith("="):
        return [f"{head}{rest}", f"{head}-{rest}"]
    return [f"{head}+{rest}", f"{head}-{rest}"]


# --------------------------------------------------------------------------------------------------------------
# Inequalities -> intervals
# --------------------------------------------------------------------------------------------------------------
_REL_RE = re.compile(r"(<=|>=|\\(?:leqslant|geqslant|leq|geq|le|ge)(?![A-Za-z])|<|>)")
_VAR_RE = re.compile(r"[A-Za-z]|\\(?:theta|alpha|beta|phi|lambda|mu|omega)")
_UNION_SEP_RE = re.compile(r"\s*(?:\\cup(?![A-Za-z])|\\lor(?![A-Za-z])|\sor\s|,\s*or\s)\s*", re.IGNORECASE)
_INTERVAL_RE = re.compile(r"^[(\[].*,.*[)\]]$")


def _rel(op: str) -> str:
    op = op.lstrip("\\")
    return "<=" if op.startswith("le") or op == "<=" else ">=" if op.startswith("ge") or op == ">=" else op


_SET_BUILDER_RE = re.compile(r"^\\\{\s*([A-Za-z])\s*(?:\\mid|\||:)\s*(.*)\\\}$")


def _one_interval(s: str) -> str | None:
    s = re.sub(r"^([A-Za-z]|\\theta)\s*\\in\s*", "", s.strip())
    builder = _SET_BUILDER_RE.match(s)  # \{x \mid 2 < x < 5\}
    if builder:
        s = builder.group(2)
    if _INTERVAL_RE.match(s) and not _REL_RE.search(s):
        return s.replace(" ", "")
    parts = [p.strip() for p in _REL_RE.split(s)]
    if len(parts) == 3:
        a, op, b = parts
        if _VAR_RE.fullmatch(b) and not _VAR_RE.fullmatch(a):  # 3 < x  ->  x > 3
            a, b, op = b, a, {"<": ">", ">": "<", "<=": ">=", ">=": "<="}[_rel(op)]
        if not _VAR_RE.fullmatch(a) or not b or _VAR_RE.fullmatch(b):
            return None
        op = _rel(op)
        if op in ("<", "<="):
            return f"(-\\infty,{b}{')' if op == '<' else ']'}"
        return f"{'(' if op == '>' else '['}{b},\\infty)"
    if len(parts) == 5 and _VAR_RE.fullmatch(parts[2]) and parts[0] and parts[4]:
        lo, op1, _, op2, hi = parts
        op1, op2 = _rel(op1), _rel(op2)
        if op1[0] == ">" and op2[0] == ">":  # 5 > x > 2  ->  2 < x < 5
            lo, hi, op1, op2 = hi, lo, op2.replace(">", "<"), op1.replace(">", "<")
        if op1[0] != "<" or op2[0] != "<":
            return None
        return f"{'(' if op1 == '<' else '['}{lo},{hi}{')' if op2 == '<' else ']'}"
    return None


_AND_SEP_RE = re.compile(r"\s*(?:\sand\s|\\land(?![A-Za-z])|\\wedge(?![A-Za-z])|,)\s*", re.IGNORECASE)


def _intersection(s: str) -> str | None:
    """`x > 2 and x < 5` -> `(2,5)`: one lower and one upper ray in the same variable."""
    pieces = split_top(s, _AND_SEP_RE)
    if len(pieces) != 2:
        return None
    rays = [_one_interval(p) for p in pieces]
    lower = next((r for r in rays if r and r.endswith(",\\infty)") and not r.startswith("(-\\infty")), None)
    upper = next((r for r in rays if r and r.startswith("(-\\infty,") and not r.endswith("\\infty)")), None)
    if lower is None or upper is None:
        return None
    return lower[: -len("\\infty)")] + upper[len("(-\\infty,") :]


def as_interval(s: str) -> str | None:
    """The interval (or union) an inequality in one variable describes, written without spaces; else None."""
    if not _REL_RE.search(s) and "\\in" not in s:
        return None
    builder = _SET_BUILDER_RE.match(s.strip())
    if builder:
        s = builder.group(2)
    both = _intersection(s)
    if both is not None:
        return both
    pieces = split_top(s, _UNION_SEP_RE)
    out = [_one_interval(p) for p in pieces]
    if any(o is None for o in out):
        return None
    return "\\cup".join(o for o in out if o)
