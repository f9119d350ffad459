"""Supervised pool of math-verify worker processes.

Why processes: math-verify bounds its work with ``signal.alarm``, which only works on a process's main thread,
and sympy can still hang inside C code or eat all memory. Each worker therefore

- runs every comparison on its own main thread under a SOFT timeout (``ITIMER_REAL`` raising a BaseException that
  math-verify's ``except Exception`` cannot swallow) and answers ``timeout`` itself;
- has an address-space limit (``RLIMIT_AS``) so a blow-up becomes a MemoryError, not a machine-wide OOM;
- dies with its parent (``PR_SET_PDEATHSIG``; EOF on its pipe also ends it).

The asyncio supervisor hands one job at a time to an idle worker and enforces a HARD limit: a worker that has not
answered after ``hard_timeout_s`` is SIGKILLed and replaced, and the job answers ``timeout``. Workers are forked
from a forkserver that has math-verify/sympy preloaded, so a replacement is ready in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Literal

log = logging.getLogger(__name__)

PoolStatus = Literal["correct", "incorrect", "timeout", "error"]


class SoftTimeout(BaseException):
    """Raised by the worker's ITIMER_REAL handler; a BaseException so library `except Exception` blocks pass it."""


def _on_alarm(signum: int, frame: object) -> None:
    raise SoftTimeout()


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the parent (forkserver) gone -> we go too
    except OSError:  # not Linux/glibc: EOF on the pipe still ends the worker when idle
        pass


def _set_memory_limit(limit_mb: int) -> None:
    if limit_mb <= 0:
        return
    import resource

    limit = limit_mb * 2**20
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def worker_main(conn: Connection, soft_timeout_s: float, memory_limit_mb: int) -> None:
    """Worker loop: receive (pred, gold), answer a status. Runs in the child process's main thread."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the service; it stops us
    signal.signal(signal.SIGALRM, _on_alarm)
    from reward.grading import load_math_verify, verify_pair

    load_math_verify()
    _set_memory_limit(memory_limit_mb)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        pred, gold = msg
        status: PoolStatus
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, soft_timeout_s)
                status = "correct" if verify_pair(pred, gold) else "incorrect"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except SoftTimeout:
            status = "timeout"
        except (MemoryError, RecursionError):
            # Too big for sympy within our limits: unverifiable counts as incorrect (never a false positive).
            status = "incorrect"
        except Exception:  # - any library failure is an `error` verdict, the worker lives on
            log.exception("math-verify failed")
            status = "error"
        try:
            conn.send(status)
        except (BrokenPipeError, OSError):
            return


@dataclass
class _Worker:
    proc: mp.process.BaseProcess
    conn: Connection
    started: float = field(default_factory=time.monotonic)
    # True while an answer is owed: a cancelled caller leaves it in the pipe, the next user drains it first.
    pending: bool = False


class WorkerPool:
    """`size` supervised math-verify workers behind an asyncio API (`await pool.verify(pred, gold)`)."""

    def __init__(
        self,
        size: int = 2,
        soft_timeout_s: float = 3.0,
        hard_timeout_s: float = 6.0,
        memory_limit_mb: int = 1024,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        if hard_timeout_s <= soft_timeout_s:
            raise ValueError(f"hard_timeout_s ({hard_timeout_s}) must exceed soft_timeout_s ({soft_timeout_s})")
        self.size = size
        self.soft_timeout_s = soft_timeout_s
        self.hard_timeout_s = hard_timeout_s
        self.memory_limit_mb = memory_limit_mb
        self.on_restart = on_restart
        self.restarts = 0
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(["math_verify", "reward.grading", "reward._preload"])
        self._idle: asyncio.Queue[_Worker] | None = None
        self._all: list[_Worker] = []
        self._background: set[asyncio.Future[None]] = set()  # replacements under way
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=worker_main, args=(child, self.soft_timeout_s, self.memory_limit_mb), daemon=True,
            name="reward-worker",
        )
        proc.start()
        child.close()
        w = _Worker(proc, parent)
        self._all.append(w)
        return w

    async def start(self) -> None:
        """Start the workers (blocking spawn work runs in a thread so the event loop stays responsive)."""
        self._idle = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for _ in range(self.size):
            w = await loop.run_in_executor(None, self._spawn)
            self._idle.put_nowait(w)

    async def warmup(self, timeout_s: float = 60.0) -> None:
        """One trivial job per worker, so the first real requests are not slowed by worker start-up."""
        await asyncio.wait_for(asyncio.gather(*(self.verify("1", "1") for _ in range(self.size))), timeout_s)

    def _kill(self, w: _Worker) -> None:
        with contextlib.suppress(ProcessLookupError):
            if w.proc.pid is not None:
                os.kill(w.proc.pid, signal.SIGKILL)
        w.proc.join(timeout=5)
        w.conn.close()
        if w in self._all:
            self._all.remove(w)

    async def _replace(self, w: _Worker, why: str) -> _Worker:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._kill, w)
        self.restarts += 1
        log.warning("reward worker pid %s replaced (%s)", w.proc.pid, why)
        if self.on_restart is not None:
            self.on_restart(why)
        return await loop.run_in_executor(None, self._spawn)

    async def close(self) -> None:
        """Stop every worker (polite message first, SIGKILL after a short grace)."""
        self._closed = True
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        workers = list(self._all)
        for w in workers:
            with contextlib.suppress(OSError, BrokenPipeError):
                w.conn.send(None)
        loop = asyncio.get_running_loop()

        def stop(w: _Worker) -> None:
            w.proc.join(timeout=1)
            if w.proc.is_alive():
                self._kill(w)
            else:
                w.conn.close()
                with contextlib.suppress(ValueError):
                    self._all.remove(w)

        await asyncio.gather(*(loop.run_in_executor(None, stop, w) for w in workers))

    async def settle(self, timeout_s: float = 30.0) -> None:
        """Wait until replacements under way have joined the pool."""
        if self._background:
            await asyncio.wait_for(asyncio.gather(*self._background, return_exceptions=True), timeout_s)

    def alive(self) -> int:
        """Live worker processes."""
        return sum(1 for w in list(self._all) if w.proc.is_alive())

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._all if w.proc.pid is not None]

    # -- jobs -----------------------------------------------------------------------------------------------
    async def _roundtrip(self, w: _Worker, msg: tuple[str, str] | None) -> PoolStatus:
        """Send `msg` (None: send nothing, just collect the answer still owed) and await the answer."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[PoolStatus] = loop.create_future()
        fd = w.conn.fileno()

        def readable() -> None:
            if fut.done():
                return
            try:
                fut.set_result(w.conn.recv())
            except (EOFError, OSError) as exc:
                fut.set_exception(exc)

        if msg is not None:
            w.conn.send(msg)
            w.pending = True
        loop.add_reader(fd, readable)
        try:
            result = await asyncio.wait_for(fut, self.hard_timeout_s)
            w.pending = False
            return result
        finally:
            loop.remove_reader(fd)

    async def verify(self, pred: str, gold: str) -> PoolStatus:
        """math-verify on one normalized pair in a worker; `timeout` after the soft or the hard limit."""
        if self._idle is None or self._closed:
            raise RuntimeError("WorkerPool is not started")
        w = await self._idle.get()
        release = True
        try:
            for attempt in range(2):
                if not w.proc.is_alive():
                    w = await self._replace(w, "found dead")
                try:
                    if w.pending:
                        await self._roundtrip(w, None)
                    return await self._roundtrip(w, (pred, gold))
                except TimeoutError:
                    # Answer at once; the stuck worker dies now and its replacement joins the pool when ready.
                    self._sigkill(w)
                    release = False
                    task = asyncio.ensure_future(self._replace_and_release(w, f"hard timeout {self.hard_timeout_s}s"))
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)
                    return "timeout"
                except (EOFError, OSError) as exc:
                    # The worker died under this job (or before it): replace it, try once more, then give up.
                    w = await self._replace(w, f"died: {type(exc).__name__}")
                    if attempt == 1:
                        return "error"
            return "error"
        finally:
            if release and not self._closed:
                self._idle.put_nowait(w)

    @staticmethod
    def _sigkill(w: _Worker) -> None:
        with contextlib.suppress(ProcessLookupError):
            if w.proc.pid is not None:
                os.kill(w.proc.pid, signal.SIGKILL)

    async def _replace_and_release(self, w: _Worker, why: str) -> None:
        new = await self._replace(w, why)
        if self._closed:
            await asyncio.get_running_loop().run_in_executor(None, self._kill, new)
        elif self._idle is not None:
            self._idle.put_nowait(new)
