"""Synthetic guests, the pure parts: the counter band round trip, screenshot decoding, the moving
bar's erase, strides, colours, and that a frame touches only the band and the bar rects. No device:
buffers are bytearrays viewed the way a Swapchain views its mmaps."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import signal
import sys
import threading
import time
import types

import numpy as np
import pytest

from compositor.sources.framesocket import Button, Key, Motion, Pointer, Touch, Wheel  # the real ones
from directflip_tools import cli as tools_cli
from directflip_tools import synthetic as syn

W, H = 640, 480


def buffer(width: int = W, height: int = H, pitch: int | None = None) -> np.ndarray:
    pitch = pitch or width * 4
    return syn.xrgb_view(bytearray(pitch * height), width, height, pitch)


def to_rgb(view: np.ndarray) -> np.ndarray:
    """What a screendump of the buffer shows: B,G,R,X in memory → R,G,B."""
    return np.ascontiguousarray(view[..., 2::-1])


def frame(name: str, n: int, width: int = W, height: int = H) -> np.ndarray:
    """A fresh buffer showing frame n."""
    view = buffer(width, height)
    syn.draw_background(view, name)
    bg = view.copy()
    syn.draw_counter(view, n)
    syn.draw_bar(view, n, bg, syn.ink_colour(syn.guest_colour(name)))
    return view


def inside(rects, ys, xs) -> np.ndarray:
    ok = np.zeros(len(ys), dtype=bool)
    for x, y, w, h in rects:
        ok |= (xs >= x) & (xs < x + w) & (ys >= y) & (ys < y + h)
    return ok


# ------------------------------------------------------------------------------------------ counter

@pytest.mark.parametrize("n", [0, 1, 2, 0x80000000, 0x55555555, 123456789, 2**32 - 1])
def test_counter_round_trip(n):
    view = buffer()
    syn.draw_background(view, "office")
    syn.draw_counter(view, n)
    assert syn.decode_counter(to_rgb(view)) == n


def test_counter_wraps_modulo_2_32():
    view = buffer()
    syn.draw_background(view, "office")
    syn.draw_counter(view, 2**32 + 5)
    assert syn.decode_counter(to_rgb(view)) == 5


def test_counter_overwrites_previous_value():
    view = buffer()
    syn.draw_background(view, "media")
    syn.draw_counter(view, 2**32 - 1)
    syn.draw_counter(view, 0)
    assert syn.decode_counter(to_rgb(view)) == 0


def test_band_layout_is_documented_one():
    # cell i spans x = 8 + 16 i .. +16, y = 8 .. 24: white marker, black marker, then MSB first.
    view = buffer()
    syn.draw_background(view, "office")
    syn.draw_counter(view, 1 << 31)
    rgb = to_rgb(view)
    assert syn.band_rect() == (8, 8, 34 * 16, 16)
    assert (rgb[8:24, 8:24] == 255).all()          # marker: white
    assert (rgb[8:24, 24:40] == 0).all()           # marker: black
    assert (rgb[8:24, 40:56] == 255).all()         # bit 31
    assert (rgb[8:24, 56:8 + 34 * 16] == 0).all()  # bits 30..0


def test_decode_rejects_random_and_plain_images():
    rng = np.random.default_rng(1)
    for _ in range(20):
        assert syn.decode_counter(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) is None
    assert syn.decode_counter(np.zeros((H, W, 3), np.uint8)) is None            # no white marker
    assert syn.decode_counter(np.full((H, W, 3), 255, np.uint8)) is None        # no black marker
    view = buffer()
    syn.draw_background(view, "office")                                         # background only
    assert syn.decode_counter(to_rgb(view)) is None


def test_decode_rejects_a_wrong_origin():
    rgb = to_rgb(frame("office", 0xDEADBEEF))
    assert syn.decode_counter(rgb) == 0xDEADBEEF
    for origin in [(8, 0), (-8, 0), (0, 8), (0, -8), (16, 0), (-16, 0), (5, 5)]:
        assert syn.decode_counter(rgb, origin) is None, origin
    assert syn.decode_counter(rgb, (W, H)) is None           # band off the image
    assert syn.decode_counter(rgb[:20]) is None               # image too small for the band


def test_decode_tolerates_a_small_offset():
    rgb = to_rgb(frame("office", 77))
    for origin in [(2, 0), (-3, 0), (0, 3), (-2, -2)]:
        assert syn.decode_counter(rgb, origin) == 77, origin


@pytest.mark.parametrize("screen", [(1920, 1080), (1024, 768), (W, H)])
def test_decode_on_a_screen_with_the_buffer_centred(screen):
    sw, sh = screen
    rgb = to_rgb(frame("build-1", 424242))
    shot = np.zeros((sh, sw, 3), np.uint8)
    ox, oy = (sw - W) // 2, (sh - H) // 2
    shot[oy:oy + H, ox:ox + W] = rgb
    assert syn.decode_counter(shot, (ox, oy)) == 424242
    rgba = np.concatenate([shot, np.full((sh, sw, 1), 255, np.uint8)], axis=-1)   # a PNG with alpha
    assert syn.decode_counter(rgba, (ox, oy)) == 424242
    if (ox, oy) != (0, 0):
        assert syn.decode_counter(shot) is None


# ---------------------------------------------------------------------------------------------- bar

def test_bar_position():
    assert syn.bar_rect(W, H, 0) == (0, syn.BAR_TOP, 16, H - syn.BAR_TOP)
    assert syn.bar_rect(W, H, 3)[0] == 24
    assert syn.bar_rect(W, H, (W - 16) // 8)[0] == 0      # wraps at width - 16
    assert all(0 <= syn.bar_x(W, n) <= W - 16 for n in range(1000))


def prepared(name: str):
    """A buffer with the guest's background drawn, a copy of that background, and the bar's ink."""
    view = buffer()
    syn.draw_background(view, name)
    return view, view.copy(), syn.ink_colour(syn.guest_colour(name))


def test_bar_erase_leaves_no_stale_pixels():
    view, bg, ink = prepared("office")
    painted = None
    for n in range(51):
        syn.draw_counter(view, n)
        painted = syn.draw_bar(view, n, bg, ink, painted)
    np.testing.assert_array_equal(view, frame("office", 50))


def test_bar_erase_across_the_wrap_and_in_a_swapchain_rotation():
    # Three buffers used in turn, like a swapchain: each sees every third frame, and the bar wraps.
    name = "media"
    views = [buffer() for _ in range(3)]
    for v in views:
        syn.draw_background(v, name)
    bg = views[0].copy()
    ink = syn.ink_colour(syn.guest_colour(name))
    painted: list[int | None] = [None, None, None]
    last = 3 * (W - 16) // 8 + 10
    for n in range(last + 1):
        i = n % 3
        syn.draw_counter(views[i], n)
        painted[i] = syn.draw_bar(views[i], n, bg, ink, painted[i])
    for i, n in zip(range(3), range(last - 2, last + 1), strict=True):
        np.testing.assert_array_equal(views[n % 3], frame(name, n), err_msg=f"buffer {i}")


def test_bar_keeps_the_name():
    # Erasing restores the background image, so the name survives the bar passing over it.
    name = "build-1"
    view = buffer()
    syn.draw_background(view, name)
    bg = view.copy()
    colour = syn.guest_colour(name)
    assert (np.any(bg[..., :3] != syn._bgrx(colour)[:3], axis=-1)[syn.BAR_TOP:]).sum() > 100  # text drawn
    painted = None
    for n in range((W - 16) // 8 + 1):
        painted = syn.draw_bar(view, n, bg, syn.ink_colour(colour), painted)
    syn.draw_bar(view, 0, bg, syn.ink_colour(colour), painted)
    mask = np.ones(view.shape[:2], bool)
    x, y, w, h = syn.bar_rect(W, H, 0)
    mask[y:y + h, x:x + w] = False
    np.testing.assert_array_equal(view[mask], bg[mask])


def test_a_frame_touches_only_the_band_and_the_bar_rects():
    view, bg, ink = prepared("office")
    painted = None
    for m, n in [(0, 3), (3, 4), (4, 100), (100, 101), (200, 0)]:
        syn.draw_counter(view, m)
        painted = syn.draw_bar(view, m, bg, ink, painted)
        before = view.copy()
        syn.draw_counter(view, n)
        painted = syn.draw_bar(view, n, bg, ink, painted)
        ys, xs = np.nonzero(np.any(view != before, axis=-1))
        assert len(ys)
        rects = [syn.band_rect(), syn.bar_rect(W, H, m), syn.bar_rect(W, H, n)]
        assert inside(rects, ys, xs).all(), (m, n)


# -------------------------------------------------------------------------------------------- input

INPUT_STATES = [
    syn.InputState(),
    syn.InputState(key=30, key_down=True, keys=1, buttons=1, x=640, y=360, dx=-3, dy=5, wheel_dx=-1,
                   wheel_dy=2),
    syn.InputState(key=0x2FF, key_down=False, keys=4095, buttons=7, x=16383, y=16383, dx=-32768, dy=32767,
                   wheel_dx=32767, wheel_dy=-32768),
    syn.InputState(key=1, key_down=True, keys=2048, buttons=2, x=0, y=1, dx=1, dy=-1, wheel_dx=0,
                   wheel_dy=0),
]


def input_frame(name: str, n: int, state: syn.InputState, width: int = W, height: int = H) -> np.ndarray:
    view = frame(name, n, width, height)
    syn.draw_input(view, state)
    return view


@pytest.mark.parametrize("state", INPUT_STATES)
def test_input_round_trip(state):
    rgb = to_rgb(input_frame("office", 5, state))
    assert syn.decode_input(rgb) == state
    assert syn.decode_counter(rgb) == 5                       # the counter band is untouched


def test_input_round_trip_of_random_states():
    rng = np.random.default_rng(7)
    view = buffer()
    syn.draw_background(view, "media")
    for _ in range(50):
        state = syn.InputState(
            key=int(rng.integers(0, 768)), key_down=bool(rng.integers(0, 2)), keys=int(rng.integers(0, 4096)),
            buttons=int(rng.integers(0, 8)), x=int(rng.integers(0, 16384)), y=int(rng.integers(0, 16384)),
            **{f: int(rng.integers(-32768, 32768)) for f in ("dx", "dy", "wheel_dx", "wheel_dy")})
        syn.draw_input(view, state)                            # over the previous state
        assert syn.decode_input(to_rgb(view)) == state


def test_input_bands_are_counter_bands_below_the_counter():
    # Same cell encoding as the counter, one band every CELL rows from y = 24: decode_counter reads
    # each one with its origin moved down, and the words are the documented ones.
    state = syn.InputState(key=30, key_down=True, keys=3, buttons=5, x=1234, y=567, dx=-2, dy=9,
                           wheel_dx=1, wheel_dy=-1)
    rgb = to_rgb(input_frame("office", 0, state))
    words = [syn.decode_counter(rgb, (0, syn.CELL * (i + 1))) for i in range(syn.INPUT_BANDS)]
    assert words == [30 << 16 | 1 << 15 | 5 << 12 | 3, 1234 << 16 | 567, 0xFFFE << 16 | 9, 1 << 16 | 0xFFFF]
    assert syn.input_rect() == (8, 24, 544, 64)
    assert syn.INPUT_BAND_Y == syn.BAND_Y + syn.CELL == 24


def test_decode_input_is_none_without_the_bands():
    assert syn.decode_input(to_rgb(frame("office", 123))) is None             # no input yet
    rng = np.random.default_rng(3)
    assert syn.decode_input(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) is None
    rgb = to_rgb(input_frame("office", 1, INPUT_STATES[1]))
    for origin in [(8, 0), (0, 8), (0, 16), (W, H)]:
        assert syn.decode_input(rgb, origin) is None, origin
    assert syn.decode_input(rgb[:80]) is None                                 # cut through band 3


def test_decode_input_on_a_screen_with_the_buffer_centred():
    state = INPUT_STATES[2]
    shot = np.zeros((1080, 1920, 4), np.uint8)
    ox, oy = (1920 - W) // 2, (1080 - H) // 2
    shot[oy:oy + H, ox:ox + W, :3] = to_rgb(input_frame("build-1", 9, state))
    assert syn.decode_input(shot, (ox, oy)) == state
    assert syn.decode_input(shot, (ox + 3, oy - 2)) == state                  # a small offset
    assert syn.decode_input(shot) is None


def test_apply_input_records_what_the_guest_received():
    state = None
    for event in [Key(30, True), Key(30, False), Key(42, True), Button(syn.BTN_LEFT, True),
                  Button(syn.BTN_MIDDLE, True), Button(0x113, True), Button(syn.BTN_LEFT, False),
                  Pointer(100, 200), Pointer(300, 400), Motion(5, -5), Motion(-7, 2), Wheel(1, 1),
                  Wheel(0, 2)]:
        state = syn.apply_input(state, event)
    assert state == syn.InputState(key=42, key_down=True, keys=3, buttons=4, x=300, y=400, dx=-2, dy=-3,
                                   wheel_dx=1, wheel_dy=3)
    assert syn.apply_input(None, Touch("down", 0, 1, 1)) == syn.InputState()   # starts the bands
    wrapped = syn.apply_input(syn.InputState(dx=32767, keys=4095), Motion(1, -40000))
    wrapped = syn.apply_input(wrapped, Key(1, False))
    assert (wrapped.dx, wrapped.dy, wrapped.keys) == (-32768, 25536, 0)         # what the bands can carry
    assert syn.decode_input(to_rgb(input_frame("office", 0, wrapped))) == wrapped


def test_the_bar_never_hides_the_input_bands():
    chain = syn.Swapchain(FakeCard(), W, H, 2, name="office")
    state = INPUT_STATES[1]
    for n in range(0, (W - 16) // 8, 3):                     # the bar sweeps across the bands
        slot = chain.acquire()
        chain.render(slot, n, state)
        chain.mark_busy(slot.id)
        chain.release(slot.id)
        rgb = slot_rgb(slot)
        assert syn.decode_input(rgb) == state, n
        assert syn.decode_counter(rgb) == n
        x, y, w, h = syn.bar_rect(W, H, n)
        below = 24 + 16 * syn.INPUT_BANDS
        assert (rgb[below:, x:x + w] == syn.ink_colour(syn.guest_colour("office"))).all(), n


def test_a_frame_with_input_touches_only_the_bands_and_the_bar_rects():
    view, bg, ink = prepared("office")
    painted = None
    for m, n in [(0, 3), (3, 4), (10, 11), (60, 0)]:
        syn.draw_counter(view, m)
        painted = syn.draw_bar(view, m, bg, ink, painted)
        syn.draw_input(view, INPUT_STATES[1])
        before = view.copy()
        syn.draw_counter(view, n)
        painted = syn.draw_bar(view, n, bg, ink, painted)
        syn.draw_input(view, INPUT_STATES[2])
        ys, xs = np.nonzero(np.any(view != before, axis=-1))
        rects = [syn.band_rect(), syn.input_rect(), syn.bar_rect(W, H, m), syn.bar_rect(W, H, n)]
        assert inside(rects, ys, xs).all(), (m, n)


def test_a_frame_rendered_without_input_is_the_frame_of_before():
    # Lab tests compare whole frames: with no input, a swapchain frame is exactly background, counter
    # and bar, whatever the buffer showed before.
    chain = syn.Swapchain(FakeCard(), W, H, 3, name="office")
    for n in range(40):
        slot = chain.acquire()
        chain.render(slot, n) if n % 2 else chain.render(slot, n, None)
        chain.mark_busy(slot.id)
        chain.release(slot.id)
        np.testing.assert_array_equal(syn.xrgb_view(slot.map, W, H, slot.pitch), frame("office", n))


# ------------------------------------------------------------------------------------------- stride

def test_stride_wider_than_the_row():
    width, height, pitch = 600, 200, 4 * 640
    raw = bytearray(b"\xAB" * pitch * height)
    view = syn.xrgb_view(raw, width, height, pitch)
    syn.draw_background(view, "office")
    bg = view.copy()
    syn.draw_counter(view, 70)
    syn.draw_bar(view, 70, bg, syn.ink_colour(syn.guest_colour("office")))
    rows = np.frombuffer(raw, np.uint8).reshape(height, pitch)
    assert (rows[:, width * 4:] == 0xAB).all()                       # padding untouched
    assert syn.decode_counter(to_rgb(view)) == 70
    np.testing.assert_array_equal(view, frame("office", 70, width, height))
    x = syn.bar_x(width, 70)
    assert (view[syn.BAR_TOP:, x:x + 16, :3] == syn.ink_colour(syn.guest_colour("office"))[::-1]).all()


def test_xrgb_view_rejects_a_short_pitch():
    with pytest.raises(ValueError):
        syn.xrgb_view(bytearray(100 * 100 * 4), 100, 100, 396)


def test_too_small_a_buffer_is_refused():
    with pytest.raises(ValueError, match="at least"):
        syn.draw_background(buffer(320, 240), "office")


# ------------------------------------------------------------------------------------------ colours

def test_guest_colours_are_distinct_and_stable():
    names = ["office", "media", "build-1"]
    colours = [np.array(syn.guest_colour(n), float) for n in names]
    for a, b in itertools.combinations(colours, 2):
        assert np.linalg.norm(a - b) > 100
    assert syn.guest_colour("office") == syn.guest_colour("office")
    for c in colours:
        assert max(c) - min(c) > 100           # saturated
        assert all(0 <= v <= 255 for v in c)


def test_background_is_the_guest_colour_and_the_name_contrasts():
    view = buffer()
    syn.draw_background(view, "office")
    rgb = to_rgb(view)
    colour = syn.guest_colour("office")
    assert tuple(rgb[0, 0]) == colour
    assert tuple(rgb[syn.BAR_TOP - 1, W - 1]) == colour
    ink = np.array(syn.ink_colour(colour))
    assert (np.all(rgb == ink, axis=-1)[syn.BAR_TOP:]).sum() > 50    # solid text pixels below the band
    assert not np.all(rgb == ink, axis=-1)[:syn.BAR_TOP].any()      # none above it


def test_paint_rect():
    view = frame("office", 5)
    before = view.copy()
    syn.paint_rect(view, (255, 0, 255))
    x, y, w, h = syn.PAINT_RECT
    assert (to_rgb(view)[y:y + h, x:x + w] == (255, 0, 255)).all()
    ys, xs = np.nonzero(np.any(view != before, axis=-1))
    assert inside([syn.PAINT_RECT], ys, xs).all()


# ---------------------------------------------------------------------------------------------- CLI

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="directflip")
    tools_cli.register(p.add_subparsers(dest="command"))
    return p


def test_socket_paths_per_seat():
    assert syn.socket_paths(None)[0] == syn.DEFAULT_FRAME_SOCKET
    assert syn.socket_paths("seat1") == ("/run/directflip/seat1/frames.sock",
                                         "/run/directflip/seat1/control.sock")
    for bad in ("../x", "seat", "seat1/..", "kiosk", "seat 1", ""):
        with pytest.raises(ValueError, match="not a seat name"):
            syn.socket_paths(bad)


def test_cli_defaults_and_options():
    args = parser().parse_args(["guest", "--name", "office"])
    assert (args.socket, args.seat, args.on, args.size, args.rate, args.buffers) == \
        (None, None, "display", (1024, 768), 60.0, 3)  # None: socket_paths(seat) decides
    assert args.func is tools_cli._guest
    args = parser().parse_args(["guest", "--name", "m", "--on", "vgem", "--size", "800x600", "--rate", "0",
                                "--frames", "60", "--then-paint", "#FF00ff", "--hold", "5"])
    assert (args.size, args.rate, args.frames, args.then_paint, args.hold) == \
        ((800, 600), 0.0, 60, (255, 0, 255), 5.0)
    assert args.pointer == "absolute"
    assert parser().parse_args(["guest", "--name", "m", "--pointer", "relative"]).pointer == "relative"


@pytest.mark.parametrize("argv", [
    ["--size", "100x100"], ["--size", "big"], ["--rate", "-1"], ["--buffers", "1"], ["--buffers", "9"],
    ["--then-paint", "red"], ["--frames", "0"], ["--hold", "x"], ["--name", "my guest"],
    ["--pointer", "tablet"],
])
def test_cli_rejects_bad_values(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(["guest", "--name", "g", *argv])
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cli_pointer_modes_are_the_frame_socket_s():
    assert tools_cli.POINTER_MODES == syn.POINTER_MODES


def test_then_paint_needs_an_end(capsys):
    args = parser().parse_args(["guest", "--name", "g", "--then-paint", "ff00ff"])
    assert syn.run_cli(args) == 2
    assert "--then-paint needs --frames or --duration" in capsys.readouterr().err


def test_summary_line():
    stats = syn.GuestStats(frames_flipped=120, presented=118, stalled=1, last_frame=119, elapsed=2.0)
    assert stats.summary("office") == ("guest office: flipped 120 frames in 2.00 s (60.0/s), presented 118, "
                                       "last frame 119, stalled 1")


# ------------------------------------------------------------------- the guest loop, with fakes
# A fake card (bytearray "mappings", memfd "dma-bufs") and a fake frame-socket client standing in for
# a latest-frame-wins compositor: it presents every flip at once and releases the frame it supersedes.

class FakeDumb:
    def __init__(self, handle: int, width: int, height: int) -> None:
        self.handle, self.pitch = handle, width * 4 + 64      # a stride wider than the row
        self.size = self.pitch * height
        self._map = bytearray(self.size)
        self.destroyed = False

    def map(self) -> bytearray:
        return self._map

    def destroy(self) -> None:
        self.destroyed = True


class FakeCard:
    driver = "fake"

    def __init__(self) -> None:
        self.buffers: list[FakeDumb] = []

    def create_dumb(self, width: int, height: int, bpp: int = 32) -> FakeDumb:
        self.buffers.append(FakeDumb(len(self.buffers) + 1, width, height))
        return self.buffers[-1]

    def export_dmabuf(self, handle: int) -> int:
        return os.memfd_create(f"fake-dmabuf-{handle}")


@dataclasses.dataclass
class Released:
    id: int


@dataclasses.dataclass
class Presented:
    id: int
    frame: int
    timestamp_ns: int = 0
    sequence: int = 0


class ServerError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FakeClient:
    def __init__(self, releases: bool = True, fail_after: int | None = None) -> None:
        self.releases, self.fail_after = releases, fail_after
        self.events: list = []
        self.flips: list[tuple[int, int]] = []
        self.held: set[int] = set()
        self.on_screen: int | None = None
        self.closed = False

    def flip(self, buffer_id: int, frame: int = 0) -> None:
        assert buffer_id not in self.held, f"buffer {buffer_id} drawn into while the compositor held it"
        self.flips.append((buffer_id, frame))
        self.held.add(buffer_id)
        if self.on_screen is not None and self.releases:
            self.held.discard(self.on_screen)
            self.events.append(Released(self.on_screen))
        self.on_screen = buffer_id
        self.events.append(Presented(buffer_id, frame))

    def poll(self, timeout: float | None = 0) -> list:
        if self.fail_after is not None and len(self.flips) >= self.fail_after:
            raise ServerError("output unplugged")
        events, self.events = self.events, []
        if not events and timeout:
            time.sleep(timeout)
        return events

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_socket_module(monkeypatch):
    module = types.ModuleType("compositor.sources.framesocket")
    module.Released, module.Presented, module.ServerError = Released, Presented, ServerError
    module.CLOSED = "the compositor closed the connection"
    monkeypatch.setitem(sys.modules, "compositor.sources.framesocket", module)


def fake_guest(client: FakeClient, rate: float = 0, buffers: int = 3):
    guest = syn.SyntheticGuest("office", "/nonexistent", "/dev/null", W, H, rate, buffers=buffers)
    card = FakeCard()
    guest.swapchain = syn.Swapchain(card, W, H, buffers, name="office")
    guest.client = client
    return guest, card


def slot_rgb(slot) -> np.ndarray:
    return to_rgb(syn.xrgb_view(slot.map, W, H, slot.pitch))


def test_swapchain_with_a_fake_card():
    card = FakeCard()
    chain = syn.Swapchain(card, W, H, 3, name="media")
    assert sorted(chain.slots) == [1, 2, 3]
    slot = chain.acquire()
    assert tuple(slot_rgb(slot)[0, 0]) == syn.guest_colour("media")
    chain.render(slot, 9)
    chain.mark_busy(slot.id)
    assert syn.decode_counter(slot_rgb(slot)) == 9
    others = {chain.acquire().id}
    assert slot.id not in others
    chain.release(slot.id)
    chain.release(slot.id)                  # a second release is ignored
    chain.close()
    assert all(b.destroyed for b in card.buffers)


def test_guest_flips_frames_in_order_and_never_draws_into_held_buffers(fake_socket_module):
    client = FakeClient()
    guest, card = fake_guest(client)
    stats = guest.run(frames=20)
    assert [f for _, f in client.flips] == list(range(20))
    assert (stats.frames_flipped, stats.presented, stats.released, stats.stalled) == (20, 20, 19, 0)
    assert (stats.last_frame, stats.last_presented_frame, stats.server_error) == (19, 19, None)
    assert client.closed and all(b.destroyed for b in card.buffers)


def test_guest_draws_the_input_it_received_from_then_on(fake_socket_module):
    client = FakeClient()
    guest, _ = fake_guest(client)
    slots = dict(guest.swapchain.slots)
    client.events += [Key(30, True), Button(syn.BTN_RIGHT, True), Pointer(5, 6), Motion(3, -4),
                      Motion(1, 1), Wheel(0, -2)]
    stats = guest.run(frames=4)
    expected = syn.InputState(key=30, key_down=True, keys=1, buttons=2, x=5, y=6, dx=4, dy=-3, wheel_dy=-2)
    assert guest.input == expected and stats.input_events == 6
    assert stats.summary("office").endswith(", input 6 events")
    for buffer_id, n in client.flips[-3:]:                    # each buffer shows its last frame
        rgb = slot_rgb(slots[buffer_id])
        assert (syn.decode_counter(rgb), syn.decode_input(rgb)) == (n, expected)


def test_guest_without_input_flips_the_frames_of_before(fake_socket_module):
    client = FakeClient()
    guest, _ = fake_guest(client)
    slots = dict(guest.swapchain.slots)
    stats = guest.run(frames=5)
    assert guest.input is None and stats.input_events == 0
    for buffer_id, n in client.flips[-3:]:
        np.testing.assert_array_equal(syn.xrgb_view(slots[buffer_id].map, W, H, slots[buffer_id].pitch),
                                      frame("office", n))


def test_guest_pointer_mode_is_checked():
    assert syn.SyntheticGuest("g", "/x", "/dev/null", W, H, 60).pointer == "absolute"
    assert syn.SyntheticGuest("g", "/x", "/dev/null", W, H, 60, pointer="relative").pointer == "relative"
    with pytest.raises(ValueError, match="pointer mode 'tablet'"):
        syn.SyntheticGuest("g", "/x", "/dev/null", W, H, 60, pointer="tablet")


def test_guest_stalls_when_the_compositor_keeps_every_buffer(fake_socket_module):
    client = FakeClient(releases=False)
    guest, _ = fake_guest(client, rate=100)
    stats = guest.run(duration=0.2)
    assert stats.frames_flipped == 3
    assert stats.stalled >= 5
    assert 0.2 <= stats.elapsed < 0.4


def test_guest_paces_by_absolute_deadlines(fake_socket_module):
    guest, _ = fake_guest(FakeClient(), rate=50)
    stats = guest.run(duration=0.4)
    assert 15 <= stats.frames_flipped <= 21
    guest, _ = fake_guest(FakeClient(), rate=100)
    stats = guest.run(frames=10)
    assert 0.09 <= stats.elapsed < 0.5


def test_guest_ends_when_the_server_closes(fake_socket_module):
    client = FakeClient(fail_after=5)
    guest, _ = fake_guest(client)
    stats = guest.run(frames=100)
    assert stats.server_error == "output unplugged"
    assert stats.frames_flipped == 5
    assert client.closed


def test_guest_paints_into_the_buffer_on_screen(fake_socket_module, capsys):
    client = FakeClient()
    guest, _ = fake_guest(client)
    slots = dict(guest.swapchain.slots)
    stats = guest.run(frames=7, then_paint=(255, 0, 255), hold=0.05)
    last_id = client.flips[-1][0]
    assert len(client.flips) == 7                                   # painting did not flip
    assert stats.painted_buffer == last_id
    assert capsys.readouterr().out == f"painted ff00ff into buffer {last_id} without flipping\n"
    x, y, w, h = syn.PAINT_RECT
    rgb = slot_rgb(slots[last_id])
    assert (rgb[y:y + h, x:x + w] == (255, 0, 255)).all()
    assert syn.decode_counter(rgb) == 6
    for other in set(slots) - {last_id}:
        assert not (slot_rgb(slots[other])[y:y + h, x:x + w] == (255, 0, 255)).all()


def test_guest_stops_on_request(fake_socket_module):
    # Asked to stop (as a signal handler does) after its tenth flip, the guest flips no more: a
    # count, not a time, so a busy machine cannot change it.
    client = FakeClient()
    guest, _ = fake_guest(client, rate=100)
    flip = client.flip

    def flip_then_ask(buffer_id: int, frame: int = 0) -> None:
        flip(buffer_id, frame)
        if len(client.flips) == 10:
            guest.stop()

    client.flip = flip_then_ask
    stats = guest.run(duration=600)
    assert guest.stopped and stats.frames_flipped == 10 and len(client.flips) == 10


def test_guest_stops_cleanly_on_sigterm(fake_socket_module):
    client = FakeClient()
    guest, _ = fake_guest(client, rate=100)
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    stats = guest.run(duration=60)
    timer.join()
    # well before its 60 s: stopped by the signal, however late a busy machine delivered it
    assert guest.stopped and stats.elapsed < 30 and client.closed
    assert signal.getsignal(signal.SIGTERM) is before


def test_guest_reconnects_and_announces_again_when_the_compositor_comes_back(fake_socket_module,
                                                                            monkeypatch):
    """--reconnect: the compositor dies after 3 flips (holding every buffer); the first connection
    attempt finds nothing listening, the second is closed unanswered; the third gets a new
    compositor, to which every buffer is announced again (all of them free: the dead compositor's
    holds are void) and the remaining frames are flipped."""
    attempts: list[str] = []
    clients: list[FakeClient] = []

    class Reconnecting(FakeClient):
        def __init__(self, path: str, name: str, uuid=None, pointer: str = "absolute") -> None:
            attempts.append(path)
            if len(attempts) == 1:
                raise ConnectionRefusedError(111, "nothing listens")
            if len(attempts) == 2:    # a dying compositor's backlog: accepted, then closed unanswered
                raise ServerError("the compositor closed the connection")
            super().__init__()
            self.announced: list[int] = []
            clients.append(self)

        def announce(self, buffer_id, fd, *args) -> None:
            self.announced.append(buffer_id)

    monkeypatch.setattr(sys.modules["compositor.sources.framesocket"], "FrameSocketClient", Reconnecting,
                        raising=False)
    monkeypatch.setattr(syn, "RECONNECT_INTERVAL", 0.01)
    first = FakeClient(releases=False, fail_after=3)
    guest, _ = fake_guest(first)
    guest.reconnect = True
    stats = guest.run(frames=12)
    assert first.closed and len(attempts) == 3
    assert stats.reconnects == 1 and stats.server_error is None
    assert sorted(clients[0].announced) == [1, 2, 3]
    assert [f for _, f in first.flips] == [0, 1, 2]          # three buffers, none ever released
    assert [f for _, f in clients[0].flips] == list(range(3, 12))
    assert "reconnected 1 times" in stats.summary("office")


def test_without_reconnect_a_lost_compositor_ends_the_guest(fake_socket_module):
    guest, _ = fake_guest(FakeClient(fail_after=2))
    stats = guest.run(frames=10)
    assert stats.server_error == "output unplugged" and stats.reconnects == 0


def test_a_reason_from_the_new_compositor_ends_the_reconnecting_guest(fake_socket_module, monkeypatch):
    class Refusing(FakeClient):
        def __init__(self, *args, **kwargs) -> None:
            raise ServerError("uid 0 may not connect as guest office")

    monkeypatch.setattr(sys.modules["compositor.sources.framesocket"], "FrameSocketClient", Refusing,
                        raising=False)
    guest, _ = fake_guest(FakeClient(fail_after=2))
    guest.reconnect = True
    stats = guest.run(frames=10)
    assert stats.server_error == "uid 0 may not connect as guest office" and stats.reconnects == 0
