"""The guest's pointer on a monitor's cursor plane.

A guest says what its pointer looks like (a `Cursor`: ARGB8888 image and hot spot, from QEMU's
CursorDefine, a frame-socket `cursor` message) and where it is (a `Pointer`, in the guest's
framebuffer pixels: QEMU's MouseSet, `cursor-move`, or — for a guest taking absolute positions — the
seat's own pointer, so the pointer moves on the next vblank without a round trip through the guest).
A `CursorLayer` turns that into the state of one plane of one CRTC:

- the image is scaled as the guest's picture is (the plan's src → dst rectangles; nearest neighbour),
  and clipped to the plane's buffer (the card's DRM_CAP_CURSOR_WIDTH/HEIGHT, 64x64 on most);
- it is written into one of two dumb buffers, never the one on screen, so a new image does not tear;
- the position is the hot spot mapped into the CRTC, minus the scaled hot spot; it may be partly off
  screen (CRTC_X/Y are signed; the kernel clips).

The layer only prepares; the scanout pipeline decides when to commit. It adds `add_to(request)` to the
next commit of its CRTC — the frame's flip when one is due, else a commit of the cursor alone — so a
CRTC has one commit per vblank carrying every changed plane and never a second commit in flight; the
latest state wins. A plane that refuses the cursor (TEST_ONLY) disables the layer, and status says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from compositor.formats import ARGB8888
from compositor.kms import Card, KmsError
from compositor.kms.card import DumbBuffer, lib
from compositor.planner import Rect
from compositor.sources.frame import Cursor, Pointer

log = logging.getLogger("directflip.cursor")

DEFAULT_SIZE = 64
MAX_SIZE = 256


def scale_image(cursor: Cursor, sx: float, sy: float, limit: tuple[int, int] | None = None
                ) -> tuple[int, int, bytes, int, int]:
    """The cursor's image scaled by (sx, sy), nearest neighbour: (width, height, pixels, hot_x, hot_y).
    With `limit` (the plane's buffer size) only what fits is computed: the rest would be cut anyway,
    and this runs on the compositor's loop."""
    w = max(1, round(cursor.width * sx))
    h = max(1, round(cursor.height * sy))
    if limit is not None:
        w, h = min(w, limit[0]), min(h, limit[1])
    if abs(sx - 1.0) < 1e-6 and abs(sy - 1.0) < 1e-6 and (w, h) == (cursor.width, cursor.height):
        return cursor.width, cursor.height, cursor.pixels, cursor.hot_x, cursor.hot_y
    src = memoryview(cursor.pixels)
    row_bytes = cursor.width * 4
    xs = [min(cursor.width - 1, int(x / sx)) * 4 for x in range(w)]
    out = bytearray(w * h * 4)
    for y in range(h):
        base = min(cursor.height - 1, int(y / sy)) * row_bytes
        row = bytearray().join(src[base + x: base + x + 4] for x in xs)
        out[y * w * 4:(y + 1) * w * 4] = row
    return w, h, bytes(out), int(cursor.hot_x * sx), int(cursor.hot_y * sy)


def crtc_position(pointer: Pointer, src: Rect, dst: Rect) -> tuple[int, int]:
    """A point of the guest's buffer on the CRTC, through the plane's rectangles."""
    x = dst.x + (pointer.x - src.x) * dst.w / max(1, src.w)
    y = dst.y + (pointer.y - src.y) * dst.h / max(1, src.h)
    return int(x), int(y)


# `committed` when what the plane shows is not known: equal to no wanted state (so the layer is dirty)
# and not None (so the plane counts as maybe lit: turned off with the output, never left on).
_UNKNOWN = ("unknown", None, None)


@dataclass
class _Slot:
    buffer: DumbBuffer
    fb: object
    serial: tuple | None = None  # what image (and scale) it holds


class CursorLayer:
    """One CRTC's cursor plane (or the overlay standing in for it)."""

    def __init__(self, card: Card, plane, crtc, size: tuple[int, int] | None = None) -> None:
        self.card = card
        self.plane = plane
        self.crtc = crtc
        if size is not None:  # an overlay plane showing an image of this size (the guest's name)
            self.width, self.height = size
        else:  # the cursor plane's size (vkms says 512; guests' cursors are at most 256)
            self.width = min(card.get_cap(lib.DRM_CAP_CURSOR_WIDTH) or DEFAULT_SIZE, MAX_SIZE)
            self.height = min(card.get_cap(lib.DRM_CAP_CURSOR_HEIGHT) or DEFAULT_SIZE, MAX_SIZE)
        self.slots: list[_Slot] = []
        self.front = -1  # the slot on screen
        self.cursor: Cursor | None = None
        self.pointer: Pointer | None = None
        self.src = self.dst = Rect(0, 0, 1, 1)
        self.wanted: tuple | None = None  # (slot serial, x, y) or None: the plane off
        self.committed: tuple | None = None
        self.disabled: str | None = None  # why the cursor is not shown (a refused plane)
        self.updates = 0
        self._pending_slot = -1

    # --- desired state ------------------------------------------------------------------------------

    def set(self, cursor: Cursor | None, pointer: Pointer | None, src: Rect, dst: Rect) -> bool:
        """The guest's cursor and pointer, and how its picture lies on the CRTC. True when the plane
        must change."""
        self.cursor, self.pointer, self.src, self.dst = cursor, pointer, src, dst
        self.wanted = self._state()
        return self.dirty

    @property
    def dirty(self) -> bool:
        return self.disabled is None and self.wanted != self.committed

    def _state(self) -> tuple | None:
        c, p = self.cursor, self.pointer
        if c is None or p is None or not p.visible:
            return None
        sx = self.dst.w / max(1, self.src.w)
        sy = self.dst.h / max(1, self.src.h)
        x, y = crtc_position(p, self.src, self.dst)
        hot_x, hot_y = int(c.hot_x * sx), int(c.hot_y * sy)
        return ((c.serial, round(sx, 4), round(sy, 4)), x - hot_x, y - hot_y)

    # --- the commit -------------------------------------------------------------------------------

    def add_to(self, req) -> None:
        """Add the wanted plane state to an atomic request (image written to the back slot first)."""
        if self.disabled is not None:
            return
        if self.wanted is None:
            req.add_plane(self.plane, None, None)
            self._pending_slot = -1
            return
        key, x, y = self.wanted
        try:
            slot = self._slot_for(key)
        except (KmsError, OSError) as exc:  # no buffer for it: the frames go on without this plane
            self.refuse(f"its buffer cannot be made ({exc})")
            return
        req.add_plane(self.plane, self.crtc, self.slots[slot].fb, (0, 0, self.width, self.height),
                      (x, y, self.width, self.height))
        self._pending_slot = slot

    def _slot_for(self, key: tuple) -> int:
        for i, s in enumerate(self.slots):
            if s.serial == key:
                return i
        if len(self.slots) < 2:
            buf = self.card.create_dumb(self.width, self.height, 32)
            self.slots.append(_Slot(buf, self.card.dumb_framebuffer(buf, ARGB8888)))
        back = next(i for i in range(len(self.slots)) if i != self.front)
        self._draw(self.slots[back], key)
        return back

    def _draw(self, slot: _Slot, key: tuple) -> None:
        assert self.cursor is not None
        _, sx, sy = key
        w, h, pixels, _, _ = scale_image(self.cursor, sx, sy, (self.width, self.height))
        view = slot.buffer.map()
        pitch = slot.buffer.pitch
        blank = bytes(pitch)
        for row in range(self.height):
            if row < h:
                take = min(w, self.width) * 4
                line = pixels[row * w * 4: row * w * 4 + take]
                view[row * pitch: row * pitch + pitch] = line + blank[:pitch - len(line)]
            else:
                view[row * pitch: row * pitch + pitch] = blank
        try:
            self.card.dirty(slot.fb)
        except KmsError:
            pass
        slot.serial = key
        self.updates += 1

    def plane_values(self) -> list[int] | None:
        """The wanted state as the values of the data plane's cursor properties (FB_ID, CRTC_ID,
        SRC_X/Y/W/H, CRTC_X/Y/W/H), or None when it needs an image not drawn in a slot yet."""
        if self.wanted is None:
            return [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        key, x, y = self.wanted
        slot = next((i for i, s in enumerate(self.slots) if s.serial == key), None)
        if slot is None:
            return None
        self._pending_slot = slot
        return [self.slots[slot].fb.id, self.crtc.id, 0, 0, self.width << 16, self.height << 16,
                x, y, self.width, self.height]

    def handed_over(self) -> None:
        """The state of plane_values() went to the data plane, which commits it (latest wins): the
        same as done() for what comes after. When the data plane gives the output back, taken_back()
        says what it really committed."""
        self.done()

    def taken_back(self, pending: bool, committed_fb: int | None) -> None:
        """The data plane gave the output back. `committed_fb`: the FB_ID of the last cursor state it
        committed (0: the plane off; None: it committed none, so front is still right). `pending`:
        the last state handed over never reached the plane (not committed yet, or refused), so the
        plane's state is unknown and the next commit sets it all."""
        if committed_fb is not None:
            self.front = next((i for i, s in enumerate(self.slots) if s.fb.id == committed_fb), -1)
        if pending:
            self.committed = _UNKNOWN

    def done(self) -> None:
        """The commit carrying add_to's state was accepted."""
        if self.disabled is None:
            self.committed = self.wanted
            self.front = self._pending_slot

    def refuse(self, reason: str) -> None:
        """The plane refused the cursor: stop using it (the frames go on without it)."""
        if self.disabled is None:
            log.warning("cursor on plane %d disabled: %s", self.plane.id, reason)
        self.disabled = reason

    def forget_commit(self) -> None:
        """The CRTC was reset (a modeset, a resumed session): nothing of ours is on screen."""
        self.committed = None
        self.front = -1

    def close(self) -> None:
        for s in self.slots:
            try:
                s.fb.remove()
            except KmsError as exc:
                log.warning("removing a cursor framebuffer: %s", exc)
            s.buffer.destroy()
        self.slots.clear()

    def status(self) -> dict:
        state = self.wanted
        return {"plane": self.plane.id, "type": self.plane.type, "size": f"{self.width}x{self.height}",
                "shown": state is not None and self.disabled is None,
                "position": list(state[1:]) if state else None,
                "image": f"{self.cursor.width}x{self.cursor.height}" if self.cursor else None,
                "updates": self.updates, "disabled": self.disabled}
