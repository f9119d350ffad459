"""Compact storage encoding of `Trajectory` (what the replay table keeps in Redis).

Codec format 2 (written now): the magic ``b"TB\x02"``, a little-endian u32 header length, a fixed-width span
table, a msgpack map of the scalar fields, then a blob: token ids packed as uint16 when they fit, else 3 bytes
(ids below 2^24: every tokenizer in use) or uint32; log-probs as float32 (exact for values that came from vLLM
or torch, which compute in float32; a float64 input is rounded); texts above 512 bytes zlib-compressed
(level 1). `TrajectoryView` reads it without copying: arrays are numpy views of the stored bytes (3-byte ids
are widened), texts and `Trajectory` objects are built only on demand (the learner's hot path needs neither).
Format 1 (``b"TB\x01"``: one msgpack map, int32 / float64 arrays) is still read.
Sizes and times are in `bench/buffer_bench.py` (`make bench-buffer`), and the memory plan in
docs/buffer-internals.md. The header carries ``schema_version``; decoding an item written by a newer, unknown
schema raises `TrajectoryDecodeError` naming both versions instead of guessing.
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from typing import Any

import msgpack
import numpy as np

from buffer.schema import SCHEMA_VERSION, Trajectory

MAGIC = b"TB\x01"
_INT_FIELDS = ("prompt_token_ids", "response_token_ids")
_FLOAT_FIELDS = ("behaviour_logprobs", "ref_logprobs")
_LITTLE = sys.byteorder == "little"
_ALL_FIELDS = frozenset(Trajectory.model_fields)
_REQUIRED = frozenset(k for k, f in Trajectory.model_fields.items() if f.is_required())


class TrajectoryDecodeError(ValueError):
    """Stored bytes are not a trajectory this code can read (wrong magic, newer schema, corrupt)."""


def _packed(code: str, values: list[int] | list[float]) -> bytes:
    """Little-endian bytes of `values` as array typecode `code`."""
    a = array(code, values)
    if not _LITTLE:
        a.byteswap()
    return a.tobytes()


def _unpacked(code: str, data: bytes) -> list[Any]:
    a = array(code)
    a.frombytes(data)
    if not _LITTLE:
        a.byteswap()
    return a.tolist()


def pack_ints(values: list[int]) -> bytes:
    return _packed("i", values)


def unpack_ints(data: bytes) -> list[int]:
    return _unpacked("i", data)


def pack_floats(values: list[float]) -> bytes:
    return _packed("d", values)


def unpack_floats(data: bytes) -> list[float]:
    return _unpacked("d", data)


# Codec format 2: MAGIC2 | u32 header length H | u8 span count n | n x (u8 field, u8 code, u32 nbytes) |
# msgpack header of the scalar fields (H bytes) | blob (the spans, in order). The span table is fixed-width, so
# a reader finds an array without parsing the msgpack header; arrays are read as numpy views of the stored
# bytes (no copy, no per-element Python objects) and the header is parsed only when a scalar is asked for.
MAGIC2 = b"TB\x02"
_HEAD = struct.Struct("<IB")
_SPAN = struct.Struct("<BcI")
_BLOB_FIELDS = ("prompt_token_ids", "response_token_ids", "behaviour_logprobs", "ref_logprobs", "prompt_text",
                "response_text")
_TEXT_FIELDS = ("prompt_text", "response_text")
_ZLIB_MIN = 512
"""Texts longer than this many bytes are stored zlib-compressed (level 1: ~10 us per 3 KB, ~3x smaller)."""
_DTYPES = {"H": "<u2", "I": "<u4", "i": "<i4", "f": "<f4", "d": "<f8"}


def _pack_tokens(values: list[int]) -> tuple[str, bytes]:
    # uint16 first: array() checks the range in C and stops at the first id that does not fit, which in a
    # large vocabulary comes within a few tokens, so the failed attempt is cheap. Ids below 2^24 (every
    # tokenizer in use: Qwen2.5 has 151,646) then take 3 bytes instead of 4.
    for code in ("H", "I", "i"):
        try:
            a = array(code, values)
        except OverflowError:
            continue
        if not _LITTLE:
            a.byteswap()
        if code == "I" and a:
            u = np.frombuffer(a, dtype="<u4")
            if int(u.max()) < 1 << 24:
                return "T", u.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
        return code, a.tobytes()
    raise ValueError("token ids must fit a signed or unsigned 32-bit integer")


def _pack_f32(values: list[float]) -> bytes:
    return _packed("f", values)


def encode(traj: Trajectory) -> bytes:
    """Trajectory -> bytes (codec format 2: msgpack header of scalars + a blob of packed arrays and texts).

    Token ids are stored as uint16 when every id of the array fits, else uint32 (int32 for negative ids); log-probs as float32, which is exact for what vLLM and torch produce (a float64 input
    is rounded to the nearest float32); long texts zlib-compressed."""
    d: dict[str, Any] = dict(traj.__dict__)  # shallow: model_dump() would deep-copy the 1K-element lists
    parts: list[bytes] = []
    spans: list[bytes] = []
    for f in _INT_FIELDS:
        code, raw = _pack_tokens(d.pop(f))
        spans.append(_SPAN.pack(_BLOB_FIELDS.index(f), code.encode(), len(raw)))
        parts.append(raw)
    for f in _FLOAT_FIELDS:
        values = d.pop(f)
        if values is not None:
            raw = _pack_f32(values)
            spans.append(_SPAN.pack(_BLOB_FIELDS.index(f), b"f", len(raw)))
            parts.append(raw)
    for f in _TEXT_FIELDS:
        raw = d.pop(f).encode()
        code = b"s"
        if len(raw) > _ZLIB_MIN:
            raw, code = zlib.compress(raw, 1), b"z"
        spans.append(_SPAN.pack(_BLOB_FIELDS.index(f), code, len(raw)))
        parts.append(raw)
    head = msgpack.packb(d, use_bin_type=True)
    return b"".join([MAGIC2, _HEAD.pack(len(head), len(spans)), *spans, head, *parts])


class TrajectoryView:
    """A stored trajectory read without copying: scalar fields in `header`, arrays as numpy views of the stored
    bytes (`array`), texts decoded on demand (`text`), a full `Trajectory` only when asked (`trajectory`)."""

    __slots__ = ("_head", "_buf", "_spans", "_hstart", "_hlen")

    def __init__(self, data: bytes) -> None:
        if not data.startswith(MAGIC2):
            raise TrajectoryDecodeError(f"not a codec-2 trajectory (magic {bytes(data[:3])!r})")
        try:
            hlen, n = _HEAD.unpack_from(data, len(MAGIC2))
            pos = len(MAGIC2) + _HEAD.size
            off = pos + n * _SPAN.size + hlen
            spans: dict[str, tuple[str, int, int]] = {}
            for k in range(n):
                field, code, nbytes = _SPAN.unpack_from(data, pos + k * _SPAN.size)
                spans[_BLOB_FIELDS[field]] = (code.decode(), off, nbytes)
                off += nbytes
        except (IndexError, UnicodeDecodeError, struct.error) as e:
            raise TrajectoryDecodeError(f"corrupt trajectory payload: {e}") from e
        if off != len(data):
            raise TrajectoryDecodeError(f"corrupt trajectory payload: {len(data)} bytes, layout says {off}")
        self._buf, self._spans, self._head = data, spans, None
        self._hstart, self._hlen = pos + n * _SPAN.size, hlen

    @property
    def header(self) -> dict[str, Any]:
        """The scalar fields (parsed on first use; the schema version is checked then)."""
        if self._head is None:
            try:
                head = msgpack.unpackb(self._buf[self._hstart:self._hstart + self._hlen], raw=False)
            except (ValueError, msgpack.UnpackException) as e:
                raise TrajectoryDecodeError(f"corrupt trajectory payload: {e}") from e
            if not isinstance(head, dict):
                raise TrajectoryDecodeError("corrupt trajectory payload: the header is not a map")
            _check_version(head)
            self._head = head
        return self._head

    def array(self, name: str) -> Any:
        """numpy view (read-only) of a packed array field (3-byte ids: a widened copy); None when absent."""
        if name not in self._spans:
            return None
        code, off, nbytes = self._spans[name]
        if code == "T":  # 3-byte ids: widened to uint32 (one vectorized copy, ~2 us per 1K tokens)
            wide = np.zeros((nbytes // 3, 4), dtype=np.uint8)
            wide[:, :3] = np.frombuffer(self._buf, dtype=np.uint8, count=nbytes, offset=off).reshape(-1, 3)
            out = wide.view("<u4").reshape(-1)
            out.flags.writeable = False
            return out
        dt = np.dtype(_DTYPES[code])
        return np.frombuffer(self._buf, dtype=dt, count=nbytes // dt.itemsize, offset=off)

    def text(self, name: str) -> str:
        code, off, nbytes = self._spans[name]
        raw = self._buf[off:off + nbytes]
        return (zlib.decompress(raw) if code == "z" else raw).decode()

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.header)
        for name, (code, off, nbytes) in self._spans.items():
            if code in ("s", "z"):
                d[name] = self.text(name)
            elif code == "T":
                d[name] = self.array(name).tolist()
            else:
                a = array(code)
                a.frombytes(self._buf[off:off + nbytes])
                if not _LITTLE:
                    a.byteswap()
                d[name] = a.tolist()
        for f in _FLOAT_FIELDS:
            d.setdefault(f, None)
        return d


def view(data: bytes) -> TrajectoryView:
    """A TrajectoryView of stored bytes of any readable format (format 1 is converted, at a cost)."""
    if data.startswith(MAGIC2):
        return TrajectoryView(data)
    return TrajectoryView(encode(decode(data)))


def _check_version(d: dict[str, Any]) -> None:
    version = d.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
        raise TrajectoryDecodeError(
            f"trajectory schema_version {version!r} is unknown to this code (it reads 1..{SCHEMA_VERSION}); "
            "upgrade tbrm on this process or reset the table"
        )


def decode_dict(data: bytes) -> dict[str, Any]:
    """bytes -> plain dict of Trajectory fields (lists unpacked), checking magic and schema version.
    Reads codec format 2 and the older format 1 (msgpack map with packed int32/float64 arrays)."""
    if data.startswith(MAGIC2):
        return TrajectoryView(data).to_dict()
    if not data.startswith(MAGIC):
        raise TrajectoryDecodeError(
            f"not a tbrm trajectory (magic {bytes(data[:3])!r}, expected {MAGIC2!r}); written by another codec?"
        )
    try:
        d = msgpack.unpackb(data[len(MAGIC):], raw=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise TrajectoryDecodeError(f"corrupt trajectory payload: {e}") from e
    if not isinstance(d, dict):
        raise TrajectoryDecodeError(f"corrupt trajectory payload: a {type(d).__name__}, not a map")
    _check_version(d)
    for f in _INT_FIELDS:
        if isinstance(d.get(f), bytes):
            d[f] = unpack_ints(d[f])
    for f in _FLOAT_FIELDS:
        if isinstance(d.get(f), bytes):
            d[f] = unpack_floats(d[f])
    return d


def decode(data: bytes, ref: bytes | None = None, *, validate: bool = False) -> Trajectory:
    """bytes (+ optional cached reference record from `encode_ref`) -> Trajectory (`validate=True`: full
    pydantic validation, for data of unknown origin)."""
    d = decode_dict(data)
    if ref:
        logprobs, v0 = decode_ref(ref)
        d["ref_logprobs"] = logprobs
        d["ref_v0"] = v0
    if not validate:
        # Items were validated when inserted and carry our magic + a known schema version, so the hot path
        # (sampling) skips re-validating 1K-element lists; only the field set is checked.
        missing = _REQUIRED - d.keys()
        unknown = d.keys() - _ALL_FIELDS
        if missing or unknown:
            raise TrajectoryDecodeError(
                f"stored trajectory has missing fields {sorted(missing)} / unknown fields {sorted(unknown)}"
            )
        return Trajectory.model_construct(**d)
    try:
        return Trajectory.model_validate(d)
    except ValueError as e:
        raise TrajectoryDecodeError(f"stored trajectory does not validate: {e}") from e


def encode_ref(ref_logprobs: list[float], ref_v0: float | None) -> bytes:
    """Cached reference log-probs -> bytes kept next to the item (msgpack [v0, packed float32, "f"])."""
    return msgpack.packb([ref_v0, _pack_f32(ref_logprobs), "f"], use_bin_type=True)


def decode_ref(data: bytes) -> tuple[list[float], float | None]:
    got = msgpack.unpackb(data, raw=False)
    if len(got) == 3:
        a = array("f")
        a.frombytes(got[1])
        if not _LITTLE:
            a.byteswap()
        return a.tolist(), got[0]
    return unpack_floats(got[1]), got[0]  # format 1: float64


def ref_array(data: bytes) -> Any:
    """numpy view of cached reference log-probs (float32, or float64 from format 1)."""
    import numpy as np

    got = msgpack.unpackb(data, raw=False)
    return np.frombuffer(got[1], dtype="<f4" if len(got) == 3 else "<f8")
