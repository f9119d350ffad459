"""`deploy.first_run.warm`: the caches a machine's first run would fill inside its budget are filled before it,
for real (DeepSpeed's op builder, vLLM's model registry), once per install and model."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from common.files import torch_extensions_dir
from deploy import first_run


def test_warm_fills_both_caches_once(toy_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    vllm_cache = tmp_path / "vllm"
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(vllm_cache))
    ext = torch_extensions_dir()  # the suite's shared op cache: compiled once per machine, as for the learner
    marker = first_run.marker_path(toy_model_dir, ext)
    existed = marker.exists()  # an earlier `tbrm up` of the suite warmed this install: measure from scratch
    marker.unlink(missing_ok=True)
    lines: list[str] = []
    assert first_run.warm(toy_model_dir, ext, say=lines.append), lines
    assert (ext / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").is_file()
    cached = list((vllm_cache / "modelinfos").glob("*Qwen2ForCausalLM*.json"))
    assert cached, f"vLLM cached no model inspection under {vllm_cache}"
    assert marker.exists()

    def no_subprocess(*a, **k):  # a second warm must not start anything
        raise AssertionError("warm ran its subprocess again")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert first_run.warm(toy_model_dir, ext, say=lines.append)
    if not existed:  # leave the shared cache as the test found it (the real vLLM cache was not filled here)
        marker.unlink()


def test_failure_is_reported_and_not_recorded(toy_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(first_run.sys, "executable", "/bin/false")  # the subprocess exits 1 at once
    lines: list[str] = []
    assert not first_run.warm(toy_model_dir, tmp_path, say=lines.append)
    assert any("failed" in line for line in lines), lines
    assert not first_run.marker_path(toy_model_dir, tmp_path).exists()


def test_marker_follows_the_model_architecture(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, arch in ((a, "Qwen2ForCausalLM"), (b, "LlamaForCausalLM")):
        d.mkdir()
        (d / "config.json").write_text(f'{{"architectures": ["{arch}"]}}')
    assert first_run.marker_path(a, tmp_path) != first_run.marker_path(b, tmp_path)
