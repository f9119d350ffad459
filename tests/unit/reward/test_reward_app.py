"""The app in-process (TestClient runs the lifespan, so the worker pool is real), settings precedence, cache."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from reward.app import VerdictCache, create_app
from reward.schema import GradeItem
from reward.settings import RewardSettings, ScoreMap


@pytest.fixture(scope="module")
def client() -> TestClient:
    settings = RewardSettings(workers=1, soft_timeout_s=2.0, hard_timeout_s=4.0, cache_size=4,
                              scores=ScoreMap(correct=1.0, incorrect=-1.0, no_answer=-1.0))
    with TestClient(create_app(settings)) as c:
        yield c


def test_grade_statuses_and_scores(client: TestClient) -> None:
    body = {"items": [
        {"response": r"\boxed{\frac{3}{6}}", "gold": "0.5"},
        {"response": r"\boxed{x^2-1}", "gold": "(x-1)(x+1)"},
        {"response": r"\boxed{x^2+1}", "gold": "(x-1)(x+1)"},
        {"response": "I give up", "gold": "3"},
    ]}
    r = client.post("/v1/grade", json=body)
    assert r.status_code == 200
    res = r.json()["results"]
    assert [x["status"] for x in res] == ["correct", "correct", "incorrect", "no_answer"]
    assert [x["score"] for x in res] == [1.0, 1.0, -1.0, -1.0]


def test_health_config_metrics(client: TestClient) -> None:
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["workers"] == 1 and len(h["worker_pids"]) == 1
    cfg = client.get("/v1/config").json()
    assert cfg["settings"]["scores"]["incorrect"] == -1.0 and cfg["versions"]["math-verify"]
    client.post("/v1/grade", json={"items": [{"response": "Answer: 5", "gold": "5"}] * 3})
    text = client.get("/metrics").text
    assert 'tbrm_reward_grades_total{status="correct"}' in text
    assert "tbrm_reward_cache_hits_total" in text


def test_two_apps_in_one_process_do_not_clash() -> None:
    a, b = create_app(RewardSettings(workers=1)), create_app(RewardSettings(workers=1))
    assert a.state.grader.metrics.registry is not b.state.grader.metrics.registry


def test_cache_is_bounded_lru_and_skips_timeouts() -> None:
    cache = VerdictCache(max_size=2)
    keys = [VerdictCache.key(GradeItem(response=str(i), gold="1")) for i in range(3)]
    cache.put(keys[0], ("correct", "0"))
    cache.put(keys[1], ("incorrect", "1"))
    assert cache.get(keys[0]) == ("correct", "0")  # refresh 0: 1 is now the oldest
    cache.put(keys[2], ("correct", "2"))
    assert len(cache) == 2 and cache.get(keys[1]) is None and cache.get(keys[0]) is not None
    cache.put(VerdictCache.key(GradeItem(response="t", gold="1")), ("timeout", None))
    assert cache.get(VerdictCache.key(GradeItem(response="t", gold="1"))) is None
    assert keys[0] != VerdictCache.key(GradeItem(response="0", gold="2"))  # gold is part of the key


def test_settings_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text("[reward]\nworkers = 3\nsoft_timeout_s = 2.5\n[reward.scores]\nincorrect = -1.0\n")
    monkeypatch.setenv("TBRM_RUN_CONFIG", str(toml))
    s = RewardSettings()
    assert (s.workers, s.soft_timeout_s, s.scores.incorrect) == (3, 2.5, -1.0)
    monkeypatch.setenv("TBRM_REWARD_WORKERS", "5")
    assert RewardSettings().workers == 5  # env beats the TOML
    assert RewardSettings(workers=1).workers == 1  # CLI (init kwargs) beats env
    monkeypatch.setenv("TBRM_REWARD_SCORES__NO_ANSWER", "-0.5")
    assert RewardSettings().scores.no_answer == -0.5


def test_settings_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="hard_timeout_s"):
        RewardSettings(soft_timeout_s=5, hard_timeout_s=1)
    with pytest.raises(ValueError):
        RewardSettings(workers=0)
    with pytest.raises(ValueError):
        RewardSettings(bogus=1)


def test_cli_help_lists_options() -> None:
    from reward.__main__ import build_parser

    text = build_parser()[0].format_help()
    for opt in ("--host", "--port", "--workers", "--hard-timeout-s", "--scores.incorrect", "--cache-size"):
        assert opt in text


def test_one_megabyte_response_is_graded(client: TestClient) -> None:
    filler = "We keep reasoning about the problem in small careful steps. " * 17_000  # ~1 MB
    body = {"items": [{"response": filler + r"so $\boxed{42}$", "gold": "42"},
                      {"response": filler + "Final answer: 41", "gold": "42"}]}
    r = client.post("/v1/grade", json=body)
    assert r.status_code == 200, r.text[:300]
    assert [x["status"] for x in r.json()["results"]] == ["correct", "incorrect"]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"items": [{"response": "x \\udc80\\udcff \\\\boxed{4}", "gold": "4"}]}',  # JSON escapes of lone surrogates
        b'{"items": [{"response": "\\\\boxed{4\\ud800}", "gold": "4"}]}',
        b'{"items": [{"response": "\\\\boxed{4}", "gold": "4\\udc80"}]}',
        '{"items": [{"response": "caf\udcc3\udca9 \\\\boxed{4}", "gold": "4"}]}'.encode("utf-8", "surrogateescape"),
    ],
)
def test_invalid_unicode_is_graded_not_500(client: TestClient, raw: bytes) -> None:
    r = client.post("/v1/grade", content=raw, headers={"content-type": "application/json"})
    assert r.status_code in (200, 400, 422), r.text[:300]
    if r.status_code == 200:
        (res,) = r.json()["results"]
        assert res["status"] in ("correct", "incorrect")


def test_invalid_unicode_in_a_bad_request_gets_a_clean_422(client: TestClient) -> None:
    raw = b'{"items": [{"response": "\\udc80", "gold": 5, "extra": "\\ud800"}]}'
    r = client.post("/v1/grade", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422
    body = r.json()
    locs = [tuple(d["loc"]) for d in body["detail"]]
    assert ("body", "items", "0", "gold") in locs and "response" in body["hint"]
    assert "input" not in body["detail"][0]  # the offending input is never echoed


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than the JSON parser's recursion limit
        b'{"items": [{"response": "x", "gold": ' + b"1" * 5_000 + b"}]}",  # int over Python's digit limit
        b'{"items": [{"response": 1e999999, "gold": "1"}]}',
        b"\xef\xbb\xbf" + b'{"items": [{"response": "\\\\boxed{1}", "gold": "1"}]}',  # UTF-8 BOM
        b'{"items": [{"response": "\xff\xfe\xfd", "gold": "1"}]}',  # not UTF-8
        b'{"items": [{"response": null, "gold": null}]}',
        b'{"items": [{"response": "' + "é".encode() * 300_000 + b'\\\\boxed{1}", "gold": "1"}]}',
    ],
)
def test_hostile_bodies_never_get_5xx(client: TestClient, raw: bytes) -> None:
    r = client.post("/v1/grade", content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text[:300]
    assert r.status_code in (200, 400, 413, 422)
