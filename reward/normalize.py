r"""Normalization of an extracted answer to one canonical string (no sympy).

Unicode digits/minus/symbols, math delimiters and currency signs, ``\left``/``\right``, spacing macros (also the
thin-space thousands separator ``1\,000``), formatting wrappers (``\text{}``, ``\textbf{}``, ``\mathbf{}``,
``**bold**``), ``\dfrac``/``\tfrac``, degrees, percent, units after a number (``5\text{ cm}^2``,
``5 \mathrm{m^2}``, ``12 dollars``), number words (``twelve``), function-call roots (``sqrt(2)``), the empty set
(``\varnothing``, ``\{\}``, "no solution" -> ``\emptyset``). Structural forms (intervals, lists) live in
``reward.forms``.
"""

from __future__ import annotations

import re
import unicodedata

from reward.extraction import demarkup

_SUPERSCRIPTS = str.maketrans({"⁰": "^0", "¹": "^1", "²": "^2", "³": "^3", "⁴": "^4", "⁵": "^5", "⁶": "^6",
                               "⁷": "^7", "⁸": "^8", "⁹": "^9", "⁻": "^-"})
_SYMBOLS = {
    "−": "-", "–": "-", "—": "-", "‐": "-", "‒": "-", "﹣": "-", "－": "-",
    "×": r"\times ", "·": r"\cdot ", "⋅": r"\cdot ", "÷": r"\div ", "∗": "*",
    "π": r"\pi ", "∞": r"\infty ", "√": r"\sqrt ", "≤": r"\le ", "≥": r"\ge ", "≠": r"\ne ",
    "∪": r"\cup ", "∩": r"\cap ", "∈": r"\in ", "±": r"\pm ", "°": r"^\circ ", "º": r"^\circ ",
    "∅": r"\emptyset ", "⩽": r"\le ", "⩾": r"\ge ", "€": "", "£": "", "¥": "",
    "⁄": "/", "∕": "/", "，": ",", "：": ":", "（": "(", "）": ")",
    "\u00a0": " ", "\u2009": " ", "\u202f": " ", "\u200b": "", "\u200e": "", "\u200f": "", "\u2060": "",
    "\ufeff": "",
}
_SYMBOL_RE = re.compile("|".join(map(re.escape, _SYMBOLS)))


_SUPERSCRIPT_RUN_RE = re.compile("[⁰¹²³⁴⁵⁶⁷⁸⁹⁻]{2,}")


def normalize_unicode(s: str) -> str:
    # A run of superscripts is one exponent: 10⁻⁵ -> 10^{-5}, x¹² -> x^{12}; a single one stays x^2.
    s = _SUPERSCRIPT_RUN_RE.sub(lambda m: "^{" + m.group(0).translate(_SUPERSCRIPTS).replace("^", "") + "}", s)
    s = s.translate(_SUPERSCRIPTS)
    s = _SYMBOL_RE.sub(lambda m: _SYMBOLS[m.group(0)], s)
    if s.isascii():
        return s
    # NFKC folds fullwidth digits/letters and vulgar fractions (½ -> 1⁄2); other scripts' digits via unicodedata.
    s = unicodedata.normalize("NFKC", s)
    s = _SYMBOL_RE.sub(lambda m: _SYMBOLS[m.group(0)], s)
    # Emoji and other pictographs (✅, 🎉, ★) carry no value.
    s = "".join(c for c in s if c.isascii() or c == "\ufffd" or unicodedata.category(c) != "So")
    return "".join(str(unicodedata.digit(c)) if not c.isascii() and c.isdigit() else c for c in s)


_WRAPPERS = ("text|textbf|textit|textrm|textsf|texttt|textnormal|mathrm|mathbf|mathit|mathsf|mathtt|mbox|hbox|"
             "operatorname|boldsymbol|bm|emph|underline|rm|bf")
_TEXT_MACRO_RE = re.compile(rf"\\(?:{_WRAPPERS})\s*\{{([^{{}}]*)\}}")
_NUM = r"[+-]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:/\d+)?"
_EXP = r"(?:\^\s*\{?\s*[23]\s*\}?)?"
# `5\text{ cm}^2`, `5 \mathrm{m^2}`, `3\text{ sq. units}`: a unit written as text after a number (any length).
_TEXT_UNIT_RE = re.compile(
    rf"^({_NUM}|[^a-zA-Z]*?(?:\\(?:frac|sqrt|pi|cdot|times)[^a-zA-Z]*?)*(?:[\d}}]|\\pi))\s*\\(?:text|textrm|mathrm|mbox|rm|operatorname)\s*\{{\s*([A-Za-z][A-Za-z./ ]*?)\s*{_EXP}\s*\}}\s*{_EXP}$"
)
_UNIT_WORD_RE = re.compile(rf"^({_NUM})\s+([A-Za-z]{{2,}}\.?{_EXP}(?:\s+[A-Za-z]{{2,}}\.?{_EXP}){{0,2}})$")
_NOT_UNITS = {"pi", "or", "and", "to", "sqrt", "times", "cdot", "div", "infty", "in", "i", "e", "x", "y", "n"}
_EMPTY_RE = re.compile(
    r"\\emptyset|\\varnothing|\\\{\s*\\\}|\{\s*\}|\\O|(?:there\s+(?:is|are)\s+)?no(?:\s+real)?"
    r"\s+(?:solutions?|roots?|values?|such\s+\w+)(?:\s+exists?)?|none|(?:the\s+)?empty\s+set|\\text\{\s*\}",
    re.IGNORECASE,
)
EMPTY = r"\emptyset"


_ASSIGN_PREFIX_RE = re.compile(r"^([A-Za-z](?:_\{?\w+\}?)?\s*=\s*)(.+)$")


def _unit_free(s: str) -> str:
    """A unit written as text after the number goes (also on the right of `x = `)."""
    a = _ASSIGN_PREFIX_RE.match(s)
    prefix, s = (a.group(1), a.group(2)) if a else ("", s)
    m = _TEXT_UNIT_RE.match(s)
    if m and m.group(2).strip().rstrip(".").lower() not in _NOT_UNITS - {"in"}:
        return prefix + m.group(1)
    return prefix + s


def _unit_words_free(s: str) -> str:
    """Unit words after a plain number go: "5 cm", "12 dollars", "5 cm^2", "x = 5 cm"."""
    a = _ASSIGN_PREFIX_RE.match(s)
    prefix, rest = (a.group(1), a.group(2)) if a else ("", s)
    m = _UNIT_WORD_RE.match(rest)
    if m and not {re.sub(r"[.^{}\d\s]", "", w).lower() for w in m.group(2).split()} & _NOT_UNITS:
        return prefix + m.group(1)
    return s


def _drop_wrappers(s: str) -> str:
    for _ in range(4):  # \text{...} -> ...  (innermost first; a few rounds cover nesting)
        new = _TEXT_MACRO_RE.sub(r"\1", s)
        if new == s:
            break
        s = new
    return s


def _function_roots(s: str) -> str:
    """`\\sqrt(2)`, `sqrt(2)`, `sqrt 2` -> `\\sqrt{2}`; a bare word `pi` -> `\\pi`."""
    for _ in range(3):  # innermost parentheses first
        new = re.sub(r"(?<![A-Za-z])\\?sqrt\s*(\[\d+\])?\s*\(([^()]*)\)", r"\\sqrt\1{\2}", s)
        new = re.sub(r"(?<![A-Za-z])\\?cbrt\s*\(([^()]*)\)", r"\\sqrt[3]{\1}", new)
        if new == s:
            break
        s = new
    s = re.sub(r"(?<![A-Za-z\\])sqrt\s*(\d+|\{)", lambda m: "\\sqrt" + ("{" if m.group(1) == "{" else m.group(1)), s)
    return re.sub(r"(?<![A-Za-z\\])pi(?![A-Za-z])", r"\\pi ", s)


def normalize(s: str) -> str:
    """Canonical string form used for the fast path and handed to math-verify."""
    s = normalize_unicode(demarkup(s))
    s = s.replace("\n", " ").strip()
    s = re.sub(r"\\?\$", "", s).strip()  # math delimiters and currency signs
    if s.startswith("\\[") and s.endswith("\\]") or s.startswith("\\(") and s.endswith("\\)"):
        s = s[2:-2].strip()
    s = re.sub(r"\\(?:displaystyle|textstyle|scriptstyle)(?![A-Za-z])", "", s)
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big|biggl|biggr|bigg|Bigg)(?![A-Za-z])\s*", "", s)
    s = re.sub(r"(?<!\\)\\!", "", s)  # negative thin space: joins (1\!000)
    s = re.sub(r"(?<!\\)\\[,;: ]|~|\\q?quad(?![A-Za-z])", " ", s)  # not the `\ ` of a `\\` row break
    s = re.sub(r"\\[dtc]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = _unit_free(re.sub(r"\s+", " ", s).strip())
    s = _drop_wrappers(s)
    # Degrees and percent mean "the number" for grading purposes (as in the MATH normalizer).
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![A-Za-z])|\\degree(?![A-Za-z])", "", s)
    s = re.sub(r"\s*(?:degrees?|deg)\s*$", "", s)
    s = re.sub(r"\\?%|\s*percent\s*$", "", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = s.rstrip(".").strip()
    s = _unit_words_free(s)
    s = s.replace("{,}", ",")
    s = re.sub(r"\+\s*\\infty", r"\\infty", s)  # [3, +\infty) is [3, \infty)
    # Thousands separators: 1,000,000 / 1 000 000 -> 1000000 (exact 3-digit groups only: tuples like 1,2 survive).
    if re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?|[+-]?\d{1,3}(?: \d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "").replace(" ", "")
    # Multiple choice: "(A)" / "A)" -> "A".
    m = re.fullmatch(r"\(?([A-Z])\)", s)
    if m:
        s = m.group(1)
    if _EMPTY_RE.fullmatch(s):
        return EMPTY
    s = _function_roots(s)
    return words_to_number(s) or s


def key(s: str) -> str:
    return re.sub(r"\s+", "", s)


_WORD_RE = re.compile(r"[A-Za-z][A-Za-z' -]*[A-Za-z]")


def is_text_answer(s: str) -> bool:
    """Words (>= 3 letters, no math): compared as strings, never by sympy (which multiplies letters)."""
    return bool(_WORD_RE.fullmatch(s)) and sum(c.isalpha() for c in s) >= 3


# --------------------------------------------------------------------------------------------------------------
# Number words
# --------------------------------------------------------------------------------------------------------------
_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
          "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_WORD_VALUES = {w: i for i, w in enumerate(_UNITS)} | {w: 10 * i for i, w in enumerate(_TENS) if w}
_SCALES = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}


_DENOMINATORS = {"half": 2, "halves": 2, "third": 3, "thirds": 3, "quarter": 4, "quarters": 4, "fourth": 4,
                 "fourths": 4, "fifth": 5, "fifths": 5, "sixth": 6, "sixths": 6, "seventh": 7, "sevenths": 7,
                 "eighth": 8, "eighths": 8, "ninth": 9, "ninths": 9, "tenth": 10, "tenths": 10}


_NOT_UNIT_WORDS = {*_UNITS, *_TENS, *_SCALES, *_DENOMINATORS, "a", "an", "and", "plus", "minus", "point", "over",
                   "times", "or", "divided", "squared", "cubed"}


def words_to_number(s: str) -> str | None:
    """An answer written in words as a number string: `twelve` -> `12`, `five apples` -> `5`, `two thirds` ->
    `2/3`, `one half` -> `1/2`; None when `s` does not start with number words (or is only a unit)."""
    words = re.split(r"[\s-]+", s.strip().lower().rstrip("."))
    if words in (["half"], ["a", "half"], ["one", "half"]):
        return "1/2"
    for cut in range(len(words), 0, -1):
        value = number_from_words(" ".join(words[:cut]))
        if value is None:
            continue
        rest = words[cut:]
        if not rest:
            return str(value)
        if rest[0] in _DENOMINATORS and len(rest) <= 3:
            return f"{value}/{_DENOMINATORS[rest[0]]}"
        if len(rest) <= 2 and all(w.isalpha() and w not in _NOT_UNIT_WORDS for w in rest):
            return str(value)  # unit words: "five apples", "twelve square meters"
        return None
    return None


def number_from_words(s: str) -> int | None:
    """`five` -> 5, `twenty-one` -> 21, `one hundred and five` -> 105, `negative three` -> -3; else None.

    Only a whole answer made of number words converts (an article or a unit word after it is allowed:
    "twelve apples" is left to the unit rule, which needs digits, so it stays text)."""
    words = re.split(r"[\s-]+", s.strip().lower().rstrip("."))
    if not words or not words[0]:
        return None
    sign = 1
    if words[0] in ("negative", "minus"):
        sign, words = -1, words[1:]
    total = current = 0
    seen = False
    for w in words:
        if w == "and" and seen:
            continue
        if w in _WORD_VALUES:
            current += _WORD_VALUES[w]
        elif w in _SCALES and seen:
            if w == "hundred":
                current *= 100
            else:
                total += current * _SCALES[w]
                current = 0
        else:
            return None
        seen = True
    return sign * (total + current) if seen else None
