"""Version numbering after restarts and a 409 from an actor that is ahead (issue 21): a version names one set of
weights for the whole life of the Redis state, so a restarted learner never reissues a number, and an actor that
refuses a push as "not newer" is not booked as delivered (learner/push.py, learner/checkpoints.py)."""

from __future__ import annotations

import time

import pytest

from actor_service.client import WeightPushError
from buffer.schema import ActorInfo, WeightsInfo
from learner.checkpoints import logged_version, next_version, repair_version, rolled_back_items
from learner.push import WeightPusher


def _info(version: int) -> WeightsInfo:
    return WeightsInfo(version=version, sha256="0" * 64, nbytes=1, path="/nonexistent/model.safetensors")


def _pusher(actor_version: int, answer_409: bool, holds: int | None = None) -> tuple[WeightPusher, list[int]]:
    calls: list[int] = []

    def push_fn(url: str, path: str, version: int, token: str, **kw: object) -> None:
        calls.append(version)
        if answer_409:
            said = "" if holds is None else f" current version {holds}"
            raise WeightPushError(409, f"policy version {version} is not newer than the actor's{said}")

    actor = ActorInfo(actor_id="a0", url="http://127.0.0.1:1", policy_version=actor_version, started_at=1.0)
    return WeightPusher(lambda: [actor], "t", retry_s=60.0, push_fn=push_fn), calls


def _settle(p: WeightPusher) -> None:
    assert p.wait_idle(10.0)
    time.sleep(0.05)


def test_a_409_from_an_actor_ahead_is_not_delivered_and_raises_the_floor() -> None:
    # The actor holds v30 from an earlier learner; this learner restarted at v1 (the seam before issue 21)
    p, calls = _pusher(actor_version=0, answer_409=True)  # its heartbeat has not reported v30 yet
    try:
        p.sync(_info(1))
        _settle(p)
        assert calls == [1]
        assert p.delivered() == {"a0": -1}, "a refused push was booked as delivered"
        assert p.version_floor == 1
        assert p.sync(_info(1)) == 0 and p.sync(_info(2)) == 1  # the refused version is not resent, a newer one is
    finally:
        p.close()


def test_an_actor_reporting_a_newer_version_raises_the_floor_without_a_push() -> None:
    p, calls = _pusher(actor_version=30, answer_409=True)
    try:
        p.sync(_info(1))
        _settle(p)
        assert calls == [] and p.version_floor == 30
        assert next_version(1, p.version_floor) == 31
    finally:
        p.close()


def test_the_409_answer_names_the_version_the_actor_holds() -> None:
    # the heartbeat lags: the answer says whether the actor caught up to this very version or is ahead
    p, _ = _pusher(actor_version=0, answer_409=True, holds=4)
    try:
        p.sync(_info(4))
        _settle(p)
        assert p.delivered() == {"a0": 4} and p.version_floor == 0
    finally:
        p.close()
    p, _ = _pusher(actor_version=0, answer_409=True, holds=30)
    try:
        p.sync(_info(4))
        _settle(p)
        assert p.delivered() == {"a0": -1} and p.version_floor == 30
    finally:
        p.close()


def test_a_409_for_the_version_the_actor_already_has_is_a_delivery() -> None:
    # an earlier push of v5 timed out but landed: the registry shows v5, the retry gets 409 -> same weights
    p, _ = _pusher(actor_version=5, answer_409=True)
    try:
        p.sync(_info(5))
        _settle(p)
        assert p.version_floor == 0  # nothing ahead; and v5 is not pushed again (registry shows it)
    finally:
        p.close()


@pytest.mark.parametrize(
    ("ckpt_version", "published", "actors", "expected"),
    [
        (0, None, [], 0),  # a fresh run
        (0, 7, [], 8),  # crash before the first checkpoint / resume = never / wiped run dir, Redis kept
        (0, None, [0, 12], 13),  # Redis wiped too, an actor still holds v12
        (20, 20, [20], 20),  # the checkpoint's own export: same number, same weights
        (20, 23, [22], 24),  # crash after the checkpoint: v21..v23 were exported
    ],
)
def test_repair_version_never_reissues_a_number(
    ckpt_version: int, published: int | None, actors: list[int], expected: int
) -> None:
    pub = None if published is None else _info(published)
    assert repair_version(ckpt_version, pub, actors) == expected


def test_repair_version_steps_over_a_version_only_the_training_log_saw() -> None:
    """The chaos run's case: the learner died after logging step v1753 and before its export was published, the
    actor was down too; the restart resumed a checkpoint at v1738 and must not number its weights v1753 again."""
    records = [
        {"event": "start", "step": 0, "version": 0},
        {"event": "step", "step": 1720, "version": 1738, "items": [], "policy_versions": []},
        {"event": "checkpoint", "step": 1720, "version": 1738},
        {"event": "step", "step": 1735, "version": 1753, "items": [], "policy_versions": []},
        {"event": "step", "step": 1736},  # a record cut short by the SIGKILL: no version
    ]
    assert logged_version(records) == 1753 and logged_version([]) == 0
    assert repair_version(1738, _info(1752), [], logged=logged_version(records)) == 1754
    assert repair_version(1738, _info(1752), []) == 1753  # what the published record alone gave
    assert repair_version(1753, _info(1753), [1753], logged=1753) == 1753  # the checkpoint's own export


def test_next_version_steps_over_an_actor_ahead() -> None:
    assert next_version(4, 0) == 5
    assert next_version(4, 5) == 6
    assert next_version(4, 9) == 10


def test_rolled_back_items_are_the_steps_after_the_checkpoint() -> None:
    records = [
        {"event": "start", "step": 0},
        {"event": "step", "step": 1, "items": ["a"], "policy_versions": [0]},
        {"event": "checkpoint", "step": 1},
        {"event": "step", "step": 2, "items": ["b", "c"], "policy_versions": [1, 0]},
        {"event": "start", "step": 1},  # a restart that crashed before its first checkpoint
        {"event": "step", "step": 2, "items": ["d"], "policy_versions": [2]},
    ]
    assert rolled_back_items(records, resumed_step=1) == {"b": 1, "c": 0, "d": 2}
    assert rolled_back_items(records + [{"event": "checkpoint", "step": 2}], resumed_step=2) == {}
