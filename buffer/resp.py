"""Hand-packed Redis commands for the two hot paths (an insert, a learner's step).

redis-py's pipeline packs every argument of every command in Python on each call, and writes each argument
over 6 KB with a `sendall` of its own: for the 32 payloads and ~25 fixed arguments (table keys, script header) of
an insert that was over half the client's time, and the fixed arguments of the sample script a tenth of a step's
(`make bench-buffer`). Here the fixed leading arguments of a command are packed once (`Prefix`), a call packs
only what varies, and `roundtrip` writes the whole request with one `sendmsg` on a pooled connection and reads
the replies, under the client's own retry policy (`buffer.client.connect`): every request sent this way is safe
to send twice (inserts are idempotent per id, a sample retried under its lease id replays that lease).
"""

from __future__ import annotations

from typing import Any

import redis as redis_lib


def _b(x: bytes | str | int) -> bytes:
    return x if isinstance(x, bytes) else str(x).encode()


def arg(x: bytes | str | int) -> bytes:
    """One bulk-string argument."""
    b = _b(x)
    return b"$%d\r\n%s\r\n" % (len(b), b)


class Prefix:
    """The leading arguments of a command (name, keys, a script's header), packed once."""

    def __init__(self, *args: bytes | str | int) -> None:
        self.n = len(args)
        self.packed = b"".join(arg(a) for a in args)

    def add(self, out: list[bytes], *rest: bytes | str | int) -> None:
        """Append the command with these trailing arguments to `out` (large ones are not copied here)."""
        out.append(b"*%d\r\n" % (self.n + len(rest)))
        out.append(self.packed)
        for x in rest:
            b = _b(x)
            if len(b) > 1024:
                out += (b"$%d\r\n" % len(b), b, b"\r\n")
            else:
                out.append(arg(b))


MULTI = b"*1\r\n$5\r\nMULTI\r\n"
EXEC = b"*1\r\n$4\r\nEXEC\r\n"


def roundtrip(redis: redis_lib.Redis, request: list[bytes], replies: int) -> list[Any]:
    """Send `request` (the packed commands) and read `replies` replies; a command's error reply is returned in its
    place (as redis-py's `pipeline().execute(raise_on_error=False)` does). Connection errors and timeouts are
    retried by the client's retry policy, which resends the whole request."""
    pool = redis.connection_pool
    conn = pool.get_connection()
    try:
        return conn.retry.call_with_retry(lambda: _send_read(conn, request, replies), lambda _e: conn.disconnect())
    finally:
        pool.release(conn)


_IOV_MAX = 512
"""Pieces per sendmsg call (Linux takes up to 1024)."""
_GATHER_MIN = 65536
"""Requests this large are gathered by the kernel; smaller ones (a learner step's) are joined first, as many tiny
pieces cost sendmsg more than one copy."""


def _send(conn: Any, request: list[bytes]) -> None:
    """Write `request`: joined, with redis-py's own write, or if large with sendmsg (gathered by the kernel: an
    insert's 32 payloads are not first copied into one buffer, 3-7% of an insert), raising redis-py's errors."""
    if sum(map(len, request)) < _GATHER_MIN:
        return conn.send_packed_command([b"".join(request)])
    if conn._sock is None:
        conn.connect()
    views, i = [memoryview(b) for b in request], 0
    try:
        while i < len(views):
            sent = conn._sock.sendmsg(views[i:i + _IOV_MAX])
            while sent:  # skip what went out; a piece sent in part goes again from where it stopped
                if sent < views[i].nbytes:
                    views[i] = views[i][sent:]
                    break
                sent -= views[i].nbytes
                i += 1
    except TimeoutError as e:  # socket.timeout
        conn.disconnect()
        raise redis_lib.exceptions.TimeoutError("Timeout writing to socket") from e
    except OSError as e:
        conn.disconnect()
        raise redis_lib.exceptions.ConnectionError(f"Error while writing to socket: {e}") from e


def _send_read(conn: Any, request: list[bytes], replies: int) -> list[Any]:
    _send(conn, request)
    out: list[Any] = []
    for _ in range(replies):
        try:
            out.append(conn.read_response())
        except redis_lib.exceptions.ResponseError as e:
            out.append(e)
    return out
