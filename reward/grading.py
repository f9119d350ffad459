"""Math answer grading: extraction, normalization, a fast exact path, guards, and the math-verify step.

The pipeline for one (response, gold) pair:

1. ``extract_answer(response)``: the last ``\\boxed{}``/``\\fbox{}`` (real brace matching; ``\\{`` does not
   count), else "the final answer is ...", else an ``Answer:`` last line. An unclosed final box, an empty box, or
   several *different* boxed answers in the final paragraph give no answer (hedging must never earn reward).
2. ``normalize``: unicode digits/minus/symbols, ``$``, ``\\left``/``\\right``, spacing macros, ``\\text{}``,
   ``\\dfrac``/``\\tfrac``, degrees, percent, thousands separators, trailing unit words after a number.
3. ``fast_grade``: identical normalized strings -> correct; two plain numbers (integers, decimals, fractions,
   scientific notation, repeating decimals) are compared exactly with ``Fraction``; text answers (words) are
   compared as strings; anything a guard flags (power towers, huge factorials, deep nesting, huge literals) is
   decided without sympy (incorrect). Only what is left needs math-verify.
4. ``verify_pair`` (math-verify ``parse`` + ``verify(gold, pred)``, gold first) -- called ONLY inside supervised
   worker processes (``reward.pool``), because math-verify's timeouts rely on signals and sympy can hang or blow
   up memory.

False positives are worse than false negatives: wherever a rule is unsure, it answers incorrect.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

Verdict = Literal["correct", "incorrect", "no_answer"]

# Answers longer than this (after extraction) are never handed to sympy; string equality still counts.
MAX_ANSWER_CHARS = 1_000

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


# --------------------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Box:
    start: int
    end: int
    content: str | None  # None: the box was never closed


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of each `{` -> index of its closing `}` (escaped `\\{`/`\\}` skipped), in one O(n) pass.

    One pass for the whole text keeps extraction linear even for thousands of (unclosed) boxes.
    """
    pairs: dict[int, int] = {}
    stack: list[int] = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2  # an escaped char (\{, \}, \\) never opens or closes a group
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def find_boxes(text: str) -> list[Box]:
    """Every `\\boxed`/`\\fbox` in order, with its brace-matched content (or None when unclosed)."""
    boxes: list[Box] = []
    pairs: dict[int, int] | None = None
    for m in _BOX_RE.finditer(text):
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            if pairs is None:
                pairs = _brace_pairs(text)
            close = pairs.get(i)
            if close is None:
                boxes.append(Box(m.start(), len(text), None))
            else:
                boxes.append(Box(m.start(), close + 1, text[i + 1 : close]))
        elif i > m.end():
            # `\boxed 5`: TeX takes the next token; take the run up to whitespace or `$`.
            tok = re.match(r"[^\s$]+", text[i:])
            boxes.append(Box(m.start(), i + (tok.end() if tok else 0), tok.group(0) if tok else None))
        else:
            boxes.append(Box(m.start(), m.end(), None))
    return boxes


_FINAL_ANSWER_RE = re.compile(r"final\s+answer\s+is\s*:?\s*", re.IGNORECASE)
_ANSWER_LINE_RE = re.compile(r"^[\s*#>_-]*(?:final\s+)?answer\s*[:：](.+)$", re.IGNORECASE)


def _strip_answer_text(s: str) -> str:
    s = s.strip().strip("*_ ")
    # Content of the first math span if the answer is written in math mode ($...$, \(...\), \[...\]).
    m = re.match(r"^\$\$?(.+?)\$\$?", s) or re.match(r"^\\\((.+?)\\\)", s) or re.match(r"^\\\[(.+?)\\\]", s)
    if m:
        return m.group(1).strip()
    return s.rstrip(" .").strip()


def extract_answer(response: str) -> str | None:
    """The final answer of `response`, or None when there is none (or it is ambiguous/unclosed)."""
    boxes = find_boxes(response)
    if boxes:
        last = boxes[-1]
        if last.content is None or not last.content.strip():
            return None
        # The final paragraph's boxes (no blank line between them) must agree.
        group = [last]
        for box in reversed(boxes[:-1]):
            if box.end > group[0].start:
                continue  # encloses a later box (nested boxes): part of it, not a separate answer
            if box.content is None or "\n\n" in response[box.end : group[0].start]:
                break
            group.insert(0, box)
            if len(group) > 16:
                return None  # a wall of boxes is not a final answer
        answers = {normalize(b.content or "") for b in group}
        if len(answers) > 1:
            return None
        return last.content.strip()
    hits = list(_FINAL_ANSWER_RE.finditer(response))
    if hits:
        rest = response[hits[-1].end() :].split("\n", 1)[0]
        ans = _strip_answer_text(rest)
        return ans or None
    lines = [ln for ln in response.strip().splitlines() if ln.strip()]
    if lines:
        m = _ANSWER_LINE_RE.match(lines[-1])
        if m:
            ans = _strip_answer_text(m.group(1))
            return ans or None
    return None


def gold_answer(gold: str) -> str:
    """Gold strings may be full solutions with a box (MATH style): take the box then."""
    if _BOX_RE.search(gold):
        ans = extract_answer(gold)
        if ans is not None:
            return ans
    return gold.strip()


# --------------------------------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------------------------------
_SUPERSCRIPTS = str.maketrans({"⁰": "^0", "¹": "^1", "²": "^2", "³": "^3", "⁴": "^4", "⁵": "^5", "⁶": "^6",
                               "⁷": "^7", "⁸": "^8", "⁹": "^9", "⁻": "^-"})
_SYMBOLS = {
    "−": "-", "–": "-", "—": "-", "‐": "-", "‒": "-", "﹣": "-", "－": "-",
    "×": r"\times ", "·": r"\cdot ", "⋅": r"\cdot ", "÷": r"\div ", "∗": "*",
    "π": r"\pi ", "∞": r"\infty ", "√": r"\sqrt ", "≤": r"\le ", "≥": r"\ge ", "≠": r"\ne ",
    "∪": r"\cup ", "∩": r"\cap ", "∈": r"\in ", "±": r"\pm ", "°": r"^\circ ", "º": r"^\circ ",
    "⁄": "/", "∕": "/", "，": ",", "：": ":", "（": "(", "）": ")",
    "\u00a0": " ", "\u2009": " ", "\u202f": " ", "\u200b": "",
}
_SYMBOL_RE = re.compile("|".join(map(re.escape, _SYMBOLS)))


def normalize_unicode(s: str) -> str:
    s = s.translate(_SUPERSCRIPTS)
    s = _SYMBOL_RE.sub(lambda m: _SYMBOLS[m.group(0)], s)
    if s.isascii():
        return s
    # NFKC folds fullwidth digits/letters and vulgar fractions (½ -> 1⁄2); other scripts' digits via unicodedata.
    s = unicodedata.normalize("NFKC", s)
    s = _SYMBOL_RE.sub(lambda m: _SYMBOLS[m.group(0)], s)
    return "".join(str(unicodedata.digit(c)) if not c.isascii() and c.isdigit() else c for c in s)


_TEXT_MACRO_RE = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mbox|hbox|operatorname)\s*\{([^{}]*)\}")
_UNIT_WORD_RE = re.compile(r"^([+-]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:/\d+)?)\s+([A-Za-z]{2,}\.?(?:\s+[A-Za-z]{2,}\.?){0,2})$")
_NOT_UNITS = {"pi", "or", "and", "to", "sqrt", "times", "cdot", "div", "infty", "in"}


def normalize(s: str) -> str:
    """Canonical string form used for the fast path and handed to math-verify."""
    s = normalize_unicode(s)
    s = s.replace("\n", " ").strip()
    s = s.strip("$").strip()
    if s.startswith("\\[") and s.endswith("\\]") or s.startswith("\\(") and s.endswith("\\)"):
        s = s[2:-2].strip()
    s = re.sub(r"\\(?:displaystyle|textstyle|scriptstyle)(?![A-Za-z])", "", s)
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big|biggl|biggr|bigg|Bigg)(?![A-Za-z])\s*", "", s)
    s = re.sub(r"(?<!\\)\\[,;:! ]|~|\\q?quad(?![A-Za-z])", " ", s)  # not the `\ ` of a `\\` row break
    s = re.sub(r"\\[dtc]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    for _ in range(4):  # \text{...} -> ...  (innermost first; a few rounds cover nesting)
        new = _TEXT_MACRO_RE.sub(r"\1", s)
        if new == s:
            break
        s = new
    # Degrees and percent mean "the number" for grading purposes (as in the MATH normalizer).
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![A-Za-z])|\\degree(?![A-Za-z])", "", s)
    s = re.sub(r"\s*(?:degrees?|deg)\s*$", "", s)
    s = re.sub(r"\\?%|\s*percent\s*$", "", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = s.rstrip(".").strip()
    # Trailing unit words after a plain number: "5 cm", "12 dollars".
    m = _UNIT_WORD_RE.match(s)
    if m and not set(w.rstrip(".").lower() for w in m.group(2).split()) & _NOT_UNITS:
        s = m.group(1)
    s = s.replace("{,}", ",")
    # Thousands separators: 1,000,000 -> 1000000 (only exact 3-digit groups, so tuples like 1,2 survive).
    if re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    # Multiple choice: "(A)" / "A)" -> "A".
    m = re.fullmatch(r"\(?([A-Z])\)", s)
    if m:
        s = m.group(1)
    return s


def _key(s: str) -> str:
    return re.sub(r"\s+", "", s)


# --------------------------------------------------------------------------------------------------------------
# Fast path: plain numbers and text
# --------------------------------------------------------------------------------------------------------------
_MAX_NUM_DIGITS = 200
_DEC = r"(?:\d+(?:\.\d*)?|\.\d+)"
_NUM_RE = re.compile(rf"([+-]?){_DEC}")
_FRAC_SLASH_RE = re.compile(r"([+-]?)(\d+)/(\d+)")
_FRAC_TEX_RE = re.compile(r"([+-]?)\\frac\{\s*([+-]?\d+)\s*\}\{\s*(\d+)\s*\}")
_SCI_E_RE = re.compile(rf"([+-]?{_DEC})[eE]([+-]?\d+)")
_SCI_TEX_RE = re.compile(rf"([+-]?{_DEC})\s*(?:\\times|\\cdot|\*|x)\s*10\s*\^\s*\{{?\s*([+-]?\d+)\s*\}}?")
_REPEAT_RE = re.compile(r"([+-]?)(\d*)\.(\d*)\\overline\{(\d+)\}")


def parse_number(s: str) -> tuple[Fraction, int | None] | None:
    """A plain number as (exact value, decimal places if written as a terminating decimal), else None."""
    t = _key(s)
    if not t or len(t) > _MAX_NUM_DIGITS:
        return None
    if m := _NUM_RE.fullmatch(t):
        places = len(t.split(".", 1)[1]) if "." in t else None
        return Fraction(t), places
    if m := _FRAC_SLASH_RE.fullmatch(t) or _FRAC_TEX_RE.fullmatch(t):
        sign, num, den = m.groups()
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return (-value if sign == "-" else value), None
    if m := _SCI_E_RE.fullmatch(t) or _SCI_TEX_RE.fullmatch(s.replace(" ", "")):
        mant, exp = m.groups()
        if abs(int(exp)) > 400:
            return None
        value = Fraction(mant) * Fraction(10) ** int(exp)
        return value, None
    if m := _REPEAT_RE.fullmatch(t):
        sign, whole, fixed, rep = m.groups()
        # x = whole.fixed(rep)(rep)... = (whole.fixed rep - whole.fixed) / (10^len(fixed) * (10^len(rep) - 1))
        a = int((whole or "0") + fixed + rep)
        b = int((whole or "0") + fixed)
        value = Fraction(a - b, 10 ** len(fixed) * (10 ** len(rep) - 1))
        return (-value if sign == "-" else value), None
    return None


def numbers_match(gold: tuple[Fraction, int | None], pred: tuple[Fraction, int | None]) -> bool:
    """Exact equality, or a decimal with >= 3 places that is the other (non-terminating) value rounded."""
    g, g_places = gold
    p, p_places = pred
    if g == p:
        return True
    for exact, dec, places in ((g, p, p_places), (p, g, g_places)):
        if places is not None and places >= 3 and not _terminates(exact):
            if abs(exact - dec) <= Fraction(1, 2 * 10**places):
                return True
    return False


def _terminates(x: Fraction) -> bool:
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


_WORD_RE = re.compile(r"[A-Za-z][A-Za-z' -]*[A-Za-z]")


def is_text_answer(s: str) -> bool:
    """Words (>= 3 letters, no math): compared as strings, never by sympy (which multiplies letters)."""
    return bool(_WORD_RE.fullmatch(s)) and sum(c.isalpha() for c in s) >= 3


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


def prepare(response: str, gold: str, max_answer_chars: int = MAX_ANSWER_CHARS) -> Prepared:
    """Extraction, normalization, fast path and guards. Never calls sympy."""
    raw = extract_answer(response)
    if raw is None:
        return Prepared(None, "no_answer", reason="no final answer")
    pred = normalize(raw)
    g = normalize(gold_answer(gold))
    if not pred:
        return Prepared(raw, "no_answer", reason="empty answer")
    if _key(pred) == _key(g):
        return Prepared(raw, "correct", reason="identical")
    if is_text_answer(g) or is_text_answer(pred):
        same = pred.lower() == g.lower() and is_text_answer(pred) and is_text_answer(g)
        return Prepared(raw, "correct" if same else "incorrect", reason="text")
    if re.fullmatch(r"[A-Z]", g):  # a multiple-choice letter: exact letter only (sympy would see a symbol)
        return Prepared(raw, "incorrect", reason="choice")
    why = _relation_mismatch(pred, g)
    if why is not None:
        return Prepared(raw, "incorrect", reason=why)
    gn, pn = parse_number(g), parse_number(pred)
    if gn is not None and pn is not None:
        return Prepared(raw, "correct" if numbers_match(gn, pn) else "incorrect", reason="number")
    for side in (pred, g):
        why = guard_reason(side, max_answer_chars)
        if why is not None:
            return Prepared(raw, "incorrect", reason=f"guard: {why}")
    return Prepared(raw, None, pred=pred, gold=g)


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

    def create_parser_with_mode(self, latex_str):  # noqa: ANN001, ANN202
        parser = create_parser(self, latex_str)
        if mode["sll"]:
            parser._interp.predictionMode = PredictionMode.SLL
        return parser

    def two_stage_parse(self, latex_str):  # noqa: ANN001, ANN202
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
    from sympy import Expr

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


def verify_pair(pred: str, gold: str) -> bool:
    """math-verify on a normalized pair: parse both (wrapped in a box), then verify(gold, pred), gold first.

    Runs without math-verify's own signal.alarm timeouts: the caller (a worker process) bounds the whole call.
    """
    load_math_verify()
    assert _MV is not None
    _, verify, _ = _MV
    gold_parsed = _parse(gold)
    pred_parsed = _parse(pred)
    if not gold_parsed or not pred_parsed:
        return False
    if surely_different(gold_parsed[0], pred_parsed[0]):
        return False
    return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=None))


def grade_in_process(response: str, gold: str) -> tuple[str, str | None]:
    """Whole pipeline in this process (for tests and the benchmark baseline; the service uses workers)."""
    prep = prepare(response, gold)
    if prep.verdict is not None:
        return prep.verdict, prep.extracted
    return ("correct" if verify_pair(prep.pred, prep.gold) else "incorrect"), prep.extracted
