"""HTTP client of the actor service (light: pydantic + httpx only). The learner pushes weights with it::

    resp = push_weights("http://127.0.0.1:8100", "weights/v7.safetensors", version=7, token=token)
    status = get_status("http://127.0.0.1:8100")

`push_weights` streams the file (never loads it in memory), sends its sha256 and the version in headers
(actor_service.schema) and raises `WeightPushError(status, message)` on any refusal or transport failure, so a
caller can tell "actor is behind/ahead" (409) from "my file is bad" (400) from "actor unreachable" (status None).
Every call has a timeout.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from actor_service.schema import (
    RELAY_HEADER,
    SHA256_HEADER,
    VERSION_HEADER,
    ActorStatus,
    GenerateRequest,
    GenerateResponse,
    WeightUpdateResponse,
)
from common.files import file_sha256

CHUNK_BYTES = 1 << 20
"""Read/send granularity of the streamed body."""


class WeightPushError(RuntimeError):
    """A weight push failed. `status` is the HTTP status (None for transport errors and timeouts)."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status is not None else message)
        self.status = status
        self.message = message


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:500]
    return str(body)[:500]


def push_weights(
    url: str,
    safetensors_path: str | Path,
    version: int,
    token: str,
    timeout_s: float = 60.0,
    sha256: str | None = None,
    relay: Sequence[str] = (),
) -> WeightUpdateResponse:
    """Push a safetensors file to one actor's `POST /v1/weights`.

    Args:
        url: actor base URL (e.g. http://127.0.0.1:8100).
        safetensors_path: the file (HF parameter names, the actor model's shapes and dtypes).
        version: new policy version; must exceed the actor's current one (else 409).
        token: bearer token (TBRM_AUTH_TOKEN).
        timeout_s: bound on connecting and on each socket read/write (the answer comes after the actor applied
            the weights, which waits for its current generation batch: keep it above the batch latency).
        sha256: hex digest of the file if already known (saves one pass over it when pushing to many actors).
        relay: base URLs of further actors: the actor streams the body on to them while receiving it (a chain,
            docs/weight-protocol.md#fan-out) and lists their answers in `relayed`.

    The body goes out with `socket.sendfile` on a plain http.client connection: measured on loopback, httpx's
    chunked writes capped a push at about a third of what the socket carries.
    """
    path = Path(safetensors_path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise WeightPushError(None, f"cannot read weights file {path}: {e}") from e
    digest = sha256 or file_sha256(path)

    def send_file(conn: http.client.HTTPConnection) -> None:
        with open(path, "rb") as f:
            if isinstance(conn.sock, socket.socket) and not isinstance(conn, http.client.HTTPSConnection):
                conn.sock.sendfile(f)
            else:
                while chunk := f.read(CHUNK_BYTES):
                    conn.send(chunk)

    return post_weights(url, send_file, size, version, digest, token, timeout_s, relay)


def post_weights(
    url: str,
    send_body: Callable[[http.client.HTTPConnection], None],
    size: int,
    version: int,
    sha256: str,
    token: str,
    timeout_s: float,
    relay: Sequence[str] = (),
) -> WeightUpdateResponse:
    """`POST /v1/weights` with a body of `size` bytes written by `send_body(conn)` (a file, or a relaying actor's
    buffer as it fills); raises WeightPushError like push_weights."""
    parts = urlsplit(url.rstrip("/") + "/v1/weights")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WeightPushError(None, f"bad actor url {url!r}: expected http(s)://host:port")
    conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(parts.hostname, parts.port, timeout=timeout_s)
    headers = {"Authorization": f"Bearer {token}", VERSION_HEADER: str(version), SHA256_HEADER: sha256,
               "Content-Type": "application/octet-stream", "Content-Length": str(size)}
    if relay:
        headers[RELAY_HEADER] = ",".join(relay)
    sent_all = False
    try:
        try:
            conn.putrequest("POST", parts.path)
            for name, value in headers.items():
                conn.putheader(name, value)
            conn.endheaders()
            send_body(conn)
            sent_all = True
        except (BrokenPipeError, ConnectionResetError):
            pass  # the actor refused early (401/409/413) and closed: its answer may still be readable
        try:
            resp = conn.getresponse()
            body = resp.read()
        except TimeoutError as e:
            raise WeightPushError(None, f"push to {url} timed out after {timeout_s}s") from e
        except (OSError, http.client.HTTPException) as e:
            what = "failed" if sent_all else "was cut off while sending the body"
            raise WeightPushError(None, f"push to {url} {what}: {type(e).__name__}: {e}") from e
    except TimeoutError as e:
        raise WeightPushError(None, f"push to {url} timed out after {timeout_s}s") from e
    except OSError as e:
        raise WeightPushError(None, f"push to {url} failed: {type(e).__name__}: {e}") from e
    finally:
        conn.close()
    if resp.status != 200:
        raise WeightPushError(resp.status, _detail_bytes(body))
    return WeightUpdateResponse.model_validate_json(body)


def _detail_bytes(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:500].decode(errors="replace")
    if isinstance(data, dict) and "detail" in data:
        return str(data["detail"])[:500]
    return str(data)[:500]


def get_status(url: str, timeout_s: float = 5.0) -> ActorStatus:
    """`GET /v1/status` of one actor (httpx errors propagate: the caller decides whether the actor is dead)."""
    resp = httpx.get(f"{url.rstrip('/')}/v1/status", timeout=timeout_s)
    resp.raise_for_status()
    return ActorStatus.model_validate_json(resp.content)


def health(url: str, timeout_s: float = 5.0) -> bool:
    """True when the actor answers `GET /health` with status ok; never raises on transport errors."""
    try:
        resp = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout_s)
        return resp.status_code == 200 and resp.json().get("status") == "ok"
    except (httpx.HTTPError, ValueError):
        return False


def generate(url: str, request: GenerateRequest, timeout_s: float = 120.0) -> GenerateResponse:
    """`POST /v1/generate`: read-only generation on the actor's current weights (eval, smoke tests)."""
    resp = httpx.post(
        f"{url.rstrip('/')}/v1/generate", content=request.model_dump_json(), timeout=timeout_s,
        headers={"Content-Type": "application/json"},
    )
    if resp.status_code != 200:
        raise httpx.HTTPStatusError(
            f"generate failed: HTTP {resp.status_code}: {_detail(resp)}", request=resp.request, response=resp
        )
    return GenerateResponse.model_validate_json(resp.content)
