"""QEMU's pixels on our side: pixman formats as DRM fourccs, the memfd surface the pixel path
(Scanout / Update) draws into, what is scanned out, and the updates held while a resize's size is
asked for."""

from __future__ import annotations

import mmap
from dataclasses import dataclass

from compositor.formats import FORMATS, fourcc, fourcc_name
from compositor.pixelcopy import copy_rows
from compositor.sources.frame import BadPlane, Buffer, PlaneInfo


def _pixman(bpp: int, kind: int, a: int, r: int, g: int, b: int) -> int:
    """pixman.h's PIXMAN_FORMAT(bpp, type, a, r, g, b)."""
    return (bpp << 24) | (kind << 16) | (a << 12) | (r << 8) | (g << 4) | b


_ARGB, _ABGR, _BGRA, _RGBA = 2, 3, 8, 9  # PIXMAN_TYPE_*

# pixman format → DRM fourcc, for the formats whose memory layout is the same on a little-endian host
# (pixman names a native-endian word from its most significant bits, DRM a little-endian one: the same
# layout). QEMU's surfaces are x8r8g8b8 for 32-bit guest modes, r5g6b5 / x1r5g5b5 for 16 / 15-bit
# ones, r8g8b8 for 24-bit and b8g8r8x8 for big-endian guests.
PIXMAN_TO_DRM: dict[int, tuple[str, int]] = {
    _pixman(32, _ARGB, 8, 8, 8, 8): ("a8r8g8b8", fourcc("AR24")),
    _pixman(32, _ARGB, 0, 8, 8, 8): ("x8r8g8b8", fourcc("XR24")),
    _pixman(32, _ABGR, 8, 8, 8, 8): ("a8b8g8r8", fourcc("AB24")),
    _pixman(32, _ABGR, 0, 8, 8, 8): ("x8b8g8r8", fourcc("XB24")),
    _pixman(32, _BGRA, 8, 8, 8, 8): ("b8g8r8a8", fourcc("BA24")),
    _pixman(32, _BGRA, 0, 8, 8, 8): ("b8g8r8x8", fourcc("BX24")),
    _pixman(32, _RGBA, 8, 8, 8, 8): ("r8g8b8a8", fourcc("RA24")),
    _pixman(32, _RGBA, 0, 8, 8, 8): ("r8g8b8x8", fourcc("RX24")),
    _pixman(32, _ARGB, 2, 10, 10, 10): ("a2r10g10b10", fourcc("AR30")),
    _pixman(32, _ARGB, 0, 10, 10, 10): ("x2r10g10b10", fourcc("XR30")),
    _pixman(32, _ABGR, 2, 10, 10, 10): ("a2b10g10r10", fourcc("AB30")),
    _pixman(32, _ABGR, 0, 10, 10, 10): ("x2b10g10r10", fourcc("XB30")),
    _pixman(24, _ARGB, 0, 8, 8, 8): ("r8g8b8", fourcc("RG24")),
    _pixman(24, _ABGR, 0, 8, 8, 8): ("b8g8r8", fourcc("BG24")),
    _pixman(16, _ARGB, 0, 5, 6, 5): ("r5g6b5", fourcc("RG16")),
    _pixman(16, _ABGR, 0, 5, 6, 5): ("b5g6r5", fourcc("BG16")),
    _pixman(16, _ARGB, 1, 5, 5, 5): ("a1r5g5b5", fourcc("AR15")),
    _pixman(16, _ARGB, 0, 5, 5, 5): ("x1r5g5b5", fourcc("XR15")),
}
PIXMAN_X8R8G8B8 = _pixman(32, _ARGB, 0, 8, 8, 8)
PIXMAN_A8R8G8B8 = _pixman(32, _ARGB, 8, 8, 8, 8)


class UnsupportedFormat(BadPlane):
    """A pixel format QEMU named that directflip cannot show; the message names the value."""


def pixman_to_fourcc(code: int) -> int:
    """The DRM fourcc of a pixman format code QEMU sent; UnsupportedFormat names an unknown or
    unshowable one."""
    known = PIXMAN_TO_DRM.get(code)
    if known is None:
        raise UnsupportedFormat(
            f"pixman format 0x{code:08x} is unknown to directflip (known: "
            + ", ".join(f"{name} 0x{value:08x}" for value, (name, _) in sorted(PIXMAN_TO_DRM.items()))
            + ")")
    name, drm = known
    if drm not in FORMATS:
        raise UnsupportedFormat(f"pixman format {name} (0x{code:08x}) is DRM {fourcc_name(drm)}, which "
                                f"directflip cannot show")
    return drm


@dataclass
class Surface:
    """Our copy of QEMU's surface for the pixel path: a memfd the daemon copies from, mapped here."""

    buffer: Buffer
    map: mmap.mmap
    pixman: int

    @property
    def info(self) -> PlaneInfo:
        return self.buffer.info

    def write(self, x: int, y: int, width: int, height: int, src, stride: int, offset: int = 0) -> None:
        """Copy width x height pixels of `src` (rows `stride` bytes apart from byte `offset`) to (x, y)
        of the surface. kms_copy_rows checks both sides' rows against their sizes: QEMU's message says
        how its bytes are laid out, and a copy past our mapping would crash the daemon."""
        info = self.info
        bpp = info.bytes_per_pixel
        copy_rows(self.map, info.offset + y * info.stride + x * bpp, info.stride, src, offset, stride, height,
                  width * bpp)


@dataclass
class Scanout:
    """What is shown: a dma-buf, a shared map or our pixel surface, and which way up."""

    kind: str  # dmabuf | map | pixels
    buffer: Buffer
    y0_top: bool = True


@dataclass
class HeldUpdate:
    """A pixel update that did not fit the surface, kept until the console's new size is known."""

    x: int
    y: int
    width: int
    height: int
    stride: int
    pixman: int
    data: bytes
