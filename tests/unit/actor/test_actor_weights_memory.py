"""Header checks and tensor loading of a pushed body held in memory (no vLLM: fast)."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from actor_service.schema import canary_token_ids
from actor_service.weights import (
    TensorSpec,
    WeightsFormatError,
    WeightsMismatchError,
    parse_weights,
    read_header,
    read_header_bytes,
)

SPEC = {"a": TensorSpec("F32", (2, 3)), "b": TensorSpec("F32", (4,))}


def tensors() -> dict[str, torch.Tensor]:
    return {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)}


def test_memory_header_equals_file_header(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(tensors(), str(path))
    data = path.read_bytes()
    assert read_header_bytes(data) == read_header(path) == SPEC
    assert read_header_bytes(bytearray(data)) == SPEC


def test_parse_weights_loads_the_tensors() -> None:
    got = parse_weights(bytearray(save(tensors())), SPEC, set(), 2**20)
    assert set(got) == {"a", "b"} and torch.equal(got["a"], tensors()["a"])


@pytest.mark.parametrize("body, error", [
    (b"", WeightsFormatError),
    (b"PK\x03\x04" + b"\0" * 64, WeightsFormatError),
    (struct.pack("<Q", 10**6) + b"{}", WeightsFormatError),
    (struct.pack("<Q", 2) + b"[]", WeightsFormatError),
])
def test_malformed_bodies(body: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_weights(body, SPEC, set(), 2**20)


def test_truncated_and_mismatched() -> None:
    data = save(tensors())
    with pytest.raises(WeightsFormatError, match="truncated"):
        parse_weights(data[:-4], SPEC, set(), 2**20)
    with pytest.raises(WeightsMismatchError, match="missing tensor 'b'"):
        parse_weights(save({"a": tensors()["a"]}), SPEC, set(), 2**20)
    raw = json.dumps({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}).encode()
    with pytest.raises(WeightsMismatchError):
        parse_weights(struct.pack("<Q", len(raw)) + raw + b"\0" * 24, SPEC, set(), 2**20)


def test_canary_ids_are_fixed_and_in_range() -> None:
    ids = canary_token_ids(151936)
    assert ids == canary_token_ids(151936) and len(ids) == 48
    assert all(0 <= t < 4096 for t in ids) and len(set(ids)) > 40
    assert all(0 <= t < 100 for t in canary_token_ids(100))


def test_receive_buffers_never_reuse_the_served_one() -> None:
    """The buffer behind the served weights (the engine's rollback source) is never handed out again; the one
    served before it, or a refused push's, takes the next body of its size."""
    from actor_service.weight_receiver import ReceiveBuffers

    pool = ReceiveBuffers()
    a = pool.take(64)
    pool.applied(a)
    b = pool.take(64)
    assert b is not a  # a is served
    pool.applied(b)
    c = pool.take(64)
    assert c is a  # a was served before b: nothing refers to it any more
    pool.unused(c)  # c's push refused: b is still served
    assert pool.take(64) is c
    assert pool.take(64) is not b
    pool.unused(c)
    d = pool.take(32)  # another size: a fresh buffer
    assert len(d) == 32 and d is not c


def test_receive_buffers_prepare_a_touched_spare_after_the_first_push() -> None:
    """After the first push a thread allocates the next push's buffer and touches its pages (they are resident:
    the process grows by its size), so the second push does not pay the page faults either."""
    from actor_service.weight_receiver import ReceiveBuffers

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    n = 64 * 2**20
    pool = ReceiveBuffers()
    a = pool.take(n)  # fresh: nothing touched yet
    before = rss()
    pool.applied(a)
    for t in threading.enumerate():
        if t.name == "receive-buffer":
            t.join(20)
    assert rss() - before >= 0.9 * n
    b = pool.take(n)
    assert b is not a and len(b) == n
    touched = rss()
    b[0:n:4096] = bytes(n // 4096)  # a byte in every page: no new page is needed
    assert rss() - touched < 0.1 * n
