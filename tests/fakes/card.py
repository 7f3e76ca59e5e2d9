"""A strict fake of a KMS card: one connector → one CRTC, a primary, an overlay and a cursor plane.

It is stricter than any driver, as libliftoff's libdrm double is. It keeps two states per plane: what
the last commit asked for (`state`) and what the display engine reads now (`scanout`; a nonblocking
commit reaches it only at its flip event). A second nonblocking commit on a CRTC before the first
one's event is an AssertionError (the kernel would answer EBUSY); a modeset without ALLOW_MODESET is
refused; removing a framebuffer the card is scanning out or about to scan out is recorded as a
violation (the kernel answers RMFB by disabling the plane: a visible flash), as are a framebuffer of
a handle that is not open and a GEM handle closed twice. Dumb buffers live on anonymous mappings that
a test reads back (`pixels`). The native flip (`lib.kms_flip`, a cffi function that cannot be patched
itself) is stood in for by FakeNativeLib, which goes through the same fake atomic commit: a test
swaps compositor.output's `lib` for it.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import pytest

from compositor import output
from compositor.formats import DRM_FORMAT_MOD_LINEAR
from compositor.kms import DumbBuffer, FlipEvent, Framebuffer, KmsError, Rejected
from compositor.kms.errors import kms_error

# The ids of the card's objects.
CONNECTOR, CRTC, PLANE, OVERLAY, CURSOR = 31, 41, 51, 52, 53



@dataclass(frozen=True)
class FakeProperty:
    id: int


class FakeObject:
    """A connector, CRTC or plane: its id and the property ids the scanout pipeline reads."""

    edid_blob: bytes | None = None   # a connector's: no monitor EDID

    def __init__(self, kind: str, obj_id: int, type: str = "overlay", crtcs: tuple = ()) -> None:
        self.kind, self.id, self.type, self.possible_crtcs = kind, obj_id, type, list(crtcs)
        self._props = {"FB_ID": FakeProperty(obj_id * 100 + 1), "CRTC_ID": FakeProperty(obj_id * 100 + 2)}

    def supports(self, fmt: int, modifier: int = 0) -> bool:
        return True

    def prop(self, name: str) -> FakeProperty:
        return self._props[name]

    def __repr__(self) -> str:
        return f"<{self.kind} {self.id}>"


@dataclass(eq=False)
class FakeFramebuffer(Framebuffer):
    handle: int
    origin: str  # "prime" (an imported guest dma-buf) or "dumb" (the card's own memory)

    def remove(self) -> None:
        if self.id:
            self.card.remove_framebuffer(self)
            self.id = 0


class FakeDumbBuffer(DumbBuffer):
    """The real DumbBuffer's fields; memory from an anonymous mapping instead of the driver."""

    def map(self) -> mmap.mmap:
        if self._map is None:
            self._map = mmap.mmap(-1, self.size)
        return self._map

    def _free_handle(self) -> None:
        self.card.dumbs.pop(self.handle)


@dataclass(frozen=True)
class PlaneState:
    crtc_id: int
    fb: FakeFramebuffer
    src: tuple[int, int, int, int]
    dst: tuple[int, int, int, int]


@dataclass
class CommitRecord:
    test_only: bool
    allow_modeset: bool
    nonblock: bool
    event: bool
    user_data: int
    planes: dict[int, PlaneState | None]           # plane id → its state after the commit (None: off)
    outputs: dict[int, tuple[int, object | None]]  # CRTC id → (connector id, mode or None: off)
    native: bool = False


class FakeRequest:
    """Records what the scanout pipeline adds; the card decides at test()/commit()."""

    def __init__(self, card: FakeCard) -> None:
        self.card = card
        self.planes: dict[int, PlaneState | None] = {}
        self.fbs: dict[int, FakeFramebuffer] = {}   # FB_ID-only changes (the flip)
        self.outputs: dict[int, tuple[int, object | None]] = {}
        self.native = False

    def add(self, obj: FakeObject, name: str, value) -> FakeRequest:
        assert (obj.kind, name) == ("plane", "FB_ID"), f"scanout sets only FB_ID directly, not {name}"
        self.fbs[obj.id] = value
        return self

    def add_output(self, connector: FakeObject, crtc: FakeObject, mode) -> FakeRequest:
        self.outputs[crtc.id] = (connector.id, mode)
        return self

    def add_plane(self, plane: FakeObject, crtc: FakeObject | None, fb: FakeFramebuffer | None,
                  src=None, dst=None) -> FakeRequest:
        if crtc is None or fb is None:
            self.planes[plane.id] = None
            return self
        src = tuple(src) if src is not None else (0, 0, fb.width, fb.height)
        dst = tuple(dst) if dst is not None else (0, 0, src[2], src[3])
        self.planes[plane.id] = PlaneState(crtc.id, fb, src, dst)
        return self

    def test(self, *, allow_modeset: bool = False) -> None:
        self.commit(test_only=True, allow_modeset=allow_modeset)

    def commit(self, *, test_only: bool = False, allow_modeset: bool = False, nonblock: bool = False,
               event: bool = False, user_data: int = 0) -> None:
        self.card.commit(self, test_only=test_only, allow_modeset=allow_modeset, nonblock=nonblock,
                         event=event, user_data=user_data)


_CARDS: weakref.WeakValueDictionary[int, FakeCard] = weakref.WeakValueDictionary()
_FDS = itertools.count(1000)


class FakeCard:
    """One connector → one CRTC, a primary, an overlay and a cursor plane. Knobs: `refuse_import(fd)`,
    `refuse_addfb(width, height, fourcc)`, `refuse_config(plane_state) -> reason | None` (TEST_ONLY
    and real commits alike), `fail_next_flip` (an errno for the next nonblocking commit)."""

    def __init__(self, *, pitch_align: int = 64) -> None:
        self.fd = next(_FDS)
        _CARDS[self.fd] = self
        self.connectors = [FakeObject("connector", CONNECTOR)]
        self.crtcs = {CRTC: FakeObject("crtc", CRTC)}
        crtc = self.crtcs[CRTC]
        self.planes = [FakeObject("plane", PLANE, "primary", (crtc,)),
                       FakeObject("plane", OVERLAY, "overlay", (crtc,)),
                       FakeObject("plane", CURSOR, "cursor", (crtc,))]
        self.pitch_align = pitch_align
        self.refuse_import: Callable[[int], bool] = lambda fd: False
        self.refuse_addfb: Callable[[int, int, int], bool] = lambda w, h, fourcc: False
        self.refuse_config: Callable[[PlaneState], str | None] = lambda state: None
        self.fail_next_flip: int | None = None
        self.log: list[CommitRecord] = []
        self.state: dict[int, PlaneState | None] = {}
        self.scanout: dict[int, PlaneState | None] = {}
        self.modes: dict[int, object | None] = {}
        self.in_flight: dict[int, tuple[int, dict[int, PlaneState | None]]] = {}  # CRTC → (user_data, states)
        self.fbs: dict[int, FakeFramebuffer] = {}
        self.dumbs: dict[int, FakeDumbBuffer] = {}
        self.prime: dict[tuple[int, int], int] = {}  # the dma-buf's (st_dev, st_ino) → GEM handle
        self.import_calls = 0
        self.closed_handles: list[int] = []
        self.violations: list[str] = []
        self._ids = itertools.count(1)
        self._sequence = 0
        self.events: list[FlipEvent] = []  # flip events of blocking commits, not read yet

    def crtc_by_id(self, crtc_id: int) -> FakeObject:
        return self.crtcs[crtc_id]

    def get_cap(self, cap: int) -> int:
        return 16  # DRM_CAP_CURSOR_WIDTH/HEIGHT: a small cursor plane keeps the tests quick

    def dirty(self, fb) -> None:
        pass

    # -- buffers
    def import_dmabuf(self, fd: int) -> int:
        # PRIME gives one GEM handle per dma-buf however often (and through whichever fd) it is imported.
        self.import_calls += 1
        if self.refuse_import(fd):
            raise Rejected("drmPrimeFDToHandle", errno.ENODEV,
                           f"dma-buf fd {fd} into fake: cannot import a buffer exported by another device")
        st = os.fstat(fd)
        return self.prime.setdefault((st.st_dev, st.st_ino), next(self._ids))

    def close_handle(self, handle: int) -> None:
        key = next((k for k, h in self.prime.items() if h == handle), None)
        if key is None:
            self.violations.append(f"GEM_CLOSE of handle {handle}, which is not open")
            return
        del self.prime[key]
        self.closed_handles.append(handle)

    def create_dumb(self, width: int, height: int, bpp: int = 32) -> FakeDumbBuffer:
        row = width * bpp // 8
        pitch = -(-row // self.pitch_align) * self.pitch_align
        buf = FakeDumbBuffer(self, next(self._ids), width, height, bpp, pitch, pitch * height)
        self.dumbs[buf.handle] = buf
        return buf

    def add_framebuffer(self, width: int, height: int, fmt: int, handles, pitches, offsets=(0,),
                        modifier: int | None = None) -> FakeFramebuffer:
        handle = list(handles)[0]
        if handle in self.dumbs:
            origin = "dumb"
        elif handle in self.prime.values():
            origin = "prime"
        else:
            self.violations.append(f"AddFB2 with handle {handle}, which is not open")
            raise kms_error("drmModeAddFB2", errno.ENOENT, f"handle {handle}")
        if self.refuse_addfb(width, height, fmt):
            raise Rejected("drmModeAddFB2WithModifiers", errno.EINVAL, f"fake: {width}x{height} refused")
        fb = FakeFramebuffer(self, next(self._ids), width, height, fmt, modifier, handle, origin)
        self.fbs[fb.id] = fb
        return fb

    def dumb_framebuffer(self, buf: FakeDumbBuffer, fmt: int) -> FakeFramebuffer:
        return self.add_framebuffer(buf.width, buf.height, fmt, [buf.handle], [buf.pitch], [0],
                                    DRM_FORMAT_MOD_LINEAR)

    def remove_framebuffer(self, fb: FakeFramebuffer) -> None:
        if fb.id not in self.fbs:
            self.violations.append(f"RMFB of FB {fb.id}, which is not there")
            return
        if fb in self.busy_framebuffers():
            self.violations.append(f"RMFB of FB {fb.id} while the card scans it out or is about to "
                                   f"(the kernel disables the plane)")
        del self.fbs[fb.id]

    def busy_framebuffers(self) -> list[FakeFramebuffer]:
        return [s.fb for s in [*self.state.values(), *self.scanout.values()] if s is not None]

    def pixels(self, fb: FakeFramebuffer) -> bytes:
        return bytes(self.dumbs[fb.handle].map()[:])

    # -- commits (compositor.output builds its requests as FakeRequest(card): see fake_native_flip)
    def commit(self, req: FakeRequest, *, test_only: bool, allow_modeset: bool, nonblock: bool,
               event: bool, user_data: int) -> None:
        """An atomic commit, refused wherever the kernel would refuse it and where a driver would let
        a mistake through, else applied: a nonblocking one with an event lands at complete(), any
        other at once. It is logged, refused or not, unless it sets FB_ID on a plane that is off."""
        touched = self._touched(req)
        self.log.append(CommitRecord(test_only, allow_modeset, nonblock, event, user_data, dict(touched),
                                     dict(req.outputs), req.native))
        self._check_modeset(req, allow_modeset)
        self._check_planes(touched)
        if test_only:
            return
        crtcs = self._crtcs(req, touched)
        if nonblock:
            self._check_flip(crtcs)
        self.state.update(touched)
        for crtc, (_, mode) in req.outputs.items():
            self.modes[crtc] = mode
        if nonblock and event:
            for crtc in crtcs:
                self.in_flight[crtc] = (user_data, dict(touched))
        else:
            self._land(touched, crtcs, event, user_data)

    def _touched(self, req: FakeRequest) -> dict[int, PlaneState | None]:
        """Each plane the commit touches → its state after it: the planes it sets whole, and those
        whose FB_ID alone it changes (a flip), which must be on a CRTC already."""
        touched = dict(req.planes)
        for plane_id, fb in req.fbs.items():
            current = touched.get(plane_id, self.state.get(plane_id))
            if current is None:
                raise Rejected("DRM_IOCTL_MODE_ATOMIC", errno.EINVAL,
                               f"FB_ID on plane {plane_id} without CRTC")
            touched[plane_id] = replace(current, fb=fb)
        return touched

    @staticmethod
    def _check_modeset(req: FakeRequest, allow_modeset: bool) -> None:
        if req.outputs and not allow_modeset:
            raise Rejected("DRM_IOCTL_MODE_ATOMIC", errno.EINVAL, "a modeset without ALLOW_MODESET")

    def _check_planes(self, touched: dict[int, PlaneState | None]) -> None:
        """Every plane left on shows a framebuffer that is still there, in a configuration the
        `refuse_config` knob accepts."""
        for state in touched.values():
            if state is None:
                continue
            if state.fb.id not in self.fbs:
                self.violations.append(f"commit of FB {state.fb.id}, which was removed")
                raise Rejected("DRM_IOCTL_MODE_ATOMIC", errno.EINVAL, "no such framebuffer")
            reason = self.refuse_config(state)
            if reason:
                raise Rejected("DRM_IOCTL_MODE_ATOMIC", errno.EINVAL, f"fake: {reason}")

    def _crtcs(self, req: FakeRequest, touched: dict[int, PlaneState | None]) -> set[int]:
        """The CRTCs the commit involves: its outputs', and its planes' before and after it."""
        crtcs = {s.crtc_id for s in touched.values() if s is not None} | set(req.outputs)
        crtcs |= {s.crtc_id for p in touched if (s := self.state.get(p)) is not None}
        return crtcs

    def _check_flip(self, crtcs: set[int]) -> None:
        """A nonblocking commit: none of its CRTCs may have one in flight still, and the
        `fail_next_flip` knob fails it."""
        for crtc in crtcs:
            assert crtc not in self.in_flight, \
                f"second nonblocking commit on CRTC {crtc} before its event"
        if self.fail_next_flip:
            err, self.fail_next_flip = self.fail_next_flip, None
            raise kms_error("DRM_IOCTL_MODE_ATOMIC", err, "fake: injected")

    def _land(self, touched: dict[int, PlaneState | None], crtcs: set[int], event: bool,
              user_data: int) -> None:
        """A blocking commit (or one without an event) reaches the display engine at once."""
        # A blocking commit waits for the commit in flight first; that one's event still comes.
        for crtc in crtcs & set(self.in_flight):
            self.in_flight[crtc] = (self.in_flight[crtc][0], {})
        self.scanout.update(touched)
        if event:
            # It returns once its flip is done, so its event is already waiting to be read.
            for crtc in sorted(crtcs):
                self._sequence += 1
                self.events.append(FlipEvent(crtc, self._sequence, time.monotonic_ns(), user_data))

    def complete(self, crtc_id: int = CRTC) -> FlipEvent:
        """The flip of the commit in flight on crtc_id is done: its event."""
        user_data, states = self.in_flight.pop(crtc_id)
        self.scanout.update(states)
        self._sequence += 1
        return FlipEvent(crtc_id, self._sequence, time.monotonic_ns(), user_data)

    def nonblocking_commits(self) -> list[CommitRecord]:
        return [c for c in self.log if c.nonblock and not c.test_only]


class FakeNativeLib:
    """Stands in for compositor._native's lib: kms_flip goes through the card's fake atomic commit."""

    def kms_flip(self, fd: int, plane_id: int, fb_prop: int, fb_id: int, user_data: int) -> int:
        card = _CARDS[fd]
        plane = next(p for p in card.planes if p.id == plane_id)
        assert fb_prop == plane.prop("FB_ID").id
        fb = card.fbs.get(fb_id)
        if fb is None:
            card.violations.append(f"kms_flip to FB {fb_id}, which is not there")
            return -errno.ENOENT
        req = FakeRequest(card)
        req.native = True
        try:
            req.add(plane, "FB_ID", fb).commit(nonblock=True, event=True, user_data=user_data)
        except KmsError as exc:
            return -exc.errno
        return 0


@contextmanager
def flips_on_fake_cards() -> Iterator[None]:
    """While it lasts, compositor.output's flips and requests go to the fake cards: the native
    kms_flip to FakeNativeLib, and every AtomicRequest it builds is a FakeRequest."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(output, "lib", FakeNativeLib())
        mp.setattr(output, "AtomicRequest", FakeRequest)
        yield
