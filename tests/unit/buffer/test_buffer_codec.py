"""Trajectory storage codec: exact round trip, compactness vs JSON, clear errors on unknown versions/garbage."""

from __future__ import annotations

import json
import random
import re
import zlib
from pathlib import Path

import msgpack
import numpy as np
import pytest

from buffer import codec
from buffer.keys import PREFIX, PromptQueueKeys, TableKeys
from buffer.schema import SCHEMA_VERSION, StorageConfig, Trajectory

REPO = Path(__file__).resolve().parents[3]


def traj(n: int = 1024, seed: int = 0) -> Trajectory:
    rng = random.Random(seed)
    return Trajectory(
        prompt_id="p1", group_id="g1", prompt_token_ids=[rng.randrange(150_000) for _ in range(64)],
        response_token_ids=[rng.randrange(150_000) for _ in range(n)],
        behaviour_logprobs=[f32(-rng.random() * 5) for _ in range(n)], prompt_text="What is 2+2?",
        response_text="It is \\boxed{4}", reward=1.0, grade_status="correct", policy_version=3, actor_id="a0",
    )


def f32(x: float) -> float:
    return float(np.float32(x))


def test_round_trip_is_exact_including_reference() -> None:
    t = traj(300)  # float32 log-probs, as vLLM computes them
    assert codec.decode(codec.encode(t)) == t
    ref = [-0.5 * i for i in range(300)]
    back = codec.decode(codec.encode(t), codec.encode_ref(ref, 1.25))
    assert back.ref_logprobs == ref and back.ref_v0 == 1.25
    assert back.model_copy(update={"ref_logprobs": None, "ref_v0": None}) == t
    long = t.model_copy(update={"response_text": "step by step " * 200, "prompt_text": "é" * 300})
    assert codec.decode(codec.encode(long)) == long  # zlib-compressed texts


def test_views_are_zero_copy_and_compact() -> None:
    small = traj(1024).model_copy(update={"prompt_token_ids": [5] * 64, "response_token_ids": [7] * 1024})
    data = codec.encode(small, StorageConfig(compress_token_ids=False))
    v = codec.TrajectoryView(data)
    toks = v.array("response_token_ids")
    assert toks.dtype == np.uint16 and toks.tolist() == [7] * 1024 and not toks.flags.owndata
    assert toks.base is not None and np.shares_memory(toks, np.frombuffer(data, np.uint8))
    assert v.array("behaviour_logprobs").dtype == np.float32 and v.array("ref_logprobs") is None
    assert np.shares_memory(v.array("behaviour_logprobs"), np.frombuffer(data, np.uint8))
    assert v.header["policy_version"] == 3 and v.text("response_text") == "It is \\boxed{4}"
    plain = StorageConfig(compress_token_ids=False)
    big = codec.encode(traj(1024), plain)  # ids up to 150k: 3 bytes each, read back widened to uint32
    back = codec.TrajectoryView(big).array("response_token_ids")
    assert back.dtype == np.uint32 and back.tolist() == traj(1024).response_token_ids
    assert len(data) < 64 * 2 + 1024 * (2 + 4) + 700 and len(big) < 1088 * 3 + 1024 * 4 + 700  # + header
    huge = traj(8).model_copy(update={"response_token_ids": [2**24, 2**31 + 5, 0, 1] * 2})
    assert codec.decode(codec.encode(huge)) == huge  # uint32 beyond 2^24
    neg = traj(8).model_copy(update={"response_token_ids": [-1, 5] * 4})
    assert codec.decode(codec.encode(neg)) == neg  # int32


def zipf_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    """Token ids with a natural-text-like skew (Zipf over ranks; frequent tokens mostly have low ids)."""
    rng = np.random.default_rng(seed)
    ranks = np.minimum(rng.zipf(1.1, n) - 1, vocab - 1)
    return ((ranks * rng.uniform(0.5, 2.0, n)).astype(np.int64) % vocab).tolist()


@pytest.mark.parametrize("vocab", [50_000, 151_646, 2**24 + 10, 2**31])
def test_compressed_token_ids_are_exact_and_smaller(vocab: int) -> None:
    t = traj(1024).model_copy(update={"prompt_token_ids": zipf_ids(128, vocab, 1),
                                      "response_token_ids": zipf_ids(1024, vocab, 2)})
    packed, plain = codec.encode(t), codec.encode(t, StorageConfig(compress_token_ids=False))
    assert codec.decode(packed) == t
    v = codec.TrajectoryView(packed)
    assert v.array("response_token_ids").tolist() == t.response_token_ids
    assert v.array("prompt_token_ids").tolist() == t.prompt_token_ids
    assert len(packed) < len(plain) - 200, (len(packed), len(plain))  # skewed ids compress
    uniform = traj(1024)  # uniform random ids (only the top byte plane compresses): never larger than raw
    assert len(codec.encode(uniform)) <= len(codec.encode(uniform, StorageConfig(compress_token_ids=False)))
    assert codec.decode(codec.encode(uniform)) == uniform


def spans_of(data: bytes) -> dict[str, tuple[str, int, int, int]]:
    return codec.TrajectoryView(data)._spans


def test_compressed_ids_keep_their_two_low_bytes_raw() -> None:
    # Written now for 3-byte ids below 2^20: u32 count | u8 bits | the low 16 bits of the ids raw | the third
    # bytes packed `bits` to a value, the first in the highest bits (packing BITS)
    t = traj(1024).model_copy(update={"response_token_ids": zipf_ids(1023, 151_646, 2) + [151_645]})
    data = codec.encode(t)
    code, packing, off, nbytes = spans_of(data)["response_token_ids"]
    assert (code, packing, nbytes) == ("T", codec.BITS, 5 + 2048 + 256)
    ids = np.array(t.response_token_ids, dtype=np.uint32)
    third = (ids >> 16).reshape(-1, 4)
    packed = (third[:, 0] << 6 | third[:, 1] << 4 | third[:, 2] << 2 | third[:, 3]).astype(np.uint8).tobytes()
    assert data[off:off + nbytes] == (1024).to_bytes(4, "little") + b"\x02" + ids.astype("<u2").tobytes() + packed
    assert codec.view(data).array("response_token_ids").tolist() == t.response_token_ids
    # 3-byte ids whose third byte reaches 16 (a vocabulary above 2^20): the third bytes deflated (SPLIT16)
    huge = t.model_copy(update={"response_token_ids": [i * 16_411 % 2**24 for i in range(1024)]})
    code, packing, off, _ = spans_of(codec.encode(huge))["response_token_ids"]
    assert (code, packing) == ("T", codec.SPLIT16)
    ids = np.array(huge.response_token_ids, dtype=np.uint32).astype("<u2").tobytes()
    assert codec.encode(huge)[off:off + 4 + 2048] == (1024).to_bytes(4, "little") + ids
    assert codec.decode(codec.encode(huge)) == huge
    neg = t.model_copy(update={"response_token_ids": [-(i % 7) * 70_000 for i in range(1024)]})  # int32 planes
    assert spans_of(codec.encode(neg))["response_token_ids"][:2] == ("i", codec.SPLIT16)
    assert codec.view(codec.encode(neg)).array("response_token_ids").tolist() == neg.response_token_ids
    assert codec.decode(codec.encode(neg)) == neg
    wide = t.model_copy(update={"response_token_ids": [(i % 5) << 24 | i for i in range(1024)]})  # uint32
    assert spans_of(codec.encode(wide))["response_token_ids"][:2] == ("I", codec.SPLIT16)
    assert codec.decode(codec.encode(wide)) == wide
    small = t.model_copy(update={"response_token_ids": zipf_ids(1024, 50_000, 2)})  # uint16: low byte raw
    assert spans_of(codec.encode(small))["response_token_ids"][:2] == ("H", codec.SPLIT)
    assert codec.decode(codec.encode(small)) == small


def _respan(data: bytes, field: str, packing: int, blob: bytes) -> bytes:
    """`data` with the span of `field` replaced by `blob` stored with `packing` (as an older writer stored it)."""
    code, _, off, nbytes = spans_of(data)[field]
    n = data[7]  # span count
    table = bytearray(data[8:8 + codec._SPAN3.size * n])
    k = list(spans_of(data)).index(field)
    codec._SPAN3.pack_into(table, k * codec._SPAN3.size, codec._BLOB_FIELDS.index(field), code.encode(), packing,
                           len(blob))
    return data[:8] + bytes(table) + data[8 + len(table):off] + blob + data[off + nbytes:]


@pytest.mark.parametrize("top,bits", [(65_536, 1), (131_071, 1), (131_072, 2), (262_143, 2), (262_144, 4),
                                      (2**20 - 1, 4)])
@pytest.mark.parametrize("n", [64, 65, 66, 67, 1021])
def test_bit_packed_third_bytes_take_the_fewest_bits(top: int, bits: int, n: int) -> None:
    # n not a multiple of the ids per byte: the last byte is padded, and reading drops the padding
    ids = [top - i * 7919 % (top - 65_535) for i in range(n)]
    t = traj(n).model_copy(update={"response_token_ids": ids})
    data = codec.encode(t)
    code, packing, off, nbytes = spans_of(data)["response_token_ids"]
    assert (code, packing, data[off + 4]) == ("T", codec.BITS, bits)
    assert nbytes == 5 + 2 * n + -(-n * bits // 8)
    assert codec.view(data).array("response_token_ids").tolist() == ids
    assert codec.decode(data) == t


@pytest.mark.parametrize("ids", [zipf_ids(300, 151_646, 3), [-(i % 7) * 70_000 for i in range(300)]])
def test_format_3_items_with_the_low_byte_plane_split_are_still_read(ids: list[int]) -> None:
    # The previous writer (packing SPLIT): u32 count | low byte plane raw | raw deflate of the higher planes
    t = traj(300).model_copy(update={"response_token_ids": ids})
    data = codec.encode(t, StorageConfig(compress_token_ids=False))
    code, packing, off, nbytes = spans_of(data)["response_token_ids"]
    assert packing == codec.RAW
    planes = np.frombuffer(data, np.uint8, nbytes, off).reshape(-1, codec._WIDTH[code]).T.tobytes()
    blob = (300).to_bytes(4, "little") + planes[:300] + codec._deflate(planes[300:], -15, zlib.Z_RLE)
    old = _respan(data, "response_token_ids", codec.SPLIT, blob)
    assert spans_of(old)["response_token_ids"][:2] == (code, codec.SPLIT)
    assert codec.decode(old) == t
    assert codec.view(old).array("response_token_ids").tolist() == t.response_token_ids


def test_format_3_items_with_all_planes_deflated_are_still_read() -> None:
    # Earlier format-3 writers deflated all byte planes (packing PLANES): such an item (a fresh one with its raw
    # ids re-packed that way) reads back exactly
    t = traj(300).model_copy(update={"response_token_ids": zipf_ids(300, 151_646, 3)})
    data = codec.encode(t, StorageConfig(compress_token_ids=False))
    code, packing, off, nbytes = spans_of(data)["response_token_ids"]
    assert (code, packing) == ("T", codec.RAW)
    planes = np.frombuffer(data, np.uint8, nbytes, off).reshape(-1, 3).T.tobytes()
    old = _respan(data, "response_token_ids", codec.PLANES, codec._deflate(planes, -15, zlib.Z_RLE))
    assert codec.decode(old) == t
    assert codec.view(old).array("response_token_ids").tolist() == t.response_token_ids


def test_float32_overflow_rounds_to_infinity_as_before() -> None:
    t = traj(4).model_copy(update={"behaviour_logprobs": [-1e300, -0.5, float("-inf"), 0.0]})
    assert codec.decode(codec.encode(t)).behaviour_logprobs == [float("-inf"), -0.5, float("-inf"), 0.0]


def test_float16_log_probs_and_no_texts_are_a_setting() -> None:
    t = traj(1024).model_copy(update={"response_text": "step " * 300})
    lean = StorageConfig(logprob_dtype="float16", store_texts=False)
    data = codec.encode(t, lean)
    back = codec.decode(data)
    assert back.prompt_text == "" and back.response_text == ""
    assert back.prompt_token_ids == t.prompt_token_ids and back.response_token_ids == t.response_token_ids
    got, want = np.array(back.behaviour_logprobs), np.array(t.behaviour_logprobs)
    assert not np.array_equal(got, want)  # lossy
    assert np.allclose(got, want, rtol=2**-11, atol=6e-8)
    assert codec.TrajectoryView(data).array("behaviour_logprobs").dtype == np.float16
    assert len(data) < len(codec.encode(t)) - 1024 * 2 - 20  # half the log-probs, no text spans


def test_format_2_items_are_still_read() -> None:
    t = traj(600).model_copy(update={"response_text": "step by step " * 100})
    ids = [(code, rows.tobytes()) for code, rows in map(codec._token_rows, (t.prompt_token_ids, t.response_token_ids))]
    spans = [(0, *ids[0]), (1, *ids[1]), (2, "f", codec._pack_f32(t.behaviour_logprobs)),
             (4, "s", t.prompt_text.encode()), (5, "z", zlib.compress(t.response_text.encode(), 1))]
    d = {k: v for k, v in t.__dict__.items() if k not in codec._BLOB_FIELDS}
    head = msgpack.packb(d, use_bin_type=True)
    data = b"".join([codec.MAGIC2, len(head).to_bytes(4, "little"), bytes([len(spans)]),
                     *(codec._SPAN2.pack(f, c.encode(), len(raw)) for f, c, raw in spans), head,
                     *(raw for *_, raw in spans)])
    assert codec.decode(data) == t
    assert codec.view(data).array("response_token_ids").tolist() == t.response_token_ids


def test_float64_log_probs_round_to_float32() -> None:
    t = traj(4).model_copy(update={"behaviour_logprobs": [-0.1, -1 / 3, -2.0, -1e-9]})
    assert codec.decode(codec.encode(t)).behaviour_logprobs == [f32(x) for x in t.behaviour_logprobs]


def test_format_1_items_are_still_read() -> None:
    t = traj(8)
    d = dict(t.__dict__)
    d["prompt_token_ids"] = codec.pack_ints(d["prompt_token_ids"])
    d["response_token_ids"] = codec.pack_ints(d["response_token_ids"])
    d["behaviour_logprobs"] = codec.pack_floats(d["behaviour_logprobs"])
    assert codec.decode(codec.MAGIC + msgpack.packb(d, use_bin_type=True)) == t


def test_packed_encoding_is_at_most_half_of_json() -> None:
    t = traj(1024)
    packed = len(codec.encode(t))
    as_json = len(t.model_dump_json().encode())
    # 1K tokens: uint32 + float32 per token = 8 bytes vs ~25 bytes of JSON digits
    assert packed < 0.4 * as_json, (packed, as_json)


def test_unknown_schema_version_raises_clearly() -> None:
    d = dict(traj(4).__dict__)  # format 1 with a newer schema
    d["schema_version"] = SCHEMA_VERSION + 1
    data = codec.MAGIC + msgpack.packb(d, use_bin_type=True)
    with pytest.raises(codec.TrajectoryDecodeError, match=f"schema_version {SCHEMA_VERSION + 1} is unknown"):
        codec.decode(data)
    v3 = codec.encode(traj(4))
    hlen, n = int.from_bytes(v3[3:7], "little"), v3[7]
    start = 8 + codec._SPAN3.size * n
    head = msgpack.unpackb(v3[start:start + hlen], raw=False)
    head["schema_version"] = SCHEMA_VERSION + 1
    new = msgpack.packb(head, use_bin_type=True)
    data = codec.MAGIC3 + len(new).to_bytes(4, "little") + v3[7:start] + new + v3[start + hlen:]
    with pytest.raises(codec.TrajectoryDecodeError, match=f"schema_version {SCHEMA_VERSION + 1} is unknown"):
        codec.decode(data)


@pytest.mark.parametrize("data", [b"", b"{}", json.dumps({"a": 1}).encode(), codec.MAGIC + b"\xc1\xc1",
                                  codec.MAGIC + msgpack.packb([1, 2]), codec.MAGIC2 + b"\x05\x00\x00\x00\x00ab",
                                  codec.MAGIC2 + b"\x01\x00\x00\x00\x00\x90",
                                  codec.MAGIC2 + b"\x00\x00\x00\x00\x01\x09s\x00\x00\x00\x00",
                                  codec.MAGIC3 + b"\x00\x00\x00\x00\x01\x01H\x07\x00\x00\x00\x00",
                                  codec.MAGIC3 + b"\x00\x00\x00\x00\x01\x01H\x02\x02\x00\x00\x00ab"])
def test_garbage_raises_decode_error(data: bytes) -> None:
    with pytest.raises(codec.TrajectoryDecodeError):
        codec.decode(data)


@pytest.mark.parametrize("code,packing,blob", [
    *(("H", codec.SPLIT, b) for b in (b"\x09\x00\x00\x00ab", b"\x01\x00", b"\x02\x00\x00\x00ab\x00",
                                      b"\x02\x00\x00\x00ab" + zlib.compress(b"xyz")[2:-4])),
    *(("T", codec.BITS, b) for b in (b"\x04\x00\x00\x00\x02abcdefgh", b"\x04\x00\x00\x00\x03abcdefgh\x00",
                                     b"\x04\x00\x00\x00\x02abcdefgh\x00\x00", b"\x04\x00\x00\x00", b"\x01")),
    *(("T", codec.SPLIT16, b) for b in (b"\x09\x00\x00\x00abcd", b"\x01\x00", b"\x02\x00\x00\x00abcd\x00",
                                        b"\x02\x00\x00\x00abcd" + zlib.compress(b"xyz")[2:-4],
                                        b"\x01\x00\x00\x00ab" + zlib.compress(b"xy")[2:-4])),
    ("H", codec.SPLIT16, b"\x01\x00\x00\x00ab" + zlib.compress(b"")[2:-4]),  # SPLIT16 is for 3-4 byte ids only
])
def test_corrupt_split_token_span_raises_decode_error(code: str, packing: int, blob: bytes) -> None:
    data = codec.MAGIC3 + b"\x00\x00\x00\x00\x01" + codec._SPAN3.pack(1, code.encode(), packing, len(blob)) + blob
    with pytest.raises(codec.TrajectoryDecodeError, match="response_token_ids"):
        codec.TrajectoryView(data).array("response_token_ids")


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


def test_keys_of_one_table_or_queue_share_a_cluster_slot() -> None:
    def tag(key: str) -> str:  # Redis Cluster hashes only the part inside the first {...}
        return key[key.index("{") + 1:key.index("}")]

    assert {tag(k) for k in TableKeys("replay").all()} == {"replay"}
    assert {tag(k) for k in PromptQueueKeys("train").all()} == {"train"}
    from buffer import keys

    assert tag(keys.ACTORS) == tag(keys.ACTORS_EXP)


def test_batch_decode_of_token_arrays_matches_each_item() -> None:
    # codec.arrays widens the 3-byte ids (BITS, SPLIT16) of a whole batch at once; any other layout: item by item
    def item(k: int, vocab: int = 151_646) -> Trajectory:
        ids = zipf_ids(64 + 37 * k, vocab, k)
        return traj(len(ids), seed=k).model_copy(update={"response_token_ids": ids[:-1] + [vocab - 1]})

    def check(items: list[Trajectory], packings: set[int], wide: bool = True, **storage: bool,
              ) -> list[codec.TrajectoryView]:
        views = [codec.view(codec.encode(t, StorageConfig(**storage))) for t in items]
        assert {v._spans["response_token_ids"][1] for v in views} == packings
        got = codec.arrays(views, "response_token_ids")
        assert [a.tolist() for a in got] == [t.response_token_ids for t in items]
        assert all((a.dtype == np.uint32 or not wide) and not a.flags.writeable for a in got)
        return views

    views = check([item(k) for k in range(5)], {codec.BITS})
    check([item(k, 2**20) for k in range(3)] + [item(k) for k in range(2)], {codec.BITS})  # 4 and 2 bits
    check([item(k, 2**24) for k in range(3)] + [item(k) for k in range(2)], {codec.BITS, codec.SPLIT16})
    check([item(k, 2**24) for k in range(3)], {codec.SPLIT16})
    check([item(0), item(1, 60_000)], {codec.BITS, codec.RAW}, wide=False)  # uint16 ids: item by item
    check([item(0), item(1)], {codec.RAW}, wide=False, compress_token_ids=False)
    assert codec.arrays(views, "ref_logprobs") == [None] * 5
    code, packing, off, nbytes = spans_of(codec.encode(item(1, 2**24)))["response_token_ids"]
    data = bytearray(codec.encode(item(1, 2**24)))
    data[off + nbytes - 3:off + nbytes] = b"\xff\xff\xff"  # a broken deflate stream in one item
    with pytest.raises(codec.TrajectoryDecodeError, match="response_token_ids"):
        codec.arrays([views[0], codec.view(bytes(data))], "response_token_ids")
