"""End-to-end smoke of the compose deployment on a real Docker engine (`make compose-smoke`; slow, minutes).

Builds the images (deploy/docker/build.sh: local Debian base, no registry), runs docker-compose.yml's `cpu` and
`monitoring` profiles under a separate project name on free host ports, and checks, printing one line per check:
the learner trains and pushes versions; `--scale actor=2` gives two registered replicas that both receive pushes
and insert trajectories; the buffer REST API answers (and refuses an unauthenticated admin call); Prometheus
scrapes every service, each actor replica included; after `stop` of the workers and `down` + `up` without `-v`
the replay table and the prompt queue are unchanged (Redis AOF) and the learner resumes from its checkpoint and
publishes higher versions. Finally `down -v` (unless --keep). Exits 1 on the first failed check.

    python -m deploy.compose_smoke [--no-build] [--versions 3] [--keep] [--json bench/results/compose_smoke.json]

Standard library only: it drives the `docker` CLI and the services' published HTTP ports.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PROJECT = "tbrm-smoke"
HTTP_TIMEOUT_S = 10.0
COMPOSE_TIMEOUT_S = 1800.0
log = logging.getLogger("tbrm.compose_smoke")


class SmokeFailed(RuntimeError):
    """A check failed; the message says which and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_size_gb(image: str) -> float | None:
    out = subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", image],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    return round(int(out.stdout.strip()) / 1e9, 2) if out.returncode == 0 else None


class Smoke:
    """One smoke run: the compose project, its ports, the results so far."""

    def __init__(self, env_dir: Path, *, versions: int, timeout_s: float) -> None:
        self.ports = {"buffer": free_port(), "learner": free_port(), "prometheus": free_port()}
        self.versions = versions
        self.timeout_s = timeout_s
        self.results: dict[str, Any] = {"checks": [], "timings_s": {}, "images_gb": {}}
        self.images = {
            "cpu": os.environ.get("TBRM_IMAGE_CPU", "tbrm:cpu"),
            "redis": os.environ.get("TBRM_REDIS_IMAGE", "tbrm-redis:bookworm"),
            "prometheus": os.environ.get("TBRM_PROMETHEUS_IMAGE", "tbrm-prometheus:bookworm"),
        }
        self.env_file = env_dir / "smoke.env"
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in {
            "TBRM_AUTH_TOKEN": secrets.token_hex(16),
            "TBRM_IMAGE_CPU": self.images["cpu"],
            "TBRM_REDIS_IMAGE": self.images["redis"],
            "TBRM_PROMETHEUS_IMAGE": self.images["prometheus"],
            "TBRM_BUFFER_PORT": self.ports["buffer"],
            "TBRM_LEARNER_PORT": self.ports["learner"],
            "TBRM_PROMETHEUS_PORT": self.ports["prometheus"],
        }.items()))  # fmt: skip
        grafana = os.environ.get("TBRM_GRAFANA_IMAGE", "grafana/grafana:12.1.0")
        # Debian has no Grafana package: without a registry its image is absent and the service is skipped
        # (`--scale grafana=0` alone still tries to pull it).
        self.scale_args = [] if image_size_gb(grafana) is not None else ["--pull", "never", "--scale", "grafana=0"]

    # ---- plumbing ----
    def compose(self, *args: str, timeout_s: float = COMPOSE_TIMEOUT_S) -> str:
        cmd = ["docker", "compose", "-p", PROJECT, "--project-directory", str(REPO), "-f",
               str(REPO / "docker-compose.yml"), "--env-file", str(self.env_file),
               "--profile", "cpu", "--profile", "monitoring", *args]  # fmt: skip
        log.debug("$ %s", " ".join(cmd))
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        if out.returncode != 0:
            raise SmokeFailed(f"`docker compose {' '.join(args)}` exited {out.returncode}: {out.stderr[-2000:]}")
        return out.stdout

    def get(self, service: str, path: str, *, token: str | None = None, method: str = "GET") -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.ports[service]}{path}", method=method)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:  # our own localhost port
            return json.loads(resp.read())

    def try_get(self, service: str, path: str) -> Any:
        try:
            return self.get(service, path)
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.results["checks"].append({"check": name, "ok": ok, "detail": detail})
        log.info("%s  %-28s %s", "PASS" if ok else "FAIL", name, detail)
        if not ok:
            raise SmokeFailed(f"{name}: {detail}")

    def wait(self, name: str, probe: Callable[[], tuple[bool, str]], timeout_s: float | None = None) -> float:
        """Polls `probe` until it returns (True, detail); records the check and returns the seconds waited."""
        t0 = time.monotonic()
        deadline = t0 + (timeout_s or self.timeout_s)
        ok, detail = probe()
        while not ok and time.monotonic() < deadline:
            time.sleep(3.0)
            ok, detail = probe()
        waited = time.monotonic() - t0
        self.check(name, ok, f"{detail} ({waited:.0f} s)" if ok else f"timed out after {waited:.0f} s: {detail}")
        return waited

    def timed(self, key: str, seconds: float) -> None:
        self.results["timings_s"][key] = round(seconds, 1)

    # ---- state readers ----
    def actors(self) -> list[dict[str, Any]]:
        body = self.try_get("buffer", "/v1/actors") or {"actors": []}
        return [a for a in body["actors"] if a["live"]]

    def weights_version(self) -> int:
        body = self.try_get("buffer", "/v1/weights") or {}
        return (body.get("latest") or {}).get("version", 0)

    def buffer_state(self) -> dict[str, int]:
        table = self.get("buffer", "/v1/config")["table"]["name"]
        stats = self.get("buffer", f"/v1/tables/{table}/stats")["stats"]
        prompts = self.get("buffer", "/v1/prompts")
        keep = ("size", "inserts", "samples", "acks")
        return {**{f"table.{k}": stats[k] for k in keep},
                **{f"prompts.{k}": prompts[k] for k in ("epoch", "queued", "claimed", "done")}}  # fmt: skip


# ---- the steps, in order ----
def build(smoke: Smoke) -> None:
    t0 = time.monotonic()
    subprocess.run([str(REPO / "deploy" / "docker" / "build.sh")], check=True, timeout=COMPOSE_TIMEOUT_S)
    smoke.timed("build", time.monotonic() - t0)
    smoke.check("build", True, f"deploy/docker/build.sh in {time.monotonic() - t0:.0f} s")


def images(smoke: Smoke) -> None:
    sizes = {image: image_size_gb(image) for image in smoke.images.values()}
    smoke.results["images_gb"] = sizes
    missing = [image for image, size in sizes.items() if size is None]
    smoke.check("images", not missing, ", ".join(f"{i} {s} GB" for i, s in sizes.items() if s) +
                (f"; missing {missing}" if missing else ""))  # fmt: skip


def start(smoke: Smoke) -> None:
    t0 = time.monotonic()
    smoke.compose("up", "-d", "--no-build", *smoke.scale_args)
    smoke.timed("up_returned", time.monotonic() - t0)

    def healthy() -> tuple[bool, str]:
        buffer, learner = smoke.try_get("buffer", "/health"), smoke.try_get("learner", "/health")
        # The learner answers "starting" until the buffer holds enough to sample: up, not yet training.
        ok = bool(buffer and buffer["redis"] and learner and learner["status"] == "ok")
        return ok, f"buffer {buffer}, learner {learner}"

    smoke.wait("services healthy", healthy)
    smoke.timed("up_to_learner_running", time.monotonic() - t0)


def trains(smoke: Smoke) -> None:
    t0 = time.monotonic()

    def pushed() -> tuple[bool, str]:
        v = smoke.weights_version()
        return v >= smoke.versions, f"weights version {v} (want >= {smoke.versions})"

    smoke.wait("learner pushes versions", pushed)
    smoke.timed("to_versions", time.monotonic() - t0)


def scale(smoke: Smoke) -> None:
    """Two actor replicas register; each then gets a newer version pushed and inserts more trajectories."""
    t0 = time.monotonic()
    smoke.compose("up", "-d", "--no-build", "--no-recreate", "--scale", "actor=2", *smoke.scale_args)
    smoke.wait("2 actors registered", lambda: (len(smoke.actors()) == 2,
                                                ", ".join(a["info"]["url"] for a in smoke.actors())))  # fmt: skip
    smoke.timed("scale_to_2_registered", time.monotonic() - t0)
    first = {a["info"]["actor_id"]: a["info"] for a in smoke.actors()}

    def both_progress() -> tuple[bool, str]:
        now = {a["info"]["actor_id"]: a["info"] for a in smoke.actors()}
        rows = [
            (aid, first[aid]["policy_version"], info["policy_version"], first[aid]["trajectories"],
             info["trajectories"]) for aid, info in now.items() if aid in first
        ]  # fmt: skip
        ok = len(rows) == 2 and all(v1 > v0 and t1 > t0 for _, v0, v1, t0, t1 in rows)
        return ok, "; ".join(f"{aid}: version {v0}->{v1}, trajectories {t0}->{t1}" for aid, v0, v1, t0, t1 in rows)

    smoke.wait("both replicas push+insert", both_progress)

    def booked() -> tuple[bool, str]:
        # -1: the learner has not yet confirmed a push to that replica (under load a push can time out on the
        # learner's side after the actor applied it; the learner books it once the actor answers 409).
        delivered = (smoke.try_get("learner", "/v1/status") or {}).get("actors_delivered", {})
        return all(delivered.get(aid, -1) >= 0 for aid in first), f"actors_delivered {delivered}"

    smoke.wait("learner delivered to both", booked)


def buffer_api(smoke: Smoke) -> None:
    state = smoke.buffer_state()
    smoke.check("buffer API stats+prompts", state["table.inserts"] > 0 and state["prompts.done"] > 0, str(state))
    table = smoke.get("buffer", "/v1/config")["table"]["name"]
    page = smoke.get("buffer", f"/v1/tables/{table}/trajectories?limit=2")
    item = page["items"][0] if page["items"] else {}
    smoke.check("buffer API trajectories", "total" in page,
                f"total {page['total']}, first {({k: item.get(k) for k in ('actor_id', 'policy_version', 'reward')})}")
    learner = smoke.get("buffer", "/v1/learner")["status"] or {}
    smoke.check("buffer API learner", learner.get("step", 0) > 0,
                f"step {learner.get('step')}, policy_version {learner.get('policy_version')}")
    try:
        smoke.get("buffer", "/v1/admin/pause", method="POST")
        code = 200
    except urllib.error.HTTPError as e:
        code = e.code
    smoke.check("admin needs the token", code in (401, 403), f"POST /v1/admin/pause without a token -> {code}")


def prometheus(smoke: Smoke) -> None:
    """Every job has its targets up, the actor job one per replica (Docker DNS discovery)."""
    want = {"reward": 1, "buffer": 1, "learner": 1, "actor": 2, "prometheus": 1}

    def scraped() -> tuple[bool, str]:
        body = smoke.try_get("prometheus", "/api/v1/targets?state=active") or {"data": {"activeTargets": []}}
        up: dict[str, list[str]] = {}
        for t in body["data"]["activeTargets"]:
            if t["health"] == "up":
                up.setdefault(t["labels"]["job"], []).append(t["labels"]["instance"])
        ok = all(len(up.get(job, [])) >= n for job, n in want.items())
        return ok, "; ".join(f"{job}: {sorted(up.get(job, []))}" for job in want)

    smoke.wait("prometheus scrapes all", scraped, timeout_s=180)


def exit_codes(smoke: Smoke, *services: str) -> dict[str, int]:
    out = smoke.compose("ps", "-a", "--format", "json", *services)
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return {row["Name"]: int(row["ExitCode"]) for row in rows}


def stop_workers(smoke: Smoke) -> dict[str, int]:
    """Graceful stop (SIGTERM within stop_grace_period): exit 0, not Compose's SIGKILL (137)."""
    t0 = time.monotonic()
    smoke.compose("stop", "actor", "learner")
    smoke.timed("stop_actors_and_learner", time.monotonic() - t0)
    codes = exit_codes(smoke, "actor", "learner")
    smoke.check("graceful stop", bool(codes) and all(c == 0 for c in codes.values()),
                f"exit codes {codes} in {time.monotonic() - t0:.0f} s")  # fmt: skip
    return smoke.buffer_state()


def persists(smoke: Smoke) -> tuple[int, int]:
    """down + up without -v: the replay table and the prompt queue come back exactly as they were."""
    before = stop_workers(smoke)
    learner = smoke.get("buffer", "/v1/learner")["status"] or {}
    version = smoke.weights_version()
    t0 = time.monotonic()
    smoke.compose("down")
    smoke.compose("up", "-d", "--no-build", "buffer")  # redis, prepare (must not reload the queue), buffer
    smoke.wait("buffer back after down", lambda: (smoke.try_get("buffer", "/health") is not None, "buffer /health"))
    after = smoke.buffer_state()
    smoke.timed("down_up_buffer", time.monotonic() - t0)
    diff = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    smoke.check("buffer+queue survive (AOF)", not diff and before["table.inserts"] > 0,
                f"differs: {diff}" if diff else f"unchanged: {after}")  # fmt: skip
    return learner.get("step", 0), version


def resumes(smoke: Smoke, step_before: int, version_before: int) -> None:
    t0 = time.monotonic()
    smoke.compose("up", "-d", "--no-build", "--scale", "actor=2", *smoke.scale_args)

    def running() -> tuple[bool, str]:
        body = smoke.try_get("learner", "/health")
        return bool(body and body["state"] == "running"), f"learner {body}"

    smoke.wait("learner running again", running)
    logs = smoke.compose("logs", "--no-color", "learner")
    resumed = [line.split("|", 1)[-1].strip() for line in logs.splitlines() if "resumed from" in line]
    status = smoke.get("learner", "/v1/status")
    smoke.check("learner resumed", bool(resumed) and status["step"] >= step_before,
                f"{resumed[-1] if resumed else 'no `resumed from` in its log'}; step now {status['step']} "
                f"(last seen before the stop {step_before})")  # fmt: skip

    def higher() -> tuple[bool, str]:
        v = smoke.weights_version()
        return v > version_before, f"weights version {v} (before the restart {version_before})"

    smoke.wait("higher version after restart", higher)
    smoke.timed("restart_to_higher_version", time.monotonic() - t0)


def diagnose(smoke: Smoke) -> None:
    """After a failure: container states and the last log lines, to see which service broke."""
    try:
        log.info("%s", smoke.compose("ps", "-a"))
        log.info("%s", smoke.compose("logs", "--no-color", "--tail", "30"))
    except (SmokeFailed, subprocess.TimeoutExpired) as e:
        log.info("could not collect diagnostics: %s", e)


def cleanup(smoke: Smoke, tries: int = 3) -> bool:
    """`down -v`, retried: a 20.10 engine under heavy load sometimes loses a container's exit event on stop."""
    for attempt in range(1, tries + 1):
        try:
            smoke.compose("down", "-v", "--remove-orphans")
            return True
        except (SmokeFailed, subprocess.TimeoutExpired) as e:
            log.info("%s  cleanup attempt %d: %s", "FAIL" if attempt == tries else "retry", attempt, e)
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.compose_smoke", description=__doc__.split("\n\n")[0])
    p.add_argument("--no-build", action="store_true", help="use the images as they are (deploy/docker/build.sh)")
    p.add_argument("--versions", type=int, default=3, help="weight versions to wait for before scaling")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds each wait may take (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="leave the project running (no `down -v`)")
    p.add_argument("--json", type=Path, default=None, help="write the checks, timings and image sizes here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    with tempfile.TemporaryDirectory(prefix="tbrm-smoke-") as env_dir:
        smoke = Smoke(Path(env_dir), versions=args.versions, timeout_s=args.timeout)
        status = 0
        try:
            if not args.no_build:
                build(smoke)
            images(smoke)
            start(smoke)
            trains(smoke)
            scale(smoke)
            buffer_api(smoke)
            prometheus(smoke)
            resumes(smoke, *persists(smoke))
        except (SmokeFailed, subprocess.SubprocessError, urllib.error.URLError, OSError, KeyError) as e:
            log.info("FAIL  %s", e)
            diagnose(smoke)
            status = 1
        finally:
            if not args.keep and not cleanup(smoke):
                status = 1
        passed = sum(c["ok"] for c in smoke.results["checks"])
        failed = len(smoke.results["checks"]) - passed or status  # an error outside a check counts once
        log.info("%d passed, %d failed", passed, failed)
        log.info("timings (s): %s", smoke.results["timings_s"])
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(smoke.results, indent=2) + "\n")
        return status


if __name__ == "__main__":
    sys.exit(main())
