"""Experiment tracking: TensorBoard event files written by the learner's and the launcher's trackers, read back."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from deploy.tracking import ClusterTracker, child_env
from learner.tracking import MetricsLog, Tracker, TrackingError, read_scalars, read_texts


def test_metrics_log_writes_jsonl_and_step_scalars(tmp_path: Path) -> None:
    tracker = Tracker(["tensorboard"], tmp_path, run_name="r", config={"lr": 1e-4, "loss": {"kind": "tbrm"}})
    log = MetricsLog(tmp_path / "metrics.jsonl", tracker)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 10.0 / step, "lr": 1e-4, "grad_norm": None, "note": "x", "ok": True})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    scalars = read_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(1, 10.0), (2, 5.0), (3, pytest.approx(10 / 3))]
    assert [s for s, _ in scalars["train/lr"]] == [1, 2, 3]
    assert "train/grad_norm" not in scalars and "train/note" not in scalars and "train/ok" not in scalars
    assert '"kind": "tbrm"' in read_texts(tmp_path / "tensorboard")["config"]


def test_cluster_tracker_logs_evals_snapshots_and_summary(tmp_path: Path) -> None:
    ct = ClusterTracker(["tensorboard"], tmp_path, config_text="[learner]\nlr = 3e-05\n")
    ct.on_eval({"kind": "initial", "learner_step": 0, "accuracy": 0.3, "correct": 60, "n": 200, "policy_version": 0,
                "examples": [{"q": 1}]})  # fmt: skip
    for step in (None, 1, 1, 2):  # polls repeat steps: one point per new step
        ct.on_snapshot({"t": 1.0, "learner_step": step, "tokens_per_s": 100.0 + (step or 0), "buffer_size": 5,
                        "actor_versions": {"a": 1}, "learner": {"loss": 1.0}})  # fmt: skip
    ct.on_eval({"kind": "final", "learner_step": 2, "accuracy": 0.7, "correct": 140, "n": 200, "policy_version": 2})
    ct.on_summary({"learner_steps": 2, "final_accuracy": 0.7, "exit_reason": "steps"})
    ct.close()
    scalars = read_scalars(tmp_path / "tensorboard" / "cluster")
    assert scalars["eval/accuracy"] == [(0, pytest.approx(0.3)), (2, pytest.approx(0.7))]
    assert scalars["cluster/tokens_per_s"] == [(1, 101.0), (2, 102.0)]
    assert scalars["summary/final_accuracy"] == [(2, pytest.approx(0.7))]
    texts = read_texts(tmp_path / "tensorboard")
    assert "lr = 3e-05" in texts["config"] and '"exit_reason": "steps"' in texts["summary"]
    assert any("tensorboard --logdir" in line for line in ct.how_to_open())


def test_unknown_or_missing_trackers_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(TrackingError, match="unknown tracker"):
        Tracker(["tensorbored"], tmp_path, run_name="r")
    for name, module in (("wandb", "wandb"), ("mlflow", "mlflow")):
        if importlib.util.find_spec(module) is not None:
            continue  # installed here: nothing to refuse
        with pytest.raises(TrackingError, match=rf"{name}.*not installed.*pip install"):
            Tracker([name], tmp_path, run_name="r")
    assert Tracker([], tmp_path, run_name="r").backends == {}
    assert child_env(["mlflow"], tmp_path)["MLFLOW_TRACKING_URI"].startswith("file://")


def test_a_failing_backend_is_dropped_not_raised(tmp_path: Path) -> None:
    tracker = Tracker(["tensorboard"], tmp_path, run_name="r")
    tracker.backends["tensorboard"].writer.close()

    class Broken:
        def log(self, *a: object) -> None:
            raise OSError("disk full")

    tracker.backends["broken"] = Broken()  # type: ignore[assignment]
    tracker.log({"x": 1.0}, step=1)
    assert "broken" not in tracker.backends



def test_event_files_match_the_reference_protobuf(tmp_path: Path) -> None:
    """Our standard-library writer against TensorBoard's schema (tensorboardX ships the compiled protobufs)."""
    from learner.tb_events import EventWriter, crc32c, records

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    w = EventWriter(tmp_path)
    w.scalars({"train/loss": 1.5, "train/lr": 1e-4}, step=3)
    w.text("config", "lr = 1e-4")
    w.close()
    pb = pytest.importorskip("tensorboardX.proto.event_pb2")
    events = [pb.Event.FromString(r) for r in records(w.path)]
    assert events[0].file_version == "brain.Event:2"
    assert events[1].step == 3 and [(v.tag, v.simple_value) for v in events[1].summary.value] == [
        ("train/loss", 1.5), ("train/lr", pytest.approx(1e-4))]  # fmt: skip
    text = events[2].summary.value[0]
    assert text.tag == "config/text_summary" and text.metadata.plugin_data.plugin_name == "text"
    assert text.tensor.string_val == [b"lr = 1e-4"] and text.tensor.dtype == 7
    from tensorboardX.record_writer import (
        RecordWriter,  # the reference framing (masked CRC-32C) byte for byte
    )

    ref = tmp_path / "ref"
    rw = RecordWriter(str(ref))
    for r in records(w.path):
        rw.write(r)
    rw.close()
    assert ref.read_bytes() == w.path.read_bytes()
