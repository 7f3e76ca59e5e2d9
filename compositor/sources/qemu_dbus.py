"""QEMU's D-Bus display (`-display dbus`) as a guest source: any VM QEMU can show, zero copy where QEMU
hands out dma-bufs.

How QEMU's display speaks (interface description: QEMU's ui/dbus-display1.xml):

- The *display connection* reaches QEMU's objects: `/org/qemu/Display1/VM` (org.qemu.Display1.VM: Name,
  UUID, ConsoleIDs) and `/org/qemu/Display1/Console_N` (org.qemu.Display1.Console: Type, Width,
  Height, RegisterListener). It is either a private bus QEMU joined as `org.qemu`
  (`-display dbus,addr=ADDRESS`), or peer to peer (`-display dbus,p2p=yes`): a socket pair whose other
  end is handed to QEMU over QMP (`getfd`, then `add_client protocol=@dbus-display`). A p2p connection
  has no bus: no Hello, no names, no match rules (signals simply arrive).
- `RegisterListener(h)` takes one end of a second socket pair. On it QEMU is the D-Bus
  *authentication server* (G_DBUS_CONNECTION_FLAGS_AUTHENTICATION_SERVER, with a GUID) and the caller:
  we authenticate as client (EXTERNAL, NEGOTIATE_UNIX_FD) and serve `/org/qemu/Display1/Listener`.
  QEMU first reads the listener's properties (GetAll: `Interfaces`), and newer QEMUs use
  org.qemu.Display1.Listener.Unix.Map when it is listed there.
- QEMU then calls the listener. `ScanoutDMABUF(h, ...)` hands over a dma-buf (zero copy); after it,
  `UpdateDMABUF(x, y, w, h)` says the buffer changed, and QEMU blocks the guest's GL until we reply —
  so the reply is sent from the handler itself, before anything else, and its latency is measured.
  `ScanoutMap(h, offset, ...)` shares QEMU's surface memory (a memfd; QEMU versions with
  org.qemu.Display1.Listener.Unix.Map, not 7.2) and `UpdateMap` says what changed (QEMU waits for the
  ScanoutMap reply too). `Scanout` / `Update` carry the pixels themselves;
  they are written into a memfd of ours that the scanout pipeline copies from. `Disable` turns the
  display off (the slate); `CursorDefine` / `MouseSet` describe the pointer.
- A resize on the pixel path comes without a Scanout: QEMU only switches its surface and sends
  `Update`s of the new size, in bands (VGA text mode after SeaBIOS: 720x400 in 16-row bands). The new
  size is the console's Width/Height: the source follows the console's PropertiesChanged signal and,
  when an Update does not fit before that signal came, asks for Width/Height and holds the update
  until the answer.

Buffer identity: a dma-buf (or shared memfd) is known by its inode. QEMU sends a new fd with every
ScanoutDMABUF, also for a buffer it sent before (a guest flipping between two buffers); a known inode
with the same layout is the same Buffer (same id: the framebuffer cache imports it once) and the new
fd is closed. A few recent buffers are kept; older ones are handed back through `on_forget`.

Connection lifetime: `QemuDisplaySource.start()` runs a loop — connect, register, serve until either
connection closes (the VM went away: `on_blank` and `on_forget` for every buffer), then try again with
a growing delay. A source given an already connected socket cannot reconnect: it ends with `on_close`.

Input: `source.input` (a `QemuInput`, one per source, kept across reconnects) is the guest's
`compositor.input.sink.InputSink`. It sends evdev input as calls on the console object
(`/org/qemu/Display1/Console_N`, the source's console): keys as qnum numbers (compositor/input/qnum.py) to
org.qemu.Display1.Keyboard Press/Release; buttons as QEMU's InputButton numbers, wheel detents as a
press and a release of wheel-up/-down/-left/-right, positions (clamped to the console) and motion to
org.qemu.Display1.Mouse; touch to org.qemu.Display1.MultiTouch SendEvent. `input.absolute` is the
Mouse's IsAbsolute, read at connect and followed through PropertiesChanged. The console's `Interfaces`
property says which of the three it has (no property: a QEMU before 8.1, Keyboard and Mouse); what it
lacks is dropped. Calls are never awaited: each is handed to the connection with a callback for its
answer, at most MAX_INPUT_CALLS may be unanswered (beyond, input is dropped with one warning, and one
info line once QEMU answers again), and releases dropped meanwhile are sent first then.

The D-Bus library is dbus-fast (asyncio, fd passing). Its MessageBus only connects to bus addresses and
always greets a bus with Hello; `PeerBus` runs it over an already connected socket instead.
"""

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
from typing import Annotated, Any, Protocol

from dbus_fast import DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.aio.message_bus import _MessageWriter
from dbus_fast.aio.message_reader import build_message_reader
from dbus_fast.annotations import (
    DBusBool,
    DBusBytes,
    DBusInt32,
    DBusSignature,
    DBusUInt32,
    DBusUInt64,
    DBusUnixFd,
)
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_method, dbus_property

from compositor import fdguard
from compositor.formats import FORMATS, fourcc, fourcc_name
from compositor.input.qnum import key_name, qnum
from compositor.input.sink import TOUCH_KINDS
from compositor.pixelcopy import copy_rows
from compositor.sources import SourceDefaults
from compositor.sources.frame import (
    MAX_CURSOR,
    BadPlane,
    Buffer,
    Cursor,
    Frame,
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
from compositor.stats import percentile

log = logging.getLogger("directflip.qemu_dbus")

DBusStrings = Annotated[list[str], DBusSignature("as")]

BUS_NAME = "org.qemu"  # the name QEMU owns on a bus (-display dbus,addr=...)
ROOT = "/org/qemu/Display1"
VM_PATH = f"{ROOT}/VM"
LISTENER_PATH = f"{ROOT}/Listener"
VM_IFACE = "org.qemu.Display1.VM"
CONSOLE_IFACE = "org.qemu.Display1.Console"
LISTENER_IFACE = "org.qemu.Display1.Listener"
MAP_IFACE = "org.qemu.Display1.Listener.Unix.Map"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
# QEMU's own error names (ui/dbus.h: DBUS_DISPLAY_ERROR)
ERROR_FAILED = "org.qemu.Display1.Error.Failed"
ERROR_INVALID = "org.qemu.Display1.Error.Invalid"
ERROR_UNSUPPORTED = "org.qemu.Display1.Error.Unsupported"

MAX_KEPT_BUFFERS = 4  # dma-bufs / maps not scanned out lately are handed back beyond this many
MAX_HELD_UPDATE_BYTES = 64 << 20  # pixel updates held while a resize's size is asked for
CALL_TIMEOUT = 10.0  # seconds for any call we make to QEMU
LATENCY_WINDOW = 4096  # reply latencies kept per method


def console_path(index: int) -> str:
    return f"{ROOT}/Console_{index}"


# --------------------------------------------------------------------------------- pixel formats

def _pixman(bpp: int, kind: int, a: int, r: int, g: int, b: int) -> int:
    """pixman.h's PIXMAN_FORMAT(bpp, type, a, r, g, b)."""
    return (bpp << 24) | (kind << 16) | (a << 12) | (r << 8) | (g << 4) | b


_ARGB, _ABGR, _BGRA, _RGBA = 2, 3, 8, 9  # PIXMAN_TYPE_*

# pixman format → DRM fourcc, for the formats whose memory layout is the same on a little-endian host
# (pixman names a native-endian word from its most significant bits, DRM a little-endian one: the same
# layout). QEMU's surfaces are x8r8g8b8 for 32-bit guest modes, r5g6b5 / x1r5g5b5 for 16 / 15-bit
# ones, r8g8b8 for 24-bit and b8g8r8x8 for big-endian guests.
PIXMAN_TO_DRM: dict[int, tuple[str, int]] = {
    _pixman(32, _ARGB, 8, 8, 8, 8): ("a8r8g8b8", fourcc("AR24")),
    _pixman(32, _ARGB, 0, 8, 8, 8): ("x8r8g8b8", fourcc("XR24")),
    _pixman(32, _ABGR, 8, 8, 8, 8): ("a8b8g8r8", fourcc("AB24")),
    _pixman(32, _ABGR, 0, 8, 8, 8): ("x8b8g8r8", fourcc("XB24")),
    _pixman(32, _BGRA, 8, 8, 8, 8): ("b8g8r8a8", fourcc("BA24")),
    _pixman(32, _BGRA, 0, 8, 8, 8): ("b8g8r8x8", fourcc("BX24")),
    _pixman(32, _RGBA, 8, 8, 8, 8): ("r8g8b8a8", fourcc("RA24")),
    _pixman(32, _RGBA, 0, 8, 8, 8): ("r8g8b8x8", fourcc("RX24")),
    _pixman(32, _ARGB, 2, 10, 10, 10): ("a2r10g10b10", fourcc("AR30")),
    _pixman(32, _ARGB, 0, 10, 10, 10): ("x2r10g10b10", fourcc("XR30")),
    _pixman(32, _ABGR, 2, 10, 10, 10): ("a2b10g10r10", fourcc("AB30")),
    _pixman(32, _ABGR, 0, 10, 10, 10): ("x2b10g10r10", fourcc("XB30")),
    _pixman(24, _ARGB, 0, 8, 8, 8): ("r8g8b8", fourcc("RG24")),
    _pixman(24, _ABGR, 0, 8, 8, 8): ("b8g8r8", fourcc("BG24")),
    _pixman(16, _ARGB, 0, 5, 6, 5): ("r5g6b5", fourcc("RG16")),
    _pixman(16, _ABGR, 0, 5, 6, 5): ("b5g6r5", fourcc("BG16")),
    _pixman(16, _ARGB, 1, 5, 5, 5): ("a1r5g5b5", fourcc("AR15")),
    _pixman(16, _ARGB, 0, 5, 5, 5): ("x1r5g5b5", fourcc("XR15")),
}
PIXMAN_X8R8G8B8 = _pixman(32, _ARGB, 0, 8, 8, 8)
PIXMAN_A8R8G8B8 = _pixman(32, _ARGB, 8, 8, 8, 8)


class UnsupportedFormat(BadPlane):
    """A pixel format QEMU named that directflip cannot show; the message names the value."""


def pixman_to_fourcc(code: int) -> int:
    """The DRM fourcc of a pixman format code QEMU sent; UnsupportedFormat names an unknown or
    unshowable one."""
    known = PIXMAN_TO_DRM.get(code)
    if known is None:
        raise UnsupportedFormat(
            f"pixman format 0x{code:08x} is unknown to directflip (known: "
            + ", ".join(f"{name} 0x{value:08x}" for value, (name, _) in sorted(PIXMAN_TO_DRM.items()))
            + ")")
    name, drm = known
    if drm not in FORMATS:
        raise UnsupportedFormat(f"pixman format {name} (0x{code:08x}) is DRM {fourcc_name(drm)}, which "
                                f"directflip cannot show")
    return drm


# --------------------------------------------------------------------------------- what comes out

@dataclass(eq=False)
class QemuFrame(Frame):
    """A Frame from QEMU: also what changed and which way up the picture is."""

    damage: tuple[int, int, int, int] | None = None  # x, y, width, height that changed; None: all
    y0_top: bool = True  # False: QEMU's buffer is bottom-up (a GL texture); shown as it is


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


class QemuDisplayHandler(Protocol):
    """What the daemon does with a QEMU display. Callbacks run on the event loop, must not block and
    must not raise (an exception is logged; QEMU still gets its reply)."""

    def on_frame(self, source: QemuDisplaySource, frame: QemuFrame) -> None:
        """Show frame.buffer (one of source.buffers) now."""

    def on_forget(self, source: QemuDisplaySource, buffer: Buffer) -> None:
        """The source dropped `buffer`: it left source.buffers and the handler owns it; close it once
        it is off screen."""

    def on_blank(self, source: QemuDisplaySource, reason: str) -> None:
        """Nothing to show (Disable, or the VM went away and the source is waiting for it): the slate."""

    def on_cursor(self, source: QemuDisplaySource) -> None:
        """source.cursor or source.pointer changed."""

    def on_close(self, source: QemuDisplaySource, reason: str) -> None:
        """The source stopped for good (closed, or a handed-over connection ended). The handler owns
        every buffer still in source.buffers."""


# --------------------------------------------------------------------------------- p2p D-Bus

_UNUSED_ADDRESS = "unix:abstract=directflip-peer-to-peer"  # parsed by the base class, never connected


class DisplayBus(MessageBus):
    """dbus-fast's MessageBus, minus one kind of noise: replies and signals are sent with futures nobody
    awaits, and the connection's end is a future nobody need await; when the peer goes, errors land in
    them, and asyncio would log each "exception was never retrieved" from a finalizer at some later
    moment. Whoever awaits one of them still gets its exception."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._disconnect_future.add_done_callback(_retrieve)

    def send(self, msg: Message) -> asyncio.Future:
        if self._disconnected or self._user_disconnect:
            # A reply to a call that was being handled when the connection was closed (shutdown, the
            # VM gone): there is no one left to send it to.
            future = asyncio.get_running_loop().create_future()
            future.set_exception(ConnectionError("the D-Bus connection is closed"))
            future.add_done_callback(_retrieve)
            return future
        future = super().send(msg)
        future.add_done_callback(_retrieve)
        return future


class PeerBus(DisplayBus):
    """A dbus-fast asyncio MessageBus over an already connected socket, peer to peer: no bus, no Hello,
    file descriptors negotiated.

    dbus-fast connects only to bus addresses and always sends Hello, which a peer answers with an
    error. This runs its own writer and reader on the given socket instead (dbus-fast 5's internals:
    `_sock`, `_stream`, `_fd`, `_writer`, `_authenticate`, `build_message_reader`). `start()`
    authenticates as the client (what QEMU expects on both its connections); `start(server_guid=...)`
    answers as the server (EXTERNAL, checked against the socket's peer credentials), for stand-ins of
    QEMU. The bus owns the socket from then on."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(bus_address=_UNUSED_ADDRESS, negotiate_unix_fd=True)
        self._peer_socket = sock

    async def start(self, *, server_guid: str | None = None, timeout: float = CALL_TIMEOUT) -> PeerBus:
        sock = self._peer_socket
        sock.setblocking(False)
        self._sock = sock
        self._stream = sock.makefile("rwb")
        self._fd = sock.fileno()
        self._writer = _MessageWriter(self)
        try:
            async with asyncio.timeout(timeout):
                if server_guid is None:
                    await self._authenticate()
                else:
                    await _serve_auth(sock, server_guid)
        except BaseException:
            self._stream.close()
            sock.close()
            raise
        # The writer sends only once the connection has a name; a peer connection has none to get.
        self.unique_name = ":peer"
        self._loop.add_reader(self._fd, build_message_reader(self._sock, self._process_message,
                                                             self._finalize, True))
        self._writer.schedule_write()
        return self

    def _emit_interface_added(self, path: str, interface: ServiceInterface) -> None:
        pass  # ObjectManager signals are for bus clients; nobody on a peer connection asked for them


async def _read_line(sock: socket.socket, limit: int = 16384) -> str:
    """One CRLF-terminated line of the SASL exchange, leaving every byte after it in the socket (the
    client may send its first message right behind BEGIN)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            peek = sock.recv(limit, socket.MSG_PEEK)
        except BlockingIOError:
            peek = None
        if peek == b"":
            raise EOFError("the peer closed during authentication")
        if peek is not None:
            end = peek.find(b"\r\n")
            if end >= 0:
                return sock.recv(end + 2)[:-2].decode("ascii", "replace")
            if len(peek) >= limit:
                raise ConnectionError("authentication line too long")
        ready = loop.create_future()
        loop.add_reader(sock.fileno(), ready.set_result, None)
        try:
            await ready
        finally:
            loop.remove_reader(sock.fileno())


async def _serve_auth(sock: socket.socket, guid: str) -> None:
    """The server's half of the D-Bus SASL exchange: EXTERNAL only, the claimed uid must be the socket
    peer's; unix fds agreed when asked."""
    loop = asyncio.get_running_loop()
    nul = await loop.sock_recv(sock, 1)
    if nul != b"\0":
        raise ConnectionError(f"the D-Bus client sent {nul!r} instead of its credentials byte")
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    authenticated = False
    while True:
        line = await _read_line(sock)
        words = line.split(" ")
        if words[0] == "AUTH" and len(words) >= 2 and words[1] == "EXTERNAL":
            claimed = bytes.fromhex(words[2]).decode() if len(words) > 2 else str(uid)
            if claimed == str(uid):
                authenticated = True
                reply = f"OK {guid}"
            else:
                reply = "REJECTED EXTERNAL"
        elif words[0] == "AUTH":
            reply = "REJECTED EXTERNAL"
        elif words[0] == "NEGOTIATE_UNIX_FD" and authenticated:
            reply = "AGREE_UNIX_FD"
        elif words[0] == "BEGIN" and authenticated:
            return
        elif words[0] == "CANCEL":
            authenticated, reply = False, "REJECTED EXTERNAL"
        else:
            reply = "ERROR"
        await loop.sock_sendall(sock, f"{reply}\r\n".encode())


# --------------------------------------------------------------------------------- where the VM is

@dataclass
class QemuTarget:
    """Where a VM's display is. Exactly one of:

    - `bus`: a D-Bus address QEMU joined with `-display dbus,addr=ADDRESS` (it owns `bus_name` there);
    - `qmp`: QEMU's QMP socket, the VM started with `-display dbus,p2p=yes`: the source hands QEMU one
      end of a socket pair (getfd + add_client) and talks peer to peer;
    - `sock`: an already connected peer-to-peer socket to QEMU's display (a launcher did the QMP part);
      used once, no reconnection;
    - `libvirt`: (URI, domain name or UUID) of a libvirt domain with `<graphics type='dbus'>`
      (compositor.sources.libvirt_domain): libvirt hands out the display, peer to peer or on the
      domain's bus.
    """

    bus: str | None = None
    qmp: str | None = None
    sock: socket.socket | None = None
    console: int = 0
    bus_name: str = BUS_NAME
    libvirt: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("bus", "qmp", "sock", "libvirt") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a QEMU display target needs exactly one of bus, qmp, sock, libvirt (got "
                             f"{', '.join(given) or 'none'})")
        if self.console < 0:
            raise ValueError(f"console {self.console} is negative")

    @classmethod
    def parse(cls, spec: str, console: int = 0) -> QemuTarget:
        """`qmp:/run/vm/qmp.sock` or `dbus:unix:path=/run/vm/bus` (a D-Bus address)."""
        kind, sep, rest = spec.partition(":")
        if sep and rest and kind == "qmp":
            return cls(qmp=rest, console=console)
        if sep and rest and kind == "dbus":
            return cls(bus=rest, console=console)
        raise ValueError(f"{spec!r} is not a QEMU display: write qmp:PATH (QMP socket of a VM started "
                         f"with -display dbus,p2p=yes) or dbus:ADDRESS (-display dbus,addr=ADDRESS)")

    @property
    def reconnects(self) -> bool:
        return self.sock is None

    def describe(self) -> str:
        where = (f"bus {self.bus}" if self.bus is not None else f"QMP {self.qmp}" if self.qmp is not None
                 else f"libvirt domain {self.libvirt[1]} at {self.libvirt[0]}" if self.libvirt is not None
                 else "a handed-over socket")
        return f"{where}, console {self.console}"


# --------------------------------------------------------------------------------- the listener

class _ListenerPart(ServiceInterface):
    """One interface of the listener object, tied to the listener connection it was exported on."""

    def __init__(self, name: str, source: QemuDisplaySource) -> None:
        super().__init__(name)
        self.source = source
        self.generation = source._generation

    def _do(self, method: str, fn: Callable[..., None], *args: Any, fd: int | None = None) -> None:
        self.source._call(self.generation, method, fn, *args, fd=fd)


class ListenerInterface(_ListenerPart):
    """org.qemu.Display1.Listener: the D-Bus face of a QemuDisplaySource (argument types and replies;
    the source does the work)."""

    def __init__(self, source: QemuDisplaySource) -> None:
        super().__init__(LISTENER_IFACE, source)

    @dbus_method(name="Scanout")
    def scanout(self, width: DBusUInt32, height: DBusUInt32, stride: DBusUInt32, pixman_format: DBusUInt32,
                data: DBusBytes):
        self._do("Scanout", self.source._scanout_pixels, width, height, stride, pixman_format, data)

    @dbus_method(name="Update")
    def update(self, x: DBusInt32, y: DBusInt32, width: DBusInt32, height: DBusInt32, stride: DBusUInt32,
               pixman_format: DBusUInt32, data: DBusBytes):
        self._do("Update", self.source._update_pixels, x, y, width, height, stride, pixman_format, data)

    @dbus_method(name="ScanoutDMABUF")
    def scanout_dmabuf(self, dmabuf: DBusUnixFd, width: DBusUInt32, height: DBusUInt32, stride: DBusUInt32,
                       fourcc: DBusUInt32, modifier: DBusUInt64, y0_top: DBusBool):
        self._do("ScanoutDMABUF", self.source._scanout_dmabuf, dmabuf, width, height, stride, fourcc,
                 modifier, y0_top, fd=dmabuf)

    @dbus_method(name="UpdateDMABUF")
    def update_dmabuf(self, x: DBusInt32, y: DBusInt32, width: DBusInt32, height: DBusInt32):
        self._do("UpdateDMABUF", self.source._update_current, "dmabuf", x, y, width, height)

    @dbus_method(name="Disable")
    def disable(self):
        self._do("Disable", self.source._disable)

    @dbus_method(name="MouseSet")
    def mouse_set(self, x: DBusInt32, y: DBusInt32, on: DBusInt32):
        self._do("MouseSet", self.source._mouse_set, x, y, on)

    @dbus_method(name="CursorDefine")
    def cursor_define(self, width: DBusInt32, height: DBusInt32, hot_x: DBusInt32, hot_y: DBusInt32,
                      data: DBusBytes):
        self._do("CursorDefine", self.source._cursor_define, width, height, hot_x, hot_y, data)

    @dbus_property(access=PropertyAccess.READ, name="Interfaces")
    def interfaces(self) -> DBusStrings:
        return [MAP_IFACE] if self.source.offer_map else []


class ListenerMapInterface(_ListenerPart):
    """org.qemu.Display1.Listener.Unix.Map: QEMU's surface shared as a memfd."""

    def __init__(self, source: QemuDisplaySource) -> None:
        super().__init__(MAP_IFACE, source)

    @dbus_method(name="ScanoutMap")
    def scanout_map(self, handle: DBusUnixFd, offset: DBusUInt32, width: DBusUInt32, height: DBusUInt32,
                    stride: DBusUInt32, pixman_format: DBusUInt32):
        self._do("ScanoutMap", self.source._scanout_map, handle, offset, width, height, stride, pixman_format,
                 fd=handle)

    @dbus_method(name="UpdateMap")
    def update_map(self, x: DBusInt32, y: DBusInt32, width: DBusInt32, height: DBusInt32):
        self._do("UpdateMap", self.source._update_current, "map", x, y, width, height)


# --------------------------------------------------------------------------------- input

KEYBOARD_IFACE = "org.qemu.Display1.Keyboard"
MOUSE_IFACE = "org.qemu.Display1.Mouse"
MULTITOUCH_IFACE = "org.qemu.Display1.MultiTouch"
# What a console without the Interfaces property (QEMU before 8.1, which added it with MultiTouch)
# serves: Keyboard and Mouse were there from the first -display dbus.
LEGACY_INPUT_IFACES = (KEYBOARD_IFACE, MOUSE_IFACE)

MAX_INPUT_CALLS = 64  # input calls QEMU has not answered yet, per source; beyond this, input is dropped
MAX_WHEEL_STEPS = 16  # detents sent for one wheel() call: a runaway value must not flood the guest

# QEMU's InputButton (qapi/ui.json), the numbers org.qemu.Display1.Mouse's Press/Release take.
QBTN_LEFT, QBTN_MIDDLE, QBTN_RIGHT = 0, 1, 2
QBTN_WHEEL_UP, QBTN_WHEEL_DOWN = 3, 4
QBTN_SIDE, QBTN_EXTRA = 5, 6
QBTN_WHEEL_LEFT, QBTN_WHEEL_RIGHT = 7, 8  # later additions: see QemuInput.wheel

# evdev BTN_* (linux/input-event-codes.h) → InputButton. Thumb buttons come as BTN_SIDE/BTN_EXTRA from
# most mice and as BTN_BACK/BTN_FORWARD from some: both pairs are back/forward to the guest.
BUTTONS: dict[int, int] = {
    0x110: QBTN_LEFT,  # BTN_LEFT
    0x111: QBTN_RIGHT,  # BTN_RIGHT
    0x112: QBTN_MIDDLE,  # BTN_MIDDLE
    0x113: QBTN_SIDE,  # BTN_SIDE
    0x114: QBTN_EXTRA,  # BTN_EXTRA
    0x115: QBTN_EXTRA,  # BTN_FORWARD
    0x116: QBTN_SIDE,  # BTN_BACK
}

# InputSink touch kinds → QEMU's InputMultiTouchType (qapi/ui.json): begin, update, end, cancel.
TOUCH_TYPES: dict[str, int] = {"down": 0, "motion": 1, "up": 2, "cancel": 3}
_TOUCH_END = TOUCH_TYPES["up"]

_INT32 = (-(1 << 31), (1 << 31) - 1)
_UINT32_MAX = (1 << 32) - 1


@dataclass
class _InputLink:
    """Input's view of one display connection: where the calls go, what the console offers, and how
    many calls QEMU has not answered yet. A reconnect makes a new one; answers that come back on an old
    one only settle its own count."""

    bus: MessageBus
    dest: str | None
    path: str
    keyboard: bool
    mouse: bool
    touch: bool
    max_slots: int
    horizontal_wheel: bool
    outstanding: int = 0


_Call = tuple[str, str, str, list]  # interface, member, signature, body


class QemuInput:
    """The InputSink of a QemuDisplaySource (`source.input`): evdev input as calls on the console
    object's org.qemu.Display1.Keyboard, .Mouse and .MultiTouch interfaces.

    Every method returns at once: the call is handed to the connection's writer and its answer handled
    in a callback, never awaited. At most `max_calls` calls may wait for QEMU's answer; beyond that,
    input is dropped (one warning) until QEMU has answered half of them (one info line), so a stuck VM
    can neither hold up the compositor nor make it queue without end. A release dropped that way is
    owed: it is sent first once QEMU answers again, so no key, button or touch stays down in the guest.
    Without a connection (the VM not there yet, or gone) input is dropped silently."""

    def __init__(self, source: QemuDisplaySource, max_calls: int = MAX_INPUT_CALLS) -> None:
        self.source = source
        self.max_calls = max_calls
        self.modifiers = 0  # the Keyboard's Modifiers property (Scroll 1, Num 2, Caps 4), for status
        self.sent = 0
        self.answered = 0
        self.refused = 0  # answers that were errors (say, a relative motion just after the mode changed)
        self.dropped = 0
        self._link: _InputLink | None = None
        self._absolute = False
        self._absolute_changes = 0  # IsAbsolute signals seen: a late GetAll answer must not undo one
        self._stalled = False
        self._stall_drops = 0
        # What the guest holds down (a key, a button, a touch contact) → the call that lets go of it;
        # and those of them whose release was dropped.
        self._down: dict[tuple[str, int], _Call] = {}
        self._owed: dict[tuple[str, int], _Call] = {}
        self._told_interfaces: str | None = None

    # --- InputSink -----------------------------------------------------------------------------------

    @property
    def absolute(self) -> bool:
        return self._absolute

    def key(self, code: int, down: bool) -> None:
        number = qnum(code)
        if number is None:
            log.debug("%s: %s has no QEMU key number; dropped", self.source.name, key_name(code))
            return
        link = self._link
        if link is not None and not link.keyboard:
            return
        member = "Press" if down else "Release"
        self._press_or_release(("key", number), down, (KEYBOARD_IFACE, member, "u", [number]),
                               (KEYBOARD_IFACE, "Release", "u", [number]))

    def button(self, code: int, down: bool) -> None:
        button = BUTTONS.get(code)
        if button is None:
            log.debug("%s: button %#x has no QEMU button; dropped", self.source.name, code)
            return
        link = self._link
        if link is not None and not link.mouse:
            return
        self._press_or_release(("button", button), down,
                               (MOUSE_IFACE, "Press" if down else "Release", "u", [button]),
                               (MOUSE_IFACE, "Release", "u", [button]))

    def wheel(self, dx: int, dy: int) -> None:
        link = self._link
        if link is not None and not link.mouse:
            return
        # A detent is a press and a release of a wheel "button"; both or neither are sent.
        for steps, forward, back in ((dy, QBTN_WHEEL_UP, QBTN_WHEEL_DOWN),
                                     (dx, QBTN_WHEEL_RIGHT, QBTN_WHEEL_LEFT)):
            if steps == 0:
                continue
            if forward == QBTN_WHEEL_RIGHT and link is not None and not link.horizontal_wheel:
                # QEMU does not check a button number against its InputButton: one it does not know
                # would index past its devices' button tables. Only a QEMU that lists its console's
                # Interfaces (added with MultiTouch in 8.1; Debian 12's 7.2 has none) is surely new
                # enough for wheel-left/right.
                continue
            button = forward if steps > 0 else back
            for _ in range(min(abs(steps), MAX_WHEEL_STEPS)):
                if not self._send((MOUSE_IFACE, "Press", "u", [button]), room=2):
                    return
                self._send((MOUSE_IFACE, "Release", "u", [button]))

    def pointer_abs(self, x: int, y: int) -> None:
        link = self._link
        if link is not None and not link.mouse:
            return
        self._send((MOUSE_IFACE, "SetAbsPosition", "uu", list(self._on_console(x, y))))

    def pointer_rel(self, dx: int, dy: int) -> None:
        link = self._link
        if (link is not None and not link.mouse) or (dx == 0 and dy == 0):
            return
        self._send((MOUSE_IFACE, "RelMotion", "ii", [_clamp32(dx), _clamp32(dy)]))

    def touch(self, kind: str, slot: int, x: int, y: int) -> None:
        link = self._link
        kind_number = TOUCH_TYPES.get(kind)
        if kind_number is None:
            log.debug("%s: touch kind %r is none of %s; dropped", self.source.name, kind, TOUCH_KINDS)
            return
        if link is not None and not link.touch:
            return
        if slot < 0 or (link is not None and slot >= link.max_slots):
            log.debug("%s: touch slot %d is outside QEMU's %d; dropped", self.source.name, slot,
                      link.max_slots if link else 0)
            return
        x, y = self._on_console(x, y)
        call = (MULTITOUCH_IFACE, "SendEvent", "utdd", [kind_number, slot, float(x), float(y)])
        end = (MULTITOUCH_IFACE, "SendEvent", "utdd", [_TOUCH_END, slot, float(x), float(y)])
        if kind in ("down", "motion"):
            if kind == "motion" and ("touch", slot) not in self._down:
                self._send(call)  # a contact the guest does not hold: nothing to owe for it
                return
            self._press_or_release(("touch", slot), True, call, end)
        else:
            self._press_or_release(("touch", slot), False, call, end)

    # --- what the daemon and tests read -------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._link is not None

    @property
    def outstanding(self) -> int:
        """Calls of the current connection QEMU has not answered yet."""
        return self._link.outstanding if self._link is not None else 0

    @property
    def stalled(self) -> bool:
        return self._stalled

    def status(self) -> dict[str, Any]:
        link = self._link
        return {"keyboard": bool(link and link.keyboard), "mouse": bool(link and link.mouse),
                "touch": bool(link and link.touch), "absolute": self._absolute,
                "outstanding": self.outstanding, "stalled": self._stalled, "sent": self.sent,
                "answered": self.answered, "refused": self.refused, "dropped": self.dropped}

    # --- sending -------------------------------------------------------------------------------------

    def _on_console(self, x: int, y: int) -> tuple[int, int]:
        """(x, y) moved onto the console: QEMU refuses a pointer position outside it and scales a touch
        outside it past its axes' range, and an unsigned position cannot be negative. A pointer just
        past the edge goes to the edge."""
        width, height = self.source._console_size or (_UINT32_MAX + 1, _UINT32_MAX + 1)
        return min(max(int(x), 0), width - 1), min(max(int(y), 0), height - 1)

    def _press_or_release(self, what: tuple[str, int], down: bool, call: _Call, release: _Call) -> None:
        if down:
            if self._send(call):
                self._down[what] = release
                self._owed.pop(what, None)
            else:
                # Dropped: if the guest still holds it from before, it holds it as the user does again.
                self._owed.pop(what, None)
        elif self._send(call):
            self._down.pop(what, None)
            self._owed.pop(what, None)
        elif what in self._down:
            self._owed[what] = release

    def _send(self, call: _Call, room: int = 1) -> bool:
        """Hand one call to the connection (not waiting for its answer); False when it was dropped."""
        link = self._link
        if link is None or not link.bus.connected:
            self.dropped += 1
            return False
        if self._stalled or link.outstanding + room > self.max_calls:
            self._stall()
            return False
        iface, member, signature, body = call
        msg = Message(destination=link.dest, path=link.path, interface=iface, member=member,
                      signature=signature, body=body)
        link.outstanding += 1
        try:
            # dbus-fast's callback form of a call: no future, no task per input event; the answer (or
            # the connection's end) comes to _answered.
            link.bus._call(msg, partial(self._answered, link, member))
        except Exception as exc:  # a value the message cannot carry: a bug of ours, not QEMU's
            link.bus._method_return_handlers.pop(msg.serial, None)
            link.outstanding -= 1
            self.dropped += 1
            log.warning("%s: could not send %s.%s%r to QEMU: %s", self.source.name, iface, member,
                        tuple(body), exc)
            return False
        self.sent += 1
        return True

    def _stall(self) -> None:
        self.dropped += 1
        self._stall_drops += 1
        if not self._stalled:
            self._stalled = True
            log.warning("%s: %d input calls wait for QEMU's answer (a stuck VM, or input faster than it "
                        "takes it); dropping the guest's input until QEMU catches up", self.source.name,
                        self.outstanding)

    def _answered(self, link: _InputLink, member: str, reply: Message | None, err: Exception | None) -> None:
        link.outstanding -= 1
        if link is not self._link or reply is None:
            return  # an older connection, or this one ending (the source's disconnect cleans up)
        self.answered += 1
        if reply.message_type == MessageType.ERROR:
            self.refused += 1
            log.debug("%s: QEMU refused input %s: %s %s", self.source.name, member, reply.error_name,
                      reply.body[0] if reply.body else "")
        if self._stalled and link.outstanding <= self.max_calls // 2:
            self._stalled = False
            log.info("%s: QEMU answers input calls again (%d input events were dropped)", self.source.name,
                     self._stall_drops)
            self._stall_drops = 0
            self._pay_owed()

    def _pay_owed(self) -> None:
        for what, release in list(self._owed.items()):
            if not self._send(release):
                return
            del self._owed[what]
            self._down.pop(what, None)

    # --- the connection ------------------------------------------------------------------------------

    async def _connect(self, bus: MessageBus, dest: str | None, path: str,
                       interfaces: list[str] | None) -> None:
        """Read what the console offers for input (Interfaces, MaxSlots, IsAbsolute) and send input to
        it from now on. A property QEMU will not give is logged and guessed: input is not worth losing
        the display over."""
        offered = list(LEGACY_INPUT_IFACES) if interfaces is None else list(interfaces)
        keyboard, mouse, touch = (i in offered for i in (KEYBOARD_IFACE, MOUSE_IFACE, MULTITOUCH_IFACE))
        max_slots = 0
        if touch:
            props = await self._properties(path, MULTITOUCH_IFACE)
            max_slots = max(0, int(_value(props.get("MaxSlots", 0)) or 0))
        if keyboard:
            props = await self._properties(path, KEYBOARD_IFACE)
            self.modifiers = int(_value(props.get("Modifiers", 0)) or 0)
        if mouse:
            changes = self._absolute_changes
            props = await self._properties(path, MOUSE_IFACE)
            if self._absolute_changes == changes and "IsAbsolute" in props:
                self._absolute = bool(_value(props["IsAbsolute"]))
        # No await from the last answer to here: a PropertiesChanged handled before this line has
        # already been applied, one after it finds the new link.
        self._link = _InputLink(bus, dest, path, keyboard, mouse, touch, max_slots,
                                horizontal_wheel=interfaces is not None)
        self._down.clear()
        self._owed.clear()
        self._stalled = False
        self._stall_drops = 0
        missing = [n.rsplit(".", 1)[-1] for n, has in ((KEYBOARD_IFACE, keyboard), (MOUSE_IFACE, mouse))
                   if not has]
        told = ", ".join(missing)
        if told != (self._told_interfaces or ""):
            if missing:
                log.info("%s: the console has no %s interface: %s", self.source.name, " or ".join(missing),
                         "input to this guest is dropped" if len(missing) == 2 else "that input is dropped")
            else:
                log.info("%s: the console takes keyboard and mouse input again", self.source.name)
        self._told_interfaces = told
        log.debug("%s: input: keyboard %s, mouse %s (%s), touch %s (%d slots)", self.source.name, keyboard,
                  mouse, "absolute" if self._absolute else "relative", touch, max_slots)

    async def _properties(self, path: str, iface: str) -> dict[str, Any]:
        try:
            return await self.source._get_all(path, iface)
        except (DBusError, TimeoutError) as exc:  # QEMU said no; a closed connection fails the connect
            log.warning("%s: reading QEMU's %s properties: %s", self.source.name, iface, _describe_error(exc))
            return {}

    def _disconnect(self) -> None:
        self._link = None
        self._down.clear()
        self._owed.clear()
        self._stalled = False
        self._stall_drops = 0

    def _on_properties(self, iface: str, changed: dict[str, Any]) -> None:
        """A PropertiesChanged of the console's input interfaces."""
        if iface == MOUSE_IFACE and "IsAbsolute" in changed:
            self._absolute_changes += 1
            absolute = bool(_value(changed["IsAbsolute"]))
            if absolute != self._absolute:
                log.info("%s: the guest's pointer is now %s", self.source.name,
                         "absolute" if absolute else "relative")
            self._absolute = absolute
        elif iface == KEYBOARD_IFACE and "Modifiers" in changed:
            self.modifiers = int(_value(changed["Modifiers"]) or 0)
        elif iface == MULTITOUCH_IFACE and "MaxSlots" in changed and self._link is not None:
            self._link.max_slots = max(0, int(_value(changed["MaxSlots"]) or 0))


def _clamp32(value: int) -> int:
    return min(max(int(value), _INT32[0]), _INT32[1])


# --------------------------------------------------------------------------------- the source

@dataclass
class _Surface:
    """Our copy of QEMU's surface for the pixel path: a memfd the daemon copies from, mapped here."""

    buffer: Buffer
    map: mmap.mmap
    pixman: int

    @property
    def info(self) -> PlaneInfo:
        return self.buffer.info

    def write(self, x: int, y: int, width: int, height: int, src, stride: int, offset: int = 0) -> None:
        """Copy width x height pixels of `src` (rows `stride` bytes apart from byte `offset`) to (x, y)
        of the surface. kms_copy_rows checks both sides' rows against their sizes: QEMU's message says
        how its bytes are laid out, and a copy past our mapping would crash the daemon."""
        info = self.info
        bpp = info.bytes_per_pixel
        copy_rows(self.map, info.offset + y * info.stride + x * bpp, info.stride, src, offset, stride, height,
                  width * bpp)


@dataclass
class _Scanout:
    kind: str  # dmabuf | map | pixels
    buffer: Buffer
    y0_top: bool = True


@dataclass
class _HeldUpdate:
    x: int
    y: int
    width: int
    height: int
    stride: int
    pixman: int
    data: bytes


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
        self._scanout: _Scanout | None = None
        self._surface: _Surface | None = None
        self._console_size: tuple[int, int] | None = None
        self._held: list[_HeldUpdate] = []
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
                        size[1], _describe_error(exc))
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
        self._notify("on_close", reason)

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
                    reason = _describe_error(exc)
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
        self.vm_name = _value(vm.get("Name"))
        self.vm_uuid = _value(vm.get("UUID"))
        consoles = _value(vm.get("ConsoleIDs"))
        if consoles is not None and target.console not in consoles:
            raise LookupError(f"VM {self.vm_name!r} has consoles {sorted(consoles)}, not {target.console}")
        console = await self._get_all(console_path(target.console), CONSOLE_IFACE)
        self.console_label = _value(console.get("Label"))
        kind = _value(console.get("Type"))
        if kind not in (None, "Graphic"):
            raise LookupError(f"console {target.console} of VM {self.vm_name!r} is a {kind} console, "
                              f"not a graphic one")
        width, height = _value(console.get("Width")), _value(console.get("Height"))
        if width and height:
            self._console_size = (int(width), int(height))
        # Before the listener: once it is registered frames may come, and nothing after that may fail.
        await self.input._connect(main, self._dest, console_path(target.console),
                                  _value(console.get("Interfaces")))
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
            task.add_done_callback(_retrieve)
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        task = next(iter(done))
        exc = None if task.cancelled() else task.exception()
        detail = f": {_describe_error(exc)}" if exc is not None and not isinstance(exc, EOFError) else ""
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
            self._notify("on_blank", text)

    def _gone(self, reason: str) -> None:
        log.info("%s: %s", self.name, reason)
        self.last_error = reason
        self.peer = None
        self._drop_scanout_state()
        self._notify("on_blank", reason)
        for buffer in self._take_all_buffers():
            self._notify("on_forget", buffer)

    def _drop_scanout_state(self) -> None:
        self._scanout = None
        self._console_size = None
        self._held.clear()
        self._held_bytes = 0
        if self._surface is not None:
            self._surface.map.close()
            self._surface = None

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
                width = _value(changed.get("Width"))
                height = _value(changed.get("Height"))
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
        self._show(_Scanout("dmabuf", buffer, y0_top), None)

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
        self._show(_Scanout("map", buffer), None)

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
        self._show(_Scanout("pixels", surface.buffer), None)

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
        update = _HeldUpdate(x, y, width, height, stride, pixman, data)
        surface = self._surface
        if (surface is None or surface.pixman != pixman or x + width > surface.info.width
                or y + height > surface.info.height):
            self._hold(update)
            return
        self._apply(surface, update)
        if self._scanout is not None and self._scanout.buffer is surface.buffer:
            self._emit(self._scanout, (x, y, width, height))
        else:  # back from a dma-buf or map scanout to the pixel surface
            self._show(_Scanout("pixels", surface.buffer), (x, y, width, height))

    def _disable(self) -> None:
        if self._scanout is None:
            self.stats.ignored += 1
            return
        self._scanout = None
        for buffer in self._take_all_buffers():  # QEMU releases its dma-bufs with Disable
            self._notify("on_forget", buffer)
        if self._surface is not None:
            self._surface.map.close()
            self._surface = None
        log.info("%s: QEMU disabled the display", self.name)
        self._notify("on_blank", f"{self.name}'s display is off")

    def _mouse_set(self, x: int, y: int, on: int) -> None:
        self.pointer = Pointer(x, y, bool(on))
        self._notify("on_cursor")

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
        self._notify("on_cursor")

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
        self._notify("on_forget", buffer)

    def _new_surface(self, width: int, height: int, pixman: int, carry: bool = True) -> _Surface:
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
        surface = _Surface(buffer, mem, pixman)
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

    def _show(self, scan: _Scanout, damage: tuple[int, int, int, int] | None) -> None:
        self._scanout = scan
        self._touch(scan.buffer.id)
        self._emit(scan, damage)

    def _emit(self, scan: _Scanout, damage: tuple[int, int, int, int] | None) -> None:
        self._seq += 1
        self.stats.frames += 1
        self._notify("on_frame", QemuFrame(scan.buffer, self._seq, damage=damage, y0_top=scan.y0_top))

    def _notify(self, callback: str, *args: Any) -> None:
        fn = getattr(self.handler, callback, None)
        if fn is None:
            return
        try:
            fn(self, *args)
        except Exception:
            log.exception("%s: the handler's %s failed", self.name, callback)

    # --- pixel updates that wait for a resize --------------------------------------------------------

    def _apply(self, surface: _Surface, update: _HeldUpdate) -> None:
        surface.write(update.x, update.y, update.width, update.height, update.data, update.stride)

    def _hold(self, update: _HeldUpdate) -> None:
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

    def _fits_console(self, update: _HeldUpdate) -> bool:
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
                sizes.append(int(_value(reply.body[0])))
            self._console_size = (sizes[0], sizes[1])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            level = logging.WARNING if self.state == "connected" else logging.DEBUG
            log.log(level, "%s: asking QEMU for the console's size: %s", self.name, _describe_error(exc))
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
        kept: list[_HeldUpdate] = []
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
            self._show(_Scanout("pixels", surface.buffer), None)

    def _drop_held(self) -> None:
        self._held.clear()
        self._held_bytes = 0


# --------------------------------------------------------------------------------- helpers

def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def _clip(x: int, y: int, width: int, height: int, limit_w: int, limit_h: int
          ) -> tuple[int, int, int, int] | None:
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(limit_w, x + width), min(limit_h, y + height)
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1 - x0, y1 - y0)


def _value(v: Any) -> Any:
    return v.value if isinstance(v, Variant) else v


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


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, DBusError):
        return f"{exc.type}: {exc.text}"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "QEMU did not answer in time"
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


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
