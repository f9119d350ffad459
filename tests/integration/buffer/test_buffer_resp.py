"""The hand-packed hot paths (buffer.resp: an insert, a BatchStream step) against a real redis-server: the bytes
are the protocol Redis expects, error replies come back in place, a dropped connection is retried, and a server
that lost its script cache (restart) is handled as redis-py's own scripts are."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import redis

from buffer import resp
from buffer.client import BatchStream, ReplayTable, Trajectory, connect
from buffer.schema import FifoSampler, TableConfig


def traj(tag: str) -> Trajectory:
    return Trajectory(
        traj_id=tag, prompt_id=tag, group_id="g", prompt_token_ids=[1, 2, 3], response_token_ids=[4, 5] * 700,
        behaviour_logprobs=[-0.5, -0.5] * 700, reward=1.0, grade_status="correct", response_text="x" * 3000,
        policy_version=0,
    )


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    r = connect(redis_url)
    r.flushall()
    return r


def test_packed_commands_round_trip_with_errors_in_place(r: redis.Redis) -> None:
    big = bytes(range(256)) * 40  # over the size that is sent without a copy, with every byte value
    request: list[bytes] = []
    resp.Prefix("SET", "k").add(request, big)
    resp.Prefix("INCR").add(request, "k")
    resp.Prefix("GET").add(request, "k")
    out = resp.roundtrip(r, request, 3)
    assert out[0] in (b"OK", "OK") and out[2] == big
    assert isinstance(out[1], redis.ResponseError) and "not an integer" in str(out[1])
    assert r.ping()  # the connection is still in step after an error reply


def test_a_large_request_of_many_pieces_goes_out_whole(r: redis.Redis) -> None:
    # 600 SETs of distinct 10 KB values: 2,400 pieces (several sendmsg calls) and 6 MB through a small send
    # buffer, so the kernel takes each call in part and the rest must follow from where it stopped
    values = [bytes([i % 251]) * 10_000 + str(i).encode() for i in range(600)]
    request: list[bytes] = []
    for i, v in enumerate(values):
        resp.Prefix("SET", f"k{i}").add(request, v)
    conn = r.connection_pool.get_connection()
    conn._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    r.connection_pool.release(conn)
    out = resp.roundtrip(r, request, len(values))
    assert all(x in (b"OK", "OK", True) for x in out)
    assert r.mget([f"k{i}" for i in range(600)]) == values


@pytest.mark.parametrize("new", [1, 30], ids=["joined", "gathered"])  # 30 payloads: over resp._GATHER_MIN
def test_a_connection_dropped_mid_request_is_retried(r: redis.Redis, monkeypatch: pytest.MonkeyPatch, new: int) -> None:
    t = ReplayTable(r, TableConfig(max_times_sampled=1))
    t.insert([traj("a")])
    drops, real = [], resp._send_read
    batch = [traj(f"b{i}") for i in range(new)] + [traj("a")]
    assert (sum(len(p) for _, p, _ in t.encode_batch(batch).rows) >= resp._GATHER_MIN) == (new > 1)

    def drop_first(conn: Any, request: list[bytes], replies: int) -> Any:
        if not drops:  # the connection breaks under the first attempt (a restart, a network blip)
            drops.append(conn._sock.shutdown(socket.SHUT_RDWR))
        return real(conn, request, replies)

    monkeypatch.setattr(resp, "_send_read", drop_first)
    assert t.insert_batch(batch).admitted == [f"b{i}" for i in range(new)]  # resent whole: still idempotent
    assert drops and t.stats().size == new + 1


def test_a_lost_script_cache_is_reloaded_by_insert_and_stream(r: redis.Redis) -> None:
    t = ReplayTable(r, TableConfig(sampler=FifoSampler(), max_times_sampled=1))
    t.insert([traj(f"i{k}") for k in range(3)])
    stream = BatchStream(t, 1)
    assert stream.next(0).ids == ["i0"]
    r.script_flush()  # as after a restart of Redis
    assert t.insert_batch([traj("i3")]).admitted == ["i3"]
    r.script_flush()
    assert stream.next(1).ids == ["i1"] and stream.next(2).ids == ["i2"]
