"""Receive a pushed weights body into memory while hashing it on another thread (no file is written).

With a Content-Length (what `actor_service.client.push_weights` sends) the body lands in one buffer allocated up
front; every SHA256_BLOCK_BYTES received are hashed by a worker thread (hashlib releases the GIL), overlapping
with the event loop receiving the next block, so the digest is ready about when the last byte arrives. A chunked
body (no Content-Length) is collected block by block and joined once at the end. The result is a writable
bytearray: the parsed tensors are zero-copy views of it (actor_service.weights.parse_weights).
"""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from fastapi import HTTPException
from starlette.requests import ClientDisconnect

SHA256_BLOCK_BYTES = 8 * 2**20
"""Bytes handed to the hashing thread at a time."""


class _Stream(Protocol):
    def stream(self): ...  # noqa: ANN201, D102  (starlette's Request.stream: an async iterator of bytes)


class BodyRefused(HTTPException):
    """The body broke a rule while it arrived (too large, incomplete, empty)."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(status_code=status, detail=detail)
        self.reason = reason


async def receive_body(request: _Stream, declared: int | None, limit: int) -> tuple[bytearray, str]:
    """The whole body and its sha256 hex digest. Raises BodyRefused (413 over `limit`, 400 incomplete/empty)."""
    h = hashlib.sha256()
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1, thread_name_prefix="weights-sha256") as pool:
        if declared is not None:
            body, n = await _into_buffer(request, declared, limit, lambda b: loop.run_in_executor(pool, h.update, b))
        else:
            body, n = await _into_blocks(request, limit, lambda b: loop.run_in_executor(pool, h.update, b))
    if declared is not None and n != declared:
        raise BodyRefused(400, "incomplete", f"body has {n} bytes, Content-Length said {declared}")
    if n == 0:
        raise BodyRefused(400, "format", "empty body: send the safetensors file")
    return body, h.hexdigest()


async def _into_buffer(request: _Stream, declared: int, limit: int, hash_async) -> tuple[bytearray, int]:  # noqa: ANN001
    buf = bytearray(declared)
    view = memoryview(buf)
    n = hashed = 0
    pending: list[asyncio.Future[None]] = []
    try:
        try:
            async for chunk in request.stream():
                end = n + len(chunk)
                if end > declared:
                    if end > limit:
                        raise BodyRefused(413, "too_large", f"body exceeds max_weight_bytes={limit}")
                    raise BodyRefused(400, "incomplete", f"body longer than its Content-Length {declared}")
                view[n:end] = chunk
                n = end
                if n - hashed >= SHA256_BLOCK_BYTES:
                    pending.append(hash_async(view[hashed:n]))
                    hashed = n
        except ClientDisconnect:
            raise BodyRefused(400, "incomplete", f"client disconnected after {n} bytes of the body") from None
        if n > hashed:
            pending.append(hash_async(view[hashed:n]))
    finally:
        for fut in pending:
            await fut
    return buf, n


async def _into_blocks(request: _Stream, limit: int, hash_async) -> tuple[bytearray, int]:  # noqa: ANN001
    blocks: list[bytes] = []
    block = bytearray()
    n = 0
    pending: list[asyncio.Future[None]] = []
    try:
        try:
            async for chunk in request.stream():
                n += len(chunk)
                if n > limit:
                    raise BodyRefused(413, "too_large", f"body exceeds max_weight_bytes={limit}")
                block += chunk
                if len(block) >= SHA256_BLOCK_BYTES:
                    blocks.append(bytes(block))
                    pending.append(hash_async(blocks[-1]))
                    block = bytearray()
        except ClientDisconnect:
            raise BodyRefused(400, "incomplete", f"client disconnected after {n} bytes of the body") from None
        if block:
            blocks.append(bytes(block))
            pending.append(hash_async(blocks[-1]))
    finally:
        for fut in pending:
            await fut
    return bytearray().join(blocks), n
