"""The buffer API (create_app with test settings, real redis-server): every route, auth, 4xx on bad input,
export into the export dir only, Prometheus text, `python -m buffer` as a real process, and schemathesis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings

from buffer.app import create_app
from buffer.client import (
    ActorInfo,
    ActorRegistry,
    LearnerStatus,
    LearnerStatusStore,
    PromptQueue,
    ReplayTable,
    TableConfig,
    Trajectory,
    WeightsInfo,
    WeightsStore,
    connect,
)
from buffer.settings import BufferSettings
from problems.toy import make_toy_task

REPO = Path(__file__).resolve().parents[3]
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def traj(i: int, version: int = 0, reward: float = 0.0, actor: str = "a0") -> Trajectory:
    return Trajectory(traj_id=f"t{i:03d}", prompt_id=f"p{i}", group_id="g", prompt_token_ids=[1, 2],
                      response_token_ids=[3, 4, 5], behaviour_logprobs=[-0.1, -0.2, -0.3], prompt_text=f"Q{i}",
                      response_text=f"answer \\boxed{{{i}}}", reward=reward, grade_status="correct",
                      policy_version=version, actor_id=actor)


def make_settings(redis_url: str, export_dir: Path, token: str | None = TOKEN) -> BufferSettings:
    return BufferSettings(redis_url=redis_url, auth_token=token, export_dir=export_dir,
                          table=TableConfig(max_size=1000, max_times_sampled=1))


@pytest.fixture
def client(redis_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(redis_url, tmp_path / "exports"))) as c:
        yield c


@pytest.fixture
def filled(redis_url: str, client: TestClient) -> ReplayTable:
    r = connect(redis_url)
    t = ReplayTable(r, TableConfig(max_size=1000, max_times_sampled=1))
    t.insert([traj(i, version=i % 3, reward=float(i % 2), actor=f"a{i % 2}") for i in range(20)])
    return t


def test_health_config_metrics(client: TestClient, filled: ReplayTable) -> None:
    assert client.get("/health").json() == {"status": "ok", "redis": True}
    cfg = client.get("/v1/config").json()
    assert cfg["auth_token"] == "***" and cfg["table"]["max_size"] == 1000
    text = client.get("/metrics").text
    assert 'tbrm_buffer_size{table="replay"} 20.0' in text
    assert 'tbrm_buffer_inserts{table="replay"} 20.0' in text
    assert "tbrm_buffer_insert_rate" in text and "tbrm_buffer_leased" in text


def test_stats_with_histograms_and_rates(client: TestClient, filled: ReplayTable, redis_url: str) -> None:
    LearnerStatusStore(connect(redis_url)).set(LearnerStatus(step=1, policy_version=3))
    client.get("/v1/tables/replay/stats")
    filled.insert([traj(100 + i) for i in range(5)])
    time.sleep(0.05)
    body = client.get("/v1/tables/replay/stats").json()
    assert body["stats"]["size"] == 25 and body["stats"]["inserts"] == 25
    assert body["rates"]["inserts_per_s"] > 0 and body["rates"]["window_s"] > 0
    h = body["histograms"]
    assert h["version_lag"] == {"1": 6.0, "2": 7.0, "3": 12.0}
    assert h["reward_by_version"]["1"] == pytest.approx(4 / 7)
    assert body["stats"]["extra"]["rate_limiter"]["can_insert"] is True
    assert client.get("/v1/tables/nope/stats").status_code == 404


def test_trajectories_paged_filtered_and_by_id(client: TestClient, filled: ReplayTable) -> None:
    page = client.get("/v1/tables/replay/trajectories", params={"limit": 5}).json()
    assert page["total"] == 20 and [x["item_id"] for x in page["items"]] == [f"t{i:03d}" for i in range(5)]
    page = client.get("/v1/tables/replay/trajectories",
                      params={"min_version": 1, "max_version": 1, "actor_id": "a1", "min_reward": 0.5}).json()
    assert page["total"] == 4 and all(x["policy_version"] == 1 and x["actor_id"] == "a1" for x in page["items"])
    one = client.get("/v1/tables/replay/trajectories/t007").json()
    assert one["trajectory"]["response_text"] == "answer \\boxed{7}" and one["summary"]["times_sampled"] == 0
    assert client.get("/v1/tables/replay/trajectories/zzz").status_code == 404
    for bad in ({"limit": 501}, {"limit": 0}, {"offset": -1}, {"min_version": "x"}, {"min_reward": "nan"}):
        assert client.get("/v1/tables/replay/trajectories", params=bad).status_code == 422, bad


def test_trajectories_by_cursor_with_lease_filters(client: TestClient, filled: ReplayTable) -> None:
    leased = {it.info.item_id for it in filled.sample(3, 0).items}
    seen, cursor = [], 0
    while cursor is not None:
        page = client.get("/v1/tables/replay/trajectories", params={"cursor": cursor, "limit": 6}).json()
        assert page["total"] is None and len(page["items"]) <= 6
        seen += [x["item_id"] for x in page["items"]]
        cursor = page["next_cursor"]
    assert seen == [f"t{i:03d}" for i in range(20)]  # insertion order, each once
    page = client.get("/v1/tables/replay/trajectories", params={"cursor": 0, "leased": True}).json()
    assert {x["item_id"] for x in page["items"]} == leased and all(x["leased"] for x in page["items"])
    page = client.get("/v1/tables/replay/trajectories", params={"cursor": 0, "min_times_sampled": 1}).json()
    assert {x["item_id"] for x in page["items"]} == leased


def test_actors_weights_learner_prompts(client: TestClient, redis_url: str) -> None:
    r = connect(redis_url)
    assert client.get("/v1/weights").json() == {"latest": None}
    assert client.get("/v1/learner").json() == {"status": None}
    WeightsStore(r).set_latest(WeightsInfo(version=5, sha256="a" * 64, nbytes=3))
    ActorRegistry(r).register(ActorInfo(actor_id="a0", url="http://x:8100", policy_version=3, tokens_per_s=9.0))
    body = client.get("/v1/actors").json()
    assert body["latest_weights_version"] == 5
    (a,) = body["actors"]
    assert a["live"] is True and a["version_skew"] == 2 and a["info"]["tokens_per_s"] == 9.0
    assert a["seconds_since_heartbeat"] < 5
    PromptQueue(r).load(make_toy_task(10), epochs=2)
    p = client.get("/v1/prompts").json()
    assert (p["queued"], p["epochs"], p["dataset_size"]) == (20, 2, 10)
    assert client.get("/v1/weights").json()["latest"]["version"] == 5


def test_admin_needs_token(client: TestClient, redis_url: str, tmp_path: Path) -> None:
    for path, body in [("pause", {"what": "sampling"}), ("resume", {"what": "inserts"}), ("reset", {}),
                       ("export", {"name": "x"})]:
        r = client.post(f"/v1/admin/{path}", json=body)
        assert r.status_code == 401 and "bearer token" in r.json()["detail"]
        r = client.post(f"/v1/admin/{path}", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
    with TestClient(create_app(make_settings(redis_url, tmp_path, token=None))) as c:
        r = c.post("/v1/admin/reset", json={}, headers=AUTH)
        assert r.status_code == 401 and "set TBRM_AUTH_TOKEN" in r.json()["detail"]


def test_admin_pause_resume_reset(client: TestClient, filled: ReplayTable) -> None:
    r = client.post("/v1/admin/pause", json={"what": "sampling"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["paused"] == ["sampling"]
    assert filled.stats().extra["paused"] == ["sampling"]
    assert client.post("/v1/admin/resume", json={"what": "sampling"}, headers=AUTH).json()["paused"] == []
    assert client.post("/v1/admin/pause", json={"what": "all"}, headers=AUTH).status_code == 422
    assert client.post("/v1/admin/pause", json={"what": "inserts", "x": 1}, headers=AUTH).status_code == 422
    assert client.post("/v1/admin/reset", json={}, headers=AUTH).status_code == 200
    assert filled.stats().size == 0


def _export_done(client: TestClient, job: dict, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while job["state"] == "running":
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
        r = client.get(f"/v1/admin/exports/{job['job_id']}", headers=AUTH)
        assert r.status_code == 200, r.text
        job = r.json()
    return job


def test_admin_export_is_a_background_job_in_the_export_dir(client: TestClient, filled: ReplayTable,
                                                            tmp_path: Path) -> None:
    r = client.post("/v1/admin/export", json={"name": "snap-1"}, headers=AUTH)
    assert r.status_code == 202, r.text
    job = _export_done(client, r.json())
    assert job["state"] == "done" and job["rows"] == 20 and job["error"] is None and job["finished_at"]
    assert Path(job["path"]) == (tmp_path / "exports" / "snap-1.parquet").resolve()
    assert job["bytes"] == Path(job["path"]).stat().st_size
    table = pq.read_table(job["path"])
    assert table.num_rows == 20 and table.column("response_token_ids")[0].as_py() == [3, 4, 5]
    assert client.post("/v1/admin/export", json={"name": "snap-1"}, headers=AUTH).status_code == 409
    for bad in ("../evil", "a/b", "..", ".hidden", "", "x" * 100, "/abs"):
        r = client.post("/v1/admin/export", json={"name": bad}, headers=AUTH)
        assert r.status_code == 422, bad
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["snap-1.parquet"]
    listed = client.get("/v1/admin/exports", headers=AUTH).json()["jobs"]
    assert [j["job_id"] for j in listed] == [job["job_id"]]
    assert client.get("/v1/admin/exports/0123456789abcdef", headers=AUTH).status_code == 404
    assert client.get("/v1/admin/exports/not-a-job", headers=AUTH).status_code == 422
    assert client.get(f"/v1/admin/exports/{job['job_id']}").status_code == 401


def test_admin_export_one_at_a_time_and_failures_are_reported(redis_url: str, filled: ReplayTable,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import buffer.export

    gate = threading.Event()
    real = buffer.export.export_parquet

    def slow(t, path, progress=lambda rows: None):
        gate.wait(10)
        return real(t, path, progress)

    monkeypatch.setattr(buffer.export, "export_parquet", slow)
    with TestClient(create_app(make_settings(redis_url, tmp_path / "exports"))) as c:
        first = c.post("/v1/admin/export", json={"name": "a"}, headers=AUTH).json()
        r = c.post("/v1/admin/export", json={"name": "b"}, headers=AUTH)
        assert r.status_code == 409 and first["job_id"] in r.json()["detail"]
        gate.set()
        assert _export_done(c, first)["state"] == "done"
    (tmp_path / "blocked").write_text("a file where the export dir should be")
    with TestClient(create_app(make_settings(redis_url, tmp_path / "blocked"))) as c:
        r = c.post("/v1/admin/export", json={"name": "c"}, headers=AUTH)
        assert r.status_code == 202, r.text
        job = _export_done(c, r.json())
        assert job["state"] == "failed" and job["rows"] == 0 and "blocked" in job["error"]


@pytest.mark.parametrize(
    ("body", "headers"),
    [(b"{", {}), (b"[]", {}), (b'{"what": 3}', {}), (b"x" * 70_000, {}),
     (b'{"what": "sampling"}', {"content-type": "text/plain"})],
)
def test_malformed_admin_bodies_get_4xx(client: TestClient, body: bytes, headers: dict[str, str]) -> None:
    r = client.post("/v1/admin/pause", content=body, headers={**AUTH, "content-type": "application/json", **headers})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)


def test_schemathesis_no_5xx(redis_url: str, tmp_path: Path, filled: ReplayTable) -> None:
    app = create_app(make_settings(redis_url, tmp_path / "exports"))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[tuple] = []
    calls: list[int] = []
    for op in schema.get_all_operations():
        operation = op.ok()

        @hsettings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def run(case) -> None:
            resp = case.call(headers=AUTH if "/admin/" in case.path else None)
            calls.append(resp.status_code)
            if resp.status_code >= 500:
                failures.append((case.method, case.formatted_path, resp.status_code, resp.text[:200]))

        run()
    assert failures == []
    assert len(calls) > 50 and any(c == 200 for c in calls) and any(400 <= c < 500 for c in calls)


def test_python_m_buffer_serves(redis_url: str, port: int, tmp_path: Path) -> None:
    env = {**os.environ, "TBRM_REDIS_URL": redis_url, "TBRM_AUTH_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "buffer", "--port", str(port), "--export-dir", str(tmp_path)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "buffer API did not start"
                time.sleep(0.2)
        assert r.json()["status"] == "ok"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/admin/pause", json={"what": "inserts"}, timeout=5.0)
        assert r.status_code == 401
        r = httpx.post(f"http://127.0.0.1:{port}/v1/admin/pause", json={"what": "inserts"}, headers=AUTH, timeout=5.0)
        assert r.status_code == 200
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(10)


def test_views_of_leases_and_prompt_claims(client: TestClient, filled: ReplayTable, redis_url: str) -> None:
    b = filled.sample(3, 0)
    filled.ack(b.lease_id, [b.items[0].info.item_id])
    got = client.get("/v1/tables/replay/leases").json()["leases"]
    assert [(x["lease_id"], x["items"], x["held"]) for x in got] == [(b.lease_id, 3, 2)]
    q = PromptQueue(connect(redis_url), "train")
    q.load(make_toy_task(3, seed=1), epochs=1)
    popped = q.pop(2, "actor-1")
    claims = client.get("/v1/prompts/claims").json()["claims"]
    assert sorted(c["prompt_id"] for c in claims) == sorted(p.prompt_id for p in popped)
    assert all(c["consumer"] == "actor-1" and c["copies"] == 1 for c in claims)
    assert client.get("/v1/tables/replay/leases", params={"limit": 0}).status_code == 422
