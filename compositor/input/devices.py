"""The evdev devices of a seat: found and followed with udev, opened through the session, read on the loop.

Which devices: keyboards, mice, tablets and touchscreens (udev's `ID_INPUT_KEYBOARD`, `_MOUSE`,
`_TABLET`, `_TOUCHSCREEN`; touchpads are not taken yet) of this compositor's logind seat (`ID_SEAT`,
seat0 when unset; every seat when the daemon runs without `--seat`). Power buttons and other
key-only devices are left to logind. Where udev has no record of a device (no udevd), its
capabilities decide.

Which policy seat gets a device (`seat_for`): the first seat whose `input` list matches the device's
`ID_PATH` or name; else the first seat without `input` that lists the device's logind seat in
`logind`; else the first seat with neither `input` nor `logind`. A policy without seats has one
implicit seat of all its monitors, which takes every device.

How they are opened: in a direct session, `open()` + `EVIOCGRAB`, so the text console under us no
longer sees the keys; a VT switch away ungrabs them (the console gets its keyboard back) and the
switch back grabs them again. In a logind session, `TakeDevice`, and logind revokes and restores them
with the session.

A device is read on the event loop when readable, at most READ_BATCH events a wakeup, and with a
budget of EVENT_BUDGET events a second: past it, motion is dropped (logged once) but keys and
buttons still pass, so a flooding device can neither starve the flips nor leave a key stuck.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from evdev import _input as evdev_io  # the fd-level ioctls and reads python-evdev's classes use
from evdev import ecodes

from compositor.input.router import SeatRouter
from compositor.policy import Seat

log = logging.getLogger("directflip.input")

# Touchpads are not taken: their absolute contacts are finger motion, not positions on a screen, and
# turning them into relative motion is not done yet; the laptop's own session keeps them.
KINDS = ("keyboard", "mouse", "tablet", "touchscreen")
UDEV_KINDS = (*KINDS, "touchpad")
# The uinput devices any directflip makes for a launched vGPU guest (compositor.input.uinput): never
# seat input, whichever instance made them, or keys would go round to another seat's guest.
OWN_DEVICE = re.compile(r"^directflip .+ (keyboard|tablet)$")
DEFAULT_SEAT = "seat0"
IMPLICIT_SEAT = "default"  # the one seat of a policy without `seats`
READ_BATCH = 512
EVENT_BUDGET = 20000  # events a second per device: an 8 kHz gaming mouse sends ~24000 at full speed
_KEEP_OVER_BUDGET = (ecodes.EV_KEY, ecodes.EV_SYN)
Event = tuple[int, int, int]  # type, code, value


@dataclass(frozen=True)
class DeviceInfo:
    path: str  # /dev/input/eventN
    name: str
    id_path: str | None
    seat: str  # logind seat
    kinds: frozenset[str]

    def describe(self) -> str:
        return f"{self.path} ({self.name}; {', '.join(sorted(self.kinds)) or 'no input kind'})"


def kinds_from_udev(props: Mapping[str, str]) -> frozenset[str] | None:
    """The input kinds udev gave a device, or None when udev has not classified it."""
    if props.get("ID_INPUT") != "1":
        return None
    return frozenset(k for k in UDEV_KINDS if props.get(f"ID_INPUT_{k.upper()}") == "1")


def kinds_from_capabilities(caps: Mapping[int, Sequence[Any]]) -> frozenset[str]:
    """What a device is from its evdev capabilities, as udev's input_id builtin decides it (roughly)."""
    keys = set(caps.get(ecodes.EV_KEY, ()))
    rel = set(caps.get(ecodes.EV_REL, ()))
    absolute = {a[0] if isinstance(a, tuple) else a for a in caps.get(ecodes.EV_ABS, ())}
    out = set()
    if {ecodes.KEY_A, ecodes.KEY_Z, ecodes.KEY_SPACE} <= keys:
        out.add("keyboard")
    if {ecodes.REL_X, ecodes.REL_Y} <= rel and ecodes.BTN_LEFT in keys:
        out.add("mouse")
    if {ecodes.ABS_MT_POSITION_X, ecodes.ABS_MT_POSITION_Y} <= absolute:
        out.add("touchpad" if ecodes.BTN_TOOL_FINGER in keys and ecodes.BTN_TOUCH not in keys
                else "touchscreen")
    elif {ecodes.ABS_X, ecodes.ABS_Y} <= absolute:
        if ecodes.BTN_TOUCH in keys and ecodes.BTN_TOOL_PEN not in keys and ecodes.BTN_LEFT not in keys:
            out.add("touchscreen")
        else:
            out.add("tablet")
    return frozenset(out)


def seat_for(info: DeviceInfo, seats: Sequence[Seat]) -> str | None:
    """The policy seat that takes this device (see the module docstring), or None."""
    if not seats:
        return IMPLICIT_SEAT
    for s in seats:
        if any(m.matches(info.id_path, info.name) for m in s.input):
            return s.name
    for s in seats:
        if not s.input and info.seat in s.logind:
            return s.name
    for s in seats:
        if not s.input and not s.logind:
            return s.name
    return None


@dataclass(eq=False)
class OpenDevice:
    info: DeviceInfo
    fd: int
    ident: int
    seat: str
    grabbed: bool = False
    events: int = 0
    dropped: int = 0
    budget: float = EVENT_BUDGET
    budget_at: float = field(default_factory=time.monotonic)
    flooding: bool = False
    revoked: bool = False  # logind took it back; a new descriptor comes with ResumeDevice
    abs_ranges: dict[int, tuple[int, int]] = field(default_factory=dict)

    def abs_range(self, code: int) -> tuple[int, int] | None:
        if code not in self.abs_ranges:
            try:
                _value, lo, hi, *_ = evdev_io.ioctl_EVIOCGABS(self.fd, code)
                self.abs_ranges[code] = (lo, hi)
            except OSError:
                return None
        return self.abs_ranges[code]


class SeatDevices:
    """Every input device this compositor takes, each fed to the router of its policy seat.

    `take(path)` opens a device the session's way and returns its fd (the session decides: `open`, or
    logind's `TakeDevice`); `give_back(path, fd)` ends that. `router_of(seat)` is the policy seat's
    SeatRouter (None while it has none), which gets the events.
    """

    def __init__(self, *, logind_seat: str | None, grab: bool,
                 take: Callable[[str], Any], give_back: Callable[[str, int], Any],
                 router_of: Callable[[str], SeatRouter | None]) -> None:
        self.logind_seat = logind_seat
        self.grab = grab  # direct sessions grab; logind's revoke does the same job there
        self.take = take
        self.give_back = give_back
        self.router_of = router_of
        self.seats: tuple[Seat, ...] = ()
        self.devices: dict[str, OpenDevice] = {}
        self.ignored: dict[str, str] = {}  # path → why it is not taken
        self.paused = False
        self.route_ns: deque[int] = deque(maxlen=4000)
        # the names of the uinput devices directflip made for guests: never taken as seat input,
        # or the seat's keys would come back round to the focused guest
        self.own_names: set[str] = set()
        self._next_ident = 1
        self._monitor = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()

    def deliver(self, dev: OpenDevice, batch: list[tuple[int, int, int]]) -> None:
        router = self.router_of(dev.seat)
        if router is not None and batch:
            router.handle(dev.ident, batch, abs_range=dev.abs_range)

    def gone(self, seat: str, ident: int) -> None:
        router = self.router_of(seat)
        if router is not None:
            router.device_gone(ident)

    # --- finding devices --------------------------------------------------------------------------

    def _info(self, device) -> DeviceInfo | None:
        """A pyudev Device → DeviceInfo, None for what is not an event device."""
        node = device.device_node
        if not node or not device.sys_name.startswith("event"):
            return None
        props = device.properties
        parent = device.parent
        name = (parent.properties.get("NAME", "") if parent is not None else "").strip('"') or device.sys_name
        kinds = kinds_from_udev(props)
        if kinds is None:
            kinds = self._probe_kinds(node)
        return DeviceInfo(node, name, props.get("ID_PATH"), props.get("ID_SEAT") or DEFAULT_SEAT, kinds)

    @staticmethod
    def _probe_kinds(node: str) -> frozenset[str]:
        try:
            fd = os.open(node, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return frozenset()
        try:
            return kinds_from_capabilities(evdev_io.ioctl_capabilities(fd))
        except OSError:
            return frozenset()
        finally:
            os.close(fd)

    def _wanted(self, info: DeviceInfo) -> str | None:
        """Why the device is not taken, or None when it is."""
        if info.name in self.own_names or OWN_DEVICE.match(info.name):
            return "directflip's own device for a guest's VM"
        if info.kinds == {"touchpad"}:
            return "a touchpad (not taken: the guest would get finger positions, not pointer motion)"
        if not info.kinds & set(KINDS):
            return "not a keyboard, mouse, tablet or touch device"
        if self.logind_seat is not None and info.seat != self.logind_seat:
            return f"on logind seat {info.seat}"
        if seat_for(info, self.seats) is None:
            return "no policy seat takes it (see the seats' `input` and `logind`)"
        return None

    async def start(self, seats: Sequence[Seat]) -> None:
        import pyudev

        self._loop = asyncio.get_running_loop()
        self.seats = tuple(seats)
        ctx = pyudev.Context()
        # udevd's events carry ID_INPUT_* and ID_SEAT; without udevd (a bare test VM), the kernel's.
        source = "udev" if os.path.exists("/run/udev/control") else "kernel"
        try:
            self._monitor = pyudev.Monitor.from_netlink(ctx, source=source)
            self._monitor.filter_by("input")
            self._monitor.start()
            self._loop.add_reader(self._monitor.fileno(), self._udev_events)
        except OSError as exc:
            log.error("input hotplug is not followed: no udev monitor (%s)", exc)
            self._monitor = None
        for device in ctx.list_devices(subsystem="input"):
            info = self._info(device)
            if info is not None:
                await self._add(info)

    def set_seats(self, seats: Sequence[Seat]) -> None:
        """A policy edit: devices move to the seat that now takes them."""
        self.seats = tuple(seats)
        for path, why in list(self.ignored.items()):  # a new seat may take what no seat took before
            if why.startswith("no policy seat"):
                self._rescan(path)
        for dev in list(self.devices.values()):
            target = seat_for(dev.info, self.seats)
            if target != dev.seat:
                self.gone(dev.seat, dev.ident)
                if target is None:
                    self._spawn(self._remove(dev.info.path, "no policy seat takes it any more"))
                else:
                    log.info("%s: now seat %s (was %s)", dev.info.describe(), target, dev.seat)
                    dev.seat = target

    def _rescan(self, path: str) -> None:
        import pyudev

        try:
            device = pyudev.Devices.from_device_file(pyudev.Context(), path)
        except (pyudev.DeviceNotFoundError, OSError, ValueError):
            self.ignored.pop(path, None)
            return
        info = self._info(device)
        if info is not None:
            self._spawn(self._add(info))

    def _spawn(self, coro) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _udev_events(self) -> None:
        assert self._monitor is not None
        for _ in range(64):  # a burst is handled in slices, so flips are not held up behind it
            device = self._monitor.poll(timeout=0)
            if device is None:
                return
            node = device.device_node
            if device.action == "remove" and node in self.devices:
                self._spawn(self._remove(node, "unplugged"))
            elif device.action in ("add", "change") and node and node not in self.devices:
                info = self._info(device)
                if info is not None:
                    self._spawn(self._add(info))

    async def _add(self, info: DeviceInfo) -> None:
        why = self._wanted(info)
        if why is not None:
            if self.ignored.get(info.path) != why:
                log.debug("%s: not taken: %s", info.describe(), why)
            self.ignored[info.path] = why
            return
        if info.path in self.devices:
            return
        seat = seat_for(info, self.seats)
        assert seat is not None
        try:
            fd = await self.take(info.path)
        except Exception as exc:  # OSError from open(), SessionError from logind
            self.ignored[info.path] = f"cannot open: {exc}"
            log.error("%s: cannot take it: %s", info.describe(), exc)
            return
        if info.path in self.devices:  # taken twice by racing add events
            await self.give_back(info.path, fd)
            return
        self.ignored.pop(info.path, None)
        dev = OpenDevice(info, fd, self._next_ident, seat)
        self._next_ident += 1
        self.devices[info.path] = dev
        if not self.paused and self._seat_grabbed(seat):
            self._grab(dev)
        assert self._loop is not None
        self._loop.add_reader(fd, self._readable, dev)
        log.info("%s: seat %s", info.describe(), seat)

    async def _remove(self, path: str, why: str) -> None:
        dev = self.devices.pop(path, None)
        if dev is None:
            return
        self._close(dev)
        log.info("%s: %s", dev.info.describe(), why)
        await self.give_back(path, dev.fd)

    def _close(self, dev: OpenDevice) -> None:
        if self._loop is not None and not dev.revoked:
            self._loop.remove_reader(dev.fd)
        self.gone(dev.seat, dev.ident)

    def _seat_grabbed(self, seat: str) -> bool:
        router = self.router_of(seat)
        return router is None or router.grabbed

    def _grab(self, dev: OpenDevice) -> None:
        if not self.grab or dev.grabbed:
            return
        try:
            evdev_io.ioctl_EVIOCGRAB(dev.fd, 1)
            dev.grabbed = True
        except OSError as exc:  # EBUSY: someone else grabbed it (another compositor, a VMM)
            log.error("%s: cannot grab it (%s): the text console still sees its keys",
                      dev.info.describe(), os.strerror(exc.errno) if exc.errno else exc)

    def _ungrab(self, dev: OpenDevice) -> None:
        if not dev.grabbed:
            return
        try:
            evdev_io.ioctl_EVIOCGRAB(dev.fd, 0)
        except OSError as exc:
            log.debug("%s: ungrab: %s", dev.info.path, exc)
        dev.grabbed = False

    # --- pause and resume (VT switches, release-input) -------------------------------------------

    def pause(self, why: str) -> None:
        """Stop sending input anywhere and let go of the grabs (the console gets the keyboard)."""
        if self.paused:
            return
        self.paused = True
        for dev in self.devices.values():
            self.gone(dev.seat, dev.ident)  # releases what the guests hold
            self._ungrab(dev)
        log.info("input paused: %s", why)

    def resume(self) -> None:
        if not self.paused:
            return
        self.paused = False
        for dev in self.devices.values():
            self._drain(dev)  # what was typed at the console is not the guest's
            if self._seat_grabbed(dev.seat):  # a seat let go with release-input stays let go
                self._grab(dev)
        log.info("input resumed")

    def suspend_device(self, path: str) -> None:
        """logind revoked the device (the session left the front): stop reading it until replace_fd."""
        dev = self.devices.get(path)
        if dev is None or dev.revoked:
            return
        dev.revoked = True
        if self._loop is not None:
            self._loop.remove_reader(dev.fd)
        self.gone(dev.seat, dev.ident)

    def replace_fd(self, path: str, fd: int) -> None:
        """logind resumed a device with a new descriptor (the old one was revoked)."""
        dev = self.devices.get(path)
        if dev is None:
            os.close(fd)
            return
        if self._loop is not None and not dev.revoked:
            self._loop.remove_reader(dev.fd)
        os.close(dev.fd)
        dev.fd = fd
        dev.revoked = False
        dev.abs_ranges.clear()
        if self._loop is not None:
            self._loop.add_reader(fd, self._readable, dev)

    @staticmethod
    def _drain(dev: OpenDevice) -> None:
        for _ in range(64):
            try:
                if not evdev_io.device_read_many(dev.fd):
                    return
            except OSError:
                return

    # --- reading ----------------------------------------------------------------------------------

    def _readable(self, dev: OpenDevice) -> None:
        t0 = time.monotonic_ns()
        batch: list[tuple[int, int, int]] = []
        try:
            while len(batch) < READ_BATCH:
                raw = evdev_io.device_read_many(dev.fd)
                if not raw:
                    break
                batch.extend((t, c, v) for _s, _u, t, c, v in raw)
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno in (errno.ENODEV, errno.EIO, errno.EBADF):  # unplugged, or revoked by logind
                self.suspend_device(dev.info.path)
                if not os.path.exists(dev.info.path):
                    self._spawn(self._remove(dev.info.path, "gone (ENODEV)"))
                return
            log.error("%s: read failed: %s", dev.info.describe(), exc)
            return
        if not batch or self.paused:
            return
        batch = self._within_budget(dev, batch)
        dev.events += len(batch)
        if any(t == ecodes.EV_SYN and c == ecodes.SYN_DROPPED for t, c, _ in batch):
            self._resync(dev, batch)
        else:
            self.deliver(dev, batch)
        # read → every call to the guests made: the compositor's own part of input latency
        self.route_ns.append(time.monotonic_ns() - t0)

    def _within_budget(self, dev: OpenDevice, batch: list[Event]) -> list[Event]:
        now = time.monotonic()
        dev.budget = min(EVENT_BUDGET, dev.budget + (now - dev.budget_at) * EVENT_BUDGET)
        dev.budget_at = now
        if dev.budget >= len(batch):
            dev.budget -= len(batch)
            if dev.flooding and dev.budget > EVENT_BUDGET / 2:
                dev.flooding = False
                log.info("%s: back under %d events/s (%d dropped)", dev.info.describe(), EVENT_BUDGET,
                         dev.dropped)
            return batch
        kept = [ev for ev in batch if ev[0] in _KEEP_OVER_BUDGET]
        dev.dropped += len(batch) - len(kept)
        dev.budget = max(0.0, dev.budget - len(kept))
        if not dev.flooding:
            dev.flooding = True
            log.warning("%s: more than %d events/s: dropping its motion (keys and buttons still pass)",
                        dev.info.describe(), EVENT_BUDGET)
        return kept

    def _resync(self, dev: OpenDevice, batch: list[tuple[int, int, int]]) -> None:
        """SYN_DROPPED: the kernel's buffer overflowed. Events up to it are good; after it, until the
        next SYN_REPORT, they are not; held keys are what EVIOCGKEY says."""
        cut = next(i for i, (t, c, _) in enumerate(batch) if t == ecodes.EV_SYN and c == ecodes.SYN_DROPPED)
        self.deliver(dev, batch[:cut])
        rest = batch[cut + 1:]
        end = next((i for i, (t, c, _) in enumerate(rest) if t == ecodes.EV_SYN and c == ecodes.SYN_REPORT),
                   None)
        try:
            down = set(evdev_io.ioctl_EVIOCG_bits(dev.fd, ecodes.EV_KEY))
        except OSError:
            down = set()
        router = self.router_of(dev.seat)
        if router is not None:
            router.device_keys(dev.ident, down)
        if end is not None:
            self.deliver(dev, rest[end + 1:])

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._monitor is not None and self._loop is not None:
            self._loop.remove_reader(self._monitor.fileno())
        for path in list(self.devices):
            await self._remove(path, "closed")

    def status(self) -> list[dict[str, Any]]:
        out = [{"path": d.info.path, "name": d.info.name, "id_path": d.info.id_path, "seat": d.seat,
                "logind_seat": d.info.seat, "kinds": sorted(d.info.kinds), "grabbed": d.grabbed,
                "events": d.events, "dropped": d.dropped} for d in self.devices.values()]
        out += [{"path": p, "ignored": why} for p, why in sorted(self.ignored.items())
                if not why.startswith("not a keyboard")]
        return out

