"""Wire format of the reward service (DESIGN.md §6). Light module: pydantic only."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

GradeStatus = Literal["correct", "incorrect", "no_answer", "timeout", "error"]

MAX_RESPONSE_CHARS = 64_000
MAX_GOLD_CHARS = 4_000
MAX_BATCH_ITEMS = 1_024


class GradeItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    response: str = Field(max_length=MAX_RESPONSE_CHARS)
    gold: str = Field(max_length=MAX_GOLD_CHARS)


class GradeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[GradeItem] = Field(min_length=1, max_length=MAX_BATCH_ITEMS)


class GradeResult(BaseModel):
    score: float
    status: GradeStatus
    extracted: str | None = None


class GradeResponse(BaseModel):
    results: list[GradeResult]
