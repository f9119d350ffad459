"""ASGI middleware every service puts in front of its routes: 413 for a request body over a byte limit."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BodyTooLarge(HTTPException):
    """Raised from the body stream. An HTTPException because FastAPI turns any other error raised while it reads
    the body into a 400 ("error parsing the body"); this one it re-raises, and it answers 413."""

    def __init__(self, detail: str) -> None:
        super().__init__(413, detail)


class BodyLimit:
    """413 with `{"detail": detail}` when a body exceeds `limit` bytes: by Content-Length before the route runs,
    and counted while the body streams in (chunked uploads). Paths in `exempt_paths` pass untouched (a route that
    enforces its own, larger limit). `detail` defaults to "request body over {limit} bytes"."""

    def __init__(self, app: Any, limit: int, *, exempt_paths: Collection[str] = (), detail: str | None = None) -> None:
        self.app, self.limit, self.exempt_paths = app, limit, frozenset(exempt_paths)
        self.detail = detail or f"request body over {limit} bytes"

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        too_big = JSONResponse({"detail": self.detail}, status_code=413)
        for k, v in scope.get("headers", []):
            if k == b"content-length" and (not v.isdigit() or int(v) > self.limit):
                await too_big(scope, receive, send)
                return
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.detail)
            return msg

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge:
            await too_big(scope, receive, send)
