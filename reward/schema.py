"""Wire format of the reward service. Light module: pydantic only."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

GradeStatus = Literal["correct", "incorrect", "no_answer", "timeout", "error"]

# The grader reads only the tail of a response (reward.extraction.TAIL_CHARS, 16k characters), so a client never
# needs to send more than this many trailing characters. It is not a limit: longer responses are graded too
# (the request body limit, `max_body_bytes`, is the only bound).
MAX_RESPONSE_CHARS = 64_000
MAX_GOLD_CHARS = 4_000
MAX_BATCH_ITEMS = 1_024


_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def valid_unicode(value: Any) -> Any:
    """Strings that cannot be encoded as UTF-8 (lone surrogates: bytes decoded with `surrogateescape`, or JSON
    `"\\udc80"` escapes) become valid text: escaped bytes are decoded as UTF-8 where they form it, anything else
    becomes U+FFFD. Other types pass through (pydantic answers 422 for them)."""
    if not isinstance(value, str) or value.isascii():
        return value
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # surrogates outside the surrogateescape range (e.g. "\ud800")
        return _SURROGATE_RE.sub("\ufffd", value)


Text = Annotated[str, BeforeValidator(valid_unicode)]


class GradeItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    response: Text
    gold: Annotated[Text, Field(max_length=MAX_GOLD_CHARS)]


class GradeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[GradeItem] = Field(min_length=1, max_length=MAX_BATCH_ITEMS)


class GradeResult(BaseModel):
    score: float
    status: GradeStatus
    extracted: str | None = None


class GradeResponse(BaseModel):
    results: list[GradeResult]
