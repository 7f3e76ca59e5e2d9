"""Focus and routing: a seat's input events to the guest its focused monitor shows.

Each policy seat has monitors laid out side by side (the `position` policy key, else left to right in
the seat's order), one focused monitor, and one pointer that moves across the layout. The guest shown
on the focused monitor receives the seat's keyboard and pointer; crossing an edge moves the focus to
the monitor the pointer enters. What a monitor shows comes from the plan (`set_views`), so input
follows failover, hotplug and `directflip show` without knowing about them.

Nothing is left held down in a guest: every key and button a guest saw go down is released in that
guest before input moves elsewhere (focus, the shown guest, a VT switch, the grab let go, a device
unplugged). A key released early that way is still physically down; its real release later is
swallowed rather than sent to a guest that never saw it pressed.

Hotkeys (the policy's `hotkeys`, see compositor.input.keys) match on press, act on release, and
neither reaches a guest. Ctrl+Alt+F1…F12 switch virtual terminals (a bare console, or through
logind), as the console's own keyboard handler would if the keyboard were not taken from it.

The router is pure state: events in, calls to `InputSink`s and to the `actions` callback out, no I/O.
Devices feed it one evdev frame (the events up to a SYN_REPORT) at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from evdev import ecodes

from compositor.input.keys import MODIFIER_OF, Hotkey, is_keyboard_key, is_pointer_button
from compositor.input.sink import InputSink
from compositor.planner import Rect
from compositor.policy import Position

log = logging.getLogger("directflip.input")

# A direct session's VT switch keys: Ctrl+Alt+F1 … F12.
_VT_KEYS = {getattr(ecodes, f"KEY_F{n}"): n for n in range(1, 13)}


def _send_key(sink: InputSink, code: int, down: bool) -> None:
    sink.key(code, down)


def _send_button(sink: InputSink, code: int, down: bool) -> None:
    sink.button(code, down)


@dataclass(frozen=True)
class View:
    """What one monitor of a seat shows, as input needs it: the mode (its size in the layout) and the
    rectangles that put the guest's buffer (`src`) on the screen (`dst`)."""

    monitor: str
    width: int
    height: int
    guest: str | None = None
    src: Rect | None = None
    dst: Rect | None = None


def layout(views: Sequence[View], positions: Mapping[str, Position | None]) -> dict[str, Rect]:
    """Each lit monitor's rectangle in the seat's layout. Monitors with coordinates sit there; one
    `right-of`/`left-of`/`above`/`below` another sits against that one's edge, top- or left-aligned;
    the rest follow left to right after everything placed, in the seat's order. A neighbour that is
    not lit is skipped, so the monitor joins the row."""
    size = {v.monitor: (v.width, v.height) for v in views}
    rects: dict[str, Rect] = {}
    for v in views:
        pos = positions.get(v.monitor)
        if pos is not None and pos.relation is None:
            rects[v.monitor] = Rect(pos.x, pos.y, v.width, v.height)
    pending = [v.monitor for v in views if v.monitor not in rects]
    progress = True
    while progress:  # neighbours of neighbours: resolve what can be, until nothing changes
        progress = False
        for m in list(pending):
            pos = positions.get(m)
            if pos is None or pos.of not in rects:
                continue
            w, h = size[m]
            o = rects[pos.of]
            rects[m] = {"right-of": Rect(o.x + o.w, o.y, w, h), "left-of": Rect(o.x - w, o.y, w, h),
                        "above": Rect(o.x, o.y - h, w, h), "below": Rect(o.x, o.y + o.h, w, h)}[pos.relation]
            pending.remove(m)
            progress = True
    for m in pending:
        right = max((r.x + r.w for r in rects.values()), default=0)
        w, h = size[m]
        rects[m] = Rect(right, 0, w, h)
    return rects


def _inside(r: Rect, x: float, y: float) -> bool:
    return r.x <= x < r.x + r.w and r.y <= y < r.y + r.h


def to_guest(view: View, cx: float, cy: float) -> tuple[int, int] | None:
    """A point on the monitor (CRTC pixels) in the guest buffer's pixels, through the plane's
    rectangles; a point on a letterbox bar is clamped to the picture's edge."""
    if view.src is None or view.dst is None or view.dst.w <= 0 or view.dst.h <= 0:
        return None
    s, d = view.src, view.dst
    fx = min(max((cx - d.x) / d.w, 0.0), 1.0)
    fy = min(max((cy - d.y) / d.h, 0.0), 1.0)
    gx = s.x + min(int(fx * s.w), s.w - 1)
    gy = s.y + min(int(fy * s.h), s.h - 1)
    return gx, gy


@dataclass
class _Held:
    sink: InputSink | None  # None: swallowed (a hotkey) or already released in its guest
    devices: set[int] = field(default_factory=set)


@dataclass
class _Touch:
    x: int = 0  # device units
    y: int = 0
    gx: int = 0  # the last position sent, guest buffer pixels
    gy: int = 0
    tracking: int = -1
    sink: InputSink | None = None
    changed: bool = False


@dataclass
class DeviceFrame:
    """The state a device's events build up until SYN_REPORT."""

    dx: int = 0
    dy: int = 0
    wheel_x: int = 0
    wheel_y: int = 0
    abs_x: int | None = None
    abs_y: int | None = None
    slot: int = 0
    touches: dict[int, _Touch] = field(default_factory=dict)


class SeatRouter:
    """One policy seat's focus, pointer and held keys.

    `sink_of(guest)` gives the InputSink of a running guest (None: it takes no input).
    `actions(name, arg)` is called for hotkeys: "next-guest", "next-monitor", "release-input", and "vt"
    with the terminal's number."""

    def __init__(self, name: str, *, sink_of: Callable[[str], InputSink | None],
                 actions: Callable[[str, object], None], hotkeys: Iterable[Hotkey] = (),
                 positions: Mapping[str, Position | None] | None = None, vt_keys: bool = False,
                 pointer_moved: Callable[[str, int, int], None] | None = None) -> None:
        self.name = name
        # (guest, x, y) each time the pointer is sent to a guest in absolute mode: its cursor follows
        self.pointer_moved = pointer_moved
        self.sink_of = sink_of
        self.actions = actions
        self.hotkeys = tuple(hotkeys)
        self.positions: Mapping[str, Position | None] = positions or {}
        self.vt_keys = vt_keys
        self.views: dict[str, View] = {}
        self.order: list[str] = []
        self.rects: dict[str, Rect] = {}
        self.focused: str | None = None
        self.pointer = (0.0, 0.0)  # layout pixels
        self.grabbed = True  # False after release-input: events go nowhere until taken again
        self.keys: dict[int, _Held] = {}
        self.buttons: dict[int, _Held] = {}
        self.modifiers: dict[int, set[int]] = {}  # modifier key → devices holding it (physically)
        self._pending_action: dict[int, tuple[str, object]] = {}  # swallowed key → its action on release
        self._resyncing: set[int] = set()
        self._last_abs: tuple[InputSink, int, int] | None = None
        self.frames: dict[int, DeviceFrame] = {}
        self.events = 0
        self.sent = 0

    # --- what is shown, and where focus is ------------------------------------------------------

    def set_views(self, views: Sequence[View], positions: Mapping[str, Position | None] | None = None,
                  hotkeys: Iterable[Hotkey] | None = None) -> None:
        """The seat's lit monitors in seat order, after each plan (or policy edit)."""
        if positions is not None:
            self.positions = positions
        if hotkeys is not None:
            self.hotkeys = tuple(hotkeys)
        before = self._focused_sink()
        self.views = {v.monitor: v for v in views}
        self.order = [v.monitor for v in views]
        self.rects = layout(views, self.positions)
        if self.focused not in self.views:
            self.focused = self.order[0] if self.order else None
            self._centre_pointer()
        else:
            self._clamp_pointer()
        if self._focused_sink() is not before:
            self.release_all("the guest on the focused monitor changed")

    def focus(self, monitor: str, *, move_pointer: bool = True) -> None:
        if monitor not in self.views:
            raise KeyError(monitor)
        if monitor == self.focused:
            return
        old = self._focused_sink()
        self.focused = monitor
        if move_pointer:
            self._centre_pointer()
        if self._focused_sink() is not old:
            self.release_all(f"focus moved to {monitor}")
        log.info("seat %s: focus on %s (%s)", self.name, monitor, self.views[monitor].guest or "slate")

    def next_monitor(self) -> str | None:
        if not self.order:
            return None
        i = self.order.index(self.focused) if self.focused in self.order else -1
        target = self.order[(i + 1) % len(self.order)]
        self.focus(target)
        return target

    @property
    def focused_guest(self) -> str | None:
        view = self.views.get(self.focused) if self.focused else None
        return view.guest if view else None

    def _focused_sink(self) -> InputSink | None:
        guest = self.focused_guest
        return self.sink_of(guest) if guest is not None and self.grabbed else None

    def _centre_pointer(self) -> None:
        r = self.rects.get(self.focused) if self.focused else None
        if r is not None:
            self.pointer = (r.x + r.w / 2, r.y + r.h / 2)

    def _clamp_pointer(self) -> None:
        r = self.rects.get(self.focused) if self.focused else None
        if r is not None:
            x, y = self.pointer
            self.pointer = (min(max(x, r.x), r.x + r.w - 1), min(max(y, r.y), r.y + r.h - 1))

    # --- letting go -----------------------------------------------------------------------------

    def release_all(self, why: str) -> None:
        """Release every key and button a guest holds down; their physical releases are swallowed."""
        n = 0
        for table, send in ((self.keys, _send_key), (self.buttons, _send_button)):
            for code, held in table.items():
                if held.sink is not None:
                    send(held.sink, code, False)
                    held.sink = None
                    n += 1
        for frame in self.frames.values():
            for t in frame.touches.values():
                if t.sink is not None:
                    t.sink.touch("cancel", self._slot_of(frame, t), t.gx, t.gy)
                    t.sink = None
        self._last_abs = None
        if n:
            self.sent += n
            log.info("seat %s: released %d held key(s)/button(s) in the guest: %s", self.name, n, why)

    @staticmethod
    def _slot_of(frame: DeviceFrame, touch: _Touch) -> int:
        return next((s for s, t in frame.touches.items() if t is touch), 0)

    def set_grabbed(self, grabbed: bool) -> None:
        if grabbed == self.grabbed:
            return
        if not grabbed:
            self.release_all("input released")
        self.grabbed = grabbed

    def device_gone(self, device: int) -> None:
        """A device was unplugged or closed: what only it held down is released in its guest."""
        for table, send in ((self.keys, _send_key), (self.buttons, _send_button)):
            for code in list(table):
                held = table[code]
                held.devices.discard(device)
                if not held.devices:
                    if held.sink is not None:
                        send(held.sink, code, False)
                        self.sent += 1
                    del table[code]
                    self._pending_action.pop(code, None)  # a hotkey whose key went away never acts
        for code in list(self.modifiers):
            self.modifiers[code].discard(device)
            if not self.modifiers[code]:
                del self.modifiers[code]
        frame = self.frames.pop(device, None)
        if frame is not None:
            for slot, t in frame.touches.items():
                if t.sink is not None:
                    t.sink.touch("cancel", slot, t.gx, t.gy)

    def device_keys(self, device: int, down: set[int]) -> None:
        """After SYN_DROPPED: the keys the device really holds now (EVIOCGKEY); forget the rest."""
        self._resyncing.add(device)
        try:
            for table, send in ((self.keys, _send_key), (self.buttons, _send_button)):
                for code in list(table):
                    held = table[code]
                    if device in held.devices and code not in down:
                        self._release(table, code, device, send)
        finally:
            self._resyncing.discard(device)
        for code in list(self.modifiers):
            if code not in down:
                self.modifiers[code].discard(device)
                if not self.modifiers[code]:
                    del self.modifiers[code]

    # --- events -----------------------------------------------------------------------------------

    def handle(self, device: int, events: Iterable[tuple[int, int, int]], *,
               abs_range: Callable[[int], tuple[int, int] | None] | None = None) -> None:
        """One device's events (type, code, value), in order. `abs_range(code)` gives an absolute
        axis' (min, max) for tablets and touchscreens."""
        frame = self.frames.setdefault(device, DeviceFrame())
        for etype, code, value in events:
            self.events += 1
            if etype == ecodes.EV_KEY:
                self._key_event(device, code, value)
            elif etype == ecodes.EV_REL:
                self._rel(frame, code, value)
            elif etype == ecodes.EV_ABS:
                self._abs(frame, code, value)
            elif etype == ecodes.EV_SYN and code == ecodes.SYN_REPORT:
                self._frame_done(frame, abs_range)

    def _key_event(self, device: int, code: int, value: int) -> None:
        """A key or button pressed (1) or released (0): passed on at once, not at the frame's end as
        motion is."""
        if value == 2:
            return  # autorepeat: the guest repeats held keys itself
        if is_keyboard_key(code):
            self._key(device, code, value == 1)
        elif is_pointer_button(code):
            self._button(device, code, value == 1)

    def _rel(self, frame: DeviceFrame, code: int, value: int) -> None:
        """Relative motion and wheels add up over the frame, sent together at its end."""
        if code == ecodes.REL_X:
            frame.dx += value
        elif code == ecodes.REL_Y:
            frame.dy += value
        elif code == ecodes.REL_WHEEL:
            frame.wheel_y += value
        elif code == ecodes.REL_HWHEEL:
            frame.wheel_x += value

    def _key(self, device: int, code: int, down: bool) -> None:
        if code in MODIFIER_OF:
            holders = self.modifiers.setdefault(code, set())
            if down:
                holders.add(device)
            else:
                holders.discard(device)
                if not holders:
                    del self.modifiers[code]
        if down:
            if code in self.keys:
                self.keys[code].devices.add(device)
                return
            action = self._hotkey(code)
            if action is not None:
                self.keys[code] = _Held(None, {device})
                self._pending_action[code] = action
                return
            sink = self._focused_sink()
            self.keys[code] = _Held(sink, {device})
            if sink is not None:
                sink.key(code, True)
                self.sent += 1
        else:
            self._release(self.keys, code, device, _send_key)
            if code in self._pending_action and code not in self.keys:
                name, arg = self._pending_action.pop(code)
                log.info("seat %s: hotkey %s", self.name, name if arg is None else f"{name} {arg}")
                try:
                    self.actions(name, arg)
                except Exception:  # noqa: BLE001 — the rest of the batch (its releases) must still go
                    log.exception("seat %s: hotkey %s failed", self.name, name)

    def _hotkey(self, code: int) -> tuple[str, object] | None:
        held = {MODIFIER_OF[c] for c in self.modifiers}
        for h in self.hotkeys:
            if h.key == code and h.modifiers == held:
                return h.action, None
        if self.vt_keys and code in _VT_KEYS and held == {"ctrl", "alt"}:
            return "vt", _VT_KEYS[code]
        return None

    def _release(self, table: dict[int, _Held], code: int, device: int,
                 send: Callable[[InputSink, int, bool], None]) -> None:
        held = table.get(code)
        if held is None:
            return  # pressed before we had the device, or its press went with a dropped frame
        held.devices.discard(device)
        if held.devices:
            return  # another device still holds it
        if held.sink is not None:
            send(held.sink, code, False)
            self.sent += 1
        del table[code]
        if device in self._resyncing:
            self._pending_action.pop(code, None)

    def _button(self, device: int, code: int, down: bool) -> None:
        if not down:
            self._release(self.buttons, code, device, _send_button)
            return
        if code in self.buttons:
            self.buttons[code].devices.add(device)
            return
        sink = self._focused_sink()
        if sink is not None and sink.absolute:
            self._send_abs(sink)  # the click lands where the pointer is, whatever came before
        self.buttons[code] = _Held(sink, {device})
        if sink is not None:
            sink.button(code, True)
            self.sent += 1

    def _abs(self, frame: DeviceFrame, code: int, value: int) -> None:
        if code == ecodes.ABS_X:
            frame.abs_x = value
        elif code == ecodes.ABS_Y:
            frame.abs_y = value
        elif code == ecodes.ABS_MT_SLOT:
            frame.slot = value
        elif code in (ecodes.ABS_MT_TRACKING_ID, ecodes.ABS_MT_POSITION_X, ecodes.ABS_MT_POSITION_Y):
            t = frame.touches.setdefault(frame.slot, _Touch())
            if code == ecodes.ABS_MT_TRACKING_ID:
                t.tracking = value
            elif code == ecodes.ABS_MT_POSITION_X:
                t.x = value
            else:
                t.y = value
            t.changed = True

    def _frame_done(self, frame: DeviceFrame, abs_range) -> None:
        moved = False
        if frame.dx or frame.dy:
            self._move_by(frame.dx, frame.dy)
            moved = True
        if frame.abs_x is not None or frame.abs_y is not None:
            if frame.touches:
                frame.abs_x = frame.abs_y = None  # a touchscreen's single-touch axes repeat its slot 0
            else:
                self._move_to_abs(frame.abs_x, frame.abs_y, abs_range)
                moved = True
        sink = self._focused_sink()
        if moved and sink is not None:
            if sink.absolute:
                self._send_abs(sink)
            elif frame.dx or frame.dy:
                sink.pointer_rel(frame.dx, frame.dy)
                self.sent += 1
        if (frame.wheel_x or frame.wheel_y) and sink is not None:
            sink.wheel(frame.wheel_x, frame.wheel_y)
            self.sent += 1
        if any(t.changed for t in frame.touches.values()):
            self._touches(frame, abs_range)
        frame.dx = frame.dy = frame.wheel_x = frame.wheel_y = 0
        frame.abs_x = frame.abs_y = None

    def _move_by(self, dx: int, dy: int) -> None:
        x, y = self.pointer
        self._move_to(x + dx, y + dy)

    def _move_to_abs(self, ax: int | None, ay: int | None, abs_range) -> None:
        """A tablet spans the seat's whole layout."""
        if not self.rects:
            return
        left = min(r.x for r in self.rects.values())
        top = min(r.y for r in self.rects.values())
        right = max(r.x + r.w for r in self.rects.values())
        bottom = max(r.y + r.h for r in self.rects.values())
        x, y = self.pointer
        for value, code, lo_px, hi_px in ((ax, ecodes.ABS_X, left, right), (ay, ecodes.ABS_Y, top, bottom)):
            if value is None:
                continue
            rng = abs_range(code) if abs_range else None
            lo, hi = rng if rng and rng[1] > rng[0] else (0, 32767)
            f = min(max((value - lo) / (hi - lo), 0.0), 1.0)
            pos = round(lo_px + f * (hi_px - lo_px - 1))  # to the nearest pixel: a tablet has more steps
            if code == ecodes.ABS_X:
                x = pos
            else:
                y = pos
        self._move_to(x, y)

    def _move_to(self, x: float, y: float) -> None:
        """Move the pointer; entering another monitor's rectangle moves the focus there. Outside every
        monitor (past the layout's edge, or into a gap) it stops at the focused monitor's edge."""
        if self.focused is None:
            return
        current = self.rects[self.focused]
        if not _inside(current, x, y):
            entered = next((m for m in self.order if _inside(self.rects[m], x, y)), None)
            if entered is not None:
                self.pointer = (x, y)
                self.focus(entered, move_pointer=False)
                return
            x = min(max(x, current.x), current.x + current.w - 1)
            y = min(max(y, current.y), current.y + current.h - 1)
        self.pointer = (x, y)

    def pointer_in_guest(self) -> tuple[int, int] | None:
        """The pointer in the focused guest's buffer pixels."""
        if self.focused is None:
            return None
        r = self.rects[self.focused]
        return to_guest(self.views[self.focused], self.pointer[0] - r.x, self.pointer[1] - r.y)

    def pointer_on_monitor(self) -> tuple[str, int, int] | None:
        """The pointer as (monitor, x, y) in that monitor's CRTC pixels: where a cursor is drawn."""
        if self.focused is None:
            return None
        r = self.rects[self.focused]
        return self.focused, int(self.pointer[0] - r.x), int(self.pointer[1] - r.y)

    def _send_abs(self, sink: InputSink) -> None:
        pos = self.pointer_in_guest()
        if pos is None:
            return
        if self._last_abs is not None and self._last_abs == (sink, *pos):
            return
        self._last_abs = (sink, *pos)
        sink.pointer_abs(*pos)
        self.sent += 1
        if self.pointer_moved is not None and self.focused_guest is not None:
            try:
                self.pointer_moved(self.focused_guest, *pos)
            except Exception:  # noqa: BLE001 — a cursor problem must not cost the guest its input
                log.exception("seat %s: moving %s's cursor failed", self.name, self.focused_guest)

    def _touches(self, frame: DeviceFrame, abs_range) -> None:
        """A touchscreen covers the focused monitor; contacts go to its guest in buffer pixels."""
        view = self.views.get(self.focused) if self.focused else None
        for slot, t in frame.touches.items():
            if not t.changed:
                continue
            t.changed = False
            if view is None:
                continue
            pos = None
            xr = abs_range(ecodes.ABS_MT_POSITION_X) if abs_range else None
            yr = abs_range(ecodes.ABS_MT_POSITION_Y) if abs_range else None
            if xr and yr and xr[1] > xr[0] and yr[1] > yr[0]:
                cx = (t.x - xr[0]) / (xr[1] - xr[0]) * (view.width - 1)
                cy = (t.y - yr[0]) / (yr[1] - yr[0]) * (view.height - 1)
                pos = to_guest(view, cx, cy)
            if t.tracking < 0:  # lifted
                if t.sink is not None:
                    t.sink.touch("up", slot, t.gx, t.gy)
                    self.sent += 1
                t.sink = None
                continue
            if pos is None:
                continue
            t.gx, t.gy = pos
            if t.sink is None:
                t.sink = self._focused_sink()
                if t.sink is not None:
                    t.sink.touch("down", slot, *pos)
                    self.sent += 1
            else:
                t.sink.touch("motion", slot, *pos)
                self.sent += 1
        for slot in [s for s, t in frame.touches.items() if t.tracking < 0 and t.sink is None]:
            del frame.touches[slot]

    def status(self) -> dict:
        return {
            "focused": self.focused,
            "guest": self.focused_guest,
            "grabbed": self.grabbed,
            "pointer": self.pointer_on_monitor(),
            "layout": {m: str(r) for m, r in self.rects.items()},
            "held": sorted(self.keys) + sorted(self.buttons),
            "events": self.events,
            "sent": self.sent,
            "hotkeys": {h.action: h.text for h in self.hotkeys},
        }
