"""Where the final answer of a response is (no normalization, no sympy): the tail rule, boxes, answer phrases.

Policy (docs/grading.md has the reasons and examples):

1. Only the last ``TAIL_CHARS`` characters are read (a box that straddles the cut is read whole).
2. Boxes (``\\boxed{}``/``\\fbox{}``, real brace matching): the final group wins. A group is a run of boxes joined
   only by a short connector (a comma, "and", "or", ``x =``, math spacing); prose or a sentence end between two
   boxes starts a new group, so earlier boxes are intermediate results. A group with several different answers
   is a list of solutions (``Extraction.items``); the grader compares it as a set against a gold list and treats
   it as a hedge (no answer) against a single gold value.
3. An explicit answer phrase ("final answer is", "the answer is", "Answer:", "Answer —", bold or not) that comes
   after the last box wins over it; a phrase followed by second thoughts ("wait", "let me recheck") is void.
4. Without box or phrase: a last line that is all bold (``**5**``), else a closing sentence that starts with a
   conclusion word ("Therefore, ... is 12.").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Characters of the response that are read. Reasoning models write 100k+ characters, but the final answer and
# the summary around it are at the end: 16k characters (about 4k tokens) hold any final section we have seen
# while keeping extraction cost per item bounded whatever the response length.
TAIL_CHARS = 16_384
# A box that opens up to this many characters before the cut is read whole (an answer longer than this is over
# the grader's answer limit anyway).
STRADDLE_CHARS = 2_000
# A final group of more boxes than this is a wall of guesses, not an answer.
MAX_GROUP_BOXES = 16

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


@dataclass(frozen=True)
class Box:
    start: int
    end: int
    content: str | None  # None: the box was never closed


@dataclass(frozen=True)
class Extraction:
    """The final answer as written (`answer`), and, when it is a group of several different boxes, the boxes."""

    answer: str | None
    items: tuple[str, ...] = ()
    source: str = ""  # box | phrase | bold | sentence | ""
    # The last closed boxes of the tail (at most MAX_GROUP_BOXES): a multi-part answer boxed part by part, in
    # separate paragraphs, is matched against a gold list from these (see reward.grading).
    last_boxes: tuple[str, ...] = ()


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of each `{` -> index of its closing `}` (escaped `\\{`/`\\}` skipped), in one O(n) pass."""
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
    offset = 0
    for m in _BOX_RE.finditer(text):
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            if pairs is None:
                # Braces opened after the first box pair up among themselves: match from there, not from 0.
                offset = m.start()
                pairs = _brace_pairs(text[offset:])
            close = pairs.get(i - offset)
            close = None if close is None else close + offset
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


def tail(response: str, tail_chars: int = TAIL_CHARS) -> str:
    """The part of `response` that is graded: the last `tail_chars` characters, moved back to the opening of a
    box that straddles the cut (so a long final box is read whole, not from its middle)."""
    cut = len(response) - tail_chars
    if cut <= 0:
        return response
    window = response[max(0, cut - STRADDLE_CHARS) : cut]
    opens = list(_BOX_RE.finditer(window))
    if opens:
        start = max(0, cut - STRADDLE_CHARS) + opens[-1].start()
        brace = response.find("{", start, cut + 1)
        if brace != -1:
            close = _brace_pairs(response[brace:]).get(0)
            if close is None or brace + close >= cut:
                return response[start:]
    return response[cut:]


# What may stand between two boxes of one answer group: connectors, math spacing, `x =`, punctuation.
_CONNECTOR_RE = re.compile(
    r"(?:\\text\{|\\mathrm\{|\\quad|\\qquad|\\[,;:! ]|\\(?:text|mbox)\b|[\s$,;&{}()]|\\\(|\\\)|\\\[|\\\]|"
    r"\\\\|\b(?:and|or|as well as|also)\b|[A-Za-z](?:_\{?\w+\}?)?\s*&?=|\\(?:lor|vee|cup)\b)*",
    re.IGNORECASE,
)


def _joined(gap: str) -> bool:
    """True when the text between two boxes only connects them (one list), not a new statement."""
    if len(gap) > 60 or "\n\n" in gap or _CONNECTOR_RE.fullmatch(gap) is None:
        return False
    # A line break alone starts a new statement; with a comma/"and"/"or" it continues the list.
    return "\n" not in gap or re.search(r",|\b(?:and|or)\b", gap, re.IGNORECASE) is not None


def final_box_group(text: str, boxes: list[Box]) -> list[Box] | None:
    """The last box and the boxes joined to it (in order); None when the last box is unclosed or empty."""
    last = boxes[-1]
    if last.content is None or not last.content.strip():
        return None
    group = [last]
    for box in reversed(boxes[:-1]):
        if box.end > group[0].start:
            continue  # encloses a later box (nested boxes): part of it, not a separate answer
        if box.content is None or not _joined(text[box.end : group[0].start]):
            break
        group.insert(0, box)
        if len(group) > MAX_GROUP_BOXES:
            return None
    return group


# --------------------------------------------------------------------------------------------------------------
# Answers without a box
# --------------------------------------------------------------------------------------------------------------
_MARKUP_RE = re.compile(r"\*\*|__|\\(?:textbf|mathbf|boldsymbol|bm|underline|emph|textit)\s*\{")
_EMPHASIS_RE = re.compile(r"\*\*|__")
_MACRO_MARKUP_RE = re.compile(r"\\(?:textbf|mathbf|boldsymbol|bm|underline|emph|textit)\s*\{")
_PHRASE_RE = re.compile(
    r"(?:final\s+answer|\banswer)[*_]*"
    r"(?:\s+(?:is|will\s+be|should\s+be|would\s+be|=)\s*:?|\s*[:：=]|\s*[—–→⇒]|\s*->|\s*\\Rightarrow|\s+-{1,2}(?=\s))"
    r"|\bthe\s+(?:final\s+)?(?:result|solution)\s+is\s*:?|\bthe\s+(?:correct\s+)?(?:option|choice)\s+is\s*:?"
    r"|^[ \t#>]*(?:final\s+)?answer[ \t]*[:：.]?[ \t]*(?=\n)"  # a heading: the answer is on the next line
    r"|^[ \t]*####[ \t]*(?=[-$\\\d])",  # GSM8K style: "#### 42"
    re.IGNORECASE | re.MULTILINE,
)
# "12 is the final answer", "we get $5$ as our answer": the value before the phrase.
_REVERSE_PHRASE_RE = re.compile(
    r"(\$[^$\n]{1,200}\$|\\\([^\n]{1,200}?\\\)|[-−]?\d[\d,./]*)\s*(?:is|as)\s+(?:the|my|our)\s+(?:final\s+)?answer\b",
    re.IGNORECASE,
)
_DOUBT_RE = re.compile(
    r"\b(?:wait|re-?check|recheck|wrong|mistake|however|actually|hmm+|reconsider|not\s+sure|let\s+me)\b",
    re.IGNORECASE,
)
_CUE_RE = re.compile(
    r"^(?:therefore|thus|hence|so|in\s+total|in\s+conclusion|in\s+summary|overall|altogether|finally|"
    r"consequently|as\s+a\s+result|this\s+(?:gives|means)|which\s+(?:gives|means)|that\s+means)\b[,:]?\s*",
    re.IGNORECASE,
)
# "The total number of apples is 15.": a sentence about the asked quantity, stating its value.
_SUBJECT_RE = re.compile(
    r"^(?:the|our|its|her|his|their)\s+(?:[a-z]+\s+){0,2}?(?:answer|total|sum|result|value|number|product|"
    r"difference|quotient|area|perimeter|volume|probability|length|width|height|radius|cost|price|amount|"
    r"distance|speed|time|ratio|count|age|remainder|measure)\b[^.!?]{0,80}?\b(?:is|are|equals|was|comes\s+to)\s",
    re.IGNORECASE,
)
_PLAN_RE = re.compile(r"\b(?:let's|let\s+us|next|we\s+(?:will|need\s+to\s+(?:check|find|compute|consider))|"
                      r"consider|check|suppose|assume|if)\b|\?", re.IGNORECASE)
_END_CUE_RE = re.compile(r"\b(?:in\s+total|altogether|in\s+all|all\s+together)\s*[.!]?$", re.IGNORECASE)
_MATH_SPAN_RE = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_NUMBER_TOKEN_RE = re.compile(
    r"[-−]?\\?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?%?|\b(?:zero|one|two|three|four|five|six|seven|eight|nine|ten|"
    r"eleven|twelve|thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|"
    r"sixty|seventy|eighty|ninety|hundred)\b",
    re.IGNORECASE,
)


def _between_operands(s: str, i: int) -> bool:
    """`2**3` or `a__b`: an operator between two operands, not emphasis."""
    return i > 0 and i + 2 < len(s) and (s[i - 1].isalnum() or s[i - 1] in ")}") and (s[i + 2].isalnum() or s[i + 2] in "({")


def _close_brace(s: str, i: int, limit: int = STRADDLE_CHARS) -> int | None:
    """Index of the `}` matching the `{` at `i` (escapes skipped) within `limit` characters, or None."""
    depth = 0
    n = min(len(s), i + limit)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def demarkup(s: str) -> str:
    """Bold/emphasis markup removed (`**x**`, `\\textbf{x}` -> `x`); the braces of removed macros too."""
    if not _MARKUP_RE.search(s):
        return s
    s = _EMPHASIS_RE.sub(lambda m: m.group(0) if _between_operands(s, m.start()) else "", s)
    cuts: list[tuple[int, int]] = []  # [start, end) spans to remove: each macro head and its closing brace
    heads = list(_MACRO_MARKUP_RE.finditer(s))
    pairs = _brace_pairs(s) if len(heads) > 8 else None  # many macros: one linear pass, not one scan each
    for m in heads:
        cuts.append((m.start(), m.end()))
        close = pairs.get(m.end() - 1) if pairs is not None else _close_brace(s, m.end() - 1)
        if close is not None:
            cuts.append((close, close + 1))
    out, pos = [], 0
    for start, end in sorted(cuts):
        out.append(s[pos:start])
        pos = max(pos, end)
    out.append(s[pos:])
    return "".join(out)


def strip_answer_text(s: str) -> str:
    """The answer at the start of `s`: a leading math span, else up to the sentence end."""
    s = demarkup(s).strip().strip("*_ ").lstrip(":：—–->→⇒ ").strip()
    m = (re.match(r"^\$\$?(.+?)\$\$?", s, re.DOTALL) or re.match(r"^\\\((.+?)\\\)", s, re.DOTALL)
         or re.match(r"^\\\[(.+?)\\\]", s, re.DOTALL))
    if m:
        return m.group(1).strip()
    s = re.split(r"\n", s, maxsplit=1)[0]
    s = re.split(r"(?<=[^\d\s])\.(?:\s|$)|\.\s|[!?;]\s|\s\(|,\s(?:so|which|since|because|as)\b|,?\s(?:and\s)?not\s",
                 s, maxsplit=1)[0].rstrip(" .").strip()
    # "Answer: The number of apples is 12." -> the value after the verb (a sentence, not a formula).
    m = re.fullmatch(r"(?:(?:[A-Za-z',]+\s+){2,}|there\s+)(?:is|are|equals|was|were)\s+(.+)", s, re.IGNORECASE)
    return m.group(1).strip() if m else s


_ANCHOR_RE = re.compile(r"answer|result|solution|option|choice|####", re.IGNORECASE)
_HYPOTHETICAL_RE = re.compile(r"\b(?:if|whether|suppose|supposing|assume|assuming|check|verify|test|guess)\b[^.!?\n]*$",
                              re.IGNORECASE)


def _hypothetical(text: str, pos: int) -> bool:
    """"If the answer is 5, ...", "check whether 5 is the answer": a phrase inside a supposition states nothing."""
    return _HYPOTHETICAL_RE.search(text, max(0, pos - 60), pos) is not None


def phrase_answer(plain: str) -> tuple[int, str] | None:
    """(position, answer) of the last explicit answer phrase in demarked text, unless second thoughts follow."""
    anchor = _ANCHOR_RE.search(plain)
    if anchor is None:
        return None
    start = max(0, anchor.start() - 250)  # every phrase begins within 250 characters before its anchor word
    hits = [h for h in _PHRASE_RE.finditer(plain, start) if not _hypothetical(plain, h.start())]
    reverse = [h for h in _REVERSE_PHRASE_RE.finditer(plain, start) if not _hypothetical(plain, h.start())]
    if reverse and (not hits or reverse[-1].start() > hits[-1].start()):
        hit, rest = reverse[-1], reverse[-1].group(1)
        after = plain[hit.end() :]
    elif hits:
        hit = hits[-1]
        start = hit.end()
        if plain[start : start + 1] == "\n":  # heading form: the next non-empty line
            start += len(plain[start:]) - len(plain[start:].lstrip())
        block_end = plain.find("\n\n", start)  # up to a blank line: a display formula may span lines
        rest = plain[start : start + 2_000] if block_end == -1 else plain[start : min(block_end, start + 2_000)]
        after = plain[start:]
    else:
        return None
    ans = strip_answer_text(rest)
    if _DOUBT_RE.search(after.replace(ans, " ", 1)) or re.match(r"(?:not|never|no longer)\b", ans, re.IGNORECASE):
        return None
    return (hit.start(), ans) if ans else None


def bold_line_answer(text: str) -> str | None:
    """A last line that is all bold (`**5**`, `**Answer: 5**`, `\\textbf{5}`), short and with some math in it."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    last = lines[-1].rstrip(".")
    m = re.fullmatch(r"\*\*(.+?)\*\*\.?|__(.+?)__|\\textbf\{(.+)\}", last)
    if not m:
        return None
    body = next(g for g in m.groups() if g is not None).strip()
    if len(body) > 80 or body.endswith(":") or not re.search(r"[\d$\\]", body):
        return None
    if re.match(r"(?:step|case|part|problem|question|example|solution|method|lemma|claim)\b", body, re.I):
        return None
    # A bold heading ("**Step 3**", "**Case 2: n even**") is not an answer: at most one word of text.
    if len(re.findall(r"(?<![\\A-Za-z])[A-Za-z]{2,}", re.sub(r"^(?:final\s+)?answer\s*[:：]", "", body, flags=re.I))) > 1:
        return None
    return strip_answer_text(body) or None


def closing_sentence_answer(plain: str) -> str | None:
    """The value stated by a closing sentence that opens with a conclusion word ("Thus, she has 12 apples.")."""
    lines = [ln.strip() for ln in plain.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z\\$])", lines[-1])
    sentence = sentences[-1].strip()
    subject = _SUBJECT_RE.match(sentence)
    cue = _CUE_RE.match(sentence) or _END_CUE_RE.search(sentence) or subject
    # A conclusion ends like one: a truncated generation ("So we have 3") or a plan ("so let's check 3 cases.")
    # states no answer.
    if not cue or len(sentence) > 300 or _DOUBT_RE.search(sentence) or _PLAN_RE.search(sentence):
        return None
    if not re.search(r"[.!](?:\$|\*\*|\))*$", sentence):
        return None
    spans = [next(g for g in m.groups() if g is not None) for m in _MATH_SPAN_RE.finditer(sentence)]
    if spans:
        span = spans[-1].strip()
        return span.rsplit("=", 1)[-1].strip() if "=" in span and not re.search(r"[<>]|\\[lg]e", span) else span
    m = re.search(r"\b(?:is|are|equals|was|will\s+be|be)\s+(.+?)[.!]?$", sentence, re.IGNORECASE)
    if m and len(m.group(1).split()) <= 3 and re.search(r"\d", m.group(1)):
        value = m.group(1).strip()
        return None if re.match(r"(?:not|never|no)\b", value, re.IGNORECASE) else value
    if subject is not None:  # "the number 5 is prime and 7 is too": no value right after the verb
        return None
    tokens = _NUMBER_TOKEN_RE.findall(sentence[cue.end() :] if cue.start() == 0 else sentence)
    # One number only: "3 red balls and 5 blue balls" states no single answer.
    return tokens[0].replace("−", "-") if len(tokens) == 1 else None


def extract(response: str) -> Extraction:
    """The final answer of `response` by the policy in the module docstring."""
    raw = tail(response)
    text = demarkup(raw)
    boxes = find_boxes(text)
    phrase = phrase_answer(text)
    # A phrase after the last box wins over it when it states a value ("The answer is boxed above." does not).
    later_phrase = phrase is not None and phrase[0] > boxes[-1].end if boxes else False
    if later_phrase and phrase is not None and not re.search(r"[\d$\\^_{}()\[\]=+\-/]", phrase[1]):
        later_phrase = False
    if boxes and not later_phrase:
        group = final_box_group(text, boxes)
        if group is None:
            return Extraction(None, source="box")
        closed = tuple(b.content.strip() for b in boxes if b.content and b.content.strip())[-MAX_GROUP_BOXES:]
        contents = [(b.content or "").strip() for b in group]
        distinct = list(dict.fromkeys(re.sub(r"\s+", "", c) for c in contents))
        if len(distinct) == 1:
            return Extraction(contents[-1], source="box", last_boxes=closed)
        unique = list(dict.fromkeys(contents))
        return Extraction(", ".join(unique), items=tuple(unique), source="box", last_boxes=closed)
    if phrase is not None:
        return Extraction(phrase[1], source="phrase")
    bold = bold_line_answer(raw)
    if bold is not None:
        return Extraction(bold, source="bold")
    said = closing_sentence_answer(text)
    return Extraction(said, source="sentence" if said else "")


def extract_answer(response: str) -> str | None:
    """The final answer of `response` as written, or None when there is none (or it is unclosed)."""
    return extract(response).answer
