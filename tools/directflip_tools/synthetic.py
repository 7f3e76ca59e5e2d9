"""Synthetic guests: a process that stands in for a virtual machine on the frame socket.

A synthetic guest allocates a few XRGB8888 dumb buffers (on the display card itself — a same-device
import, zero copy like GVT-g on i915 — or on vgem, a cross-device dma-buf), announces them to
`directflip run` as dma-bufs and flips them at a steady rate. Every frame is machine-readable from a
screenshot of the monitor it lands on:

- the background is a saturated colour of the guest's own (`guest_colour`), with its name in large
  text, drawn once per buffer;
- the frame counter is a band at (BAND_X, BAND_Y) of the buffer: 34 cells of CELL x CELL pixels in
  one row — a white and a black marker cell, then the 32 bits of the frame number, most significant
  first, white = 1, black = 0 (`draw_counter`, `decode_counter`);
- a vertical bar BAR_WIDTH pixels wide, from BAR_TOP to the bottom, moves 8 pixels per frame
  (`bar_rect`), so a frozen or torn picture shows;
- from the first input event the guest receives (any of Key, Button, Pointer, Motion, Wheel, Touch)
  on, what it received (`InputState`): INPUT_BANDS more bands right below the counter band, at
  (BAND_X, INPUT_BAND_Y + i * CELL), each the same 34 cells (white and black marker, then 32 bits
  MSB first), drawn after the bar so the bar never hides them (`draw_input`, `decode_input`):

      band  y    bits 31..16                     bits 15..0
      0     24   last key code                   bit 15 last key down, bits 14..12 buttons held
                                                 (BTN_LEFT 1, BTN_RIGHT 2, BTN_MIDDLE 4),
                                                 bits 11..0 key events received, modulo 4096
      1     40   last absolute pointer x         last absolute pointer y
      2     56   sum of relative motion dx       sum of relative motion dy
      3     72   sum of wheel dx                 sum of wheel dy

  The sums are 16-bit two's complement (they wrap). Touch events start the bands but are not
  recorded. Before any input the frame is exactly as without this feature; paint_on_screen's square
  covers the cells of bands 2 and 3 at x 64..127.

Drawing is pure numpy on an (H, W, 4) uint8 view of the buffer in memory byte order B, G, R, X
(`xrgb_view` makes one over an mmap with any stride) and touches only the bands and two bar rects
per frame: it runs under QEMU TCG at 60 Hz for several guests. A buffer remembers which bar it shows
(`Slot.bar_x`) and the bar is erased by restoring those pixels from the guest's background image, so
the name survives the bar passing over it.

With --cursor the guest also defines a pointer image on the frame socket (`cursor_pixels`: a
CURSOR_SIZE x CURSOR_SIZE square of CURSOR_COLOUR with a CURSOR_BORDER-pixel CURSOR_BORDER_COLOUR
border, hot spot at its top-left pixel), and with --cursor-at X,Y says its hot spot is at (X, Y),
visible. Both go once per connection, right after the buffers are announced; the frames themselves
never change for them, so a screenshot tells a cursor plane's pixels from the guest's.

The flip protocol: after flip(id) the buffer belongs to the compositor (it may be on screen, zero
copy) until the guest receives Released(id). `SyntheticGuest.paint_on_screen` breaks that rule on
purpose: it writes into the buffer on screen without flipping, which shows on the monitor only if the
monitor scans out the guest's own memory — the zero-copy proof.
"""

from __future__ import annotations

import argparse
import colorsys
import errno
import fcntl
import hashlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from compositor.sources.frame import MAX_DIMENSION

# The input event types are bound here, at import: the guest loop imports Released and Presented
# lazily (tests swap the framesocket module for a fake one), and input events are the real classes.
from compositor.sources.framesocket import (
    DEFAULT_FRAME_SOCKET,
    POINTER_MODES,
    Button,
    InputEvent,
    Key,
    Motion,
    Pointer,
    Touch,
    Wheel,
    socket_paths,
)
from directflip_tools.frame_layout import (  # noqa: F401  (names tests import from here)
    BAND_CELLS,
    BAND_WIDTH,
    BAND_X,
    BAND_Y,
    BAR_STEP,
    BAR_TOP,
    BAR_WIDTH,
    BLACK,
    BTN_LEFT,
    BTN_MIDDLE,
    BTN_RIGHT,
    BUTTON_BITS,
    CELL,
    COUNTER_BITS,
    CURSOR_BORDER,
    CURSOR_BORDER_COLOUR,
    CURSOR_COLOUR,
    CURSOR_HOT_SPOT,
    CURSOR_SIZE,
    INPUT_BAND_Y,
    INPUT_BANDS,
    KEY_EVENTS_MODULO,
    MARKER,
    MIN_HEIGHT,
    MIN_WIDTH,
    PAINT_RECT,
    RGB,
    WHITE,
    Rect,
    check_size,
)

if TYPE_CHECKING:
    import mmap

    from compositor.kms import Card, DumbBuffer

log = logging.getLogger("directflip.synthetic")

_SAMPLE = 8                           # decode_counter samples the centre SAMPLE x SAMPLE of each cell
_THRESHOLD = 128


# --------------------------------------------------------------------------------- pure: layout

def band_rect() -> Rect:
    """Where the counter band lies in the buffer."""
    return (BAND_X, BAND_Y, BAND_WIDTH, CELL)


def input_rect() -> Rect:
    """Where the input bands lie in the buffer (all of them, one under the other)."""
    return (BAND_X, INPUT_BAND_Y, BAND_WIDTH, INPUT_BANDS * CELL)


def bar_x(width: int, n: int) -> int:
    return (n * BAR_STEP) % (width - BAR_WIDTH)


def bar_rect(width: int, height: int, n: int) -> Rect:
    """Where frame n's bar lies in a width x height buffer."""
    return (bar_x(width, n), BAR_TOP, BAR_WIDTH, height - BAR_TOP)


def xrgb_view(buf, width: int, height: int, pitch: int) -> np.ndarray:
    """An (height, width, 4) uint8 view (B, G, R, X) of an XRGB8888 buffer with rows `pitch` bytes
    apart; `buf` is anything exporting a writable buffer (mmap, bytearray)."""
    if pitch % 4 or pitch < width * 4:
        raise ValueError(f"pitch {pitch} does not hold a row of {width} XRGB8888 pixels")
    return np.ndarray(buffer=buf, dtype=np.uint8, shape=(height, pitch // 4, 4))[:, :width]


def _bgrx(rgb: RGB) -> np.ndarray:
    r, g, b = rgb
    return np.array([b, g, r, 255], dtype=np.uint8)   # X = 0xFF: opaque if read as ARGB


# ---------------------------------------------------------------------------------- pure: colours

def guest_colour(name: str) -> RGB:
    """A saturated background colour of the guest's own: the hue comes from a hash of the name
    (stable across runs and machines), saturation 0.8, value 0.75. Different names usually get far
    apart hues; that is all a hash can promise."""
    digest = hashlib.md5(name.encode(), usedforsecurity=False).digest()
    hue = int.from_bytes(digest[:4], "big") % 360 / 360
    r, g, b = colorsys.hsv_to_rgb(hue, 0.8, 0.75)
    return (round(r * 255), round(g * 255), round(b * 255))


def ink_colour(background: RGB) -> RGB:
    """Black or white, whichever reads better on `background` (Rec. 709 luma)."""
    r, g, b = background
    return BLACK if 0.2126 * r + 0.7152 * g + 0.0722 * b >= 128 else WHITE


# --------------------------------------------------------------------------------- pure: drawing

def draw_background(view: np.ndarray, name: str) -> None:
    """Fill view with the guest's colour and write its name, large, centred below the band. Done
    once per buffer (it touches every pixel). Without Pillow the name is left out."""
    check_size(view.shape[1], view.shape[0])
    colour = guest_colour(name)
    view[:] = _bgrx(colour)
    _draw_name(view[BAR_TOP:], name, ink_colour(colour))


def _draw_name(area: np.ndarray, name: str, ink: RGB) -> None:
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        log.warning("Pillow is not installed: the guest's name is not drawn")
        return
    height, width = area.shape[:2]
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    size = max(12, min(height // 3, 200))
    while True:
        try:
            font = ImageFont.load_default(size=size)   # scalable since Pillow 10.1 (with FreeType)
        except TypeError:
            font = ImageFont.load_default()
        left, top, right, bottom = draw.textbbox((0, 0), name, font=font)
        if right - left <= width - 32 or size <= 12:
            break
        size = max(12, size * 4 // 5)
    x = (width - (right - left)) // 2 - left
    y = (height - (bottom - top)) // 2 - top
    draw.text((x, y), name, fill=255, font=font)
    alpha = np.asarray(mask, dtype=np.uint16)[..., None]
    ys, xs = np.nonzero(alpha[..., 0])
    if not len(ys):
        return
    rows, cols = slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)
    a = alpha[rows, cols]
    region = area[rows, cols, :3]
    ink_bgr = _bgrx(ink)[:3].astype(np.uint16)
    region[:] = ((region * (255 - a) + ink_bgr * a + 127) // 255).astype(np.uint8)


def draw_counter(view: np.ndarray, n: int) -> None:
    """Write frame number n (taken modulo 2**32) into the band: marker cells, then 32 bits MSB first."""
    _draw_band(view, n, BAND_X, BAND_Y)


def _draw_band(view: np.ndarray, value: int, x: int, y: int) -> None:
    """A band of marker cells and the 32 bits of value (modulo 2**32), MSB first, at (x, y)."""
    value &= 0xFFFFFFFF
    bits = list(MARKER) + [(value >> (COUNTER_BITS - 1 - i)) & 1 for i in range(COUNTER_BITS)]
    cells = np.where(np.array(bits, dtype=bool)[:, None], _bgrx(WHITE), _bgrx(BLACK))   # (34, 4)
    row = np.repeat(cells, CELL, axis=0)                                                 # (544, 4)
    view[y:y + CELL, x:x + BAND_WIDTH] = row


def draw_bar(view: np.ndarray, n: int, background: np.ndarray, ink: RGB, painted_x: int | None = None) -> int:
    """Draw frame n's bar in `ink`. `painted_x` is where this buffer's bar is now (None: no bar yet);
    that rect is restored from `background` (the buffer's draw_background image, same shape as view)
    first. Returns the new bar's x, the buffer's next painted_x."""
    height, width = view.shape[:2]
    x = bar_x(width, n)
    if painted_x is not None and painted_x != x:
        old = (slice(BAR_TOP, height), slice(painted_x, painted_x + BAR_WIDTH))
        view[old] = background[old]
    view[BAR_TOP:height, x:x + BAR_WIDTH] = _bgrx(ink)
    return x


def paint_rect(view: np.ndarray, colour: RGB, rect: Rect = PAINT_RECT) -> None:
    x, y, w, h = rect
    view[y:y + h, x:x + w] = _bgrx(colour)


def decode_counter(rgb: np.ndarray, origin: tuple[int, int] = (0, 0)) -> int | None:
    """The frame number in a screenshot, or None when the band is not there.

    rgb is an (H, W, 3) RGB array (a 4th channel is ignored); origin is the (x, y) on screen where
    the buffer's top-left pixel landed. Each cell's centre 8x8 is sampled: a cell is white when every
    channel of every sample is >= 128, black when every one is < 128, anything else means this is not
    our band (a background, a picture, a band that is shifted by more than 4 pixels, or scaled)."""
    return _read_band(rgb, origin[0] + BAND_X, origin[1] + BAND_Y)


def _read_band(rgb: np.ndarray, x0: int, y0: int) -> int | None:
    """The 32-bit value of the band at (x0, y0) of a screenshot, or None when no band is there."""
    if x0 < 0 or y0 < 0 or y0 + CELL > rgb.shape[0] or x0 + BAND_WIDTH > rgb.shape[1]:
        return None
    inset = (CELL - _SAMPLE) // 2
    band = rgb[y0 + inset:y0 + inset + _SAMPLE, x0:x0 + BAND_WIDTH, :3]
    cells = band.reshape(_SAMPLE, BAND_CELLS, CELL, 3)[:, :, inset:inset + _SAMPLE]
    white = (cells >= _THRESHOLD).all(axis=(0, 2, 3))
    black = (cells < _THRESHOLD).all(axis=(0, 2, 3))
    if not (white | black).all():
        return None
    if tuple(int(b) for b in white[:len(MARKER)]) != MARKER:
        return None
    value = 0
    for bit in white[len(MARKER):]:
        value = (value << 1) | int(bit)
    return value


# ------------------------------------------------------------------------------------ pure: input

def _s16(value: int) -> int:
    """value wrapped to a 16-bit two's complement number, as the bands carry it."""
    return ((value + 0x8000) & 0xFFFF) - 0x8000


@dataclass(frozen=True)
class InputState:
    """What a synthetic guest received, as its input bands show it (every field already wrapped to
    what the bands carry, so decode_input(draw_input(state)) == state)."""

    key: int = 0          # the last key's evdev code
    key_down: bool = False  # whether that event was a press
    keys: int = 0         # key events received, modulo KEY_EVENTS_MODULO
    buttons: int = 0      # held: BTN_LEFT 1 | BTN_RIGHT 2 | BTN_MIDDLE 4
    x: int = 0            # the last absolute pointer position
    y: int = 0
    dx: int = 0           # relative motion, summed (16-bit, wraps)
    dy: int = 0
    wheel_dx: int = 0     # wheel detents, summed (16-bit, wraps)
    wheel_dy: int = 0

    def words(self) -> tuple[int, int, int, int]:
        """The 32-bit value of each input band."""
        return ((self.key & 0xFFFF) << 16 | int(self.key_down) << 15 | (self.buttons & 7) << 12
                | self.keys % KEY_EVENTS_MODULO,
                (self.x & 0xFFFF) << 16 | (self.y & 0xFFFF),
                (self.dx & 0xFFFF) << 16 | (self.dy & 0xFFFF),
                (self.wheel_dx & 0xFFFF) << 16 | (self.wheel_dy & 0xFFFF))

    @classmethod
    def from_words(cls, words: tuple[int, int, int, int]) -> InputState:
        keys, pointer, motion, wheel = words
        return cls(key=keys >> 16, key_down=bool(keys >> 15 & 1), keys=keys & 0xFFF, buttons=keys >> 12 & 7,
                   x=pointer >> 16, y=pointer & 0xFFFF, dx=_s16(motion >> 16), dy=_s16(motion),
                   wheel_dx=_s16(wheel >> 16), wheel_dy=_s16(wheel))


def apply_input(state: InputState | None, event: InputEvent) -> InputState:
    """The state after `event` (state None: nothing received yet)."""
    state = state or InputState()
    if isinstance(event, Key):
        return replace(state, key=event.code & 0xFFFF, key_down=event.down,
                       keys=(state.keys + 1) % KEY_EVENTS_MODULO)
    if isinstance(event, Button):
        bit = BUTTON_BITS.get(event.code, 0)
        return replace(state, buttons=state.buttons | bit if event.down else state.buttons & ~bit)
    if isinstance(event, Pointer):
        return replace(state, x=event.x & 0xFFFF, y=event.y & 0xFFFF)
    if isinstance(event, Motion):
        return replace(state, dx=_s16(state.dx + event.dx), dy=_s16(state.dy + event.dy))
    if isinstance(event, Wheel):
        return replace(state, wheel_dx=_s16(state.wheel_dx + event.dx),
                       wheel_dy=_s16(state.wheel_dy + event.dy))
    return state  # Touch: received (the bands start) but not recorded


def draw_input(view: np.ndarray, state: InputState) -> None:
    """Write the input bands (see the module docstring) into view."""
    for i, word in enumerate(state.words()):
        _draw_band(view, word, BAND_X, INPUT_BAND_Y + i * CELL)


def decode_input(rgb: np.ndarray, origin: tuple[int, int] = (0, 0)) -> InputState | None:
    """The input a guest had received, read from a screenshot like decode_counter (same arguments),
    or None when the input bands are not there (no input yet, or not our buffer)."""
    words = []
    for i in range(INPUT_BANDS):
        word = _read_band(rgb, origin[0] + BAND_X, origin[1] + INPUT_BAND_Y + i * CELL)
        if word is None:
            return None
        words.append(word)
    return InputState.from_words((words[0], words[1], words[2], words[3]))


# ----------------------------------------------------------------------------------- pure: cursor

def cursor_pixels() -> bytes:
    """--cursor's image as the frame socket takes it: CURSOR_SIZE x CURSOR_SIZE ARGB8888 rows, B, G,
    R, A in memory, all opaque (so premultiplied or not reads the same): CURSOR_COLOUR inside a
    CURSOR_BORDER-pixel CURSOR_BORDER_COLOUR border."""
    image = np.empty((CURSOR_SIZE, CURSOR_SIZE, 4), dtype=np.uint8)
    image[:] = _bgrx(CURSOR_BORDER_COLOUR)   # the 4th byte is 0xFF: opaque alpha
    inner = slice(CURSOR_BORDER, CURSOR_SIZE - CURSOR_BORDER)
    image[inner, inner] = _bgrx(CURSOR_COLOUR)
    return image.tobytes()


# ----------------------------------------------------------------------------------------- device

DMA_BUF_IOCTL_SYNC = 0x40086200          # _IOW('b', 0, struct dma_buf_sync)
DMA_BUF_SYNC_WRITE, DMA_BUF_SYNC_START, DMA_BUF_SYNC_END = 2, 0, 4


@contextmanager
def cpu_write(dmabuf_fd: int) -> Iterator[None]:
    """Bracket CPU writes to a buffer with DMA_BUF_IOCTL_SYNC so the exporter can flush caches.
    Best effort: an exporter that does not support it (ENOTTY) needs no sync."""
    _dmabuf_sync(dmabuf_fd, DMA_BUF_SYNC_START | DMA_BUF_SYNC_WRITE)
    try:
        yield
    finally:
        _dmabuf_sync(dmabuf_fd, DMA_BUF_SYNC_END | DMA_BUF_SYNC_WRITE)


def _dmabuf_sync(fd: int, flags: int) -> None:
    arg = flags.to_bytes(8, sys.byteorder)
    for _ in range(10):
        try:
            fcntl.ioctl(fd, DMA_BUF_IOCTL_SYNC, arg)
            return
        except OSError as exc:
            if exc.errno in (errno.EINTR, errno.EAGAIN):
                continue
            log.debug("DMA_BUF_IOCTL_SYNC on fd %d: %s", fd, exc.strerror)
            return


@dataclass(eq=False)
class Slot:
    """One buffer of a swapchain: its dma-buf, its mapping, and what it shows."""

    id: int                      # the frame-socket buffer id (1..count)
    buffer: DumbBuffer
    fd: int                      # the exported dma-buf (O_RDWR)
    pitch: int
    map: mmap.mmap
    view: np.ndarray | None      # (H, W, 4) B,G,R,X over map
    busy: bool = False           # flipped and not yet released: the compositor's, do not draw
    bar_x: int | None = None     # where this buffer's bar is painted
    last_used: int = 0


class Swapchain:
    """count XRGB8888 dumb buffers on `card`, each exported as a dma-buf and mapped, with the guest's
    background drawn once. acquire() hands out the free buffer that was flipped longest ago."""

    def __init__(self, card: Card, width: int, height: int, count: int = 3, *, name: str = "synthetic"):
        check_size(width, height)
        self.card, self.width, self.height = card, width, height
        self.background = np.empty((height, width, 4), dtype=np.uint8)
        draw_background(self.background, name)
        self.ink = ink_colour(guest_colour(name))
        self.slots: dict[int, Slot] = {}
        self._uses = 0
        try:
            for slot_id in range(1, count + 1):
                buf = card.create_dumb(width, height, 32)
                slot = Slot(slot_id, buf, -1, buf.pitch, buf.map(), None)
                self.slots[slot_id] = slot
                slot.fd = card.export_dmabuf(buf.handle)
                slot.view = xrgb_view(slot.map, width, height, buf.pitch)
                with cpu_write(slot.fd):
                    slot.view[:] = self.background
        except BaseException:
            self.close()
            raise

    def acquire(self) -> Slot | None:
        free = [s for s in self.slots.values() if not s.busy]
        return min(free, key=lambda s: s.last_used) if free else None

    def render(self, slot: Slot, n: int, input_state: InputState | None = None) -> None:
        """Draw frame n into slot (only the band, the old and new bar rects and, with input_state,
        the input bands change)."""
        with cpu_write(slot.fd):
            draw_counter(slot.view, n)
            slot.bar_x = draw_bar(slot.view, n, self.background, self.ink, slot.bar_x)
            if input_state is not None:
                draw_input(slot.view, input_state)  # after the bar, which crosses the bands' rows

    def mark_busy(self, slot_id: int) -> None:
        slot = self.slots[slot_id]
        slot.busy = True
        self._uses += 1
        slot.last_used = self._uses

    def release(self, slot_id: int) -> None:
        slot = self.slots.get(slot_id)
        if slot is None or not slot.busy:
            log.debug("release of buffer %d, which is not flipped", slot_id)
            return
        slot.busy = False

    def close(self) -> None:
        for slot in self.slots.values():
            slot.view = None          # the mmap cannot close while a numpy view exports it
            if slot.fd >= 0:
                os.close(slot.fd)
                slot.fd = -1
            try:
                slot.buffer.destroy()
            except BufferError:
                log.warning("buffer %d is still referenced; leaving it mapped", slot.id)
        self.slots.clear()


@dataclass
class GuestStats:
    frames_flipped: int = 0
    presented: int = 0
    released: int = 0
    stalled: int = 0             # ticks on which no buffer was free when it was time to draw
    last_frame: int | None = None
    last_presented_frame: int | None = None
    elapsed: float = 0.0         # seconds spent flipping (first tick to the end of the last)
    server_error: str | None = None   # why the compositor closed the connection, if it did
    painted_buffer: int | None = None  # the buffer paint_on_screen wrote into
    reconnects: int = 0          # --reconnect: connections made again after the compositor went away
    input_events: int = 0        # input events received (Key, Button, Pointer, Motion, Wheel, Touch)

    def summary(self, name: str) -> str:
        rate = self.frames_flipped / self.elapsed if self.elapsed > 0 else 0.0
        last = "-" if self.last_frame is None else str(self.last_frame)
        return (f"guest {name}: flipped {self.frames_flipped} frames in {self.elapsed:.2f} s "
                f"({rate:.1f}/s), presented {self.presented}, last frame {last}, stalled {self.stalled}"
                + (f", reconnected {self.reconnects} times" if self.reconnects else "")
                + (f", input {self.input_events} events" if self.input_events else ""))


_INPUT_EVENTS = (Key, Button, Pointer, Motion, Wheel, Touch)
SETTLE_SECONDS = 0.5       # after the last flip, wait this long for its Presented
PRESENT_TIMEOUT = 5.0      # --then-paint: how long the last frame may take to be presented
_POLL_SLICE = 0.1          # longest single wait, so a signal is acted on promptly
RECONNECT_INTERVAL = 0.05  # --reconnect: how often to try while no compositor listens


class SyntheticGuest:
    """A stand-in for a VM: a swapchain on card_path, flipped over the frame socket at `rate` flips
    per second (0 or inf: as fast as buffers come back)."""

    def __init__(self, name: str, socket_path: str, card_path: str, width: int, height: int,
                 rate: float, buffers: int = 3, uuid: str | None = None, reconnect: bool = False,
                 pointer: str = "absolute", cursor: bool = False,
                 cursor_at: tuple[int, int] | None = None) -> None:
        check_size(width, height)
        if pointer not in POINTER_MODES:
            raise ValueError(f"pointer mode {pointer!r} is not one of {', '.join(POINTER_MODES)}")
        if cursor_at is not None and not all(0 <= v < MAX_DIMENSION for v in cursor_at):
            raise ValueError(f"cursor position {cursor_at} is outside 0..{MAX_DIMENSION - 1}")
        self.pointer = pointer  # asked for in every hello
        # Sent on every connection, since a new compositor knows nothing of what the last one was told.
        self.cursor = cursor  # define cursor_pixels() as the pointer image
        self.cursor_at = cursor_at  # put the pointer's hot spot there, visible
        self.input: InputState | None = None  # what it received: drawn into every frame once set
        self.name, self.socket_path, self.card_path = name, socket_path, card_path
        self.width, self.height, self.rate, self.buffers, self.uuid = width, height, rate, buffers, uuid
        self.reconnect = reconnect  # the compositor going away: wait for the next one, keep flipping
        self.stats = GuestStats()
        self.next_frame = 0
        self.on_screen: int | None = None     # the slot flipped last
        self.card: Card | None = None
        self.swapchain: Swapchain | None = None
        self.client = None
        self._stop = False

    # -- lifetime
    def open(self) -> None:
        """Allocate the buffers, connect and announce them. Raises DeviceError/KmsError (device),
        OSError (no compositor listening) or framesocket.ServerError (the compositor said no)."""
        from compositor.kms import Card

        try:
            self.card = Card(self.card_path, kms=False)
            self.swapchain = Swapchain(self.card, self.width, self.height, self.buffers, name=self.name)
            log.info("guest %s: %d buffers %dx%d on %s (%s)", self.name, self.buffers, self.width,
                     self.height, self.card_path, self.card.driver)
            self._connect()
        except BaseException:
            self.close()
            raise

    def _connect(self) -> None:
        """Connect and announce every buffer; each starts out ours (not flipped)."""
        from compositor.sources.framesocket import FrameSocketClient
        self.client = FrameSocketClient(self.socket_path, self.name, self.uuid, pointer=self.pointer)
        for slot in self.swapchain.slots.values():
            slot.busy = False
            self.client.announce(slot.id, slot.fd, "XR24", self.width, self.height, slot.pitch, 0, 0)
        if self.cursor:
            self.client.set_cursor(CURSOR_SIZE, CURSOR_SIZE, *CURSOR_HOT_SPOT, cursor_pixels())
        if self.cursor_at is not None:
            self.client.move_cursor(*self.cursor_at, visible=True)

    def _reconnect(self, why: str) -> bool:
        """The connection is lost: with `reconnect`, connect again as soon as a compositor listens
        (every RECONNECT_INTERVAL) and go on flipping; True once connected, False when stopped."""
        log.warning("guest %s: %s; reconnecting", self.name, why)
        self._drop_client()
        from compositor.sources.framesocket import CLOSED, ServerError
        while not self._stop:
            try:
                self._connect()
                self.stats.reconnects += 1
                log.info("guest %s: connected again", self.name)
                return True
            except (OSError, ServerError) as exc:
                # Nothing listening yet, or a dying compositor's backlog took the connection and closed
                # it: try again. A compositor that says why it refuses is final.
                if isinstance(exc, ServerError) and str(exc) != CLOSED:
                    raise
                log.debug("guest %s: connect: %s", self.name, exc)
                self._drop_client()
            time.sleep(RECONNECT_INTERVAL)
        return False

    def _drop_client(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except Exception as exc:  # noqa: BLE001 — cleanup: the server may already be gone
                log.debug("closing the frame socket: %s", exc)
            self.client = None

    def close(self) -> None:
        self._drop_client()
        if self.swapchain is not None:
            self.swapchain.close()
            self.swapchain = None
        if self.card is not None:
            self.card.close()
            self.card = None

    def __enter__(self) -> SyntheticGuest:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stop(self) -> None:
        """Ask the loops to end (safe from a signal handler)."""
        self._stop = True

    @property
    def stopped(self) -> bool:
        return self._stop

    # -- the session
    def run(self, duration: float | None = None, frames: int | None = None, *,
            then_paint: RGB | None = None, hold: float = 0.0) -> GuestStats:
        """Flip until `duration` seconds or `frames` frames (neither: until a signal), let the last
        frame be presented, optionally paint_on_screen(then_paint) and print that, keep the
        connection for `hold` seconds, close. The compositor closing the connection ends the run with
        stats.server_error set; SIGTERM/SIGINT end it cleanly."""
        from compositor.sources.framesocket import ServerError
        restore = self._install_signals()
        try:
            if self.client is None:
                self.open()
            try:
                self._flip_reconnecting(duration, frames)
                if then_paint is not None and not self._stop:
                    self._paint_when_presented(then_paint)
                elif not self._stop and self.stats.last_frame is not None:
                    self.wait_presented(self.stats.last_frame, SETTLE_SECONDS)
                if hold > 0 and not self._stop:
                    self.hold(hold)
            except ServerError as exc:
                self.stats.server_error = str(getattr(exc, "reason", None) or exc)
                log.error("guest %s: the compositor closed the connection: %s", self.name,
                          self.stats.server_error)
            except OSError as exc:
                self.stats.server_error = f"connection lost: {exc.strerror or exc}"
                log.error("guest %s: %s", self.name, self.stats.server_error)
        finally:
            restore()
            self.close()
        return self.stats

    def _flip_reconnecting(self, duration: float | None, frames: int | None) -> None:
        """flip_frames, and with `reconnect`, through any number of compositor restarts."""
        from compositor.sources.framesocket import ServerError
        end = time.monotonic() + duration if duration is not None else None
        while True:
            left = None if frames is None else frames - self.stats.frames_flipped
            try:
                self.flip_frames(None if end is None else max(0.0, end - time.monotonic()), left)
                return
            except (ServerError, OSError) as exc:
                if not self.reconnect:
                    raise
                why = exc
            if self._stop or not self._reconnect(f"the compositor went away ({why})"):
                return

    def flip_frames(self, duration: float | None = None, frames: int | None = None) -> None:
        """Flip at self.rate with absolute deadlines (tick k starts at start + k/rate: no drift; a
        tick that is already over is skipped, not made up in a burst)."""
        period = 1.0 / self.rate if self.rate > 0 and math.isfinite(self.rate) else 0.0
        start = time.monotonic()
        end = start + duration if duration is not None else math.inf
        tick = flipped = 0
        try:
            while not self._stop and (frames is None or flipped < frames):
                if time.monotonic() >= end:
                    break
                tick_end = min(start + (tick + 1) * period, end) if period else end
                self._dispatch(self.client.poll(0))
                slot = self.swapchain.acquire()
                if slot is None:
                    self.stats.stalled += 1
                    slot = self._wait_for_slot(tick_end)
                if slot is not None:
                    self._flip(slot)
                    flipped += 1
                tick += 1
                if period:
                    tick = max(tick, int((time.monotonic() - start) / period))
                    self._wait_until(min(start + tick * period, end))
        finally:
            self.stats.elapsed += time.monotonic() - start

    def _flip(self, slot: Slot) -> None:
        n = self.next_frame
        self.swapchain.render(slot, n, self.input)
        self.swapchain.mark_busy(slot.id)
        self.client.flip(slot.id, frame=n)
        self.next_frame += 1
        self.on_screen = slot.id
        self.stats.frames_flipped += 1
        self.stats.last_frame = n

    def _dispatch(self, events: list) -> None:
        from compositor.sources.framesocket import Presented, Released
        for ev in events:
            if isinstance(ev, Released):
                self.stats.released += 1
                self.swapchain.release(ev.id)
            elif isinstance(ev, Presented):
                self.stats.presented += 1
                self.stats.last_presented_frame = ev.frame
            elif isinstance(ev, _INPUT_EVENTS):
                self.stats.input_events += 1
                self.input = apply_input(self.input, ev)

    def _wait_for_slot(self, deadline: float) -> Slot | None:
        while not self._stop:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._dispatch(self.client.poll(min(left, _POLL_SLICE)))
            slot = self.swapchain.acquire()
            if slot is not None:
                return slot
        return None

    def _wait_until(self, deadline: float) -> None:
        while not self._stop:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._dispatch(self.client.poll(min(left, _POLL_SLICE)))

    def wait_presented(self, frame: int, timeout: float) -> bool:
        """Poll until frame `frame` (or a later one) was presented; False after timeout."""
        deadline = time.monotonic() + timeout
        while not self._stop:
            last = self.stats.last_presented_frame
            if last is not None and last >= frame:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._dispatch(self.client.poll(min(left, _POLL_SLICE)))
        return False

    def hold(self, seconds: float) -> None:
        """Keep the connection (and so the buffer on screen) for `seconds`, answering events."""
        self._wait_until(time.monotonic() + seconds)

    def paint_on_screen(self, colour: RGB) -> int:
        """Write a colour square (PAINT_RECT) into the buffer flipped last — the one on screen —
        without flipping. Returns its buffer id."""
        if self.on_screen is None:
            raise RuntimeError("nothing has been flipped yet")
        slot = self.swapchain.slots[self.on_screen]
        with cpu_write(slot.fd):
            paint_rect(slot.view, colour)
        self.stats.painted_buffer = slot.id
        return slot.id

    def _paint_when_presented(self, colour: RGB) -> None:
        last = self.stats.last_frame
        if last is None:
            log.error("guest %s: no frame was flipped; nothing painted", self.name)
            return
        if not self.wait_presented(last, PRESENT_TIMEOUT):
            if not self._stop:
                log.error("guest %s: frame %d was not presented within %.0f s (is the guest on an "
                          "output?); nothing painted", self.name, last, PRESENT_TIMEOUT)
            return
        slot_id = self.paint_on_screen(colour)
        print(f"painted {_hex(colour)} into buffer {slot_id} without flipping", flush=True)

    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        old = {sig: signal.signal(sig, lambda *_: self.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        return restore


# ---------------------------------------------------------------------------------------- devices

def find_card(on: str) -> str:
    """The /dev/dri path for --on: "display" (the first card that is not vgem), "vgem", or a path.
    Raises DeviceError with what to do."""
    from compositor.kms import Card, DeviceError, list_cards
    if on not in ("display", "vgem"):
        if not os.path.exists(on):
            raise DeviceError(f"no DRM device at {on}")
        return on
    cards = list_cards()
    if not cards:
        hint = ": load vgem with `modprobe vgem`" if on == "vgem" else ""
        raise DeviceError(f"no DRM device: /dev/dri has no card* node{hint}")
    drivers = []
    for path in cards:
        try:
            with Card(path, kms=False) as card:
                driver = card.driver
        except DeviceError as exc:
            log.debug("%s: %s", path, exc)
            continue
        drivers.append(f"{path} ({driver})")
        if (on == "vgem") == (driver == "vgem"):
            return path
    if on == "vgem":
        raise DeviceError(f"no vgem device among {', '.join(drivers) or 'the cards'}: load it with "
                          f"`modprobe vgem`")
    raise DeviceError(f"no display card among {', '.join(drivers) or 'the cards (none could be opened)'}")


# -------------------------------------------------------------------------------------------- CLI
# (its parser is directflip_tools.cli's)


def _hex(colour: RGB) -> str:
    return "{:02x}{:02x}{:02x}".format(*colour)


def run_cli(args: argparse.Namespace) -> int:
    prog = "directflip guest"
    if args.then_paint is not None and args.frames is None and args.duration is None:
        print(f"{prog}: error: --then-paint needs --frames or --duration (when to paint)", file=sys.stderr)
        return 2
    from compositor.kms import DeviceError, KmsError
    from compositor.sources.framesocket import ServerError
    width, height = args.size
    if args.socket is None:
        try:
            args.socket = socket_paths(args.seat)[0]
        except ValueError as exc:
            print(f"{prog}: error: --seat: {exc}", file=sys.stderr)
            return 2
    try:
        card_path = find_card(args.on)
        guest = SyntheticGuest(args.name, args.socket, card_path, width, height, args.rate,
                               buffers=args.buffers, uuid=args.uuid, reconnect=args.reconnect,
                               pointer=args.pointer, cursor=args.cursor, cursor_at=args.cursor_at)
        guest.open()
    except (DeviceError, KmsError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except ServerError as exc:
        print(f"{prog}: the compositor refused guest {args.name}: {getattr(exc, 'reason', None) or exc}",
              file=sys.stderr)
        return 3
    except TimeoutError:
        print(f"{prog}: the compositor at {args.socket} did not answer", file=sys.stderr)
        return 2
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"{prog}: no compositor listening on {args.socket}: start `directflip run`", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{prog}: cannot connect to {args.socket}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    stats = guest.run(args.duration, args.frames, then_paint=args.then_paint, hold=args.hold)
    print(stats.summary(args.name), flush=True)
    if stats.server_error is not None:
        return 3
    if args.then_paint is not None and stats.painted_buffer is None and not guest.stopped:
        return 1
    return 0


__all__ = ["DEFAULT_FRAME_SOCKET", "GuestStats", "InputState", "Slot", "Swapchain", "SyntheticGuest",
           "apply_input", "band_rect", "bar_rect", "cursor_pixels", "decode_counter", "decode_input",
           "draw_background", "draw_bar", "draw_counter", "draw_input", "find_card", "guest_colour",
           "ink_colour", "input_rect", "paint_rect", "run_cli", "xrgb_view"]
