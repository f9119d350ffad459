"""The paper's per-benchmark evaluation modes (`deploy.evaluation`): names -> greedy avg@1 or avg@k at T=1."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from deploy.cli import app
from deploy.evaluation import DEFAULT_SAMPLED_K, benchmark_specs, default_mode


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("math500", "greedy"), ("MATH-500", "greedy"), ("minerva_math", "greedy"), ("olympiadbench", "greedy"),
        ("champ", "greedy"), ("toy", "greedy"), ("gsm8k_test", "greedy"),
        ("aime24", "sampled"), ("AIME_2025", "sampled"), ("amc23", "sampled"), ("AMC", "sampled"),
    ],
)
def test_default_mode_by_benchmark_name(name: str, mode: str) -> None:
    m, k, temp = default_mode(name)
    assert m == mode
    assert (k, temp) == ((1, 0.0) if mode == "greedy" else (DEFAULT_SAMPLED_K, 1.0))


def test_specs_overrides_and_unique_names() -> None:
    specs = benchmark_specs(["data/math500.parquet", "data/aime24.jsonl", "other/math500.jsonl", "champ"])
    assert [s.name for s in specs] == ["math500", "aime24", "math500-2", "champ"]
    assert [(s.mode, s.k, s.temperature) for s in specs] == [
        ("greedy", 1, 0.0), ("sampled", 32, 1.0), ("greedy", 1, 0.0), ("greedy", 1, 0.0)
    ]
    # --k/--temperature change sampled benchmarks only; --mode forces every benchmark
    specs = benchmark_specs(["math500.parquet", "aime24.parquet"], k=4, temperature=0.6)
    assert [(s.mode, s.k, s.temperature) for s in specs] == [("greedy", 1, 0.0), ("sampled", 4, 0.6)]
    specs = benchmark_specs(["math500.parquet", "aime24.parquet"], mode="greedy")
    assert all((s.mode, s.k, s.temperature) == ("greedy", 1, 0.0) for s in specs)
    specs = benchmark_specs(["math500.parquet"], mode="sampled", k=8)
    assert (specs[0].mode, specs[0].k, specs[0].temperature) == ("sampled", 8, 1.0)


def test_eval_cli_rejects_bad_arguments_before_loading_a_model(tmp_path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(tmp_path)])
    assert res.exit_code != 0 and "at least one benchmark" in " ".join(res.output.split())
    res = runner.invoke(app, ["eval", str(tmp_path), "toy", "--mode", "beam"])
    assert res.exit_code != 0 and "--mode" in res.output
    # a bad data file fails with its name before any engine starts (fast: no vLLM import happens)
    bad = tmp_path / "aime24.jsonl"
    bad.write_text('{"problem": "x"}\n')
    res = runner.invoke(app, ["eval", str(tmp_path), str(bad)])
    assert res.exit_code == 2 and "no answer column" in " ".join(res.output.split())
