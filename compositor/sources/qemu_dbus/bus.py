"""QEMU's D-Bus display vocabulary (object paths, interface and error names) and the connections to
it: `DisplayBus` for a bus or a connection dbus-fast makes, `PeerBus` over an already connected
socket (peer to peer, either side of the authentication)."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Annotated, Any

from dbus_fast import DBusError, Message, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.aio.message_bus import _MessageWriter
from dbus_fast.aio.message_reader import build_message_reader
from dbus_fast.annotations import DBusSignature
from dbus_fast.service import ServiceInterface

DBusStrings = Annotated[list[str], DBusSignature("as")]

ROOT = "/org/qemu/Display1"
VM_PATH = f"{ROOT}/VM"
LISTENER_PATH = f"{ROOT}/Listener"
VM_IFACE = "org.qemu.Display1.VM"
CONSOLE_IFACE = "org.qemu.Display1.Console"
LISTENER_IFACE = "org.qemu.Display1.Listener"
MAP_IFACE = "org.qemu.Display1.Listener.Unix.Map"
KEYBOARD_IFACE = "org.qemu.Display1.Keyboard"
MOUSE_IFACE = "org.qemu.Display1.Mouse"
MULTITOUCH_IFACE = "org.qemu.Display1.MultiTouch"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
# QEMU's own error names (ui/dbus.h: DBUS_DISPLAY_ERROR)
ERROR_FAILED = "org.qemu.Display1.Error.Failed"
ERROR_INVALID = "org.qemu.Display1.Error.Invalid"
ERROR_UNSUPPORTED = "org.qemu.Display1.Error.Unsupported"

CALL_TIMEOUT = 10.0  # seconds for any call we make to QEMU


def console_path(index: int) -> str:
    return f"{ROOT}/Console_{index}"


def retrieve_exception(task: asyncio.Future) -> None:
    """Mark a finished future's exception as retrieved: asyncio would otherwise log it ("exception was
    never retrieved") from the future's finalizer, at some later moment."""
    if not task.cancelled():
        task.exception()


def variant_value(v: Any) -> Any:
    return v.value if isinstance(v, Variant) else v


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, DBusError):
        return f"{exc.type}: {exc.text}"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "QEMU did not answer in time"
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


_UNUSED_ADDRESS = "unix:abstract=directflip-peer-to-peer"  # parsed by the base class, never connected


class DisplayBus(MessageBus):
    """dbus-fast's MessageBus, minus one kind of noise: replies and signals are sent with futures nobody
    awaits, and the connection's end is a future nobody need await; when the peer goes, errors land in
    them, and asyncio would log each "exception was never retrieved" from a finalizer at some later
    moment. Whoever awaits one of them still gets its exception."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._disconnect_future.add_done_callback(retrieve_exception)

    def send(self, msg: Message) -> asyncio.Future:
        if self._disconnected or self._user_disconnect:
            # A reply to a call that was being handled when the connection was closed (shutdown, the
            # VM gone): there is no one left to send it to.
            future = asyncio.get_running_loop().create_future()
            future.set_exception(ConnectionError("the D-Bus connection is closed"))
            future.add_done_callback(retrieve_exception)
            return future
        future = super().send(msg)
        future.add_done_callback(retrieve_exception)
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
