"""Pushes without disk, over real HTTP into the real engine: nothing is opened for writing while a push is
received, verified and applied; an unauthenticated push is answered without reading its body; a failed apply
rolls back to the weights held in memory; a push resent while the first copy still holds the push lock (the pusher
timed out behind a long apply, issue 21) has its version checked again once it gets the lock: 409 before one byte
of its body is used; a push cut off midway is refused and the next one applies."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from actor_helpers import FileWrites, ServerThread, hf_greedy

from actor_service.client import WeightPushError, push_weights
from actor_service.engine import clean_stale_temp_dirs
from actor_service.schema import SHA256_HEADER, VERSION_HEADER
from actor_service.settings import ActorSettings

TOKEN = "memory-token"
WRITES = FileWrites()


@pytest.fixture(scope="module")
def server(actor_engine):
    from actor_service.app import create_app

    settings = ActorSettings(run_loop=False, auth_token=TOKEN, max_model_len=256, actor_id="memory-test")
    srv = ServerThread(create_app(settings, engine=actor_engine))
    yield srv
    srv.stop()


def test_push_writes_no_file(server, actor_engine, make_variant) -> None:
    # a first push may set up caches of torch/vLLM (e.g. compiled kernels) once per process; the claim is per push
    push_weights(server.url, make_variant(55) / "model.safetensors", actor_engine.version + 1, TOKEN, timeout_s=60)
    variant = make_variant(51)
    version = actor_engine.version + 1
    with WRITES.watching() as writes:
        resp = push_weights(server.url, variant / "model.safetensors", version, TOKEN, timeout_s=60)
    assert resp.policy_version == version
    assert writes == []
    prompts = [actor_engine.text_token_ids("17-5=")]
    gen = actor_engine.generate(prompts, temperature=0.0, max_tokens=10)
    assert [g[0].token_ids for g in gen.samples] == hf_greedy(variant, prompts, 10)


def test_unauthenticated_push_is_answered_without_reading_the_body(server, actor_engine) -> None:
    host, port = "127.0.0.1", int(server.url.rsplit(":", 1)[1])
    head = (f"POST /v1/weights HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer wrong\r\n"
            f"{VERSION_HEADER}: {actor_engine.version + 1}\r\n{SHA256_HEADER}: {'0' * 64}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {100 * 2**20}\r\n\r\n")
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(head.encode())  # ... and not one byte of the 100 MB body
        t0 = time.monotonic()
        answer = s.recv(4096).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 401"), answer[:200]
    assert time.monotonic() - t0 < 5


def test_failed_apply_rolls_back_to_the_weights_in_memory(server, actor_engine, make_variant) -> None:
    import torch
    from safetensors.torch import load_file

    from actor_service.engine import WeightsApplyError

    good, other = make_variant(52), make_variant(54)
    actor_engine.update_weights(good / "model.safetensors", actor_engine.version + 1)
    before = actor_engine.version
    prompts = [actor_engine.text_token_ids("hello world")]
    expected = hf_greedy(good, prompts, 10)

    def served() -> list[list[int]]:
        gen = actor_engine.generate(prompts, temperature=0.0, max_tokens=10)
        return [g[0].token_ids for g in gen.samples]

    # 1) tensors that do not fit are refused before vLLM's loader starts
    bad = load_file(str(other / "model.safetensors"))
    bad["model.norm.weight"] = torch.empty(0)
    with pytest.raises(WeightsApplyError, match="model.norm.weight"):
        actor_engine.apply_weights(bad, before + 1)
    assert actor_engine.version == before and served() == expected
    # 2) a loader failure halfway (earlier layers already hold the new values): the engine drops vLLM's partial
    #    reload state and reloads the weights it served, from memory (what apply_weights does on such a failure)
    with pytest.raises(AssertionError, match="Attempted to load weight"):
        actor_engine._call(lambda: actor_engine._reload(bad))
    actor_engine._call(actor_engine._restore)
    assert actor_engine.version == before and served() == expected


def test_wrong_token_is_refused_by_the_client_too(server, actor_engine, make_variant) -> None:
    with pytest.raises(WeightPushError) as info:
        push_weights(server.url, make_variant(53) / "model.safetensors", actor_engine.version + 1, "nope",
                     timeout_s=30)
    assert info.value.status == 401


def test_stale_temp_dirs_are_cleaned(tmp_path: Path) -> None:
    old, fresh, other = tmp_path / "tbrm-actor-old", tmp_path / "tbrm-actor-new", tmp_path / "keep-me"
    for d in (old, fresh, other):
        (d / "incoming").mkdir(parents=True)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    os.utime(other, (time.time() - 7200, time.time() - 7200))
    assert clean_stale_temp_dirs(str(tmp_path)) == [old]
    assert not old.exists() and fresh.exists() and other.exists()


def _slowly(data: bytes, seconds: float, parts: int = 20) -> Iterator[bytes]:
    step = len(data) // parts + 1
    for i in range(0, len(data), step):
        yield data[i:i + step]
        time.sleep(seconds / parts)


def test_resent_push_is_rechecked_after_the_lock(server, actor_engine, make_variant) -> None:
    data = (make_variant(71) / "model.safetensors").read_bytes()
    version = actor_engine.version + 1
    headers = {"Authorization": f"Bearer {TOKEN}", VERSION_HEADER: str(version),
               SHA256_HEADER: hashlib.sha256(data).hexdigest(), "Content-Length": str(len(data))}
    first: dict[str, httpx.Response] = {}

    def send_first() -> None:  # streamed over ~3 s: holds the push lock meanwhile
        first["r"] = httpx.post(f"{server.url}/v1/weights", content=_slowly(data, 3.0), headers=headers, timeout=60)

    t = threading.Thread(target=send_first)
    t.start()
    time.sleep(0.8)
    assert actor_engine.version == version - 1  # the first copy is still arriving: the resend passes the pre-check
    # The resend's body is cut short: were it read, the answer would be a 400 (checksum); its version decides first.
    resend = httpx.post(f"{server.url}/v1/weights", content=data[:1000],
                        headers={**headers, "Content-Length": "1000"}, timeout=60)
    t.join(60)
    assert first["r"].status_code == 200, first["r"].text
    assert resend.status_code == 409, resend.text
    assert f"current version {version}" in resend.json()["detail"]
    assert actor_engine.version == version
    # a whole, valid duplicate after the fact: 409 too, nothing applied again
    again = httpx.post(f"{server.url}/v1/weights", content=data, headers=headers, timeout=60)
    assert again.status_code == 409 and actor_engine.version == version


def test_push_cut_off_midway_is_refused_and_the_next_one_applies(server, actor_engine, make_variant) -> None:
    """The body is read from the socket into the receive buffer (actor_service.http_server) while a thread hashes
    it: a client gone halfway is a 400 (counted, nothing applied), and the next push gets the lock and a buffer."""
    data = (make_variant(73) / "model.safetensors").read_bytes()
    version = actor_engine.version + 1
    host, port = "127.0.0.1", int(server.url.rsplit(":", 1)[1])
    head = (f"POST /v1/weights HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"{VERSION_HEADER}: {version}\r\n{SHA256_HEADER}: {hashlib.sha256(data).hexdigest()}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n")

    def cut_off() -> float:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        name = 'tbrm_actor_weight_pushes_refused_total{reason="incomplete"}'
        line = next((x for x in text.splitlines() if x.startswith(name)), "x 0")
        return float(line.rsplit(" ", 1)[1])

    before = cut_off()
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(head.encode() + data[: len(data) // 2])
        time.sleep(0.5)  # the actor is receiving the body
    deadline = time.monotonic() + 30
    while cut_off() == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cut_off() == before + 1
    assert actor_engine.version == version - 1
    assert push_weights(server.url, make_variant(73) / "model.safetensors", version, TOKEN,
                        timeout_s=60).policy_version == version
