"""State shared by the training loop (writer) and the status HTTP app (reader) in the learner process."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from buffer.schema import WeightsInfo


@dataclass
class LiveStatus:
    """What the loop last did; read by the HTTP status app (a lock guards the dict updates)."""

    state: str = "starting"
    step: int = 0
    policy_version: int = 0
    started_at: float = field(default_factory=time.time)
    last_step_at: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    latest_weights: WeightsInfo | None = None
    actors_delivered: dict[str, int] = field(default_factory=dict)
    actors_canary_drift: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per actor: the version of its last verified push and the canary drift (learner/push.py)."""
    error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def update(self, **kw: Any) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, v)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "state": self.state,
                "step": self.step,
                "policy_version": self.policy_version,
                "started_at": self.started_at,
                "last_step_at": self.last_step_at,
                "metrics": dict(self.metrics),
                "latest_weights": self.latest_weights.model_dump() if self.latest_weights else None,
                "actors_delivered": dict(self.actors_delivered),
                "actors_canary_drift": dict(self.actors_canary_drift),
                "error": self.error,
            }
