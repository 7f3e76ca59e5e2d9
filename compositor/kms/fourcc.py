"""DRM fourcc codes, format modifiers and the IN_FORMATS blob — pure data, no device needed."""

from __future__ import annotations

import struct
from dataclasses import dataclass


def fourcc(code: str) -> int:
    """'XR24' → DRM_FORMAT_XRGB8888."""
    if len(code) != 4:
        raise ValueError(f"a fourcc has four characters, not {code!r}")
    a, b, c, d = (ord(ch) for ch in code)
    return a | (b << 8) | (c << 16) | (d << 24)


def fourcc_name(value: int) -> str:
    """DRM_FORMAT_XRGB8888 → 'XR24'; a value that is not printable comes back as hex."""
    chars = bytes((value >> shift) & 0xFF for shift in (0, 8, 16, 24))
    if all(0x20 <= ch < 0x7F for ch in chars):
        return chars.decode("ascii")
    return f"0x{value:08x}"


@dataclass(frozen=True)
class FormatInfo:
    bpp: int          # bits per pixel of the (single) plane
    depth: int        # legacy depth, 0 when it has none
    has_alpha: bool


# The single-plane RGB formats directflip handles (enough for every vGPU plane we know of).
FORMATS: dict[int, FormatInfo] = {
    fourcc("XR24"): FormatInfo(32, 24, False),  # XRGB8888
    fourcc("AR24"): FormatInfo(32, 32, True),   # ARGB8888
    fourcc("XB24"): FormatInfo(32, 24, False),  # XBGR8888
    fourcc("AB24"): FormatInfo(32, 32, True),   # ABGR8888
    fourcc("RX24"): FormatInfo(32, 24, False),  # RGBX8888
    fourcc("BX24"): FormatInfo(32, 24, False),  # BGRX8888
    fourcc("XR30"): FormatInfo(32, 30, False),  # XRGB2101010
    fourcc("AR30"): FormatInfo(32, 30, True),   # ARGB2101010
    fourcc("RG16"): FormatInfo(16, 16, False),  # RGB565
    fourcc("RG24"): FormatInfo(24, 24, False),  # RGB888
    fourcc("BG24"): FormatInfo(24, 24, False),  # BGR888
}

XRGB8888 = fourcc("XR24")
ARGB8888 = fourcc("AR24")

DRM_FORMAT_MOD_LINEAR = 0
DRM_FORMAT_MOD_INVALID = (1 << 56) - 1

_VENDORS = {0: "", 1: "INTEL", 2: "AMD", 3: "NVIDIA", 4: "SAMSUNG", 5: "QCOM", 6: "VIVANTE",
            7: "BROADCOM", 8: "ARM", 9: "ALLWINNER", 10: "AMLOGIC"}
_NAMED_MODIFIERS = {
    DRM_FORMAT_MOD_LINEAR: "LINEAR",
    DRM_FORMAT_MOD_INVALID: "INVALID",
    (1 << 56) | 1: "I915_X_TILED",
    (1 << 56) | 2: "I915_Y_TILED",
    (1 << 56) | 3: "I915_Yf_TILED",
    (1 << 56) | 4: "I915_Y_TILED_CCS",
    (1 << 56) | 5: "I915_Yf_TILED_CCS",
    (1 << 56) | 9: "I915_4_TILED",
}


def modifier_name(mod: int) -> str:
    """A readable name for a format modifier: 'LINEAR', 'I915_X_TILED', or 'AMD:0x...'."""
    if mod in _NAMED_MODIFIERS:
        return _NAMED_MODIFIERS[mod]
    vendor = mod >> 56
    return f"{_VENDORS.get(vendor, str(vendor))}:0x{mod & ((1 << 56) - 1):x}"


def modifier_value(name: str) -> int:
    """Inverse of modifier_name for names it produces, plus plain integers ('0x...')."""
    for value, known in _NAMED_MODIFIERS.items():
        if known == name:
            return value
    vendor, sep, rest = name.partition(":")
    if sep:
        codes = {v: k for k, v in _VENDORS.items()}
        if vendor not in codes and not vendor.isdigit():
            raise ValueError(f"unknown modifier vendor {vendor!r}")
        return (codes.get(vendor, int(vendor) if vendor.isdigit() else 0) << 56) | int(rest, 0)
    return int(name, 0)


class BlobError(ValueError):
    """A property blob whose contents do not fit its own header."""


# struct drm_format_modifier_blob { u32 version, flags, count_formats, formats_offset,
#                                   count_modifiers, modifiers_offset; }
_BLOB_HEADER = struct.Struct("<6I")
# struct drm_format_modifier { u64 formats; u32 offset; u32 pad; u64 modifier; }
_MODIFIER = struct.Struct("<QIIQ")
FORMAT_BLOB_CURRENT = 1


def parse_in_formats(blob: bytes) -> dict[int, list[int]]:
    """Decode an IN_FORMATS blob into {fourcc: [modifiers]} in the blob's order.

    Each drm_format_modifier entry says which of 64 consecutive formats (starting at index `offset`
    of the format list) support its modifier, one bit each. Every offset and count is checked
    against the blob's length: a malformed blob raises BlobError instead of reading past its end.
    """
    if len(blob) < _BLOB_HEADER.size:
        raise BlobError(f"IN_FORMATS blob of {len(blob)} bytes is shorter than its header")
    version, _flags, n_fmt, fmt_off, n_mod, mod_off = _BLOB_HEADER.unpack_from(blob, 0)
    if version != FORMAT_BLOB_CURRENT:
        raise BlobError(f"IN_FORMATS blob version {version} is not the one known ({FORMAT_BLOB_CURRENT})")
    if fmt_off + 4 * n_fmt > len(blob):
        raise BlobError(f"IN_FORMATS lists {n_fmt} formats at offset {fmt_off}, past the blob's "
                        f"{len(blob)} bytes")
    if mod_off + _MODIFIER.size * n_mod > len(blob):
        raise BlobError(f"IN_FORMATS lists {n_mod} modifiers at offset {mod_off}, past the blob's "
                        f"{len(blob)} bytes")
    formats = list(struct.unpack_from(f"<{n_fmt}I", blob, fmt_off))
    result: dict[int, list[int]] = {fmt: [] for fmt in formats}
    for i in range(n_mod):
        mask, offset, _pad, modifier = _MODIFIER.unpack_from(blob, mod_off + i * _MODIFIER.size)
        for bit in range(64):
            if mask & (1 << bit):
                index = offset + bit
                if index >= n_fmt:
                    raise BlobError(f"IN_FORMATS modifier {modifier_name(modifier)} names format "
                                    f"#{index} of {n_fmt}")
                mods = result[formats[index]]
                if modifier not in mods:
                    mods.append(modifier)
    return result


def build_in_formats(table: dict[int, list[int]]) -> bytes:
    """Encode {fourcc: [modifiers]} as the kernel would (for tests and fakes)."""
    formats = list(table)
    modifiers: list[int] = []
    for mods in table.values():
        for mod in mods:
            if mod not in modifiers:
                modifiers.append(mod)
    fmt_off = _BLOB_HEADER.size
    mod_off = fmt_off + 4 * len(formats)
    mod_off += (-mod_off) % 8
    entries = []
    for mod in modifiers:
        for base in range(0, max(len(formats), 1), 64):
            mask = 0
            for bit, fmt in enumerate(formats[base:base + 64]):
                if mod in table[fmt]:
                    mask |= 1 << bit
            if mask:
                entries.append(_MODIFIER.pack(mask, base, 0, mod))
    out = bytearray(_BLOB_HEADER.pack(FORMAT_BLOB_CURRENT, 0, len(formats), fmt_off, len(entries), mod_off))
    out += struct.pack(f"<{len(formats)}I", *formats)
    out += b"\0" * (mod_off - len(out))
    for entry in entries:
        out += entry
    return bytes(out)
