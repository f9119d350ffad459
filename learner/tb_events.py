"""TensorBoard event files written and read without TensorFlow, tensorboard or tensorboardX (standard library only).

tensorboardX imports torch when it is imported (its writer module does), which would cost the `tbrm up` launcher
seconds of CPU and hundreds of MB at start-up; the format is small enough to write directly:

- a file `events.out.tfevents.<unix time>.<host>` is a sequence of TFRecords: u64 length, u32 masked CRC-32C of
  the length, the bytes, u32 masked CRC-32C of the bytes (mask: rotate right by 15, add 0xa282ead8);
- each record is a serialized `tensorflow.Event` protobuf: wall_time (1, double), step (2, int64), file_version
  (3, string; the first record, "brain.Event:2") or summary (5, message);
- a `Summary` holds values (1): tag (1), simple_value (2, float) for scalars; for text, metadata (9) naming the
  "text" plugin and a string tensor (8: dtype 7 = DT_STRING, shape [1], string_val 8).

Only these fields are written and read. tests/unit/deploy_eco checks the files against tensorboardX's own protobuf
classes when that package is installed.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    c = crc32c(data)
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ---- protobuf wire format: just what the Event/Summary messages above need ----


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 (negative steps) as two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    head = _varint(num << 3 | wire)
    return head + (_varint(len(payload)) + payload if wire == 2 else payload)


def _event(step: int, summary: bytes | None = None, file_version: str | None = None) -> bytes:
    out = _field(1, 1, struct.pack("<d", time.time())) + _field(2, 0, _varint(step))
    if file_version is not None:
        out += _field(3, 2, file_version.encode())
    if summary is not None:
        out += _field(5, 2, summary)
    return out


def scalar_value(tag: str, value: float) -> bytes:
    return _field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", value)))


def text_value(tag: str, text: str) -> bytes:
    metadata = _field(1, 2, _field(1, 2, b"text"))  # SummaryMetadata.plugin_data.plugin_name
    shape = _field(2, 2, _field(1, 0, _varint(1)))  # TensorShapeProto.dim[0].size = 1
    tensor = _field(1, 0, _varint(7)) + _field(2, 2, shape) + _field(8, 2, text.encode())
    return _field(1, 2, _field(1, 2, f"{tag}/text_summary".encode()) + _field(8, 2, tensor) + _field(9, 2, metadata))


class EventWriter:
    """Appends events to one new event file in `log_dir`; every write is flushed (one line per step is cheap)."""

    def __init__(self, log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}"
        self.path = log_dir / name
        self.file = self.path.open("ab")
        self._write(_event(0, file_version="brain.Event:2"))

    def _write(self, record: bytes) -> None:
        head = struct.pack("<Q", len(record))
        self.file.write(head + struct.pack("<I", _masked(head)) + record + struct.pack("<I", _masked(record)))
        self.file.flush()

    def scalars(self, values: dict[str, float], step: int) -> None:
        self._write(_event(step, b"".join(scalar_value(k, v) for k, v in values.items())))

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self._write(_event(step, text_value(tag, text)))

    def close(self) -> None:
        self.file.close()


# ---- reading back ----


def records(path: Path) -> Iterator[bytes]:
    """The TFRecords of one file; a torn last record (the writer was killed) ends the iteration."""
    with path.open("rb") as f:
        while len(head := f.read(12)) == 12:
            (n,) = struct.unpack("<Q", head[:8])
            data = f.read(n)
            f.read(4)
            if len(data) < n:
                return
            yield data


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def fields(buf: bytes) -> Iterator[tuple[int, int | float | bytes]]:
    """(field number, value) of a protobuf message: varints as int, fixed64 as double, fixed32 as float, else bytes."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
            yield num, value
        elif wire == 1:
            yield num, struct.unpack("<d", buf[i : i + 8])[0]
            i += 8
        elif wire == 5:
            yield num, struct.unpack("<f", buf[i : i + 4])[0]
            i += 4
        elif wire == 2:
            n, i = _read_varint(buf, i)
            yield num, buf[i : i + n]
            i += n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def read_events(path: Path) -> Iterator[tuple[int, str, float | str]]:
    """(step, tag, value) of every scalar (float) and text (str, tag without the /text_summary suffix)."""
    for raw in records(path):
        ev = dict(fields(raw))
        step = int(ev.get(2, 0))
        if step >= 1 << 63:
            step -= 1 << 64
        summary = ev.get(5)
        if not isinstance(summary, bytes):
            continue
        for num, value in fields(summary):
            if num != 1 or not isinstance(value, bytes):
                continue
            v = dict(fields(value))
            tag = v.get(1, b"").decode() if isinstance(v.get(1), bytes) else ""
            if 2 in v:
                yield step, tag, float(v[2])
            elif isinstance(v.get(8), bytes):
                text = dict(fields(v[8])).get(8, b"")
                yield step, tag.removesuffix("/text_summary"), text.decode() if isinstance(text, bytes) else ""
