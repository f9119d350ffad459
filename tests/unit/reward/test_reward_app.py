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
