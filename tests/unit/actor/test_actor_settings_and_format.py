"""Actor settings precedence and the safetensors header checks (no vLLM: fast)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from actor_service.settings import ActorSettings
from actor_service.weights import (
    TensorSpec,
    WeightsFormatError,
    WeightsMismatchError,
    check_against,
    model_spec,
    read_header,
)

REPO = Path(__file__).resolve().parents[3]


def test_precedence_cli_env_toml_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('[actor]\ntemperature = 0.7\nmax_tokens = 100\nprompts_per_batch = 3\n'
                    '[actor.table]\nmax_size = 77\n')
    monkeypatch.setenv("TBRM_RUN_CONFIG", str(toml))
    monkeypatch.setenv("TBRM_ACTOR_MAX_TOKENS", "50")
    monkeypatch.setenv("TBRM_REDIS_URL", "redis://example:1/2")
    monkeypatch.setenv("TBRM_REWARD_URL", "http://reward:9")
    monkeypatch.setenv("TBRM_AUTH_TOKEN", "zq-secret-9")
    s = ActorSettings(prompts_per_batch=5)
    assert s.prompts_per_batch == 5  # CLI beats TOML
    assert s.max_tokens == 50  # env beats TOML
    assert s.temperature == 0.7 and s.table.max_size == 77  # TOML beats default
    assert s.top_p == 1.0  # default
    assert (s.redis_url, s.reward_url, s.auth_token) == ("redis://example:1/2", "http://reward:9", "zq-secret-9")
    assert s.redacted()["auth_token"] == "***"
    assert "zq-secret-9" not in json.dumps(s.redacted())


def test_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TBRM_RUN_CONFIG", raising=False)
    with pytest.raises(ValueError, match="prompts_per_batch"):
        ActorSettings(prompts_per_batch=0)
    with pytest.raises(ValueError, match="extra|not permitted|forbid"):
        ActorSettings(temprature=1.0)
    assert ActorSettings(host="0.0.0.0", port=8101).resolved_public_url().endswith(":8101")
    assert ActorSettings(public_url="http://actor-3:8103/").resolved_public_url() == "http://actor-3:8103"


def test_cli_help_lists_options_without_importing_vllm() -> None:
    out = subprocess.run([sys.executable, "-m", "actor_service", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in ("--model-dir", "--n-samples-per-prompt", "--max-weight-bytes", "--sync", "--table", "--config"):
        assert flag in out.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, actor_service.__main__, actor_service.client; "
                               "print('vllm' in sys.modules, 'torch' in sys.modules)"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert probe.stdout.split() == ["False", "False"], probe.stderr


def _tensors() -> dict[str, torch.Tensor]:
    return {"model.embed_tokens.weight": torch.randn(10, 4), "model.norm.weight": torch.ones(4)}


def test_header_of_a_real_file_and_model_spec(tmp_path: Path) -> None:
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    spec = read_header(tmp_path / "model.safetensors")
    assert spec == {"model.embed_tokens.weight": TensorSpec("F32", (10, 4)), "model.norm.weight": TensorSpec("F32", (4,))}
    expected, optional = model_spec(tmp_path)
    assert optional == {"lm_head.weight"} and expected["lm_head.weight"] == TensorSpec("F32", (10, 4))
    check_against(spec, expected, optional)  # tied head may be omitted ...
    check_against({**spec, "lm_head.weight": TensorSpec("F32", (10, 4))}, expected, optional)  # ... or sent


def _raw(path: Path, header: object, data: bytes = b"", n: int | None = None) -> Path:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "n", "message"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "truncated"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "bytes for shape"),
        ({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "bad shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, "bad data_offsets"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
        ([1, 2], b"", None, "not a JSON object"),
        (b"{not json", b"", None, "not JSON"),
        ({}, b"", None, "no tensors"),
        ({"a": 1}, b"", 10**12, "exceeds"),
    ],
)
def test_malformed_headers_are_refused(tmp_path: Path, header: object, data: bytes, n: int | None,
                                       message: str) -> None:
    with pytest.raises(WeightsFormatError, match=message):
        read_header(_raw(tmp_path / "x.safetensors", header, data, n))


def test_short_file_and_mismatches(tmp_path: Path) -> None:
    (tmp_path / "short").write_bytes(b"abc")
    with pytest.raises(WeightsFormatError, match="shorter than"):
        read_header(tmp_path / "short")
    expected = {"w": TensorSpec("F32", (2, 2)), "b": TensorSpec("F32", (2,))}
    with pytest.raises(WeightsMismatchError, match="unexpected tensor 'x'"):
        check_against({**expected, "x": TensorSpec("F32", (1,))}, expected)
    with pytest.raises(WeightsMismatchError, match=r"'w': shape \[2, 3\]"):
        check_against({**expected, "w": TensorSpec("F32", (2, 3))}, expected)
    with pytest.raises(WeightsMismatchError, match="'b': dtype BF16"):
        check_against({**expected, "b": TensorSpec("BF16", (2,))}, expected)
    with pytest.raises(WeightsMismatchError, match="missing tensor 'b'"):
        check_against({"w": TensorSpec("F32", (2, 2))}, expected)


def test_toy_model_gets_its_own_system_prompt_unless_one_is_set(monkeypatch) -> None:
    from actor_service.schema import DEFAULT_SYSTEM_PROMPT, TOY_SYSTEM_PROMPT
    from actor_service.settings import ActorSettings

    monkeypatch.delenv("TBRM_RUN_CONFIG", raising=False)
    assert ActorSettings().system_prompt == TOY_SYSTEM_PROMPT  # no model configured -> the toy model
    assert ActorSettings(model_dir="/models/x").system_prompt == DEFAULT_SYSTEM_PROMPT
    assert ActorSettings(system_prompt="").system_prompt == ""  # an explicit choice wins
    monkeypatch.setenv("TBRM_ACTOR_SYSTEM_PROMPT", "custom")
    assert ActorSettings().system_prompt == "custom"


def test_without_a_model_the_actor_reads_the_toy_folder_and_never_builds_it(monkeypatch, tmp_path) -> None:
    from actor_service.settings import ActorSettings
    from common.files import toy_model_dir

    monkeypatch.delenv("TBRM_RUN_CONFIG", raising=False)
    monkeypatch.setenv("TBRM_HOME", str(tmp_path))
    assert toy_model_dir() == tmp_path / "models" / "toy"
    with pytest.raises(FileNotFoundError, match="tbrm toy-model"):
        ActorSettings().resolved_model_dir()
    (tmp_path / "models" / "toy").mkdir(parents=True)
    (tmp_path / "models" / "toy" / "config.json").write_text("{}")
    assert ActorSettings().resolved_model_dir() == tmp_path / "models" / "toy"
    assert ActorSettings(model_dir=tmp_path / "m").resolved_model_dir() == tmp_path / "m"
