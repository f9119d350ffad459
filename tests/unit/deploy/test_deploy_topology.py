"""deploy/topology.py: the single description of the cluster, and the container health probe it renders."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from harness import free_port, redis_server_binary

from deploy import healthcheck, topology


def test_services_are_in_dependency_order_and_match_the_design_ports() -> None:
    names = [s.name for s in topology.SERVICES]
    assert names == ["redis", "reward", "buffer", "actor", "learner"]
    ports = {s.name: s.port for s in topology.SERVICES}
    assert ports == {"redis": 6379, "reward": 8001, "buffer": 8002, "actor": 8100, "learner": 8003}
    for i, s in enumerate(topology.SERVICES):
        assert set(s.depends_on) <= set(names[:i]), s.name
    assert [s.name for s in topology.SERVICES if s.scalable] == ["actor"]


def test_unknown_service_and_bad_replica_index_are_rejected_with_names() -> None:
    with pytest.raises(ValueError, match="unknown service 'actors'.*actor"):
        topology.service("actors")
    with pytest.raises(ValueError, match="not scalable"):
        topology.port_for("learner", "local", index=1)
    with pytest.raises(ValueError, match="n_actors"):
        topology.local_plan(0)


def test_container_rendering_binds_all_interfaces_with_python_on_path() -> None:
    assert topology.container_argv("reward") == ["python", "-m", "reward", "--host", "0.0.0.0", "--port", "8001"]
    assert topology.container_argv("buffer") == ["python", "-m", "buffer", "--host", "0.0.0.0", "--port", "8002"]
    assert topology.container_argv("learner") == ["python", "-m", "learner", "--host", "0.0.0.0", "--port", "8003"]
    # Every replica uses the same port: each container has its own network namespace.
    assert topology.argv("actor", "container", index=3) == topology.container_argv("actor")
    assert topology.container_argv("actor")[-1] == "8100"
    r = topology.container_argv("redis")
    assert r[0] == "redis-server" and r[r.index("--appendonly") + 1] == "yes" and r[r.index("--dir") + 1] == "/data"


def test_local_plan_uses_loopback_this_interpreter_and_one_port_per_actor() -> None:
    plan = topology.local_plan(3)
    assert [p.name for p in plan] == ["redis", "reward", "buffer", "actor-0", "actor-1", "actor-2", "learner"]
    actors = [p for p in plan if p.service == "actor"]
    assert [p.port for p in actors] == [8100, 8101, 8102]
    for p in plan:
        assert p.argv[p.argv.index("--bind" if p.service == "redis" else "--host") + 1] == "127.0.0.1"
        assert p.argv[p.argv.index("--port") + 1] == str(p.port)
        if p.service != "redis":
            assert p.argv[:3] == [sys.executable, "-m", topology.service(p.service).module]
            assert p.health_url == f"http://127.0.0.1:{p.port}/health"
    assert actors[2].env == {"TBRM_ACTOR_PUBLIC_URL": "http://127.0.0.1:8102", "TBRM_ACTOR_ACTOR_ID": "actor-2"}
    # Every process starts after the processes of the services it depends on.
    started: set[str] = set()
    for p in plan:
        assert set(p.depends_on) <= started, p.name
        started.add(p.service)


def test_local_plan_honours_port_overrides_and_the_redis_binary() -> None:
    ports = topology.Ports(redis=16379, reward=18001, buffer=18002, learner=18003, actor_base=18100)
    plan = {p.name: p for p in topology.local_plan(2, ports=ports, redis_server="/x/redis-server", redis_dir="/r")}
    assert plan["actor-1"].port == 18101 and plan["learner"].port == 18003
    assert plan["redis"].argv[0] == "/x/redis-server" and plan["redis"].argv[-1] == "/r"
    env = topology.shared_env("local", ports, run_config="/cfg/run.toml")
    assert env == {
        "TBRM_REDIS_URL": "redis://127.0.0.1:16379/0",
        "TBRM_REWARD_URL": "http://127.0.0.1:18001",
        "TBRM_RUN_CONFIG": "/cfg/run.toml",
    }
    assert "TBRM_AUTH_TOKEN" not in topology.shared_env("container")  # secrets are never rendered


def test_actor_env_names_are_fields_of_the_actor_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-actor variables the launcher sets must land in ActorSettings (a typo would be silently ignored)."""
    from actor_service.settings import ActorSettings

    proc = topology.local_plan(2)[4]
    assert proc.name == "actor-1"
    monkeypatch.delenv("TBRM_RUN_CONFIG", raising=False)
    for k, v in proc.env.items():
        monkeypatch.setenv(k, v)
    s = ActorSettings()
    assert s.public_url == "http://127.0.0.1:8101" and s.actor_id == "actor-1"


@pytest.fixture
def redis_from_topology(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port = free_port()
    argv = topology.argv("redis", "local", port=port, redis_server=redis_server_binary(), redis_dir=str(tmp_path))
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port, tmp_path
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_rendered_redis_command_starts_a_real_redis_with_aof(redis_from_topology: tuple[int, Path]) -> None:
    port, data_dir = redis_from_topology
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
    deadline = time.monotonic() + 10
    while True:
        try:
            assert client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("save") == {"save": ""}
    client.set("k", "v")
    assert any(data_dir.rglob("*.aof")), "AOF file not written in the data dir"
    client.close()


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # stdlib API
        self.send_response(200 if self.path == "/health" else 503)
        self.end_headers()
        self.wfile.write(b'{"status":"ok"}')

    def log_message(self, *args: object) -> None:
        pass


def test_healthcheck_probe_exits_0_on_200_and_1_otherwise() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert healthcheck.main([base + "/health"]) == 0
        assert healthcheck.main([base + "/nope"]) == 1
        assert healthcheck.main([f"http://127.0.0.1:{free_port()}/health"]) == 1  # nothing listens
        # The real command line the images run (`python -m deploy.healthcheck URL`).
        argv = [sys.executable, *topology.healthcheck_argv("reward", "container")[1:-1], base + "/health"]
        assert subprocess.run(argv, timeout=30).returncode == 0
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_finds_the_port_in_the_main_process_command_line(tmp_path: Path) -> None:
    assert healthcheck.port_from_cmdline(topology.container_argv("buffer")) == 8002
    assert healthcheck.port_from_cmdline(["python", "-m", "x", "--port=8100"]) == 8100
    assert healthcheck.port_from_cmdline(["python", "-m", "x"]) is None
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"\0".join(a.encode() for a in topology.container_argv("learner")) + b"\0")
    assert healthcheck.default_url(cmdline) == "http://127.0.0.1:8003/health"
    assert healthcheck.default_url(tmp_path / "missing") is None
