"""Export the policy's weights as a safetensors file with HF parameter names (what the actors load;
docs/weight-protocol.md).

With ZeRO <= 2 every rank holds the full parameters, so `engine.module.state_dict()` is the HF state dict.
Tied tensors (e.g. `lm_head.weight` sharing `model.embed_tokens.weight`) are written once under the first name,
as `save_pretrained` does; transformers and vLLM re-tie them on load. The file is written to a temp name by
safetensors (without holding the GIL), hashed from the page cache and renamed, so a reader never sees a
half-written version. Only the newest `keep` versions stay on disk.

`write_hf_folder` turns one exported file into a complete Hugging Face model folder (the base model's config,
generation config, tokenizer and chat template + `model.safetensors`) that `from_pretrained`, vLLM and `tbrm eval`
load directly; `tbrm export` and the end of `tbrm up` use it (docs/operations.md). This module imports torch only
inside the functions that need it, so that `tbrm export` starts fast.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from buffer.schema import WeightsInfo
from common.files import file_sha256 as sha256_file

if TYPE_CHECKING:
    import torch

_NAME = re.compile(r"^policy-v(\d{8})\.safetensors$")
HF_WEIGHTS_FILE = "model.safetensors"
EXPORT_MARKER = "tbrm_export.json"
"""Written into an HF folder made from an exported version: policy version, sha256, the source files."""
_NOT_COPIED = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.index\.json|\.tmp)$|^(tbrm_toy_model\.json|\.tbrm-model\.json)$")
"""Weights of the base model (replaced by the exported file) and cache markers of the model builders."""


def weights_path(weights_dir: Path, version: int) -> Path:
    return weights_dir / f"policy-v{version:08d}.safetensors"


def hf_state_dict(module: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The module's state dict on CPU, contiguous, without duplicate (tied) storages, optionally cast."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, t in module.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.contiguous()
    return out


def snapshot_state_dict(module: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A copy of the HF state dict on CPU that later optimizer steps cannot change (the export snapshot).

    `hf_state_dict` returns the live tensors on a CPU learner (`.to("cpu")` of a CPU tensor is itself); this copies.
    """
    out = hf_state_dict(module, dtype)
    live = {t.untyped_storage().data_ptr() for t in module.state_dict().values()}
    return {k: (t.clone() if t.untyped_storage().data_ptr() in live else t) for k, t in out.items()}


def write_weights(tensors: dict[str, torch.Tensor], weights_dir: Path, version: int, keep: int = 3) -> WeightsInfo:
    """Write `policy-v<version>.safetensors` atomically (a temp name, hashed, then renamed); its WeightsInfo.

    safetensors writes the file itself without holding the GIL, and the hash reads it back from the page cache
    (also GIL-free); serializing in memory (`save`) held the GIL for the whole copy, ~0.2 s per 136 MB, which
    stalled the training thread beside the exporter (`make bench-actor`, learner step with a push every step)."""
    from safetensors.torch import save_file

    weights_dir.mkdir(parents=True, exist_ok=True)
    final = weights_path(weights_dir, version)
    tmp = final.with_suffix(".tmp")
    # "format": "pt" is what transformers expects in the metadata of a safetensors checkpoint.
    save_file(tensors, tmp, metadata={"format": "pt", "policy_version": str(version)})
    digest = sha256_file(tmp)
    os.chmod(tmp, 0o644)
    nbytes = tmp.stat().st_size
    os.replace(tmp, final)
    prune_weights(weights_dir, keep)
    return WeightsInfo(version=version, sha256=digest, nbytes=nbytes, path=str(final.resolve()))


def export_weights(
    module: torch.nn.Module, weights_dir: Path, version: int, keep: int = 3, dtype: str | None = None
) -> WeightsInfo:
    """Write `policy-v<version>.safetensors` under `weights_dir` and return its WeightsInfo (sha256, size, path)."""
    import torch

    return write_weights(hf_state_dict(module, getattr(torch, dtype) if dtype else None), weights_dir, version, keep)


def prune_weights(weights_dir: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` most recently written versions; returns the deleted paths.

    By write time, not version: a run restarted from scratch in an old run directory keeps its new files."""
    files = sorted((p for p in weights_dir.iterdir() if _NAME.match(p.name)), key=lambda p: (p.stat().st_mtime_ns, p.name))
    doomed = files[:-keep] if keep > 0 else files
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def exported_versions(weights_dir: Path) -> dict[int, Path]:
    """{version: file} of the exports kept in `weights_dir` ({} when there is none)."""
    if not weights_dir.is_dir():
        return {}
    return {int(m.group(1)): p for p in weights_dir.iterdir() if (m := _NAME.match(p.name))}


def write_hf_folder(base_model_dir: Path, weights_file: Path, out_dir: Path, version: int | None = None) -> Path:
    """A complete HF model folder at `out_dir`: every non-weight file of `base_model_dir` (config.json,
    generation_config.json, tokenizer files, chat template) plus `weights_file` as `model.safetensors`.

    Built in a temporary sibling folder and renamed into place, so `out_dir` is either the old folder or the new
    one, never half of each. The weights file is hard-linked when possible (same filesystem), else copied."""
    base_model_dir, weights_file, out_dir = Path(base_model_dir), Path(weights_file), Path(out_dir)
    if not (base_model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{base_model_dir} is not an HF model folder (no config.json)")
    if not weights_file.is_file():
        raise FileNotFoundError(f"no exported weights at {weights_file}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        for f in base_model_dir.iterdir():
            if f.is_file() and not _NOT_COPIED.search(f.name):
                shutil.copyfile(f, tmp / f.name)
        try:
            os.link(weights_file, tmp / HF_WEIGHTS_FILE)
        except OSError:
            shutil.copyfile(weights_file, tmp / HF_WEIGHTS_FILE)
        marker = {"policy_version": version, "sha256": sha256_file(weights_file), "weights_file": str(weights_file),
                  "base_model": str(base_model_dir)}  # fmt: skip
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; other users (containers) read model folders
        old = out_dir.with_name(f".{out_dir.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
