"""`autocast = "auto"`: bf16 only where the device runs it natively (an AVX2-only CPU emulates bf16, many times
slower than fp32)."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from learner.model import autocast_context, native_bf16


@pytest.mark.parametrize(("avx512_bf16", "amx", "native"), [(False, False, False), (True, False, True), (False, True, True)])
def test_auto_is_bf16_only_where_native(monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool, native: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    model = torch.nn.Linear(4, 4)
    assert native_bf16("cpu") is native
    ctx = autocast_context(model, "auto")
    if native:
        assert isinstance(ctx, torch.autocast)
        with ctx:
            assert model(torch.ones(2, 4)).dtype == torch.bfloat16
    else:
        assert isinstance(ctx, nullcontext)
        with ctx:
            assert model(torch.ones(2, 4)).dtype == torch.float32


def test_explicit_settings_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    model = torch.nn.Linear(4, 4)
    assert isinstance(autocast_context(model, "bfloat16"), torch.autocast)  # asked for: honoured even if emulated
    assert isinstance(autocast_context(model, "none"), nullcontext)
