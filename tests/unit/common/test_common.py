"""The shared helpers of `common/`: body limit (declared and streamed, exempt paths, message), run-TOML reading
for every service's settings (the reward service included), `$TBRM_HOME`, file digests."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from buffer.settings import BufferSettings
from common.body_limit import BodyLimit
from common.files import file_sha256, tbrm_home, toy_model_dir
from common.settings import run_toml_section
from reward.settings import RewardSettings


def _client(**kw: object) -> TestClient:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"n": len(await request.body())}

    @app.post("/big")
    async def big(request: Request) -> dict[str, int]:
        return {"n": len(await request.body())}

    app.add_middleware(BodyLimit, limit=100, **kw)
    return TestClient(app)


def test_body_limit_declared_streamed_and_exempt() -> None:
    c = _client(exempt_paths={"/big"}, detail="too big for this one")
    assert c.post("/echo", content=b"x" * 100).json() == {"n": 100}
    r = c.post("/echo", content=b"x" * 101)
    assert r.status_code == 413 and r.json() == {"detail": "too big for this one"}

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams
        yield from (b"x" * 60, b"x" * 60)

    r = c.post("/echo", content=chunks())
    assert r.status_code == 413 and r.json() == {"detail": "too big for this one"}
    assert c.post("/big", content=b"x" * 1000).json() == {"n": 1000}
    assert _client().post("/echo", content=b"x" * 101).json() == {"detail": "request body over 100 bytes"}


def test_every_service_reads_its_run_toml_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('[reward]\nworkers = 3\n[buffer]\nport = 9002\nprompt_queue = "q"\n')
    monkeypatch.setenv("TBRM_RUN_CONFIG", str(toml))
    assert run_toml_section("reward") == {"workers": 3} and run_toml_section("absent") == {}
    assert RewardSettings().workers == 3
    assert (BufferSettings().port, BufferSettings().prompt_queue) == (9002, "q")
    monkeypatch.setenv("TBRM_RUN_CONFIG", str(tmp_path / "missing.toml"))
    for cls in (RewardSettings, BufferSettings):
        with pytest.raises(ValueError, match="does not exist"):
            cls()
    toml.write_text("reward = 1\n")
    monkeypatch.setenv("TBRM_RUN_CONFIG", str(toml))
    with pytest.raises(ValueError, match="must be a table"):
        RewardSettings()


def test_tbrm_home_and_file_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TBRM_HOME", str(tmp_path / "home"))
    assert tbrm_home() == tmp_path / "home" and toy_model_dir() == tmp_path / "home" / "models" / "toy"
    monkeypatch.delenv("TBRM_HOME")
    assert tbrm_home() == Path.home() / ".cache" / "tbrm"
    f = tmp_path / "blob"
    f.write_bytes(b"abc" * 1_000_000)
    assert file_sha256(f) == hashlib.sha256(b"abc" * 1_000_000).hexdigest()
