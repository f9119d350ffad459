"""End to end: `tbrm up` with 2 actors and a few learner steps, as real processes on loopback.

Checks what issue 7 asks of a short cluster run: trajectories flow into the buffer, the learner's leases are
acked, the policy version advances on BOTH actors, held-out evaluation runs, no service logs an error, and the
shutdown leaves no process and no listening port behind. Uses the tiny random-weights model (the flow, not the
learning, is under test; the learning is `make up` / bench/cluster_bench.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.supervisor import port_is_listening

REPO = Path(__file__).resolve().parents[2]
STEPS = 4

# Lines that mean a service failed. uvicorn/vLLM/DeepSpeed INFO/WARNING lines are fine.
ERROR_LINE = re.compile(r"(^|\s)(ERROR|CRITICAL)(\s|:|\])|Traceback \(most recent call last\)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    tmp = tmp_path_factory.mktemp("cluster")
    cfg = tmp / "e2e.toml"
    cfg.write_text(
        f"""
[run]
eval_interval_s = 20.0
toy_train_size = 2000
toy_test_size = 32
epochs = 2
health_timeout_s = 240.0
final_sync_timeout_s = 30.0
[table]
max_size = 512
[table.rate_limiter]
min_size_to_sample = 8
samples_per_insert = 1.0
error_buffer = 32.0
[actor]
model_dir = "{tiny_model_dir}"
prompts_per_batch = 8
max_tokens = 12
[learner]
model_path = "{tiny_model_dir}"
batch_size = 8
micro_batch_size = 8
checkpoint_interval_steps = 2
"""
    )
    run_dir = tmp / "run"
    env = {**os.environ, "TERM": "dumb"}
    env.pop("TBRM_AUTH_TOKEN", None)
    proc = subprocess.run(
        [sys.executable, "-c", "from deploy.cli import app; app()", "up", "--actors", "2", "--steps", str(STEPS), "--minutes", "4",
         "--config", str(cfg), "--run-dir", str(run_dir), "--no-dashboard"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    return run_dir, proc


def test_run_succeeds_and_reports(cluster_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    run_dir, proc = cluster_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ok"] is True
    assert summary["learner_steps"] >= STEPS
    assert summary["policy_version"] >= STEPS
    assert summary["initial_accuracy"] is not None and summary["final_accuracy"] is not None
    assert "held-out greedy accuracy" in proc.stdout
    for key, acc in (("initial_by_kind", "initial_accuracy"), ("final_by_kind", "final_accuracy")):
        tallies = summary[key]  # [correct, problems] per kind of toy problem: they add up to the accuracy
        assert set(tallies) <= {"add", "add carry", "sub", "sub borrow"} and sum(n for _, n in tallies.values()) == 32
        assert sum(c for c, _ in tallies.values()) == round(32 * summary[acc])
    assert "by kind (start -> end)" in proc.stdout
    for name in ("config.toml", "metrics.jsonl", "eval.jsonl", "run.json"):
        assert (run_dir / name).stat().st_size > 0, name
    assert (run_dir / "plots" / "accuracy_reward_vs_step.png").exists()
    assert (run_dir / "plots" / "version_lag_hist.png").exists()


def test_trajectories_flow_and_leases_are_acked(cluster_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    run_dir, _ = cluster_run
    buf = json.loads((run_dir / "summary.json").read_text())["buffer"]
    batch = 8
    assert buf["inserts"] >= STEPS * batch
    assert buf["samples"] >= STEPS * batch
    assert buf["acks"] >= STEPS * batch  # every trained batch was acked after its optimizer step
    assert buf["leased"] == 0  # nothing left out on a lease at the end
    # both actors contributed trajectories
    last = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()][-1]
    assert all(n and n > 0 for n in last["actor_trajectories"].values()), last["actor_trajectories"]
    assert len(last["actor_trajectories"]) == 2


def test_versions_advance_on_both_actors(cluster_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    run_dir, _ = cluster_run
    summary = json.loads((run_dir / "summary.json").read_text())
    versions = summary["actor_versions"]
    assert set(versions) == {"actor-0", "actor-1"}
    assert all(v is not None and v >= 1 for v in versions.values()), versions
    assert versions["actor-0"] == summary["policy_version"]  # the final eval ran on the last weights
    evals = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines() if x.strip()]
    assert evals[0]["kind"] == "initial" and evals[0]["policy_version"] == 0
    assert evals[-1]["kind"] == "final" and evals[-1]["policy_version"] == summary["policy_version"]


def test_no_service_logged_an_error(cluster_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    run_dir, _ = cluster_run
    logs = sorted((run_dir / "logs").glob("*.log"))
    assert {p.stem for p in logs} >= {"redis", "reward", "buffer", "actor-0", "actor-1", "learner"}
    bad = {p.name: [ln for ln in p.read_text(errors="replace").splitlines() if ERROR_LINE.search(ln)][:5] for p in logs}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, bad


def test_clean_shutdown(cluster_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    run_dir, _ = cluster_run
    info = json.loads((run_dir / "run.json").read_text())
    deadline = time.monotonic() + 5
    ports = [p["port"] for p in info["processes"]]
    while time.monotonic() < deadline and any(port_is_listening(p) for p in ports):
        time.sleep(0.2)
    assert not [p for p in ports if port_is_listening(p)]
    pids = info.get("pids", {})
    assert pids and not [n for n, pid in pids.items() if _alive(pid)]
    for log in (run_dir / "logs").glob("*.log"):
        assert "stopped, status" in log.read_text(errors="replace").splitlines()[-1], log.name
