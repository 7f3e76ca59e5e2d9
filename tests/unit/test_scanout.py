"""The scanout pipeline's bookkeeping (compositor/scanout/) on a fake card: latest frame wins, one
commit in flight, every frame handed back exactly once, the zero copy → copy → slate ladder.

The card is the strict fake of tests/fakes/card.py: it refuses what the kernel would refuse and records
what would show on screen (a framebuffer removed while scanned out, a second commit in flight). Guest
buffers are real memfds, so the copy rung really maps and copies their bytes; the copy's destination
is a fake dumb buffer on an anonymous mmap that the tests read back. The native flip (`lib.kms_flip`,
a cffi function that cannot be patched itself) is replaced by swapping compositor.output's `lib` for
the fake card's FakeNativeLib, which goes through the same fake atomic commit; every pipeline test
runs with both flip paths.

Each test's comment says what it expects and why.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import pytest
from fakes.card import (
    CONNECTOR,
    CRTC,
    CURSOR,
    OVERLAY,
    PLANE,
    FakeCard,
    FakeFramebuffer,
    FakeRequest,
    PlaneState,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compositor import topology
from compositor.formats import XRGB8888
from compositor.kms import FlipEvent, Rejected
from compositor.output import OutputLayer
from compositor.planner import OutputAssignment, Rect, Slate
from compositor.scanout import FramebufferCache, Metrics, ScanoutPipeline
from compositor.scanout import copy as scanout_copy
from compositor.sources.frame import Buffer, Cursor, Frame, PlaneInfo, Pointer

W, H = 40, 30  # the mode: small, so a slate renders and a copy runs in microseconds
FULL = Rect(0, 0, W, H)


# Every test here commits on the fake card (tests/unit/conftest.py).
pytestmark = pytest.mark.usefixtures("fake_native_flip")


# ----------------------------------------------------------------------------- guests and outputs

MODE = topology.Mode("40x30", W, H, 60.0, 1000)


def assignment(**changes) -> OutputAssignment:
    base = dict(card="/dev/dri/card0", connector="Virtual-1", connector_id=CONNECTOR, monitor="left",
                crtc_id=CRTC, plane_id=PLANE, mode=MODE, guest="office", slate=None, src=FULL, dst=FULL,
                scaling="none")
    base.update(changes)
    return OutputAssignment(**base)


def pixel_row(x0: int, w: int, y: int, tag: int) -> bytes:
    """Guest pixel (x, y) of buffer `tag` is the bytes x, y, tag, 0x80: where it lands says where it
    came from."""
    return bytes(v for x in range(x0, x0 + w) for v in (x, y, tag, 0x80))


def guest_buffer(tag: int, w: int = W, h: int = H, *, stride: int | None = None, offset: int = 0) -> Buffer:
    """A memfd laid out like a guest's dma-buf; padding (offset, stride tail) is 0xEE so a copy that
    reads it shows."""
    stride = stride or w * 4
    data = bytearray(b"\xee" * (offset + stride * h))
    for y in range(h):
        data[offset + y * stride:offset + y * stride + w * 4] = pixel_row(0, w, y, tag)
    fd = os.memfd_create(f"guest-buffer-{tag}", os.MFD_CLOEXEC)
    os.ftruncate(fd, len(data))
    os.pwrite(fd, bytes(data), 0)
    return Buffer("office", tag, PlaneInfo(XRGB8888, w, h, stride, offset), fd)


def composed(pitch: int, tag: int, src: Rect, dst: Rect) -> bytes:
    """What the copy rung must produce: a W×H buffer, src of the guest's buffer at dst, black elsewhere."""
    out = bytearray(pitch * H)
    for y in range(src.h):
        d = (dst.y + y) * pitch + dst.x * 4
        out[d:d + 4 * src.w] = pixel_row(src.x, src.w, src.y + y, tag)
    return bytes(out)


class Rig:
    """A pipeline on a fake card, recording what it hands back."""

    def __init__(self, out: OutputAssignment | None = None, *, native: bool = True, pitch_align: int = 64,
                 copier=None):
        self.card = FakeCard(pitch_align=pitch_align)
        self.layer = OutputLayer(self.card, native=native)
        self.cache = self.layer.fbcache
        self.released: list[Frame] = []
        self.released_while_busy: list[Frame] = []
        self.presented: list[tuple[Frame, FlipEvent]] = []
        self.pipe = ScanoutPipeline(self.layer, out or assignment(), release=self._release,
                                    present=lambda frame, event: self.presented.append((frame, event)),
                                    copier=copier)

    def _release(self, frame: Frame) -> None:
        # Only meaningful when every frame has its own buffer: is the card still reading it?
        entry = self.cache.entries.get(frame.buffer.key)
        if entry is not None and entry[0] in self.card.busy_framebuffers():
            self.released_while_busy.append(frame)
        self.released.append(frame)

    def count(self, frame: Frame) -> int:
        return sum(1 for f in self.released if f is frame)

    def flip(self) -> FlipEvent:
        event = self.card.complete(CRTC)
        self.pipe.on_flip(event)
        return event

    def read_events(self) -> list[FlipEvent]:
        """Hand the pipeline the flip events of blocking commits, as the loop reading the fd would."""
        events, self.card.events = self.card.events, []
        for event in events:
            self.pipe.on_flip(event)
        return events

    def held(self) -> list[Frame]:
        p = self.pipe
        return [c.frame for c in (p.on_screen, p.in_flight) if c is not None and c.frame is not None] + (
            [p.pending] if p.pending is not None else [])

    def snapshot(self) -> tuple:
        p = self.pipe
        return p.pending, p.in_flight, p.on_screen, len(self.released), len(self.presented)

    def is_copy_fb(self, fb: FakeFramebuffer) -> bool:
        return self.pipe.copy is not None and any(fb is slot_fb for _, slot_fb in self.pipe.copy.slots)


@pytest.fixture(params=[True, False], ids=["native-flip", "atomic-flip"])
def new_rig(request):
    def make(out: OutputAssignment | None = None, **kw) -> Rig:
        return Rig(out, native=request.param, **kw)
    return make


@pytest.fixture
def bufs():
    made: list[Buffer] = []

    def make(tag: int, w: int = W, h: int = H, **kw) -> Buffer:
        made.append(guest_buffer(tag, w, h, **kw))
        return made[-1]
    yield make
    for b in made:
        b.close()


def refuse_prime(state: PlaneState) -> str | None:
    return "the imported buffer cannot be scanned out" if state.fb.origin == "prime" else None


# ------------------------------------------------------------------------- 1. latest frame wins


def test_latest_frame_wins_with_one_commit_in_flight(new_rig, bufs):
    # F0 lights the output (blocking). F1 is committed at once (nothing in flight). F2..F6 arrive while
    # F1 is in flight: each replaces the pending one, so F2..F5 are dropped (N-2 = 4 of the N = 6
    # submitted) and handed back at once, never imported nor committed; only F6 waits. The fake card
    # asserts that no second nonblocking commit reaches the CRTC before F1's event.
    r = new_rig()
    frames = [Frame(bufs(i), seq=i) for i in range(7)]
    r.pipe.start(frames[0])
    r.pipe.submit(frames[1])
    first_token = r.pipe.in_flight.token
    for f in frames[2:]:
        r.pipe.submit(f)
        assert r.pipe.pending is f and r.pipe.in_flight.frame is frames[1]
    assert [r.count(f) for f in frames] == [0, 0, 1, 1, 1, 1, 0]
    assert len(r.card.nonblocking_commits()) == 1
    assert r.cache.imports == 2  # F0 and F1: a dropped frame costs nothing
    m = r.pipe.metrics
    assert (m.frames, m.dropped, m.commits, m.max_in_flight, m.max_pending) == (7, 4, 1, 1, 1)

    # F1's event: F1 is on screen, F0 (no longer scanned out) goes back, and F6 is committed.
    r.flip()
    assert r.pipe.on_screen.frame is frames[1] and r.count(frames[0]) == 1
    assert r.pipe.in_flight.frame is frames[6] and r.pipe.pending is None
    last = r.card.nonblocking_commits()[-1]
    assert last.planes[PLANE].fb is r.cache.entries[frames[6].buffer.key][0]
    assert last.user_data == r.pipe.in_flight.token != first_token
    assert last.native == r.pipe.native  # the hot path took the flip path asked for

    # F6's event: F6 on screen, F1 goes back; nothing left in flight.
    r.flip()
    assert r.pipe.on_screen.frame is frames[6] and r.pipe.in_flight is None
    assert [r.count(f) for f in frames] == [1, 1, 1, 1, 1, 1, 0]
    assert r.released_while_busy == []
    status = r.pipe.status()
    assert (status["path"], status["frames"], status["presented"], status["dropped"], status["commits"],
            status["max_in_flight"], status["max_pending"]) == ("zero-copy", 7, 2, 4, 2, 1, 1)
    assert status["on_screen"] == {"buffer": 6, "frame": 6}


def test_paused_pipeline_keeps_the_newest_frame_until_resumed(new_rig, bufs):
    # While the daemon reconfigures (paused), frames wait as pending, newest wins; resume() commits it.
    r = new_rig()
    f0, f1, f2 = (Frame(bufs(i)) for i in range(3))
    r.pipe.start(f0)
    r.pipe.paused = True
    r.pipe.submit(f1)
    r.pipe.submit(f2)
    assert r.card.nonblocking_commits() == [] and r.pipe.pending is f2 and r.count(f1) == 1
    r.pipe.paused = False
    r.pipe.resume()
    assert r.pipe.in_flight.frame is f2 and r.pipe.pending is None


def test_a_refused_flip_hands_the_frame_back_and_counts_busy(new_rig, bufs):
    # EBUSY from the flip: the frame cannot be shown, so it goes back to the guest at once; the error
    # is counted; the next frame flips normally.
    r = new_rig()
    f0, f1, f2 = (Frame(bufs(i)) for i in range(3))
    r.pipe.start(f0)
    r.card.fail_next_flip = errno.EBUSY
    r.pipe.submit(f1)
    assert r.count(f1) == 1 and r.pipe.in_flight is None and r.pipe.on_screen.frame is f0
    assert (r.pipe.metrics.errors, r.pipe.metrics.busy, r.pipe.metrics.commits) == (1, 1, 0)
    r.pipe.submit(f2)
    assert r.pipe.in_flight.frame is f2


# ---------------------------------------------------------------------- 2. release accounting

LADDERS = ["zero-copy", "import-refused", "test-refuses-zero-copy", "all-refused"]
OPS = st.one_of(st.tuples(st.just("submit"), st.integers(0, 3)),
                st.sampled_from([("flip",), ("flip",), ("stale",), ("pause",), ("resume",), ("busy",),
                                 ("read",)]))


def check_invariants(r: Rig) -> None:
    p = r.pipe
    held = r.held()
    released = Counter(id(f) for f in r.released)
    assert all(n == 1 for n in released.values()), "a frame was released twice"
    assert not any(id(f) in released for f in held), "a frame was released while still held"
    assert len({id(f) for f in held}) == len(held), "one frame in two slots"
    assert all(n == 1 for n in Counter(id(f) for f, _ in r.presented).values()), "presented twice"
    assert p.metrics.max_in_flight <= 1 and p.metrics.max_pending <= 1
    # The pipeline's slots say what the card does.
    if p.in_flight is not None:
        assert r.card.in_flight[CRTC][0] == p.in_flight.token
        assert r.card.state[PLANE].fb is p.in_flight.fb
    else:
        assert CRTC not in r.card.in_flight
    if p.on_screen is not None:
        assert r.card.scanout[PLANE].fb is p.on_screen.fb
    # A frame that can be shown never waits while the CRTC is idle.
    if p.pending is not None and p.in_flight is None and not p.paused:
        assert p._fits(p.pending) is not None


def refuse_for(r: Rig, ladder: str) -> None:
    """Set the card's knobs so the pipeline lands on the rung `ladder` names."""
    if ladder == "import-refused":
        r.card.refuse_import = lambda fd: True
    elif ladder == "test-refuses-zero-copy":
        r.card.refuse_config = refuse_prime
    elif ladder == "all-refused":
        r.card.refuse_config = lambda s: refuse_prime(s) or ("no copy" if r.is_copy_fb(s.fb) else None)


def apply_op(r: Rig, op: tuple, pool: list[Buffer], handed: list[Frame], done_tokens: list[int]) -> None:
    """One step of the interleaving: a frame, an event (current or stale), a pause, a refused flip."""
    if op[0] == "submit":
        handed.append(Frame(pool[op[1]], seq=len(handed)))
        r.pipe.submit(handed[-1])
    elif op[0] == "flip" and CRTC in r.card.in_flight:
        event = r.card.complete(CRTC)
        done_tokens.append(event.user_data)
        r.pipe.on_flip(event)
    elif op[0] == "stale":
        before = r.snapshot()
        r.pipe.on_flip(FlipEvent(CRTC, 0, time.monotonic_ns(), done_tokens[-1]))
        assert r.snapshot() == before
    elif op[0] == "read":   # the lighting commit's event, once the loop reads it
        r.read_events()
    elif op[0] == "pause":
        r.pipe.paused = True
    elif op[0] == "resume":
        r.pipe.paused = False
        r.pipe.resume()
    elif op[0] == "busy":
        r.card.fail_next_flip = errno.EBUSY


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ladder=st.sampled_from(LADDERS), native=st.booleans(), ops=st.lists(OPS, max_size=50))
def test_every_frame_is_released_exactly_once(ladder, native, ops):
    # Any interleaving of frames (three buffers that fit the plan and one that does not), flip events,
    # stale events, pauses and refused flips, on every rung of the ladder: a frame handed over is
    # released exactly once, or is still pending / in flight / on screen; never twice, never while
    # held; stop() hands back the rest.
    pool = [guest_buffer(i) for i in range(3)] + [guest_buffer(3, 24, 16)]
    try:
        r = Rig(native=native)
        refuse_for(r, ladder)
        handed = [Frame(pool[0], seq=0)]
        r.pipe.start(handed[0])
        check_invariants(r)
        done_tokens = [0]
        for op in ops:
            apply_op(r, op, pool, handed, done_tokens)
            check_invariants(r)
        held = r.held()
        for f in handed:
            assert r.count(f) == (0 if any(f is h for h in held) else 1)
        assert r.pipe.metrics.presented == len(r.presented)
        r.pipe.stop()
        assert [r.count(f) for f in handed] == [1] * len(handed)
    finally:
        for b in pool:
            b.close()


# --------------------------------------------------------------------------- 3. present callback


def test_present_once_per_presented_frame_and_stale_events_ignored(new_rig, bufs):
    r = new_rig()
    f0, f1, f2 = (Frame(bufs(i), received_ns=time.monotonic_ns()) for i in range(3))
    r.pipe.start(f0)
    # The blocking commit that lit the output asked for a flip event too: f0 is presented once the
    # event is read, not before.
    assert r.presented == []
    (lit,) = r.read_events()
    assert r.presented == [(f0, lit)]
    r.pipe.submit(f1)
    token = r.pipe.in_flight.token
    # Events that are not the in-flight commit's (the lighting commit's, read already; 0; a later
    # token) change nothing.
    for stale in (lit.user_data, 0, token + 1):
        r.pipe.on_flip(FlipEvent(CRTC, 9, time.monotonic_ns(), stale))
        assert r.presented == [(f0, lit)] and r.pipe.in_flight.frame is f1 and r.pipe.on_screen.frame is f0
        assert r.released == []
    event = r.flip()
    assert len(r.presented) == 2 and r.presented[1][0] is f1 and r.presented[1][1] is event
    m = r.pipe.metrics
    assert m.presented == 2 and list(m.present_times) == [lit.timestamp_ns, event.timestamp_ns]
    assert list(m.latencies_ns) == [lit.timestamp_ns - f0.received_ns, event.timestamp_ns - f1.received_ns]
    # The same event delivered twice: the second is stale.
    r.pipe.on_flip(event)
    assert len(r.presented) == 2 and r.count(f0) == 1 and r.count(f1) == 0
    r.pipe.submit(f2)
    event2 = r.flip()
    assert [(f, e) for f, e in r.presented] == [(f0, lit), (f1, event), (f2, event2)]


def test_a_frame_shown_by_a_configuration_commit_is_presented_once(new_rig, bufs):
    # A guest's first frame, and its first frame of a new size, reach the screen through the blocking
    # commit of a (re)configuration, not through a flip. That commit asks for a flip event as a flip
    # does, and the frame is presented exactly once, when the event is read, with the event's
    # timestamp and sequence. `released` is unchanged: a frame goes back once, when another replaced it.
    r = new_rig()
    f0 = Frame(bufs(0), seq=10)
    r.pipe.start(f0)
    lighting = r.card.log[-1]
    assert (lighting.test_only, lighting.nonblock, lighting.event, lighting.allow_modeset) == \
        (False, False, True, True)
    (event0,) = r.read_events()
    assert event0.user_data == lighting.user_data
    assert r.presented == [(f0, event0)] and r.released == []

    # A new size: the daemon re-plans and reconfigures the output with the guest's new frame.
    f1 = Frame(bufs(1, 24, 16), seq=11)
    r.pipe.reconfigure(assignment(src=Rect(0, 0, 24, 16), dst=Rect(8, 7, 24, 16)), f1)
    config = r.card.log[-1]
    assert (config.test_only, config.nonblock, config.event, config.allow_modeset) == \
        (False, False, True, False)
    assert r.count(f0) == 1 and len(r.released) == 1   # off screen: back to the guest
    assert r.presented == [(f0, event0)]               # f1: not before its event is read
    (event1,) = r.read_events()
    assert r.presented == [(f0, event0), (f1, event1)]
    assert r.pipe.status()["presented"] == 2
    r.pipe.on_flip(event1)                             # the same event again: stale
    assert len(r.presented) == 2

    # The next frame is an ordinary flip: presented at its event, and f1 goes back then, once.
    f2 = Frame(bufs(2, 24, 16), seq=12)
    r.pipe.submit(f2)
    event2 = r.flip()
    assert r.presented[-1] == (f2, event2) and len(r.presented) == 3
    assert (r.count(f0), r.count(f1), r.count(f2)) == (1, 1, 0)
    assert r.card.violations == [] and r.released_while_busy == []


def test_stop_reports_a_configured_frame_whose_event_was_not_read(new_rig, bufs):
    # The output is turned off (a policy edit, an unplug) before the loop read the event of the
    # commit that showed f0. f0 was on screen all the same, so stop() reports it presented (at the
    # time its commit returned; sequence unknown, 0) before handing it back; the late event, which no
    # pipeline would route any more, cannot report it twice.
    r = new_rig()
    order: list[str] = []
    present, release = r.pipe.present, r.pipe.release
    r.pipe.present = lambda frame, event: (order.append("presented"), present(frame, event))
    r.pipe.release = lambda frame: (order.append("released"), release(frame))
    f0 = Frame(bufs(0))
    before = time.monotonic_ns()
    r.pipe.start(f0)
    after = time.monotonic_ns()
    r.pipe.stop()
    ((frame, event),) = r.presented
    assert frame is f0 and event.sequence == 0 and before <= event.timestamp_ns <= after
    assert order == ["presented", "released"] and r.count(f0) == 1
    r.read_events()
    assert len(r.presented) == 1 and r.pipe.metrics.presented == 1


# -------------------------------------------------------------------------------------- 4. ladder


@pytest.mark.parametrize("pitch_align", [32, 64], ids=["pitch-equals-stride", "padded-pitch"])
def test_copy_of_a_full_screen_buffer(new_rig, bufs, pitch_align):
    # Import refused, plan full screen: the copy is the guest's picture. With pitch == stride the
    # copy is one slice, otherwise row by row; both must give the same pixels.
    r = new_rig(pitch_align=pitch_align)
    r.card.refuse_import = lambda fd: True
    r.pipe.start(Frame(bufs(7)))
    fb = r.card.scanout[PLANE].fb
    pitch = r.card.dumbs[fb.handle].pitch
    assert pitch == (160 if pitch_align == 32 else 192)
    assert r.card.pixels(fb) == composed(pitch, 7, FULL, FULL)


def test_import_refused_copies_src_to_dst_in_a_mode_sized_buffer(new_rig, bufs):
    # virtio-gpu refusing a foreign dma-buf: the copy rung composes the planned src (of a buffer with
    # an offset and a padded stride) at the planned dst of a mode-sized buffer, black elsewhere, and
    # the plane shows that buffer full screen. Status says copy and why.
    src, dst = Rect(4, 2, 16, 10), Rect(10, 7, 16, 10)
    r = new_rig(assignment(src=src, dst=dst))
    r.card.refuse_import = lambda fd: True
    layout = dict(w=24, h=16, stride=24 * 4 + 16, offset=64)
    r.pipe.start(Frame(bufs(5, **layout)))
    status = r.pipe.status()
    assert status["path"] == "copy" and status["fallbacks"] == ["zero-copy"]
    assert "import refused" in status["reason"] and "cannot import" in status["reason"]
    shown = r.card.scanout[PLANE]
    assert shown.fb.origin == "dumb" and (shown.fb.width, shown.fb.height) == (W, H)
    assert (shown.src, shown.dst) == ((0, 0, W, H), (0, 0, W, H))
    pitch = r.card.dumbs[shown.fb.handle].pitch
    assert r.card.pixels(shown.fb) == composed(pitch, 5, src, dst)
    assert r.cache.imports == 0 and r.pipe.metrics.copies == 1

    # The next frame is copied into the other buffer; the one on screen is left alone.
    before = r.card.pixels(shown.fb)
    r.pipe.submit(Frame(bufs(6, **layout)))
    flipping = r.card.state[PLANE].fb
    assert flipping is not shown.fb and r.is_copy_fb(flipping)
    assert r.card.pixels(flipping) == composed(pitch, 6, src, dst)
    assert r.card.pixels(shown.fb) == before
    assert r.pipe.metrics.copies == 2 and r.pipe.path == "copy"


def virtio_primary(state: PlaneState) -> str | None:
    """Like virtio-gpu's primary plane: it must cover the whole CRTC."""
    return "the plane must cover the CRTC" if state.dst != (0, 0, W, H) else None


@pytest.mark.parametrize("first_frame", [True, False], ids=["at-start", "first-flip"])
def test_test_only_refusing_zero_copy_falls_to_copy(new_rig, bufs, first_frame):
    # The plan puts the guest at 10,7; the card's TEST_ONLY refuses a plane that does not cover the
    # CRTC. The copy rung composes the picture into a full-screen buffer, which passes. Same whether
    # the refusal comes with the blocking first frame or with the first nonblocking flip (after the
    # "waiting for the first frame" slate). The reason says why, and hints at the cause.
    src, dst = Rect(0, 0, 20, 12), Rect(10, 7, 20, 12)
    r = new_rig(assignment(src=src, dst=dst))
    r.card.refuse_config = virtio_primary
    frame = Frame(bufs(3))
    if first_frame:
        r.pipe.start(frame)
        shown = r.card.scanout[PLANE]
    else:
        r.pipe.start(None)
        assert r.pipe.path == "slate"
        r.pipe.submit(frame)
        shown = r.card.state[PLANE]
        assert r.pipe.in_flight.frame is frame
    refused = [c for c in r.card.log if c.test_only and c.planes[PLANE].fb.origin == "prime"]
    assert len(refused) == 1 and refused[0].planes[PLANE].dst == (10, 7, 20, 12)
    assert r.pipe.path == "copy" and r.pipe.fallbacks == ["zero-copy"]
    assert "TEST_ONLY refused the zero-copy configuration" in r.pipe.reason
    assert "cover the whole CRTC" in r.pipe.reason
    assert r.is_copy_fb(shown.fb)
    assert r.card.pixels(shown.fb) == composed(r.card.dumbs[shown.fb.handle].pitch, 3, src, dst)
    assert r.count(frame) == 0


def test_both_rungs_refused_is_a_dead_end_showing_the_slate(new_rig, bufs):
    # Neither the guest's buffer nor the copy passes TEST_ONLY: the frame goes back, the slate shows
    # why, and from then on frames go straight back to the guest: no import, no copy, no commit.
    r = new_rig()
    r.card.refuse_config = lambda s: refuse_prime(s) or ("no copy" if r.is_copy_fb(s.fb) else None)
    r.pipe.start(None)
    f1 = Frame(bufs(1))
    r.pipe.submit(f1)
    assert r.count(f1) == 1 and r.pipe.dead_end and r.pipe.in_flight is None
    status = r.pipe.status()
    assert status["path"] == "slate" and status["fallbacks"] == ["zero-copy", "copy"]
    assert "TEST_ONLY refused the copy configuration" in status["reason"]
    slate = r.card.scanout[PLANE].fb
    assert slate.origin == "dumb" and not r.is_copy_fb(slate) and r.pipe.on_screen.fb is slate
    commits, copies, imports = len(r.card.log), r.pipe.metrics.copies, r.card.import_calls
    later = [Frame(bufs(i)) for i in range(2, 6)]
    for f in later:
        r.pipe.submit(f)
        assert r.count(f) == 1 and r.pipe.pending is None
    assert (len(r.card.log), r.pipe.metrics.copies, r.card.import_calls) == (commits, copies, imports)
    assert r.card.scanout[PLANE].fb is slate


def test_both_rungs_refused_at_start_shows_the_slate(new_rig, bufs):
    # The blocking first frame falls through both rungs: the slate shows the last refusal and the
    # frame goes back to the guest.
    r = new_rig()
    r.card.refuse_config = lambda s: refuse_prime(s) or ("no copy" if r.is_copy_fb(s.fb) else None)
    f0 = Frame(bufs(0))
    r.pipe.start(f0)
    assert r.count(f0) == 1 and r.pipe.path == "slate" and r.pipe.on_screen.frame is None
    assert "TEST_ONLY refused the copy configuration" in r.pipe.reason


def test_both_rungs_refused_at_start_later_frames_cause_no_commits(new_rig, bufs):
    # After the blocking first frame fell to the slate, the pipeline is on the slate rung until it is
    # configured again: later frames must go straight back, without commits.
    r = new_rig()
    r.card.refuse_config = lambda s: refuse_prime(s) or ("no copy" if r.is_copy_fb(s.fb) else None)
    r.pipe.start(Frame(bufs(0)))
    commits = len(r.card.log)
    for i in range(1, 4):
        f = Frame(bufs(i))
        r.pipe.submit(f)
        assert r.count(f) == 1
    assert len(r.card.log) == commits


def test_tiled_buffer_refused_by_the_card_cannot_be_copied(new_rig, bufs):
    # A tiled buffer (modifier set) the card refuses cannot be copied by the CPU: slate, and says so.
    r = new_rig()
    r.card.refuse_import = lambda fd: True
    b = bufs(0)
    b.info = replace(b.info, modifier=(1 << 56) | 1)  # I915_FORMAT_MOD_X_TILED
    f0 = Frame(b)
    r.pipe.start(f0)
    assert r.pipe.path == "slate" and "tiled" in r.pipe.reason and r.count(f0) == 1


# ----------------------------------------------------------------------- 5. a frame that does not fit


def test_frame_smaller_than_the_planned_src_waits_for_the_new_plan(new_rig, bufs):
    # The guest shrank its framebuffer to 32x24 but the plan still reads 40x30 of it: showing it would
    # read outside the buffer. It waits as pending (not committed, not released) until the daemon
    # re-plans; then reconfigure() shows it.
    r = new_rig()
    f0 = Frame(bufs(0))
    r.pipe.start(f0)
    commits = len(r.card.log)
    small = Frame(bufs(1, 32, 24))
    r.pipe.submit(small)
    assert r.pipe.pending is small and r.pipe.in_flight is None and r.count(small) == 0
    assert len(r.card.log) == commits and r.pipe.on_screen.frame is f0
    r.pipe.resume()  # still nothing to do
    assert r.pipe.pending is small and len(r.card.log) == commits

    out = assignment(src=Rect(0, 0, 32, 24), dst=Rect(4, 3, 32, 24))
    r.pipe.reconfigure(out, small)
    # Each hand-over carries its own hold (the daemon adds one when it passes `first`): the hold of
    # the pending hand-over is released, the one of `first` stays with the frame on screen.
    assert r.pipe.on_screen.frame is small and r.pipe.pending is None and r.count(small) == 1
    assert r.count(f0) == 1  # replaced on screen by the new configuration
    shown = r.card.scanout[PLANE]
    assert shown.fb is r.cache.entries[small.buffer.key][0]
    assert (shown.src, shown.dst) == ((0, 0, 32, 24), (4, 3, 32, 24))


def test_frame_that_does_not_fit_is_held_across_flip_events_and_dropped_by_a_newer_one(new_rig, bufs):
    # Arriving while a commit is in flight, the small frame is pending; the flip event does not
    # commit it (it does not fit); a newer fitting frame replaces it (dropped, released) and is committed.
    r = new_rig()
    f0, f1 = Frame(bufs(0)), Frame(bufs(1))
    small, f3 = Frame(bufs(2, 32, 24)), Frame(bufs(3))
    r.pipe.start(f0)
    r.pipe.submit(f1)
    r.pipe.submit(small)
    r.flip()
    assert r.pipe.in_flight is None and r.pipe.pending is small and r.count(small) == 0
    assert len(r.card.nonblocking_commits()) == 1
    r.pipe.submit(f3)
    assert r.count(small) == 1 and r.pipe.in_flight.frame is f3 and r.pipe.metrics.dropped == 1


# -------------------------------------------------------------------------------------------- 6. stop


@pytest.mark.parametrize("path", ["zero-copy", "copy", "slate"])
def test_stop_releases_everything_and_turns_the_output_off(new_rig, bufs, path):
    # With a frame on screen, one in flight and one pending, stop() turns the output off with a
    # blocking modeset (plane off, CRTC off, connector detached) and only then frees its buffers:
    # every held frame goes back exactly once, no framebuffer is removed while scanned out, and the
    # pipeline's own buffers (copy, slate) are gone. The frame the lighting commit showed, whose
    # event was never read, is reported presented by stop(); a late flip event is ignored.
    r = new_rig()
    if path == "copy":
        r.card.refuse_import = lambda fd: True
    frames = [Frame(bufs(i)) for i in range(3)]
    if path == "slate":
        r.pipe.start(None)
        frames = []
    else:
        r.pipe.start(frames[0])
        r.pipe.submit(frames[1])
        r.pipe.submit(frames[2])
        assert r.held() == [frames[0], frames[1], frames[2]]
    r.pipe.stop()
    assert [r.count(f) for f in frames] == [1] * len(frames)
    off = r.card.log[-1]
    assert not off.test_only and not off.nonblock and off.allow_modeset
    assert off.planes == {PLANE: None} and off.outputs == {CRTC: (CONNECTOR, None)}
    assert r.card.scanout[PLANE] is None and r.card.modes[CRTC] is None
    assert r.card.violations == []
    assert r.card.dumbs == {}
    assert all(fb.origin == "prime" for fb in r.card.fbs.values())  # only the daemon's cache remains
    assert (r.pipe.pending, r.pipe.in_flight, r.pipe.on_screen) == (None, None, None)
    assert [f for f, _ in r.presented] == frames[:1]
    if r.card.in_flight:
        r.pipe.on_flip(r.card.complete(CRTC))
    r.read_events()
    assert [f for f, _ in r.presented] == frames[:1] and [r.count(f) for f in frames] == [1] * len(frames)


# ------------------------------------------------------------------------------- 7. framebuffer cache


def test_cache_imports_a_buffer_once(bufs):
    # The cache is keyed by (guest, buffer id): the second flip of a buffer reuses its framebuffer.
    card = FakeCard()
    cache = FramebufferCache(card)
    b = bufs(0)
    fb = cache.framebuffer(b)
    assert cache.framebuffer(b) is fb
    assert (card.import_calls, cache.imports, len(card.fbs)) == (1, 1, 1)
    assert (fb.width, fb.height, fb.format, fb.origin) == (W, H, XRGB8888, "prime")


def test_cache_two_buffer_ids_sharing_one_gem_handle(bufs):
    # Two buffer ids naming one dma-buf get the same GEM handle from PRIME: dropping one must not
    # close the handle the other's framebuffer still uses; dropping both closes it once.
    card = FakeCard()
    cache = FramebufferCache(card)
    a = bufs(0)
    b = Buffer("office", 1, a.info, os.dup(a.fd))
    try:
        fa, fb = cache.framebuffer(a), cache.framebuffer(b)
        assert fa is not fb and fa.handle == fb.handle
        cache.drop(a.key)
        assert card.closed_handles == [] and fa.id == 0 and fb.id in card.fbs
        cache.drop(a.key)  # unknown now: nothing happens
        assert card.closed_handles == []
        cache.drop(b.key)
        assert card.closed_handles == [fb.handle] and card.fbs == {}
        assert card.violations == []
    finally:
        b.close()


def test_cache_addfb_refused_closes_the_handle_unless_shared(bufs):
    # AddFB2 refusing the buffer: the handle the import opened is closed again (nothing else uses it)
    # and nothing is cached, so a later try imports afresh. When another key shares the handle, it
    # stays open.
    card = FakeCard()
    cache = FramebufferCache(card)
    a = bufs(0)
    card.refuse_addfb = lambda w, h, fourcc: True
    with pytest.raises(Rejected):
        cache.framebuffer(a)
    assert len(card.closed_handles) == 1 and cache.entries == {} and cache.imports == 0

    card.refuse_addfb = lambda w, h, fourcc: False
    fa = cache.framebuffer(a)
    twin = Buffer("office", 9, replace(a.info, width=W - 8), os.dup(a.fd))
    try:
        card.refuse_addfb = lambda w, h, fourcc: w == W - 8
        with pytest.raises(Rejected):
            cache.framebuffer(twin)
        assert len(card.closed_handles) == 1 and fa.handle in card.prime.values()
        cache.clear()
        assert card.closed_handles[-1] == fa.handle and card.prime == {} and cache.entries == {}
    finally:
        twin.close()


# ------------------------------------------------------------------------------------------ 8. metrics


def test_latency_percentiles_on_known_data():
    # latency_ms(q) is the sorted sample at index floor(q·n) (clamped): for 1..100 ms the median is
    # the upper one (51) and p99 is the largest sample; for 1..5 the median is 3.
    m = Metrics()
    assert m.latency_ms(0.5) is None
    m.latencies_ns.extend(int(ms * 1e6) for ms in [*range(100, 50, -1), *range(1, 51)])
    assert (m.latency_ms(0.0), m.latency_ms(0.5), m.latency_ms(0.99), m.latency_ms(1.0)) == (1, 51, 100, 100)
    m = Metrics()
    m.latencies_ns.extend(int(ms * 1e6) for ms in (5, 1, 4, 2, 3))
    assert m.latency_ms(0.5) == 3
    # Only the newest 2000 samples count.
    m = Metrics()
    m.latencies_ns.extend([1_000_000] * 2000 + [9_000_000] * 2000)
    assert m.latency_ms(0.0) == 9


def test_flips_per_second_on_known_data():
    # 120 flips at 60 Hz ending now: 60 in the last second, 120 in the last two — 60/s either way; a
    # flip exactly at the window's start counts.
    now = 10_000_000_000
    m = Metrics()
    m.present_times.extend(now - k * 16_666_667 for k in range(119, -1, -1))
    assert m.flips_per_second(now) == 60.0
    assert m.flips_per_second(now, window=2.0) == 60.0
    assert m.flips_per_second(now + 10_000_000_000) == 0.0
    m.present_times.append(now - 1_000_000_000)
    assert m.flips_per_second(now) == 61.0


# ---------------------------------------------------------------------- bugs found in scanout.py


@dataclass
class HoldCounter:
    """The daemon's buffer holds (daemon.py: +1 per frame handed to a pipeline, -1 per release)."""

    holds: Counter = field(default_factory=Counter)

    def hand(self, frame: Frame) -> Frame:
        self.holds[frame.buffer.id] += 1
        return frame


@pytest.mark.parametrize("where", ["on-screen", "pending"])
def test_reconfigure_with_the_frame_already_held_releases_each_hand_over(new_rig, bufs, where):
    # The daemon re-applies a plan (a policy edit moving the picture, a guest resize) and passes the
    # guest's latest frame as `first`; it counts one hold per hand-over. After stop(), every hold must
    # have been released.
    r = new_rig()
    daemon = HoldCounter()
    f0, f1 = Frame(bufs(0)), Frame(bufs(1))
    r.pipe.start(daemon.hand(f0))
    if where == "on-screen":
        r.pipe.submit(daemon.hand(f1))
        r.flip()
    else:
        r.pipe.paused = True
        r.pipe.submit(daemon.hand(f1))
    r.pipe.reconfigure(assignment(src=Rect(0, 0, 32, 24), dst=Rect(4, 3, 32, 24)), daemon.hand(f1))
    r.pipe.stop()
    for f in r.released:
        daemon.holds[f.buffer.id] -= 1
    assert +daemon.holds == Counter()


def test_copy_never_writes_into_the_buffer_on_screen_after_a_failed_flip(new_rig, bufs):
    # On the copy rung, a refused flip must not change which copy buffer is written next: the one on
    # screen stays untouched until a flip has taken it off.
    r = new_rig()
    r.card.refuse_import = lambda fd: True
    r.pipe.start(Frame(bufs(0)))
    on_screen = r.card.scanout[PLANE].fb
    before = r.card.pixels(on_screen)
    r.card.fail_next_flip = errno.EBUSY
    r.pipe.submit(Frame(bufs(1)))  # copied into the other slot, flip refused, frame handed back
    r.pipe.submit(Frame(bufs(2)))
    assert r.card.scanout[PLANE].fb is on_screen
    assert r.card.pixels(on_screen) == before


@pytest.mark.parametrize("case", ["copy-reconfigured", "slate-replaced"])
def test_framebuffers_on_screen_are_not_removed_before_they_are_replaced(new_rig, bufs, case):
    r = new_rig()
    if case == "copy-reconfigured":
        # The copy is on screen; a new plan moves the picture: new copy buffers, then the commit.
        r.card.refuse_import = lambda fd: True
        r.pipe.start(Frame(bufs(0)))
        r.pipe.reconfigure(assignment(src=Rect(0, 0, 20, 12), dst=Rect(10, 7, 20, 12)), Frame(bufs(1)))
    else:
        # The "waiting for the first frame" slate is on screen; a new plan with a slate replaces it.
        r.pipe.start(None)
        r.pipe.reconfigure(assignment(guest=None, slate=Slate("office stopped", "no signal", "#000000")),
                           None)
    assert r.card.violations == []


# ----------------------------------------------------------------------------- the cursor plane


def cursor_image(serial: int, w: int = 4, h: int = 4, hot: tuple[int, int] = (1, 1)) -> Cursor:
    return Cursor(w, h, hot[0], hot[1], bytes([serial, 0, 0xFF, 0xFF]) * (w * h), serial)


def test_cursor_alone_is_one_nonblocking_commit_of_its_plane(new_rig, bufs):
    # Nothing in flight: the cursor gets a commit of its own (cursor plane only), with an event, so
    # the next frame waits for it like any other commit.
    r = new_rig()
    r.pipe.start(Frame(bufs(0)))
    r.pipe.set_cursor(cursor_image(1), Pointer(10, 20, True))
    commits = r.card.nonblocking_commits()
    assert len(commits) == 1
    state = commits[0].planes[CURSOR]
    assert set(commits[0].planes) == {CURSOR}
    assert state.dst == (10 - 1, 20 - 1, 16, 16)  # the hot spot on the pointer; the plane's size
    pixels = r.card.pixels(state.fb)
    pitch = r.card.dumbs[state.fb.handle].pitch
    assert pixels[:16] == bytes([1, 0, 0xFF, 0xFF]) * 4          # the image's first row
    assert pixels[16:pitch] == bytes(pitch - 16)                  # transparent beyond it
    r.flip()
    assert r.pipe.in_flight is None and r.pipe.on_screen.frame is not None  # the frame stayed on screen


def test_cursor_changes_while_a_flip_is_in_flight_join_the_next_frame(new_rig, bufs):
    # F1 in flight; three pointer moves and a new frame F2 arrive: no commit until F1's event, then
    # one commit carries F2 and the latest pointer position (the fake asserts one commit in flight).
    r = new_rig()
    r.pipe.start(Frame(bufs(0)))
    r.pipe.submit(Frame(bufs(1)))
    for x in (5, 6, 7):
        r.pipe.set_cursor(cursor_image(1), Pointer(x, 3, True))
    r.pipe.submit(Frame(bufs(2)))
    assert len(r.card.nonblocking_commits()) == 1
    r.flip()
    last = r.card.nonblocking_commits()[-1]
    assert len(r.card.nonblocking_commits()) == 2
    assert last.planes[CURSOR].dst[:2] == (6, 2) and PLANE in last.planes


def test_cursor_move_after_the_last_frame_is_committed_on_its_event(new_rig, bufs):
    r = new_rig()
    r.pipe.start(Frame(bufs(0)))
    r.pipe.submit(Frame(bufs(1)))
    r.pipe.set_cursor(cursor_image(1), Pointer(4, 4, True))
    r.flip()  # F1's event: nothing pending, the cursor is due
    last = r.card.nonblocking_commits()[-1]
    assert set(last.planes) == {CURSOR} and last.planes[CURSOR].dst[:2] == (3, 3)
    r.flip()
    r.pipe.set_cursor(cursor_image(1), Pointer(4, 4, False))  # hidden: the plane off
    assert r.card.nonblocking_commits()[-1].planes[CURSOR] is None


def test_cursor_follows_the_guests_scaling(new_rig, bufs):
    # A 20x15 buffer shown 2x at (0, 0): the pointer at (5, 5) is at (10, 10) on the CRTC, the 4x4
    # image becomes 8x8 and its hot spot (1, 1) becomes (2, 2).
    r = new_rig(assignment(src=Rect(0, 0, 20, 15), dst=Rect(0, 0, 40, 30), scaling="integer"))
    r.pipe.start(Frame(bufs(0, 20, 15)))
    r.pipe.set_cursor(cursor_image(3), Pointer(5, 5, True))
    state = r.card.nonblocking_commits()[-1].planes[CURSOR]
    assert state.dst[:2] == (8, 8)
    pixels, pitch = r.card.pixels(state.fb), r.card.dumbs[state.fb.handle].pitch
    assert pixels[:32] == bytes([3, 0, 0xFF, 0xFF]) * 8 and pixels[32:36] == bytes(4)
    assert pixels[7 * pitch:7 * pitch + 4] == bytes([3, 0, 0xFF, 0xFF])
    assert pixels[8 * pitch:8 * pitch + 4] == bytes(4)


def test_a_refused_cursor_is_disabled_and_frames_go_on(new_rig, bufs):
    r = new_rig()
    r.card.refuse_config = lambda state: "no cursor here" if state.fb.width == 16 else None
    r.pipe.start(Frame(bufs(0)))
    r.pipe.set_cursor(cursor_image(1), Pointer(1, 1, True))
    assert r.pipe.cursor_layer.disabled and "refused" in r.pipe.status()["cursor"]["disabled"]
    r.pipe.submit(Frame(bufs(1)))
    r.flip()
    assert r.pipe.on_screen.frame.buffer.id == 1


def test_the_slate_hides_the_cursor_and_stop_turns_its_plane_off(new_rig, bufs):
    r = new_rig()
    r.pipe.start(Frame(bufs(0)))
    r.pipe.set_cursor(cursor_image(1), Pointer(1, 1, True))
    r.flip()
    r.pipe.blank("display off")
    assert r.card.state[CURSOR] is None
    r.pipe.set_cursor(cursor_image(1), Pointer(1, 1, True))
    r.pipe.stop()
    assert r.card.state[CURSOR] is None and not r.card.violations


def test_the_guests_name_goes_on_the_label_plane_and_away_again(new_rig, bufs):
    # The daemon gives the output a free overlay plane; the name is one commit of that plane alone
    # (the guest's picture stays on its plane, zero copy), and hiding it is another.
    r = new_rig()
    r.pipe.start(Frame(bufs(0)))
    r.pipe.label_plane = next(p for p in r.card.planes if p.id == OVERLAY)
    r.pipe.show_label("office")
    shown = r.card.nonblocking_commits()[-1]
    assert set(shown.planes) == {OVERLAY}
    state = shown.planes[OVERLAY]
    assert state.dst[:2] == (16, 16) and state.fb.width > 40
    assert r.pipe.status()["label"] == {"plane": OVERLAY, "text": "office", "disabled": None}
    r.flip()
    r.pipe.show_label(None)
    assert r.card.nonblocking_commits()[-1].planes[OVERLAY] is None
    assert r.pipe.path == "zero-copy"


def test_no_free_overlay_means_no_name_and_says_why(new_rig, bufs):
    r = new_rig()
    r.pipe.start(Frame(bufs(0)))
    before = len(r.card.log)
    r.pipe.show_label("office")
    assert len(r.card.log) == before
    assert r.pipe.status()["label"]["disabled"] == "no overlay plane is free on this CRTC"



def test_without_a_cursor_plane_a_lent_overlay_carries_the_cursor(bufs):
    from compositor.daemon import free_overlay

    r = Rig()
    r.card.planes = [p for p in r.card.planes if p.id != CURSOR]   # a CRTC with no cursor plane
    r.pipe = ScanoutPipeline(r.layer, assignment(), release=r._release,
                             present=lambda frame, event: r.presented.append((frame, event)))
    assert r.pipe.cursor_plane is None and "no cursor plane" in r.pipe.status()["cursor"]["disabled"]
    # the daemon lends the overlay the plan leaves free; the primary (the guest's plane) is never lent
    overlay = free_overlay(r.card.planes, {PLANE}, r.card.crtcs[CRTC])
    assert overlay.id == OVERLAY and free_overlay(r.card.planes, {PLANE, OVERLAY}, r.card.crtcs[CRTC]) is None
    r.pipe.use_cursor_plane(overlay, "")
    r.pipe.start(Frame(bufs(0)))
    r.pipe.set_cursor(cursor_image(1), Pointer(5, 5, True))
    assert r.card.nonblocking_commits()[-1].planes[OVERLAY].dst[:2] == (4, 4)
    r.flip()
    r.pipe.reconfigure(assignment(), Frame(bufs(1)))          # a new plan: the overlay stays lent
    assert r.pipe.cursor_plane is overlay and r.card.state[OVERLAY] is not None


def test_a_label_let_go_of_while_on_screen_is_freed_only_after_its_plane_is_off(new_rig, bufs):
    # The name changes size while a frame is in flight: the old label's framebuffer is on screen, so
    # it must stay until a commit turned its plane off (the fake card records an RMFB of a framebuffer
    # on screen as a violation).
    r = new_rig()
    r.pipe.start(Frame(bufs(0)))
    r.pipe.label_plane = next(p for p in r.card.planes if p.id == OVERLAY)
    r.pipe.show_label("a")
    r.flip()
    r.pipe.submit(Frame(bufs(1)))                 # in flight
    r.pipe.show_label("a much longer name")       # another size: the old layer is let go of
    r.pipe.submit(Frame(bufs(2)))
    for _ in range(4):
        if r.pipe.in_flight is not None:
            r.flip()
    assert not r.card.violations
    assert r.card.state[OVERLAY] is not None and r.card.state[OVERLAY].fb.width > 100


def test_a_label_plane_the_plan_gives_to_the_picture_is_not_committed_to(new_rig, bufs):
    r = new_rig()
    r.pipe.start(Frame(bufs(0)))
    r.pipe.label_plane = next(p for p in r.card.planes if p.id == OVERLAY)
    r.pipe.show_label("office")
    r.flip()
    r.pipe.reconfigure(assignment(plane_id=OVERLAY), Frame(bufs(1)))   # the picture on the overlay now
    last = r.card.log[-1]
    assert last.planes[OVERLAY] is not None and last.planes[OVERLAY].fb.origin == "prime"
    assert r.pipe.label_layer is None and not r.card.violations


# ----------------------------------------------------------------------- 9. the copy off the loop


class GatedCopy:
    """The copy rung's copy_rows (compositor/scanout/copy.py) that waits for `gate` before it copies,
    and says when a copy began."""

    def __init__(self) -> None:
        self.gate, self.began = threading.Event(), threading.Event()
        self.threads: list[str] = []
        self.real = scanout_copy.copy_rows

    def __call__(self, *args, **kw):
        self.threads.append(threading.current_thread().name)
        self.began.set()
        assert self.gate.wait(10), "the test never opened the gate"
        return self.real(*args, **kw)


async def until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {timeout} s"
        await asyncio.sleep(0.005)


def test_a_copy_runs_on_a_worker_and_no_other_output_waits_for_it(bufs, monkeypatch):
    # Output A is on the copy rung, B zero copy. While A's copy of a frame runs (held at the gate) on
    # the worker, the loop goes on: B's frame is committed at once, and A's next frame waits as A's
    # pending one (A's CRTC counts as busy). When the copy is over A commits the copied pixels, and
    # its pending frame follows after the flip, copied on the worker too.
    gated = GatedCopy()
    monkeypatch.setattr(scanout_copy, "copy_rows", gated)

    async def main() -> None:
        with ThreadPoolExecutor(1, thread_name_prefix="copy") as pool:
            a, b = Rig(copier=pool), Rig(copier=pool)
            a.card.refuse_import = lambda fd: True
            gated.gate.set()   # the first frames light the outputs: blocking, copied on the loop
            a.pipe.start(Frame(bufs(1)))
            b.pipe.start(Frame(bufs(2)))
            a.read_events()
            b.read_events()
            assert gated.threads == ["MainThread"] and a.pipe.path == "copy" and b.pipe.path == "zero-copy"
            gated.gate.clear()
            gated.began.clear()
            first = Frame(bufs(3))
            a.pipe.submit(first)
            assert gated.began.wait(10) and gated.threads[-1].startswith("copy")
            assert a.pipe.in_flight is not None and a.pipe.in_flight.copying is not None
            assert not a.card.in_flight, "committed before its copy was over"
            b.pipe.submit(Frame(bufs(4)))
            assert b.card.in_flight, "B's frame waited for A's copy"
            second = Frame(bufs(5))
            a.pipe.submit(second)
            assert a.pipe.pending is second and a.card.nonblocking_commits() == []
            gated.gate.set()
            await until(lambda: a.card.in_flight, "A committed after its copy")
            shown = a.card.state[PLANE].fb
            assert a.is_copy_fb(shown) and a.card.pixels(shown) == composed(
                a.card.dumbs[shown.handle].pitch, 3, FULL, FULL)
            a.flip()   # `first` on screen; `second` is copied next, on the worker
            await until(lambda: a.card.in_flight, "A's second frame committed")
            shown = a.card.state[PLANE].fb
            assert a.card.pixels(shown) == composed(a.card.dumbs[shown.handle].pitch, 5, FULL, FULL)
            assert a.pipe.metrics.copies == 3 and a.pipe.metrics.errors == 0
            assert [t.startswith("copy") for t in gated.threads] == [False, True, True]
            assert a.card.violations == [] and b.card.violations == []

    asyncio.run(main())


def test_stopping_or_forgetting_during_a_copy_waits_for_it(bufs, monkeypatch):
    # The guest forgets the buffer being copied (its mapping must stay until the copy is over), then
    # the output stops while the copy runs: stop() waits for the copy before it frees the copy
    # buffers, hands the frame back once, and the copy's late completion commits nothing.
    gated = GatedCopy()
    monkeypatch.setattr(scanout_copy, "copy_rows", gated)

    async def main() -> None:
        with ThreadPoolExecutor(1, thread_name_prefix="copy") as pool:
            a = Rig(copier=pool)
            a.card.refuse_import = lambda fd: True
            gated.gate.set()
            a.pipe.start(Frame(bufs(1)))
            a.read_events()
            gated.gate.clear()
            gated.began.clear()
            frame = Frame(bufs(2))
            a.pipe.submit(frame)
            assert gated.began.wait(10)
            copy = a.pipe.copy
            a.pipe.forget(frame.buffer.key)
            assert frame.buffer.key in copy._maps, "unmapped while the copy reads it"
            threading.Timer(0.2, gated.gate.set).start()
            a.pipe.stop()
            assert a.count(frame) == 1 and a.pipe.in_flight is None
            assert frame.buffer.key not in copy._maps and copy.slots == []
            await asyncio.sleep(0.05)   # the copy's completion, scheduled on the loop, finds nothing to do
            assert a.card.nonblocking_commits() == [] and a.count(frame) == 1
            assert a.card.violations == []

    asyncio.run(main())


# ---------------------------------------------------------------------------- 10. the output layer


def test_the_output_layer_routes_flip_events_by_crtc_to_the_pipeline_driving_it(bufs):
    # Flip events reach the pipeline on their CRTC through a table, not a scan of every output. A
    # pipeline that stops lets go of its CRTC, but never of one another pipeline has taken over.
    r = Rig()
    r.pipe.start(Frame(bufs(1)))
    (event,) = r.card.events
    r.card.events.clear()
    assert r.layer.route(event) is r.pipe and len(r.presented) == 1

    class Successor:
        def __init__(self, tokens=()) -> None:
            self.events: list = []
            self.tokens = set(tokens)

        def expects(self, token: int) -> bool:
            return token in self.tokens

        def on_flip(self, ev) -> None:
            self.events.append(ev)

    other = Successor()
    r.layer.bind(CRTC, other)          # the plan gave the CRTC to another output
    r.pipe.stop()                      # the old pipeline goes: the CRTC stays the successor's
    late = FlipEvent(CRTC, 9, time.monotonic_ns(), 12345)
    assert r.layer.route(late) is other and other.events == [late]
    r.layer.unbind(CRTC, other)
    assert r.layer.route(late) is None
    assert r.card.violations == []


def test_a_cursor_state_the_data_plane_never_committed_is_committed_again_from_here(bufs):
    # The data plane was handed a hide (and a switch back to an image drawn earlier) but gave the
    # output back before committing it: the layer must not think the plane is off, nor that the
    # handed-over slot is on screen. The plane counts as maybe lit (turned off with the output), the
    # next commit sets it again, and a new image is drawn into the slot the plane does not show.
    from compositor.cursor import CursorLayer

    card = FakeCard()
    crtc, plane = card.crtcs[CRTC], next(p for p in card.planes if p.id == CURSOR)
    layer = CursorLayer(card, plane, crtc)
    src = dst = Rect(0, 0, W, H)
    x_img, y_img = cursor_image(1), cursor_image(2)
    for image in (x_img, y_img, x_img):   # X in one slot, Y in the other; X shown
        layer.set(image, Pointer(5, 5, True), src, dst)
        req = FakeRequest(card)
        layer.add_to(req)
        layer.done()
    shown = layer.front
    x_fb = layer.slots[shown].fb.id
    layer.set(y_img, Pointer(6, 6, True), src, dst)      # handed over: Y's slot, never committed
    assert layer.plane_values()[0] == layer.slots[1 - shown].fb.id
    layer.handed_over()
    layer.set(y_img, Pointer(6, 6, False), src, dst)     # then a hide, handed over too
    assert layer.plane_values()[:2] == [0, 0]
    layer.handed_over()
    assert not layer.dirty
    layer.taken_back(pending=True, committed_fb=x_fb)    # the data plane committed neither
    assert layer.dirty and layer.committed is not None and layer.front == shown
    z = cursor_image(3)
    layer.set(z, Pointer(7, 7, True), src, dst)
    req = FakeRequest(card)
    layer.add_to(req)
    assert req.planes[CURSOR].fb.id != x_fb, "a new image drawn into the slot on screen"

    # Had the data plane committed the switch to Y, the plane would show Y's slot.
    layer.taken_back(pending=False, committed_fb=layer.slots[1 - shown].fb.id)
    assert layer.front == 1 - shown


def test_a_flip_event_finds_its_commit_when_a_plan_gave_the_crtc_to_another_output(bufs):
    # A plan moves output A off a CRTC while its flip is in flight there, and gives the CRTC to a new
    # output B, which binds it first. The event of A's flip still reaches A (by its token): A must
    # not wait for it until the daemon gives up. B gets its own events as before.
    r = Rig()
    r.pipe.start(Frame(bufs(1)))
    r.read_events()
    r.pipe.submit(Frame(bufs(2)))
    token = r.pipe.in_flight.token
    assert r.pipe.expects(token)

    class Newcomer:
        def __init__(self) -> None:
            self.events: list = []

        def expects(self, t: int) -> bool:
            return t == 777

        def on_flip(self, ev) -> None:
            self.events.append(ev)

    b = Newcomer()
    r.layer.bind(CRTC, b)
    assert r.layer.route(r.card.complete(CRTC)) is r.pipe and r.pipe.in_flight is None and b.events == []
    own = FlipEvent(CRTC, 5, time.monotonic_ns(), 777)
    assert r.layer.route(own) is b and b.events == [own]


def test_a_copy_waits_a_bounded_time_for_the_guests_writes_then_skips_the_frame(bufs, monkeypatch):
    # The guest's dma-buf never becomes readable (a fence that does not signal): the worker gives up
    # after FENCE_TIMEOUT instead of blocking in DMA_BUF_IOCTL_SYNC, the frame is skipped and handed
    # back, the output stays on the copy rung, and the next frame is copied as usual.
    real_readable = scanout_copy.readable
    stuck = {"on": False}

    def readable(fd, timeout):
        if stuck["on"]:
            return False
        return real_readable(fd, timeout)

    monkeypatch.setattr(scanout_copy, "readable", readable)

    async def main() -> None:
        with ThreadPoolExecutor(1, thread_name_prefix="copy") as pool:
            a = Rig(copier=pool)
            a.card.refuse_import = lambda fd: True
            a.pipe.start(Frame(bufs(1)))
            a.read_events()
            stuck["on"] = True
            frame = Frame(bufs(2))
            a.pipe.submit(frame)
            await until(lambda: a.pipe.in_flight is None, "the stuck copy given up")
            assert a.count(frame) == 1 and a.pipe.metrics.errors == 1 and a.pipe.path == "copy"
            assert a.card.nonblocking_commits() == []
            stuck["on"] = False
            a.pipe.submit(Frame(bufs(3)))
            await until(lambda: a.card.in_flight, "the next frame committed")
            shown = a.card.state[PLANE].fb
            assert a.card.pixels(shown) == composed(a.card.dumbs[shown.handle].pitch, 3, FULL, FULL)

    asyncio.run(main())


def test_a_new_buffer_under_an_old_guest_name_and_id_is_never_the_old_framebuffer(bufs):
    # A guest leaves with buffer 1 still cached; a new connection under the same name announces a
    # buffer 1 of different pixels. The cache key carries each Buffer's serial, so the new one is
    # imported anew and never handed the old framebuffer (or, on the copy rung, the old mapping).
    card = FakeCard()
    cache = FramebufferCache(card)
    old, new = bufs(1), bufs(2)
    new.id = old.id
    assert (old.guest, old.id) == (new.guest, new.id) and old.key != new.key
    first = cache.framebuffer(old)
    second = cache.framebuffer(new)
    assert second is not first and cache.imports == 2


def test_a_file_buffer_is_read_row_by_row_without_its_padding(monkeypatch):
    # An unsealed memfd is read with pread, not mapped. Only the bytes a copy of the rectangle uses
    # are read: each row's visible part, never the stride's padding nor the rows outside it.
    from compositor.planner import Rect

    buffer = guest_buffer(5, 8, 6, stride=8 * 4 + 4000, offset=64)
    reads: list[tuple[int, int]] = []
    real = os.preadv

    def counting(fd, buffers, offset):
        reads.append((offset, sum(len(b) for b in buffers)))
        return real(fd, buffers, offset)
    monkeypatch.setattr(scanout_copy.os, "preadv", counting)
    into = bytearray(buffer.info.span)
    scanout_copy._read_file(buffer, into, Rect(2, 1, 4, 3))
    stride = buffer.info.stride
    assert reads == [(64 + y * stride + 2 * 4, 4 * 4) for y in (1, 2, 3)]
    for y in (1, 2, 3):
        at = 64 + y * stride + 8
        assert into[at:at + 16] == os.pread(buffer.fd, 16, at)
    assert into[:64] == bytes(64)   # what no copy reads is never read
    buffer.close()
