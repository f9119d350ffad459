"""A learner crash between a step's ack and its checkpoint (issue 9, "SIGKILL the learner"), in process.

The crash is simulated by an exception raised from the loop's own status update at the end of step 3 (after the
step's ack and weight export, before any checkpoint of step 3), which the loop does not catch: the process state
is then what a SIGKILL at that point leaves (the exit-time checkpoint is skipped). Real DeepSpeed, real Redis.

What holds: nothing is leased or counted twice, a restart resumes at the checkpoint, and no version number is
issued twice (the resumed learner numbers its weights after the crashed run's newest export).
What does not hold yet (xfail, strict: it turns into a failure once fixed, so the mark gets removed): the batch
acked at step 3 is consumed although the resumed model never saw its update. See README "Reliability", known limits.
The SIGKILL itself over real processes: tests/e2e/test_faults.py::test_learner_sigkill_resumes_from_checkpoint_*.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from buffer.client import ReplayTable, WeightsStore, connect
from buffer.schema import FifoSampler, TableConfig, Trajectory
from learner.live import LiveStatus

BATCH = 4
CRASH_STEP = 3
CHECKPOINT_EVERY = 2


class SimulatedKill(BaseException):
    """Not an Exception: nothing in the loop may swallow it, like a SIGKILL."""


class CrashingStatus(LiveStatus):
    """The loop's status object; raises at the end-of-step update of `crash_step`."""

    crash_step: int = 0

    def update(self, **kw: Any) -> None:
        super().update(**kw)
        if kw.get("step") == self.crash_step and "metrics" in kw:
            raise SimulatedKill(f"simulated SIGKILL after the ack of step {self.crash_step}")


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


def settings(run_dir: Path, model: Path, redis_url: str, **kw: Any):  # noqa: ANN201
    from learner.settings import LearnerSettings

    base: dict[str, Any] = dict(
        model_path=model, run_dir=run_dir, redis_url=redis_url, auth_token="t", batch_size=BATCH,
        micro_batch_size=BATCH, lr=1e-3, loss={"kind": "tbrm", "beta": 0.5}, sample_timeout_s=3.0, port=0,
        push_timeout_s=2.0, checkpoint_interval_steps=CHECKPOINT_EVERY, push_interval_steps=1, torch_threads=1,
        table=TableConfig(sampler=FifoSampler(), max_times_sampled=1),
    )
    base.update(kw)
    return LearnerSettings(**base)


@pytest.fixture(scope="module")
def crashed_then_resumed(tiny_model_dir: Path, redis_server, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN001, ANN201
    from learner.train import train

    torch.set_num_threads(1)
    r = connect(redis_server.url)
    r.flushall()
    table = ReplayTable(r, TableConfig(sampler=FifoSampler(), max_times_sampled=1))
    table.insert(trajectories(4 * BATCH))
    run_dir = tmp_path_factory.mktemp("learner_crash")
    live = CrashingStatus()
    live.crash_step = CRASH_STEP
    with pytest.raises(SimulatedKill):
        train(settings(run_dir, tiny_model_dir, redis_server.url, max_steps=10), live=live)
    at_crash = table.stats()
    exported_v3 = WeightsStore(r).latest()
    resumed = train(settings(run_dir, tiny_model_dir, redis_server.url, max_steps=CRASH_STEP))
    yield {"at_crash": at_crash, "exported_v3": exported_v3, "resumed": resumed, "table": table,
           "url": redis_server.url}
    r.flushall()


def test_crash_leaves_consistent_books_and_resumes_at_the_checkpoint(crashed_then_resumed) -> None:  # noqa: ANN001
    s = crashed_then_resumed
    at_crash = s["at_crash"]
    assert at_crash.acks == CRASH_STEP * BATCH and at_crash.leased == 0  # step 3 was acked, then the crash
    assert at_crash.inserts == at_crash.size + at_crash.acks + at_crash.removed + at_crash.dropped_stale
    resumed = s["resumed"]
    # resumed from the step-2 checkpoint: one step (3) on the remaining batch
    assert [x["step"] for x in resumed.history] == [CRASH_STEP]
    assert resumed.step == CRASH_STEP
    # versions are never reissued: the resumed weights are numbered after the crashed run's newest export (v3),
    # so v4 = the step-2 checkpoint re-published, v5 = after the resumed step 3
    assert s["exported_v3"].version == CRASH_STEP
    assert resumed.policy_version == CRASH_STEP + 2
    assert WeightsStore(connect(s["url"])).latest().version == CRASH_STEP + 2
    after = s["table"].stats()
    assert after.acks == (CRASH_STEP + 1) * BATCH and after.size == 0 and after.leased == 0
    assert after.samples == after.acks  # max_times_sampled = 1: no trajectory was handed out twice


@pytest.mark.xfail(strict=True, reason="acks precede checkpoints: a crash rolls back acked updates "
                                       "(README Reliability, known limits)")
def test_no_acked_update_is_rolled_back(crashed_then_resumed) -> None:  # noqa: ANN001
    s = crashed_then_resumed
    # every trajectory acked before the crash has its update in the newest checkpoint (step 2 here)
    assert s["at_crash"].acks == CHECKPOINT_EVERY * BATCH
