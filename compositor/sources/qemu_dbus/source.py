"""One console of one QEMU VM as a guest source (`QemuDisplaySource`): connecting and reconnecting
to QEMU's display, the listener calls' work (scanouts, updates, the cursor), the buffers it hands the
daemon and the pixel surface it keeps."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import mmap
import os
import socket
import struct
import time
import uuid as uuid_mod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from dbus_fast import DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from compositor import fdguard
from compositor.formats import FORMATS
from compositor.sources import SourceDefaults
from compositor.sources.frame import (
    MAX_CURSOR,
    BadPlane,
    Buffer,
    Cursor,
    PlaneInfo,
    Pointer,
    dmabuf_size,
)
from compositor.sources.framesocket import Peer
from compositor.sources.libvirt_domain import (
    PAUSED_STATE,
    RUNNING_STATES,
    DomainError,
    LibvirtDomain,
    state_text,
)
from compositor.sources.qemu_dbus.bus import (
    CALL_TIMEOUT,
    CONSOLE_IFACE,
    ERROR_FAILED,
    ERROR_INVALID,
    ERROR_UNSUPPORTED,
    KEYBOARD_IFACE,
    LISTENER_PATH,
    MOUSE_IFACE,
    MULTITOUCH_IFACE,
    PROPERTIES_IFACE,
    VM_IFACE,
    VM_PATH,
    DisplayBus,
    PeerBus,
    console_path,
    describe_error,
    retrieve_exception,
    variant_value,
)
from compositor.sources.qemu_dbus.handler import QemuDisplayHandler, QemuFrame
from compositor.sources.qemu_dbus.input import QemuInput
from compositor.sources.qemu_dbus.listener import ListenerInterface, ListenerMapInterface
from compositor.sources.qemu_dbus.surface import (
    HeldUpdate,
    Scanout,
    Surface,
    UnsupportedFormat,
    pixman_to_fourcc,
)
from compositor.sources.qemu_target import QemuTarget
from compositor.stats import percentile

log = logging.getLogger("directflip.qemu_dbus")

MAX_KEPT_BUFFERS = 4  # dma-bufs / maps not scanned out lately are handed back beyond this many
MAX_HELD_UPDATE_BYTES = 64 << 20  # pixel updates held while a resize's size is asked for
LATENCY_WINDOW = 4096  # reply latencies kept per method


@dataclass
class DisplayStats:
    """Counters of one source, and how long the replies QEMU waits for took (ns, from the handler's
    start to the reply being handed to the connection's writer)."""

    calls: dict[str, int] = field(default_factory=dict)  # listener method → calls
    frames: int = 0
    pixel_bytes: int = 0  # bytes of pixels that came over the socket (Scanout / Update)
    errors: int = 0  # calls answered with an error
    ignored: int = 0  # calls that had nothing to act on (an update with no scanout)
    connects: int = 0
    resizes: int = 0  # times the guest was told its monitor's size (SetUIInfo answered)
    replies: dict[str, deque[int]] = field(default_factory=dict)

    def count(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1

    def reply(self, method: str, ns: int) -> None:
        window = self.replies.get(method)
        if window is None:
            window = self.replies[method] = deque(maxlen=LATENCY_WINDOW)
        window.append(ns)

    def reply_us(self, method: str, q: float = 0.5) -> float | None:
        value = percentile(self.replies.get(method, ()), q)
        return None if value is None else value / 1000

    def as_dict(self) -> dict[str, Any]:
        return {"calls": dict(self.calls), "frames": self.frames, "pixel_bytes": self.pixel_bytes,
                "errors": self.errors, "ignored": self.ignored, "connects": self.connects,
                "resizes": self.resizes,
                "reply_us": {m: {"p50": self.reply_us(m, 0.5), "p99": self.reply_us(m, 0.99),
                                 "n": len(w)} for m, w in self.replies.items()}}


class QemuDisplaySource(SourceDefaults):
    """One console of one QEMU VM as a guest source.

    The daemon-facing side looks like the other sources' (a frame-socket GuestConnection, a VfioGuest):
    `name`, `uuid`, `peer`, `buffers`, `closed`, `released()`, `presented()`, `close()`; frames and
    events go to `handler` (QemuDisplayHandler). `cursor` / `pointer` hold the guest's pointer for a
    cursor plane; `stats` and `status()` what happened."""

    kind = "qemu-dbus"

    def __init__(self, name: str, target: QemuTarget, handler: QemuDisplayHandler, *,
                 uuid: str | None = None, offer_map: bool = True, retry_initial: float = 0.25,
                 retry_max: float = 5.0, users: frozenset[int] | None = None, resize: bool = True) -> None:
        self.name = name
        # Tell the guest its monitor's size (Console.SetUIInfo), so it can take that resolution.
        self.resize = resize
        self.ui_size: tuple[int, int, int, int] | None = None  # width, height, width_mm, height_mm
        self._told_size: tuple[int, int, int, int] | None = None
        # Who QEMU's process may run as (the guest rule's `users`; default root and the compositor's
        # user): whoever else serves the QMP socket or owns QEMU's bus name is not taken for the VM.
        self.users = users if users is not None else frozenset({0, os.getuid()})
        self.target = target
        self.handler = handler
        self.uuid = uuid
        self.offer_map = offer_map  # list Unix.Map in the listener's Interfaces
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.kind = "libvirt" if target.libvirt is not None else "qemu-dbus"
        # A libvirt domain: libvirt hands out its display and says when its state changes.
        self.domain = LibvirtDomain(*target.libvirt) if target.libvirt is not None else None
        self._wake = asyncio.Event()  # cut a wait between attempts short (the domain started)
        self._blanked_for: str | None = None  # the state the slate shows while the VM is away or paused
        self.peer: Peer | None = None  # QEMU's process, once connected peer to peer
        self.buffers: dict[int, Buffer] = {}
        self.closed = False
        self.state = "idle"  # idle | connecting | connected | waiting | closed
        self.last_error: str | None = None
        # Whether the last failed attempt found no VM at all (not started yet, stopped): that is the
        # normal wait, where a VM that answers but whose display cannot be used needs someone to look.
        self.vm_absent = False
        self.vm_name: str | None = None
        self.vm_uuid: str | None = None
        self.console_label: str | None = None
        self.cursor: Cursor | None = None
        self.pointer: Pointer | None = None
        self.stats = DisplayStats()
        self.connected = asyncio.Event()  # set while a listener is registered
        self.input = QemuInput(self)  # the guest's InputSink: keyboard, mouse, touch to this console
        self._scanout: Scanout | None = None
        self._surface: Surface | None = None
        self._console_size: tuple[int, int] | None = None
        self._held: list[HeldUpdate] = []
        self._held_bytes = 0
        self._size_query: asyncio.Task | None = None
        self._identity: dict[tuple, int] = {}  # (dev, ino, offset, layout) → buffer id
        self._order: list[int] = []  # buffer ids, least recently scanned out first
        self._next_id = 1
        self._seq = 0
        self._cursor_serial = 0
        self._main: MessageBus | None = None
        self._listener: PeerBus | None = None
        self._dest: str | None = None
        self._task: asyncio.Task | None = None
        self._handed = target.sock  # a handed-over socket serves one connection
        self._told_bottom_up = False
        self._generation = 0  # of the listener connection; calls from an older one are stale

    def __repr__(self) -> str:
        return f"<QemuDisplaySource {self.name} ({self.target.describe()}) {self.state}>"

    # --- the daemon's side ---------------------------------------------------------------------------

    def start(self) -> asyncio.Task:
        """Connect (and keep reconnecting) on the running loop."""
        if self._task is None:
            if self.domain is not None:
                self.domain.start(self._domain_changed)
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"qemu-dbus {self.name}")
        return self._task

    def show_size(self, size: tuple[int, int, int, int] | None) -> None:
        """The monitor the guest is shown on (pixels and millimetres), or None: nothing to tell."""
        self.ui_size = size
        self._tell_size()

    def _tell_size(self) -> None:
        size = self.ui_size
        if size is None or size == self._told_size or self._main is None or not self.connected.is_set():
            return
        self._told_size = size
        width, height, width_mm, height_mm = size
        msg = Message(destination=self._dest, path=console_path(self.target.console), interface=CONSOLE_IFACE,
                      member="SetUIInfo", signature="qqiiuu",
                      body=[min(width_mm, 0xFFFF), min(height_mm, 0xFFFF), 0, 0, width, height])
        task = asyncio.get_running_loop().create_task(self._call_main(msg))
        task.add_done_callback(partial(self._told, size))

    def _told(self, size: tuple[int, int, int, int], task: asyncio.Task) -> None:
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.warning("%s: telling the guest its monitor's size %dx%d failed: %s", self.name, size[0],
                        size[1], describe_error(exc))
        else:
            log.info("%s: told the guest its monitor is %dx%d (%dx%d mm)", self.name, *size)
            self.stats.resizes += 1

    def released(self, buffer_id: int) -> None:  # QEMU has no release: its buffers stay its own
        pass

    def presented(self, buffer_id: int, frame: int, timestamp_ns: int, sequence: int) -> None:
        pass

    # --- compositor.sources.Source (SourceDefaults for the rest: the source outlives its guest's
    # comings and goings, as it reconnects to the VM, so letting go of the guest frees nothing of it)

    def guest_status(self) -> dict[str, Any]:
        return {"qemu": self.status()}

    def close(self, reason: str = "closed") -> None:
        """Stop for good: disconnect, and hand every buffer to the handler through on_close."""
        if self.closed:
            return
        self.closed = True
        self.state = "closed"
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        self._disconnect()
        self._drop_scanout_state()
        if self.domain is not None:
            self.domain.close()
        log.info("%s: QEMU display source closed (%s)", self.name, reason)
        try:
            self.handler.on_close(self, reason)
        except Exception:
            self._handler_failed("on_close")

    @property
    def connection(self) -> str:
        """For operators: connected | connecting | waiting (for the VM to appear) | error (the VM is
        there but its display cannot be used; `last_error` says why) | closed."""
        if self.state in ("connected", "closed"):
            return self.state
        if self.last_error is None:
            return "connecting"
        return "waiting" if self.vm_absent else "error"

    def status(self) -> dict[str, Any]:
        scan = self._scanout
        return {"target": self.target.describe(), "state": self.state, "connection": self.connection,
                "vm": self.vm_name,
                "vm_uuid": self.vm_uuid, "console": self.console_label,
                "path": scan.kind if scan is not None else None,
                "plane": scan.buffer.info.describe() if scan is not None else None,
                "cursor": None if self.cursor is None else f"{self.cursor.width}x{self.cursor.height}",
                "pointer": None if self.pointer is None else [self.pointer.x, self.pointer.y,
                                                               self.pointer.visible],
                "error": self.last_error, "input": self.input.status(), **self.stats.as_dict(),
                "ui_size": None if self.ui_size is None or not self.resize else list(self.ui_size[:2]),
                **({"libvirt": self.domain.status()} if self.domain is not None else {})}

    # --- connection lifetime -----------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self.retry_initial
        reported: str | None = None
        try:
            while not self.closed:
                self.state = "connecting"
                try:
                    await self._connect()
                    started = time.monotonic()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # every way a VM can be absent or broken: retried
                    reason = describe_error(exc)
                    self.vm_absent = _vm_absent(exc)
                    self._disconnect()
                    if not self.target.reconnects:
                        self.close(f"cannot reach QEMU's display: {reason}")
                        return
                    if reason != reported:
                        log.info("%s: QEMU display at %s not reachable (%s); retrying", self.name,
                                 self.target.describe(), reason)
                        reported = reason
                        if self.domain is not None:   # the slate says what libvirt says
                            self._blank_for(reason)
                    self.last_error = reason
                else:
                    reported = None
                    reason = await self._serve()
                    self._disconnect()
                    self.vm_absent = True  # it ran and went away: wait for it to come back
                    domain = self.domain
                    if domain is not None and domain.mode == "p2p" and await domain.taken_over():
                        reason = domain.takeover or reason
                    elif domain is not None and domain.state not in (None, *RUNNING_STATES, PAUSED_STATE):
                        reason = f"{domain.label} is {state_text(domain.state)}"
                    self._gone(reason)
                    if not self.target.reconnects:
                        self.close(reason)
                        return
                    # Back quickly after a VM that ran (a restart), slowly after one that keeps dying.
                    delay = self.retry_initial if time.monotonic() - started > 1.0 else delay
                self.state = "waiting"
                delay = await self._pause(delay)
        except asyncio.CancelledError:
            self._disconnect()
            raise

    async def _pause(self, delay: float) -> float:
        """Wait `delay` seconds, or until woken (a domain started): the next delay. A libvirt domain
        whose display another client took over is waited for until it starts again."""
        while True:
            self._wake.clear()
            taken = self.domain is not None and self.domain.takeover is not None
            try:
                await asyncio.wait_for(self._wake.wait(), None if taken else delay)
            except TimeoutError:
                return min(self.retry_max, delay * 2)
            if self.domain is None or self.domain.takeover is None:
                return self.retry_initial   # woken: something changed

    async def _connect(self) -> None:
        target = self.target
        bus, handed = target.bus, None
        if self.domain is not None:
            how, where = await self.domain.attach()
            bus, handed = (where, None) if how == "bus" else (None, where)
        if bus is not None:
            main: MessageBus = await asyncio.wait_for(
                DisplayBus(bus_address=bus, negotiate_unix_fd=True).connect(), CALL_TIMEOUT)
            self._main, self._dest = main, target.bus_name
            self.peer = await self._bus_peer(main, target.bus_name)
        else:
            if handed is not None:
                sock = handed
                self.peer = None   # libvirtd made the pair; QEMU is the domain's
            elif target.qmp is not None:
                sock, self.peer = await _qmp_add_client(target.qmp, self._check_peer)
            else:
                sock, self._handed = self._handed, None
                if sock is None:
                    raise ConnectionError("the handed-over display socket was used up")
                self.peer = _peer_of(sock)   # of a socket pair: whoever made it, who handed it over
            main = PeerBus(sock)
            self._main, self._dest = main, None
            await main.start()
        if target.bus is not None:
            self._check_peer(self.peer)
        main.add_message_handler(self._on_signal)
        if self._dest is not None:
            await self._call_main(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                body=[f"type='signal',sender='{self._dest}',path='{console_path(target.console)}',"
                      f"interface='{PROPERTIES_IFACE}',member='PropertiesChanged'"]))
        vm = await self._get_all(VM_PATH, VM_IFACE)
        self.vm_name = variant_value(vm.get("Name"))
        self.vm_uuid = variant_value(vm.get("UUID"))
        consoles = variant_value(vm.get("ConsoleIDs"))
        if consoles is not None and target.console not in consoles:
            raise LookupError(f"VM {self.vm_name!r} has consoles {sorted(consoles)}, not {target.console}")
        console = await self._get_all(console_path(target.console), CONSOLE_IFACE)
        self.console_label = variant_value(console.get("Label"))
        kind = variant_value(console.get("Type"))
        if kind not in (None, "Graphic"):
            raise LookupError(f"console {target.console} of VM {self.vm_name!r} is a {kind} console, "
                              f"not a graphic one")
        width, height = variant_value(console.get("Width")), variant_value(console.get("Height"))
        if width and height:
            self._console_size = (int(width), int(height))
        # Before the listener: once it is registered frames may come, and nothing after that may fail.
        await self.input._connect(main, self._dest, console_path(target.console),
                                  variant_value(console.get("Interfaces")))
        await self._register_listener()
        self.stats.connects += 1
        self.state = "connected"
        self.last_error = None
        self._blanked_for = None
        self.connected.set()
        self._told_size = None
        self._tell_size()   # a new connection: the guest hears its monitor's size again
        log.info("%s: showing console %d (%s) of VM %r over %s%s", self.name, target.console,
                 self.console_label, self.vm_name, target.describe(),
                 f" (QEMU pid {self.peer.pid})" if self.peer else "")

    def _check_peer(self, peer: Peer | None) -> None:
        """Refuse a display served by a process whose user may not be this guest: whoever binds the
        QMP socket's path, or takes QEMU's name on the bus, while the VM is away is not the VM. A QMP
        socket's server is checked before a byte is sent to it."""
        where = (f"the QMP socket {self.target.qmp}" if self.target.qmp is not None
                 else f"{self.target.bus_name} on the bus {self.target.bus}")
        allowed = ", ".join(map(str, sorted(self.users)))
        if peer is None:
            if self.target.qmp is not None:
                raise PermissionError(errno.EACCES,
                                      f"cannot tell who serves {where}: not taken for the VM")
            return   # nobody owns the name yet: the calls that follow say the VM is not there
        if peer.uid not in self.users:
            raise PermissionError(errno.EACCES,
                                  f"{where} is served by uid {peer.uid} (pid {peer.pid}), which "
                                  f"may not be guest {self.name} (allowed: uid {allowed}; the guest rule's "
                                  "users: says who may)")

    async def _bus_peer(self, bus: MessageBus, name: str) -> Peer | None:
        """Who owns `name` on the bus (QEMU's pid and uid), for status; None if the bus will not say."""
        ids = []
        for member in ("GetConnectionUnixProcessID", "GetConnectionUnixUser"):
            try:
                reply = await asyncio.wait_for(bus.call(Message(
                    destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus", member=member, signature="s", body=[name])),
                    CALL_TIMEOUT)
            except (TimeoutError, OSError, EOFError):
                return None
            if reply.message_type != MessageType.METHOD_RETURN:
                return None  # not there (yet): RegisterListener will say so
            ids.append(int(reply.body[0]))
        return Peer(ids[0], ids[1], -1)

    async def _register_listener(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        listener = PeerBus(ours)
        listener.export(LISTENER_PATH, ListenerInterface(self))
        if self.offer_map:
            listener.export(LISTENER_PATH, ListenerMapInterface(self))
        self._listener = listener
        # QEMU answers RegisterListener and only then runs the handshake on the new socket, blocking its
        # main loop until it completes: authenticate concurrently with waiting for the answer.
        handshake = asyncio.get_running_loop().create_task(listener.start())
        try:
            await self._call_main(Message(
                destination=self._dest, path=console_path(self.target.console), interface=CONSOLE_IFACE,
                member="RegisterListener", signature="h", body=[0], unix_fds=[theirs.fileno()]))
        except BaseException:
            handshake.cancel()
            raise
        finally:
            theirs.close()
        await handshake

    async def _serve(self) -> str:
        """Until either connection ends; the reason."""
        assert self._main is not None and self._listener is not None
        waits = {asyncio.ensure_future(self._main.wait_for_disconnect()): "display connection",
                 asyncio.ensure_future(self._listener.wait_for_disconnect()): "listener connection"}
        for task in waits:
            # An exception nobody retrieves is logged from the task's finalizer, at any later time.
            task.add_done_callback(retrieve_exception)
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        task = next(iter(done))
        exc = None if task.cancelled() else task.exception()
        detail = f": {describe_error(exc)}" if exc is not None and not isinstance(exc, EOFError) else ""
        return f"QEMU closed the {waits[task]}{detail} (the VM stopped?)"

    def _disconnect(self) -> None:
        self.connected.clear()
        self._generation += 1
        self.input._disconnect()
        if self._size_query is not None:
            self._size_query.cancel()
            self._size_query = None
        for bus in (self._listener, self._main):
            if bus is not None and bus.connected:
                try:
                    bus.disconnect()
                except OSError:
                    pass
        self._listener = self._main = None

    def _domain_changed(self, text: str, state: int | None) -> None:
        """libvirt says the domain changed state (state None: the link to libvirtd came or went)."""
        if state is None:
            if self.domain is not None and self.domain.linked and not self.connected.is_set():
                self._wake.set()   # libvirtd is back: ask it now rather than after the backoff
            return
        if state in RUNNING_STATES:
            if self.connected.is_set() and self._scanout is not None and self._blanked_for is not None:
                self._blanked_for = None
                self._emit(self._scanout, None)   # resumed: its picture again
            elif not self.connected.is_set():
                self._wake.set()
            return
        if state == PAUSED_STATE and not self.connected.is_set():
            self._wake.set()   # a paused domain's display can be attached and shown behind the slate
        self._blank_for(text)

    def _blank_for(self, text: str) -> None:
        if text != self._blanked_for:
            self._blanked_for = text
            try:
                self.handler.on_blank(self, text)
            except Exception:
                self._handler_failed("on_blank")

    def _gone(self, reason: str) -> None:
        log.info("%s: %s", self.name, reason)
        self.last_error = reason
        self.peer = None
        self._drop_scanout_state()
        try:
            self.handler.on_blank(self, reason)
        except Exception:
            self._handler_failed("on_blank")
        self._hand_back_all_buffers()

    def _drop_scanout_state(self) -> None:
        self._scanout = None
        self._console_size = None
        self._held.clear()
        self._held_bytes = 0
        if self._surface is not None:
            self._surface.map.close()
            self._surface = None

    def _hand_back_all_buffers(self) -> None:
        """Every buffer to the handler (on_forget), one call each: a call that fails holds back none of
        the others."""
        for buffer in self._take_all_buffers():
            try:
                self.handler.on_forget(self, buffer)
            except Exception:
                self._handler_failed("on_forget")

    def _take_all_buffers(self) -> list[Buffer]:
        out = list(self.buffers.values())
        self.buffers.clear()
        self._order.clear()
        self._identity.clear()
        return out

    async def _call_main(self, msg: Message) -> Message:
        assert self._main is not None
        reply = await asyncio.wait_for(self._main.call(msg), CALL_TIMEOUT)
        if reply.message_type == MessageType.ERROR:
            raise DBusError(reply.error_name, reply.body[0] if reply.body else "")
        return reply

    async def _get_all(self, path: str, iface: str) -> dict[str, Variant]:
        reply = await self._call_main(Message(destination=self._dest, path=path, interface=PROPERTIES_IFACE,
                                              member="GetAll", signature="s", body=[iface]))
        return reply.body[0]

    def _on_signal(self, msg: Message) -> bool:
        if (msg.message_type == MessageType.SIGNAL and msg.member == "PropertiesChanged"
                and msg.path == console_path(self.target.console) and len(msg.body) >= 2):
            iface, changed = msg.body[0], msg.body[1]
            if iface in (MOUSE_IFACE, KEYBOARD_IFACE, MULTITOUCH_IFACE):
                self.input._on_properties(iface, changed)
            elif iface == CONSOLE_IFACE and ("Width" in changed or "Height" in changed):
                width = variant_value(changed.get("Width"))
                height = variant_value(changed.get("Height"))
                old = self._console_size or (0, 0)
                self._console_size = (int(width if width is not None else old[0]),
                                      int(height if height is not None else old[1]))
                self._follow_console_size()
        return False

    # --- listener calls ----------------------------------------------------------------------------

    def _call(self, generation: int, method: str, fn: Callable[..., None], *args: Any,
              fd: int | None = None) -> None:
        """Run a listener method: count it, time it, turn a refusal into QEMU's error reply (never into
        a broken connection), close a handed fd nobody took. A call still queued on a listener
        connection that was torn down is answered and ignored."""
        if generation != self._generation or self.closed:
            if fd is not None:
                _close_quietly(fd, self.peer)
            return
        start = time.perf_counter_ns()
        self.stats.count(method)
        try:
            if fd is not None:   # before anything touches it: only a dma-buf or memfd never blocks
                try:
                    fdguard.expect(fd, _SCANOUT_KINDS, "the descriptor")
                except fdguard.BadDescriptor as exc:
                    raise BadPlane(str(exc)) from None
            fn(*args)
        except BadPlane as exc:
            self._refuse(method, ERROR_UNSUPPORTED if isinstance(exc, UnsupportedFormat) else ERROR_INVALID,
                         str(exc), fd)
        except OSError as exc:
            self._refuse(method, ERROR_FAILED, f"{exc.strerror or exc}", fd)
        finally:
            self.stats.reply(method, time.perf_counter_ns() - start)

    def _refuse(self, method: str, name: str, text: str, fd: int | None) -> None:
        if fd is not None:
            _close_quietly(fd, self.peer)
        self.stats.errors += 1
        message = f"{method}: {text}"
        if message != self.last_error:
            log.warning("%s: refused QEMU's %s", self.name, message)
        self.last_error = message
        raise DBusError(name, message)

    def _scanout_dmabuf(self, fd: int, width: int, height: int, stride: int, drm_fourcc: int, modifier: int,
                        y0_top: bool) -> None:
        info = PlaneInfo(drm_fourcc, width, height, stride, 0, modifier)
        info.validate(dmabuf_size(fd))
        buffer = self._buffer_for(fd, 0, info, copy_only=None)
        if not y0_top and not self._told_bottom_up:
            self._told_bottom_up = True
            log.info("%s: QEMU's dma-buf is bottom-up (y0_top false): shown as it is", self.name)
        self._show(Scanout("dmabuf", buffer, y0_top), None)

    def _scanout_map(self, fd: int, offset: int, width: int, height: int, stride: int, pixman: int) -> None:
        base = offset - offset % mmap.ALLOCATIONGRANULARITY  # mmap wants a page-aligned file offset
        info = PlaneInfo(pixman_to_fourcc(pixman), width, height, stride, offset - base)
        size = os.fstat(fd).st_size
        info.validate()
        if info.span > size - base:
            need = base + info.span
            raise BadPlane(f"the plane ({info.describe()}) at offset {offset} needs {need} bytes but QEMU's "
                           f"shared memory has {size}")
        buffer = self._buffer_for(fd, base, info, copy_only="QEMU shares this console's memory (ScanoutMap), "
                                                            "not a dma-buf")
        self._show(Scanout("map", buffer), None)

    def _update_current(self, kind: str, x: int, y: int, width: int, height: int) -> None:
        scan = self._scanout
        if scan is None or scan.kind != kind:
            self.stats.ignored += 1
            return
        info = scan.buffer.info
        damage = _clip(x, y, width, height, info.width, info.height)
        if damage is None:  # nothing of the picture changed
            self.stats.ignored += 1
            return
        self._emit(scan, damage)

    def _scanout_pixels(self, width: int, height: int, stride: int, pixman: int, data: bytes) -> None:
        drm = pixman_to_fourcc(pixman)
        info = PlaneInfo(drm, width, height, stride)
        info.validate()
        if info.span > len(data):
            raise BadPlane(f"scanout {info.describe()} needs {info.span} bytes of pixels, QEMU sent "
                           f"{len(data)}")
        self.stats.pixel_bytes += len(data)
        surface = self._surface
        if surface is None or (surface.info.width, surface.info.height, surface.pixman) != (width, height,
                                                                                          pixman):
            surface = self._new_surface(width, height, pixman, carry=False)
        surface.write(0, 0, width, height, data, stride)
        self._console_size = (width, height)
        self._drop_held()
        self._show(Scanout("pixels", surface.buffer), None)

    def _update_pixels(self, x: int, y: int, width: int, height: int, stride: int, pixman: int,
                       data: bytes) -> None:
        drm = pixman_to_fourcc(pixman)
        if width <= 0 or height <= 0 or x < 0 or y < 0:
            raise BadPlane(f"update rectangle {width}x{height}+{x}+{y} is empty or negative")
        row = width * FORMATS[drm].bpp // 8
        if stride < row or len(data) < stride * (height - 1) + row:
            raise BadPlane(f"update {width}x{height} with stride {stride} needs "
                           f"{stride * (height - 1) + row} bytes of pixels, QEMU sent {len(data)}")
        self.stats.pixel_bytes += len(data)
        update = HeldUpdate(x, y, width, height, stride, pixman, data)
        surface = self._surface
        if (surface is None or surface.pixman != pixman or x + width > surface.info.width
                or y + height > surface.info.height):
            self._hold(update)
            return
        self._apply(surface, update)
        if self._scanout is not None and self._scanout.buffer is surface.buffer:
            self._emit(self._scanout, (x, y, width, height))
        else:  # back from a dma-buf or map scanout to the pixel surface
            self._show(Scanout("pixels", surface.buffer), (x, y, width, height))

    def _disable(self) -> None:
        if self._scanout is None:
            self.stats.ignored += 1
            return
        self._scanout = None
        self._hand_back_all_buffers()  # QEMU releases its dma-bufs with Disable
        if self._surface is not None:
            self._surface.map.close()
            self._surface = None
        log.info("%s: QEMU disabled the display", self.name)
        try:
            self.handler.on_blank(self, f"{self.name}'s display is off")
        except Exception:
            self._handler_failed("on_blank")

    def _mouse_set(self, x: int, y: int, on: int) -> None:
        self.pointer = Pointer(x, y, bool(on))
        try:
            self.handler.on_cursor(self)
        except Exception:
            self._handler_failed("on_cursor")

    def _cursor_define(self, width: int, height: int, hot_x: int, hot_y: int, data: bytes) -> None:
        if not (0 < width <= MAX_CURSOR and 0 < height <= MAX_CURSOR):
            raise BadPlane(f"cursor {width}x{height} is outside 1..{MAX_CURSOR} per side")
        if not (0 <= hot_x < width and 0 <= hot_y < height):
            raise BadPlane(f"cursor hot spot ({hot_x}, {hot_y}) lies outside its {width}x{height} image")
        size = width * height * 4
        if len(data) < size:
            raise BadPlane(f"cursor {width}x{height} ARGB needs {size} bytes, QEMU sent {len(data)}")
        self._cursor_serial += 1
        self.cursor = Cursor(width, height, hot_x, hot_y, bytes(data[:size]), self._cursor_serial)
        try:
            self.handler.on_cursor(self)
        except Exception:
            self._handler_failed("on_cursor")

    # --- buffers and frames ------------------------------------------------------------------------

    def _buffer_for(self, fd: int, file_offset: int, info: PlaneInfo, copy_only: str | None) -> Buffer:
        """The Buffer for a handed fd: a known one (same inode, same layout; the new fd is closed) or a
        new one that owns `fd`."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, file_offset, info)
        known = self._identity.get(key)
        if known is not None and known in self.buffers:
            os.close(fd)
            self._touch(known)
            return self.buffers[known]
        os.set_inheritable(fd, False)
        buffer = Buffer(self.name, self._new_id(), info, fd, mmap_offset=file_offset, copy_only=copy_only)
        self.buffers[buffer.id] = buffer
        self._identity[key] = buffer.id
        self._touch(buffer.id)
        log.info("%s: new %s %s (buffer %d)", self.name, "dma-buf" if copy_only is None else "shared map",
                 info.describe(), buffer.id)
        return buffer

    def _new_id(self) -> int:
        ident = self._next_id
        self._next_id += 1
        return ident

    def _touch(self, ident: int) -> None:
        if ident in self._order:
            self._order.remove(ident)
        self._order.append(ident)
        while len(self._order) > MAX_KEPT_BUFFERS:
            self._evict(self._order[0])

    def _evict(self, ident: int) -> None:
        if ident in self._order:
            self._order.remove(ident)
        buffer = self.buffers.pop(ident, None)
        if buffer is None:
            return
        for key in [k for k, v in self._identity.items() if v == ident]:
            del self._identity[key]
        if self._surface is not None and self._surface.buffer is buffer:
            self._surface.map.close()
            self._surface = None
        if self._scanout is not None and self._scanout.buffer is buffer:
            self._scanout = None
        try:
            self.handler.on_forget(self, buffer)
        except Exception:
            self._handler_failed("on_forget")

    def _new_surface(self, width: int, height: int, pixman: int, carry: bool = True) -> Surface:
        """A fresh memfd surface; the old one's overlap is carried over unless a whole picture follows
        (a resize keeps what the updates since the switch drew); the old buffer is handed back."""
        drm = pixman_to_fourcc(pixman)
        bpp = FORMATS[drm].bpp // 8
        stride = (width * bpp + 63) & ~63
        info = PlaneInfo(drm, width, height, stride)
        info.validate()
        fd = os.memfd_create(f"directflip-{self.name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, max(stride * height, 1))
            # Sealed at its size: the copy path may then map it rather than read it on every copy.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            mem = mmap.mmap(fd, stride * height, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        buffer = Buffer(self.name, self._new_id(), info, fd,
                        copy_only="QEMU sends this console's pixels over D-Bus (Scanout/Update), "
                                  "not as a dma-buf")
        surface = Surface(buffer, mem, pixman)
        old = self._surface
        if carry and old is not None and old.pixman == pixman:
            w, h = min(width, old.info.width), min(height, old.info.height)
            surface.write(0, 0, w, h, old.map, old.info.stride, old.info.offset)
        self.buffers[buffer.id] = buffer
        if old is not None:
            self._evict(old.buffer.id)
        self._surface = surface
        self._touch(buffer.id)
        log.info("%s: pixel surface %s (buffer %d)", self.name, info.describe(), buffer.id)
        return surface

    def _show(self, scan: Scanout, damage: tuple[int, int, int, int] | None) -> None:
        self._scanout = scan
        self._touch(scan.buffer.id)
        self._emit(scan, damage)

    def _emit(self, scan: Scanout, damage: tuple[int, int, int, int] | None) -> None:
        self._seq += 1
        self.stats.frames += 1
        frame = QemuFrame(scan.buffer, self._seq, damage=damage, y0_top=scan.y0_top)
        try:
            self.handler.on_frame(self, frame)
        except Exception:
            self._handler_failed("on_frame")

    def _handler_failed(self, callback: str) -> None:
        """The handler's method `callback` raised (called from its except clause): logged, not passed
        on, so QEMU still gets its reply and the source goes on. Each call site has its own try:
        on_frame runs while QEMU waits for the reply, where a context manager costs more than the call."""
        log.exception("%s: the handler's %s failed", self.name, callback)

    # --- pixel updates that wait for a resize --------------------------------------------------------

    def _apply(self, surface: Surface, update: HeldUpdate) -> None:
        surface.write(update.x, update.y, update.width, update.height, update.data, update.stride)

    def _hold(self, update: HeldUpdate) -> None:
        """An update that does not fit the surface: QEMU switched surfaces (a resize, a format change)
        without a Scanout. Keep it until the new size is known."""
        self._held.append(update)
        self._held_bytes += len(update.data)
        while self._held_bytes > MAX_HELD_UPDATE_BYTES and self._held:
            self._held_bytes -= len(self._held.pop(0).data)
        if self._console_size is not None and self._fits_console(update):
            self._follow_console_size()
        elif self._size_query is None and self._main is not None:
            self._size_query = asyncio.get_running_loop().create_task(self._query_console_size())

    def _fits_console(self, update: HeldUpdate) -> bool:
        width, height = self._console_size or (0, 0)
        surface = self._surface
        differs = surface is None or (surface.info.width, surface.info.height) != (width, height)
        return differs and update.x + update.width <= width and update.y + update.height <= height

    async def _query_console_size(self) -> None:
        try:
            path = console_path(self.target.console)
            sizes = []
            for prop in ("Width", "Height"):
                reply = await self._call_main(Message(
                    destination=self._dest, path=path, interface=PROPERTIES_IFACE, member="Get",
                    signature="ss", body=[CONSOLE_IFACE, prop]))
                sizes.append(int(variant_value(reply.body[0])))
            self._console_size = (sizes[0], sizes[1])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            level = logging.WARNING if self.state == "connected" else logging.DEBUG
            log.log(level, "%s: asking QEMU for the console's size: %s", self.name, describe_error(exc))
            return
        finally:
            self._size_query = None
        self._follow_console_size(drop_misfits=True)

    def _follow_console_size(self, drop_misfits: bool = False) -> None:
        """Resize the pixel surface to the console's size, then apply the held updates that fit it."""
        if self._console_size is None:
            return
        if self._scanout is not None and self._scanout.kind != "pixels" and not self._held:
            return  # a dma-buf or a map is shown: its size is its own
        width, height = self._console_size
        if width <= 0 or height <= 0:
            return
        surface = self._surface
        pixman = self._held[-1].pixman if self._held else surface.pixman if surface else None
        if pixman is None:
            return
        changed = surface is None or (surface.info.width, surface.info.height, surface.pixman) != (
            width, height, pixman)
        if changed:
            surface = self._new_surface(width, height, pixman)
        assert surface is not None
        kept: list[HeldUpdate] = []
        for update in self._held:
            if (update.pixman == pixman and update.x + update.width <= width
                    and update.y + update.height <= height):
                self._apply(surface, update)
            elif not drop_misfits:
                kept.append(update)
            else:
                log.warning("%s: QEMU sent an update %dx%d+%d+%d outside its %dx%d console; dropped",
                            self.name, update.width, update.height, update.x, update.y, width, height)
        applied = len(self._held) - len(kept)
        self._held = kept
        self._held_bytes = sum(len(u.data) for u in kept)
        if changed or applied:
            self._show(Scanout("pixels", surface.buffer), None)

    def _drop_held(self) -> None:
        self._held.clear()
        self._held_bytes = 0


# --------------------------------------------------------------------------------- helpers

def _clip(x: int, y: int, width: int, height: int, limit_w: int, limit_h: int
          ) -> tuple[int, int, int, int] | None:
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(limit_w, x + width), min(limit_h, y + height)
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1 - x0, y1 - y0)


_SCANOUT_KINDS = frozenset({fdguard.Kind.DMABUF, fdguard.Kind.MEMFD})


def _close_quietly(fd: int, peer: Peer | None = None) -> None:
    """Let go of a descriptor QEMU handed over: through compositor.fdguard, since it may be of a file
    whose close waits on whoever serves it (`peer`: who sent it)."""
    who = f"QEMU display peer pid {peer.pid}" if peer is not None else "a QEMU display peer"
    fdguard.discard(fd, who, peer.uid if peer is not None else None)


# A bus with nobody owning QEMU's name on it yet: the VM has not started (or not joined the bus).
_NO_OWNER = ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner")


def _vm_absent(exc: BaseException) -> bool:
    """Whether a failed connection means there is no VM to talk to: no socket, nobody listening on
    it, a connection dropped mid-handshake by a VM going down, nobody owning the name on the bus.
    Anything else (refused access, a console that is not there, a VM without -display dbus, no answer
    in time) is an error about a VM that is there."""
    if isinstance(exc, DBusError):
        return exc.type in _NO_OWNER
    if isinstance(exc, DomainError):
        return exc.absent
    return isinstance(exc, FileNotFoundError | ConnectionRefusedError | ConnectionResetError
                      | BrokenPipeError | EOFError)


async def _qmp_add_client(path: str | None,
                          vet: Callable[[Peer | None], None]) -> tuple[socket.socket, Peer | None]:
    """Hand QEMU one end of a socket pair as a D-Bus display client (QMP getfd + add_client): our end,
    and QEMU's credentials from the QMP socket (a socket pair's own say who created it: us), which
    `vet` sees (and may refuse by raising) before anything is sent. Needs the VM started with
    -display dbus,p2p=yes."""
    from qemu.qmp import QMPClient  # the QMP client is only needed for this mode

    assert path is not None
    # Connect first ourselves: a VM that is not there yet is the normal case while waiting for it,
    # not something for QMPClient to log as an error on every retry.
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(conn, path), CALL_TIMEOUT)
    except BaseException:
        conn.close()
        raise
    peer = _peer_of(conn)
    try:
        vet(peer)
    except BaseException:
        conn.close()
        raise
    qmp = QMPClient("directflip")
    await asyncio.wait_for(qmp.connect(conn), CALL_TIMEOUT)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fdname = f"directflip-{uuid_mod.uuid4().hex[:12]}"
    try:
        qmp.send_fd_scm(theirs.fileno())
        await asyncio.wait_for(qmp.execute("getfd", {"fdname": fdname}), CALL_TIMEOUT)
        await asyncio.wait_for(qmp.execute("add_client", {"protocol": "@dbus-display", "fdname": fdname}),
                               CALL_TIMEOUT)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
        await qmp.disconnect()
    return ours, peer


def _peer_of(sock: socket.socket) -> Peer | None:
    try:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except OSError:
        return None
    return Peer(pid, uid, gid)


async def wait_for(predicate: Callable[[], bool], timeout: float, poll: float = 0.01) -> bool:
    """Wait until predicate() is true (tests and tools)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(poll)
    return True
