"""Run config resolution (configs/toy.toml <- --config <- CLI flags), the TOML writer, the run directory, plots."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from deploy.report import make_plots, version_lags
from deploy.run_config import DEFAULT_CONFIG, dump_toml, resolve
from deploy.run_dir import RunDir, Summary, read_jsonl


def test_default_config_is_valid_for_every_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, cfg = resolve()
    assert run.actors >= 1 and run.minutes == 5.0
    path = tmp_path / "config.toml"
    path.write_text(dump_toml(cfg))
    assert tomllib.loads(path.read_text()) == cfg  # the writer round-trips
    monkeypatch.setenv("TBRM_RUN_CONFIG", str(path))
    for k in list(os.environ):
        if k.startswith(("TBRM_ACTOR_", "TBRM_LEARNER_")):
            monkeypatch.delenv(k)
    from actor_service.settings import ActorSettings
    from learner.settings import LearnerSettings

    learner, actor = LearnerSettings(), ActorSettings()
    # the replay table is written once ([table]) and reaches every user identically
    assert learner.table == actor.table
    assert learner.table.max_times_sampled == 1
    assert learner.loss.kind == "tbrm" and learner.lr == pytest.approx(1e-4)


def test_overrides_sync_loss_steps(tmp_path: Path) -> None:
    user = tmp_path / "user.toml"
    user.write_text('[run]\nactors = 3\n[learner]\nlr = 1e-4\n[learner.loss]\nkind = "tbrm"\nbeta = 0.02\n')
    run, cfg = resolve(user, {"run": {"sync": True, "steps": 7}})
    assert run.actors == 3 and run.sync and run.steps == 7
    assert cfg["learner"]["lr"] == 1e-4 and cfg["learner"]["loss"]["beta"] == 0.02
    assert cfg["learner"]["sync"] and cfg["actor"]["sync"] and cfg["learner"]["max_steps"] == 7
    # sync generates one learner batch per version (the toy's 256 sequences in flight would be mostly discarded)
    assert cfg["actor"]["prompts_per_batch"] * cfg["actor"].get("n_samples_per_prompt", 1) == 16
    _, async_cfg = resolve(user, {"run": {"steps": 7}})
    assert async_cfg["actor"]["prompts_per_batch"] == 256
    _, grpo = resolve(None, {"run": {"loss": "grpo"}})
    assert grpo["learner"]["loss"] == {"kind": "grpo"}
    # GRPO needs groups: 256 x 1 becomes 64 prompts x 4 samples (same sequences in flight)
    assert grpo["actor"]["n_samples_per_prompt"] == 4 and grpo["actor"]["prompts_per_batch"] == 64
    _, centered = resolve(None, {"learner": {"loss": {"centered": True}}})  # centered TBRM compares groups too
    assert centered["actor"]["n_samples_per_prompt"] == 4 and centered["actor"]["prompts_per_batch"] == 64


def test_batch_shapes_use_the_settings_defaults_not_guesses() -> None:
    """Keys a config leaves out count with the services' own defaults (ActorSettings, LearnerSettings)."""
    from actor_service.settings import ActorSettings

    per_prompt = ActorSettings.model_fields["n_samples_per_prompt"].default
    prompts = ActorSettings.model_fields["prompts_per_batch"].default
    _, cfg = resolve(None, {"run": {"sync": True}, "learner": {"batch_size": 8}}, base_file=None)
    assert cfg["actor"]["prompts_per_batch"] * per_prompt <= 8  # sync: one learner batch per version
    _, cfg = resolve(None, {"learner": {"loss": {"kind": "grpo"}}, "actor": {"n_samples_per_prompt": 1}},
                     base_file=None)  # fmt: skip
    assert cfg["actor"] == {"n_samples_per_prompt": 4, "prompts_per_batch": max(1, prompts // 4)}


def test_deep_merge_replaces_a_tagged_value_of_another_kind() -> None:
    from deploy.run_config import deep_merge

    base = {"learner": {"lr": 1.0, "schedule": {"kind": "cosine", "decay_steps": 5}}}
    assert deep_merge(base, {"learner": {"schedule": {"kind": "constant"}}}) == {
        "learner": {"lr": 1.0, "schedule": {"kind": "constant"}}}
    assert deep_merge(base, {"learner": {"schedule": {"kind": "cosine", "decay_steps": 9}}}) == {
        "learner": {"lr": 1.0, "schedule": {"kind": "cosine", "decay_steps": 9}}}


def test_bad_configs_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nactorz = 2\n")
    with pytest.raises(ValueError, match="actorz"):
        resolve(bad)
    bad.write_text("[nonsense]\nx = 1\n")
    with pytest.raises(ValueError, match="unknown config sections"):
        resolve(bad)
    bad.write_text("[run\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        resolve(bad)
    with pytest.raises(ValueError, match="does not exist"):
        resolve(tmp_path / "missing.toml")
    assert DEFAULT_CONFIG.exists()


def test_run_dir_records_and_plots(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    for step in range(1, 11):
        rd.append_metrics({"wall_s": step * 2.0, "learner_step": step, "batch_reward_mean": step / 10,
                           "version_lag_mean": step % 3})
        rd.append_metrics({"wall_s": step * 2.0 + 1, "learner_step": step, "batch_reward_mean": step / 10,
                           "version_lag_mean": step % 3})
    for step, acc in ((0, 0.3), (5, 0.6), (10, 0.9)):
        rd.append_eval({"learner_step": step, "wall_s": step * 2.0, "accuracy": acc})
    with rd.metrics_path.open("a") as f:
        f.write('{"torn": ')  # a killed run leaves a partial line: readers skip it
    assert len(read_jsonl(rd.metrics_path)) == 20
    assert sorted(version_lags(rd.read_metrics())) == sorted(float(s % 3) for s in range(1, 11))
    files = make_plots(rd)
    names = {p.name for p in files}
    assert {"accuracy_reward_vs_step.png", "accuracy_reward_vs_time.png", "version_lag_hist.png"} <= names
    for p in files:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    rd.write_summary(Summary(initial_accuracy=0.3, final_accuracy=0.9, learner_steps=10))
    data = json.loads(rd.summary_path.read_text())
    assert data["final_accuracy"] == 0.9 and data["learner_steps"] == 10


def test_dashboard_renders_live_and_plain() -> None:
    from rich.console import Console

    from deploy.dashboard import ActorView, Dashboard, Snapshot, plain_line, render

    snap = Snapshot(
        wall_s=42.0, learner_step=7, learner_version=7, learner_state="running",
        learner_metrics={"batch_reward_mean": 0.625, "version_lag_mean": 1.5, "loss": 12.5},
        actors=[ActorView("actor-0", "http://x", policy_version=6, tokens_per_s=1500.0, trajectories=160)],
        buffer={"size": 40, "inserts": 200, "samples": 112, "acks": 112, "leased": 0}, accuracy=0.7,
        initial_accuracy=0.35,
    )  # fmt: skip
    console = Console(record=True, width=140, force_terminal=True)
    console.print(render(snap))
    text = console.export_text()
    assert "+35.0 pts" in text and "actor-0" in text and "0.625" in text
    line = plain_line(snap)
    assert "step=7" in line and "actor-0=v6" in line and "acc=0.700" in line
    rec = snap.record()
    assert rec["batch_reward_mean"] == 0.625 and rec["version_lag_mean"] == 1.5 and rec["buffer_acks"] == 112
    # not a terminal: plain lines, at most one per interval
    import io

    buf = io.StringIO()
    dash = Dashboard(Console(file=buf, width=200), plain_every_s=10)
    with dash:
        dash.show(snap)
        dash.show(Snapshot(wall_s=45.0))
        dash.show(Snapshot(wall_s=53.0))
    assert not dash.live_mode and buf.getvalue().count("step=") == 2
