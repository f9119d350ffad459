r"""Exact numbers without sympy: plain numbers, and a small evaluator for rational arithmetic with powers.

``parse_number`` reads one plain number (integer, decimal, fraction, scientific notation, repeating decimal).
``exact_value`` evaluates integer/rational expressions with ``+ - * / ^``, ``\frac``, ``\cdot``, ``\times``,
parentheses and braces *exactly* (``Fraction``), under a size budget: ``2^{2^3}``, ``2^8`` and ``256`` are the
same value, ``2^{100}`` equals its 31-digit expansion, and ``1/10^{12}`` differs from ``2/10^{12}``. A power
whose result would exceed ``MAX_BITS`` is not computed (the caller falls back to the guards), so a power tower
can never hang the grader.

Tolerance (``numbers_match``): exact values compare exactly. Only a written decimal may approximate a value that
has no finite decimal expansion, and only to its own last written digit with >= 3 significant digits, so the
tolerance is relative to the magnitude (``0.000`` approximates nothing).
"""

from __future__ import annotations

import re
from fractions import Fraction

MAX_NUM_CHARS = 200
# Largest intermediate result of the evaluator (bits); ~30k decimal digits, computed in well under 1 ms.
MAX_BITS = 100_000
# Longest integer literal the evaluator reads (Python refuses int(str) beyond 4300 digits by default).
MAX_LITERAL_DIGITS = 4_000

_DEC = r"(?:\d+(?:\.\d*)?|\.\d+)"
_NUM_RE = re.compile(rf"([+-]?){_DEC}")
_FRAC_SLASH_RE = re.compile(r"([+-]?)(\d+)/(\d+)")
_FRAC_TEX_RE = re.compile(r"([+-]?)\\frac\{\s*([+-]?\d+)\s*\}\{\s*(\d+)\s*\}")
_SCI_E_RE = re.compile(rf"([+-]?{_DEC})[eE]([+-]?\d+)")
_SCI_TEX_RE = re.compile(rf"([+-]?{_DEC})\s*(?:\\times|\\cdot|\*|x)\s*10\s*\^\s*\{{?\s*([+-]?\d+)\s*\}}?")
_REPEAT_RE = re.compile(r"([+-]?)(\d*)\.(\d*)\\overline\{(\d+)\}")

Number = tuple[Fraction, int | None]  # (exact value, decimal places when written as a terminating decimal)


def parse_number(s: str) -> Number | None:
    """A plain number as (exact value, decimal places if written as a terminating decimal), else None."""
    t = re.sub(r"\s+", "", s)
    if not t or len(t) > MAX_NUM_CHARS:
        return None
    if _NUM_RE.fullmatch(t):
        places = len(t.split(".", 1)[1]) if "." in t else None
        return Fraction(t), places
    if m := _FRAC_SLASH_RE.fullmatch(t) or _FRAC_TEX_RE.fullmatch(t):
        sign, num, den = m.groups()
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return (-value if sign == "-" else value), None
    if m := _SCI_E_RE.fullmatch(t) or _SCI_TEX_RE.fullmatch(t):
        mant, exp = m.groups()
        if abs(int(exp)) > 400:
            return None
        # 3.333 x 10^{-13} is written to 10^{-16}: its decimal places are the mantissa's minus the exponent.
        places = len(mant.split(".", 1)[1]) - int(exp) if "." in mant else None
        return Fraction(mant) * Fraction(10) ** int(exp), places if places is not None and places > 0 else None
    if m := _REPEAT_RE.fullmatch(t):
        sign, whole, fixed, rep = m.groups()
        # x = whole.fixed(rep)(rep)... = (whole.fixed rep - whole.fixed) / (10^len(fixed) * (10^len(rep) - 1))
        a = int((whole or "0") + fixed + rep)
        b = int((whole or "0") + fixed)
        value = Fraction(a - b, 10 ** len(fixed) * (10 ** len(rep) - 1))
        return (-value if sign == "-" else value), None
    return None


def terminates(x: Fraction) -> bool:
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _significant_digits(x: Fraction, places: int) -> int:
    digits = str(abs(x.numerator * 10**places // x.denominator)) if x else ""
    return len(digits.lstrip("0"))


def numbers_match(gold: Number, pred: Number) -> bool:
    """Exact equality, or a decimal (>= 3 places, >= 3 significant digits) that is the other, non-terminating
    value rounded to its last written place."""
    g, g_places = gold
    p, p_places = pred
    if g == p:
        return True
    for exact, dec, places in ((g, p, p_places), (p, g, g_places)):
        if places is not None and places >= 3 and not terminates(exact) and _significant_digits(dec, places) >= 3:
            if abs(exact - dec) <= Fraction(1, 2 * 10**places):
                return True
    return False


# --------------------------------------------------------------------------------------------------------------
# Exact evaluator
# --------------------------------------------------------------------------------------------------------------
_TOKEN_RE = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+|\\frac|\\cdot|\\times|\\div|\*\*|[-+*/^(){}!])")


class _Unsupported(Exception):
    """Not a plain rational expression, or too big to compute: the caller decides by other means."""


def _tokens(s: str) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(s):
        m = _TOKEN_RE.match(s, i)
        if not m:
            if s[i:].strip() == "":
                break
            raise _Unsupported(s[i:])
        out.append(m.group(1))
        i = m.end()
    return ["**" if t == "^" else t for t in out]  # `**` (Python) and `^` (TeX) are both powers


class _Parser:
    """Recursive descent: expr := term (+|- term)*; term := unary ((*|/) unary)*; unary := -unary | power;
    power := atom [** unary]; atom := number | (expr) | {expr} | \\frac{expr}{expr} | atom!."""

    def __init__(self, tokens: list[str]) -> None:
        self.t = tokens
        self.i = 0

    def peek(self) -> str | None:
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self, want: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (want is not None and tok != want):
            raise _Unsupported(f"expected {want}")
        self.i += 1
        return tok

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "\\cdot", "\\times", "/", "\\div") or self.peek() in ("(", "\\frac"):
            op = self.take() if self.peek() not in ("(", "\\frac") else "*"  # 2(3) and 2\frac{1}{2}: products
            rhs = self.unary()
            value = _mul(value, rhs) if op not in ("/", "\\div") else _div(value, rhs)
        return value

    def unary(self) -> Fraction:
        if self.peek() in ("-", "+"):
            sign = -1 if self.take() == "-" else 1
            return sign * self.unary()
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek() == "**":
            self.take()
            return _pow(base, self.unary())  # right-associative: 2^3^2 = 2^(3^2)
        return base

    def atom(self) -> Fraction:
        tok = self.take()
        if tok in ("(", "{"):
            value = self.expr()
            self.take(")" if tok == "(" else "}")
        elif tok == "\\frac":
            self.take("{")
            num = self.expr()
            self.take("}")
            self.take("{")
            den = self.expr()
            self.take("}")
            value = _div(num, den)
        elif tok[0].isdigit() or tok[0] == ".":
            if len(tok) > MAX_LITERAL_DIGITS:
                raise _Unsupported("literal too long")
            value = Fraction(tok)
        else:
            raise _Unsupported(tok)
        while self.peek() == "!":
            self.take()
            if value.denominator != 1 or not 0 <= value <= 500:
                raise _Unsupported("factorial")
            value = Fraction(_factorial(int(value)))
        return value


def _factorial(n: int) -> int:
    out = 1
    for k in range(2, n + 1):
        out *= k
    return out


def _bits(x: Fraction) -> int:
    return x.numerator.bit_length() + x.denominator.bit_length()


def _mul(a: Fraction, b: Fraction) -> Fraction:
    if _bits(a) + _bits(b) > MAX_BITS:
        raise _Unsupported("too big")
    return a * b


def _div(a: Fraction, b: Fraction) -> Fraction:
    if b == 0:
        raise _Unsupported("division by zero")
    return _mul(a, 1 / b)


def _pow(base: Fraction, exp: Fraction) -> Fraction:
    if exp.denominator != 1:
        raise _Unsupported("non-integer exponent")  # roots: sympy's job
    e = abs(exp.numerator)
    if base in (0, 1, -1):
        if base == 0 and exp.numerator < 0:
            raise _Unsupported("division by zero")
        return base**exp.numerator
    if e * max(1, _bits(base)) > MAX_BITS:
        raise _Unsupported("too big")
    return base**exp.numerator


def exact_value(s: str) -> Fraction | None:
    """The exact value of a rational expression with powers (see module docstring), or None."""
    ops_removed = re.sub(r"\\(?:frac|cdot|times|div)(?![A-Za-z])", "", s)
    if len(s) > MAX_LITERAL_DIGITS + 200 or not re.search(r"\d", s) or re.search(r"[A-Za-z\\]", ops_removed):
        return None
    try:
        p = _Parser(_tokens(s))
        value = p.expr()
        if p.peek() is not None:
            return None
        return value
    except (_Unsupported, ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None


_POWER_RE = re.compile(r"^\s*(\d+)\s*\^\s*(\{.*\}|\d+)\s*$")


def _perfect_power_root(n: int) -> tuple[int, int]:
    """n = root^k with the smallest root (n >= 2)."""
    for k in range(n.bit_length(), 1, -1):
        r = round(n ** (1.0 / k))
        for c in (r - 1, r, r + 1):
            if c >= 2 and c**k == n:
                return c, k
    return n, 1


def power_form(s: str) -> tuple[int, int] | None:
    """`b^{e}` with an integer base >= 2 and an exactly computable integer exponent, as (smallest root, total
    exponent): `10^{10^{10}}` and `100^{5 * 10^9}` are both (10, 10^10). Equal forms are equal numbers, so two
    powers too large to compute still compare exactly."""
    m = _POWER_RE.match(s)
    if not m or len(m.group(1)) > 30:
        return None
    base = int(m.group(1))
    exp = exact_value(m.group(2))
    if base < 2 or exp is None or exp.denominator != 1 or exp <= 0:
        return None
    root, k = _perfect_power_root(base)
    return root, k * exp.numerator
