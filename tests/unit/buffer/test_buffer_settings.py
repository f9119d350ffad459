"""Buffer service settings: precedence CLI > env > run TOML > defaults, shared env names, --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from buffer.settings import BufferSettings

REPO = Path(__file__).resolve().parents[3]


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('[buffer]\nport = 9100\nprompt_queue = "fromtoml"\n[buffer.table]\nmax_size = 123\n')
    monkeypatch.setenv("TBRM_RUN_CONFIG", str(toml))
    s = BufferSettings()
    assert (s.port, s.prompt_queue, s.table.max_size) == (9100, "fromtoml", 123)
    monkeypatch.setenv("TBRM_BUFFER_PORT", "9200")
    monkeypatch.setenv("TBRM_REDIS_URL", "redis://example:1/0")
    monkeypatch.setenv("TBRM_AUTH_TOKEN", "tok")
    s = BufferSettings()
    assert s.port == 9200 and s.redis_url == "redis://example:1/0" and s.auth_token.get_secret_value() == "tok"
    assert BufferSettings(port=9300).port == 9300


def test_unknown_and_bad_values_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TBRM_RUN_CONFIG", raising=False)
    with pytest.raises(ValidationError, match="nonsense"):
        BufferSettings(nonsense=1)
    with pytest.raises(ValidationError, match="port"):
        BufferSettings(port=0)


def test_help_lists_options() -> None:
    out = subprocess.run([sys.executable, "-m", "buffer", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    for opt in ("--host", "--port", "--redis-url", "--export-dir"):
        assert opt in out
