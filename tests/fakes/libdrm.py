"""libdrm as compositor.kms calls it, for host tests: one small display device kept in Python.

`installed(monkeypatch)` replaces `lib` (the cffi library of compositor._native) in every KMS module
with a FakeLib on a new FakeDevice, for the length of a `with` block. The real `ffi` stays, so the
structs handed to the KMS layer are real C structs with the headers' layout. The card's descriptor
is the read end of a real pipe, so non-blocking mode, poll() and close() are the kernel's own: a
flip event is one byte written to the pipe (and its record queued here), and a closed card shows as
a pipe without a reader.

The device: one virtual connector (EDID, two modes) on one encoder, one CRTC, a primary and an
overlay plane that report their formats in IN_FORMATS. Each function keeps libdrm's error convention
(-errno from the drmMode* ioctl wrappers, -1 and errno from drmIoctl-style calls, NULL and errno
from the getters), so the KMS layer's error handling runs as it does on a device.

It is stricter than any driver. What the kernel would refuse for a reason the KMS layer must handle
(a configuration the device cannot show, a busy CRTC, not being master) fails as the kernel fails.
What only a bug does — an unknown object or property id, a property the object does not have, a
blob or framebuffer used after it was destroyed, a handle closed twice, a struct freed twice or with
the wrong function, a call on a closed card — fails the same way and is also recorded in
`violations`. `leftovers()` lists whatever is still allocated (structs not freed, blobs,
framebuffers, buffer handles, the card's descriptor); `verify()` fails on either.
"""

from __future__ import annotations

import errno as E
import importlib
import itertools
import os
import pkgutil
import select
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

import compositor.kms
from compositor import _native
from compositor.formats import DRM_FORMAT_MOD_LINEAR, FORMATS, fourcc
from compositor.kms import Card
from compositor.kms.edid import build_edid
from compositor.kms.in_formats import build_in_formats

ffi: Any = _native.ffi
REAL_LIB: Any = _native.lib

I915_X_TILED = (1 << 56) | 1
XRGB8888, ARGB8888 = fourcc("XR24"), fourcc("AR24")
PRIMARY_FORMATS = {XRGB8888: [DRM_FORMAT_MOD_LINEAR, I915_X_TILED], ARGB8888: [DRM_FORMAT_MOD_LINEAR]}
OVERLAY_FORMATS = {ARGB8888: [DRM_FORMAT_MOD_LINEAR], XRGB8888: [DRM_FORMAT_MOD_LINEAR]}
EDID = build_edid("RHT", 0x1234, 7, name="Fake Monitor", year=2020)

DRM_MODE_OBJECT_FB = 0xFBFBFBFB      # not in native/build.py's declarations
CONNECTOR_VIRTUAL = 15
CONNECTOR_TYPE_NAMES = {CONNECTOR_VIRTUAL: b"Virtual"}
DRM_MODE_CONNECTED = 1
U32_MAX, I32_MIN, I32_MAX = (1 << 32) - 1, -(1 << 31), (1 << 31) - 1
MODE_SIZE = ffi.sizeof("drmModeModeInfo")
COMMIT_FLAGS = ("DRM_MODE_ATOMIC_TEST_ONLY", "DRM_MODE_ATOMIC_NONBLOCK", "DRM_MODE_ATOMIC_ALLOW_MODESET",
                "DRM_MODE_PAGE_FLIP_EVENT")
MODESET_PROPS = {"crtc": ("ACTIVE", "MODE_ID"), "connector": ("CRTC_ID",)}


@dataclass(frozen=True)
class FakeMode:
    """A mode as the connector lists it (the fields of drmModeModeInfo the device fills)."""

    name: str
    clock: int
    h: tuple[int, int, int, int]   # hdisplay, hsync_start, hsync_end, htotal
    v: tuple[int, int, int, int]   # vdisplay, vsync_start, vsync_end, vtotal
    vrefresh: int
    type: int


MODES = (
    FakeMode("1024x768", 65000, (1024, 1048, 1184, 1344), (768, 771, 777, 806), 60, (1 << 3) | (1 << 6)),
    FakeMode("800x600", 40000, (800, 840, 968, 1056), (600, 601, 605, 628), 60, 1 << 6),
)


class DrmErrno(Exception):
    """Raised inside the fake: the call fails with this errno, in the function's own convention."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


# How each function reports failure: "neg" returns -errno, "minus_one" sets errno and returns -1,
# "null" sets errno and returns NULL, "none" cannot fail.
CONVENTIONS = {
    **dict.fromkeys(("drmGetVersion", "drmModeGetResources", "drmModeGetConnector",
                     "drmModeGetConnectorCurrent", "drmModeGetEncoder", "drmModeGetCrtc",
                     "drmModeGetPlaneResources", "drmModeGetPlane", "drmModeObjectGetProperties",
                     "drmModeGetProperty", "drmModeGetPropertyBlob"), "null"),
    **dict.fromkeys(("drmGetCap", "drmSetClientCap", "drmSetMaster", "drmDropMaster", "drmPrimeHandleToFD",
                     "drmPrimeFDToHandle", "drmCloseBufferHandle"), "minus_one"),
    **dict.fromkeys(("drmModeCreatePropertyBlob", "drmModeDestroyPropertyBlob", "drmModeAddFB2",
                     "drmModeAddFB2WithModifiers", "drmModeRmFB", "drmModeDirtyFB", "drmModeCreateDumbBuffer",
                     "drmModeDestroyDumbBuffer", "kms_atomic_commit", "kms_flip", "kms_drain_events"), "neg"),
    **dict.fromkeys(("drmFreeVersion", "drmModeFreeResources", "drmModeFreeConnector", "drmModeFreeEncoder",
                     "drmModeFreeCrtc", "drmModeFreePlaneResources", "drmModeFreePlane",
                     "drmModeFreeObjectProperties", "drmModeFreeProperty", "drmModeFreePropertyBlob",
                     "drmModeGetConnectorTypeName", "drmIsMaster"), "none"),
}


# ---------------------------------------------------------------------------------------- objects

@dataclass(frozen=True)
class FakeProperty:
    id: int
    name: str
    flags: int
    enums: dict[str, int] = field(default_factory=dict)
    values: tuple[int, ...] = ()     # range: (min, max); object: (object type,)

    @property
    def immutable(self) -> bool:
        return bool(self.flags & REAL_LIB.DRM_MODE_PROP_IMMUTABLE)

    def misfit(self, value: int) -> str | None:
        """Why value is not one this property takes (None: it is)."""
        ext = self.flags & REAL_LIB.DRM_MODE_PROP_EXTENDED_TYPE
        if ext == REAL_LIB.DRM_MODE_PROP_SIGNED_RANGE:
            signed = value - (1 << 64) if value >= 1 << 63 else value
            lo, hi = self.values
            return None if lo <= signed <= hi else f"{signed} outside {lo}..{hi}"
        if self.flags & REAL_LIB.DRM_MODE_PROP_RANGE:
            lo, hi = self.values
            return None if lo <= value <= hi else f"{value} outside {lo}..{hi}"
        if self.flags & REAL_LIB.DRM_MODE_PROP_ENUM:
            return None if value in self.enums.values() else f"{value} is none of {self.enums}"
        return None


@dataclass
class FakeObject:
    """A connector, CRTC or plane: its id, type and property values by name (the committed state)."""

    id: int
    type: int
    kind: str
    values: dict[str, int]


@dataclass
class FakeFramebuffer:
    id: int
    width: int
    height: int
    format: int
    modifier: int | None   # None: added without modifiers (the driver's implicit layout)
    handles: tuple[int, ...]
    pitches: tuple[int, ...]


@dataclass
class FakeHandle:
    """A GEM handle of the card's file: a dumb buffer, or a dma-buf imported (key: its inode)."""

    handle: int
    origin: str
    key: tuple[int, int] | None = None


@dataclass(frozen=True)
class FakeCommit:
    """One kms_atomic_commit: its flags and what it set, as (object id, property name, value)."""

    flags: int
    items: tuple[tuple[int, str, int], ...]
    user_data: int
    error: int = 0   # the errno it failed with, 0 when it succeeded

    @property
    def test_only(self) -> bool:
        return bool(self.flags & REAL_LIB.DRM_MODE_ATOMIC_TEST_ONLY)


@dataclass(frozen=True)
class QueuedEvent:
    crtc_id: int
    sequence: int
    timestamp_ns: int
    user_data: int


# ----------------------------------------------------------------------------------------- device

class FakeDevice:
    """The device and the state of the one open file the Card holds. Tests configure it through its
    attributes (caps, master, refuse, fail()) and read what happened (calls, commits, violations)."""

    def __init__(self) -> None:
        self._ids = itertools.count(30)   # one id space for every object, as the kernel's idr
        self._handles = itertools.count(1)
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.violations: list[str] = []
        self.commits: list[FakeCommit] = []
        self.caps = {REAL_LIB.DRM_CAP_DUMB_BUFFER: 1, REAL_LIB.DRM_CAP_ADDFB2_MODIFIERS: 1,
                     REAL_LIB.DRM_CAP_PRIME: REAL_LIB.DRM_PRIME_CAP_IMPORT | REAL_LIB.DRM_PRIME_CAP_EXPORT,
                     REAL_LIB.DRM_CAP_CURSOR_WIDTH: 64, REAL_LIB.DRM_CAP_CURSOR_HEIGHT: 64}
        self.client_caps_known = {REAL_LIB.DRM_CLIENT_CAP_UNIVERSAL_PLANES, REAL_LIB.DRM_CLIENT_CAP_ATOMIC}
        self.client_caps: set[int] = set()
        self.master = True
        self.master_elsewhere = False     # another file holds master: drmSetMaster fails with EBUSY
        self.dirty_errno = E.ENOSYS       # what DirtyFB answers (a driver without the hook: ENOSYS)
        self.prime_import_errno = 0       # non-zero: PRIME import fails with it (a foreign buffer)
        # refuse(device, state) → why the driver refuses this configuration (EINVAL), or None;
        # `refusals` lists the reasons given, in order
        self.refuse: Callable[[FakeDevice, dict[int, dict[str, int]]], str | None] | None = None
        self.refusals: list[str] = []
        self._failures: dict[str, list[int]] = {}
        self.properties: dict[int, FakeProperty] = {}
        self.objects: dict[int, FakeObject] = {}
        self.blobs: dict[int, bytes] = {}
        self.client_blobs: set[int] = set()
        self.destroyed_blobs: set[int] = set()
        self.fbs: dict[int, FakeFramebuffer] = {}
        self.removed_fbs: set[int] = set()
        self.handles: dict[int, FakeHandle] = {}
        self.closed_handles: set[int] = set()
        self.busy: dict[int, tuple[bool, int]] = {}   # CRTC → (event wanted, user data) until vblank()
        self.events: list[QueuedEvent] = []
        self._sequence = 0
        self._lent: dict[int, tuple[str, list[Any]]] = {}   # address → (struct type, what keeps it alive)
        self._build()
        self.fd, self._event_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._event_w, False)
        self.card: Card | None = None
        self.fd_taken = False   # a Card took the descriptor (and closes it)

    # -- the device's objects
    def _prop(self, name: str, flags: int, enums: dict[str, int] | None = None,
              values: tuple[int, ...] = ()) -> str:
        if not any(p.name == name for p in self.properties.values()):
            prop = FakeProperty(next(self._ids), name, flags, enums or {}, values)
            self.properties[prop.id] = prop
        return name

    def _object(self, kind: str, obj_type: int, values: dict[str, int]) -> FakeObject:
        obj = FakeObject(next(self._ids), obj_type, kind, values)
        self.objects[obj.id] = obj
        return obj

    def _driver_blob(self, data: bytes) -> int:
        blob_id = next(self._ids)
        self.blobs[blob_id] = data
        return blob_id

    def _build(self) -> None:
        lib = REAL_LIB
        atomic, immutable = lib.DRM_MODE_PROP_ATOMIC, lib.DRM_MODE_PROP_IMMUTABLE
        blob, enum, rng = lib.DRM_MODE_PROP_BLOB, lib.DRM_MODE_PROP_ENUM, lib.DRM_MODE_PROP_RANGE
        obj, srange = lib.DRM_MODE_PROP_OBJECT, lib.DRM_MODE_PROP_SIGNED_RANGE
        self._prop("EDID", blob | immutable)
        self._prop("DPMS", enum, {"On": 0, "Standby": 1, "Suspend": 2, "Off": 3})
        self._prop("link-status", enum, {"Good": 0, "Bad": 1})
        self._prop("CRTC_ID", obj | atomic, values=(lib.DRM_MODE_OBJECT_CRTC,))
        self._prop("ACTIVE", rng | atomic, values=(0, 1))
        self._prop("MODE_ID", blob | atomic)
        self._prop("type", enum | immutable, {"Overlay": 0, "Primary": 1, "Cursor": 2})
        self._prop("FB_ID", obj | atomic, values=(DRM_MODE_OBJECT_FB,))
        for name in ("SRC_X", "SRC_Y", "SRC_W", "SRC_H"):
            self._prop(name, rng | atomic, values=(0, U32_MAX))
        for name in ("CRTC_X", "CRTC_Y"):
            self._prop(name, srange | atomic, values=(I32_MIN, I32_MAX))
        for name in ("CRTC_W", "CRTC_H"):
            self._prop(name, rng | atomic, values=(0, I32_MAX))
        self._prop("IN_FORMATS", blob | immutable)
        self._prop("zpos", rng, values=(0, 3))
        self.crtc = self._object("crtc", lib.DRM_MODE_OBJECT_CRTC, {"ACTIVE": 0, "MODE_ID": 0})
        self.encoder_id = next(self._ids)
        self.connector = self._object("connector", lib.DRM_MODE_OBJECT_CONNECTOR, {
            "EDID": self._driver_blob(EDID), "DPMS": 0, "link-status": 0, "CRTC_ID": 0})
        plane = {"FB_ID": 0, "CRTC_ID": 0, "SRC_X": 0, "SRC_Y": 0, "SRC_W": 0, "SRC_H": 0,
                 "CRTC_X": 0, "CRTC_Y": 0, "CRTC_W": 0, "CRTC_H": 0}
        self.primary = self._object("plane", lib.DRM_MODE_OBJECT_PLANE, {
            "type": 1, **plane, "IN_FORMATS": self._driver_blob(build_in_formats(PRIMARY_FORMATS))})
        self.overlay = self._object("plane", lib.DRM_MODE_OBJECT_PLANE, {
            "type": 0, **plane, "IN_FORMATS": self._driver_blob(build_in_formats(OVERLAY_FORMATS)),
            "zpos": 1})
        self.plane_formats = {self.primary.id: PRIMARY_FORMATS, self.overlay.id: OVERLAY_FORMATS}

    def new_id(self) -> int:
        return next(self._ids)

    def new_handle(self) -> int:
        return next(self._handles)

    def prop_id(self, name: str) -> int:
        return next(p.id for p in self.properties.values() if p.name == name)

    # -- the card's file
    def open_card(self, **kwargs: Any) -> Card:
        """A compositor.kms Card on this device (it owns the descriptor from then on)."""
        assert not self.fd_taken, "the fake device has one open file"
        self.fd_taken = True
        self.card = Card("/dev/dri/card0", fd=self.fd, **kwargs)
        return self.card

    @property
    def fd_open(self) -> bool:
        """Whether the card's descriptor is still open (a pipe whose read end is closed shows POLLERR)."""
        poller = select.poll()
        poller.register(self._event_w, select.POLLOUT)
        return not any(ev & select.POLLERR for _, ev in poller.poll(0))

    # -- what tests arrange and read
    def fail(self, name: str, err: int, times: int = 1) -> None:
        """The next `times` calls of `name` fail with err (in the function's convention)."""
        self._failures.setdefault(name, []).extend([err] * times)

    def calls_to(self, name: str) -> list[tuple[Any, ...]]:
        return [args for called, args in self.calls if called == name]

    def take_violations(self) -> list[str]:
        found, self.violations = self.violations, []
        return found

    def vblank(self) -> list[QueuedEvent]:
        """Every CRTC with a nonblocking commit in flight completes it; its event (if asked for) is
        queued and the card's descriptor turns readable."""
        done = []
        for crtc_id, (event, user_data) in sorted(self.busy.items()):
            if event:
                done.append(self.queue_event(crtc_id, user_data))
        self.busy.clear()
        return done

    def structs(self) -> list[str]:
        """The types of the structs handed out and not freed yet."""
        return [kind for kind, _ in self._lent.values()]

    def leftovers(self) -> list[str]:
        left = [f"{kind} at 0x{address:x} never freed" for address, (kind, _) in self._lent.items()]
        left += [f"property blob {b} never destroyed" for b in sorted(self.client_blobs)]
        left += [f"framebuffer {fb} never removed" for fb in sorted(self.fbs)]
        left += [f"GEM handle {h.handle} ({h.origin}) never closed" for h in self.handles.values()]
        if self.fd_taken and self.fd_open:
            left.append("the card's descriptor was never closed")
        return left

    def verify(self) -> None:
        problems = self.violations + self.leftovers()
        assert not problems, "libdrm misused:\n  " + "\n  ".join(problems)

    def close(self) -> None:
        """Release the fake's own end of the pipe (and the card's, when no Card ever took it)."""
        os.close(self._event_w)
        if not self.fd_taken:
            os.close(self.fd)

    # -- the machinery of every call
    def misuse(self, message: str, err: int) -> DrmErrno:
        self.violations.append(message)
        return DrmErrno(err)

    def injected(self, name: str) -> int | None:
        queue = self._failures.get(name)
        return queue.pop(0) if queue else None

    def check_fd(self, fd: int) -> None:
        if fd != self.fd or not self.fd_open:
            raise self.misuse(f"call on descriptor {fd}, which is not the card's open descriptor", E.EBADF)

    def lend(self, kind: str, struct: Any, *keep: Any) -> Any:
        self._lent[int(ffi.cast("uintptr_t", struct))] = (kind, [struct, *keep])
        return struct

    def take_back(self, kind: str, struct: Any) -> None:
        if struct == ffi.NULL:
            return
        address = int(ffi.cast("uintptr_t", struct))
        lent = self._lent.pop(address, None)
        if lent is None:
            self.violations.append(f"{kind} at 0x{address:x} freed, but it is not one handed out "
                                   f"(or it was freed already)")
        elif lent[0] != kind:
            self.violations.append(f"a {lent[0]} freed as a {kind}")

    def object(self, obj_id: int, what: str, obj_type: int | None = None) -> FakeObject:
        obj = self.objects.get(obj_id)
        if obj is None or (obj_type is not None and obj.type != obj_type):
            raise self.misuse(f"{what}: no object {obj_id}"
                              + (f" of type 0x{obj_type:x}" if obj_type is not None else ""), E.ENOENT)
        return obj

    def live_blob(self, blob_id: int, what: str) -> bytes:
        if blob_id in self.destroyed_blobs:
            raise self.misuse(f"{what}: blob {blob_id} used after it was destroyed", E.EINVAL)
        data = self.blobs.get(blob_id)
        if data is None:
            raise self.misuse(f"{what}: no blob {blob_id}", E.ENOENT)
        return data

    def live_fb(self, fb_id: int, what: str) -> FakeFramebuffer:
        if fb_id in self.removed_fbs:
            raise self.misuse(f"{what}: framebuffer {fb_id} used after RmFB", E.EINVAL)
        fb = self.fbs.get(fb_id)
        if fb is None:
            raise self.misuse(f"{what}: no framebuffer {fb_id}", E.ENOENT)
        return fb

    def queue_event(self, crtc_id: int, user_data: int) -> QueuedEvent:
        self._sequence += 1
        event = QueuedEvent(crtc_id, self._sequence, time.monotonic_ns(), user_data)
        self.events.append(event)
        os.write(self._event_w, b"e")
        return event


# ------------------------------------------------------------------------------------ the library

class FakeLib:
    """What the KMS layer sees as `lib`: libdrm's functions (and kms_helpers.c's) on a FakeDevice.
    Constants come from the real library; a function the fake does not implement is an error."""

    def __init__(self, device: FakeDevice) -> None:
        self._device = device
        self._impl = _Calls(device)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("DRM_"):
            return getattr(REAL_LIB, name)
        convention = CONVENTIONS.get(name)
        if convention is None:
            raise AttributeError(f"the fake libdrm has no {name} (tests/fakes/libdrm.py implements "
                                 f"the calls compositor.kms makes)")
        impl = getattr(self._impl, name)
        device = self._device

        def call(*args: Any) -> Any:
            device.calls.append((name, args))
            err = device.injected(name)
            try:
                if err is not None:
                    raise DrmErrno(err)
                return impl(*args)
            except DrmErrno as exc:
                return _failed(convention, exc.errno)

        return call


def _failed(convention: str, err: int) -> Any:
    if convention == "neg":
        return -err
    ffi.errno = err
    if convention == "minus_one":
        return -1
    if convention == "null":
        return ffi.NULL
    raise AssertionError(f"a call that cannot fail failed with {E.errorcode.get(err, err)}")


class _Calls:
    """The functions themselves, each raising DrmErrno where libdrm would fail."""

    def __init__(self, device: FakeDevice) -> None:
        self.d = device

    # -- version, caps, master
    def drmGetVersion(self, fd: int) -> Any:
        self.d.check_fd(fd)
        name, desc = ffi.new("char[]", b"fakedrm"), ffi.new("char[]", b"a fake for host tests")
        v = ffi.new("drmVersion *")
        v.version_major, v.name, v.name_len, v.desc, v.desc_len = 1, name, 7, desc, 21
        v.date, v.date_len = ffi.NULL, 0
        return self.d.lend("drmVersion", v, name, desc)

    def drmFreeVersion(self, v: Any) -> None:
        self.d.take_back("drmVersion", v)

    def drmGetCap(self, fd: int, cap: int, value: Any) -> int:
        self.d.check_fd(fd)
        if cap not in self.d.caps:
            raise DrmErrno(E.EINVAL)
        value[0] = self.d.caps[cap]
        return 0

    def drmSetClientCap(self, fd: int, cap: int, value: int) -> int:
        self.d.check_fd(fd)
        if cap not in self.d.client_caps_known or value not in (0, 1):
            raise DrmErrno(E.EINVAL)
        if value:
            self.d.client_caps.add(cap)
        else:
            self.d.client_caps.discard(cap)
        return 0

    def drmIsMaster(self, fd: int) -> int:
        return int(fd == self.d.fd and self.d.master)

    def drmSetMaster(self, fd: int) -> int:
        self.d.check_fd(fd)
        if self.d.master_elsewhere:
            raise DrmErrno(E.EBUSY)
        self.d.master = True
        return 0

    def drmDropMaster(self, fd: int) -> int:
        self.d.check_fd(fd)
        if not self.d.master:
            raise DrmErrno(E.EINVAL)
        self.d.master = False
        return 0

    # -- resources
    def drmModeGetResources(self, fd: int) -> Any:
        self.d.check_fd(fd)
        d = self.d
        crtcs = ffi.new("uint32_t[]", [d.crtc.id])
        connectors = ffi.new("uint32_t[]", [d.connector.id])
        encoders = ffi.new("uint32_t[]", [d.encoder_id])
        res = ffi.new("drmModeRes *")
        res.count_fbs, res.fbs = 0, ffi.NULL
        res.count_crtcs, res.crtcs = 1, crtcs
        res.count_connectors, res.connectors = 1, connectors
        res.count_encoders, res.encoders = 1, encoders
        res.min_width, res.max_width, res.min_height, res.max_height = 1, 8192, 1, 8192
        return d.lend("drmModeRes", res, crtcs, connectors, encoders)

    def drmModeFreeResources(self, res: Any) -> None:
        self.d.take_back("drmModeRes", res)

    def drmModeGetConnector(self, fd: int, connector_id: int) -> Any:
        self.d.check_fd(fd)
        self.d.object(connector_id, "drmModeGetConnector", REAL_LIB.DRM_MODE_OBJECT_CONNECTOR)
        modes = ffi.new("drmModeModeInfo[]", len(MODES))
        for slot, mode in zip(modes, MODES, strict=True):
            _fill_mode(slot, mode)
        encoders = ffi.new("uint32_t[]", [self.d.encoder_id])
        c = ffi.new("drmModeConnector *")
        c.connector_id, c.encoder_id = connector_id, self.d.encoder_id
        c.connector_type, c.connector_type_id = CONNECTOR_VIRTUAL, 1
        c.connection, c.mmWidth, c.mmHeight = DRM_MODE_CONNECTED, 300, 200
        c.count_modes, c.modes = len(MODES), modes
        c.count_props, c.props, c.prop_values = 0, ffi.NULL, ffi.NULL
        c.count_encoders, c.encoders = 1, encoders
        return self.d.lend("drmModeConnector", c, modes, encoders)

    drmModeGetConnectorCurrent = drmModeGetConnector

    def drmModeFreeConnector(self, c: Any) -> None:
        self.d.take_back("drmModeConnector", c)

    def drmModeGetConnectorTypeName(self, connector_type: int) -> Any:
        name = CONNECTOR_TYPE_NAMES.get(connector_type)
        return _STATIC_NAMES[name] if name is not None else ffi.NULL

    def drmModeGetEncoder(self, fd: int, encoder_id: int) -> Any:
        self.d.check_fd(fd)
        if encoder_id != self.d.encoder_id:
            raise self.d.misuse(f"drmModeGetEncoder: no encoder {encoder_id}", E.ENOENT)
        e = ffi.new("drmModeEncoder *")
        e.encoder_id, e.encoder_type, e.crtc_id = encoder_id, 5, self.d.connector.values["CRTC_ID"]
        e.possible_crtcs, e.possible_clones = 1, 0
        return self.d.lend("drmModeEncoder", e)

    def drmModeFreeEncoder(self, e: Any) -> None:
        self.d.take_back("drmModeEncoder", e)

    def drmModeGetCrtc(self, fd: int, crtc_id: int) -> Any:
        self.d.check_fd(fd)
        crtc = self.d.object(crtc_id, "drmModeGetCrtc", REAL_LIB.DRM_MODE_OBJECT_CRTC)
        c = ffi.new("drmModeCrtc *")
        c.crtc_id, c.buffer_id = crtc_id, self.d.primary.values["FB_ID"]
        mode_blob = crtc.values["MODE_ID"]
        if mode_blob:
            ffi.memmove(ffi.addressof(c, "mode"), self.d.blobs[mode_blob], MODE_SIZE)
            c.mode_valid = 1
        return self.d.lend("drmModeCrtc", c)

    def drmModeFreeCrtc(self, c: Any) -> None:
        self.d.take_back("drmModeCrtc", c)

    def drmModeGetPlaneResources(self, fd: int) -> Any:
        self.d.check_fd(fd)
        if REAL_LIB.DRM_CLIENT_CAP_UNIVERSAL_PLANES not in self.d.client_caps:
            raise self.d.misuse("planes listed without DRM_CLIENT_CAP_UNIVERSAL_PLANES (the primary "
                                "plane would be hidden)", E.EINVAL)
        planes = ffi.new("uint32_t[]", [self.d.primary.id, self.d.overlay.id])
        res = ffi.new("drmModePlaneRes *")
        res.count_planes, res.planes = 2, planes
        return self.d.lend("drmModePlaneRes", res, planes)

    def drmModeFreePlaneResources(self, res: Any) -> None:
        self.d.take_back("drmModePlaneRes", res)

    def drmModeGetPlane(self, fd: int, plane_id: int) -> Any:
        self.d.check_fd(fd)
        plane = self.d.object(plane_id, "drmModeGetPlane", REAL_LIB.DRM_MODE_OBJECT_PLANE)
        formats = ffi.new("uint32_t[]", list(self.d.plane_formats[plane_id]))
        p = ffi.new("drmModePlane *")
        p.count_formats, p.formats, p.plane_id = len(formats), formats, plane_id
        p.crtc_id, p.fb_id, p.possible_crtcs = plane.values["CRTC_ID"], plane.values["FB_ID"], 1
        return self.d.lend("drmModePlane", p, formats)

    def drmModeFreePlane(self, p: Any) -> None:
        self.d.take_back("drmModePlane", p)

    # -- properties and blobs
    def drmModeObjectGetProperties(self, fd: int, obj_id: int, obj_type: int) -> Any:
        self.d.check_fd(fd)
        obj = self.d.object(obj_id, "drmModeObjectGetProperties", obj_type)
        ids = ffi.new("uint32_t[]", [self.d.prop_id(name) for name in obj.values])
        values = ffi.new("uint64_t[]", list(obj.values.values()))
        op = ffi.new("drmModeObjectProperties *")
        op.count_props, op.props, op.prop_values = len(obj.values), ids, values
        return self.d.lend("drmModeObjectProperties", op, ids, values)

    def drmModeFreeObjectProperties(self, op: Any) -> None:
        self.d.take_back("drmModeObjectProperties", op)

    def drmModeGetProperty(self, fd: int, prop_id: int) -> Any:
        self.d.check_fd(fd)
        prop = self.d.properties.get(prop_id)
        if prop is None:
            raise self.d.misuse(f"drmModeGetProperty: no property {prop_id}", E.ENOENT)
        enums = ffi.new("struct drm_mode_property_enum[]", max(len(prop.enums), 1))
        for slot, (name, value) in zip(enums, prop.enums.items(), strict=False):
            slot.name, slot.value = name.encode(), value
        values = ffi.new("uint64_t[]", [v & ((1 << 64) - 1) for v in prop.values] or [0])
        p = ffi.new("drmModePropertyRes *")
        p.prop_id, p.flags, p.name = prop.id, prop.flags, prop.name.encode()
        p.count_values, p.values = len(prop.values), values
        p.count_enums, p.enums = len(prop.enums), enums
        p.count_blobs, p.blob_ids = 0, ffi.NULL
        return self.d.lend("drmModePropertyRes", p, enums, values)

    def drmModeFreeProperty(self, p: Any) -> None:
        self.d.take_back("drmModePropertyRes", p)

    def drmModeGetPropertyBlob(self, fd: int, blob_id: int) -> Any:
        self.d.check_fd(fd)
        data = self.d.live_blob(blob_id, "drmModeGetPropertyBlob")
        buf = ffi.new("char[]", data or b"\0")
        b = ffi.new("drmModePropertyBlobRes *")
        b.id, b.length, b.data = blob_id, len(data), buf
        return self.d.lend("drmModePropertyBlobRes", b, buf)

    def drmModeFreePropertyBlob(self, b: Any) -> None:
        self.d.take_back("drmModePropertyBlobRes", b)

    def drmModeCreatePropertyBlob(self, fd: int, data: Any, size: int, blob_id: Any) -> int:
        self.d.check_fd(fd)
        if not size:
            raise DrmErrno(E.EINVAL)
        new_id = self.d.new_id()
        self.d.blobs[new_id] = bytes(ffi.buffer(data, size))
        self.d.client_blobs.add(new_id)
        blob_id[0] = new_id
        return 0

    def drmModeDestroyPropertyBlob(self, fd: int, blob_id: int) -> int:
        self.d.check_fd(fd)
        self.d.live_blob(blob_id, "drmModeDestroyPropertyBlob")
        if blob_id not in self.d.client_blobs:
            raise self.d.misuse(f"drmModeDestroyPropertyBlob: blob {blob_id} is the driver's", E.EPERM)
        self.d.client_blobs.discard(blob_id)
        self.d.destroyed_blobs.add(blob_id)
        del self.d.blobs[blob_id]
        return 0

    # -- buffers
    def drmModeCreateDumbBuffer(self, fd: int, width: int, height: int, bpp: int, flags: int,
                                handle: Any, pitch: Any, size: Any) -> int:
        self.d.check_fd(fd)
        if flags or not (width and height) or bpp not in (8, 16, 24, 32):
            raise DrmErrno(E.EINVAL)
        row = -(-width * bpp // 8 // 64) * 64
        new = FakeHandle(self.d.new_handle(), "dumb")
        self.d.handles[new.handle] = new
        handle[0], pitch[0], size[0] = new.handle, row, row * height
        return 0

    def drmModeDestroyDumbBuffer(self, fd: int, handle: int) -> int:
        self.d.check_fd(fd)
        self._close_handle(handle, "drmModeDestroyDumbBuffer")
        return 0

    def _close_handle(self, handle: int, what: str) -> None:
        if handle not in self.d.handles:
            again = " again" if handle in self.d.closed_handles else ""
            raise self.d.misuse(f"{what}: handle {handle} closed{again}, but it is not open", E.EINVAL)
        del self.d.handles[handle]
        self.d.closed_handles.add(handle)

    def drmPrimeFDToHandle(self, fd: int, prime_fd: int, handle: Any) -> int:
        self.d.check_fd(fd)
        if self.d.prime_import_errno:
            raise DrmErrno(self.d.prime_import_errno)
        try:
            st = os.fstat(prime_fd)
        except OSError as exc:
            raise DrmErrno(exc.errno or E.EBADF) from None
        key = (st.st_dev, st.st_ino)
        # One handle per buffer and file however often it is imported, as the kernel does.
        found = next((h for h in self.d.handles.values() if h.key == key), None)
        if found is None:
            found = FakeHandle(self.d.new_handle(), "prime", key)
            self.d.handles[found.handle] = found
        handle[0] = found.handle
        return 0

    def drmPrimeHandleToFD(self, fd: int, handle: int, flags: int, prime_fd: Any) -> int:
        self.d.check_fd(fd)
        if flags & ~(REAL_LIB.DRM_CLOEXEC | REAL_LIB.DRM_RDWR):
            raise DrmErrno(E.EINVAL)
        if handle not in self.d.handles:
            raise self.d.misuse(f"drmPrimeHandleToFD: handle {handle} is not open", E.ENOENT)
        prime_fd[0] = os.memfd_create("fake-dmabuf", os.MFD_CLOEXEC)
        return 0

    def drmCloseBufferHandle(self, fd: int, handle: int) -> int:
        self.d.check_fd(fd)
        self._close_handle(handle, "drmCloseBufferHandle")
        return 0

    # -- framebuffers
    def drmModeAddFB2(self, fd: int, width: int, height: int, fmt: int, handles: Any, pitches: Any,
                      offsets: Any, fb_id: Any, flags: int) -> int:
        if flags:
            raise self.d.misuse(f"drmModeAddFB2 with flags 0x{flags:x} (modifiers go through "
                                f"drmModeAddFB2WithModifiers)", E.EINVAL)
        return self._add_fb(fd, width, height, fmt, handles, pitches, None, fb_id)

    def drmModeAddFB2WithModifiers(self, fd: int, width: int, height: int, fmt: int, handles: Any,
                                   pitches: Any, offsets: Any, modifiers: Any, fb_id: Any, flags: int) -> int:
        if flags != REAL_LIB.DRM_MODE_FB_MODIFIERS:
            raise self.d.misuse(f"drmModeAddFB2WithModifiers with flags 0x{flags:x}", E.EINVAL)
        if not self.d.caps.get(REAL_LIB.DRM_CAP_ADDFB2_MODIFIERS):
            raise DrmErrno(E.EINVAL)   # a driver without modifiers refuses the flag (virtio-gpu on 6.1)
        for i in range(1, 4):
            if modifiers[i] and not handles[i]:
                raise self.d.misuse(f"modifier for unused plane {i} of a framebuffer", E.EINVAL)
        mod = int(modifiers[0])
        if not any(mod in table.get(fmt, ()) for table in self.d.plane_formats.values()):
            raise DrmErrno(E.EINVAL)
        return self._add_fb(fd, width, height, fmt, handles, pitches, mod, fb_id)

    def _add_fb(self, fd: int, width: int, height: int, fmt: int, handles: Any, pitches: Any,
                modifier: int | None, fb_id: Any) -> int:
        self.d.check_fd(fd)
        if handles[0] not in self.d.handles:
            raise self.d.misuse(f"AddFB2 with handle {handles[0]}, which is not open", E.ENOENT)
        info = FORMATS.get(fmt)
        if info is None or not width or not height or pitches[0] < width * info.bpp // 8:
            raise DrmErrno(E.EINVAL)
        fb = FakeFramebuffer(self.d.new_id(), width, height, fmt, modifier,
                             tuple(handles[i] for i in range(4)), tuple(pitches[i] for i in range(4)))
        self.d.fbs[fb.id] = fb
        fb_id[0] = fb.id
        return 0

    def drmModeRmFB(self, fd: int, fb_id: int) -> int:
        self.d.check_fd(fd)
        self.d.live_fb(fb_id, "drmModeRmFB")
        shown = [o.id for o in self.d.objects.values() if o.kind == "plane" and o.values["FB_ID"] == fb_id]
        if shown:
            self.d.violations.append(f"RmFB of framebuffer {fb_id} while plane(s) {shown} show it "
                                     f"(the kernel turns them off)")
        del self.d.fbs[fb_id]
        self.d.removed_fbs.add(fb_id)
        return 0

    def drmModeDirtyFB(self, fd: int, fb_id: int, clips: Any, num_clips: int) -> int:
        self.d.check_fd(fd)
        self.d.live_fb(fb_id, "drmModeDirtyFB")
        if self.d.dirty_errno:
            raise DrmErrno(self.d.dirty_errno)
        return 0

    # -- commits and events
    def kms_atomic_commit(self, fd: int, n: int, objects: Any, properties: Any, values: Any,
                          flags: int, user_data: int) -> int:
        self.d.check_fd(fd)
        items = [(int(objects[i]), int(properties[i]), int(values[i])) for i in range(n)]
        try:
            named = _Commit(self.d, flags, user_data).run(items)
        except DrmErrno as exc:
            self.d.commits.append(FakeCommit(flags, tuple(self._names(items)), user_data, exc.errno))
            raise
        self.d.commits.append(FakeCommit(flags, tuple(named), user_data))
        return 0

    def _names(self, items: list[tuple[int, int, int]]) -> Iterator[tuple[int, str, int]]:
        for obj_id, prop_id, value in items:
            prop = self.d.properties.get(prop_id)
            yield obj_id, prop.name if prop else f"#{prop_id}", value

    def kms_flip(self, fd: int, plane_id: int, fb_prop_id: int, fb_id: int, user_data: int) -> int:
        flags = REAL_LIB.DRM_MODE_ATOMIC_NONBLOCK | REAL_LIB.DRM_MODE_PAGE_FLIP_EVENT
        return self.kms_atomic_commit(fd, 1, [plane_id], [fb_prop_id], [fb_id], flags, user_data)

    def kms_drain_events(self, fd: int, out: Any, max_events: int, dropped: Any) -> int:
        self.d.check_fd(fd)
        dropped[0] = 0
        try:
            ready = os.read(fd, max_events)
        except BlockingIOError:
            return 0
        for i in range(len(ready)):
            event = self.d.events.pop(0)
            out[i].crtc_id, out[i].sequence = event.crtc_id, event.sequence
            out[i].timestamp_ns, out[i].user_data = event.timestamp_ns, event.user_data
        return len(ready)


_STATIC_NAMES = {name: ffi.new("char[]", name) for name in CONNECTOR_TYPE_NAMES.values()}


def _fill_mode(slot: Any, mode: FakeMode) -> None:
    slot.clock, slot.vrefresh, slot.type, slot.flags = mode.clock, mode.vrefresh, mode.type, 0
    slot.hdisplay, slot.hsync_start, slot.hsync_end, slot.htotal = mode.h
    slot.vdisplay, slot.vsync_start, slot.vsync_end, slot.vtotal = mode.v
    slot.hskew = slot.vscan = 0
    slot.name = mode.name.encode()


class _Commit:
    """One atomic commit checked as the kernel's atomic check would, and more strictly."""

    def __init__(self, device: FakeDevice, flags: int, user_data: int) -> None:
        self.d = device
        self.flags = flags
        self.user_data = user_data
        self.state = {obj_id: dict(obj.values) for obj_id, obj in device.objects.items()}
        self.touched: set[int] = set()

    def flag(self, name: str) -> bool:
        return bool(self.flags & getattr(REAL_LIB, name))

    def run(self, items: list[tuple[int, int, int]]) -> list[tuple[int, str, int]]:
        self.check_flags()
        if REAL_LIB.DRM_CLIENT_CAP_ATOMIC not in self.d.client_caps:
            raise self.d.misuse("atomic commit without DRM_CLIENT_CAP_ATOMIC", E.EOPNOTSUPP)
        if not self.d.master:
            raise DrmErrno(E.EACCES)
        named = [self.set(*item) for item in items]
        crtcs = self.crtcs()
        self.check_modeset()
        for crtc_id in crtcs:
            self.check_crtc(crtc_id)
        for plane in (self.d.primary, self.d.overlay):
            self.check_plane(plane.id)
        reason = self.d.refuse(self.d, self.state) if self.d.refuse else None
        if reason:
            self.d.refusals.append(reason)
            raise DrmErrno(E.EINVAL)
        if not self.flag("DRM_MODE_ATOMIC_TEST_ONLY"):
            self.apply(crtcs)
        return named

    def check_flags(self) -> None:
        known = sum(getattr(REAL_LIB, name) for name in COMMIT_FLAGS)
        if self.flags & ~known:
            raise self.d.misuse(f"atomic commit with unknown flags 0x{self.flags & ~known:x}", E.EINVAL)
        if self.flag("DRM_MODE_ATOMIC_TEST_ONLY") and self.flag("DRM_MODE_PAGE_FLIP_EVENT"):
            raise self.d.misuse("TEST_ONLY commit asking for a flip event", E.EINVAL)

    def set(self, obj_id: int, prop_id: int, value: int) -> tuple[int, str, int]:
        obj = self.d.objects.get(obj_id)
        if obj is None or obj.kind not in ("connector", "crtc", "plane"):
            raise self.d.misuse(f"atomic commit names object {obj_id}, which does not exist", E.ENOENT)
        prop = self.d.properties.get(prop_id)
        if prop is None or prop.name not in obj.values:
            raise self.d.misuse(f"atomic commit sets property {prop_id} "
                                f"({prop.name if prop else 'unknown'}) of {obj.kind} {obj_id}, "
                                f"which has no such property", E.ENOENT)
        if prop.immutable:
            raise self.d.misuse(f"atomic commit sets immutable {prop.name} of {obj.kind} {obj_id}", E.EINVAL)
        self.check_value(prop, value)
        self.state[obj_id][prop.name] = value
        self.touched.add(obj_id)
        return obj_id, prop.name, value

    def check_value(self, prop: FakeProperty, value: int) -> None:
        what = f"atomic commit: {prop.name} = {value}"
        if prop.name in ("FB_ID", "WRITEBACK_FB_ID") and value:
            self.d.live_fb(value, what)
        elif prop.name == "CRTC_ID" and value:
            self.d.object(value, what, REAL_LIB.DRM_MODE_OBJECT_CRTC)
        elif prop.name == "MODE_ID" and value:
            if len(self.d.live_blob(value, what)) != MODE_SIZE:
                raise DrmErrno(E.EINVAL)
        elif prop.misfit(value):
            raise DrmErrno(E.EINVAL)

    def crtcs(self) -> set[int]:
        """The CRTCs the commit touches: its own, and those of its planes and connectors, old and new."""
        found = set()
        for obj_id in self.touched:
            obj = self.d.objects[obj_id]
            if obj.kind == "crtc":
                found.add(obj_id)
            else:
                found |= {obj.values["CRTC_ID"], self.state[obj_id]["CRTC_ID"]} - {0}
        return found

    def check_modeset(self) -> None:
        """A change of a CRTC's mode or activity, or of a connector's CRTC, needs ALLOW_MODESET."""
        if self.flag("DRM_MODE_ATOMIC_ALLOW_MODESET"):
            return
        for obj_id in self.touched:
            obj = self.d.objects[obj_id]
            if any(self.state[obj_id][name] != obj.values[name] for name in MODESET_PROPS.get(obj.kind, ())):
                raise DrmErrno(E.EINVAL)

    def check_crtc(self, crtc_id: int) -> None:
        crtc = self.state[crtc_id]
        if crtc["ACTIVE"] and not crtc["MODE_ID"]:
            raise DrmErrno(E.EINVAL)
        if self.flag("DRM_MODE_PAGE_FLIP_EVENT") and not crtc["ACTIVE"]:
            raise DrmErrno(E.EINVAL)
        if self.flag("DRM_MODE_ATOMIC_NONBLOCK") and not self.flag("DRM_MODE_ATOMIC_TEST_ONLY") \
                and crtc_id in self.d.busy:
            raise DrmErrno(E.EBUSY)

    def check_plane(self, plane_id: int) -> None:
        plane = self.state[plane_id]
        if bool(plane["FB_ID"]) != bool(plane["CRTC_ID"]):
            raise DrmErrno(E.EINVAL)
        if not plane["FB_ID"]:
            return
        if not self.state[plane["CRTC_ID"]]["MODE_ID"]:
            raise DrmErrno(E.EINVAL)
        fb = self.d.fbs[plane["FB_ID"]]
        mods = self.d.plane_formats[plane_id].get(fb.format)
        if mods is None or (fb.modifier is not None and fb.modifier not in mods):
            raise DrmErrno(E.EINVAL)
        right, bottom = (plane["SRC_X"] + plane["SRC_W"]) >> 16, (plane["SRC_Y"] + plane["SRC_H"]) >> 16
        if right > fb.width or bottom > fb.height:
            raise DrmErrno(E.ENOSPC)   # the source rectangle reaches past the framebuffer

    def apply(self, crtcs: set[int]) -> None:
        for obj_id, values in self.state.items():
            self.d.objects[obj_id].values = values
        event = self.flag("DRM_MODE_PAGE_FLIP_EVENT")
        for crtc_id in sorted(crtcs):
            if self.flag("DRM_MODE_ATOMIC_NONBLOCK"):
                self.d.busy[crtc_id] = (event, self.user_data)
            elif event:
                self.d.queue_event(crtc_id, self.user_data)


# --------------------------------------------------------------------------------------- install

@contextmanager
def installed(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDevice]:
    """A FakeDevice whose FakeLib is `lib` in every module of compositor.kms; at the end, the card is
    closed if a test left it open, and nothing may be misused or left allocated."""
    device = FakeDevice()
    fake = FakeLib(device)
    for info in pkgutil.iter_modules(compositor.kms.__path__):
        module = importlib.import_module(f"compositor.kms.{info.name}")
        if getattr(module, "lib", None) is REAL_LIB:
            monkeypatch.setattr(module, "lib", fake)
    try:
        yield device
        if device.card is not None and device.card.fd >= 0:
            device.violations.append("the test left the card open")
            device.card.close()
        device.verify()
    finally:
        device.close()
