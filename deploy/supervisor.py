"""Process supervision for the local cluster: start, health-gate, watch and stop services as OS processes.

Each service runs in its own session/process group (`start_new_session`), so that

- a Ctrl-C in the terminal reaches only the launcher, which then stops the services itself in reverse start order
  (reward workers, vLLM helpers and other grandchildren die with their group: `killpg`);
- stopping is SIGTERM to the group, a grace period, then SIGKILL to the group; nothing is left behind.

On Linux every child also gets `PR_SET_PDEATHSIG(SIGTERM)`: if the launcher itself is SIGKILLed, the services
are told to stop instead of running on as orphans.

stdout and stderr of every service go to `<run_dir>/logs/<name>.log`; a service that exits unexpectedly is
reported with the tail of that log (`ServiceCrashed`).

Restarts (`RestartPolicy`, like Compose's `restart: on-failure` plus systemd's start limit): `check()` restarts a
service that exited unexpectedly after a back-off (`backoff_s`, doubling per consecutive restart up to
`backoff_max_s`; the count resets once the service has run `window_s`), without blocking the caller, and marks it
healthy again once its health check passes. More than `max_restarts` restarts within `window_s` is a crash loop:
then, as for a service without a policy, `check()` raises `ServiceCrashed`. `status()` reports every service's
state and restart count (the dashboard shows them). The same policy covers a service that dies during
`start_all()`, before it is healthy: it is restarted (its dependants wait for the new incarnation's health) until
the crash-loop limit.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
RESTART_HEALTH_FACTOR = 3.0
"""A restarted service gets this many times its `health_timeout_s` to become healthy before it is killed."""


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def log_tail(path: Path, lines: int = 40, max_bytes: int = 64_000) -> str:
    """The last `lines` lines of a log file ("" when missing)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


class ServiceCrashed(RuntimeError):
    """A supervised service exited (or never became healthy); carries the tail of its log."""

    def __init__(self, name: str, reason: str, log_path: Path, returncode: int | None = None) -> None:
        self.name = name
        self.reason = reason
        self.log_path = log_path
        self.returncode = returncode
        self.tail = log_tail(log_path)
        super().__init__(f"service {name} {reason} (log: {log_path})")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_is_listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def listens_on(pid: int, port: int) -> bool:
    """True if process `pid` holds the TCP socket listening on `port` (Linux /proc); True where /proc cannot tell.

    A health check answered on the right port by a foreign process (another run that picked the same port) must not
    count as this service being up."""
    inodes: set[str] = set()
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                    inodes.add(cols[9])
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except (OSError, IndexError, ValueError):
        return True
    for fd in fds:
        try:
            if os.readlink(fd).removeprefix("socket:[").removesuffix("]") in inodes:
                return True
        except OSError:
            continue
    return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def pick_port(preferred: int, taken: set[int], host: str = "127.0.0.1") -> int:
    """`preferred` if it is free (and not already handed out), else an OS-assigned free port."""
    if preferred not in taken and port_is_free(preferred, host):
        return preferred
    while True:
        p = free_port(host)
        if p not in taken:
            return p


def pick_port_range(preferred_base: int, n: int, taken: set[int], host: str = "127.0.0.1") -> int:
    """Base port of `n` consecutive free ports (actor i listens on base + i), the preferred base when possible."""
    candidates = [preferred_base] + list(range(preferred_base + 100, 65000 - n, 97))
    for base in candidates:
        ports = range(base, base + n)
        if all(p not in taken and port_is_free(p, host) for p in ports):
            return base
    raise RuntimeError(f"no {n} consecutive free ports found")


def redis_ping(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


class RestartPolicy(BaseModel):
    """When a service that exited unexpectedly is started again (`[run.restart]` in the run config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["on-failure", "no"] = "on-failure"
    """on-failure: restart after a non-zero exit or a signal (an exit 0 of a service that may exit is its end);
    no: any unexpected exit ends the run (`tbrm up` exits 1)."""
    backoff_s: float = Field(default=1.0, ge=0)
    """Delay before the first restart; doubles with each consecutive restart."""
    backoff_max_s: float = Field(default=30.0, ge=0)
    """Longest delay between restarts."""
    max_restarts: int = Field(default=5, ge=0)
    """Crash-loop limit: this many restarts within `window_s` and the next exit ends the run."""
    window_s: float = Field(default=60.0, gt=0)
    """Window of the crash-loop limit; a service that ran this long since its last restart starts over at
    `backoff_s`."""

    def delay_s(self, consecutive: int) -> float:
        return min(self.backoff_s * 2**consecutive, self.backoff_max_s)


@dataclass
class ServiceHistory:
    """Restarts of one service across its incarnations (kept by the supervisor, shown by the dashboard)."""

    restarts: list[float] = field(default_factory=list)
    """monotonic times of every restart."""
    consecutive: int = 0
    last_exit: int | None = None
    restart_at: float | None = None
    """When a pending restart is due (None: none pending)."""


@dataclass
class ProcSpec:
    """One process to supervise."""

    name: str
    argv: list[str]
    env: dict[str, str]
    health: Callable[[], bool]
    """True once the service is ready (HTTP /health 200, or Redis PING)."""
    health_timeout_s: float = 120.0
    depends_on: list[str] = field(default_factory=list)
    """Names of processes that must be healthy before this one starts."""
    port: int | None = None
    stop_timeout_s: float = 10.0
    """Grace period between SIGTERM and SIGKILL."""
    may_exit: bool = False
    """An exit with status 0 is a normal end (the learner after max_steps), not a crash."""
    restart: RestartPolicy | None = None
    """None: an unexpected exit is always a crash (`check()` raises)."""


@dataclass
class Managed:
    spec: ProcSpec
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    started_at: float
    healthy_at: float | None = None
    stopped: bool = False


class Supervisor:
    """Starts `ProcSpec`s in dependency order gated on health; stops them in reverse order."""

    def __init__(self, log_dir: Path, cwd: Path | None = None) -> None:
        self.log_dir = log_dir
        self.cwd = cwd
        self.procs: dict[str, Managed] = {}
        self.order: list[str] = []
        self.history: dict[str, ServiceHistory] = {}

    # ---- start ----
    def spawn(self, spec: ProcSpec) -> Managed:
        if spec.name in self.procs:
            raise ValueError(f"process {spec.name} already started")
        path = self.log_dir / f"{spec.name}.log"
        log_file = path.open("ab")
        log_file.write(f"# {time.strftime('%H:%M:%S')} start: {' '.join(spec.argv)}\n".encode())
        log_file.flush()
        popen = subprocess.Popen(  # argv from the topology, no shell
            spec.argv,
            env=spec.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_set_pdeathsig,  # only called from the main thread
        )
        m = Managed(spec, popen, path, log_file, time.monotonic())
        self.procs[spec.name] = m
        self.order.append(spec.name)
        log.info("started %s (pid %d): %s", spec.name, popen.pid, " ".join(spec.argv))
        return m

    def start_all(
        self,
        specs: Sequence[ProcSpec],
        on_healthy: Callable[[str, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        poll_s: float = 0.2,
    ) -> None:
        """Start every spec as soon as its dependencies are healthy (independent ones start together); return when
        all are healthy. Raises ServiceCrashed if one exits or misses its health deadline."""
        pending = list(specs)
        names = {s.name for s in specs} | set(self.procs)
        for s in specs:
            unknown = [d for d in s.depends_on if d not in names]
            if unknown:
                raise ValueError(f"{s.name} depends on unknown processes {unknown}")
        while True:
            for s in list(pending):
                if all(self.procs.get(d) and self.procs[d].healthy_at for d in s.depends_on):
                    self.spawn(s)
                    pending.remove(s)
            waiting = [m for m in self.procs.values() if m.healthy_at is None and not m.stopped]
            if not pending and not waiting:
                return
            if should_stop and should_stop():
                raise KeyboardInterrupt
            for m in waiting:
                if self._exited_during_start(m):
                    continue
                if m.spec.health():
                    m.healthy_at = time.monotonic()
                    took = m.healthy_at - m.started_at
                    log.info("%s healthy after %.1f s", m.spec.name, took)
                    if on_healthy:
                        on_healthy(m.spec.name, took)
                elif time.monotonic() - m.started_at > m.spec.health_timeout_s:
                    raise ServiceCrashed(
                        m.spec.name, f"not healthy after {m.spec.health_timeout_s:.0f} s", m.log_path
                    )
            time.sleep(poll_s)

    def _exited_during_start(self, m: Managed) -> bool:
        """True if `m` is gone before it became healthy: restarted per its policy (back-off, crash-loop limit,
        as `check()` does after start-up) or, without one, a ServiceCrashed."""
        rc = m.popen.poll()
        policy = m.spec.restart
        if rc is None or (rc == 0 and m.spec.may_exit):
            return False
        if policy is None or policy.mode == "no":
            raise ServiceCrashed(m.spec.name, f"exited with status {rc}", m.log_path, rc)
        self._on_exit(m, rc, policy, time.monotonic())
        return True

    def _respawn(self, name: str) -> Managed:
        """Start `name` again with its spec, in its old place of the start order (reverse-order shutdown)."""
        old = self.procs.pop(name)
        idx = self.order.index(name)
        self.order.remove(name)
        m = self.spawn(old.spec)
        self.order.remove(name)
        self.order.insert(idx, name)
        return m

    def restart(self, name: str, timeout_s: float | None = None, poll_s: float = 0.2) -> Managed:
        """Stop `name` if it still runs, start it again with the same spec and wait for its health."""
        old = self.procs[name]
        if old.popen.poll() is None or not old.log_file.closed:
            self.stop(name)
        m = self._respawn(name)
        self.history.setdefault(name, ServiceHistory()).restart_at = None  # a pending automatic restart is moot
        deadline = time.monotonic() + (old.spec.health_timeout_s if timeout_s is None else timeout_s)
        while not old.spec.health():
            self._raise_if_exited(m)
            if time.monotonic() > deadline:
                raise ServiceCrashed(name, "not healthy after restart", m.log_path)
            time.sleep(poll_s)
        m.healthy_at = time.monotonic()
        return m

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the service's process group without stopping it gracefully (fault injection)."""
        m = self.procs[name]
        _killpg(m.popen.pid, sig)
        m.popen.wait(timeout=30)

    # ---- watch ----
    def _raise_if_exited(self, m: Managed) -> None:
        rc = m.popen.poll()
        if rc is not None and not m.stopped:
            if rc == 0 and m.spec.may_exit:
                return
            raise ServiceCrashed(m.spec.name, f"exited with status {rc}", m.log_path, rc)

    def check(self) -> None:
        """Restart services per their `RestartPolicy` (never blocking); raise ServiceCrashed for the first one
        that died unexpectedly without a policy or in a crash loop."""
        now = time.monotonic()
        for name in list(self.order):
            m = self.procs[name]
            rc = m.popen.poll()
            if m.stopped or (rc == 0 and m.spec.may_exit):
                continue
            policy = m.spec.restart
            if rc is None:
                if policy is not None:
                    self._watch_restarted(m, policy, now)
                continue
            if policy is None or policy.mode == "no":
                self._raise_if_exited(m)
            self._on_exit(m, rc, policy, now)

    def _watch_restarted(self, m: Managed, policy: RestartPolicy, now: float) -> None:
        """A running service with a policy: health of a restarted one; back-off reset after a quiet window."""
        h = self.history.setdefault(m.spec.name, ServiceHistory())
        if m.healthy_at is None:
            if m.spec.health():
                m.healthy_at = now
                log.info("%s healthy again after %.1f s", m.spec.name, now - m.started_at)
            elif now - m.started_at > RESTART_HEALTH_FACTOR * m.spec.health_timeout_s:
                # a loaded machine restarts slowly: kill only far past the first-start deadline (else a slow
                # service would be killed on every attempt and never come back)
                log.warning("%s not healthy %.0f s after its restart: killing it", m.spec.name, now - m.started_at)
                _killpg(m.popen.pid, signal.SIGKILL)
        elif h.consecutive and now - m.started_at >= policy.window_s:
            h.consecutive = 0

    def _on_exit(self, m: Managed, rc: int, policy: RestartPolicy, now: float) -> None:
        """An unexpected exit: schedule a restart after the back-off, start it when due, or give up (crash loop)."""
        name = m.spec.name
        h = self.history.setdefault(name, ServiceHistory())
        if h.restart_at is None:
            recent = [t for t in h.restarts if now - t < policy.window_s]
            if len(recent) >= policy.max_restarts:
                raise ServiceCrashed(name, f"exited with status {rc} in a crash loop ({len(recent)} restarts in the "
                                     f"last {policy.window_s:g} s)", m.log_path, rc)
            h.last_exit = rc
            h.restart_at = now + policy.delay_s(h.consecutive)
            log.warning("%s exited with status %s: restarting in %.1f s", name, rc, h.restart_at - now)
            if not m.log_file.closed:
                m.log_file.write(f"# {time.strftime('%H:%M:%S')} exited, status {rc}; restarting\n".encode())
                m.log_file.close()
        elif now >= h.restart_at:
            h.restart_at = None
            h.restarts.append(now)
            h.consecutive += 1
            self._respawn(name)

    def status(self) -> dict[str, dict[str, object]]:
        """Every service's state ("running", "starting", "restarting", "exited", "stopped"), restart count and
        last unexpected exit status."""
        out: dict[str, dict[str, object]] = {}
        now = time.monotonic()
        for name in self.order:
            m = self.procs[name]
            h = self.history.get(name, ServiceHistory())
            rc = m.popen.poll()
            if m.stopped:
                state = "stopped"
            elif h.restart_at is not None:
                state = f"restarting in {max(0.0, h.restart_at - now):.0f}s"
            elif rc is not None:
                state = "exited"
            else:
                state = "running" if m.healthy_at is not None else "starting"
            out[name] = {"state": state, "restarts": len(h.restarts), "last_exit": h.last_exit}
        return out

    def exited_ok(self, name: str) -> bool:
        m = self.procs.get(name)
        return m is not None and m.popen.poll() == 0

    def pids(self) -> dict[str, int]:
        return {n: self.procs[n].popen.pid for n in self.order}

    # ---- stop ----
    def stop(self, name: str, timeout_s: float | None = None, sig: int = signal.SIGTERM) -> int | None:
        """SIGTERM (or `sig`) to the process group, wait, then SIGKILL the group. Returns the exit status."""
        m = self.procs[name]
        m.stopped = True
        timeout = m.spec.stop_timeout_s if timeout_s is None else timeout_s
        pgid = m.popen.pid  # start_new_session: the child leads its own group
        if m.popen.poll() is None:
            _killpg(pgid, sig)
            try:
                m.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s: SIGKILL", name, timeout)
                _killpg(pgid, signal.SIGKILL)
                m.popen.wait(timeout=10)
        # Grandchildren that outlived their parent (e.g. a pool worker): the group still exists, kill it.
        _killpg(pgid, signal.SIGKILL)
        if not m.log_file.closed:
            m.log_file.write(f"# {time.strftime('%H:%M:%S')} stopped, status {m.popen.returncode}\n".encode())
            m.log_file.close()
        return m.popen.returncode

    def stop_all(self, timeout_s: float | None = None) -> dict[str, int | None]:
        """Stop every service in reverse start order."""
        codes: dict[str, int | None] = {}
        for name in reversed(self.order):
            try:
                codes[name] = self.stop(name, timeout_s)
            except (OSError, subprocess.SubprocessError) as e:  # keep stopping the others
                log.error("stopping %s failed: %s", name, e)
                codes[name] = None
        return codes


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as e:
        log.warning("killpg(%d, %s): %s", pgid, sig, e)


def merged_env(base: Mapping[str, str], *layers: Mapping[str, str]) -> dict[str, str]:
    env = dict(base)
    for layer in layers:
        env.update(layer)
    return env
