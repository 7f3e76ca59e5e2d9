"""What a source hands the scanout pipeline: buffers (a dma-buf and how its pixels are laid out) and
frames (this buffer, show it now).

A buffer is announced once and flipped many times; the pipeline keys its framebuffer cache by
(guest, buffer id), so a buffer is imported once however often it is shown. Everything a guest says
about a buffer is checked here before any of it reaches KMS: a plane that would make the display
engine read outside the dma-buf is refused with the reason, because no pixel outside a guest's buffer
may ever be scanned out.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import time
from dataclasses import dataclass, field

from compositor.formats import (
    ARGB8888,
    DRM_FORMAT_MOD_INVALID,
    DRM_FORMAT_MOD_LINEAR,
    FORMATS,
    fourcc_name,
)

log = logging.getLogger(__name__)

MAX_DIMENSION = 16384  # no display engine we know scans out more per axis
# Bytes a row may be padded by (stride - width × bytes per pixel): what GPUs align a row to (64 bytes,
# 256, a 4 KiB page for some tiled layouts), and no more. A plane's span then stays within its visible
# bytes plus 4 KiB a row, so no valid plane makes a copy read gigabytes for a small picture.
MAX_STRIDE_SLACK = 4096


class BadPlane(ValueError):
    """Plane information that cannot be shown safely; the message names the field and the cause."""


@dataclass(frozen=True)
class PlaneInfo:
    """How a single-plane RGB framebuffer lies in its dma-buf."""

    fourcc: int  # DRM fourcc code (compositor.formats.fourcc("XR24"))
    width: int
    height: int
    stride: int  # bytes from one row to the next
    offset: int = 0  # bytes from the dma-buf's start to the first pixel
    modifier: int = DRM_FORMAT_MOD_LINEAR

    @property
    def bytes_per_pixel(self) -> int:
        return FORMATS[self.fourcc].bpp // 8

    @property
    def span(self) -> int:
        """Bytes of the dma-buf the display engine reads: from offset to the last pixel's end."""
        return self.offset + self.stride * (self.height - 1) + self.width * self.bytes_per_pixel

    def validate(self, dmabuf_size: int | None = None) -> None:
        """Raise BadPlane unless this plane is safe to scan out of a dma-buf of dmabuf_size bytes
        (None: size unknown, everything else is still checked)."""
        if self.fourcc not in FORMATS:
            raise BadPlane(f"format {fourcc_name(self.fourcc)} is not one directflip can show "
                           f"(supported: {', '.join(sorted(fourcc_name(f) for f in FORMATS))})")
        for name in ("width", "height"):
            value = getattr(self, name)
            if not 0 < value <= MAX_DIMENSION:
                raise BadPlane(f"{name} {value} is outside 1..{MAX_DIMENSION}")
        if self.offset < 0:
            raise BadPlane(f"offset {self.offset} is negative")
        row = self.width * self.bytes_per_pixel
        if self.modifier in (DRM_FORMAT_MOD_LINEAR, DRM_FORMAT_MOD_INVALID) and self.stride < row:
            raise BadPlane(f"stride {self.stride} is shorter than a row of {self.width} "
                           f"{fourcc_name(self.fourcc)} pixels ({row} bytes)")
        if self.stride <= 0:
            raise BadPlane(f"stride {self.stride} is not positive")
        if self.stride > row + MAX_STRIDE_SLACK:
            raise BadPlane(f"stride {self.stride} is longer than a row of {self.width} "
                           f"{fourcc_name(self.fourcc)} pixels ({row} bytes) needs, even with "
                           f"{MAX_STRIDE_SLACK} bytes of padding")
        if dmabuf_size is not None and self.span > dmabuf_size:
            raise BadPlane(f"the plane ({self.width}x{self.height}, stride {self.stride}, offset "
                           f"{self.offset}) needs {self.span} bytes but the dma-buf has {dmabuf_size}")

    def describe(self) -> str:
        return f"{self.width}x{self.height} {fourcc_name(self.fourcc)} stride {self.stride}"


def dmabuf_size(fd: int) -> int:
    """A dma-buf's size: seeking to its end is the kernel's documented way to ask. A directory seeks
    too (to 2**63 - 1 on ext4) but holds no pixels: IsADirectoryError."""
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
    size = os.lseek(fd, 0, os.SEEK_END)
    os.lseek(fd, 0, os.SEEK_SET)
    return size


_SERIALS = itertools.count(1)


@dataclass(eq=False)
class Buffer:
    """A guest buffer the compositor holds: it owns `fd` (a dma-buf) until close()."""

    guest: str
    id: int  # the guest's name for it (VFIO dmabuf_id, a frame-socket buffer id)
    info: PlaneInfo
    fd: int
    mmap_offset: int = 0  # where the layout's offset 0 lies in fd (a device region's file offset)
    copy_only: str | None = None  # why the buffer cannot be imported (it is not a dma-buf), if so
    # Who holds it (the daemon counts them: its guest's latest frame, each output that has it pending,
    # in flight or on screen, a capture reading it) and the daemon's record of the guest it belongs
    # to: the buffer itself says whose it is and when it is free, nothing has to search for it.
    holds: int = 0
    owner: object = field(default=None, repr=False)
    forgotten: bool = False  # its guest forgot it (or went away): closed once nothing holds it
    serial: int = field(default_factory=lambda: next(_SERIALS), repr=False)  # unique in the process
    # The native data plane's handle of it (compositor.dataplane), or -1. While it has one, the data
    # plane counts its holds (and tells the guest `released`), not `holds` above.
    dp_handle: int = field(default=-1, repr=False)

    def close(self) -> None:
        """Close the descriptor once. Linux releases it even when close() reports an error (EIO from
        the file's filesystem, say), so an error is logged and never raised: every caller closing
        many buffers goes on to the next."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError as exc:
                log.warning("guest %s: closing buffer %d said %s", self.guest, self.id, exc.strerror)

    @property
    def key(self) -> tuple[str, int, int]:
        """What the caches of imported framebuffers and copy mappings know it by: its guest, its id
        and its serial, so a buffer announced under an id that a forgotten one still on screen had
        is never mistaken for it."""
        return (self.guest, self.id, self.serial)


@dataclass(eq=False)
class Frame:
    """Show `buffer` now. `received_ns` is CLOCK_MONOTONIC when the source learnt of the flip: flip
    latency is measured from it to the flip event's timestamp (same clock)."""

    buffer: Buffer
    seq: int = 0  # the source's frame number, when it has one
    received_ns: int = field(default_factory=time.monotonic_ns)
    presented: bool = False  # set once its first flip completed (a mirrored frame flips twice)


MAX_CURSOR = 512  # pixels per side a guest may define; cursor planes take 64 to 256


@dataclass(frozen=True)
class Cursor:
    """A guest's pointer image: ARGB8888 rows of width * 4 bytes (premultiplied or not, as the guest
    draws it; B, G, R, A in memory), the hot spot in it. `serial` changes with every new image, so a
    cursor plane can tell a new image from the same one."""

    width: int
    height: int
    hot_x: int
    hot_y: int
    pixels: bytes
    serial: int
    fourcc: int = ARGB8888

    def __post_init__(self) -> None:
        if not (0 < self.width <= MAX_CURSOR and 0 < self.height <= MAX_CURSOR):
            raise BadPlane(f"cursor {self.width}x{self.height} is outside 1..{MAX_CURSOR} per side")
        if not (0 <= self.hot_x < self.width and 0 <= self.hot_y < self.height):
            raise BadPlane(f"cursor hot spot ({self.hot_x}, {self.hot_y}) lies outside its "
                           f"{self.width}x{self.height} image")
        if len(self.pixels) != self.width * self.height * 4:
            raise BadPlane(f"cursor {self.width}x{self.height} ARGB8888 is {self.width * self.height * 4} "
                           f"bytes, not {len(self.pixels)}")


@dataclass(frozen=True)
class Pointer:
    """Where a guest's pointer is (its hot spot, in the guest's framebuffer pixels) and whether the
    guest shows it."""

    x: int
    y: int
    visible: bool

