"""The IN_FORMATS plane property: which format/modifier pairs a plane scans out, as the kernel encodes
them in a blob."""

from __future__ import annotations

import struct

from compositor.formats import modifier_name


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
