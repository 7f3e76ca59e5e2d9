"""The pixel-format vocabulary: DRM fourcc codes and format modifiers, pure data.

Sources, the policy and the KMS layer all speak it; none of them needs a device or the KMS layer to
name a format. The IN_FORMATS blob, which only a card reports, is decoded in compositor.kms.in_formats.
"""

from __future__ import annotations

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
