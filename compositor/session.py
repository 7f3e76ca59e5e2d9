"""How the compositor holds the screens: its session.

A display server may commit to a card only while it is DRM master, and on a console it must give
the screens back when the user switches virtual terminals. Two ways to arrange that:

- **direct** (`DirectSession`): root on the bare console. Cards are opened here and master taken
  with DRM_IOCTL_SET_MASTER. With a VT (`--vt N`, or the VT on stdin) the VT is put in graphics mode
  (so the console does not draw over the planes) and in process mode (`VT_SETMODE`/`VT_PROCESS`):
  the kernel then asks before switching away (SIGUSR1) and says when the VT is ours again (SIGUSR2).
  On the first, the compositor stops committing, waits for the flips in flight, drops master and
  only then lets the switch happen (`VT_RELDISP 1`), so the console gets a card nobody commits to.
  On the second it takes master back and the daemon re-takes every output with a "reset the world"
  commit before restoring them.
- **logind** (`LogindSession`): inside a systemd-logind session (`$XDG_SESSION_ID`). logind owns
  the VT and master: `TakeControl`, then `TakeDevice` for each card hands over an fd that is master
  while the session is active. `PauseDevice` ("pause": stop, then `PauseDeviceComplete`; "force":
  master is gone already; "gone": the card was removed) and `ResumeDevice` drive the same daemon
  callbacks as the VT signals do.

The daemon gives two coroutines: `on_pause(card_path, reason)` returns once nothing is in flight on
that card and nothing more will be committed; `on_resume(card_path)` re-takes its outputs.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from compositor.kms import Card, DeviceError, KmsError

log = logging.getLogger(__name__)

# linux/vt.h and linux/kd.h
VT_GETMODE = 0x5601
VT_SETMODE = 0x5602
VT_GETSTATE = 0x5603
VT_RELDISP = 0x5605
VT_ACTIVATE = 0x5606
VT_AUTO, VT_PROCESS, VT_ACKACQ = 0, 1, 2
KDSETMODE = 0x4B3A
KDGETMODE = 0x4B3B
KD_TEXT, KD_GRAPHICS = 0, 1
TTY_MAJOR = 4          # /dev/ttyN, N in 1..63, are the virtual terminals
MAX_VT = 63
_VT_MODE = "bbhhh"     # struct vt_mode: mode, waitv, relsig, acqsig, frsig
_VT_STAT = "HHH"       # struct vt_stat: v_active, v_signal, v_state
ACQUIRE_TIMEOUT = 30.0  # seconds from VT_ACTIVATE to the acquire signal before giving up (a busy machine)

LOGIND = "org.freedesktop.login1"
LOGIND_PATH = "/org/freedesktop/login1"
MANAGER_IFACE = "org.freedesktop.login1.Manager"
SESSION_IFACE = "org.freedesktop.login1.Session"

PauseCallback = Callable[[str, str], Awaitable[None]]
ResumeCallback = Callable[[str], Awaitable[None]]


class SessionError(Exception):
    """The session cannot be set up (no such VT, no logind session, ...): the message says why."""


class MasterTaken(DeviceError):
    """Another process is DRM master of a card: another display server owns it."""


# ------------------------------------------------------------------------------------- VT helpers

def vt_of_fd(fd: int) -> int | None:
    """The VT number if `fd` is a virtual terminal (/dev/ttyN), else None."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    if not stat.S_ISCHR(st.st_mode) or os.major(st.st_rdev) != TTY_MAJOR:
        return None
    minor = os.minor(st.st_rdev)
    return minor if 1 <= minor <= MAX_VT else None


def active_vt() -> int:
    """The foreground VT, from sysfs (needs no open tty)."""
    with open("/sys/class/tty/tty0/active") as f:
        return int(f.read().strip().removeprefix("tty"))


def activate_vt(number: int, wait: bool = True, timeout: float = 60.0) -> None:
    """Switch the console to VT `number` (what `chvt` does); wait for the switch unless told not to.

    The wait is bounded: a switch away from a VT in VT_PROCESS mode needs its owner's consent, and an
    owner that never gives it would hold the kernel's VT_WAITACTIVE for ever, so the active VT is polled
    instead. TimeoutError names the VT in front."""
    fd = os.open("/dev/tty0", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, VT_ACTIVATE, number)
    finally:
        os.close(fd)
    if wait:
        wait_for_vt(number, timeout)


def wait_for_vt(number: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (current := active_vt()) != number:
        if time.monotonic() > deadline:
            raise TimeoutError(f"VT {number} did not come to the front within {timeout:.0f} s "
                               f"(VT {current} is; its owner may not have released it)")
        time.sleep(0.01)


def resolve_vt(spec: str) -> int | None:
    """`--vt`: a number, `none`, or `auto` (the VT on stdin, if stdin is one)."""
    if spec == "none":
        return None
    if spec == "auto":
        return vt_of_fd(0)
    try:
        number = int(spec)
    except ValueError:
        raise SessionError(f"--vt must be a VT number, `auto` or `none`, not {spec!r}") from None
    if not 1 <= number <= MAX_VT:
        raise SessionError(f"--vt {number}: VTs are numbered 1..{MAX_VT}")
    return number


class VirtualTerminal:
    """One VT held in graphics and process mode; restored to text and auto mode on close."""

    def __init__(self, number: int) -> None:
        self.number = number
        path = f"/dev/tty{number}"
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            raise SessionError(f"cannot open {path} ({exc.strerror}): VT handling needs root on a "
                               f"machine with virtual terminals (or run with --vt none)") from None
        try:
            self._saved_kd = struct.unpack("i", fcntl.ioctl(self.fd, KDGETMODE, b"\0" * 4))[0]
        except OSError as exc:
            os.close(self.fd)
            raise SessionError(f"{path} is not a virtual terminal ({exc.strerror})") from None
        self.held = False

    def hold(self, relsig: int, acqsig: int) -> None:
        """Graphics mode (the console stops drawing) and process mode (switches ask us first)."""
        fcntl.ioctl(self.fd, KDSETMODE, KD_GRAPHICS)
        fcntl.ioctl(self.fd, VT_SETMODE, struct.pack(_VT_MODE, VT_PROCESS, 0, relsig, acqsig, 0))
        self.held = True

    @property
    def active(self) -> bool:
        v_active = struct.unpack(_VT_STAT, fcntl.ioctl(self.fd, VT_GETSTATE, b"\0" * 6))[0]
        return v_active == self.number

    def activate(self, timeout: float = 60.0) -> None:
        fcntl.ioctl(self.fd, VT_ACTIVATE, self.number)
        wait_for_vt(self.number, timeout)

    def release(self) -> None:
        """Let a pending switch away happen."""
        fcntl.ioctl(self.fd, VT_RELDISP, 1)

    def acknowledge(self) -> None:
        fcntl.ioctl(self.fd, VT_RELDISP, VT_ACKACQ)

    def close(self) -> None:
        if self.fd < 0:
            return
        if self.held:
            try:
                fcntl.ioctl(self.fd, VT_SETMODE, struct.pack(_VT_MODE, VT_AUTO, 0, 0, 0, 0))
                fcntl.ioctl(self.fd, KDSETMODE, KD_TEXT if self._saved_kd == KD_GRAPHICS else self._saved_kd)
            except OSError as exc:
                log.error("tty%d: restoring text mode failed: %s", self.number, exc)
        os.close(self.fd)
        self.fd = -1


# ---------------------------------------------------------------------------------------- sessions

class Session:
    """What the daemon needs from a session; see the module docstring."""

    kind = "none"

    def __init__(self) -> None:
        self.cards: dict[str, Card] = {}
        self.paused: dict[str, str] = {}     # card path → why it may not be committed to now
        self.on_pause: PauseCallback | None = None
        self.on_resume: ResumeCallback | None = None
        self.switches = 0                   # pauses and resumes seen, for status
        self._lock = asyncio.Lock()         # one pause or resume at a time

    async def start(self) -> None:
        """Connect (logind) or take the VT (direct). Cards are opened afterwards with open_card."""

    async def open_card(self, path: str) -> Card:
        """Open the display card at `path` for this session; paused at once when the session is not in
        front. Raises DeviceError (not a display card), MasterTaken, or SessionError."""
        raise NotImplementedError

    async def activate(self) -> None:
        """After the cards are open and the daemon is ready: take the screens (switch to our VT)."""

    async def take_input(self, path: str) -> int:
        """A non-blocking descriptor of the input device at `path`, opened the session's way."""
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)

    async def release_input(self, path: str, fd: int) -> None:
        try:
            os.close(fd)
        except OSError:
            pass

    async def switch_vt(self, number: int) -> None:
        """Ctrl+Alt+Fn: bring VT `number` to the front."""
        raise SessionError("this session does not switch VTs")

    async def close(self) -> None:
        for card in self.cards.values():
            card.close()
        self.cards.clear()

    def status(self) -> dict[str, Any]:
        return {"kind": self.kind, "paused": dict(self.paused), "switches": self.switches}

    @staticmethod
    def _open(path: str, fd: int | None = None) -> Card:
        card = Card(path, writeback="try", fd=fd)
        if not card.crtcs or not card.planes:
            card.close()
            raise DeviceError(f"{path} ({card.driver}): no CRTCs or planes, not a display card")
        return card

    async def _pause(self, path: str, reason: str) -> None:
        self.paused[path] = reason
        self.switches += 1
        log.info("%s: paused (%s)", path, reason)
        if self.on_pause is not None:
            await self.on_pause(path, reason)

    async def _resume(self, path: str) -> None:
        self.paused.pop(path, None)
        self.switches += 1
        log.info("%s: resumed", path)
        if self.on_resume is not None:
            await self.on_resume(path)


class DirectSession(Session):
    """Root on the console: master by ioctl, VT switches by signal (when `vt` is given)."""

    kind = "direct"

    def __init__(self, vt: int | None) -> None:
        super().__init__()
        self.vt_number = vt
        self.vt: VirtualTerminal | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._acquired = asyncio.Event()   # set while the VT is ours (after the acquire signal)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.vt_number is None:
            log.info("no VT: VT switches are not handled (direct session)")
            return
        self.vt = VirtualTerminal(self.vt_number)
        self._loop.add_signal_handler(signal.SIGUSR1, self._signalled, "release")
        self._loop.add_signal_handler(signal.SIGUSR2, self._signalled, "acquire")
        try:
            self.vt.hold(signal.SIGUSR1, signal.SIGUSR2)
        except OSError as exc:
            raise SessionError(f"tty{self.vt_number}: cannot take the VT ({exc.strerror})") from None

    async def open_card(self, path: str) -> Card:
        card = self._open(path)
        if self.vt is not None and not self.vt.active:
            # Not our turn yet: take master when the VT is switched to (activate() does that). The
            # kernel makes the first opener of a card master; give that back so the console that is
            # in the foreground keeps its screen until the switch.
            try:
                card.drop_master()
            except KmsError:
                pass
            self.paused[path] = f"VT {self.vt_number} is not in the foreground"
            self.cards[path] = card
            return card
        try:
            card.become_master()
        except KmsError as exc:
            card.close()
            raise MasterTaken(f"{path}: cannot become DRM master ({exc}); is another display server "
                              f"running on it?") from None
        self.cards[path] = card
        return card

    async def activate(self) -> None:
        if self.vt is None or self.vt.active:
            return
        log.info("switching to VT %d", self.vt_number)
        try:
            await asyncio.to_thread(self.vt.activate, ACQUIRE_TIMEOUT)
        except TimeoutError as exc:
            raise SessionError(f"switching to tty{self.vt_number}: {exc}") from None
        # The kernel signals the acquisition (SIGUSR2); the cards are lit once that is handled.
        try:
            await asyncio.wait_for(self._acquired.wait(), ACQUIRE_TIMEOUT)
        except TimeoutError:
            raise SessionError(f"tty{self.vt_number} is in the foreground but its acquire signal did not "
                               f"come within {ACQUIRE_TIMEOUT:.0f} s") from None

    async def switch_vt(self, number: int) -> None:
        if self.vt is None:
            raise SessionError("no VT is held (--vt none): VT switches are the console's")
        await asyncio.to_thread(activate_vt, number, False)

    def _signalled(self, what: str) -> None:
        assert self._loop is not None
        self._loop.create_task(self._switch(what))

    async def _switch(self, what: str) -> None:
        async with self._lock:
            vt = self.vt
            if vt is None:
                return
            if what == "release":
                self._acquired.clear()
                for path, card in self.cards.items():
                    if path in self.paused:
                        continue
                    await self._pause(path, f"VT {self.vt_number} switched away")
                    try:
                        card.drop_master()
                    except KmsError as exc:
                        log.error("%s: dropping master failed: %s", path, exc)
                try:
                    vt.release()
                except OSError as exc:
                    log.error("tty%d: releasing the VT failed: %s", self.vt_number, exc)
                return
            try:
                vt.acknowledge()
            except OSError as exc:  # EINVAL when the kernel did not wait for it; harmless
                log.debug("tty%d: VT_RELDISP VT_ACKACQ: %s", self.vt_number, exc)
            for path, card in self.cards.items():
                if path not in self.paused:
                    continue
                try:
                    card.become_master()
                except KmsError as exc:
                    log.error("%s: VT %d is back but master is not: %s", path, self.vt_number, exc)
                    self.paused[path] = f"not DRM master: {exc}"
                    continue
                await self._resume(path)
            self._acquired.set()

    async def close(self) -> None:
        for card in self.cards.values():
            try:
                card.drop_master()
            except KmsError:
                pass
        await super().close()
        if self.vt is not None:
            if self._loop is not None:
                self._loop.remove_signal_handler(signal.SIGUSR1)
                self._loop.remove_signal_handler(signal.SIGUSR2)
            self.vt.close()
            self.vt = None

    def status(self) -> dict[str, Any]:
        return {**super().status(), "vt": self.vt_number}


class LogindSession(Session):
    """A systemd-logind session: devices and pauses come from logind over the system bus.

    logind holds DRM master for the session. `TakeDevice` opens the card in logind and hands over a
    descriptor of that open file; logind makes the file master while the session is in front and drops
    master when it is not, so a card taken while the session is in the background comes back inactive
    (paused here until logind resumes it). On a switch away (another VT, or another session on a seat
    without VTs) logind drops master and then sends `PauseDevice` "force"; "pause", which asks first
    and waits for `PauseDeviceComplete`, is answered once nothing is in flight, though logind (252)
    does not send it to a session being switched away from. On a switch back logind sets master again
    and sends `ResumeDevice` with another descriptor of the same open file, which is closed: ours is
    master again already. Both signals are sent to the session's controller alone, and are accepted
    only from logind itself (its unique name on the bus). `activate` asks logind to bring the session
    to the front (on seat0 that switches to its VT), as the direct session switches to its VT.
    """

    kind = "logind"
    CALL_TIMEOUT = 10.0   # seconds for logind to answer a call

    def __init__(self, session_id: str | None = None) -> None:
        super().__init__()
        self.session_id = session_id if session_id is not None else os.environ.get("XDG_SESSION_ID")
        self.session_path: str | None = None
        self.bus = None
        self.logind_owner: str | None = None             # logind's unique bus name
        self.devices: dict[tuple[int, int], str] = {}   # (major, minor) → card path
        self.inputs: dict[tuple[int, int], str] = {}    # (major, minor) → input device path
        # logind revokes input devices on a switch away and hands new descriptors on the way back
        self.on_input_pause: Callable[[str], None] | None = None
        self.on_input_resume: Callable[[str, int], None] | None = None
        self.active: bool | None = None
        self._front = asyncio.Event()                    # set while no card is paused
        self._tasks: set[asyncio.Task] = set()
        self._closing = False

    async def _call(self, path: str, interface: str, member: str, signature: str = "", body=(),
                    destination: str = LOGIND):
        from dbus_fast import Message, MessageType

        if self.bus is None:
            raise SessionError(f"logind {member}: not connected to the system bus")
        try:
            reply = await asyncio.wait_for(
                self.bus.call(Message(destination=destination, path=path, interface=interface,
                                      member=member, signature=signature, body=list(body))),
                self.CALL_TIMEOUT)
        except TimeoutError:
            raise SessionError(f"logind {member}: no answer within {self.CALL_TIMEOUT:.0f} s") from None
        except Exception as exc:  # dbus-fast's own errors when the bus went away
            raise SessionError(f"logind {member}: {exc}") from None
        if reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply.body else ""
            raise SessionError(f"logind {member}: {reply.error_name}: {detail}")
        return reply

    async def start(self) -> None:
        from dbus_fast import BusType
        from dbus_fast.aio import MessageBus

        try:
            self.bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
        except Exception as exc:  # OSError, or dbus-fast's errors for auth failures
            raise SessionError(f"cannot reach the system bus for logind ({exc})") from None
        try:
            reply = await self._call("/org/freedesktop/DBus", "org.freedesktop.DBus", "GetNameOwner", "s",
                                     [LOGIND], destination="org.freedesktop.DBus")
        except SessionError:
            raise SessionError(f"systemd-logind is not running ({LOGIND} has no owner on the system bus); "
                               f"use --session direct") from None
        self.logind_owner = reply.body[0]
        if self.session_id:
            reply = await self._call(LOGIND_PATH, MANAGER_IFACE, "GetSession", "s", [self.session_id])
        else:
            try:
                reply = await self._call(LOGIND_PATH, MANAGER_IFACE, "GetSessionByPID", "u", [os.getpid()])
            except SessionError as exc:
                raise SessionError(f"not in a logind session ({exc}); run from a login session, set "
                                   f"XDG_SESSION_ID, or use --session direct") from None
        self.session_path = reply.body[0]
        if not self.session_id:
            self.session_id = str(await self._property("Id"))
        # PauseDevice and ResumeDevice are sent to the controller alone and arrive without a match;
        # the match is for the session's PropertiesChanged (Active).
        await self._call("/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s",
                         [f"type='signal',sender='{LOGIND}',path='{self.session_path}'"],
                         destination="org.freedesktop.DBus")
        self.bus.add_message_handler(self._message)
        await self._call(self.session_path, SESSION_IFACE, "TakeControl", "b", [False])
        self.active = bool(await self._property("Active"))
        log.info("logind session %s (%s): control taken, %s", self.session_id, self.session_path,
                 "in front" if self.active else "in the background")

    async def _property(self, name: str):
        reply = await self._call(self.session_path, "org.freedesktop.DBus.Properties", "Get", "ss",
                                 [SESSION_IFACE, name])
        return reply.body[0].value

    def _update_front(self) -> None:
        if self.paused:
            self._front.clear()
        else:
            self._front.set()

    async def open_card(self, path: str) -> Card:
        """The card at `path` from logind (TakeDevice); paused at once if the session is not in front."""
        st = os.stat(path)
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        reply = await self._call(self.session_path, SESSION_IFACE, "TakeDevice", "uu", [major, minor])
        fd = reply.unix_fds[reply.body[0]]
        inactive = bool(reply.body[1])
        for extra in reply.unix_fds:
            if extra != fd:
                os.close(extra)
        os.set_inheritable(fd, False)   # descriptors received over the bus are not close-on-exec
        try:
            card = self._open(path, fd=fd)
        except (DeviceError, KmsError):
            await self._release_device(major, minor)
            raise
        self.devices[(major, minor)] = path
        self.cards[path] = card
        if inactive:
            self.paused[path] = "the logind session is not in front"
        self._update_front()
        return card

    async def take_input(self, path: str) -> int:
        st = os.stat(path)
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        reply = await self._call(self.session_path, SESSION_IFACE, "TakeDevice", "uu", [major, minor])
        fd = reply.unix_fds[reply.body[0]]
        for extra in reply.unix_fds:
            if extra != fd:
                os.close(extra)
        os.set_inheritable(fd, False)
        os.set_blocking(fd, False)
        self.inputs[(major, minor)] = path
        return fd

    async def release_input(self, path: str, fd: int) -> None:
        await super().release_input(path, fd)
        for key, p in list(self.inputs.items()):
            if p == path:
                del self.inputs[key]
                if not self._closing:
                    await self._release_device(*key)

    async def switch_vt(self, number: int) -> None:
        reply = await self._call(self.session_path, "org.freedesktop.DBus.Properties", "Get", "ss",
                                 [SESSION_IFACE, "Seat"])
        seat_path = reply.body[0].value[1]
        await self._call(seat_path, "org.freedesktop.login1.Seat", "SwitchTo", "u", [number])

    async def activate(self) -> None:
        """Bring the session to the front (logind switches to its VT) and wait until logind has resumed
        every card."""
        if not self.paused:
            return
        if not await self._property("Active"):
            log.info("asking logind to bring session %s to the front", self.session_id)
            await self._call(self.session_path, SESSION_IFACE, "Activate")
        try:
            await asyncio.wait_for(self._front.wait(), ACQUIRE_TIMEOUT)
        except TimeoutError:
            raise SessionError(f"session {self.session_id} was activated but logind did not resume "
                               f"{', '.join(sorted(self.paused))} within {ACQUIRE_TIMEOUT:.0f} s") from None

    async def _release_device(self, major: int, minor: int) -> None:
        try:
            await self._call(self.session_path, SESSION_IFACE, "ReleaseDevice", "uu", [major, minor])
        except SessionError as exc:
            log.debug("%s", exc)

    def _message(self, msg) -> bool:
        from dbus_fast import MessageType

        if msg.message_type != MessageType.SIGNAL or msg.path != self.session_path:
            return False
        if msg.sender != self.logind_owner:
            for fd in msg.unix_fds:
                os.close(fd)
            return False
        if msg.interface == SESSION_IFACE and msg.member in ("PauseDevice", "ResumeDevice") and \
                (msg.body[0], msg.body[1]) in self.inputs:
            self._input_signal(msg)
        elif msg.interface == SESSION_IFACE and msg.member in ("PauseDevice", "ResumeDevice"):
            # ResumeDevice's descriptor refers to the open file we hold already (see the class doc).
            for fd in msg.unix_fds:
                os.close(fd)
            if not self._closing:   # releasing a device makes logind say "gone": not news then
                self._spawn(self._device_signal(msg.member, list(msg.body)))
        elif (msg.interface == "org.freedesktop.DBus.Properties" and msg.member == "PropertiesChanged"
              and msg.body[0] == SESSION_IFACE):
            if "Active" in msg.body[1]:
                self.active = bool(msg.body[1]["Active"].value)
            elif "Active" in msg.body[2]:
                self._spawn(self._refresh_active())
        return False

    def _input_signal(self, msg) -> None:
        """An input device paused (logind revoked our descriptor) or resumed (with a new one)."""
        path = self.inputs[(msg.body[0], msg.body[1])]
        if msg.member == "ResumeDevice":
            fds = list(msg.unix_fds)
            fd = fds[msg.body[2]] if isinstance(msg.body[2], int) and msg.body[2] < len(fds) else None
            for extra in fds:
                if extra != fd:
                    os.close(extra)
            if fd is None:
                log.error("%s: logind resumed it without a descriptor", path)
                return
            os.set_inheritable(fd, False)
            os.set_blocking(fd, False)
            if self.on_input_resume is not None and not self._closing:
                self.on_input_resume(path, fd)
            else:
                os.close(fd)
            return
        for fd in msg.unix_fds:
            os.close(fd)
        if self.on_input_pause is not None and not self._closing:
            self.on_input_pause(path)
        if msg.body[2] == "pause":
            self._spawn(self._pause_complete(msg.body[0], msg.body[1]))

    async def _pause_complete(self, major: int, minor: int) -> None:
        try:
            await self._call(self.session_path, SESSION_IFACE, "PauseDeviceComplete", "uu", [major, minor])
        except SessionError as exc:
            log.error("%s", exc)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh_active(self) -> None:
        try:
            self.active = bool(await self._property("Active"))
        except SessionError as exc:
            log.debug("%s", exc)

    async def _device_signal(self, member: str, body: list) -> None:
        async with self._lock:
            major, minor = body[0], body[1]
            path = self.devices.get((major, minor))
            if member == "ResumeDevice":
                if path is None or path not in self.paused:
                    return
                card = self.cards.get(path)
                if card is not None and not card.is_master:
                    log.error("%s: logind resumed it but the descriptor is not DRM master", path)
                    self.paused[path] = "logind resumed the card without DRM master"
                    return
                await self._resume(path)
                self._update_front()
                return
            kind = body[2]
            if path is not None:
                reason = ("the card was removed" if kind == "gone"
                          else f"logind paused the card ({kind}): the session is not in front")
                if path not in self.paused:
                    await self._pause(path, reason)
                else:
                    self.paused[path] = reason
                self._update_front()
            if kind == "pause":
                # logind waits for this before it drops master: nothing is in flight any more.
                try:
                    await self._call(self.session_path, SESSION_IFACE, "PauseDeviceComplete", "uu",
                                     [major, minor])
                except SessionError as exc:
                    log.error("%s", exc)

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        if self.bus is not None and self.session_path is not None:
            for major, minor in list(self.devices):
                await self._release_device(major, minor)
        self.devices.clear()
        await super().close()
        if self.bus is not None:
            if self.session_path is not None:
                try:   # logind puts the VT back in text mode
                    await self._call(self.session_path, SESSION_IFACE, "ReleaseControl")
                except SessionError as exc:
                    log.debug("%s", exc)
            self.bus.disconnect()
            self.bus = None

    def status(self) -> dict[str, Any]:
        return {**super().status(), "session_id": self.session_id, "session_path": self.session_path,
                "active": self.active}


def make_session(kind: str, vt: str) -> Session:
    """`--session auto|direct|logind` and `--vt`: auto means logind when $XDG_SESSION_ID is set."""
    if kind == "auto":
        kind = "logind" if os.environ.get("XDG_SESSION_ID") else "direct"
    if kind == "logind":
        if vt not in ("auto", "none"):
            raise SessionError("--vt is for direct sessions: under logind the session's VT is logind's")
        return LogindSession()
    if kind == "direct":
        return DirectSession(resolve_vt(vt))
    raise SessionError(f"--session must be auto, direct or logind, not {kind!r}")
