"""A learner crash between a step and its checkpoint (issue 9, "SIGKILL the learner"), in process.

The crash is simulated by an exception raised from the loop's own status update at the end of step 3 (after the
step's optimizer update and weight export, before any checkpoint of step 3), which the loop does not catch: the
process state is then what a SIGKILL at that point leaves (the exit-time checkpoint is skipped, lease renewal
stops). Real DeepSpeed, real Redis.

What holds: the batch of step 3 is not acked (only checkpointed updates are: learner/acks.py); its lease expires
(the batch leased a step ahead for step 4 comes back untrained) and the resumed learner, restarted at the step-2 checkpoint, trains on it again, so every trajectory's update
ends up in the model exactly once and none is lost. No version number is issued twice (the resumed learner
numbers its weights after the crashed run's newest export). With max_staleness_versions = 3 the returned batch
(and the one never sampled) would be older than that at the resumed learner's raised version: the resumed learner
samples within the staleness of the rolled-back items until they are trained again, so none is dropped (issue 21).
A fresh learner (no checkpoint, or resume = "never") continues after the published versions too.
The SIGKILL itself over real processes: tests/e2e/test_faults.py::test_learner_sigkill_resumes_from_checkpoint_*.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from buffer.client import ReplayTable, WeightsStore, connect
from buffer.schema import FifoSampler, TableConfig, Trajectory, WeightsInfo
from learner.live import LiveStatus

BATCH = 4
CRASH_STEP = 3
CHECKPOINT_EVERY = 2
LEASE_S = 2.0
MAX_STALENESS = 3
TABLE = TableConfig(sampler=FifoSampler(), max_times_sampled=1, max_staleness_versions=MAX_STALENESS)


class SimulatedKill(BaseException):
    """Not an Exception: nothing in the loop may swallow it, like a SIGKILL."""


class CrashingStatus(LiveStatus):
    """The loop's status object; raises at the end-of-step update of `crash_step`."""

    crash_step: int = 0

    def update(self, **kw: Any) -> None:
        super().update(**kw)
        if kw.get("step") == self.crash_step and "metrics" in kw:
            raise SimulatedKill(f"simulated SIGKILL at the end of step {self.crash_step}")


def trajectories(n: int) -> list[Trajectory]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        prompt = torch.randint(10, 200, (6,), generator=g).tolist()
        response = torch.randint(10, 200, (4,), generator=g).tolist()
        out.append(Trajectory(traj_id=f"t{i:03d}", prompt_id=f"p{i}", group_id=f"g{i}", prompt_token_ids=prompt,
                              response_token_ids=response, behaviour_logprobs=[-1.0] * 4, reward=float(i % 2),
                              grade_status="correct" if i % 2 else "incorrect", policy_version=0))
    return out


def settings(run_dir: Path, model: Path, redis_url: str, **kw: Any):
    from learner.settings import LearnerSettings

    base: dict[str, Any] = dict(
        model_path=model, run_dir=run_dir, redis_url=redis_url, auth_token="t", batch_size=BATCH,
        micro_batch_size=BATCH, lr=1e-3, loss={"kind": "tbrm", "beta": 0.5}, sample_timeout_s=3.0, port=0,
        lease_s=LEASE_S,
        push_timeout_s=2.0, checkpoint_interval_steps=CHECKPOINT_EVERY, push_interval_steps=1, torch_threads=1,
        table=TABLE,
    )
    base.update(kw)
    return LearnerSettings(**base)


@pytest.fixture(scope="module")
def crashed_then_resumed(tiny_model_dir: Path, redis_server, tmp_path_factory: pytest.TempPathFactory):
    from learner.train import train

    torch.set_num_threads(1)
    r = connect(redis_server.url)
    r.flushall()
    table = ReplayTable(r, TABLE)
    table.insert(trajectories(4 * BATCH))
    run_dir = tmp_path_factory.mktemp("learner_crash")
    live = CrashingStatus()
    live.crash_step = CRASH_STEP
    with pytest.raises(SimulatedKill):
        train(settings(run_dir, tiny_model_dir, redis_server.url, max_steps=10), live=live)
    at_crash = table.stats()
    exported_v3 = WeightsStore(r).latest()
    # two steps: one on the 4th batch, available at once, one on the crashed step's batch once its lease expired
    stop = threading.Event()  # a learner whose data was dropped as stale would wait for more forever
    timer = threading.Timer(90.0, stop.set)
    timer.start()
    resumed = train(settings(run_dir, tiny_model_dir, redis_server.url, max_steps=CRASH_STEP + 1), stop=stop)
    timer.cancel()
    yield {"at_crash": at_crash, "exported_v3": exported_v3, "resumed": resumed, "table": table,
           "url": redis_server.url}
    r.flushall()


def test_only_checkpointed_updates_are_acked(crashed_then_resumed) -> None:
    at_crash = crashed_then_resumed["at_crash"]
    # steps 1-2 are in the step-2 checkpoint and acked; step 3's batch is still leased (its renewal stopped)
    assert at_crash.acks == CHECKPOINT_EVERY * BATCH
    assert at_crash.leased == (CRASH_STEP - CHECKPOINT_EVERY) * BATCH
    assert at_crash.inserts == at_crash.size + at_crash.acks + at_crash.removed + at_crash.dropped_stale


def test_resume_retrains_the_rolled_back_batch_and_loses_nothing(crashed_then_resumed) -> None:
    s = crashed_then_resumed
    resumed = s["resumed"]
    # resumed from the step-2 checkpoint: steps 3 and 4
    assert [x["step"] for x in resumed.history] == [CRASH_STEP, CRASH_STEP + 1]
    after = s["table"].stats()
    # every trajectory acked exactly once (max_times_sampled = 1), nothing left leased or stored
    assert after.acks == after.inserts == 4 * BATCH and after.size == 0 and after.leased == 0
    # handed out once more than acked: the batch whose update the crash rolled back (its lease expired), and the one
    # leased a step ahead for step 4 and never trained (released by the failing loop; a SIGKILL lets it expire)
    assert after.samples == after.acks + 2 * BATCH
    assert after.extra["expired_lease_items"] == 2 * BATCH
    assert all(x["batch_size"] == BATCH for x in resumed.history)


def test_versions_are_never_reissued(crashed_then_resumed) -> None:
    s = crashed_then_resumed
    # the resumed weights are numbered after the crashed run's newest export (v3):
    # v4 = the step-2 checkpoint re-published, v5 and v6 after the resumed steps 3 and 4
    assert s["exported_v3"].version == CRASH_STEP
    assert s["resumed"].policy_version == CRASH_STEP + 3
    assert WeightsStore(connect(s["url"])).latest().version == CRASH_STEP + 3


def test_the_rolled_back_batch_is_not_dropped_as_stale(crashed_then_resumed) -> None:
    after = crashed_then_resumed["table"].stats()
    assert after.dropped_stale == 0
    # the resumed run trained on the never-sampled batch and the rolled-back one, both at most MAX_STALENESS old
    assert all(x["version_lag_max"] <= MAX_STALENESS for x in crashed_then_resumed["resumed"].history)


def test_a_fresh_learner_continues_after_the_published_version(
    tiny_model_dir: Path, redis_server, tmp_path: Path
) -> None:
    """No checkpoint (a crash before the first one, a wiped run dir) or resume = "never", while Redis still holds
    published weights: the learner numbers after them instead of restarting at v0 (its exports would be refused)."""
    from learner.train import train

    torch.set_num_threads(1)
    r = connect(redis_server.url)
    r.flushall()
    # generated by the published v7 (older ones would be more than MAX_STALENESS behind the learner's v8)
    ReplayTable(r, TABLE).insert([t.model_copy(update={"policy_version": 7}) for t in trajectories(2 * BATCH)])
    WeightsStore(r).set_latest(WeightsInfo(version=7, sha256="0" * 64, nbytes=1, path=None))
    fresh = train(settings(tmp_path, tiny_model_dir, redis_server.url, max_steps=1))
    assert [x["policy_version"] for x in fresh.history] == [9]  # v8 = its start weights, v9 after the step
    assert WeightsStore(r).latest().version == 9
    never = train(settings(tmp_path, tiny_model_dir, redis_server.url, max_steps=1, resume="never"))
    assert [x["policy_version"] for x in never.history] == [11]
    assert WeightsStore(r).latest().version == 11
    r.flushall()
