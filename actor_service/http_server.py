"""uvicorn's httptools protocol with the `BODY_INTO` extension (actor_service.body_into): the actor's weight pushes
are read from the socket into their receive buffer, one copy (the kernel's), as a raw `recv_into` would.

`BodyIntoProtocol` offers `body_into` to every plain-HTTP request with one Content-Length and no
Transfer-Encoding. The bytes that came with the headers are already parsed into the request's buffer: they are
copied first. If more is due, the connection's transport is handed to a `_BodyReader` (asyncio's
`BufferedProtocol`: `recv_into` the given buffer at its offset), which hands it back once the last byte of the
body is in and stops reading; the HTTP parser never sees those bytes, so the connection closes after the response
(`Connection: close`, one connection per push is what actor_service.client opens anyway). A client that closes
first gets BodyCutOff (and uvicorn its usual `connection_lost`); a cancelled receive closes the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from actor_service.body_into import BODY_INTO, BodyCutOff


class BodyIntoProtocol(HttpToolsProtocol):
    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        length = self._content_length()
        if length is not None and self.scheme == "http" and self.cycle is not None and self.cycle.scope is self.scope:
            self.scope.setdefault("extensions", {})[BODY_INTO] = partial(self._body_into, self.cycle, length)

    def _content_length(self) -> int | None:
        lengths = [v for k, v in self.headers if k == b"content-length"]
        if len(lengths) != 1 or not lengths[0].isdigit() or any(k == b"transfer-encoding" for k, _ in self.headers):
            return None
        return int(lengths[0])

    async def _body_into(self, cycle: RequestResponseCycle, length: int, view: Any,
                         on_progress: Callable[[int], None]) -> int:
        view = memoryview(view).cast("B")
        if len(view) != length:
            raise ValueError(f"body_into needs a buffer of the Content-Length, {length} bytes, got {len(view)}")
        n = len(cycle.body)
        if cycle.disconnected:
            raise BodyCutOff(n, length)
        if cycle.waiting_for_100_continue:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        view[:n] = cycle.body
        cycle.body = bytearray()
        if n:
            on_progress(n)
        if not cycle.more_body:  # the whole body came with the headers
            return n
        cycle.keep_alive = False  # the parser does not see the rest of the body: no next request on this connection
        reader = _BodyReader(self, cycle, view, n, on_progress)
        self.transport.set_protocol(reader)
        self.flow.resume_reading()
        try:
            return await reader.done
        finally:
            if not reader.complete:  # cancelled, or on_progress raised: the rest of the body is not read
                self.transport.close()


class _BodyReader(asyncio.BufferedProtocol):
    """The transport's protocol while a body is read into `view` from offset `n`."""

    def __init__(self, http: BodyIntoProtocol, cycle: RequestResponseCycle, view: memoryview, n: int,
                 on_progress: Callable[[int], None]) -> None:
        self._http, self._cycle, self._view, self._n, self._on_progress = http, cycle, view, n, on_progress
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.complete = False

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view[self._n:]

    def buffer_updated(self, nbytes: int) -> None:
        self._n += nbytes
        try:
            self._on_progress(self._n)
        except Exception as e:  # noqa: BLE001  (raised by the receiving coroutine)
            self._fail(e)
            self._http.transport.close()
            return
        if self._n == len(self._view):
            self.complete = True
            self._http.flow.pause_reading()  # what follows is not this body's; the connection closes after the response
            self._http.transport.set_protocol(self._http)
            self._cycle.more_body = False
            self._cycle.message_event.set()
            self.done.set_result(self._n)

    def _fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def eof_received(self) -> None:
        return None  # the transport closes: connection_lost

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(BodyCutOff(self._n, len(self._view)))
        self._http.connection_lost(exc)

    def pause_writing(self) -> None:
        self._http.pause_writing()

    def resume_writing(self) -> None:
        self._http.resume_writing()
