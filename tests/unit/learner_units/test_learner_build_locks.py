"""A compiled-op build lock left by a killed learner must not hang the next start (learner.engine)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from torch.utils.file_baton import FileBaton

from learner.engine import STALE_BUILD_LOCK_S, clear_stale_build_locks


def _killed_build(folder: Path, age_s: float) -> Path:
    """What a learner killed while torch built an op leaves: the build folder's baton, still taken."""
    folder.mkdir(parents=True)
    lock = folder / "lock"
    assert FileBaton(str(lock)).try_acquire()  # taken, and never released: the process died
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_a_stale_lock_is_removed_and_a_fresh_one_kept(tmp_path: Path) -> None:
    stale = _killed_build(tmp_path / "deepspeed_shm_comm", STALE_BUILD_LOCK_S + 60)
    fresh = _killed_build(tmp_path / "cpu_adam", 5)  # maybe another rank building now
    assert clear_stale_build_locks(tmp_path) == [stale]
    assert not stale.exists() and fresh.exists()
    # The next build takes the baton at once instead of waiting forever for a dead process.
    assert FileBaton(str(stale)).try_acquire()
    assert not FileBaton(str(fresh)).try_acquire()


def test_an_empty_or_missing_cache_is_fine(tmp_path: Path) -> None:
    assert clear_stale_build_locks(tmp_path) == []
    assert clear_stale_build_locks(tmp_path / "absent") == []
