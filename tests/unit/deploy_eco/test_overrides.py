"""Dotted overrides of any setting (`tbrm up learner.lr=3e-5 --actor.temperature 1.0`) and every CLI's --help."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from deploy.cli import app, resolve_up
from deploy.run_config import dump_toml, parse_overrides

REPO = Path(__file__).resolve().parents[3]


def test_dotted_overrides_reach_every_section_typed() -> None:
    run, cfg = resolve_up(
        None, {"minutes": 1.0},
        ["learner.lr=3e-5", "--actor.temperature", "1.0", "learner.loss.beta=0.02", "table.max_staleness_versions=4",
         "reward.scores.incorrect=-1", "--learner.sync", "buffer.rate_window_s=30", "run.eval_interval_s=5",
         "learner.schedule.min-lr-ratio=0.5", "learner.report_to=[]"],
    )  # fmt: skip
    assert cfg["learner"]["lr"] == 3e-5 and isinstance(cfg["learner"]["lr"], float)
    assert cfg["actor"]["temperature"] == 1.0 and cfg["learner"]["loss"] == {"kind": "tbrm", "beta": 0.02,
                                                                             "calibrated": False}
    # [table] is copied into every service that opens the table
    assert cfg["buffer"]["table"]["max_staleness_versions"] == 4 == cfg["learner"]["table"]["max_staleness_versions"]
    assert cfg["reward"]["scores"] == {"incorrect": -1.0} and cfg["buffer"]["rate_window_s"] == 30.0
    assert cfg["learner"]["sync"] is True and cfg["learner"]["report_to"] == []
    # a nested override keeps the config file's other fields of that model (the toy's cosine schedule)
    toy = tomllib.loads((REPO / "configs" / "toy.toml").read_text())["learner"]["schedule"]
    assert cfg["learner"]["schedule"] == {**toy, "min_lr_ratio": 0.5} and toy["min_lr_ratio"] != 0.5
    assert run.minutes == 1.0 and run.eval_interval_s == 5.0
    written = tomllib.loads(dump_toml(cfg))  # what config.toml will hold: typed values, not strings
    assert written["learner"]["lr"] == 3e-5 and written["table"]["max_staleness_versions"] == 4


def test_a_tagged_model_is_replaced_by_its_kind() -> None:
    _, cfg = resolve_up(None, {}, ["learner.loss.kind=grpo", "learner.loss.clip_eps=0.1"])
    assert cfg["learner"]["loss"]["kind"] == "grpo" and cfg["learner"]["loss"]["clip_eps"] == 0.1
    assert "beta" not in cfg["learner"]["loss"]


def test_bad_overrides_are_refused_with_the_field_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.BadParameter, match="lr"):
        resolve_up(None, {}, ["learner.lr=-1"])
    with pytest.raises(typer.BadParameter, match="temperature"):
        resolve_up(None, {}, ["actor.temperature=hot"])
    with pytest.raises(SystemExit) as e:
        parse_overrides(["learner.lrr=1"])
    assert e.value.code == 2 and "--learner.lrr" in capsys.readouterr().err


def test_tbrm_help_and_settings_list_every_setting_with_docs() -> None:
    runner = CliRunner(env={"COLUMNS": "200"})
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0 and "Trajectory Bellman Residual" in top.output and "export" in top.output
    up = runner.invoke(app, ["up", "--help"])
    assert up.exit_code == 0 and "SECTION.FIELD=VALUE" in up.output
    listing = runner.invoke(app, ["settings"])
    assert listing.exit_code == 0
    for flag, doc in (("--learner.lr", "Peak learning rate"), ("--actor.temperature", ""), ("--table.max-size", ""),
                      ("--reward.scores.incorrect", "does not match"), ("--run.report-to", "TensorBoard")):
        assert flag in listing.output and doc in listing.output, flag


@pytest.mark.parametrize(
    ("module", "flags"),
    [
        ("buffer", ("--table.max-size", "--redis-url", "--config", "Socket timeout of every Redis call")),
        ("reward", ("--workers", "--scores.incorrect", "--config", "hard")),
        ("learner", ("--lr", "--loss.beta", "--schedule.kind", "--report-to", "Peak learning rate of AdamW")),
        ("actor_service", ("--model-dir", "--temperature", "--table.max-size", "--sync", "--config")),
    ],
)
def test_every_service_help_lists_its_settings_with_docs(module: str, flags: tuple[str, ...]) -> None:
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for f in flags:
        assert f in out.stdout, f


def test_service_cli_parses_dotted_and_json_nested_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from learner.settings import LearnerSettings

    monkeypatch.delenv("TBRM_RUN_CONFIG", raising=False)
    monkeypatch.setenv("TBRM_LEARNER_BATCH_SIZE", "32")
    toml = tmp_path / "run.toml"
    toml.write_text('[learner]\nlr = 1e-3\nmicro_batch_size = 4\n')
    s = LearnerSettings.from_cli(
        ["--config", str(toml), "--lr", "2e-5", "--loss.kind", "tbrm", "--loss.beta", "0.05",
         "--table", '{"max_size": 77}', "--sync"], "python -m learner", "test",
    )  # fmt: skip
    assert s.lr == 2e-5 and s.loss.beta == 0.05 and s.table is not None and s.table.max_size == 77 and s.sync
    assert s.batch_size == 32 and s.micro_batch_size == 4  # env and run TOML still apply below the command line
