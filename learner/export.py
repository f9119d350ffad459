"""Weight export off the training path: snapshot on the training thread, serialize/hash/write/publish/push on a
background thread while the next step runs (docs/weight-protocol.md).

`WeightExporter.submit(version)` costs the training thread one copy of the parameters to CPU (the snapshot: the
next optimizer step may change the live tensors) and the canary log-probs (one forward pass over a short fixed
sequence, actor_service.schema.canary_token_ids). Everything else runs on the exporter thread: an atomic write
of `policy-v<version>.safetensors` (for the push's `sendfile` and for actors that catch up from the file) by
safetensors itself and its sha256 read back from the page cache, both without holding the GIL (serializing in
memory held it for the whole copy and stalled the training thread), `WeightsStore.set_latest`, then
`WeightPusher.sync`. A push never blocks a step: if a snapshot is still waiting when the next one comes, the newer
one replaces it (counted in `exports_superseded`). `publish_now` (start and end of training) waits for the export.

Metrics (`metrics()`, merged into each step's line): `export_snapshot_s` (training thread), `export_time_s`
(background, last export), `export_overlap` (share of the export work done off the training thread:
background / (background + snapshot)), `exports_superseded`.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch

from actor_service.schema import canary_token_ids
from buffer.schema import WeightsInfo
from learner.weights import snapshot_state_dict, write_weights

log = logging.getLogger(__name__)


class WeightExporter:
    """One background thread; a one-slot mailbox of snapshots (the newest wins)."""

    def __init__(
        self,
        module: torch.nn.Module,
        weights_dir: Path,
        *,
        keep: int,
        dtype: str | None,
        publish: Any,
        pusher: Any | None = None,
    ) -> None:
        self.module = module
        self.weights_dir = weights_dir
        self.keep = keep
        self.dtype = getattr(torch, dtype) if dtype else None
        self._publish = publish  # WeightsInfo -> None (WeightsStore.set_latest)
        self.pusher = pusher
        self.latest: WeightsInfo | None = None
        self._cond = threading.Condition()
        self._pending: tuple[int, dict[str, torch.Tensor]] | None = None
        self._busy = False
        self._closed = False
        self.snapshot_s = 0.0
        self.export_s = 0.0
        self.superseded = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="weight-export", daemon=True)
        self._thread.start()

    def submit(self, version: int) -> None:
        """Snapshot the weights as `version` and export them in the background (returns after the snapshot)."""
        t0 = time.perf_counter()
        tensors = snapshot_state_dict(self.module, self.dtype)
        if self.pusher is not None:
            self.pusher.expect_canary(version, canary_logprobs(self.module))
        self.snapshot_s = time.perf_counter() - t0
        with self._cond:
            if self._pending is not None:
                self.superseded += 1
            self._pending = (version, tensors)
            self._cond.notify_all()

    def publish_now(self, version: int, timeout_s: float = 600.0) -> WeightsInfo | None:
        """Submit and wait until `version` is exported and published (start/end of training)."""
        self.wait_idle(timeout_s)
        if self.latest is not None and self.latest.version == version:
            return self.latest
        self.submit(version)
        self.wait_idle(timeout_s)
        return self.latest

    def wait_idle(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and not self._busy, timeout_s)

    def metrics(self) -> dict[str, float]:
        busy = self.export_s + self.snapshot_s
        return {
            "export_snapshot_s": self.snapshot_s,
            "export_time_s": self.export_s,
            "export_overlap": self.export_s / busy if busy > 0 else 0.0,
            "exports_superseded": float(self.superseded),
        }

    def close(self, timeout_s: float = 60.0) -> None:
        self.wait_idle(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                (version, tensors), self._pending = self._pending, None
                self._busy = True
            try:
                self._export(version, tensors)
            except Exception:  # a failed export is logged; the next version is tried again
                self.errors += 1
                log.exception("exporting weights version %d failed", version)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _export(self, version: int, tensors: dict[str, torch.Tensor]) -> None:
        t0 = time.perf_counter()
        info = write_weights(tensors, self.weights_dir, version, keep=self.keep)
        self._publish(info)
        self.latest = info
        if self.pusher is not None:
            self.pusher.sync(info)
        self.export_s = time.perf_counter() - t0
        log.debug("exported weights version %d in %.3fs", version, self.export_s)


@torch.no_grad()
def canary_logprobs(module: torch.nn.Module) -> list[float]:
    """log pi(t_i | t_<i) of the canary sequence under `module` (what the actor reports after applying it)."""
    ids = canary_token_ids(module.get_input_embeddings().weight.shape[0])
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    try:
        logits = module(torch.tensor([ids], device=device)).logits[0].float()
    finally:
        module.train(was_training)
    lp = torch.log_softmax(logits[:-1], dim=-1)
    return lp.gather(1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].cpu().tolist()
