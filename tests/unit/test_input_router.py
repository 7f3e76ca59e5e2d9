"""The seat router: focus, layout, pointer mapping, held keys and hotkeys (pure state, no devices)."""

from __future__ import annotations

import pytest
from evdev import ecodes as e

from compositor.input.keys import default_hotkeys, parse_hotkey
from compositor.input.router import SeatRouter, View, layout, to_guest
from compositor.planner import Rect
from compositor.policy import Position

SYN = (e.EV_SYN, e.SYN_REPORT, 0)


class Sink:
    def __init__(self, name: str, absolute: bool = True) -> None:
        self.name = name
        self.absolute = absolute
        self.calls: list[tuple] = []

    def key(self, code, down):
        self.calls.append(("key", code, down))

    def button(self, code, down):
        self.calls.append(("button", code, down))

    def wheel(self, dx, dy):
        self.calls.append(("wheel", dx, dy))

    def pointer_abs(self, x, y):
        self.calls.append(("abs", x, y))

    def pointer_rel(self, dx, dy):
        self.calls.append(("rel", dx, dy))

    def touch(self, kind, slot, x, y):
        self.calls.append(("touch", kind, slot, x, y))


def full(monitor, w, h, guest, bw=None, bh=None):
    bw, bh = bw or w, bh or h
    return View(monitor, w, h, guest, Rect(0, 0, bw, bh), Rect(0, 0, w, h))


@pytest.fixture
def seat():
    sinks = {"a": Sink("a"), "b": Sink("b"), "c": Sink("c", absolute=False)}
    actions = []
    r = SeatRouter("s", sink_of=sinks.get, actions=lambda n, a: actions.append((n, a)),
                   hotkeys=default_hotkeys(), vt_keys=True)
    r.set_views([full("left", 1024, 768, "a"), full("right", 800, 600, "b")])
    return r, sinks, actions


def tap(r, code, device=1):
    r.handle(device, [(e.EV_KEY, code, 1), SYN])
    r.handle(device, [(e.EV_KEY, code, 0), SYN])


def test_default_layout_is_left_to_right_in_seat_order():
    views = [View("a", 1024, 768), View("b", 800, 600), View("c", 640, 480)]
    # expected: a at 0, b against a's right edge, c against b's
    assert layout(views, {}) == {"a": Rect(0, 0, 1024, 768), "b": Rect(1024, 0, 800, 600),
                                 "c": Rect(1824, 0, 640, 480)}


def test_positions_coordinates_and_neighbours():
    views = [View("a", 1024, 768), View("b", 800, 600), View("c", 640, 480)]
    pos = {"a": Position(relation="right-of", of="b"), "b": Position(0, 0),
           "c": Position(relation="below", of="a")}
    # expected: b at the origin, a right of b, c below a (left-aligned with it)
    assert layout(views, pos) == {"b": Rect(0, 0, 800, 600), "a": Rect(800, 0, 1024, 768),
                                  "c": Rect(800, 768, 640, 480)}


def test_neighbour_not_lit_joins_the_row():
    views = [View("a", 1024, 768), View("c", 640, 480)]
    assert layout(views, {"c": Position(relation="below", of="b")})["c"] == Rect(1024, 0, 640, 480)


def test_to_guest_maps_through_rectangles_and_clamps_letterbox():
    # a 640x480 buffer scaled onto the middle 1024x768 of a 1366x768 monitor
    v = View("m", 1366, 768, "g", Rect(0, 0, 640, 480), Rect(171, 0, 1024, 768))
    assert to_guest(v, 171, 0) == (0, 0)
    assert to_guest(v, 171 + 512, 384) == (320, 240)
    assert to_guest(v, 0, 100) == (0, 62)  # on the left bar: the picture's left edge
    assert to_guest(v, 1365, 767) == (639, 479)


def test_keys_reach_only_the_focused_guest(seat):
    r, sinks, _ = seat
    tap(r, e.KEY_A)
    assert sinks["a"].calls == [("key", e.KEY_A, True), ("key", e.KEY_A, False)]
    assert sinks["b"].calls == []


def test_autorepeat_is_not_forwarded(seat):
    r, sinks, _ = seat
    r.handle(1, [(e.EV_KEY, e.KEY_A, 1), SYN, (e.EV_KEY, e.KEY_A, 2), SYN, (e.EV_KEY, e.KEY_A, 0), SYN])
    assert sinks["a"].calls == [("key", e.KEY_A, True), ("key", e.KEY_A, False)]


def test_pointer_crossing_the_edge_moves_focus_and_releases_held_keys(seat):
    r, sinks, _ = seat
    r.handle(1, [(e.EV_KEY, e.KEY_LEFTSHIFT, 1), SYN])
    # from the centre of left (512, 384) far right: into `right`
    r.handle(2, [(e.EV_REL, e.REL_X, 600), SYN])
    assert r.focused == "right"
    assert ("key", e.KEY_LEFTSHIFT, False) in sinks["a"].calls
    assert sinks["b"].calls == [("abs", 88, 384)]  # 1112 - 1024 = 88 on `right`
    r.handle(1, [(e.EV_KEY, e.KEY_LEFTSHIFT, 0), SYN])  # its real release goes nowhere
    assert not any(c[0] == "key" for c in sinks["b"].calls)


def test_pointer_stops_at_the_layout_edge(seat):
    r, sinks, _ = seat
    r.handle(2, [(e.EV_REL, e.REL_X, -5000), (e.EV_REL, e.REL_Y, -5000), SYN])
    assert r.focused == "left"
    assert sinks["a"].calls[-1] == ("abs", 0, 0)
    # into the gap below `right` (it is only 600 tall): stays on left
    r.handle(2, [(e.EV_REL, e.REL_Y, 700), SYN])
    r.handle(2, [(e.EV_REL, e.REL_X, 1100), SYN])
    assert r.focused == "left"


def test_relative_guest_gets_motion(seat):
    r, sinks, _ = seat
    r.set_views([full("left", 1024, 768, "c")])
    r.handle(2, [(e.EV_REL, e.REL_X, 3), (e.EV_REL, e.REL_Y, -2), (e.EV_REL, e.REL_WHEEL, 1), SYN])
    assert sinks["c"].calls == [("rel", 3, -2), ("wheel", 0, 1)]


def test_hotkey_is_swallowed_and_acts_on_release(seat):
    r, sinks, actions = seat
    r.handle(1, [(e.EV_KEY, e.KEY_LEFTCTRL, 1), (e.EV_KEY, e.KEY_LEFTALT, 1), SYN])
    r.handle(1, [(e.EV_KEY, e.KEY_N, 1), SYN])
    assert actions == []
    r.handle(1, [(e.EV_KEY, e.KEY_N, 0), SYN])
    assert actions == [("next-guest", None)]
    assert all(c[1] != e.KEY_N for c in sinks["a"].calls)


def test_hotkey_needs_exactly_its_modifiers(seat):
    r, sinks, actions = seat
    r.handle(1, [(e.EV_KEY, e.KEY_LEFTCTRL, 1), (e.EV_KEY, e.KEY_LEFTALT, 1), (e.EV_KEY, e.KEY_LEFTSHIFT, 1),
                 (e.EV_KEY, e.KEY_N, 1), (e.EV_KEY, e.KEY_N, 0), SYN])
    assert actions == []
    assert ("key", e.KEY_N, True) in sinks["a"].calls


def test_vt_switch_keys(seat):
    r, _, actions = seat
    r.handle(1, [(e.EV_KEY, e.KEY_RIGHTCTRL, 1), (e.EV_KEY, e.KEY_LEFTALT, 1), (e.EV_KEY, e.KEY_F2, 1),
                 (e.EV_KEY, e.KEY_F2, 0), SYN])
    assert actions == [("vt", 2)]


def test_focus_command_releases_and_moves_pointer(seat):
    r, sinks, _ = seat
    r.handle(2, [(e.EV_KEY, e.BTN_LEFT, 1), SYN])
    r.focus("right")
    assert sinks["a"].calls[-1] == ("button", e.BTN_LEFT, False)
    r.handle(2, [(e.EV_KEY, e.BTN_LEFT, 0), (e.EV_KEY, e.BTN_RIGHT, 1), SYN])
    assert sinks["b"].calls == [("abs", 400, 300), ("button", e.BTN_RIGHT, True)]


def test_shown_guest_change_releases_held(seat):
    r, sinks, _ = seat
    r.handle(1, [(e.EV_KEY, e.KEY_Q, 1), SYN])
    r.set_views([full("left", 1024, 768, "b"), full("right", 800, 600, "a")])
    assert sinks["a"].calls[-1] == ("key", e.KEY_Q, False)
    tap(r, e.KEY_W)
    assert sinks["b"].calls == [("key", e.KEY_W, True), ("key", e.KEY_W, False)]


def test_unplugged_keyboard_releases_what_only_it_held(seat):
    r, sinks, _ = seat
    r.handle(1, [(e.EV_KEY, e.KEY_A, 1), SYN])
    r.handle(3, [(e.EV_KEY, e.KEY_A, 1), (e.EV_KEY, e.KEY_B, 1), SYN])
    r.device_gone(3)
    assert sinks["a"].calls == [("key", e.KEY_A, True), ("key", e.KEY_B, True), ("key", e.KEY_B, False)]
    r.device_gone(1)
    assert sinks["a"].calls[-1] == ("key", e.KEY_A, False)


def test_released_grab_sends_nothing(seat):
    r, sinks, _ = seat
    r.handle(1, [(e.EV_KEY, e.KEY_A, 1), SYN])
    r.set_grabbed(False)
    assert sinks["a"].calls[-1] == ("key", e.KEY_A, False)
    tap(r, e.KEY_B)
    assert all(c[1] != e.KEY_B for c in sinks["a"].calls)


def test_tablet_spans_the_layout(seat):
    r, sinks, _ = seat
    rng = {e.ABS_X: (0, 32767), e.ABS_Y: (0, 32767)}.get
    r.handle(4, [(e.EV_ABS, e.ABS_X, 32767), (e.EV_ABS, e.ABS_Y, 0), SYN], abs_range=rng)
    assert r.focused == "right"
    assert sinks["b"].calls == [("abs", 799, 0)]


def test_touch_goes_to_the_focused_guest_in_buffer_pixels(seat):
    r, sinks, _ = seat
    r.set_views([full("left", 1024, 768, "a", 512, 384)])
    rng = {e.ABS_MT_POSITION_X: (0, 1023), e.ABS_MT_POSITION_Y: (0, 767)}.get
    r.handle(5, [(e.EV_ABS, e.ABS_MT_SLOT, 0), (e.EV_ABS, e.ABS_MT_TRACKING_ID, 7),
                 (e.EV_ABS, e.ABS_MT_POSITION_X, 1023), (e.EV_ABS, e.ABS_MT_POSITION_Y, 0), SYN],
             abs_range=rng)
    r.handle(5, [(e.EV_ABS, e.ABS_MT_TRACKING_ID, -1), SYN], abs_range=rng)
    assert sinks["a"].calls == [("touch", "down", 0, 511, 0), ("touch", "up", 0, 511, 0)]


def test_syn_dropped_resync_forgets_keys_no_longer_down(seat):
    r, sinks, _ = seat
    r.handle(1, [(e.EV_KEY, e.KEY_A, 1), (e.EV_KEY, e.KEY_B, 1), SYN])
    r.device_keys(1, {e.KEY_B})
    assert sinks["a"].calls[-1] == ("key", e.KEY_A, False)
    assert e.KEY_B in r.keys


def test_custom_hotkey():
    s = Sink("a")
    actions = []
    r = SeatRouter("s", sink_of={"a": s}.get, actions=lambda n, a: actions.append(n),
                   hotkeys=[parse_hotkey("next-monitor", "super+tab")])
    r.set_views([full("m", 640, 480, "a")])
    r.handle(1, [(e.EV_KEY, e.KEY_LEFTMETA, 1), (e.EV_KEY, e.KEY_TAB, 1), (e.EV_KEY, e.KEY_TAB, 0), SYN])
    assert actions == ["next-monitor"]
