"""Math answer grading: extraction, normalization, exact fast paths, guards, and the math-verify step.

The pipeline for one (response, gold) pair (the policy in words: docs/grading.md):

1. ``reward.extraction.extract``: the final answer in the last ``TAIL_CHARS`` characters: the final group of
   ``\\boxed{}``/``\\fbox{}`` (several different boxes joined by "and"/"or"/commas are a list of solutions),
   else an answer phrase ("final answer is", "the answer is", "Answer:"), a bold last line, a closing sentence.
2. ``reward.normalize.normalize``: unicode, delimiters, currency, spacing, wrappers, units, number words, roots,
   the empty set.
3. ``decide``: identical strings; the empty set; lists of solutions compared as sets; inequalities as intervals;
   text answers as strings; plain numbers and rational expressions with powers exactly (``reward.exact``;
   a decimal approximates only to its own last digit); guards for what can hang sympy. Only what is left
   needs math-verify.
4. ``verify_pair`` (math-verify ``parse`` + ``verify(gold, pred)``, gold first, then an exactness check so that
   its float rounding never makes two different numbers equal) -- called ONLY inside supervised worker
   processes (``reward.pool``), because math-verify's timeouts rely on signals and sympy can hang.

False positives are worse than false negatives: wherever a rule is unsure, it answers incorrect.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Literal

from reward.exact import Number, exact_value, numbers_match, parse_number, power_form
from reward.extraction import Extraction, extract, extract_answer, find_boxes
from reward.forms import as_interval, as_items, as_tuple, strip_assignment
from reward.normalize import EMPTY, is_text_answer, key, normalize
from reward.schema import valid_unicode

__all__ = [
    "extract_answer",
    "find_boxes",
    "gold_answer",
    "guard_reason",
    "normalize",
    "numbers_match",
    "parse_number",
    "prepare",
    "grade_in_process",
    "verify_pair",
]

Verdict = Literal["correct", "incorrect", "no_answer"]

# Answers longer than this (after extraction) are never handed to sympy; string equality still counts.
MAX_ANSWER_CHARS = 1_000
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def gold_answer(gold: str) -> str:
    """Gold strings may be full solutions with a box (MATH style): take the box then."""
    if _BOX_RE.search(gold):
        ans = extract_answer(gold)
        if ans is not None:
            return ans
    return gold.strip()


# --------------------------------------------------------------------------------------------------------------
# Guards: keep what can hang or blow up sympy away from it
# --------------------------------------------------------------------------------------------------------------
def guard_reason(s: str, max_chars: int = MAX_ANSWER_CHARS) -> str | None:
    """Why `s` must not reach sympy (None: it may)."""
    if len(s) > max_chars:
        return "too long"
    depth = best = 0
    for c in s:
        if c in "{([":
            depth += 1
            best = max(best, depth)
        elif c in "})]":
            depth -= 1
    if best > 12:
        return "deep nesting"
    carets = [m.start() for m in re.finditer(r"\^|\*\*", s)]
    if len(carets) > 8:
        return "too many powers"
    # A power whose exponent itself holds a power: 2^{3^{4}}, 9^9^9, 10^{10^{10}}.
    if re.search(r"(?:\^|\*\*)\s*(?:\{[^{}]*|\(?[^{}\s]*)(?:\^|\*\*)", s):
        return "power tower"
    for m in re.finditer(r"(?:\^|\*\*)\s*\{?\s*\(?\s*[+-]?(\d+)", s):
        if len(m.group(1)) > 4:
            return "huge exponent"
    if re.search(r"(\d{4,}|\))\s*!|!\s*!|\\(?:Gamma|operatorname\{?\s*(?:gamma|factorial))", s):
        return "huge factorial"
    if re.search(r"\\binom\s*\{\s*\d{5,}", s) or re.search(r"\d{300,}", s):
        return "huge literal"
    return None


# --------------------------------------------------------------------------------------------------------------
# The in-process decision (no sympy)
# --------------------------------------------------------------------------------------------------------------
_VAR_LHS_RE = re.compile(r"\\?[A-Za-z]+(?:_\{?[A-Za-z0-9]+\}?)?(?:\([A-Za-z, ]*\))?")


def _relation_mismatch(pred: str, gold: str) -> str | None:
    """Reject relations the gold does not have: `7=7` or `\\approx 7` for gold `7` (math-verify would take the
    right-hand side). An assignment `x = 7` (a variable on the left) stays allowed."""
    if re.search(r"\\(?:approx|sim|simeq|cong|neq|ne)(?![A-Za-z])", pred) and not re.search(
        r"\\(?:approx|sim|simeq|cong|neq|ne)(?![A-Za-z])", gold
    ):
        return "approximation"
    if "=" in pred and "=" not in gold:
        lhs = pred.split("=", 1)[0].strip()
        if not _VAR_LHS_RE.fullmatch(lhs):
            return "relation"
    return None


@dataclass(frozen=True)
class Prepared:
    """Outcome of the cheap stage: a final verdict, or the normalized pair math-verify must decide."""

    extracted: str | None
    verdict: Verdict | None  # None: needs math-verify
    pred: str = ""
    gold: str = ""
    reason: str = ""


def _number(s: str, max_chars: int = MAX_ANSWER_CHARS) -> Number | None:
    """A plain number, or the exact value of a rational expression with powers (2^{10}, 1/10^{12}); what the
    guards call too long or too deeply nested stays theirs."""
    n = parse_number(s)
    if n is not None:
        return n
    if not s.isdigit() and (len(s) > max_chars or guard_reason(s, max_chars) in ("deep nesting", "too long")):
        return None
    v = exact_value(s)
    return None if v is None else (v, None)


def _same_item(a: str, b: str) -> bool | None:
    """Two list items: True/False when decided without sympy, None when math-verify must decide."""
    if key(a) == key(b):
        return True
    an, bn = _number(a), _number(b)
    if an is not None and bn is not None:
        return numbers_match(an, bn)
    if is_text_answer(a) or is_text_answer(b) or EMPTY in (a, b):
        return a.lower() == b.lower()
    return None


def _compare_lists(pred: list[str], gold: list[str]) -> tuple[Verdict | None, str, str]:
    """Sets of solutions: (verdict or None, pred, gold as `\\{...\\}` for math-verify when undecided)."""
    p = list(dict.fromkeys(normalize(strip_assignment(x)) for x in pred))
    g = list(dict.fromkeys(normalize(strip_assignment(x)) for x in gold))
    canon = ("\\{" + ", ".join(p) + "\\}", "\\{" + ", ".join(g) + "\\}")
    if len(p) != len(g):
        return "incorrect", *canon
    unmatched = list(g)
    for x in p:
        hit = next((y for y in unmatched if _same_item(x, y)), None)
        if hit is None:
            if all(_same_item(x, y) is False for y in unmatched):
                return "incorrect", *canon
            return None, *canon  # some pair needs sympy
        unmatched.remove(hit)
    return "correct", *canon


def _structure(ext: Extraction, pred: str, g: str) -> tuple[Verdict | None, str, str, str]:
    """Lists, sets and inequalities: (verdict or None, reason, pred, gold) with forms rewritten for later stages."""
    gi, pi = as_items(g), as_items(pred)
    if ext.items and gi is None:
        elements = as_tuple(g)
        if elements is not None and len(elements) == len(ext.items):  # x = \boxed{2}, y = \boxed{3} vs (2, 3)
            pred = "(" + ", ".join(normalize(strip_assignment(x)) for x in ext.items) + ")"
            return ("correct", "tuple", pred, g) if key(pred) == key(g) else (None, "", pred, g)
        values = [_number(normalize(strip_assignment(x))) for x in ext.items]
        if all(v is not None for v in values) and len({v[0] for v in values if v is not None}) == 1:
            pred, pi = (
                normalize(strip_assignment(ext.items[-1])),
                None,
            )  # \boxed{4} (or \boxed{2^2}): one value
        else:  # several different final boxes against one gold value: a hedge
            return "no_answer", "several final answers", pred, g
    if gi is not None or pi is not None:
        verdict, p_canon, g_canon = _compare_lists(pi[0] if pi else [pred], gi[0] if gi else [g])
        n = len(gi[0]) if gi else 0
        if verdict != "correct" and 2 <= n <= len(ext.last_boxes):
            # A multi-part answer boxed part by part (separate lines or paragraphs): its last n boxes.
            if _compare_lists(list(ext.last_boxes[-n:]), gi[0])[0] == "correct":  # type: ignore[index]
                return "correct", "list of last boxes", p_canon, g_canon
        return verdict, "list", p_canon, g_canon
    g_int, p_int = as_interval(g), as_interval(pred)
    if g_int is not None or p_int is not None:
        g, pred = g_int or g, p_int or pred
        if key(g) == key(pred):
            return "correct", "interval", pred, g
    return None, "", pred, g


_CHOICE_RE = re.compile(r"\(([A-E])\)\s*(\S.*)")


def decide(ext: Extraction, pred: str, g: str, max_answer_chars: int) -> Prepared:
    """The cheap decision on a normalized (pred, gold) pair; verdict None leaves it to math-verify."""
    raw = ext.answer
    if key(pred) == key(g):
        return Prepared(raw, "correct", reason="identical")
    if EMPTY in (pred, g):
        return Prepared(raw, "incorrect", reason="empty set")
    verdict, why, pred, g = _structure(ext, pred, g)
    if verdict is not None:
        return Prepared(raw, verdict, reason=why)
    if is_text_answer(g) or is_text_answer(pred):
        same = pred.lower() == g.lower() and is_text_answer(pred) and is_text_answer(g)
        return Prepared(raw, "correct" if same else "incorrect", reason="text")
    choice = _CHOICE_RE.fullmatch(pred)  # "(D) 42": an option letter with its value (AMC style)
    if re.fullmatch(r"[A-Z]", g):  # a multiple-choice letter: exact letter only (sympy would see a symbol)
        same = choice is not None and choice.group(1) == g
        return Prepared(raw, "correct" if same else "incorrect", reason="choice")
    if choice is not None:
        return decide(ext, normalize(choice.group(2)), g, max_answer_chars)
    why = _relation_mismatch(pred, g)
    if why is not None:
        return Prepared(raw, "incorrect", reason=why)
    gn, pn = _number(g, max_answer_chars), _number(pred, max_answer_chars)
    if gn is not None and pn is not None:
        return Prepared(raw, "correct" if numbers_match(gn, pn) else "incorrect", reason="number")
    gp, pp = power_form(g), power_form(pred)
    if gp is not None and pp is not None:  # powers too large to compute: b^e = c^f iff same root and exponent
        return Prepared(raw, "correct" if gp == pp else "incorrect", reason="power")
    for side in (pred, g):
        why = guard_reason(side, max_answer_chars)
        if why is not None:
            return Prepared(raw, "incorrect", reason=f"guard: {why}")
    return Prepared(raw, None, pred=pred, gold=g)


def prepare(response: str, gold: str, max_answer_chars: int = MAX_ANSWER_CHARS) -> Prepared:
    """Extraction, normalization, fast paths and guards. Never calls sympy."""
    response, gold = valid_unicode(response), valid_unicode(gold)
    ext = extract(response)
    if ext.answer is None:
        return Prepared(None, "no_answer", reason="no final answer")
    pred = normalize(ext.answer)
    if not pred:
        return Prepared(ext.answer, "no_answer", reason="empty answer")
    return decide(ext, pred, normalize(gold_answer(gold)), max_answer_chars)


# --------------------------------------------------------------------------------------------------------------
# math-verify (worker processes only)
# --------------------------------------------------------------------------------------------------------------
_MV: tuple | None = None


def load_math_verify() -> None:
    """Import math-verify/sympy once (workers call it at start so the first grade is not slow)."""
    global _MV
    if _MV is None:
        import logging

        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

        # We pass no timeouts to math-verify (the worker runs one ITIMER around the whole pair); silence its
        # one-time warning about that.
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        _enable_two_stage_latex_parsing()
        _MV = (parse, verify, [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()])


def _enable_two_stage_latex_parsing() -> None:
    """Parse LaTeX with ANTLR's fast SLL prediction first and fall back to full LL only when SLL fails.

    This is ANTLR's documented two-stage strategy: SLL reports an error where it cannot decide, and then the
    slow full-context LL parse runs. Full-context prediction in the pure-Python ANTLR runtime is ~80% of
    math-verify's time on MATH-style answers; SLL makes parsing ~5x faster (measured on the bench mix).
    Only the parser's prediction mode changes, nothing in math-verify's comparison logic.
    """
    try:
        from antlr4.atn.PredictionMode import PredictionMode
        from latex2sympy2_extended import latex2sympy2 as l2s
    except ImportError:  # a different latex2sympy2 layout: keep the library's default (correct, slower)
        return
    cls = getattr(l2s, "_Latex2Sympy", None)
    if cls is None or getattr(cls, "_tbrm_two_stage", False):
        return
    create_parser, parse = cls.create_parser, cls.parse
    mode = {"sll": True}

    def create_parser_with_mode(self, latex_str):
        parser = create_parser(self, latex_str)
        if mode["sll"]:
            parser._interp.predictionMode = PredictionMode.SLL
        return parser

    def two_stage_parse(self, latex_str):
        mode["sll"] = True
        try:
            return parse(self, latex_str)
        except Exception:  # noqa: BLE001 - SLL could not decide (or the input is bad): redo with full LL
            mode["sll"] = False
            try:
                return parse(self, latex_str)
            finally:
                mode["sll"] = True

    cls.create_parser = create_parser_with_mode
    cls.parse = two_stage_parse
    cls._tbrm_two_stage = True


@functools.lru_cache(maxsize=8192)
def _parse(s: str) -> tuple:
    """math-verify parse of one normalized answer, cached per worker: gold strings repeat for every sample of a
    prompt and right answers repeat across samples, and parsing costs more than verifying."""
    assert _MV is not None
    parse, _, config = _MV
    return tuple(parse(f"$\\boxed{{{s}}}$", extraction_config=config, parsing_timeout=None))


# Values substituted for free symbols in the numeric disagreement check (irrational-looking, positive).
_PROBE_VALUES = (0.6180339887, 1.4142135623, 2.7182818284, 0.5772156649, 1.7320508075, 3.1415926535)


def surely_different(gold: object, pred: object) -> bool:
    """True only when two scalar sympy expressions evaluate to clearly different numbers (at the same probe
    point for any free symbols). Equal expressions agree at every point, so this can never reject a right
    answer; it spares math-verify's slowest path (all strategies failing) for the common wrong answer."""
    from sympy import Expr, FiniteSet

    if isinstance(gold, FiniteSet) and isinstance(pred, FiniteSet):
        return _sets_surely_different(gold, pred)
    if not (isinstance(gold, Expr) and isinstance(pred, Expr)):
        return False
    symbols = gold.free_symbols | pred.free_symbols
    if gold.free_symbols != pred.free_symbols or len(symbols) > len(_PROBE_VALUES):
        return False
    point = {sym: val for sym, val in zip(sorted(symbols, key=str), _PROBE_VALUES, strict=False)}
    try:
        a = complex(gold.evalf(20, subs=point))
        b = complex(pred.evalf(20, subs=point))
    except (TypeError, ValueError, ArithmeticError, AttributeError):
        return False
    if not all(map(math.isfinite, (a.real, a.imag, b.real, b.imag))):
        return False
    return abs(a - b) > 1e-5 * max(1.0, abs(a), abs(b))


def _constant_values(items: object) -> list[complex] | None:
    from sympy import Expr

    values = []
    for x in items:  # type: ignore[attr-defined]
        if not isinstance(x, Expr) or x.free_symbols:
            return None
        try:
            v = complex(x.evalf(20))
        except (TypeError, ValueError, ArithmeticError, AttributeError):
            return None
        if not (math.isfinite(v.real) and math.isfinite(v.imag)):
            return None
        values.append(v)
    return values


def _sets_surely_different(gold: object, pred: object) -> bool:
    """Two finite sets of constants: True when some element of one has no clearly equal element in the other
    (the same test as for scalars, element by element), so math-verify's slow set matching is skipped."""
    a, b = _constant_values(gold), _constant_values(pred)
    if a is None or b is None:
        return False
    close = lambda x, y: abs(x - y) <= 1e-5 * max(1.0, abs(x), abs(y))  # noqa: E731
    return len(a) != len(b) or any(not any(close(x, y) for y in b) for x in a)


# Relative tolerance between two numbers when one side holds a decimal (a sympy Float): about the 6 significant
# digits math-verify rounds to, but relative to the magnitude instead of absolute.
FLOAT_REL_TOL = 1e-6
# Two exact forms (no decimal on either side) must agree to double precision after a 50-digit evaluation.
EXACT_REL_TOL = 1e-12


def numerically_different(gold: object, pred: object) -> bool:
    """True when two constant scalars that math-verify called equal differ beyond the tolerance rule.

    math-verify rounds numbers to 6 decimal places, so 1/10^{12} and 2/10^{12} (or 10^{-20} and 2*10^{-20})
    come out equal; exact forms must compare exactly, and a decimal only within FLOAT_REL_TOL of the value."""
    from sympy import Expr, Float

    if not (isinstance(gold, Expr) and isinstance(pred, Expr)) or gold.free_symbols or pred.free_symbols:
        return False
    try:
        a = complex(gold.evalf(50))
        b = complex(pred.evalf(50))
    except (TypeError, ValueError, ArithmeticError, AttributeError):
        return False
    if not all(map(math.isfinite, (a.real, a.imag, b.real, b.imag))):
        return False
    tol = FLOAT_REL_TOL if gold.has(Float) or pred.has(Float) else EXACT_REL_TOL
    return abs(a - b) > tol * max(abs(a), abs(b))


@functools.cache
def _plain_real_assumptions() -> dict[str, bool]:
    from sympy import Symbol

    return Symbol("x", real=True).assumptions0


def _value_differs(gold: object, pred: object) -> bool:
    """True when math-verify's `sympy_expr_eq(gold, pred)` is sure to be False because `gold` is an exact number
    (a sympy Rational: 7, -8, 1/2) and `pred` an expression in plain real variables (`11h`, `1k1`, `10 w h a t x`:
    what the latex parser makes of letters) whose value at the probe point clearly differs from it.

    Why this never changes math-verify's verdict (grader.sympy_expr_eq of math-verify 0.9, step by step): `gold` is no
    relation and `pred` no relation, set, tuple or Symbol, so only these comparisons run: `gold == pred`
    (structural: `pred` has free symbols, `gold` none: False); `sympy_numeric_eq` (neither side is a Float or an
    Integer, or such a percentage, since `pred` has free symbols, so it compares `gold.doit() == pred.doit()`: doit
    keeps the value, and `pred` takes a value other than `gold` at the probe point, so `pred.doit()` is no
    number, let alone `gold`); `simplify(gold - pred).is_zero` (simplify keeps the value, and `gold - pred` is
    nonzero at the probe point, a point of the variables' domain: they are real and it is real). Expressions
    that only look variable (`0 x`, `x - x + 5`, `\\sin^2 x + \\cos^2 x`) take the gold value at the probe
    point (or none) and are left to math-verify.
    """
    from sympy import Expr, Rational, Symbol

    if not (isinstance(gold, Rational) and isinstance(pred, Expr)) or isinstance(pred, Symbol):
        return False
    symbols = pred.free_symbols
    if not symbols or len(symbols) > len(_PROBE_VALUES):
        return False
    plain = _plain_real_assumptions()
    if any(type(sym) is not Symbol or sym.assumptions0 != plain for sym in symbols):
        return False
    point = {sym: val for sym, val in zip(sorted(symbols, key=str), _PROBE_VALUES, strict=False)}
    try:
        b = complex(pred.evalf(20, subs=point))
    except (TypeError, ValueError, ArithmeticError, AttributeError):
        return False
    if not (math.isfinite(b.real) and math.isfinite(b.imag)):
        return False
    a = float(gold)
    return abs(a - b) > 1e-5 * max(1.0, abs(a), abs(b))


def math_verify_rejects(gold_parsed: tuple, pred_parsed: tuple) -> bool:
    """True only when math-verify's `verify(gold_parsed, pred_parsed)` is sure to answer False without running
    it: `verify` is True iff some (gold, pred) element pair compares equal, where two strings compare by
    (stripped, non-empty) equality, a string and an expression never, and two expressions by `sympy_expr_eq`;
    this checks every pair, and for expressions accepts only what `_value_differs` proves unequal. The common
    case is a sampled answer of letters and digits (`11H`, `1Please18`) against a number: math-verify's
    `simplify` of such a difference costs 5-200 ms, this a fraction of a millisecond."""
    from sympy import Basic

    for g in gold_parsed:
        for p in pred_parsed:
            if isinstance(g, str) and isinstance(p, str):
                if g.strip() and g.strip() == p.strip():
                    return False
            elif isinstance(g, Basic) and isinstance(p, Basic):
                if not _value_differs(g, p):
                    return False
            elif isinstance(g, str) == isinstance(p, str):  # matrices: not ours to judge
                return False
    return True


def verify_pair(pred: str, gold: str, *, fast: bool = True) -> bool:
    """math-verify on a normalized pair: parse both (wrapped in a box), then verify(gold, pred), gold first.

    Runs without math-verify's own signal.alarm timeouts: the caller (a worker process) bounds the whole call.
    `fast=False` skips `math_verify_rejects` (the tests compare both ways).
    """
    load_math_verify()
    assert _MV is not None
    _, verify, _ = _MV
    gold_parsed = _parse(gold)
    pred_parsed = _parse(pred)
    if not gold_parsed or not pred_parsed:
        return False
    if fast and math_verify_rejects(gold_parsed, pred_parsed):
        return False
    if surely_different(gold_parsed[0], pred_parsed[0]):
        return False
    if not verify(list(gold_parsed), list(pred_parsed), timeout_seconds=None):
        return False
    return not numerically_different(gold_parsed[0], pred_parsed[0])


def grade_in_process(response: str, gold: str) -> tuple[str, str | None]:
    """Whole pipeline in this process (for tests and the benchmark baseline; the service uses workers)."""
    prep = prepare(response, gold)
    if prep.verdict is not None:
        return prep.verdict, prep.extracted
    return ("correct" if verify_pair(prep.pred, prep.gold) else "incorrect"), prep.extracted
