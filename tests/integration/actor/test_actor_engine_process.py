"""vLLM's engine core in a process of its own (`engine_process=True`, the actor's default on GPUs).

Pushed tensors reach the engine-core process through one shared-memory segment (actor_service.vllm_worker); the
served weights must be exactly what the in-process engine serves for the same push, a failed reload must leave the
previous weights served, the segment must go with the engine, and vLLM's processes must not outlive an actor
killed with SIGKILL; the model runs in the engine core's process (no worker process beside it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from actor_helpers import REPO, hf_greedy

from actor_service.vllm_worker import SHM_DIR, SHM_PREFIX, clean_stale_segments


def _segments() -> set[str]:
    return {p.name for p in SHM_DIR.glob(f"{SHM_PREFIX}{os.getpid()}-*")}


def test_pushed_weights_are_served_as_the_in_process_engine_serves_them(process_engine, actor_engine,
                                                                        make_variant) -> None:
    from safetensors.torch import load_file

    variant = make_variant(81)
    tensors = load_file(str(variant / "model.safetensors"))
    assert "lm_head.weight" not in tensors  # tied: the engine adds the head, in the segment the embedding's bytes
    prompts = [process_engine.text_token_ids("the canary"), process_engine.text_token_ids("hello world")]
    before = process_engine.generate(prompts, temperature=0.0, max_tokens=12)

    process_engine.apply_weights(tensors, process_engine.version + 1)
    actor_engine.apply_weights(tensors, actor_engine.version + 1)
    served = process_engine.generate(prompts, temperature=0.0, max_tokens=12)
    in_process = actor_engine.generate(prompts, temperature=0.0, max_tokens=12)

    tokens = [g[0].token_ids for g in served.samples]
    assert tokens == hf_greedy(variant, prompts, 12) == [g[0].token_ids for g in in_process.samples]
    assert tokens != [g[0].token_ids for g in before.samples]
    assert served.version_start == served.version_end == process_engine.version
    ids = prompts[0] + tokens[0]
    assert process_engine.score(ids)[0] == pytest.approx(actor_engine.score(ids)[0], abs=1e-5)
    assert len(_segments()) == 1  # one segment, reused by every push


def test_failed_reload_in_the_engine_process_serves_the_previous_weights(process_engine, make_variant) -> None:
    import torch
    from safetensors.torch import load_file

    from actor_service.engine import WeightsApplyError

    good = make_variant(82)
    process_engine.update_weights(good / "model.safetensors", process_engine.version + 1)
    version = process_engine.version
    prompts = [process_engine.text_token_ids("hello world")]
    expected = hf_greedy(good, prompts, 10)
    bad = load_file(str(make_variant(83) / "model.safetensors"))
    bad["model.norm.weight"] = torch.empty(0)  # vLLM's loader fails on this one, after the layers before it

    def fail_halfway() -> None:  # past apply_weights' own checks: what it does when vLLM's loader fails
        try:
            process_engine._reload(bad)
        except Exception:  # noqa: BLE001  (the loader's error, raised again by vLLM's engine core)
            process_engine._restore()
            raise WeightsApplyError("restored") from None

    with pytest.raises(WeightsApplyError):
        process_engine._call(fail_halfway)
    served = process_engine.generate(prompts, temperature=0.0, max_tokens=10)
    assert [g[0].token_ids for g in served.samples] == expected
    assert process_engine.version == version


def test_segments_of_dead_actors_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live, other = (tmp_path / f"{SHM_PREFIX}{dead.pid}-ab", tmp_path / f"{SHM_PREFIX}{os.getpid()}-cd",
                          tmp_path / "something-else")
    for f in (stale, live, other):
        f.write_bytes(b"x")
    assert clean_stale_segments(tmp_path) == [stale]
    assert live.exists() and other.exists()


CHILD = """
import os, sys, time
sys.path.insert(0, {repo!r})
from actor_service.engine import ActorEngine
if __name__ == "__main__":
    engine = ActorEngine({model!r}, max_model_len=256, kv_cache_bytes=32 * 2**20, seed=0, threads=1,
                         engine_process=True)
    print("READY", flush=True)
    time.sleep(600)
"""


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    parents = {int(a): int(b) for a, b in (line.split() for line in out.splitlines())}
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for c, pp in parents.items():
            if pp == p and c not in found:
                found.add(c)
                todo.append(c)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_engine_processes_die_with_an_actor_killed_by_sigkill(tiny_model_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(REPO), model=str(tiny_model_dir)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        assert proc.stdout is not None
        assert any(line.strip() == "READY" for line in proc.stdout), "the engine did not start"  # after vLLM's log
        names = {c: Path(f"/proc/{c}/comm").read_text().strip() for c in _children(proc.pid)}
        vllm = {c for c, name in names.items() if name.startswith("VLLM::")}
        # One: the engine core runs the model itself (no worker process for it to poll, see ActorEngine._build).
        assert [names[c] for c in vllm] == ["VLLM::EngineCor"], names
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(c) for c in vllm):
        time.sleep(0.2)
    assert not any(_alive(c) for c in vllm), "vLLM's engine processes outlived the actor"
