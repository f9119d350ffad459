"""Compact storage encoding of `Trajectory` (what the replay table keeps in Redis).

Codec format 3 (written now): the magic ``b"TB\x03"``, a little-endian u32 header length, a fixed-width span
table, a msgpack map of the scalar fields, then a blob: token ids packed as uint16 when they fit, else 3 bytes
(ids below 2^24: every tokenizer in use) or uint32, and by default split into byte planes, the low 16 bits kept raw
(the lowest byte plane for uint16 ids) and the higher planes packed: the third byte of ids below 2^20 in 1, 2 or 4
bits, wider planes deflated (exact; `StorageConfig.compress_token_ids`); behaviour log-probs as float32 (exact for
values that came from vLLM or torch, which compute in float32; a float64 input is rounded) or float16
(`StorageConfig.logprob_dtype`, lossy); texts above 512 bytes zlib-compressed (level 1), or not stored
(`StorageConfig.store_texts`). `TrajectoryView` reads it without parsing more than it needs: raw arrays are numpy
views of the stored bytes (3-byte ids are widened, compressed ids unpacked and joined on access, vectorized:
~5 us per 1K ids in a 32-item batch), texts and `Trajectory` objects are built only on demand (the learner's hot path needs neither).
Encoding costs ~90-110 us per 1K-token item with the defaults, most of it zlib on the texts (~30 us) and turning
Python lists into arrays (~15 us); ~60 us without texts. Format 2 (``b"TB\x02"``: the same without compression codes) and format 1
(``b"TB\x01"``: one msgpack map, int32 / float64 arrays) are still read.
Sizes and times are in `bench/buffer_bench.py` (`make bench-buffer`), and the memory plan in
docs/buffer-internals.md. The header carries ``schema_version``; decoding an item written by a newer, unknown
schema raises `TrajectoryDecodeError` naming both versions instead of guessing.
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from itertools import accumulate
from typing import Any

import msgpack
import numpy as np

from buffer.schema import SCHEMA_VERSION, StorageConfig, Trajectory

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


# Codec format 3 (written now): MAGIC3 | u32 header length H | u8 span count n | n x (u8 field, c dtype, u8 packing,
# u32 nbytes) | msgpack header of the scalar fields (H bytes) | blob (the spans, in order). dtype: H uint16, T 3-byte
# unsigned, I uint32, i int32 (token ids), f float32, e float16 (log-probs), s UTF-8 text. packing: 0 raw, 1 zlib,
# 2 raw deflate (Z_RLE) of all the byte planes (all first bytes, then all second bytes, ...; read, no longer
# written), 3 (written now for uint16 ids; read for wider ones, whose earlier writers used it) u32 count n | the
# first byte plane raw (n bytes) | raw deflate (Z_RLE) of the higher planes, 4 (SPLIT16, written now for 4-byte
# ids, and for 3-byte ids whose third byte reaches 16) u32 count n | the low 16 bits raw (2n bytes, read as a
# uint16 view) | raw deflate (Z_RLE) of the planes above them, 5 (BITS, written now for 3-byte ids below 2^20:
# every vocabulary in use) u32 count n | u8 bits b (1, 2 or 4) | the low 16 bits raw (2n bytes) | the third byte
# of each id in b bits, 8 / b ids per byte, the first in the highest bits (ceil(n b / 8) bytes; Qwen2.5's
# 151,646 ids take b = 2, Llama 3's 128,256 b = 1). BITS replaced SPLIT16 for these ids because reading them is
# the learner's hot path: a batch's third bytes are widened by one table lookup per packed byte instead of one
# inflate per item (a 32-item column of 1K ids: ~160 vs ~330 us; ~150 B more per 1K ids than deflate, within the
# same allocator size class for a lean item). Of SPLIT16: the top bytes of token ids are nearly constant, so they
# compress well, while the low bytes are near uniform (deflating them bought ~1% and cost a third of the time);
# keeping the second byte raw too costs ~370 B per 1K ids of 3 bytes (Qwen-sized vocabularies: 1,790 -> 2,160 B
# per 1K-token response, within the same jemalloc size class of a lean item at 1,024 tokens) and halves the
# reading (one plane to inflate and join instead of two: ~7 vs ~15 us per 1K ids) and the id encoding. The span
# table is fixed-width, so a reader finds an array without parsing the msgpack header; raw arrays are numpy views of
# the stored bytes, the header is parsed only when a scalar is asked for. Format 2 (MAGIC2, spans of (u8 field,
# c code, u32 nbytes), code "z" = zlib text) is read.
MAGIC2 = b"TB\x02"
MAGIC3 = b"TB\x03"
_HEAD = struct.Struct("<IB")
_SPAN2 = struct.Struct("<BcI")
_SPAN3 = struct.Struct("<BcBI")
_U32 = struct.Struct("<I")
RAW, ZLIB, PLANES, SPLIT, SPLIT16, BITS = 0, 1, 2, 3, 4, 5
_PACKINGS = frozenset((RAW, ZLIB, PLANES, SPLIT, SPLIT16, BITS))
_U32B = struct.Struct("<IB")
_BLOB_FIELDS = ("prompt_token_ids", "response_token_ids", "behaviour_logprobs", "ref_logprobs", "prompt_text",
                "response_text")
_TEXT_FIELDS = ("prompt_text", "response_text")
_ZLIB_MIN = 512
"""Texts longer than this many bytes are stored zlib-compressed (level 1: ~20 us per 4 KB, ~2x smaller)."""
_MEM_LEVEL = 6
"""zlib memLevel of every compression here: its 16 KB hash table and 4K-symbol blocks instead of memLevel 8-9's
64-128 KB, which zlib allocates and clears on every call (the inputs are a few KB; same output within 1%)."""
_PLANES_MIN = 64
"""Token arrays of at least this many ids are compressed (when `StorageConfig.compress_token_ids`)."""
_DTYPES = {"H": "<u2", "I": "<u4", "i": "<i4", "f": "<f4", "e": "<f2"}
_NPDTYPES = {c: np.dtype(d) for c, d in _DTYPES.items()}
_NPDTYPES["T"] = np.dtype("<u4")
_U2, _U4 = np.dtype("<u2"), np.dtype("<u4")
_NATIVE = {"H": np.dtype(np.uint16), "I": np.dtype(np.uint32), "i": np.dtype(np.int32)}
_WIDTH = {"H": 2, "T": 3, "I": 4, "i": 4, "f": 4, "e": 2}
_DEFAULT_STORAGE = StorageConfig()


def _bit_table(bits: int) -> Any:
    """byte -> its 8 / bits packed values (the first in the highest bits) as that many bytes of one unsigned
    integer, so `table[packed].view(np.uint8)` lists the values in order."""
    per = 8 // bits
    x = np.arange(256, dtype=np.uint64)
    out = np.zeros(256, np.uint64)
    for j in range(per):
        out |= ((x >> np.uint64(bits * (per - 1 - j))) & np.uint64((1 << bits) - 1)) << np.uint64(8 * j)
    return out.astype({8: np.dtype("<u8"), 4: np.dtype("<u4"), 2: np.dtype("<u2")}[per])


_BIT_TABLES = {b: _bit_table(b) for b in (1, 2, 4)}


def _token_array(values: list[int]) -> tuple[str, Any]:
    """(dtype code, the ids as a numpy array in native byte order: uint16, uint32 or int32)."""
    # uint16 first: array() checks the range in C and stops at the first id that does not fit, which in a
    # large vocabulary comes within a few tokens, so the failed attempt is cheap. Ids below 2^24 (every
    # tokenizer in use: Qwen2.5 has 151,646) then take 3 bytes instead of 4.
    for code in ("H", "I", "i"):
        try:
            a = np.frombuffer(array(code, values), dtype=_NATIVE[code])
        except OverflowError:
            continue
        if code == "I" and len(a) and int(a.max()) < 1 << 24:
            return "T", a
        return code, a
    raise ValueError("token ids must fit a signed or unsigned 32-bit integer")


def _token_rows(values: list[int]) -> tuple[str, Any]:
    """(dtype code, (n, width) uint8 array of the little-endian ids)."""
    code, a = _token_array(values)
    return code, _rows(code, a)


def _rows(code: str, a: Any) -> Any:
    rows = a.astype(_NPDTYPES[code], copy=False).view(np.uint8).reshape(-1, a.itemsize)
    return rows[:, :3] if code == "T" else rows


def _deflate(data: Any, wbits: int, strategy: int = zlib.Z_DEFAULT_STRATEGY) -> bytes:
    """Level-1 deflate (wbits 15: zlib format, -15: raw deflate)."""
    c = zlib.compressobj(1, zlib.DEFLATED, wbits, _MEM_LEVEL, strategy)
    return c.compress(data) + c.flush()


def _compressed_tokens(values: list[int], compress: bool) -> tuple[str, int, bytes]:
    code, a = _token_array(values)
    n, width = len(a), _WIDTH[code]
    if compress and n >= _PLANES_MIN:
        # Z_RLE: matches are runs only. The high byte planes of ids are runs (top bytes) and skewed bytes
        # (Huffman), with few longer repeats: ~6% smaller and ~1.5x faster than level-1 deflate.
        if width >= 3:  # the two low bytes raw (a uint16 view when read), the planes above packed
            u = a.view(np.uint32)  # int32 ids: their two's complement bits
            third = (u >> 16).astype(np.uint8)  # contiguous casts: a strided byte copy costs several times more
            if width == 3 and (bits := _bits_for(int(third.max()))):
                return code, BITS, b"".join((_U32B.pack(n, bits), u.astype(_U2).tobytes(), _pack_bits(third, bits)))
            high = third if width == 3 else np.concatenate((third, (u >> 24).astype(np.uint8)))
            packed = _deflate(high, -15, zlib.Z_RLE)
            if 4 + 2 * n + len(packed) < n * width:
                return code, SPLIT16, b"".join((_U32.pack(n), u.astype(_U2).tobytes(), packed))
        else:
            planes = _rows(code, a).T.tobytes()
            high = _deflate(memoryview(planes)[n:], -15, zlib.Z_RLE)
            if 4 + n + len(high) < n * width:
                return code, SPLIT, b"".join((_U32.pack(n), planes[:n], high))
    return code, RAW, _rows(code, a).tobytes()


def _bits_for(largest: int) -> int:
    """Bits per value of packing BITS for values up to `largest` (0: too wide for it)."""
    return next((b for b in (1, 2, 4) if largest < 1 << b), 0)


def _pack_bits(values: Any, bits: int) -> bytes:
    """uint8 values below 2^bits -> 8 / bits per byte, the first in the highest bits (the last byte zero-padded)."""
    per = 8 // bits
    pad = -len(values) % per
    rows = (np.concatenate((values, np.zeros(pad, np.uint8))) if pad else values).reshape(-1, per)
    acc = rows[:, 0].copy()
    for j in range(1, per):
        acc <<= bits
        acc |= rows[:, j]
    return acc.tobytes()


def _pack_f32(values: list[float]) -> bytes:
    try:
        return struct.pack(f"<{len(values)}f", *values)  # ~2.5x faster than array("f", values)
    except OverflowError:  # a finite value beyond float32's range: array rounds it to +-inf
        return _packed("f", values)


def _pack_logprobs(values: list[float], dtype: str) -> tuple[str, bytes]:
    raw = _pack_f32(values)
    if dtype == "float16":
        return "e", np.frombuffer(raw, "<f4").astype("<f2").tobytes()
    return "f", raw


def encode(traj: Trajectory, storage: StorageConfig | None = None) -> bytes:
    """Trajectory -> bytes (codec format 3: msgpack header of scalars + a blob of packed arrays and texts).

    Token ids are packed into the narrowest of uint16 / 3 bytes / uint32 (int32 for negative ids) and, by default,
    zlib-compressed byte plane by byte plane (exact); behaviour log-probs as float32 (exact for what vLLM and torch
    produce; a float64 input is rounded) or float16 (`storage.logprob_dtype`, lossy); long texts zlib-compressed,
    or not stored (`storage.store_texts`)."""
    st = storage or _DEFAULT_STORAGE
    d: dict[str, Any] = dict(traj.__dict__)  # shallow: model_dump() would deep-copy the 1K-element lists
    parts: list[bytes] = []
    spans: list[bytes] = []

    def add(field: str, code: str, packing: int, raw: bytes) -> None:
        spans.append(_SPAN3.pack(_BLOB_FIELDS.index(field), code.encode(), packing, len(raw)))
        parts.append(raw)

    for f in _INT_FIELDS:
        add(f, *_compressed_tokens(d.pop(f), st.compress_token_ids))
    code, raw = _pack_logprobs(d.pop("behaviour_logprobs"), st.logprob_dtype)
    add("behaviour_logprobs", code, RAW, raw)
    ref = d.pop("ref_logprobs")
    if ref is not None:
        add("ref_logprobs", "f", RAW, _pack_f32(ref))
    for f in _TEXT_FIELDS:
        raw = d.pop(f).encode()
        if raw and st.store_texts:
            add(f, "s", *((ZLIB, _deflate(raw, 15)) if len(raw) > _ZLIB_MIN else (RAW, raw)))
    head = msgpack.packb(d, use_bin_type=True)
    return b"".join([MAGIC3, _HEAD.pack(len(head), len(spans)), *spans, head, *parts])


_CODES = {c.encode(): c for c in (*_WIDTH, "s")}


def _spans(data: bytes, fmt: struct.Struct, pos: int, n: int, off: int) -> tuple[dict[str, Any], int]:
    """Format 2's span table (format 3's is read by `TrajectoryView.__init__` in one unpack)."""
    spans: dict[str, tuple[str, int, int, int]] = {}
    if n > len(_BLOB_FIELDS):  # each field has at most one span
        raise TrajectoryDecodeError(f"corrupt trajectory payload: {n} spans")
    # the code says it all ("z": zlib text)
    rows = [(f, b"s", ZLIB, m) if c == b"z" else (f, c, RAW, m)
            for f, c, m in (fmt.unpack_from(data, pos + k * fmt.size) for k in range(n))]
    for field, c, packing, nbytes in rows:
        code = _CODES.get(c)
        if code is None:
            raise TrajectoryDecodeError(f"corrupt trajectory payload: span code {c!r}/{packing}")
        spans[_BLOB_FIELDS[field]] = (code, packing, off, nbytes)
        off += nbytes
    return spans, off


_HEADS3 = [struct.Struct("<IB" + "BBBI" * n) for n in range(len(_BLOB_FIELDS) + 1)]
"""Header length, span count and the whole span table of format 3 in one unpack (the sample path reads it)."""
_CODES3 = {ord(c): c for c in (*_WIDTH, "s")}


def _joined(planes: Any, code: str) -> Any:
    """Byte planes (a sequence of uint8 arrays, lowest byte first) -> the array of dtype `code` (vectorized)."""
    wide = np.dtype("<u2" if code == "H" else "<u4")
    out = planes[0].astype(wide)
    for k in range(1, len(planes)):
        high = planes[k].astype(wide)
        high <<= 8 * k
        out |= high
    return out.view(_DTYPES.get(code, "<u4"))


class TrajectoryView:
    """A stored trajectory read without copying: scalar fields in `header`, arrays as numpy views of the stored
    bytes (`array`; compressed arrays are decompressed on access), texts decoded on demand (`text`), a full
    `Trajectory` only when asked (`trajectory`)."""

    __slots__ = ("_head", "_buf", "_spans", "_hstart", "_hlen")

    def __init__(self, data: bytes) -> None:
        if data[:3] != MAGIC3:
            self._init2(data)
            return
        try:
            n = data[7]
            if n > len(_BLOB_FIELDS):  # each field has at most one span
                raise TrajectoryDecodeError(f"corrupt trajectory payload: {n} spans")
            flat = _HEADS3[n].unpack_from(data, 3)
            hstart = 8 + _SPAN3.size * n
            off = hstart + flat[0]
            spans = {}
            for k in range(2, 2 + 4 * n, 4):
                field, c, packing, nbytes = flat[k:k + 4]
                code = _CODES3.get(c)
                if code is None or packing not in _PACKINGS:
                    raise TrajectoryDecodeError(f"corrupt trajectory payload: span code {chr(c)!r}/{packing}")
                spans[_BLOB_FIELDS[field]] = (code, packing, off, nbytes)
                off += nbytes
        except (IndexError, struct.error) as e:
            raise TrajectoryDecodeError(f"corrupt trajectory payload: {e}") from e
        if off != len(data):
            raise TrajectoryDecodeError(f"corrupt trajectory payload: {len(data)} bytes, layout says {off}")
        self._buf, self._spans, self._head, self._hstart, self._hlen = data, spans, None, hstart, flat[0]

    def _init2(self, data: bytes) -> None:
        if not data.startswith(MAGIC2):
            raise TrajectoryDecodeError(f"not a codec-2/3 trajectory (magic {bytes(data[:3])!r})")
        try:
            hlen, n = _HEAD.unpack_from(data, len(MAGIC2))
            pos = len(MAGIC2) + _HEAD.size
            spans, off = _spans(data, _SPAN2, pos, n, pos + n * _SPAN2.size + hlen)
        except (IndexError, UnicodeDecodeError, struct.error) as e:
            raise TrajectoryDecodeError(f"corrupt trajectory payload: {e}") from e
        if off != len(data):
            raise TrajectoryDecodeError(f"corrupt trajectory payload: {len(data)} bytes, layout says {off}")
        self._buf, self._spans, self._head = data, spans, None
        self._hstart, self._hlen = pos + n * _SPAN2.size, hlen

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
        """numpy array (read-only) of a packed array field; None when absent. Raw spans are zero-copy views of the
        stored bytes; 3-byte ids are widened to uint32, compressed spans inflated (~5 us per 1K ids)."""
        span = self._spans.get(name)
        if span is None:
            return None
        code, packing, off, nbytes = span
        if packing == RAW and code != "T":
            dt = _NPDTYPES[code]
            return np.frombuffer(self._buf, dtype=dt, count=nbytes // dt.itemsize, offset=off)
        try:
            if code == "T" and packing in _SPAN3_READERS:
                out = _widened([_SPAN3_READERS[packing](self._buf, off, nbytes)])
            elif packing == SPLIT16:
                out = self._split16(code, off, nbytes)
            else:
                out = _joined(self._planes(code, packing, off, nbytes), code)
        except (zlib.error, ValueError, struct.error) as e:
            raise TrajectoryDecodeError(f"corrupt trajectory payload: {name}: {e}") from e
        out.flags.writeable = False
        return out

    def _split16(self, code: str, off: int, nbytes: int) -> Any:
        """Packing SPLIT16 of 4-byte ids (3-byte ones go through `_widened`): the two high byte planes joined
        above the low 16 bits."""
        n, _, low, high = _split16_span(self._buf, off, nbytes, _WIDTH[code])
        h = np.frombuffer(high, np.uint8)
        out = h[n:].astype(_U4)
        out <<= 8
        out |= h[:n]
        out <<= 16
        out |= np.frombuffer(low, _U2)
        return out.view(_NPDTYPES[code])

    def _planes(self, code: str, packing: int, off: int, nbytes: int) -> Any:
        """The byte planes of a packed token array, lowest byte first (views where the layout allows)."""
        width, mv = _WIDTH[code], memoryview(self._buf)[off:off + nbytes]
        if packing == SPLIT:
            (n,) = _U32.unpack_from(mv)
            if 4 + n > nbytes:
                raise ValueError(f"{n} ids in {nbytes} bytes")
            high = zlib.decompress(mv[4 + n:], -15, n * (width - 1) or 1)
            if len(high) != n * (width - 1):
                raise ValueError(f"{n} ids, {len(high)} bytes of high planes")
            return [np.frombuffer(mv, np.uint8, n, 4), *np.frombuffer(high, np.uint8).reshape(width - 1, n)]
        if packing not in (RAW, PLANES, ZLIB):
            raise ValueError(f"packing {packing} of token ids")
        flat = np.frombuffer(mv if packing == RAW else zlib.decompress(mv, -15 if packing == PLANES else 15), np.uint8)
        return flat.reshape(width, -1) if packing == PLANES else flat.reshape(-1, width).T

    def text(self, name: str) -> str:
        if name not in self._spans:
            return ""  # not stored (StorageConfig.store_texts = False, or empty)
        code, packing, off, nbytes = self._spans[name]
        raw = self._buf[off:off + nbytes]
        return (zlib.decompress(raw) if packing == ZLIB else raw).decode()

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.header)
        for name, span in self._spans.items():
            d[name] = self.text(name) if span[0] == "s" else self.array(name).tolist()
        for f in _FLOAT_FIELDS:
            d.setdefault(f, None)
        for f in _TEXT_FIELDS:
            d.setdefault(f, "")
        return d


def arrays(views: list[TrajectoryView], name: str) -> list[Any]:
    """`[v.array(name) for v in views]`, with 3-byte ids (the default for large vocabularies: packing BITS, or
    SPLIT16 from earlier writers) widened in one vectorized pass over the whole batch instead of a few numpy calls
    per item (32 items of 1K ids: ~160 us for BITS); each array is a read-only slice of one buffer."""
    spans = [v._spans.get(name) for v in views]
    packings = {s[1] if s is not None and s[0] == "T" else None for s in spans}
    if len(views) < 2 or not packings <= {BITS, SPLIT16}:  # `_widened` also takes a mix of the two
        return [v.array(name) for v in views]
    try:
        parts = [_SPAN3_READERS[s[1]](v._buf, s[2], s[3]) for v, s in zip(views, spans, strict=True)]
        out = _widened(parts)
    except (zlib.error, ValueError, struct.error) as e:
        raise TrajectoryDecodeError(f"corrupt trajectory payload: {name}: {e}") from e
    bounds = list(accumulate((part[0] for part in parts), initial=0))
    return [out[bounds[k]:bounds[k + 1]] for k in range(len(views))]


_Span3 = tuple[int, int, Any, Any]
"""(n ids, bits of the packed third bytes (8: raw bytes), the low 16 bits (2n bytes), the third bytes)."""


def _bits_span(buf: bytes, off: int, nbytes: int) -> _Span3:
    """Packing BITS of 3-byte ids: u32 n | u8 bits | the low 16 bits (2n bytes) | the third bytes, bit-packed."""
    mv = memoryview(buf)[off:off + nbytes]
    n, bits = _U32B.unpack_from(mv)
    if bits not in _BIT_TABLES or 5 + 2 * n + -(-n * bits // 8) != nbytes:
        raise ValueError(f"{n} ids of {bits} high bits in {nbytes} bytes")
    return n, bits, mv[5:5 + 2 * n], mv[5 + 2 * n:]


def _split16_span(buf: bytes, off: int, nbytes: int, width: int = 3) -> _Span3:
    """Packing SPLIT16: u32 n | the low 16 bits (2n bytes) | raw deflate of the width - 2 byte planes above them
    (for 4-byte ids the third bytes, then the fourth)."""
    mv = memoryview(buf)[off:off + nbytes]
    (n,) = _U32.unpack_from(mv)
    if width < 3 or 4 + 2 * n > nbytes:
        raise ValueError(f"{n} ids of width {width} in {nbytes} bytes")
    size = n * (width - 2)
    high = zlib.decompress(mv[4 + 2 * n:], -15, size or 1)
    if len(high) != size:
        raise ValueError(f"{n} ids, {len(high)} bytes of high planes")
    return n, 8, mv[4:4 + 2 * n], high


_SPAN3_READERS = {BITS: _bits_span, SPLIT16: _split16_span}
"""Packing -> the reader of a 3-byte id span of it (for `_widened`)."""


def _widened(parts: list[_Span3]) -> Any:
    """The 3-byte ids of `parts`, concatenated, as one read-only uint32 array: the third bytes unpacked by a table
    lookup per packed byte (all parts' bit-packed bytes at once when they share a width), shifted above the low
    16 bits."""
    widths = {bits for _, bits, _, _ in parts}
    if len(widths) == 1 and (bits := widths.pop()) in _BIT_TABLES:
        third = _BIT_TABLES[bits].take(np.frombuffer(b"".join(p[3] for p in parts), np.uint8)).view(np.uint8)
        per = 8 // bits
        if any(n % per for n, _, _, _ in parts):  # drop each part's padding
            starts = list(accumulate((-(-n // per) * per for n, _, _, _ in parts), initial=0))
            third = np.concatenate([third[a:a + p[0]] for a, p in zip(starts, parts, strict=False)])
    else:
        third = np.concatenate([_BIT_TABLES[bits].take(np.frombuffer(h, np.uint8)).view(np.uint8)[:n]
                                if bits in _BIT_TABLES else np.frombuffer(h, np.uint8)
                                for n, bits, _, h in parts])
    out = third.astype(_U4)
    out <<= 16
    out |= np.frombuffer(b"".join(p[2] for p in parts), _U2)
    out.flags.writeable = False
    return out


def view(data: bytes) -> TrajectoryView:
    """A TrajectoryView of stored bytes of any readable format (format 1 is converted, at a cost)."""
    if data[:3] != MAGIC:
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
    Reads codec formats 3 and 2 and the older format 1 (msgpack map with packed int32/float64 arrays)."""
    if data.startswith(MAGIC3) or data.startswith(MAGIC2):
        return TrajectoryView(data).to_dict()
    if not data.startswith(MAGIC):
        raise TrajectoryDecodeError(
            f"not a tbrm trajectory (magic {bytes(data[:3])!r}, expected {MAGIC3!r}); written by another codec?"
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
