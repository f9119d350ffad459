"""The `BODY_INTO` ASGI extension: a request body read from the socket straight into the app's buffer.

Through ASGI messages a body reaches the app in copies: under uvicorn + httptools every piece asyncio reads (at most
256 KiB) is copied by the parser into a bytes object, appended to the request's bytearray, copied into the
`http.request` message and once more by the app into its buffer, and reading pauses at 64 KiB until the app asks
for the next message (docs/weight-protocol.md#receive-speed). The actor's server (actor_service.http_server)
offers, for a request with a Content-Length, `scope["extensions"][BODY_INTO]`: an async function

    n = await body_into(view, on_progress)

that fills `view` (a writable buffer of exactly Content-Length bytes) from the socket, the kernel copying each
read into it at its offset, and calls `on_progress(n)` with the bytes received so far after each read. The app
calls it only after it has checked the request's headers. It raises BodyCutOff if the connection closes first.
The connection closes after the response.
"""

from __future__ import annotations

BODY_INTO = "tbrm.body_into"


class BodyCutOff(ConnectionError):
    """The connection closed before the whole body arrived."""

    def __init__(self, received: int, expected: int) -> None:
        super().__init__(f"client disconnected after {received} of {expected} bytes of the body")
        self.received = received
