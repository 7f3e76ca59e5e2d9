"""The copy rung: a guest's pixels copied into dumb buffers of the card's own.

When the card refuses the guest's buffer (a foreign dma-buf on virtio-gpu, a buffer the TEST_ONLY
commit rejects), the pipeline copies each frame it commits into one of two buffers of its own, the
size of the mode, and scans those out instead. A copy can run on a worker thread (prepare on the loop,
run anywhere, finish on the loop), so this module touches no pipeline state: it is given a buffer and
hands back the framebuffer the pixels are in. `directflip capture` (compositor/capture.py) reads a
guest's buffer with the same helpers (_source, _read_file, _dmabuf_sync): it needs the same care with
files that shrink and fences that never signal.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
from dataclasses import dataclass

from compositor.formats import DRM_FORMAT_MOD_INVALID, DRM_FORMAT_MOD_LINEAR, FORMATS
from compositor.kms import Card, Framebuffer, KmsError, Rejected
from compositor.kms.card import DumbBuffer
from compositor.kms.wait import readable
from compositor.pixelcopy import copy_rows
from compositor.planner import Rect
from compositor.sources.frame import Buffer, PlaneInfo

log = logging.getLogger("directflip.scanout")

# DMA_BUF_IOCTL_SYNC = _IOW('b', 0, struct dma_buf_sync { __u64 flags; })
DMA_BUF_IOCTL_SYNC = 0x40086200
DMA_BUF_SYNC_READ, DMA_BUF_SYNC_START, DMA_BUF_SYNC_END = 1, 0, 4

FENCE_TIMEOUT = 0.5   # seconds a copy waits for the writes pending on a guest's dma-buf


class FenceTimeout(OSError):
    """A guest's dma-buf still had writes pending (an unsignalled fence) when a copy wanted it."""


@dataclass(eq=False)
class _CopyJob:
    buffer: Buffer
    src_map: mmap.mmap | bytearray
    dst_buf: DumbBuffer
    dst_map: mmap.mmap
    fb: Framebuffer


class CopyBuffers:
    """The pipeline's own dumb buffers for the copy rung, the size of the mode: the planned `src`
    rectangle of the guest's buffer is copied to the planned `dst` rectangle, the rest stays black.
    So a card that refuses the guest's buffer, or refuses to position a plane (virtio-gpu's primary
    plane must cover the whole CRTC), still shows the picture where the plan puts it. Two buffers,
    so one can be written while the other is on screen (a copy is only made when no commit is in
    flight). A copy cannot scale: a plan that scales needs a plane that does. `native`: the copy is
    kms_copy_rows (native/kms_helpers.c), else the pure-Python copy of `--pure-python`."""

    def __init__(self, card: Card, info: PlaneInfo, size: tuple[int, int], src: Rect, dst: Rect, *,
                 native: bool = True) -> None:
        if info.modifier not in (DRM_FORMAT_MOD_LINEAR, DRM_FORMAT_MOD_INVALID):
            raise Rejected("copy", 22, "the buffer is tiled (format modifier set); a CPU copy would "
                           "scramble it")
        if (src.w, src.h) != (dst.w, dst.h):
            raise Rejected("copy", 22, f"the plan scales {src} to {dst}; a copy cannot scale")
        self.card = card
        self.info, self.size, self.src, self.dst = info, size, src, dst
        self.native = native
        self.slots: list[tuple[DumbBuffer, Framebuffer]] = []
        bpp = FORMATS[info.fourcc].bpp
        for _ in range(2):
            buf = card.create_dumb(size[0], size[1], bpp)
            buf.map()[:] = bytes(buf.size)
            fb = card.add_framebuffer(size[0], size[1], info.fourcc, [buf.handle], [buf.pitch], [0],
                                      DRM_FORMAT_MOD_LINEAR)
            self.slots.append((buf, fb))
        self._maps: dict[tuple[str, int, int], mmap.mmap] = {}
        self._busy = 0            # copies prepared and not finished
        self._forgotten: list[tuple[str, int, int]] = []
        self._closing = False

    def fits(self, info: PlaneInfo, size: tuple[int, int], src: Rect, dst: Rect) -> bool:
        return ((info.width, info.height, info.fourcc, size, src, dst)
                == (self.info.width, self.info.height, self.info.fourcc, self.size, self.src, self.dst))

    def copy(self, buffer: Buffer, on_screen: Framebuffer | None = None) -> Framebuffer:
        """Copy the buffer's pixels into a slot that is not `on_screen`; returns its framebuffer."""
        job = self.prepare(buffer, on_screen)
        try:
            self.run(job)
        finally:
            self.finish(job)
        return job.fb

    def prepare(self, buffer: Buffer, on_screen: Framebuffer | None = None) -> _CopyJob:
        """The copy of `buffer` into a slot that is not `on_screen`, ready for run() (on any thread).
        Until finish(), forget() and close() leave what the copy reads and writes mapped."""
        src_map = self._maps.get(buffer.key)
        if src_map is None:
            src_map = _source(buffer)
            self._maps[buffer.key] = src_map
        dst_buf, fb = next((b, f) for b, f in self.slots if f is not on_screen)
        self._busy += 1
        return _CopyJob(buffer, src_map, dst_buf, dst_buf.map(), fb)

    def run(self, job: _CopyJob) -> None:
        """The copy itself: no Python object of the pipeline is touched, and the C copy runs without
        the GIL, so a worker thread can do it while the loop goes on."""
        buffer, src_map = job.buffer, job.src_map
        if isinstance(src_map, bytearray):
            _read_file(buffer, src_map, self.src)
        info, src, dst = buffer.info, self.src, self.dst
        bpp = info.bytes_per_pixel
        row = src.w * bpp
        pitch = job.dst_buf.pitch
        sync = buffer.copy_only is None  # a device region is no dma-buf: nothing to sync
        if sync:
            # DMA_BUF_IOCTL_SYNC waits, without a bound, for the writes pending on the buffer; a
            # guest whose fence never signals must not hold a worker (or, at shutdown, the daemon).
            if not readable(buffer.fd, FENCE_TIMEOUT):
                raise FenceTimeout(errno.ETIMEDOUT, f"the guest's buffer {buffer.id} is still being "
                                   f"written after {FENCE_TIMEOUT:g} s (its fence has not signalled): "
                                   f"frame skipped")
            _dmabuf_sync(buffer.fd, DMA_BUF_SYNC_START | DMA_BUF_SYNC_READ)
        try:
            # One strided copy of the planned rectangle, row pitch to row pitch, every row checked
            # against both buffers' sizes (the guest's layout is the guest's to get wrong).
            copy_rows(job.dst_map, dst.y * pitch + dst.x * bpp, pitch,
                      src_map, info.offset + src.y * info.stride + src.x * bpp, info.stride, src.h, row,
                      native=self.native)
        finally:
            if sync:
                _dmabuf_sync(buffer.fd, DMA_BUF_SYNC_END | DMA_BUF_SYNC_READ)

    def finish(self, job: _CopyJob) -> None:
        """The copy is over (done or failed): what was let go of meanwhile is unmapped now."""
        self._busy -= 1
        if self._busy:
            return
        for key in self._forgotten:
            self.forget(key)
        self._forgotten.clear()
        if self._closing:
            self.close()

    def forget(self, key: tuple[str, int, int]) -> None:
        if self._busy:
            self._forgotten.append(key)   # a copy may be reading it: unmapped when it is over
            return
        m = self._maps.pop(key, None)
        if isinstance(m, mmap.mmap):
            m.close()

    def close(self) -> None:
        if self._busy:
            self._closing = True   # a copy is writing a slot: freed when it is over
            return
        self._closing = False
        for m in self._maps.values():
            if isinstance(m, mmap.mmap):
                m.close()
        self._maps.clear()
        for buf, fb in self.slots:
            try:
                fb.remove()
            except KmsError as exc:
                log.warning("removing copy framebuffer: %s", exc)
            buf.destroy()
        self.slots.clear()


def _source(buffer: Buffer) -> mmap.mmap | bytearray:
    """What a copy reads the buffer from. A dma-buf or a device region has a fixed size and is mapped.
    A memfd (or any file) can be shrunk by the guest after it was checked, and reading a mapping past
    the new end kills the reader with SIGBUS: unless it is sealed against shrinking, it is read with
    pread into a buffer of ours on every copy, which a shrunk file only makes short."""
    if stat.S_ISREG(os.fstat(buffer.fd).st_mode):
        try:
            sealed = fcntl.fcntl(buffer.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        except OSError:   # a file that cannot be sealed (not a memfd)
            sealed = 0
        if not sealed:
            return bytearray(buffer.info.span)
    return mmap.mmap(buffer.fd, buffer.info.span, mmap.MAP_SHARED, mmap.PROT_READ,
                     offset=buffer.mmap_offset)


def _read_file(buffer: Buffer, into: bytearray, rect: Rect | None = None) -> None:
    """Read what a copy of `rect` (None: the whole plane) reads of the buffer's file into `into`, laid
    out as the file is (into[k] is the file's byte mmap_offset + k): only the visible bytes of each
    row of the rectangle, in one read where they are contiguous, never the rows' padding."""
    info = buffer.info
    bpp = info.bytes_per_pixel
    rect = rect or Rect(0, 0, info.width, info.height)
    # Within the plane only: a rectangle past it (a plan's mistake) is the copy's to refuse.
    x0, y0 = max(rect.x, 0), max(rect.y, 0)
    x1, y1 = min(rect.x + rect.w, info.width), min(rect.y + rect.h, info.height)
    if x1 <= x0 or y1 <= y0:
        return
    first, width, rows = info.offset + y0 * info.stride + x0 * bpp, (x1 - x0) * bpp, y1 - y0
    if rows == 1 or width == info.stride:
        spans = [(first, width + (rows - 1) * info.stride)]
    else:
        spans = [(first + y * info.stride, width) for y in range(rows)]
    view = memoryview(into)
    for start, length in spans:
        got = os.preadv(buffer.fd, [view[start:start + length]], buffer.mmap_offset + start)
        if got < length:
            end = buffer.mmap_offset + start
            raise OSError(errno.EIO, f"the guest's buffer {buffer.id} holds less than its plane needs "
                          f"({end + got} bytes, not {end + length}): it was shrunk after it was announced")


def _dmabuf_sync(fd: int, flags: int) -> None:
    try:
        fcntl.ioctl(fd, DMA_BUF_IOCTL_SYNC, struct.pack("Q", flags))
    except OSError as exc:  # memfd stand-ins and some exporters have no sync: the copy is still right
        if exc.errno not in (25, 22):  # ENOTTY, EINVAL
            raise
