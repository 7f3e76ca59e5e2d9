"""The frame socket's wire format as docs/frame-socket.md defines it, written plainly in Python: what
the C decoder (native/fs_codec.c, through compositor.sources.fswire.split) must agree with, in the
unit tests and in the fuzzer (tests/reliability/fuzz_wire.py)."""

from __future__ import annotations

import struct
from typing import Any

from compositor.sources.fswire import FLIP, MAX_MESSAGE, PRESENTED, RECORD, RELEASED, SERVER, Record


def reference(stream: bytes, reader: int, records: bool = True) -> tuple[list[Any], bool]:
    """The format as docs/frame-socket.md defines it, written plainly: (messages, whether it stopped
    at a malformed one). JSON bodies are kept as bytes. records=False: version 1, where a word with
    its top bit set is a length out of range."""
    sizes = {FLIP: 12, PRESENTED: 32, RELEASED: 4}
    allowed = {FLIP} if reader == SERVER else {PRESENTED, RELEASED}
    out, pos = [], 0
    while len(stream) - pos >= 4:
        (word,) = struct.unpack_from("<I", stream, pos)
        if not word & RECORD or not records:
            if word == 0 or word > MAX_MESSAGE:
                return out, True
            if len(stream) - pos - 4 < word:
                return out, False
            out.append(stream[pos + 4:pos + 4 + word])
            pos += 4 + word
            continue
        kind = word & 0xFF
        if word & 0x7FFFFF00:
            return out, True
        if kind not in allowed:
            return out, True
        if len(stream) - pos - 4 < sizes[kind]:
            return out, False
        body = stream[pos + 4:pos + 4 + sizes[kind]]
        if kind == FLIP:
            bid, frame = struct.unpack("<IQ", body)
            rec = Record(FLIP, bid, frame)
        elif kind == PRESENTED:
            bid, zero, frame, ts, seq = struct.unpack("<IIQQQ", body)
            if zero:
                return out, True
            rec = Record(PRESENTED, bid, frame, ts, seq)
        else:
            (bid,) = struct.unpack("<I", body)
            rec = Record(RELEASED, bid)
        if bid == 0:
            return out, True
        out.append(rec)
        pos += 4 + sizes[kind]
    return out, False
