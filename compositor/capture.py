"""`directflip capture` from the buffer a plane scans out, for cards without a writeback connector.

A writeback connector has the display engine write what a CRTC scans out into a buffer; most cards
(virtio-gpu, most desktop GPUs) have none. The compositor still knows what it committed: each lit
output has exactly one plane, and the commit on screen names the buffer on it and the plane's SRC and
destination rectangles (ScanoutPipeline.scanned_out). So the picture is that rectangle of that buffer,
placed at its destination in a mode-sized image whose rest is black, as the CRTC shows it with no
other plane enabled. It is what was committed, not a readback of the screen: a guest that draws into
a buffer it was not handed back, or a display engine that alters pixels, is not seen.

Where the buffer is read:
- the compositor's own copy or slate buffer (a dumb buffer, already mapped): on the event loop, in one
  strided copy of the rectangle. Only the loop writes those buffers (the copy rung writes a slot again
  once it is off screen), so a read on the loop cannot see a half-written frame, and it costs what one
  frame of the copy rung costs the loop anyway;
- the guest's dma-buf (zero copy): in a thread, mapped read-only and bracketed with DMA_BUF_IOCTL_SYNC
  START|READ / END|READ, which waits for the guest's pending writes: that wait is the guest's to make
  long, so it never runs on the loop. The daemon holds the buffer meanwhile (the guest is not told
  `released`, so it does not draw into it), and the thread reads through a duplicate of the fd that
  it closes itself, so nothing the daemon frees meanwhile is freed under it.
The pixel conversion and the PNG are made off the loop too.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

from compositor.formats import (
    DRM_FORMAT_MOD_INVALID,
    DRM_FORMAT_MOD_LINEAR,
    FORMATS,
    fourcc,
    fourcc_name,
    modifier_name,
)
from compositor.pixelcopy import copy_rows
from compositor.planner import Rect
from compositor.scanout import (
    DMA_BUF_SYNC_END,
    DMA_BUF_SYNC_READ,
    DMA_BUF_SYNC_START,
    _dmabuf_sync,
    _read_file,
    _source,
)
from compositor.sources.frame import Buffer

if TYPE_CHECKING:
    import numpy as np

T = TypeVar("T")

# Seconds a guest's buffer may take to become readable (its pending writes) and be read: generous,
# since the read runs off the loop and a busy or emulated CPU is slow, yet bounded, so a guest that
# never lets go costs one capture an error, not the compositor anything.
READ_TIMEOUT = 30.0

# Byte positions of red, green and blue in a pixel of each format that has 8 bits per channel (DRM
# formats are little-endian words: XRGB8888 is the bytes B, G, R, X). Alpha is dropped: the plane's
# default blend mode is pre-multiplied, so over the CRTC's black background a pixel shows exactly its
# colour channels (and a primary plane on many engines ignores alpha anyway).
CHANNELS: dict[int, tuple[int, int, int]] = {
    fourcc("XR24"): (2, 1, 0), fourcc("AR24"): (2, 1, 0),   # XRGB8888, ARGB8888
    fourcc("XB24"): (0, 1, 2), fourcc("AB24"): (0, 1, 2),   # XBGR8888, ABGR8888
    fourcc("RX24"): (3, 2, 1), fourcc("BX24"): (1, 2, 3),   # RGBX8888, BGRX8888
    fourcc("RG24"): (2, 1, 0), fourcc("BG24"): (0, 1, 2),   # RGB888, BGR888
}


class CaptureError(Exception):
    """A capture that cannot be made; the message says why and is what the caller is answered."""


def check_layout(fmt: int, modifier: int = DRM_FORMAT_MOD_LINEAR) -> None:
    """Refuse, before reading anything, a buffer whose pixels a CPU read would not give back."""
    if fmt not in CHANNELS:
        readable = ", ".join(fourcc_name(f) for f in CHANNELS)
        raise CaptureError(f"the buffer on the plane is {fourcc_name(fmt)}, which directflip cannot read "
                           f"back without a writeback connector (it reads {readable})")
    # Implicit (INVALID) is taken as linear, as the copy rung does: it is how linear buffers come
    # from sources that never say.
    if modifier not in (DRM_FORMAT_MOD_LINEAR, DRM_FORMAT_MOD_INVALID):
        raise CaptureError(f"the buffer on the plane is tiled ({modifier_name(modifier)}): a CPU read "
                           f"would scramble it, and the card has no writeback connector")


def read_rect(memory, offset: int, pitch: int, fmt: int, rect: Rect) -> np.ndarray:
    """A copy of `rect` of a buffer in `memory` (pixel (0, 0) at `offset`, rows `pitch` bytes apart):
    rect.h rows of rect.w pixels' bytes."""
    # numpy is imported here, not with the module: the daemon imports this module, and a capture is
    # rare where numpy's import would cost every start of the daemon (see compositor/pixelcopy.py).
    import numpy as np

    bpp = FORMATS[fmt].bpp // 8
    row = rect.w * bpp
    rows = bytearray(rect.h * row)
    copy_rows(rows, 0, row, memory, offset + rect.y * pitch + rect.x * bpp, pitch, rect.h, row)
    return np.frombuffer(rows, np.uint8).reshape(rect.h, row)


def exporter(fd: int) -> str | None:
    """The name of the driver that exported a dma-buf (its fdinfo's exp_name), None if unknown."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as info:
            for line in info:
                if line.startswith("exp_name:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def read_guest_buffer(buffer: Buffer, rect: Rect) -> np.ndarray:
    """`rect` of a guest's buffer, read by the CPU. Blocks (DMA_BUF_IOCTL_SYNC waits for the guest's
    writes): call it off the loop. `buffer` is the capture's own copy of the record; its fd (a
    duplicate) is closed here."""
    what = f"{buffer.guest}'s buffer {buffer.id}"
    try:
        try:
            memory = _source(buffer)
        except OSError as exc:
            by = exporter(buffer.fd)
            raise CaptureError(
                f"{what} cannot be read back: mapping its dma-buf{f' (exported by {by})' if by else ''} "
                f"for reading failed: {exc.strerror or exc}. Its exporter gives the CPU no access to it; "
                f"only a writeback connector could read this monitor back") from None
        try:
            if isinstance(memory, bytearray):  # a file that may shrink: read, never mapped (see _source)
                _read_file(buffer, memory, rect)
            _dmabuf_sync(buffer.fd, DMA_BUF_SYNC_START | DMA_BUF_SYNC_READ)
            try:
                return read_rect(memory, buffer.info.offset, buffer.info.stride, buffer.info.fourcc, rect)
            finally:
                _dmabuf_sync(buffer.fd, DMA_BUF_SYNC_END | DMA_BUF_SYNC_READ)
        except OSError as exc:
            raise CaptureError(f"{what} cannot be read back: {exc.strerror or exc}") from None
        finally:
            if not isinstance(memory, bytearray):
                memory.close()
    finally:
        buffer.close()


def compose(rows: np.ndarray, fmt: int, src: Rect, dst: Rect, size: tuple[int, int]) -> np.ndarray:
    """The screen as the CRTC shows it: `rows` (src's pixels in `fmt`) at `dst` on a black (H, W, 3)
    RGB image of `size`. A plane that scales is scaled here, bilinearly: the display engine's filter
    may differ by a shade at the edges of what it scales."""
    import numpy as np  # at call time, as in read_rect

    order = CHANNELS[fmt]
    bpp = FORMATS[fmt].bpp // 8
    rgb = rows.reshape(src.h, src.w, bpp)[..., list(order)]
    if (src.w, src.h) != (dst.w, dst.h):
        from PIL import Image

        rgb = np.asarray(Image.fromarray(rgb, "RGB").resize((dst.w, dst.h), Image.Resampling.BILINEAR))
    width, height = size
    image = np.zeros((height, width, 3), np.uint8)   # no plane there: the CRTC shows black
    x0, y0 = max(dst.x, 0), max(dst.y, 0)
    x1, y1 = min(dst.x + dst.w, width), min(dst.y + dst.h, height)
    if x0 < x1 and y0 < y1:
        image[y0:y1, x0:x1] = rgb[y0 - dst.y:y1 - dst.y, x0 - dst.x:x1 - dst.x]
    return image


def write_png(image: np.ndarray, path: str) -> None:
    """Save `image` at `path` as the compositor's user (root) may: the directory is opened once, the
    PNG is written to a new file in it (O_CREAT|O_EXCL|O_NOFOLLOW: never through a symlink someone
    planted, never into a file that existed) and renamed over `path` within that directory, which
    replaces a symlink at `path` rather than following it."""
    from PIL import Image

    directory, name = os.path.split(path)
    tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        dfd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise CaptureError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb") as f:
                Image.fromarray(image, "RGB").save(f, "PNG")
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
    except OSError as exc:
        raise CaptureError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        os.close(dfd)


def in_thread(fn: Callable[..., T], *args) -> asyncio.Future[T]:
    """fn(*args) in a thread of its own; a future of the loop for its result. A daemon thread, not
    the loop's executor: a read stuck on a guest's fence that never signals must not keep the
    compositor from exiting (asyncio.run waits for the executor's threads)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # noqa: BLE001 — handed to the awaiting coroutine
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody waits for it any more
            pass

    threading.Thread(target=work, name="directflip-capture", daemon=True).start()
    return future


def dup_buffer(buffer: Buffer) -> Buffer:
    """A record of `buffer` with a duplicate fd, for a reader that may outlive the daemon's copy."""
    return replace(buffer, fd=os.dup(buffer.fd))


__all__ = ["CHANNELS", "CaptureError", "READ_TIMEOUT", "check_layout", "compose", "dup_buffer", "exporter",
           "in_thread", "read_guest_buffer", "read_rect", "write_png"]
