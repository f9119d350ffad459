"""HTTP client of the reward service (light: pydantic + httpx only).

Used by actors (and eval) to grade responses::

    client = RewardClient("http://127.0.0.1:8001", timeout_s=30.0)
    results = client.grade([GradeItem(response="... \\boxed{4}", gold="4")])
    results = await client.agrade(items)   # asyncio variant

Retries happen only on transport errors (connect/read failures, timeouts) and 5xx answers, with exponential
backoff; 4xx answers (a malformed request) raise at once, because retrying cannot fix them. Batches larger
than the server's cap (items, or about MAX_REQUEST_BYTES of JSON) are split transparently, results come back in
input order. Only the last MAX_RESPONSE_CHARS characters of a response are sent: the grader reads its tail.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence

import httpx

from reward.schema import (
    MAX_BATCH_ITEMS,
    MAX_RESPONSE_CHARS,
    GradeItem,
    GradeRequest,
    GradeResponse,
    GradeResult,
)

log = logging.getLogger(__name__)

DEFAULT_REWARD_URL = "http://127.0.0.1:8001"
# Target size of one request body; well under the service's default `max_body_bytes` (32 MiB).
MAX_REQUEST_BYTES = 8 * 2**20


class RewardServiceError(RuntimeError):
    """The reward service could not grade a batch (after retries, or a 4xx answer). `status_code` may be None."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


def default_reward_url() -> str:
    """`TBRM_REWARD_URL` or the default local address (port 8001)."""
    return os.environ.get("TBRM_REWARD_URL", DEFAULT_REWARD_URL)


class RewardClient:
    """Grades batches against a running reward service.

    Args:
        base_url: service root, e.g. ``http://127.0.0.1:8001``.
        timeout_s: timeout of one HTTP attempt (connect + read + write).
        retries: extra attempts after the first on transport errors and 5xx answers.
        backoff_s: first backoff; doubles after each failed attempt (capped at 5 s).
        batch_size: most items per request (the server refuses more than MAX_BATCH_ITEMS).
    """

    def __init__(
        self,
        base_url: str | None = None,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.2,
        batch_size: int = 256,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if not 1 <= batch_size <= MAX_BATCH_ITEMS:
            raise ValueError(f"batch_size must be in [1, {MAX_BATCH_ITEMS}], got {batch_size}")
        self.base_url = (base_url or default_reward_url()).rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.batch_size = batch_size
        self._client: httpx.Client | None = None
        self._aclient: httpx.AsyncClient | None = None

    # -- plumbing -------------------------------------------------------------------------------------------
    @property
    def _verify(self) -> bool:
        # Plain http never uses TLS: skip loading the CA bundle (~35 ms of CPU per client, on the actor's post
        # thread beside the engine).
        return not self.base_url.startswith("http://")

    def _sync(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(base_url=self.base_url, timeout=self.timeout_s, verify=self._verify)
        return self._client

    def _async(self) -> httpx.AsyncClient:
        if self._aclient is None:
            self._aclient = httpx.AsyncClient(
                base_url=self.base_url, timeout=self.timeout_s, verify=self._verify
            )
        return self._aclient

    def _delay(self, attempt: int) -> float:
        return min(self.backoff_s * (2**attempt), 5.0)

    @staticmethod
    def _parse(resp: httpx.Response, n: int) -> list[GradeResult]:
        results = GradeResponse.model_validate_json(resp.content).results
        if len(results) != n:
            raise RewardServiceError(f"reward service answered {len(results)} results for {n} items")
        return results

    def _chunks(self, items: Sequence[GradeItem]) -> list[list[GradeItem]]:
        items = [it if isinstance(it, GradeItem) else GradeItem.model_validate(it) for it in items]
        items = [
            it.model_copy(update={"response": it.response[-MAX_RESPONSE_CHARS:]})
            if len(it.response) > MAX_RESPONSE_CHARS
            else it
            for it in items
        ]
        chunks: list[list[GradeItem]] = []
        size = 0
        for it in items:
            cost = 6 * (len(it.response) + len(it.gold)) + 64  # JSON bytes, worst case (\uXXXX escapes)
            if not chunks or len(chunks[-1]) >= self.batch_size or size + cost > MAX_REQUEST_BYTES:
                chunks.append([])
                size = 0
            chunks[-1].append(it)
            size += cost
        return chunks

    @staticmethod
    def _body(chunk: list[GradeItem]) -> bytes:
        return GradeRequest(items=chunk).model_dump_json().encode()

    def _check(self, resp: httpx.Response) -> bool:
        """True: retryable (5xx). Raises on 4xx. False: success."""
        if resp.status_code >= 500:
            return True
        if resp.status_code >= 400:
            raise RewardServiceError(
                f"reward service refused the batch: HTTP {resp.status_code}: {resp.text[:500]}",
                resp.status_code,
            )
        return False

    # -- public API -----------------------------------------------------------------------------------------
    def grade(self, items: Sequence[GradeItem]) -> list[GradeResult]:
        """Grade `items` (in order). Raises RewardServiceError when the service stays unreachable or refuses."""
        out: list[GradeResult] = []
        for chunk in self._chunks(items):
            out += self._grade_chunk(chunk)
        return out

    def _grade_chunk(self, chunk: list[GradeItem]) -> list[GradeResult]:
        body = self._body(chunk)
        last: str = ""
        last_code: int | None = None
        for attempt in range(self.retries + 1):
            try:
                resp = self._sync().post(
                    "/v1/grade", content=body, headers={"content-type": "application/json"}
                )
                if not self._check(resp):
                    return self._parse(resp, len(chunk))
                last, last_code = f"HTTP {resp.status_code}: {resp.text[:200]}", resp.status_code
            except httpx.TransportError as exc:  # connect/read/write errors and timeouts
                last, last_code = f"{type(exc).__name__}: {exc}", None
            if attempt < self.retries:
                delay = self._delay(attempt)
                log.warning(
                    "reward grade attempt %d failed (%s); retrying in %.2fs", attempt + 1, last, delay
                )
                time.sleep(delay)
        raise RewardServiceError(
            f"reward service at {self.base_url} failed after {self.retries + 1} attempts: {last}", last_code
        )

    async def agrade(self, items: Sequence[GradeItem]) -> list[GradeResult]:
        """Async variant of `grade` (chunks are sent concurrently)."""
        chunks = self._chunks(items)
        parts = await asyncio.gather(*(self._agrade_chunk(c) for c in chunks))
        return [r for part in parts for r in part]

    async def _agrade_chunk(self, chunk: list[GradeItem]) -> list[GradeResult]:
        body = self._body(chunk)
        last: str = ""
        last_code: int | None = None
        for attempt in range(self.retries + 1):
            try:
                resp = await self._async().post(
                    "/v1/grade", content=body, headers={"content-type": "application/json"}
                )
                if not self._check(resp):
                    return self._parse(resp, len(chunk))
                last, last_code = f"HTTP {resp.status_code}: {resp.text[:200]}", resp.status_code
            except httpx.TransportError as exc:
                last, last_code = f"{type(exc).__name__}: {exc}", None
            if attempt < self.retries:
                delay = self._delay(attempt)
                log.warning(
                    "reward agrade attempt %d failed (%s); retrying in %.2fs", attempt + 1, last, delay
                )
                await asyncio.sleep(delay)
        raise RewardServiceError(
            f"reward service at {self.base_url} failed after {self.retries + 1} attempts: {last}", last_code
        )

    def health(self, timeout_s: float = 5.0) -> bool:
        """True when `GET /health` answers 200 with status ok within `timeout_s`; never raises on transport."""
        try:
            resp = self._sync().get("/health", timeout=timeout_s)
            return resp.status_code == 200 and resp.json().get("status") == "ok"
        except (httpx.HTTPError, ValueError):
            return False

    async def ahealth(self, timeout_s: float = 5.0) -> bool:
        try:
            resp = await self._async().get("/health", timeout=timeout_s)
            return resp.status_code == 200 and resp.json().get("status") == "ok"
        except (httpx.HTTPError, ValueError):
            return False

    def wait_ready(self, timeout_s: float = 30.0, interval_s: float = 0.1) -> None:
        """Poll `/health` until it answers ok; TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.health(timeout_s=min(2.0, timeout_s)):
                return
            time.sleep(interval_s)
        raise TimeoutError(f"reward service at {self.base_url} not healthy after {timeout_s}s")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def aclose(self) -> None:
        if self._aclient is not None:
            await self._aclient.aclose()
            self._aclient = None

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> RewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
