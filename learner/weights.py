"""Export the policy's weights as a safetensors file with HF parameter names (what the actors load, DESIGN.md §5).

With ZeRO <= 2 every rank holds the full parameters, so `engine.module.state_dict()` is the HF state dict.
Tied tensors (e.g. `lm_head.weight` sharing `model.embed_tokens.weight`) are written once under the first name,
as `save_pretrained` does; transformers and vLLM re-tie them on load. The file is serialized in memory, hashed
from those bytes, written to a temp name and renamed, so a reader never sees a half-written version. Only the newest `keep` versions stay on disk.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

from buffer.schema import WeightsInfo

_NAME = re.compile(r"^policy-v(\d{8})\.safetensors$")


def weights_path(weights_dir: Path, version: int) -> Path:
    return weights_dir / f"policy-v{version:08d}.safetensors"


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


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
    """Serialize in memory, hash those bytes, write `policy-v<version>.safetensors` atomically; its WeightsInfo."""
    from safetensors.torch import save  # noqa: PLC0415

    weights_dir.mkdir(parents=True, exist_ok=True)
    final = weights_path(weights_dir, version)
    tmp = final.with_suffix(".tmp")
    # "format": "pt" is what transformers expects in the metadata of a safetensors checkpoint.
    data = save(tensors, metadata={"format": "pt", "policy_version": str(version)})
    digest = hashlib.sha256(data).hexdigest()
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, final)
    prune_weights(weights_dir, keep)
    return WeightsInfo(version=version, sha256=digest, nbytes=len(data), path=str(final.resolve()))


def export_weights(
    module: torch.nn.Module, weights_dir: Path, version: int, keep: int = 3, dtype: str | None = None
) -> WeightsInfo:
    """Write `policy-v<version>.safetensors` under `weights_dir` and return its WeightsInfo (sha256, size, path)."""
    return write_weights(hf_state_dict(module, getattr(torch, dtype) if dtype else None), weights_dir, version, keep)


def prune_weights(weights_dir: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` most recently written versions; returns the deleted paths.

    By write time, not version: a run restarted from scratch in an old run directory keeps its new files."""
    files = sorted((p for p in weights_dir.iterdir() if _NAME.match(p.name)), key=lambda p: (p.stat().st_mtime_ns, p.name))
    doomed = files[:-keep] if keep > 0 else files
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed
