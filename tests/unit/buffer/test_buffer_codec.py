"""Trajectory storage codec: exact round trip, compactness vs JSON, clear errors on unknown versions/garbage."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import msgpack
import pytest

from buffer import codec
from buffer.keys import PREFIX, PromptQueueKeys, TableKeys
from buffer.schema import SCHEMA_VERSION, Trajectory

REPO = Path(__file__).resolve().parents[3]


def traj(n: int = 1024, seed: int = 0) -> Trajectory:
    rng = random.Random(seed)
    return Trajectory(
        prompt_id="p1", group_id="g1", prompt_token_ids=[rng.randrange(150_000) for _ in range(64)],
        response_token_ids=[rng.randrange(150_000) for _ in range(n)],
        behaviour_logprobs=[-rng.random() * 5 for _ in range(n)], prompt_text="What is 2+2?",
        response_text="It is \\boxed{4}", reward=1.0, grade_status="correct", policy_version=3, actor_id="a0",
    )


def test_round_trip_is_exact_including_reference() -> None:
    t = traj(300)
    assert codec.decode(codec.encode(t)) == t
    ref = [-0.5 * i for i in range(300)]
    back = codec.decode(codec.encode(t), codec.encode_ref(ref, 1.25))
    assert back.ref_logprobs == ref and back.ref_v0 == 1.25
    assert back.model_copy(update={"ref_logprobs": None, "ref_v0": None}) == t


def test_packed_encoding_is_at_most_half_of_json() -> None:
    t = traj(1024)
    packed = len(codec.encode(t))
    as_json = len(t.model_dump_json().encode())
    # 1K tokens: int32 + float64 per token = 12 bytes vs ~25 bytes of JSON digits
    assert packed < 0.55 * as_json, (packed, as_json)
    assert packed < 14_000


def test_unknown_schema_version_raises_clearly() -> None:
    d = msgpack.unpackb(codec.encode(traj(4))[3:], raw=False)
    d["schema_version"] = SCHEMA_VERSION + 1
    data = codec.MAGIC + msgpack.packb(d, use_bin_type=True)
    with pytest.raises(codec.TrajectoryDecodeError, match=f"schema_version {SCHEMA_VERSION + 1} is unknown"):
        codec.decode(data)


@pytest.mark.parametrize("data", [b"", b"{}", json.dumps({"a": 1}).encode(), codec.MAGIC + b"\xc1\xc1",
                                  codec.MAGIC + msgpack.packb([1, 2])])
def test_garbage_raises_decode_error(data: bytes) -> None:
    with pytest.raises(codec.TrajectoryDecodeError):
        codec.decode(data)


@pytest.mark.parametrize("bad", ["", "a b", "x" * 65, "a/b", "../x", "tbl:1"])
def test_key_names_validated(bad: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        TableKeys(bad)
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        PromptQueueKeys(bad)


def test_all_keys_share_the_prefix() -> None:
    assert all(k.startswith(PREFIX) for k in TableKeys("t").all() + PromptQueueKeys("q").all())
    assert PREFIX == "tbrm:v1:"


def test_no_module_outside_buffer_keys_spells_a_key() -> None:
    # Redis discipline: key names are built only in buffer/keys.py.
    offenders = []
    for pkg in ("buffer", "actor_service", "learner", "reward", "deploy"):
        for f in (REPO / pkg).rglob("*.py"):
            if f == REPO / "buffer" / "keys.py":
                continue
            if "tbrm:v1:" in f.read_text(errors="ignore"):
                offenders.append(str(f.relative_to(REPO)))
    assert offenders == []
