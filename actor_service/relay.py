"""Fan-out of weight pushes by relay (docs/weight-protocol.md#fan-out): the learner sends the bytes once.

A push may name further actors in `X-TBRM-Relay` (comma-separated base URLs). The receiving actor, once the token
and headers passed, streams the body on to the first of them while it is still receiving it (naming the rest in the
same header, with its own bearer token: every actor of a run shares one), so the body travels down a pipelined chain
and every actor sends it once. Each actor verifies and applies its own copy. The forwarding runs on a thread,
reading the receive buffer as it fills (`BodyProgress`), so a slow next hop never slows this actor's own receive.

If the next hop is unreachable or refuses, the forwarder records its answer and sends the whole body (it holds
it all) to the hop after it, with the rest of the list; every answer (the next hop's own, then the ones that hop
relayed) comes back in `WeightUpdateResponse.relayed`. An actor the chain did not reach is simply not listed; the
learner pushes to it directly.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

from actor_service.client import WeightPushError, post_weights
from actor_service.schema import RELAY_HEADER, RelayHop, WeightUpdateResponse

MAX_RELAY_HOPS = 256


class BodyAborted(RuntimeError):
    """The body was not received completely (the push was cut off or refused)."""


def parse_relay(raw: str | None) -> list[str]:
    """The base URLs of an `X-TBRM-Relay` header ([] without one). ValueError names the first problem."""
    if raw is None or not raw.strip():
        return []
    urls = [u.strip().rstrip("/") for u in raw.split(",")]
    if len(urls) > MAX_RELAY_HOPS:
        raise ValueError(f"{RELAY_HEADER} names {len(urls)} actors, at most {MAX_RELAY_HOPS}")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
            raise ValueError(f"{RELAY_HEADER}: {url[:100]!r} is not an actor base URL http(s)://host:port")
    if len(set(urls)) != len(urls):
        raise ValueError(f"{RELAY_HEADER} names an actor twice")
    return urls


class BodyProgress:
    """The receive buffer of a push and how much of it has arrived, shared by the receiving coroutine (`attach`,
    `advance`, `abort`) and the threads that read the body as it fills (`chunks`): the sha256 hasher
    (actor_service.weight_receiver) and, for a relayed push, the forwarder."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._cond = threading.Condition()
        self._view: memoryview | None = None
        self._n = 0
        self._aborted = False

    def attach(self, view: memoryview) -> None:
        with self._cond:
            self._view = view

    def advance(self, n: int) -> None:
        with self._cond:
            self._n = n
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    @property
    def aborted(self) -> bool:
        return self._aborted

    @property
    def arrived(self) -> int:
        return self._n

    def chunks(self, stall_s: float | None = None) -> Iterator[memoryview]:
        """The body from its first byte, in the pieces that have arrived (all of it since the last piece); waits
        for more (at most `stall_s` without progress). Raises BodyAborted when the body failed."""
        sent = 0
        while sent < self.total:
            with self._cond:
                if not self._cond.wait_for(lambda sent=sent: self._aborted or self._n > sent, stall_s):
                    raise BodyAborted(f"no body bytes for {stall_s}s")
                if self._aborted:
                    raise BodyAborted("the upstream body was not received completely")
                n, view = self._n, self._view
            assert view is not None
            yield view[sent:n]
            sent = n


def forward(hops: list[str], progress: BodyProgress, version: int, sha256: str, token: str,
            timeout_s: float) -> list[RelayHop]:
    """Push the body to hops[0] naming hops[1:] as its relay; on failure, to the next hop with the rest. The
    answers of every hop tried, then of those each reached hop relayed to."""
    answers: list[RelayHop] = []

    def send(conn: http.client.HTTPConnection) -> None:
        for piece in progress.chunks(timeout_s):
            conn.send(piece)

    for i, url in enumerate(hops):
        try:
            answer = post_weights(url, send, progress.total, version, sha256, token, timeout_s, hops[i + 1:])
        except BodyAborted as e:
            answers.append(RelayHop(url=url, status=None, detail=f"not relayed: {e}"))
            return answers
        except WeightPushError as e:
            answers.append(RelayHop(url=url, status=e.status, detail=e.message))
            if progress.aborted:
                return answers
            continue
        answers.append(hop_of(url, answer))
        answers += answer.relayed
        return answers
    return answers


def hop_of(url: str, answer: WeightUpdateResponse) -> RelayHop:
    return RelayHop(url=url, status=200, policy_version=answer.policy_version, receive_s=answer.receive_s,
                    load_s=answer.load_s, canary_logprobs=answer.canary_logprobs,
                    canary_version=answer.canary_version)
