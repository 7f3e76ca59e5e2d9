"""The frame socket's wire format (docs/frame-socket.md): framing, JSON messages and the binary
records of protocol version 2, for both ends.

Every message starts with a 32-bit little-endian word W. 1 ≤ W ≤ MAX_MESSAGE: W bytes of UTF-8 JSON
follow (versions 1 and 2). W = RECORD | kind: a fixed-size binary record follows (version 2): `flip`
from the client, `presented` and `released` from the compositor, the messages of every frame.

The decoder is the C helper's fs_decode (native/fs_codec.c), which checks each word and record
against the bytes there are; this module turns what it found into dicts (JSON) and `Record`s.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

from compositor._native import ffi, lib

VERSIONS = (1, 2)           # the protocol versions this implementation speaks
MAX_MESSAGE = lib.FS_MAX_JSON   # bytes of JSON in one message
RECORD = lib.FS_RECORD
FLIP, PRESENTED, RELEASED = lib.FS_FLIP, lib.FS_PRESENTED, lib.FS_RELEASED
SERVER, CLIENT = lib.FS_SERVER, lib.FS_CLIENT   # which end reads

_LENGTH = struct.Struct("<I")
_FLIP = struct.Struct("<IIQ")           # word, id, frame
_PRESENTED = struct.Struct("<IIIQQQ")   # word, id, 0, frame, timestamp_ns, sequence
_RELEASED = struct.Struct("<II")        # word, id
_BATCH = 256                            # records per fs_decode call
_KIND_NAMES = {FLIP: "flip", PRESENTED: "presented", RELEASED: "released"}


class ProtocolError(ValueError):
    """A message, or a descriptor, that breaks the frame-socket protocol; the text names the cause."""


class Record(NamedTuple):
    """A binary record: `kind` is FLIP, PRESENTED or RELEASED; the fields it does not carry are 0."""

    kind: int
    id: int
    frame: int = 0
    timestamp_ns: int = 0
    sequence: int = 0


def encode(msg: dict[str, Any]) -> bytes:
    """One JSON message on the wire: length word and compact JSON. Raises ValueError for a message
    the protocol cannot carry (no string "type", NaN, more than MAX_MESSAGE bytes)."""
    if not isinstance(msg.get("type"), str):
        raise ValueError(f'a frame-socket message needs a string "type": {msg!r}')
    body = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode()
    if len(body) > MAX_MESSAGE:
        raise ValueError(f"a {msg['type']} message of {len(body)} bytes is over the {MAX_MESSAGE}-byte limit")
    return _LENGTH.pack(len(body)) + body


def flip_record(buffer_id: int, frame: int) -> bytes:
    return _FLIP.pack(RECORD | FLIP, buffer_id, frame)


def presented_record(buffer_id: int, frame: int, timestamp_ns: int, sequence: int) -> bytes:
    return _PRESENTED.pack(RECORD | PRESENTED, buffer_id, 0, frame, timestamp_ns, sequence)


def released_record(buffer_id: int) -> bytes:
    return _RELEASED.pack(RECORD | RELEASED, buffer_id)


class Decoder:
    """Incremental reader of a message stream: feed it bytes as they arrive, in any pieces, and
    iterate what feed() returns for every message completed so far: a dict for a JSON message, a
    Record for a binary one. `reader` is SERVER or CLIENT (the records each end receives); `version`
    may be raised from 1 to 2 once hello and welcome agreed on it, also while iterating.

    The first malformed message raises ProtocolError (messages before it have been yielded); the
    stream cannot be resynchronised after that. Consume each feed()'s iterator before the next feed.
    """

    def __init__(self, reader: int = SERVER, version: int = 1) -> None:
        self.reader = reader
        self.version = version
        self._buf = bytearray()
        self._pos = 0  # start of the first unconsumed byte in _buf
        self._base = 0  # stream offset of _buf[0]
        self.start = 0  # stream offset of the first byte of the message yielded last
        self._out = ffi.new("struct fs_record[]", _BATCH)
        self._used = ffi.new("size_t *")
        self._error = ffi.new("int *")

    def feed(self, data: bytes) -> Iterator[dict[str, Any] | Record]:
        if self._pos:
            # compact once per feed, not once per message: a batch holds thousands of flips
            del self._buf[:self._pos]
            self._base += self._pos
            self._pos = 0
        self._buf += data
        return self._messages()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held back."""
        return len(self._buf) - self._pos

    def needed(self) -> int:
        """Bytes still missing from the next message (at least 1): a reader that takes no more stops at
        a message boundary and leaves what follows in its socket."""
        have = self.pending
        if have < _LENGTH.size:
            return _LENGTH.size - have
        (word,) = _LENGTH.unpack_from(self._buf, self._pos)
        if word & RECORD and self.version >= 2:
            size = lib.fs_record_size(word & 0xFF) or 1
        else:
            size = min(word, MAX_MESSAGE)
        return max(1, _LENGTH.size + size - have)

    def _messages(self) -> Iterator[dict[str, Any] | Record]:
        while self._pos < len(self._buf):
            base, version = self._pos, self.version
            found, failed, stop, full = self._scan(base)
            for start, end, item in found:
                self.start = self._base + base + start
                self._pos = base + end
                yield _parse_body(item) if isinstance(item, bytes) else item
            self._pos = stop
            if failed != lib.FS_OK:
                if self.version != version:
                    continue   # hello or welcome raised the version: what follows reads anew
                self.start = self._base + self._pos
                raise ProtocolError(self._describe(failed))
            if not full:
                return

    def _scan(self, base: int) -> tuple[list[tuple[int, int, bytes | Record]], int, int, bool]:
        """One fs_decode call from _buf[base:]: ([(start, end, JSON body or Record)] relative to
        base, error, where decoding stopped (absolute), whether the batch was full)."""
        out, used, error = self._out, self._used, self._error
        with ffi.from_buffer(self._buf) as view:   # released before anything is yielded
            n = lib.fs_decode(view + base, len(self._buf) - base, self.version, self.reader, out, _BATCH,
                              used, error)
            found: list[tuple[int, int, bytes | Record]] = []
            for i in range(n):
                rec = out[i]
                if rec.kind == lib.FS_JSON:
                    end = rec.offset + rec.length
                    found.append((rec.start, end, bytes(self._buf[base + rec.offset:base + end])))
                else:
                    found.append((rec.start, rec.start + 4 + lib.fs_record_size(rec.kind),
                                  Record(rec.kind, rec.id, rec.frame, rec.timestamp_ns, rec.sequence)))
            return found, error[0], base + used[0], n == _BATCH

    def _describe(self, error: int) -> str:
        (word,) = _LENGTH.unpack_from(self._buf, self._pos)
        if error == lib.FS_E_LENGTH:
            return f"message length {word} is outside 1..{MAX_MESSAGE}"
        kind = word & 0xFF
        name = _KIND_NAMES.get(kind, f"kind {kind}")
        if error == lib.FS_E_KIND:
            side = "the compositor" if self.reader == SERVER else "a client"
            return f"binary record {name} (word 0x{word:08x}) is not one {side} receives"
        if error == lib.FS_E_RESERVED:
            return f"binary record {name} (word 0x{word:08x}) has reserved bits set"
        if error == lib.FS_E_ID:
            return f"binary record {name} names buffer id 0"
        return f"the frame-socket decoder refused its input (error {error})"


def split(stream: bytes, version: int, reader: int) -> tuple[list[bytes | Record], bool]:
    """Every message at the start of `stream` as the C decoder reads it, JSON bodies unparsed, and
    whether it stopped at a malformed one (for tests and fuzzing: the framing alone)."""
    decoder = Decoder(reader, version)
    decoder._buf += stream
    items: list[bytes | Record] = []
    while True:
        found, failed, stop, full = decoder._scan(decoder._pos)
        items += [item for _, _, item in found]
        decoder._pos = stop
        if failed != lib.FS_OK:
            return items, True
        if not full:
            return items, False


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _parse_body(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"message is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        msg = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ProtocolError("message is not valid JSON (nested too deeply)") from None
    except ValueError as exc:
        raise ProtocolError(f"message is not valid JSON ({exc})") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"message is {json_kind(msg)}, not a JSON object")
    if not isinstance(msg.get("type"), str):
        raise ProtocolError('message has no string "type"')
    return msg


def json_kind(value: Any) -> str:
    """'an array', 'a string', 'null'...: for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)
