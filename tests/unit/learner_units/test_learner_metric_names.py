"""One name per metric (learner/metrics.py): the learner's keys are what the dashboard records, what summary.json
reports and what the Grafana dashboard queries; the buffer-usage ratios have one formula."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from deploy.dashboard import Snapshot
from deploy.report import replay_summary
from deploy.run_dir import RunDir
from learner.metrics import (
    BATCH_REWARD_MEAN,
    GAUGES,
    NEVER_TRAINED_FRAC,
    REUSE_RATIO,
    VERSION_LAG_MAX,
    VERSION_LAG_MEAN,
    prometheus_name,
    replay_usage,
)

REPO = Path(__file__).resolve().parents[3]
GRAFANA = REPO / "deploy" / "grafana" / "dashboards" / "tbrm.json"


def test_prometheus_names_spell_out_the_unit() -> None:
    assert prometheus_name("step_time_s") == "tbrm_learner_step_seconds"
    assert prometheus_name("tokens_per_s") == "tbrm_learner_tokens_per_second"
    assert prometheus_name("push_latency_s") == "tbrm_learner_push_latency_seconds"
    assert prometheus_name("age_s_mean") == "tbrm_learner_age_seconds_mean"
    assert prometheus_name(BATCH_REWARD_MEAN) == "tbrm_learner_batch_reward_mean"
    assert prometheus_name("guard_skipped_steps") == "tbrm_learner_guard_skipped_steps"


def test_grafana_queries_only_gauges_the_learner_exports() -> None:
    exprs = [p["expr"] for panel in json.loads(GRAFANA.read_text())["panels"] for p in panel.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"tbrm_learner_\w+", e)}
    exported = {prometheus_name(k) for k in GAUGES} | {"tbrm_learner_running"}
    assert used and used <= exported, used - exported


def test_dashboard_records_the_learner_names() -> None:
    snap = Snapshot(
        wall_s=1.0, learner_metrics={BATCH_REWARD_MEAN: 0.5, VERSION_LAG_MEAN: 2.0, VERSION_LAG_MAX: 4.0,
                                     "reward_mean": 0.1, "age_versions_mean": 9.0},
        buffer={"inserts": 200, "samples": 300, "sampled_distinct": 150, "dropped_stale": 20},
    )  # fmt: skip
    rec = snap.record()
    assert rec[BATCH_REWARD_MEAN] == 0.5 and rec[VERSION_LAG_MEAN] == 2.0 and rec[VERSION_LAG_MAX] == 4.0
    assert rec[REUSE_RATIO] == 1.5 and rec[NEVER_TRAINED_FRAC] == 0.25
    assert not {"train_reward", "age_versions_mean", "reward_mean"} & set(rec)  # no second name, no guessing


def test_replay_usage_is_one_formula_for_dashboard_and_summary(tmp_path: Path) -> None:
    stats = {"inserts": 8, "samples": 12, "sampled_distinct": 6, "dropped_stale": 1}
    assert replay_usage(stats) == {"reuse_ratio": 1.5, "never_trained_frac": 0.25, "dropped_stale_frac": 0.125}
    assert replay_usage({"inserts": 0, "samples": 0}) == {}
    run = RunDir(tmp_path / "run")
    (run.path / "learner").mkdir()
    (run.path / "learner" / "metrics.jsonl").write_text(
        json.dumps({VERSION_LAG_MEAN: 1.0, "grad_clipped": 1.0}) + "\n"
        + json.dumps({VERSION_LAG_MEAN: 2.0, "grad_clipped": 0.0}) + "\n"
    )
    summary = replay_summary(run, stats)
    assert summary[REUSE_RATIO] == Snapshot(wall_s=0, buffer=stats).record()[REUSE_RATIO] == 1.5
    assert summary[VERSION_LAG_MEAN] == pytest.approx(1.5) and summary["grad_clip_frac"] == pytest.approx(0.5)
    assert "age_versions_mean" not in summary
