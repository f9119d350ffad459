"""The actor's side of vLLM's worker: weight reloads and their rollback, by name (`collective_rpc("tbrm_...")`).

vLLM mixes `TbrmWorker` into its worker (`worker_extension_cls`), so these methods run where the model lives: in
the actor's process with the in-process engine core, or in vLLM's engine-core process (`engine_process`, see
actor_service.engine). A method called by name crosses that process boundary as a small message; the tensors of a
reload do not: the actor copies them into one shared-memory segment (`SharedWeights`, RAM under /dev/shm, reused
by every push) and names each tensor by offset, dtype and shape; the worker maps the segment once and reads the
tensors from it without a copy (vLLM's loader copies them into the model).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

from actor_service.weights import view_of

SHM_PREFIX = "tbrm-weights-"
"""Name prefix of the actor's shared weight segments (/dev/shm); a crashed actor's are removed at start."""
SHM_DIR = Path("/dev/shm")

Entry = tuple[str, str, list[int], int]
"""A tensor in the segment: name, torch dtype name, shape, byte offset."""


def die_with_parent() -> None:
    """A vLLM general plugin (the `vllm.general_plugins` entry point in pyproject.toml), which vLLM runs in each
    of its processes. In the processes the actor's engine starts (multiprocessing children: the engine core, and
    workers where vLLM starts any), it asks Linux to SIGKILL the process when the thread that started it ends:
    without it they outlive an actor killed with SIGKILL and keep using the cores. The actor's engine shuts them
    down from that thread when it closes (actor_service.engine). Elsewhere (the actor's own process, tests) it does
    nothing."""
    import ctypes
    import multiprocessing
    import signal

    if multiprocessing.parent_process() is None:
        return
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux only)


class TbrmWorker:
    """Methods vLLM adds to its worker (`LLM(worker_extension_cls=...)`)."""

    _tbrm_segment: tuple[str, mmap.mmap] | None = None

    def tbrm_reload_shared(self, segment: str, entries: list[Entry]) -> None:
        """Reload the model from the tensors `entries` names in the shared segment `segment`."""
        self.reload_weights(weights_iterator=self._tbrm_tensors(segment, entries))  # type: ignore[attr-defined]

    def tbrm_abandon_partial_reload(self) -> None:
        """After `reload_weights` failed halfway: put every layer's kernel tensors back and forget the buffered
        weights, so the next reload starts clean (vLLM keeps per-layer reload state between calls; without this
        the failed tensors are replayed and layers stay on the meta device)."""
        from vllm.model_executor.model_loader.reload import layerwise

        for layer in self.get_model().modules():  # type: ignore[attr-defined]
            info = layerwise.get_layerwise_info(layer)
            if info.can_load():
                if info.kernel_tensors is not None:
                    layerwise._place_kernel_tensors(layer, info)
                info.reset()
        layerwise.LOADING_LAYERS.clear()

    def _tbrm_tensors(self, segment: str, entries: list[Entry]) -> Iterator[tuple[str, Any]]:
        import torch

        mapped = self._tbrm_map(segment)
        for name, dtype, shape, offset in entries:
            yield name, view_of(mapped, getattr(torch, dtype), shape, offset)

    def _tbrm_map(self, segment: str) -> mmap.mmap:
        """The segment mapped in this process (once per segment: a new mapping costs a page fault per page)."""
        held = self._tbrm_segment
        if held is not None and held[0] == segment:
            return held[1]
        fd = os.open(SHM_DIR / segment, os.O_RDWR)  # writable for torch.frombuffer; nothing writes it here
        try:
            mapped = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        if held is not None:
            with suppress(BufferError):  # a tensor of the old one still alive: the mapping goes with it
                held[1].close()
        self._tbrm_segment = (segment, mapped)
        return mapped


class SharedWeights:
    """The actor's shared segment for reloads in the engine-core process: `stage` copies a set of tensors into it
    (growing it when they do not fit) and returns their entries. One segment per engine, reused by every push;
    `close` removes it."""

    def __init__(self) -> None:
        self._shm: Any = None  # multiprocessing.shared_memory.SharedMemory

    @property
    def name(self) -> str:
        return self._shm.name

    def stage(self, tensors: Iterable[tuple[str, Any]]) -> list[Entry]:
        import torch

        placed: dict[int, tuple[int, Any]] = {}  # id -> (offset, tensor): a tensor yielded twice (a tied head) once
        entries: list[Entry] = []
        size = 0
        for name, t in tensors:
            if id(t) not in placed:
                placed[id(t)] = (size, t)
                size += -(-t.numel() * t.element_size() // 64) * 64  # 64-byte aligned
            entries.append((name, str(t.dtype).removeprefix("torch."), list(t.shape), placed[id(t)][0]))
        self._ensure(size)
        for offset, t in placed.values():
            if t.numel():
                view_of(self._shm.buf, torch.uint8, [t.numel() * t.element_size()], offset).copy_(
                    t.detach().reshape(-1).view(torch.uint8))
        return entries

    def _ensure(self, size: int) -> None:
        from multiprocessing import shared_memory

        if self._shm is not None and self._shm.size >= size:
            return
        self.close()
        self._shm = shared_memory.SharedMemory(name=f"{SHM_PREFIX}{os.getpid()}-{os.urandom(4).hex()}",
                                               create=True, size=max(size, 1))

    def close(self) -> None:
        if self._shm is not None:
            with suppress(BufferError, OSError):
                self._shm.close()
            with suppress(FileNotFoundError):
                self._shm.unlink()
            self._shm = None


def clean_stale_segments(shm_dir: Path = SHM_DIR) -> list[Path]:
    """Remove shared weight segments of actor processes that no longer run (a crash or SIGKILL)."""
    removed = []
    for seg in shm_dir.glob(f"{SHM_PREFIX}*"):
        pid = seg.name.removeprefix(SHM_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with suppress(OSError):
                seg.unlink()
                removed.append(seg)
    return removed
