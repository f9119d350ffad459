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
so the client sees the status. The body is read from the socket into one buffer (the BODY_INTO extension of the
actor's server, actor_service.http_server) and hashed on another thread while it arrives (`receive_body`); the
parsed tensors are zero-copy views of that buffer (actor_service.weights.parse_weights); nothing is written to
disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from actor_service.body_into import BODY_INTO, BodyCutOff
from actor_service.metrics import ActorMetrics
from actor_service.relay import BodyAborted, BodyProgress, forward, parse_relay
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
    size: a fresh 136 MB buffer costs page faults (and, with transparent huge pages, compaction) on first touch,
    measured 0.3-0.5 s more inside the actor. Until there is such a buffer (after the first push) a thread
    prepares one of the size last applied, its pages already touched, for the next push."""

    def __init__(self) -> None:
        self._spare: Buffer | None = None
        self._serving: Buffer | None = None
        self._next: Future[Buffer] | None = None

    def take(self, nbytes: int) -> Buffer:
        buf, self._spare = self._spare, None
        if buf is None:
            buf = self._prepared()
        return buf if buf is not None and len(buf) == nbytes else alloc_buffer(nbytes)

    def applied(self, buf: Buffer) -> None:
        """`buf` now backs the served weights; the previously served buffer becomes the spare."""
        self._spare, self._serving = self._serving, buf
        if self._spare is None and self._next is None:
            self._next = Future()
            threading.Thread(target=_prepare, args=(self._next, len(buf)), name="receive-buffer", daemon=True).start()

    def unused(self, buf: Buffer) -> None:
        """`buf`'s push was refused or failed to apply: nothing refers to it."""
        self._spare = buf

    def _prepared(self) -> Buffer | None:
        """The buffer prepared in the background, if ready (a push does not wait for it)."""
        fut = self._next
        if fut is None or not fut.done():
            return None
        self._next = None
        return fut.result() if fut.exception() is None else None


def _prepare(fut: Future[Buffer], nbytes: int) -> None:
    try:
        fut.set_result(alloc_buffer(nbytes, touch=True))
    except Exception as e:  # noqa: BLE001  (e.g. out of memory: the next push allocates its own)
        fut.set_exception(e)


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
        progress = BodyProgress(declared)
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
        canary, canary_version = await run_in_threadpool(self.canary, eng)
        return WeightUpdateResponse(policy_version=version, sha256=digest, nbytes=len(body), receive_s=receive_s,
                                    load_s=load_s, canary_s=time.perf_counter() - t1, canary_logprobs=canary,
                                    canary_version=canary_version)

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

    def canary(self, eng: ActorEngine) -> tuple[list[float] | None, int | None]:
        """Log-probs of the fixed canary tokens under the weights served and their version ((None, None) with
        `canary` off): the learner compares them with its own for that version to verify what was delivered."""
        if not self.settings.canary:
            return None, None
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
    up front (`alloc`, by default actor_service.weights.alloc_buffer; the parsed tensors are zero-copy views of
    it): read from the socket straight into it when the server offers the BODY_INTO extension (the actor's own
    server, actor_service.http_server), else copied from the ASGI body messages. A worker thread hashes it as it
    fills (`progress`, a BodyProgress, which a relayed push also forwards from), each time all that arrived since
    its last piece (hashlib releases the GIL), so the digest is ready about when the last byte arrives. A chunked
    body (no Content-Length) is collected block by block, joined and hashed at the end."""
    with ThreadPoolExecutor(1, thread_name_prefix="weights-sha256") as pool:
        if declared is None:
            body = await _into_blocks(request, limit)
            n, digest = len(body), await asyncio.get_running_loop().run_in_executor(pool, _sha256, body)
        else:
            body = alloc(declared)
            n, digest = await _into_buffer(request, body, limit, progress or BodyProgress(declared), pool)
    if declared is not None and n != declared:
        raise PushRefused(400, "incomplete", f"body has {n} bytes, Content-Length said {declared}")
    if n == 0:
        raise PushRefused(400, "format", "empty body: send the safetensors file")
    assert digest is not None
    return body, digest


def _sha256(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_as_it_arrives(progress: BodyProgress) -> str | None:
    """The body's sha256 hex digest, or None if it was not received completely."""
    h = hashlib.sha256()
    try:
        for piece in progress.chunks():
            h.update(piece)
    except BodyAborted:
        return None
    return h.hexdigest()


async def _into_buffer(request: _Stream, buf: Buffer, limit: int, progress: BodyProgress, pool: ThreadPoolExecutor
                       ) -> tuple[int, str | None]:
    """(bytes received, their sha256 or None if fewer than the buffer's size)."""
    view = memoryview(buf)
    progress.attach(view)
    hashing = asyncio.get_running_loop().run_in_executor(pool, _sha256_as_it_arrives, progress)
    body_into = request.scope.get("extensions", {}).get(BODY_INTO)
    try:
        try:
            await (body_into(view, progress.advance) if body_into is not None
                   else _copy_stream(request, view, limit, progress.advance))
        except (ClientDisconnect, BodyCutOff):
            raise PushRefused(400, "incomplete", f"client disconnected after {progress.arrived} bytes of the body"
                              ) from None
    finally:
        if progress.arrived < len(view):
            progress.abort()  # the hashing thread (and a relay's) stop
        digest = await hashing  # the buffer is reused only once no thread reads it
    return progress.arrived, digest


async def _copy_stream(request: _Stream, view: memoryview, limit: int, arrived: Callable[[int], None]) -> None:
    """The ASGI body messages copied into `view` (a server without BODY_INTO)."""
    n = 0
    async for chunk in request.stream():
        end = n + len(chunk)
        if end > len(view):
            if end > limit:
                raise PushRefused(413, "too_large", f"body exceeds max_weight_bytes={limit}")
            raise PushRefused(400, "incomplete", f"body longer than its Content-Length {len(view)}")
        view[n:end] = chunk
        n = end
        arrived(n)


async def _into_blocks(request: _Stream, limit: int) -> bytearray:
    blocks: list[bytes] = []
    n = 0
    try:
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise PushRefused(413, "too_large", f"body exceeds max_weight_bytes={limit}")
            blocks.append(chunk)
    except ClientDisconnect:
        raise PushRefused(400, "incomplete", f"client disconnected after {n} bytes of the body") from None
    return bytearray().join(blocks)
