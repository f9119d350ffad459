"""The actor's weight receive path: `POST /v1/weights` from its headers to the weights the engine serves.

`WeightReceiver.receive` (docs/weight-protocol.md, header names in actor_service.schema) checks, in this order, each
refusal leaving the running weights untouched:

  401 bearer token missing/wrong (or none configured) -> 400 bad version/sha256 headers -> 409 version not newer
  -> 413 Content-Length over `max_weight_bytes` -> [push lock] -> 409 version not newer, checked again: a resend
  that waited behind the first copy is refused before its body is used -> 413 streamed size over
  `max_weight_bytes` -> 400 body shorter than Content-Length -> 400 sha256 mismatch -> 400 not a safetensors file /
  truncated -> 400 first tensor whose name, shape or dtype does not match the model -> apply (reload_weights from
  memory, actor_service.engine, which checks the version a third time on its own thread) -> score the canary.
A push naming further actors in `X-TBRM-Relay` (400 if malformed, 411 without Content-Length) is streamed on to
them while it arrives (actor_service.relay); their answers come back in `relayed`.

A 401 is answered without reading the body (an unauthenticated client cannot make the actor spend time or memory);
other refusals before the body is received read and discard a body up to DRAIN_LIMIT_BYTES, outside the push lock,
so the client sees the status. The body is received into one buffer and hashed on another thread while it arrives
(`receive_body`); the parsed tensors are zero-copy views of that buffer (actor_service.weights.parse_weights);
nothing is written to disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from actor_service.metrics import ActorMetrics
from actor_service.relay import BodyProgress, forward, parse_relay
from actor_service.schema import (
    RELAY_HEADER,
    SHA256_HEADER,
    VERSION_HEADER,
    RelayHop,
    WeightUpdateResponse,
    canary_token_ids,
)
from actor_service.settings import ActorSettings
from actor_service.weights import (
    Buffer,
    WeightsFormatError,
    WeightsMismatchError,
    alloc_buffer,
    parse_weights,
)

if TYPE_CHECKING:
    from actor_service.engine import ActorEngine

log = logging.getLogger(__name__)

_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
DRAIN_LIMIT_BYTES = 256 * 2**20
"""On an early refusal, read and discard a declared body up to this size so the client gets the status code
instead of a broken pipe; larger bodies are cut off (the connection closes)."""
SHA256_BLOCK_BYTES = 8 * 2**20
"""Bytes handed to the hashing thread at a time."""


class PushRefused(HTTPException):
    """A refused push: the HTTP status, a short reason (the `/metrics` label) and the detail for the client."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        super().__init__(status_code=status, detail=detail, headers=headers)
        self.reason = reason


class _Stream(Protocol):
    def stream(self) -> AsyncIterator[bytes]: ...  # starlette's Request.stream


class ReceiveBuffers:
    """Receive buffers reused across pushes (used under the push lock only). The engine keeps serving views of
    the buffer of the weights it applied last (and reloads them on a failed apply), so that one is never reused;
    the one before it, or one whose push was refused, is no longer referenced and takes the next body of its
    size: a fresh 136 MB buffer costs page faults (and, with transparent huge pages, compaction) on first touch."""

    def __init__(self) -> None:
        self._spare: Buffer | None = None
        self._serving: Buffer | None = None

    def take(self, nbytes: int) -> Buffer:
        buf, self._spare = self._spare, None
        return buf if buf is not None and len(buf) == nbytes else alloc_buffer(nbytes)

    def applied(self, buf: Buffer) -> None:
        """`buf` now backs the served weights; the previously served buffer becomes the spare."""
        self._spare, self._serving = self._serving, buf

    def unused(self, buf: Buffer) -> None:
        """`buf`'s push was refused or failed to apply: nothing refers to it."""
        self._spare = buf


class WeightReceiver:
    """Receives, verifies and applies pushed weights, one push at a time (the push lock)."""

    def __init__(
        self, settings: ActorSettings, metrics: ActorMetrics, engine: Callable[[], ActorEngine]
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._engine = engine  # the engine once started; raises a 503 HTTPException before
        self._lock = asyncio.Lock()
        self._buffers = ReceiveBuffers()

    async def receive(
        self,
        request: Any,
        authorization: str | None,
        raw_version: str | None,
        sha256: str | None,
        content_length: str | None,
        relay: str | None = None,
    ) -> WeightUpdateResponse:
        """The whole push (see the module docstring); refusals raise PushRefused and are counted by reason."""
        declared = int(content_length) if content_length is not None and content_length.isdigit() else None
        try:
            return await self._receive(request, authorization, raw_version, sha256, declared, relay)
        except PushRefused as refusal:
            self.metrics.record_refused(refusal.reason)
            log.warning("weight push refused (%d): %s", refusal.status_code, refusal.detail)
            raise

    async def _receive(
        self,
        request: Any,
        authorization: str | None,
        raw_version: str | None,
        sha256: str | None,
        declared: int | None,
        raw_relay: str | None,
    ) -> WeightUpdateResponse:
        eng = self._engine()
        self.check_token(authorization)  # no token, no reading
        try:
            version, sha256 = self._check_headers(raw_version, sha256, declared, eng)
            hops = _check_relay(raw_relay, declared)
        except PushRefused:
            await drain(request, declared)
            raise
        async with self._lock:
            stale = self._stale(version, eng)  # a resend that waited for the first copy to be applied
            if stale is None:
                progress, relayed = self._start_relay(hops, declared, version, sha256)
                try:
                    answer = await self._take(request, declared, version, sha256, eng, progress)
                finally:  # also after a refusal: the forwarding thread finishes (each step has a timeout)
                    hops_answers = await relayed if relayed is not None else []
                answer.relayed = hops_answers
        if stale is not None:
            await drain(request, declared)
            raise stale
        self.metrics.record_update(version, answer.load_s, answer.receive_s, answer.nbytes)
        return answer

    def _start_relay(self, hops: list[str], declared: int | None, version: int, sha256: str
                     ) -> tuple[BodyProgress | None, asyncio.Future[list[RelayHop]] | None]:
        """Start streaming the body on to the next actors (actor_service.relay), if the push names any."""
        if not hops or declared is None:
            return None, None
        timeout_s = self.settings.relay_timeout_s
        progress = BodyProgress(declared, stall_s=timeout_s)
        loop = asyncio.get_running_loop()
        token = self.settings.auth_token or ""
        return progress, loop.run_in_executor(None, forward, hops, progress, version, sha256, token, timeout_s)

    async def _take(self, request: Any, declared: int | None, version: int, sha256: str, eng: ActorEngine,
                    progress: BodyProgress | None) -> WeightUpdateResponse:
        """Receive, verify, apply one push and score the canary (the caller holds the push lock)."""
        t0 = time.perf_counter()
        try:
            body, digest = await receive_body(request, declared, self.settings.max_weight_bytes, progress,
                                              alloc=self._buffers.take)
        except BaseException:
            if progress is not None:
                progress.abort()
            raise
        try:
            if not hmac.compare_digest(digest, sha256):
                raise PushRefused(400, "checksum", f"sha256 mismatch: body hashes to {digest}, header says {sha256}")
            tensors = await run_in_threadpool(self._parse, eng, body)
            receive_s = time.perf_counter() - t0
            load_s = await run_in_threadpool(self._apply, eng, tensors, version)
        except Exception:  # refused or not applied (a cancelled push is not reused: its apply may still land)
            self._buffers.unused(body)
            raise
        self._buffers.applied(body)
        t1 = time.perf_counter()
        canary = await run_in_threadpool(self.canary, eng)
        return WeightUpdateResponse(policy_version=version, sha256=digest, nbytes=len(body), receive_s=receive_s,
                                    load_s=load_s, canary_s=time.perf_counter() - t1, canary_logprobs=canary)

    # ---- checks before the body ----
    def check_token(self, authorization: str | None) -> None:
        token = self.settings.auth_token
        if not token:
            raise PushRefused(401, "auth", "weight pushes are disabled on this actor: set TBRM_AUTH_TOKEN")
        if not authorization or not authorization.startswith("Bearer "):
            raise PushRefused(
                401, "auth", "missing bearer token: send 'Authorization: Bearer <TBRM_AUTH_TOKEN>'"
            )
        if not hmac.compare_digest(authorization[7:].strip().encode(), token.encode()):
            raise PushRefused(401, "auth", "wrong bearer token")

    def _check_headers(
        self, raw_version: str | None, sha256: str | None, declared: int | None, eng: ActorEngine
    ) -> tuple[int, str]:
        """(version, lower-case sha256) of a push worth receiving."""
        version = _parse_version(raw_version)
        if sha256 is None or not _SHA256_RE.match(sha256):
            raise PushRefused(400, "headers", f"{SHA256_HEADER} must be the 64-hex-digit sha256 of the body")
        stale = self._stale(version, eng)
        if stale is not None:
            raise stale
        limit = self.settings.max_weight_bytes
        if declared is not None and declared > limit:
            raise PushRefused(413, "too_large", f"body of {declared} bytes exceeds max_weight_bytes={limit}")
        return version, sha256.lower()

    @staticmethod
    def _stale(version: int, eng: ActorEngine) -> PushRefused | None:
        if version > eng.version:
            return None
        return PushRefused(
            409,
            "version",
            f"policy version {version} is not newer than the actor's current version {eng.version}",
        )

    # ---- after the body ----
    def _parse(self, eng: ActorEngine, body: Buffer) -> dict[str, Any]:
        try:
            return parse_weights(body, eng.spec, eng.optional, self.settings.max_header_bytes)
        except WeightsFormatError as e:
            raise PushRefused(400, "format", str(e)) from None
        except WeightsMismatchError as e:
            raise PushRefused(400, "mismatch", str(e)) from None

    @staticmethod
    def _apply(eng: ActorEngine, tensors: dict[str, Any], version: int) -> float:
        from actor_service.engine import VersionConflict, WeightsApplyError

        try:
            return eng.apply_weights(tensors, version)
        except VersionConflict as e:
            raise PushRefused(409, "version", str(e)) from None
        except WeightsApplyError as e:
            raise PushRefused(400, "apply_failed", str(e)) from None

    def canary(self, eng: ActorEngine) -> list[float] | None:
        """Log-probs of the fixed canary tokens under the weights served (None with `canary` off): the learner
        compares them with its own to verify what was delivered."""
        if not self.settings.canary:
            return None
        return eng.score(canary_token_ids(eng.spec["model.embed_tokens.weight"].shape[0]))

    def warm_canary_in_background(self, eng: ActorEngine) -> None:
        """The first prompt-log-prob request of a fresh engine sets up its kernels (measured: tens of seconds on a
        loaded CPU): pay it in the background at start, not inside the first push."""
        if self.settings.canary:
            threading.Thread(target=self._warm_canary, args=(eng,), name="canary-warmup", daemon=True).start()

    def _warm_canary(self, eng: ActorEngine) -> None:
        try:
            self.canary(eng)
        except Exception as e:  # noqa: BLE001  (e.g. the engine closed first: only a warm-up)
            log.debug("canary warm-up skipped: %s", e)


def _check_relay(raw: str | None, declared: int | None) -> list[str]:
    try:
        hops = parse_relay(raw)
    except ValueError as e:
        raise PushRefused(400, "headers", str(e)) from None
    if hops and declared is None:
        raise PushRefused(411, "headers", f"a push with {RELAY_HEADER} needs a Content-Length header")
    return hops


def _parse_version(raw: str | None) -> int:
    if raw is None:
        raise PushRefused(
            400, "headers", f"missing {VERSION_HEADER} header (the new policy version, an integer)"
        )
    try:
        version = int(raw)
    except ValueError:
        raise PushRefused(400, "headers", f"{VERSION_HEADER} must be an integer, got {raw[:40]!r}") from None
    if version < 0:
        raise PushRefused(400, "headers", f"{VERSION_HEADER} must be >= 0, got {version}")
    return version


async def drain(request: Any, declared: int | None) -> None:
    """Read and discard a refused body of known size up to DRAIN_LIMIT_BYTES (the client then reads the status)."""
    if declared is None or declared > DRAIN_LIMIT_BYTES:
        return
    with suppress(ClientDisconnect):
        async for _ in request.stream():
            pass


# ---- receiving the body ----
async def receive_body(request: _Stream, declared: int | None, limit: int, progress: BodyProgress | None = None,
                       alloc: Callable[[int], Buffer] = alloc_buffer) -> tuple[Buffer, str]:
    """The whole body and its sha256 hex digest. Raises PushRefused (413 over `limit`, 400 incomplete/empty).

    With a Content-Length (what `actor_service.client.push_weights` sends) the body lands in one buffer allocated
    up front; every SHA256_BLOCK_BYTES received are hashed by a worker thread (hashlib releases the GIL),
    overlapping with the event loop receiving the next block, so the digest is ready about when the last byte
    arrives. A chunked body (no Content-Length) is collected block by block and joined once at the end. The
    result is a writable buffer (`alloc`, by default actor_service.weights.alloc_buffer; the parsed tensors are
    zero-copy views of it). `progress` (a relayed push, which always has a Content-Length) is told how much of
    the buffer has arrived after every chunk."""
    h = hashlib.sha256()
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1, thread_name_prefix="weights-sha256") as pool:

        def hash_async(block: Any) -> Awaitable[None]:
            return loop.run_in_executor(pool, h.update, block)

        if declared is not None:
            body, n = await _into_buffer(request, declared, limit, hash_async, progress, alloc)
        else:
            body, n = await _into_blocks(request, limit, hash_async)
    if declared is not None and n != declared:
        raise PushRefused(400, "incomplete", f"body has {n} bytes, Content-Length said {declared}")
    if n == 0:
        raise PushRefused(400, "format", "empty body: send the safetensors file")
    return body, h.hexdigest()


async def _into_buffer(
    request: _Stream, declared: int, limit: int, hash_async: Callable[[Any], Awaitable[None]],
    progress: BodyProgress | None, alloc: Callable[[int], Buffer],
) -> tuple[Buffer, int]:
    buf = alloc(declared)
    view = memoryview(buf)
    if progress is not None:
        progress.attach(view)
    n = hashed = 0
    pending: list[Awaitable[None]] = []
    try:
        try:
            async for chunk in request.stream():
                end = n + len(chunk)
                if end > declared:
                    if end > limit:
                        raise PushRefused(413, "too_large", f"body exceeds max_weight_bytes={limit}")
                    raise PushRefused(400, "incomplete", f"body longer than its Content-Length {declared}")
                view[n:end] = chunk
                n = end
                if progress is not None:
                    progress.advance(n)
                if n - hashed >= SHA256_BLOCK_BYTES:
                    pending.append(hash_async(view[hashed:n]))
                    hashed = n
        except ClientDisconnect:
            raise PushRefused(400, "incomplete", f"client disconnected after {n} bytes of the body") from None
        if n > hashed:
            pending.append(hash_async(view[hashed:n]))
    finally:
        for fut in pending:
            await fut
    return buf, n


async def _into_blocks(
    request: _Stream, limit: int, hash_async: Callable[[Any], Awaitable[None]]
) -> tuple[bytearray, int]:
    blocks: list[bytes] = []
    block = bytearray()
    n = 0
    pending: list[Awaitable[None]] = []
    try:
        try:
            async for chunk in request.stream():
                n += len(chunk)
                if n > limit:
                    raise PushRefused(413, "too_large", f"body exceeds max_weight_bytes={limit}")
                block += chunk
                if len(block) >= SHA256_BLOCK_BYTES:
                    blocks.append(bytes(block))
                    pending.append(hash_async(blocks[-1]))
                    block = bytearray()
        except ClientDisconnect:
            raise PushRefused(400, "incomplete", f"client disconnected after {n} bytes of the body") from None
        if block:
            blocks.append(bytes(block))
            pending.append(hash_async(blocks[-1]))
    finally:
        for fut in pending:
            await fut
    return bytearray().join(blocks), n
