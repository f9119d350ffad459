"""deploy/prepare.py: the containers' one-shot step (resolve the run config, load the prompt queue), against a real
redis-server and the real settings classes of every service."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import redis

from deploy import prepare, topology

REPO = Path(__file__).resolve().parents[3]
TOY = REPO / "configs" / "toy.toml"


def test_the_resolved_toy_config_is_accepted_by_every_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from actor_service.settings import ActorSettings
    from buffer.settings import BufferSettings
    from learner.settings import LearnerSettings
    from reward.settings import RewardSettings

    out = tmp_path / "config" / "run.toml"
    _run, data = prepare.resolve_to(TOY, out)
    resolved = tomllib.loads(out.read_text())
    raw = tomllib.loads(TOY.read_text())
    if raw.get("table"):
        # `[table]` reaches every service that owns a replay-table config (what the services cannot do themselves).
        for sec in ("buffer", "actor", "learner"):
            for k, v in raw["table"].items():
                if not isinstance(v, dict):
                    assert resolved[sec]["table"][k] == v, (sec, k)
    for var in [k for k in os.environ if k.startswith("TBRM_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv(topology.ENV_RUN_CONFIG, str(out))
    actor, learner = ActorSettings(), LearnerSettings()
    BufferSettings()
    RewardSettings()
    if raw.get("actor", {}).get("max_tokens"):
        assert actor.max_tokens == raw["actor"]["max_tokens"]
    if raw.get("table", {}).get("max_size"):
        assert actor.table.max_size == learner.table.max_size == raw["table"]["max_size"]


def test_load_queue_fills_an_empty_queue_once(tmp_path: Path, redis_url: str) -> None:
    from buffer.client import PromptQueue

    source = tmp_path / "run.toml"
    source.write_text('[run]\ntoy_train_size = 40\ntoy_test_size = 10\nepochs = 2\n\n[actor]\nprompt_queue = "t1"\n')
    run, data = prepare.resolve_to(source, tmp_path / "out.toml")
    assert prepare.load_queue(run, data, redis_url) == 80
    assert prepare.load_queue(run, data, redis_url) == 0  # a restarted cluster keeps its queue
    client = redis.Redis.from_url(redis_url)
    try:
        assert PromptQueue(client, "t1").size() == 80
    finally:
        client.close()


def test_uses_toy_model_only_without_model_paths() -> None:
    assert prepare.uses_toy_model({"actor": {}, "learner": {}})
    assert prepare.uses_toy_model({"actor": {"model_dir": "/m"}, "learner": {}})
    assert not prepare.uses_toy_model({"actor": {"model_dir": "/m"}, "learner": {"model_path": "/m"}})


def test_cli_config_only_writes_the_config_and_the_ready_file(tmp_path: Path) -> None:
    out, ready = tmp_path / "c" / "run.toml", tmp_path / "m" / ".ready"
    argv = [*topology.prepare_argv("local"), "--config-only", "--source", str(TOY), "--out", str(out),
            "--ready-file", str(ready)]  # fmt: skip
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert argv[0] == sys.executable and tomllib.loads(out.read_text())["learner"]
    assert ready.exists()


def test_cli_reports_a_bad_config_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[nonsense]\nx = 1\n")
    assert prepare.main(["--config-only", "--source", str(bad), "--out", str(tmp_path / "o.toml")]) == 2
    assert not (tmp_path / "o.toml").exists()
    assert prepare.main(["--config-only", "--source", str(tmp_path / "missing.toml"),
                         "--out", str(tmp_path / "o.toml")]) == 2  # fmt: skip
