"""EDID identity: who made a monitor and which one it is — enough to match it in a policy.

Only the base block (128 bytes) matters for identity: manufacturer PNP id, product code, serial
number, year, and the monitor-name (0xFC) and serial-string (0xFF) descriptors. Extension blocks are
ignored. The kernel has already validated the blob it exposes, so a checksum mismatch is tolerated
(some monitors ship one); a blob that is too short or lacks the fixed header is an error.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from typing import Any

EDID_HEADER = b"\x00\xff\xff\xff\xff\xff\xff\x00"
_DESCRIPTOR_OFFSETS = (54, 72, 90, 108)
_TAG_SERIAL = 0xFF
_TAG_NAME = 0xFC


class EdidError(ValueError):
    """The EDID blob cannot be read as EDID."""


@dataclass(frozen=True)
class EdidIdentity:
    manufacturer: str           # three-letter PNP id
    product: int                # 16-bit product code
    serial: int                 # 32-bit serial number, 0 when unset
    serial_string: str | None   # 0xFF descriptor
    name: str | None            # 0xFC descriptor
    year: int

    @property
    def identity(self) -> str:
        """One stable string to match on: MFG:product:serial[:serial_string]."""
        base = f"{self.manufacturer}:{self.product}:{self.serial}"
        return f"{base}:{self.serial_string}" if self.serial_string else base

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "identity": self.identity}


def _descriptor_text(raw: bytes) -> str:
    text = raw.split(b"\x0a", 1)[0]
    return text.decode("cp437").rstrip(" \x00")


def parse_edid(blob: bytes) -> EdidIdentity:
    if len(blob) < 128:
        raise EdidError(f"EDID of {len(blob)} bytes is shorter than the 128-byte base block")
    if blob[:8] != EDID_HEADER:
        raise EdidError("EDID does not start with the fixed header 00 FF FF FF FF FF FF 00")
    (mfg,) = struct.unpack_from(">H", blob, 8)
    letters = [(mfg >> shift) & 0x1F for shift in (10, 5, 0)]
    if any(not 1 <= x <= 26 for x in letters):
        raise EdidError(f"EDID manufacturer id 0x{mfg:04x} is not three letters")
    manufacturer = "".join(chr(ord("A") + x - 1) for x in letters)
    product, serial = struct.unpack_from("<HI", blob, 10)
    week, year = blob[16], blob[17]
    del week
    serial_string = name = None
    for off in _DESCRIPTOR_OFFSETS:
        desc = blob[off:off + 18]
        if desc[0] or desc[1]:          # a detailed timing, not a display descriptor
            continue
        if desc[3] == _TAG_NAME and name is None:
            name = _descriptor_text(desc[5:18]) or None
        elif desc[3] == _TAG_SERIAL and serial_string is None:
            serial_string = _descriptor_text(desc[5:18]) or None
    return EdidIdentity(manufacturer, product, serial, serial_string, name, 1990 + year)


def build_edid(manufacturer: str, product: int, serial: int = 0, *, name: str | None = None,
               serial_string: str | None = None, year: int = 2020) -> bytes:
    """A minimal valid base block with the given identity (for tests and for vGPU EDID regions)."""
    if len(manufacturer) != 3 or not manufacturer.isalpha() or not manufacturer.isupper():
        raise ValueError(f"manufacturer must be three capital letters, not {manufacturer!r}")
    blob = bytearray(128)
    blob[:8] = EDID_HEADER
    mfg = 0
    for ch in manufacturer:
        mfg = (mfg << 5) | (ord(ch) - ord("A") + 1)
    struct.pack_into(">H", blob, 8, mfg)
    struct.pack_into("<HI", blob, 10, product, serial)
    blob[16], blob[17] = 1, year - 1990
    blob[18], blob[19] = 1, 4                       # EDID 1.4
    blob[20] = 0x80                                 # digital input
    descriptors = []
    if name is not None:
        descriptors.append((_TAG_NAME, name))
    if serial_string is not None:
        descriptors.append((_TAG_SERIAL, serial_string))
    for off in _DESCRIPTOR_OFFSETS:
        tag, text = descriptors.pop(0) if descriptors else (0x10, "")   # 0x10: dummy descriptor
        raw = text.encode("ascii")[:13]
        if tag == 0x10:
            raw = b"\0" * 13
        elif len(raw) < 13:
            raw += b"\x0a" + b" " * (12 - len(raw))
        blob[off:off + 18] = bytes([0, 0, 0, tag, 0]) + raw
    blob[127] = (-sum(blob[:127])) & 0xFF
    return bytes(blob)
