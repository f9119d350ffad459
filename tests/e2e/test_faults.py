"""Cross-process faults on a real local cluster (issue 9): Redis restart with AOF, SIGKILL of an actor mid-run,
SIGKILL of the learner. One cluster (tiny random model, 2 actors) serves the three tests, in file order.

Bookkeeping invariant checked throughout (max_times_sampled = 1, so an acked item leaves the table):
    inserts == size + acks + removed + dropped_stale
i.e. every inserted trajectory is still stored (possibly on a lease), was trained on exactly once (acked), or was
evicted by a documented rule. Nothing lost, nothing counted twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.launcher import Cluster
from deploy.run_config import resolve
from deploy.run_dir import RunDir

pytestmark = pytest.mark.slow

PROMPT_LEASE_S = 8.0
TABLE_LEASE_S = 8.0


def _wait(cond: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("faults")
    cfg = tmp / "faults.toml"
    cfg.write_text(
        f"""
[run]
actors = 2
toy_train_size = 3000
toy_test_size = 16
health_timeout_s = 240.0
stop_timeout_s = 10.0
[run.restart]
mode = "no"        # these tests kill and restart by hand; `check()` must see any other death
[table]
max_size = 4096
lease_s = {TABLE_LEASE_S}
[table.rate_limiter]
min_size_to_sample = 8
samples_per_insert = 1.0
error_buffer = 32.0
[actor]
model_dir = "{tiny_model_dir}"
prompts_per_batch = 8
max_tokens = 8
prompt_lease_s = {PROMPT_LEASE_S}
insert_timeout_s = 3.0
[learner]
model_path = "{tiny_model_dir}"
batch_size = 8
micro_batch_size = 8
checkpoint_interval_steps = 2
sample_timeout_s = 3.0
"""
    )
    run, config = resolve(cfg, {"run": {"minutes": 30}})
    c = Cluster(run, config, RunDir(tmp / "run"), dashboard=False)
    try:
        c.start_services()
        yield c
    finally:
        c.sup.stop_all(timeout_s=10)


def _clients(c: Cluster) -> dict[str, Any]:
    from buffer.client import (
        ActorRegistry,
        LearnerStatusStore,
        PromptQueue,
        ReplayTable,
        WeightsStore,
        connect,
    )
    from deploy.run_config import table_config

    r = connect(c.redis_url)
    return {
        "r": r,
        "table": ReplayTable(r, table_config(c.config)),
        "queue": PromptQueue(r, "train"),
        "registry": ActorRegistry(r),
        "learner": LearnerStatusStore(r),
        "weights": WeightsStore(r),
    }


def _step(k: dict[str, Any]) -> int:
    st = k["learner"].get()
    return st.step if st else 0


def _balanced(k: dict[str, Any]) -> bool:
    s = k["table"].stats()
    return s.inserts == s.size + s.acks + s.removed + s.dropped_stale


def _actor_status(c: Cluster, name: str) -> Any:
    from actor_service.client import get_status

    return get_status(c.actor_urls[name], timeout_s=5.0)


def test_redis_restart_with_aof_keeps_everything(cluster: Cluster) -> None:
    k = _clients(cluster)
    _wait(lambda: _step(k) >= 2, 180, "two learner steps")
    # Freeze both sides so that the state is still while Redis restarts, then compare exactly.
    k["table"].pause("inserts")
    k["table"].pause("sampling")
    time.sleep(2.0)
    before = (k["table"].stats().model_dump(), k["queue"].info(), sorted(a.actor_id for a in k["registry"].live()),
              k["weights"].latest(), k["learner"].get().step)
    k["r"].close()
    cluster.sup.restart("redis", timeout_s=30)
    k = _clients(cluster)
    after = (k["table"].stats().model_dump(), k["queue"].info(), sorted(a.actor_id for a in k["registry"].live()),
             k["weights"].latest(), k["learner"].get().step)
    # leases are the only thing that may move (expiry is time based); compare the rest exactly
    for d in (before[0], after[0]):
        d.pop("extra", None)
    assert after[0] == before[0]
    assert after[1] == before[1]
    assert after[2] == before[2] == ["actor-0", "actor-1"]
    assert after[3] == before[3] and after[4] == before[4]
    k["table"].resume("inserts")
    k["table"].resume("sampling")
    # the services reconnect on their own: training goes on
    _wait(lambda: _step(k) >= before[4] + 2, 120, "learner steps after the Redis restart")
    assert _balanced(k)
    cluster.sup.check()  # no service died while Redis was away


def test_actor_sigkill_prompts_return_and_restarted_actor_catches_up(cluster: Cluster) -> None:
    k = _clients(cluster)
    _wait(lambda: _actor_status(cluster, "actor-1").prompts_in_flight > 0, 60, "actor-1 holding prompts")
    reclaimed_before = k["queue"].info()["reclaimed"]
    cluster.sup.kill("actor-1")  # SIGKILL the process group mid-batch
    trajs0 = _actor_status(cluster, "actor-0").trajectories
    step0 = _step(k)
    # the other actor and the learner go on
    _wait(lambda: _actor_status(cluster, "actor-0").trajectories > trajs0 + 8, 90, "actor-0 keeps generating")
    _wait(lambda: _step(k) >= step0 + 2, 90, "learner keeps stepping")
    # the dead actor's claimed prompts come back once their claims expire
    _wait(lambda: k["queue"].info()["reclaimed"] > reclaimed_before, PROMPT_LEASE_S + 60, "prompts reclaimed")
    # a restarted actor re-registers and is brought to the newest weights
    cluster.sup.restart("actor-1", timeout_s=240)
    latest = k["weights"].latest().version
    _wait(lambda: "actor-1" in {a.actor_id for a in k["registry"].live()}, 30, "actor-1 re-registered")
    _wait(lambda: _actor_status(cluster, "actor-1").policy_version >= latest, 60, "actor-1 caught up")
    _wait(lambda: _actor_status(cluster, "actor-1").trajectories > 0, 90, "actor-1 generating again")
    assert _balanced(k)
    cluster.sup.check()


def test_learner_sigkill_resumes_from_checkpoint_without_losing_data(cluster: Cluster) -> None:
    k = _clients(cluster)
    step_before = _wait(lambda: _step(k) if _step(k) >= 3 else 0, 120, "three more learner steps")
    cluster.sup.kill("learner")
    killed_at = _step(k)
    version_at_kill = k["learner"].get().policy_version
    # leased-but-unacked items return after the lease; the books balance
    _wait(lambda: k["table"].stats().leased == 0, TABLE_LEASE_S + 30, "leases returned")
    assert _balanced(k)
    acks_at_kill = k["table"].stats().acks
    # acks come only after checkpoints (every 2 steps of 8): the batches after the last one went back, not lost
    assert acks_at_kill % (2 * 8) == 0 and acks_at_kill <= killed_at * 8
    cluster.sup.restart("learner", timeout_s=240)
    log = cluster.rd.logs / "learner.log"
    _wait(lambda: "resumed from" in log.read_text(errors="replace"), 180, "the learner resuming its checkpoint")
    # the resumed learner continues from its last checkpoint (every 2 steps) with consistent versions
    _wait(lambda: _step(k) > killed_at, 180, "learner steps after the restart")
    st = k["learner"].get()
    # versions never go backwards or get reused: a learner rolled back to its checkpoint numbers its weights after
    # the newest version published before the kill (so policy_version may run ahead of step)
    assert st.policy_version >= st.step
    assert st.policy_version > version_at_kill
    assert st.step >= killed_at - 1 >= step_before - 1
    # the resumed learner acks again: after its next checkpoint, with the sample of the step after it
    _wait(lambda: k["table"].stats().acks > acks_at_kill, 120, "acks after the restart")
    assert _balanced(k)
    cluster.sup.check()
