"""`tbrm eval MODEL DATA`: a real in-process vLLM engine on an HF folder, graded with the reward grader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from buffer.data import write_dataset
from buffer.schema import Prompt


def test_eval_cli_on_a_dataset_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "data.parquet"
    prompts = [
        Prompt(prompt_id=f"p{i}", messages=[{"role": "user", "content": f"What is {i}+1?"}], gold=str(i + 1))
        for i in range(6)
    ]
    write_dataset(prompts, data)
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-c", "from deploy.cli import app; app()", "eval", str(tiny_model_dir), str(data),
         "--k", "2", "--max-tokens", "8", "--output", str(out)],
        capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "greedy accuracy" in proc.stdout and "avg@2" in proc.stdout
    res = json.loads(out.read_text())
    assert res["n"] == 6 and res["k"] == 2
    # a random-weights model answers nothing: 0 correct, and the grader saw its (boxless) outputs
    assert res["correct"] == 0 and res["avg_at_k"] == 0.0
    assert all(e["status"] in ("no_answer", "incorrect") for e in res["examples"])


def test_eval_model_grades_correct_answers(tmp_path: Path) -> None:
    # The grading path alone: the same grader as the reward service marks a right boxed answer correct.
    from deploy.evaluation import _grade_local

    assert _grade_local("12+30=42. \\boxed{42}", "42") == "correct"
    assert _grade_local("\\boxed{41}", "42") == "incorrect"
    assert _grade_local("no box here", "42") == "no_answer"
