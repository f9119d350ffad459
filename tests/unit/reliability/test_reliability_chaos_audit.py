"""The chaos audit (bench/chaos_audit.py) on hand-made records: it must flag what it promises to flag."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from bench import chaos_audit as audit


def _step(step: int, version: int, items: list[str], t: float) -> dict:
    return {"event": "step", "step": step, "version": version, "items": items, "time": t}


def _ckpt(step: int, version: int, t: float) -> dict:
    return {"event": "checkpoint", "step": step, "version": version, "time": t}


def _start(step: int, version: int, t: float, tag: str | None = "x") -> dict:
    return {"event": "start", "step": step, "version": version, "resumed_from": tag, "time": t}


# A learner trains a,b (ckpt), then c (rolled back by a kill), restarts at the checkpoint and trains c again.
ROLLBACK = [_start(0, 0, 0.0, None), _step(1, 1, ["a"], 1), _step(2, 2, ["b"], 2), _ckpt(2, 2, 3),
            _step(3, 3, ["c"], 4), _start(2, 4, 10), _step(3, 5, ["c"], 11), _ckpt(3, 5, 12)]


def test_a_rolled_back_step_retrained_is_not_a_duplicate() -> None:
    tr = audit.replay_training_log(ROLLBACK)
    check, facts = audit.audit_trained_once(tr, [], everysec=True)
    assert check.ok, check.detail
    assert facts["effective_trainings"] == 3 and facts["rolled_back_trainings"] == 1
    assert audit.audit_learner_versions(ROLLBACK).ok


def test_a_checkpointed_item_trained_again_is_flagged() -> None:
    recs = ROLLBACK + [_step(4, 6, ["a"], 20), _ckpt(4, 6, 21)]
    check, _ = audit.audit_trained_once(audit.replay_training_log(recs), [], everysec=True)
    assert not check.ok
    # ... unless a Redis kill under everysec fell while "a" was in flight (its ack may be lost)
    check, facts = audit.audit_trained_once(audit.replay_training_log(recs), [3.5], everysec=True)
    assert check.ok and facts["twice_redis_aof_everysec_loss"] == 1
    check, _ = audit.audit_trained_once(audit.replay_training_log(recs), [3.5], everysec=False)
    assert not check.ok


def test_a_crash_between_checkpoint_and_ack_is_a_documented_duplicate() -> None:
    recs = [_start(0, 0, 0.0, None), _step(1, 1, ["a"], 1), _ckpt(1, 1, 2), _start(1, 2, 5), _step(2, 3, ["a"], 6),
            _ckpt(2, 3, 7)]
    check, facts = audit.audit_trained_once(audit.replay_training_log(recs), [], everysec=False)
    assert check.ok and facts["twice_crash_between_checkpoint_and_ack"] == 1


def test_versions_going_back_or_reissued_are_flagged() -> None:
    assert not audit.audit_learner_versions(ROLLBACK[:5] + [_start(2, 2, 10), _step(3, 3, ["c"], 11)]).ok
    assert not audit.audit_learner_versions([_step(1, 5, [], 1), _step(2, 5, [], 2)]).ok
    polls = [{"t": 1, "version": 3, "sha256": "x"}, {"t": 2, "version": 3, "sha256": "y"}]
    assert not audit.audit_published(polls, [], everysec=True).ok
    back = [{"t": 1, "version": 4, "sha256": "x"}, {"t": 5, "version": 3, "sha256": "y"}]
    assert not audit.audit_published(back, [], everysec=True).ok
    assert audit.audit_published(back, [4.0], everysec=True).ok  # the Redis kill lost the last second


def test_books_stranded_and_actor_versions() -> None:
    stats = {"inserts": 10, "size": 3, "leased": 0, "acks": 5, "removed": 1, "dropped_stale": 1,
             "extra": {"consumed": 5}}
    assert audit.audit_books(stats).ok
    assert not audit.audit_books({**stats, "inserts": 11}).ok
    assert audit.audit_stranded({"l": 105.0}, {"c": 110.0}, 100.0, 30.0, 30.0, 0).ok
    assert not audit.audit_stranded({"l": 1e9}, {}, 100.0, 30.0, 30.0, 0).ok
    assert not audit.audit_stranded({}, {}, 100.0, 30.0, 30.0, 2).ok
    metrics = [{"actor_versions": {"actor-0": 5}, "restarts": {"actor-0": 0}},
               {"actor_versions": {"actor-0": 0}, "restarts": {"actor-0": 1}},  # restarted: base weights
               {"actor_versions": {"actor-0": 7}, "restarts": {"actor-0": 1}}]
    assert audit.audit_actor_versions(metrics).ok
    assert not audit.audit_actor_versions(metrics + [{"actor_versions": {"actor-0": 6},
                                                      "restarts": {"actor-0": 1}}]).ok


def test_the_chaos_port_picker_takes_the_launchers_call(tmp_path: Path) -> None:
    """bench/chaos.py replaces `deploy.launcher.pick_ports`: it must accept the launcher's arguments and hold the
    ports it returns in the launcher's reservations (a stale signature once broke `make chaos` at start-up)."""
    import inspect

    from bench import chaos
    from deploy.ports import PortReservations, pick_ports

    assert list(inspect.signature(chaos._random_ports).parameters) == list(inspect.signature(pick_ports).parameters)
    held = PortReservations(tmp_path)
    ports = chaos._random_ports(2, held, defaults=False)
    wanted = [ports.redis, ports.reward, ports.buffer, ports.learner, ports.actor_base, ports.actor_base + 1]
    assert wanted == list(range(ports.redis, ports.redis + 6)) and ports.redis < 32768
    assert set(wanted) <= set(held.files)
    held.release()

