"""The learner service: status app (TestClient + schemathesis) and `python -m learner` over real HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from learner_helpers import free_port, toy_trajectories

from buffer.client import ReplayTable, connect
from buffer.schema import FifoSampler, TableConfig, WeightsInfo
from learner.app import create_app
from learner.live import LiveStatus
from learner.settings import LearnerSettings

REPO = Path(__file__).resolve().parents[3]


def _app(live: LiveStatus):
    return create_app(LearnerSettings(auth_token="s3cret", model_path="/nonexistent"), live)


def test_status_routes_report_the_loop_state():
    live = LiveStatus()
    client = TestClient(_app(live))
    assert client.get("/health").json() == {"status": "ok", "state": "starting", "step": 0, "policy_version": 0}
    live.update(
        state="running", step=7, policy_version=7, last_step_at=time.time(),
        metrics={"loss": 12.5, "residual_mean": -3.0, "v0_mean": 4.0, "tokens_per_s": 900.0, "push_latency_s": 0.1},
        latest_weights=WeightsInfo(version=6, sha256="ab" * 32, nbytes=10, path="/x"),
    )
    st = client.get("/v1/status").json()
    assert (st["step"], st["policy_version"], st["metrics"]["loss"]) == (7, 7, 12.5)
    assert st["latest_weights"]["version"] == 6
    text = client.get("/metrics").text
    assert "tbrm_learner_step 7.0" in text and "tbrm_learner_loss 12.5" in text
    assert "tbrm_learner_residual_mean -3.0" in text and "tbrm_learner_push_latency_seconds 0.1" in text
    cfg = client.get("/v1/config").json()
    assert cfg["auth_token"] == "***" and cfg["port"] == 8003 and cfg["loss"]["kind"] == "tbrm"
    live.update(state="failed", error="boom")
    assert client.get("/health").status_code == 503


_live = LiveStatus(state="running", step=3, policy_version=3, metrics={"loss": 1.0})
schema = schemathesis.openapi.from_asgi("/openapi.json", _app(_live))


@schema.parametrize()
@hsettings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_status_api_never_errors(case):
    case.call_and_validate()


def test_python_m_learner_serves_status_and_stops_on_sigterm(tmp_path, tiny_model_dir, redis_url):
    table = ReplayTable(connect(redis_url), TableConfig(sampler=FifoSampler(), max_times_sampled=0))
    table.insert(toy_trajectories(tiny_model_dir, 8))
    port = free_port()
    env = {
        **os.environ, "TBRM_REDIS_URL": redis_url, "TBRM_AUTH_TOKEN": "t", "OMP_NUM_THREADS": "1",
        "TBRM_LEARNER_LOSS": json.dumps({"kind": "tbrm", "beta": 0.5}), "PYTHONPATH": str(REPO),
    }
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(k, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "learner", "--host", "127.0.0.1", "--port", str(port), "--model-path",
         str(tiny_model_dir), "--run-dir", str(tmp_path / "run"), "--batch-size", "2", "--micro-batch-size", "1",
         "--torch-threads", "1", "--sample-timeout-s", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        step = 0
        while time.monotonic() < deadline and step < 2:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                step = httpx.get(f"{base}/v1/status", timeout=2).json()["step"]
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        assert step >= 2
        assert httpx.get(f"{base}/health", timeout=2).json()["status"] == "ok"
        metrics = httpx.get(f"{base}/metrics", timeout=2).text
        assert "tbrm_learner_policy_version" in metrics and "tbrm_learner_tokens_per_second" in metrics
        assert httpx.get(f"{base}/v1/config", timeout=2).json()["auth_token"] == "***"
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out.decode()[-3000:]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").exists() and (ckpt / (ckpt / "latest").read_text().strip()).is_dir()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 2
