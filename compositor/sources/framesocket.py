"""The frame socket: a Unix socket through which a VMM or launcher hands the compositor a guest's
buffers (dma-bufs) and says which one to show. docs/frame-socket.md is the protocol's specification;
this module implements both ends of it.

Wire format (compositor.sources.fswire): every message is a 4-byte little-endian length N (1..65536) and
N bytes of UTF-8 JSON, an object with a string "type"; version 2, agreed in hello and welcome, adds
binary records for flip, presented and released. The one message that carries a file descriptor
("buffer") sends it as SCM_RIGHTS in the same sendmsg as the message's first bytes. A stream socket does
not keep message boundaries for ancillary data, so the receiver matches descriptors to messages by
stream position: Linux hands a descriptor out with the first recvmsg that reads any byte of the sendmsg
it came with, and ends that recvmsg after those bytes. Every descriptor therefore arrives in the same
recvmsg chunk as the first byte of the buffer message it belongs to; one that did not is a protocol
error, never a guess.

Server (the daemon's one asyncio loop, no threads): FrameSocketServer accepts clients and gives each a
GuestConnection, which reads and checks messages and calls the daemon's GuestHandler. A client that
breaks the protocol is sent an error naming the cause and closed; other clients never notice.

Input (server → client, after welcome): GuestConnection.input is the connection's InputSink
(FrameSocketInput): key, button, pointer, motion, wheel and touch messages. Input never blocks and never
disconnects a client: past MAX_QUEUED_INPUT unsent bytes it is dropped and counted, except the
releases of what the guest was told is pressed, which are kept (at most one per key, button or touch
slot) and sent once the client catches up, so nothing stays pressed in the guest.

Pointer image (client → server): "cursor" defines the guest's pointer image (ARGB8888, at most
MAX_CURSOR_SIZE pixels a side, base64) and "cursor-move" says where its hot spot is and whether it
shows. The connection keeps only the latest of each (GuestConnection.cursor, .pointer) and calls the
handler's optional on_cursor, so the daemon can put the image on the monitor's cursor plane.

Client (blocking, for guests, launchers and tests): FrameSocketClient.
"""

from __future__ import annotations

import array
import asyncio
import base64
import binascii
import errno
import fcntl
import functools
import logging
import math
import os
import re
import select
import socket
import stat
import struct
import termios
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, NamedTuple, ParamSpec, Protocol

from compositor import fdguard
from compositor.formats import DRM_FORMAT_MOD_LINEAR, fourcc
from compositor.input.sink import TOUCH_KINDS
from compositor.limits import DEFAULT_LIMITS, MAX_BUFFERS, MAX_PENDING_FDS, Limits  # noqa: F401

# The socket paths live in compositor.paths, which `directflip status` imports without asyncio and the
# KMS layer; they are re-exported here, where the daemon and the synthetic guest import them from.
from compositor.paths import DEFAULT_FRAME_SOCKET, RUN_DIR, socket_paths  # noqa: F401
from compositor.sources import SourceDefaults
from compositor.sources.frame import (
    MAX_DIMENSION,
    BadPlane,
    Buffer,
    Cursor,
    Frame,
    PlaneInfo,
    dmabuf_size,
)

# frame.Pointer is where a guest's pointer is (what cursor-move says); this module's Pointer is the
# client's input event (what the compositor says). Both names are public, so the import is renamed.
from compositor.sources.frame import Pointer as GuestPointer
from compositor.sources.fswire import (  # noqa: F401  (Decoder, encode: the wire format's public names)
    CLIENT,
    FLIP,
    MAX_MESSAGE,
    PRESENTED,
    RELEASED,
    SERVER,
    VERSIONS,
    Decoder,
    ProtocolError,
    Record,
    encode,
    flip_record,
    json_kind,
    presented_record,
    released_record,
)

if TYPE_CHECKING:
    from compositor.input.sink import InputSink

log = logging.getLogger("directflip.framesocket")

PROTOCOL_VERSION = max(VERSIONS)  # the newest version spoken; hello and welcome agree on one
MAX_FDS_PER_RECV = 16  # a well-behaved client sends one per buffer message
MAX_QUEUED_OUTPUT = 1 << 20  # bytes waiting for a client that does not read its socket
# Unsent bytes past which input is dropped: far below MAX_QUEUED_OUTPUT, so input alone never gets a
# client closed, and a guest that catches up is not handed seconds of stale pointer motion.
MAX_QUEUED_INPUT = 64 * 1024
POINTER_MODES = ("absolute", "relative")
KEY_MAX = 0x2FF  # evdev KEY_MAX: the highest key or button code
MAX_TOUCH_SLOT = 255
# Pixels per side of a guest's pointer image. Every cursor plane takes 64x64 (most take nothing larger
# that all drivers agree on), and the base64 of 64x64 ARGB8888 (21848 bytes) fits one message easily.
MAX_CURSOR_SIZE = 64
_I32_MIN, _I32_MAX = -2**31, 2**31 - 1
MAX_BUFFER_ID = 2**32 - 1
_U32 = 2**32 - 1
_U64 = 2**64 - 1
_RECV_SIZE = 256 * 1024  # thousands of flips per recvmsg
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_RECV * 4)
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
_INTERNAL_ERROR = "internal error in the compositor"
_Args = ParamSpec("_Args")  # the arguments of a GuestHandler callback after the connection




class Refused(Exception):
    """Raise from a GuestHandler callback to turn the client away; str(exc) is the reason it is sent.
    From on_hello it refuses the guest; from a later callback it closes the connection."""


class ServerError(Exception):
    """The compositor sent error(reason) or closed the connection; str(exc) is the reason."""


CLOSED = "the compositor closed the connection"  # a ServerError's text when no reason was sent


_json_kind = json_kind


_REQUIRED: Any = object()


def _int_field(msg: dict[str, Any], key: str, lo: int, hi: int, default: int = _REQUIRED) -> int:
    if key not in msg:
        if default is _REQUIRED:
            raise ProtocolError(f'{msg["type"]}: "{key}" is missing')
        return default
    value = msg[key]
    if type(value) is not int:  # not bool, not 1.0
        raise ProtocolError(f'{msg["type"]}: "{key}" must be an integer, not {_json_kind(value)}')
    if not lo <= value <= hi:
        raise ProtocolError(f'{msg["type"]}: "{key}" {value} is outside {lo}..{hi}')
    return value


def _str_field(msg: dict[str, Any], key: str) -> str:
    if key not in msg:
        raise ProtocolError(f'{msg["type"]}: "{key}" is missing')
    value = msg[key]
    if not isinstance(value, str):
        raise ProtocolError(f'{msg["type"]}: "{key}" must be a string, not {_json_kind(value)}')
    return value


def _choice_field(msg: dict[str, Any], key: str, choices: tuple[str, ...], default: str | None = None) -> str:
    if key not in msg and default is not None:
        return default
    value = _str_field(msg, key)
    if value not in choices:
        quoted = [f'"{c}"' for c in choices]
        expected = f"{', '.join(quoted[:-1])} or {quoted[-1]}" if len(quoted) > 1 else quoted[0]
        raise ProtocolError(f'{msg["type"]}: "{key}" {value[:40]!r} is not {expected}')
    return value


def _base64_field(msg: dict[str, Any], key: str) -> bytes:
    """A string member holding standard base64 with its padding, no whitespace, decoded. Only the
    canonical encoding is accepted (no extra padding, no stray bits in the last character), so one
    image has one spelling on the wire."""
    text = _str_field(msg, key)
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except UnicodeEncodeError as exc:
        raise ProtocolError(f'{msg["type"]}: "{key}" is not base64 (a non-ASCII character at '
                            f"{exc.start})") from None
    except binascii.Error as exc:
        raise ProtocolError(f'{msg["type"]}: "{key}" is not base64 ({exc})') from None
    if base64.b64encode(data).decode("ascii") != text:
        raise ProtocolError(f'{msg["type"]}: "{key}" is not canonical base64 (padding past the data, '
                            "or stray bits in its last character)")
    return data


def _bool_field(msg: dict[str, Any], key: str) -> bool:
    if key not in msg:
        raise ProtocolError(f'{msg["type"]}: "{key}" is missing')
    value = msg[key]
    if type(value) is not bool:  # 0 and 1 are not booleans
        raise ProtocolError(f'{msg["type"]}: "{key}" must be a boolean, not {_json_kind(value)}')
    return value


# ------------------------------------------------------------------------------------------- server

@dataclass(frozen=True)
class Peer:
    """Who is on the other end, from SO_PEERCRED when the connection was accepted."""

    pid: int
    uid: int
    gid: int


class GuestHandler(Protocol):
    """What the daemon does with a guest's messages. Callbacks run on the event loop and must not block.
    Raising Refused closes the client with that reason; any other exception is logged with its
    traceback and closes only that client.

    The server calls every method directly. may_connect, on_cursor and on_dataplane have defaults
    here (let the client in, ignore the pointer image, nothing to do): a handler that subclasses
    GuestHandler inherits them, one that only matches it must define all three."""

    def may_connect(self, uid: int) -> str | None:
        """Checked as a client of `uid` connects, before it may send anything: None lets it in, else
        why not. The default lets every uid in (the server's own limits still apply)."""
        return None

    def on_hello(self, conn: GuestConnection) -> None:
        """conn.name, conn.uuid and conn.peer are known. Raise Refused(reason) to turn the guest away."""

    def on_buffer(self, conn: GuestConnection, buffer: Buffer) -> None:
        """A buffer was announced and checked; it is in conn.buffers and the server still owns it."""

    def on_flip(self, conn: GuestConnection, frame: Frame) -> None:
        """Show frame.buffer (one of conn.buffers). Answer later with conn.released / conn.presented."""

    def on_forget(self, conn: GuestConnection, buffer: Buffer) -> None:
        """The guest destroyed `buffer`: it has left conn.buffers and the handler now owns it. Close it
        once it is off screen; send no more released/presented for it."""

    def on_vfio_device(self, conn: GuestConnection, fd: int) -> None:
        """The guest is a vGPU: its VMM handed over the VFIO device fd, which the handler now owns."""

    def on_cursor(self, conn: GuestConnection) -> None:
        """A cursor or cursor-move message changed conn.cursor (a new image, new serial) or
        conn.pointer. Read both; only the latest counts. The default ignores it: a handler without a
        cursor plane to feed need not know the message."""
        return None

    def on_close(self, conn: GuestConnection, reason: str) -> None:
        """The connection is gone (called once, only for connections that got past hello). The handler
        now owns every buffer still in conn.buffers and must close each once it is off screen."""

    def on_dataplane(self, conn: GuestConnection) -> None:
        """The server's data plane serves conn from now on (conn.dp_conn is its handle). The default
        does nothing."""
        return None


class _PendingFd(NamedTuple):
    fd: int
    since: int  # stream offsets of the recvmsg chunk it came with: [since, until)
    until: int
    described: fdguard.Described | None  # what it is (None: it could not be inspected)


_BUFFER_KINDS = frozenset({fdguard.Kind.DMABUF, fdguard.Kind.MEMFD})
_VFIO_KINDS = frozenset({fdguard.Kind.VFIO_DEVICE})


class GuestConnection(SourceDefaults):
    """One client of the frame socket: its guest's identity, buffers and socket.

    Buffers: the server creates a Buffer (owning a duplicate of the guest's dma-buf fd) when the guest
    announces it and keeps it in `buffers`. On "forget" it leaves `buffers` and on_forget hands it to
    the handler; when the connection closes, on_close hands the handler every buffer still in
    `buffers`. Either way the handler closes them once they are off screen.

    released() and presented() may be called at any time: after the connection closed, or for a buffer
    no longer in `buffers` (forgotten), they do nothing. They never call back into the handler; a
    client found dead or not reading while sending is closed from the loop just after.

    Input: `input` (a FrameSocketInput) is the guest's InputSink, `pointer_mode` ("absolute" or
    "relative") what the client asked for, `dropped_input` how many input messages it lost by not
    reading its socket.

    Pointer image: `cursor` is the guest's latest Cursor (None until it sent one; its serial counts
    this connection's cursor messages from 1) and `pointer` its latest GuestPointer (None until it
    sent cursor-move). Each message replaces the one before, then the handler's on_cursor is called.
    """

    def __init__(self, server: FrameSocketServer, sock: socket.socket, peer: Peer) -> None:
        self.name = ""  # set by hello
        self.uuid: str | None = None
        self.peer = peer
        self.buffers: dict[int, Buffer] = {}
        self.vfio_fd: int | None = None  # a handed-over VFIO device fd; the handler owns it
        self.closed = False
        self._server = server
        self._loop = server._loop
        self._sock = sock
        self._fileno = sock.fileno()
        self.version = 1  # the protocol version hello and welcome agreed on
        self._decoder = Decoder(SERVER)
        self._flush_due = False  # a flush of the binary records queued in _out is scheduled
        self._received = 0  # stream offset: bytes received so far
        self._fds: deque[_PendingFd] = deque()
        self._out = bytearray()  # bytes the client has not taken yet
        self._writing = False
        self._failing = False
        self._fail_reason = ""  # why _fail_soon will close it
        self._welcomed = False
        self.pointer_mode = "absolute"  # hello's "pointer", then pointer-mode messages
        self.input: InputSink = FrameSocketInput(self)
        self.dropped_input = 0  # input messages dropped because the client did not read
        self._dropping_input = False  # from the queue passing MAX_QUEUED_INPUT until it is empty
        self._held: set[tuple[str, int]] = set()  # keys, buttons, touch slots the guest was told are down
        self._owed: dict[tuple[str, int], dict[str, Any]] = {}  # their releases that came while dropping
        self.cursor: Cursor | None = None  # the guest's pointer image, from its latest cursor message
        self.pointer: GuestPointer | None = None  # where its hot spot is, from its latest cursor-move
        self._cursor_serial = 0  # cursor messages so far: each new image gets the next serial
        # The native data plane (compositor.dataplane), once it reads and writes this socket: its
        # handle of the connection, or -1 while this object does (before welcome, version 1, or
        # no data plane).
        self.dp_conn = -1
        self._dp_wanted = False
        self._catching_up = False  # reading on from _catch_up: the socket is not handed over meanwhile
        timeout = server.limits.hello_timeout
        self._hello_timer: asyncio.TimerHandle | None = self._loop.call_later(
            timeout, lambda: None if self._welcomed else self._finish(
                f"no hello within {timeout:g} s (directflip run --hello-timeout)", logging.WARNING))

    def __repr__(self) -> str:
        return f"<GuestConnection {self._who()}{' closed' if self.closed else ''}>"

    # --- the daemon's side

    def released(self, buffer_id: int) -> None:
        """Tell the guest the compositor no longer reads buffer_id: it may draw into it again."""
        if buffer_id in self.buffers:
            if self.version >= 2:
                self._send_record(released_record(buffer_id))
            else:
                self._send({"type": "released", "id": buffer_id})

    def presented(self, buffer_id: int, frame: int, timestamp_ns: int, sequence: int) -> None:
        """Tell the guest buffer_id reached the screen: the flip completed at timestamp_ns
        (CLOCK_MONOTONIC, from the kernel's flip event), CRTC vblank sequence `sequence`."""
        if buffer_id in self.buffers:
            if self.version >= 2:
                self._send_record(presented_record(buffer_id, frame, timestamp_ns, sequence))
            else:
                self._send({"type": "presented", "id": buffer_id, "frame": frame,
                            "timestamp_ns": timestamp_ns, "sequence": sequence})

    def close(self, reason: str) -> None:
        """Send error(reason) if still open, close the socket and call on_close (if past hello)."""
        self._finish(reason, logging.INFO)

    # --- the rest of compositor.sources.Source (SourceDefaults for the others): a frame-socket
    # guest has no fields of its own in status.

    def guest_status(self) -> dict[str, Any]:
        return {}

    # --- reading

    def _on_readable(self) -> None:
        self._read_once()

    def _read_once(self) -> int | None:
        """One recvmsg and every message it completes; the bytes read (0 at the end of the stream),
        or None when nothing was there or the connection failed."""
        if self._welcomed:
            size, space = _RECV_SIZE, _ANCILLARY_SPACE
        else:
            # Until admitted: no room for descriptors, and no byte past the message being read, so that
            # the descriptors of what a client sent behind its hello wait in the socket for the welcome.
            # The kernel drops any that come with these bytes (it does not close them here, which
            # could wait on their filesystem) and says so with MSG_CTRUNC.
            size, space = self._decoder.needed(), 0
        try:
            data, ancdata, flags, _ = self._sock.recvmsg(size, space, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return None
        except ConnectionResetError:
            # The client closed with our messages unread. Linux says so only once every byte it sent
            # has been read, so this is an end of stream like any other.
            data, ancdata, flags = b"", [], 0
        except OSError as exc:
            self._finish(f"connection lost ({exc.strerror})", logging.WARNING, send_error=False)
            return None
        fds = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[:len(payload) - len(payload) % got.itemsize])
                fds.extend(got)
        self._take(data, fds, 0, bool(flags & socket.MSG_CTRUNC), not data and not ancdata)
        self._maybe_attach()
        return len(data)

    def _take(self, data: bytes, fds: list[int], fds_from: int, lost_fds: bool, eof: bool) -> None:
        """Bytes received (read here, or handed over by the data plane) and every message they
        complete. `fds` came with the recvmsg that began at data[fds_from:]; `eof`: the stream
        ended after `data`."""
        since = self._received
        self._received += len(data)
        # Take ownership of every descriptor before anything can fail: from here on _finish lets them go.
        # What each one is comes first, from the kernel's word alone (compositor.fdguard).
        pending = [_PendingFd(fd, since + fds_from, self._received, _describe(fd)) for fd in fds]
        self._fds.extend(pending)
        try:
            if lost_fds and not self._welcomed:
                raise ProtocolError("file descriptors came with hello or before it: they are taken only "
                                    "once the guest is admitted (with the messages after hello)")
            for got in pending:
                if got.described is None or got.described.kind is fdguard.Kind.OTHER:
                    what = got.described or "of unknown kind"
                    raise ProtocolError(f"a file descriptor sent is {what}, not "
                                        f"{fdguard.wanted(_BUFFER_KINDS | _VFIO_KINDS)}")
            if lost_fds:
                raise ProtocolError(f"file descriptors were lost: more than {MAX_FDS_PER_RECV} in one "
                                    "sendmsg, or the compositor is out of descriptors")
            if len(self._fds) > MAX_PENDING_FDS:
                raise ProtocolError(f"{len(self._fds)} file descriptors sent ahead of their buffer messages")
            for msg in self._decoder.feed(data):
                self._dispatch(msg, self._decoder.start)
                if self.closed:
                    return
            if eof:
                self._on_eof()
        except ProtocolError as exc:
            self._finish(str(exc), logging.WARNING)

    # --- the data plane

    def _maybe_attach(self) -> None:
        """Hand the socket to the data plane once this side holds nothing of the stream (no partial
        message, no descriptor waiting, nothing unsent): from then on it reads and writes it."""
        if not self._dp_wanted or self.dp_conn >= 0 or self.closed or self._failing or self._catching_up:
            return
        if self._decoder.pending or self._fds or self._out or self._writing:
            return
        dp = self._server.dataplane
        try:
            handle = dp.add_conn(self._fileno)
        except OSError as exc:
            log.warning("%s: the data plane cannot take it (%s): served from Python", self._who(), exc)
            self._dp_wanted = False
            return
        self._loop.remove_reader(self._fileno)
        self.dp_conn = handle
        self._server.dp_connections[handle] = self
        log.debug("%s: on the data plane", self._who())
        self._call(self._server.handler.on_dataplane)

    def dp_event(self, event) -> None:
        """An event of the data plane about this connection (compositor.dataplane)."""
        from compositor import dataplane as dpm
        dp = self._server.dataplane
        if self.closed:
            return
        if event.kind == dpm.DATA:
            try:
                taken = dp.take(self.dp_conn)
            except OSError:
                return
            self._take(taken.data, taken.fds, taken.fds_from, taken.lost_fds, taken.eof)
            if not self.closed:
                try:
                    dp.resume(self.dp_conn, fast=not self._decoder.pending and not self._fds)
                except OSError as exc:
                    self._finish(f"connection lost ({exc.strerror})", logging.WARNING, send_error=False)
        elif event.kind == dpm.CLOSED:
            reason = ("not reading its socket" if event.a == errno.ENOBUFS
                      else f"connection lost ({os.strerror(event.a)})")
            self._finish(reason, logging.WARNING, send_error=event.a == errno.ENOBUFS)
        elif event.kind == dpm.DRAINED and self._dropping_input:
            self._input_drained()

    def _queued(self) -> int:
        """Bytes the client has not taken yet."""
        if self.dp_conn >= 0:
            try:
                return self._server.dataplane.send(self.dp_conn, b"")
            except OSError:
                return 0
        return len(self._out)

    def _dp_send(self, data: bytes) -> None:
        try:
            self._server.dataplane.send(self.dp_conn, data, drained=self._dropping_input)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                self._fail_soon("not reading its socket")
            else:
                self._fail_soon(f"connection lost ({exc.strerror})")

    def _catch_up(self) -> None:
        """Handle what the client had already sent, now rather than when the loop comes round to it:
        a newcomer claims this connection's name, and a `bye` or hang-up queued here must free the
        name before that claim is judged. Non-blocking and bounded: it reads the bytes queued when
        it starts (at most the socket's buffer) plus one recvmsg, never waits for more, so a client
        that keeps writing cannot hold the loop, and a connection that has not ended stays open."""
        if self.closed:
            return
        if self._failing:  # already doomed (not reading, or gone): it would be closed next round
            self._finish(self._fail_reason, logging.WARNING)
            return
        if self.dp_conn >= 0:
            # The data plane reads this socket: have it stop and hand over what it holds; what the
            # socket still holds is read below, then the data plane reads on.
            dp = self._server.dataplane
            try:
                dp.pause(self.dp_conn)
                taken = dp.take(self.dp_conn)
            except OSError as exc:
                self._finish(f"connection lost ({exc.strerror})", logging.WARNING, send_error=False)
                return
            self._take(taken.data, taken.fds, taken.fds_from, taken.lost_fds, taken.eof)
            try:
                self._catch_up_socket()
            finally:
                if not self.closed:
                    try:
                        dp.resume(self.dp_conn, fast=not self._decoder.pending and not self._fds)
                    except OSError:
                        pass
            return
        self._catch_up_socket()

    def _catch_up_socket(self) -> None:
        self._catching_up = True
        try:
            self._catch_up_reads()
        finally:
            self._catching_up = False
        if self.dp_conn < 0:
            self._maybe_attach()

    def _catch_up_reads(self) -> None:
        try:
            queued = struct.unpack("i", fcntl.ioctl(self._fileno, termios.FIONREAD, b"\0" * 4))[0]
        except OSError:
            queued = 0  # unknown: one read still sees a pending end of stream
        while not self.closed:
            got = self._read_once()
            if got is None:
                return
            queued -= got
            if queued < 0:  # past what was queued when the claim came: the loop reads the rest
                return

    def _on_eof(self) -> None:
        if self._fds:
            raise ProtocolError(f"{len(self._fds)} file descriptor(s) sent that no buffer message claimed")
        if self._decoder.pending:
            raise ProtocolError("connection closed in the middle of a message")
        self._finish("client hung up without bye", logging.INFO, send_error=False)

    def _dispatch(self, msg: dict[str, Any] | Record, start: int) -> None:
        if msg.__class__ is Record:  # version 2's flip: the one message of every frame
            if self._fds and self._fds[0].until <= start:
                raise ProtocolError(self._unclaimed_fds())
            buffer = self.buffers.get(msg.id)
            if buffer is None:
                raise ProtocolError(f"flip of unknown buffer {msg.id}")
            self._call(self._server.handler.on_flip, Frame(buffer=buffer, seq=msg.frame))
            return
        kind = msg["type"]
        if kind not in ("buffer", "vfio-device") and self._fds and self._fds[0].until <= start:
            raise ProtocolError(self._unclaimed_fds())
        if not self._welcomed:
            if kind != "hello":
                raise ProtocolError(f'the first message must be "hello", not {kind[:40]!r}')
            self._on_hello(msg)
            return
        self._on_message(kind, msg, start)

    def _on_message(self, kind: str, msg: dict[str, Any], start: int) -> None:
        """A JSON message of a welcomed guest, by its type (`start`: where its bytes began)."""
        if kind == "flip":
            buffer = self._known(msg)
            frame = Frame(buffer=buffer, seq=_int_field(msg, "frame", 0, _U64, 0))
            self._call(self._server.handler.on_flip, frame)
        elif kind == "buffer":
            self._on_buffer(msg, start)
        elif kind == "forget":
            buffer = self._known(msg)
            del self.buffers[buffer.id]
            self._call(self._server.handler.on_forget, buffer)
        elif kind == "vfio-device":
            self._on_vfio_device(start)
        elif kind == "cursor":
            self._on_cursor(msg)
        elif kind == "cursor-move":
            self._on_cursor_move(msg)
        elif kind == "pointer-mode":
            self.pointer_mode = _choice_field(msg, "mode", POINTER_MODES)
            # DEBUG: a client may switch as often as it likes, and the log must not be its to flood
            log.debug("%s: pointer mode %s", self._who(), self.pointer_mode)
        elif kind == "bye":
            self._finish("bye", logging.INFO, send_error=False)
        elif kind == "hello":
            raise ProtocolError("hello sent twice")
        else:
            raise ProtocolError(f"unknown message type {kind[:40]!r}")

    def _on_hello(self, msg: dict[str, Any]) -> None:
        # `version`: the oldest version the client speaks; `max_version` (optional): its newest. Old
        # compositors know only `version`, so a client says 1 there and its newest in max_version.
        version = _int_field(msg, "version", 0, _U32)
        newest = _int_field(msg, "max_version", 0, _U32, version)
        if newest < version:
            raise ProtocolError(f"hello: max_version {newest} is older than version {version}")
        chosen = min(newest, PROTOCOL_VERSION)
        if chosen < max(version, min(VERSIONS)):
            raise ProtocolError(f"protocol version {version if version else newest} is not supported "
                                f"(this compositor speaks versions {min(VERSIONS)} to {PROTOCOL_VERSION})")
        name = _str_field(msg, "name")
        if not _NAME.fullmatch(name):
            raise ProtocolError(f"hello: name {name[:80]!r} is not 1..64 characters of A-Z a-z 0-9 _ . -")
        uuid = msg.get("uuid")
        if uuid is not None and not isinstance(uuid, str):
            raise ProtocolError(f'hello: "uuid" must be a string or null, not {_json_kind(uuid)}')
        pointer = _choice_field(msg, "pointer", POINTER_MODES, "absolute")
        self.name, self.uuid, self.pointer_mode = name, uuid, pointer
        # The newest version both speak; the decoder reads what follows the hello in it (binary flips
        # only once welcome said so: a client sends none before).
        self.version = self._decoder.version = chosen
        # A guest that said bye (or hung up) and connected again at once: its old connection's end
        # may still sit unread in that socket, and the handler would find the name taken by it.
        for other in list(self._server.connections):
            if other is not self and other._welcomed and other.name == name:
                other._catch_up()
        if not self._call(self._server.handler.on_hello):
            return
        self._welcomed = True
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        log.info("%s: welcome", self._who())
        self._send({"type": "welcome", "version": self.version})
        self._dp_wanted = self.version >= 2 and self._server.dataplane is not None

    def _on_buffer(self, msg: dict[str, Any], start: int) -> None:
        buffer_id = _int_field(msg, "id", 1, MAX_BUFFER_ID)
        code = _str_field(msg, "fourcc")
        if len(code) != 4 or not code.isascii():
            raise ProtocolError(f'buffer {buffer_id}: "fourcc" {code[:40]!r} is not four ASCII characters')
        info = PlaneInfo(fourcc=fourcc(code),
                         width=_int_field(msg, "width", 0, _U32),
                         height=_int_field(msg, "height", 0, _U32),
                         stride=_int_field(msg, "stride", 0, _U32),
                         offset=_int_field(msg, "offset", 0, _U32, 0),
                         modifier=_int_field(msg, "modifier", 0, _U64, DRM_FORMAT_MOD_LINEAR))
        fd = self._take_fd(buffer_id, start, allowed=_BUFFER_KINDS)
        try:
            if buffer_id in self.buffers:
                raise ProtocolError(f"buffer {buffer_id} is already announced (forget it first)")
            most = self._server.limits.buffers
            if len(self.buffers) >= most:
                raise ProtocolError(f"buffer {buffer_id}: more than {most} buffers announced (the most one "
                                    "guest may hold at once: directflip run --max-buffers)")
            try:
                size = dmabuf_size(fd)
            except OSError as exc:
                raise ProtocolError(f"buffer {buffer_id}: fd is not a dma-buf "
                                    f"(cannot seek: {exc.strerror})") from None
            try:
                info.validate(size)
            except BadPlane as exc:
                raise ProtocolError(f"buffer {buffer_id}: {exc}") from None
            budget = self._server.limits.buffer_bytes
            total = info.span + sum(b.info.span for b in self.buffers.values())
            if total > budget:
                raise ProtocolError(f"buffer {buffer_id}: the guest's planes would span {total} bytes, "
                                    f"more than the {budget} one guest may have announced at once "
                                    "(directflip run --max-buffer-bytes)")
        except BaseException:
            os.close(fd)
            raise
        buffer = Buffer(guest=self.name, id=buffer_id, info=info, fd=fd)
        self.buffers[buffer_id] = buffer
        log.debug("%s: buffer %d is %s", self._who(), buffer_id, info.describe())
        self._call(self._server.handler.on_buffer, buffer)

    def _on_vfio_device(self, start: int) -> None:
        """The guest is a vGPU: the VMM hands over (a duplicate of) its VFIO device fd, and the
        compositor reads the guest's planes from it instead of from buffer/flip messages."""
        if self.vfio_fd is not None:
            raise ProtocolError("a VFIO device was already handed over on this connection")
        if self.buffers:
            raise ProtocolError("vfio-device after buffers: a connection is either a vGPU or a buffer source")
        fd = self._take_fd(0, start, what="vfio-device", allowed=_VFIO_KINDS)
        self.vfio_fd = fd
        log.info("%s: VFIO device handed over", self._who())
        self._call(self._server.handler.on_vfio_device, fd)

    def _on_cursor(self, msg: dict[str, Any]) -> None:
        width = _int_field(msg, "width", 1, MAX_CURSOR_SIZE)
        height = _int_field(msg, "height", 1, MAX_CURSOR_SIZE)
        hot_x = _int_field(msg, "hot_x", 0, MAX_CURSOR_SIZE - 1)
        hot_y = _int_field(msg, "hot_y", 0, MAX_CURSOR_SIZE - 1)
        if hot_x >= width or hot_y >= height:
            raise ProtocolError(f"cursor: hot spot ({hot_x}, {hot_y}) lies outside the "
                                f"{width}x{height} image")
        pixels = _base64_field(msg, "pixels")
        if len(pixels) != width * height * 4:
            raise ProtocolError(f'cursor: "pixels" holds {len(pixels)} bytes, not the {width * height * 4} '
                                f"of {width}x{height} ARGB8888")
        self._cursor_serial += 1
        try:
            self.cursor = Cursor(width, height, hot_x, hot_y, pixels, self._cursor_serial)
        except BadPlane as exc:  # checked above; kept so a stricter Cursor can never escape as a crash
            raise ProtocolError(f"cursor: {exc}") from None
        # DEBUG: a guest may redefine its pointer image at any rate; the log must not be its to flood
        log.debug("%s: cursor %dx%d, hot spot (%d, %d), serial %d", self._who(), width, height, hot_x, hot_y,
                  self._cursor_serial)
        self._cursor_changed()

    def _on_cursor_move(self, msg: dict[str, Any]) -> None:
        self.pointer = GuestPointer(_int_field(msg, "x", 0, MAX_DIMENSION - 1),
                                    _int_field(msg, "y", 0, MAX_DIMENSION - 1),
                                    _bool_field(msg, "visible"))
        self._cursor_changed()

    def _cursor_changed(self) -> None:
        self._call(self._server.handler.on_cursor)

    def _take_fd(self, buffer_id: int, start: int, *, allowed: frozenset[fdguard.Kind],
                 what: str = "") -> int:
        """The descriptor that came in the same recvmsg chunk as this buffer message's first byte, if it
        is of a kind in `allowed`."""
        what = what or f"buffer {buffer_id}"
        if self._fds and self._fds[0].until <= start:
            raise ProtocolError(self._unclaimed_fds())
        if not self._fds or self._fds[0].since > start:
            raise ProtocolError(f"{what}: no file descriptor came with the message (send "
                                "one as SCM_RIGHTS in the same sendmsg as its first bytes)")
        described = self._fds[0].described
        if described is None or described.kind not in allowed:
            raise ProtocolError(f"{what}: the file descriptor is {described}, not {fdguard.wanted(allowed)}")
        return self._fds.popleft().fd

    def _unclaimed_fds(self) -> str:
        stale = sum(1 for pending in self._fds if pending.until <= self._decoder.start)
        return (f"{stale} file descriptor(s) came with bytes before this message and no buffer message "
                "claimed them")

    def _known(self, msg: dict[str, Any]) -> Buffer:
        buffer_id = _int_field(msg, "id", 1, MAX_BUFFER_ID)
        if buffer_id not in self.buffers:
            raise ProtocolError(f"{msg['type']} of unknown buffer {buffer_id}")
        return self.buffers[buffer_id]

    def _call(self, callback: Callable[Concatenate[GuestConnection, _Args], object], *args: _Args.args,
              **kwargs: _Args.kwargs) -> bool:
        """Run a handler callback (a method of the GuestHandler) for this connection; an exception from
        it closes this client only. True if all went well."""
        try:
            callback(self, *args, **kwargs)
        except Refused as exc:
            self._finish(str(exc) or "refused", logging.WARNING)
            return False
        except Exception:
            log.exception("%s: %s failed", self._who(), callback.__name__)
            self._finish(_INTERNAL_ERROR, logging.WARNING)
            return False
        return not self.closed

    # --- writing

    def _send(self, msg: dict[str, Any]) -> None:
        if self.closed or self._failing:
            return
        data = encode(msg)
        if self.dp_conn >= 0:
            self._dp_send(data)
            return
        if not self._out:
            try:
                sent = self._sock.send(data, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fail_soon(f"connection lost ({exc.strerror})")
                return
            if sent == len(data):
                return
            data = data[sent:]
            self._loop.add_writer(self._fileno, self._on_writable)
            self._writing = True
        self._out += data
        if len(self._out) > MAX_QUEUED_OUTPUT:
            self._fail_soon("not reading its socket")

    def _send_record(self, data: bytes) -> None:
        """Queue a binary record; every record queued while the loop runs one callback (a flip
        event's presented and released) leaves in one send, just after it."""
        if self.closed or self._failing:
            return
        if self.dp_conn >= 0:
            self._dp_send(data)
            return
        self._out += data
        if len(self._out) > MAX_QUEUED_OUTPUT:
            self._fail_soon("not reading its socket")
        elif not self._writing and not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        if not (self.closed or self._writing) and self._out:
            self._write_out()

    def _send_input(self, msg: dict[str, Any]) -> None:
        if self.closed or self._failing or not self._welcomed:
            return
        ident, down = _contact(msg)
        if self._dropping_input or self._queued() > MAX_QUEUED_INPUT:
            self._drop_input(msg, ident, down)
            return
        self._send(msg)
        self._track(ident, down)

    def _drop_input(self, msg: dict[str, Any], ident: tuple[str, int] | None, down: bool | None) -> None:
        if not self._dropping_input:
            self._dropping_input = True
            log.warning("%s: not reading its socket (%d bytes unsent): dropping input until it catches up",
                        self._who(), self._queued())
            if self.dp_conn >= 0:   # the data plane says when its queue is empty: DRAINED
                self._dp_send(b"")
        if ident is not None:
            if down is False and ident in self._held:
                # The guest was told this is pressed: dropping its release would leave it stuck down.
                self._owed[ident] = msg
                return
            if down is True:
                # Pressed again before the owed release went out: the guest's view (down) is right.
                self._owed.pop(ident, None)
        self.dropped_input += 1

    def _track(self, ident: tuple[str, int] | None, down: bool | None) -> None:
        if ident is None or down is None:
            return
        if down:
            self._held.add(ident)
        else:
            self._held.discard(ident)

    def _input_drained(self) -> None:
        """Everything queued reached the client: input flows again, and the releases kept back go
        first."""
        self._dropping_input = False
        log.info("%s: reading its socket again; %d input messages dropped so far",
                 self._who(), self.dropped_input)
        owed, self._owed = self._owed, {}
        for ident, msg in owed.items():
            self._send(msg)
            self._track(ident, False)

    def _on_writable(self) -> None:
        self._write_out()

    def _write_out(self) -> None:
        """Send what the queue holds, as much as the socket takes. What is left waits for the
        socket to be writable; once nothing is left, input that was being dropped flows again."""
        try:
            sent = self._sock.send(self._out, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._finish(f"connection lost ({exc.strerror})", logging.WARNING, send_error=False)
            return
        del self._out[:sent]
        if self._out:
            if not self._writing:
                self._loop.add_writer(self._fileno, self._on_writable)
                self._writing = True
            return
        if self._writing:
            self._loop.remove_writer(self._fileno)
            self._writing = False
        if self._dropping_input:
            self._input_drained()

    def _fail_soon(self, reason: str) -> None:
        # Called while the handler is answering a flip: closing here would re-enter it with on_close.
        self._failing = True
        self._fail_reason = reason
        self._loop.call_soon(self._finish, reason, logging.WARNING)

    # --- closing

    def _finish(self, reason: str, level: int, *, send_error: bool = True) -> None:
        """Close the connection: every step runs whatever an earlier one raised (a descriptor left open
        or a name left taken would outlive the client for good)."""
        if self.closed:
            return
        self.closed = True
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self._server.log.log(self.peer.uid, level, "%s: closing: %s", self._who(), reason)
        on_close = (lambda: self._server.handler.on_close(self, reason)) if self._welcomed else None
        if self.dp_conn >= 0:
            # The handler forgets the guest's buffers first (the data plane frees each once nothing
            # holds it), then the data plane lets go of the socket, and only then is it closed.
            _each(self._who(), (lambda: self._dp_send_error(reason)) if send_error else None,
                  self._let_go_fds, lambda: self._server._discard(self), on_close, self._dp_remove,
                  self._sock.close)
            return
        _each(self._who(), (lambda: self._send_error(reason)) if send_error else None,
              lambda: self._loop.remove_reader(self._fileno),
              (lambda: self._loop.remove_writer(self._fileno)) if self._writing else None,
              self._sock.close, self._out.clear, self._let_go_fds, lambda: self._server._discard(self),
              on_close)

    def _send_error(self, reason: str) -> None:
        if len(self._out) <= MAX_QUEUED_OUTPUT:
            # best effort: a client that does not read loses the reason, never blocks the loop
            self._out += encode({"type": "error", "reason": reason})
            try:
                self._sock.send(self._out, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
            except OSError:
                pass

    def _dp_send_error(self, reason: str) -> None:
        try:   # best effort, as above: the data plane never blocks on a client
            self._server.dataplane.send(self.dp_conn, encode({"type": "error", "reason": reason}))
        except OSError:
            pass

    def _dp_remove(self) -> None:
        try:
            fds = self._server.dataplane.remove_conn(self.dp_conn)
        except OSError:
            fds = []
        finally:
            self._server.dp_connections.pop(self.dp_conn, None)
        for fd in fds:
            fdguard.discard(fd, self._who(), self.peer.uid)

    def _let_go_fds(self) -> None:
        fds = [pending.fd for pending in self._fds]
        self._fds.clear()
        who = self._who()
        _each(who, *(functools.partial(fdguard.discard, fd, who, self.peer.uid) for fd in fds))

    def _who(self) -> str:
        guest = f"guest {self.name!r}" if self.name else "before hello"
        return f"frame-socket client pid {self.peer.pid} uid {self.peer.uid} ({guest})"


def _each(who: str, *steps: Callable[[], object] | None) -> None:
    """Run every step in order, each whatever the ones before it raised (logged)."""
    for step in steps:
        if step is None:
            continue
        try:
            step()
        except Exception:
            log.exception("%s: a step of closing the connection failed", who)


def _describe(fd: int) -> fdguard.Described | None:
    try:
        return fdguard.classify(fd)
    except OSError:
        return None


def _contact(msg: dict[str, Any]) -> tuple[tuple[str, int] | None, bool | None]:
    """What an input message presses or releases: (("key", code), True) for a key press, (("touch",
    slot), False) for a contact's end, (ident, None) for touch motion, (None, None) for the rest."""
    kind = msg["type"]
    if kind in ("key", "button"):
        return (kind, msg["code"]), msg["down"]
    if kind == "touch":
        touch = msg["kind"]
        return ("touch", msg["slot"]), True if touch == "down" else None if touch == "motion" else False
    return None, None


def _code(code: int) -> int:
    if not 0 <= code <= KEY_MAX:
        raise ValueError(f"evdev code {code} is outside 0..{KEY_MAX}")
    return int(code)


def _position(value: int) -> int:
    # The router maps positions into the buffer; clamping keeps an edge case (a pointer one pixel past
    # a scaled buffer's edge) from becoming a protocol error that the client would die of.
    return min(max(int(value), 0), MAX_DIMENSION - 1)


def _delta(value: int) -> int:
    return min(max(int(value), _I32_MIN), _I32_MAX)


class FrameSocketInput:
    """The InputSink of one frame-socket connection: each call is one server → client message (key,
    button, pointer, motion, wheel, touch). Nothing is sent before welcome or after the connection
    closed; a client that does not read loses input (conn.dropped_input) rather than being closed.
    Positions are clamped to 0..MAX_DIMENSION-1 and deltas to 32 bits; a code or slot out of range, or
    an unknown touch kind, is the caller's bug (ValueError)."""

    def __init__(self, conn: GuestConnection) -> None:
        self.conn = conn

    def __repr__(self) -> str:
        return f"<FrameSocketInput {self.conn!r}>"

    @property
    def absolute(self) -> bool:
        return self.conn.pointer_mode == "absolute"

    def key(self, code: int, down: bool) -> None:
        self.conn._send_input({"type": "key", "code": _code(code), "down": bool(down)})

    def button(self, code: int, down: bool) -> None:
        self.conn._send_input({"type": "button", "code": _code(code), "down": bool(down)})

    def wheel(self, dx: int, dy: int) -> None:
        self.conn._send_input({"type": "wheel", "dx": _delta(dx), "dy": _delta(dy)})

    def pointer_abs(self, x: int, y: int) -> None:
        self.conn._send_input({"type": "pointer", "x": _position(x), "y": _position(y)})

    def pointer_rel(self, dx: int, dy: int) -> None:
        self.conn._send_input({"type": "motion", "dx": _delta(dx), "dy": _delta(dy)})

    def touch(self, kind: str, slot: int, x: int, y: int) -> None:
        if kind not in TOUCH_KINDS:
            raise ValueError(f"touch kind {kind!r} is not one of {', '.join(TOUCH_KINDS)}")
        if not 0 <= slot <= MAX_TOUCH_SLOT:
            raise ValueError(f"touch slot {slot} is outside 0..{MAX_TOUCH_SLOT}")
        self.conn._send_input({"type": "touch", "kind": kind, "slot": int(slot),
                               "x": _position(x), "y": _position(y)})


class FrameSocketServer:
    """Listens on a Unix socket at `path` and serves every client on the running asyncio loop.

    start() replaces a stale socket file (one nobody listens on) but refuses to take over a path that
    is not a socket or that a live process still listens on. close() closes every client
    ("compositor shutting down") and removes the socket file if it is still ours.
    """

    def __init__(self, path: str, handler: GuestHandler, *, mode: int = 0o660,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        self.path = path
        self.handler = handler
        self.mode = mode
        self.limits = limits
        self.connections: list[GuestConnection] = []
        # The native data plane (compositor.dataplane.DataPlane) that serves version-2 clients once
        # welcomed, or None: this server reads and writes every socket. dp_connections maps its
        # connection handles to their GuestConnection (see GuestConnection.dp_event).
        self.dataplane = None
        self.dp_connections: dict[int, GuestConnection] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self.refused = 0  # clients turned away at accept (a limit, or a uid no guest may have)
        self.log = PeerLog(log)   # warnings about clients, at most a few per uid and minute

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self._listener is not None:
            raise RuntimeError(f"the frame socket {self.path} is already started")
        self._loop = loop or asyncio.get_running_loop()
        _remove_stale_socket(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.setblocking(False)
            # bind() gives the socket file the mode of the socket's own inode (less the umask): set it
            # first, so the file is never more open than `mode`, whatever the umask. Then chmod for
            # the bits the umask took away.
            os.fchmod(listener.fileno(), self.mode)
            listener.bind(self.path)
            os.chmod(self.path, self.mode)
            listener.listen(16)
            st = os.stat(self.path)
        except BaseException:
            listener.close()
            raise
        self._listener, self._inode = listener, (st.st_dev, st.st_ino)
        self._loop.add_reader(listener.fileno(), self._on_acceptable)
        log.info("frame socket listening on %s (mode %o)", self.path, self.mode)

    def close(self) -> None:
        for conn in list(self.connections):
            conn.close("compositor shutting down")
        if self._listener is None:
            return
        assert self._loop is not None
        self._loop.remove_reader(self._listener.fileno())
        self._listener.close()
        self._listener = None
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:  # not a newer instance's socket
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _on_acceptable(self) -> None:
        assert self._listener is not None and self._loop is not None
        for _ in range(16):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                # EMFILE and friends: the listener stays readable, so stop polling it for a while
                log.error("frame socket %s: cannot accept (%s); pausing for a second", self.path, exc)
                self._loop.remove_reader(self._listener.fileno())
                self._loop.call_later(1.0, self._resume_accepting)
                return
            try:
                sock.setblocking(False)
                pid, uid, gid = _UCRED.unpack(
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            except OSError as exc:
                log.error("frame socket %s: cannot read the peer's credentials (%s)", self.path, exc)
                sock.close()
                continue
            refusal = self._refusal(uid)
            if refusal is not None:
                _refuse_at_once(sock, refusal)
                self.refused += 1
                self.log.warning(uid, "frame-socket client pid %d uid %d refused: %s", pid, uid, refusal)
                continue
            conn = GuestConnection(self, sock, Peer(pid, uid, gid))
            self.connections.append(conn)
            self._loop.add_reader(sock.fileno(), conn._on_readable)
            log.debug("%s: connected", conn._who())

    def _refusal(self, uid: int) -> str | None:
        """Why a new client of `uid` is turned away at once, or None."""
        limits = self.limits
        if len(self.connections) >= limits.connections:
            return (f"the compositor serves at most {limits.connections} frame-socket connections at once "
                    "(directflip run --max-connections)")
        mine = sum(1 for c in self.connections if c.peer.uid == uid)
        if mine >= limits.per_user:
            return (f"uid {uid} has {mine} frame-socket connections open, the most one user may have "
                    "(directflip run --max-connections-per-user)")
        return self.handler.may_connect(uid)

    def dataplane_event(self, event) -> None:
        """An event of the data plane about one of this server's connections (DP_EV_DATA, _CLOSED,
        _DRAINED): the connection handles it. One about a connection gone since is ignored."""
        conn = self.dp_connections.get(event.handle)
        if conn is not None:
            conn.dp_event(event)

    def _resume_accepting(self) -> None:
        if self._listener is not None and self._loop is not None:
            self._loop.add_reader(self._listener.fileno(), self._on_acceptable)

    def _discard(self, conn: GuestConnection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)


def _refuse_at_once(sock: socket.socket, reason: str) -> None:
    """Tell a client just accepted why it is refused (if its socket takes it now) and close it."""
    try:
        sock.send(encode({"type": "error", "reason": reason}), socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
    except OSError:
        pass
    sock.close()


class PeerLog:
    """Warnings about clients, rate-limited per uid: at most BURST in each WINDOW seconds, then one
    line saying how many were suppressed once the window ends (so 10 000 bad clients of one user make
    a handful of lines, and another user's trouble is still logged)."""

    BURST = 5
    WINDOW = 60.0

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._windows: dict[int, list[float | int]] = {}   # uid → [window start, lines, suppressed]

    def warning(self, uid: int, msg: str, *args: Any) -> None:
        self.log(uid, logging.WARNING, msg, *args)

    def log(self, uid: int, level: int, msg: str, *args: Any) -> None:
        if level < logging.WARNING:
            self._log.log(level, msg, *args)
            return
        now = time.monotonic()
        window = self._windows.get(uid)
        if window is None or now - window[0] >= self.WINDOW:
            if window is not None and window[2]:
                self._log.warning("uid %d: %d more warnings about its frame-socket clients were not logged "
                                  "in %.0f s", uid, window[2], now - window[0])
            if len(self._windows) > 4096:   # uids seen long ago
                self._windows = {u: w for u, w in self._windows.items() if now - w[0] < self.WINDOW}
            window = self._windows[uid] = [now, 0, 0]
        if window[1] < self.BURST:
            window[1] += 1
            self._log.log(level, msg, *args)
        else:
            window[2] += 1


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket: refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)  # a full backlog blocks connect: someone is listening
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: left behind by a compositor that died
        return
    except TimeoutError:
        pass
    finally:
        probe.close()
    raise OSError(f"another process already listens on the frame socket {path}")


# ------------------------------------------------------------------------------------------- client

@dataclass(frozen=True)
class Released:
    """The compositor no longer reads buffer `id`: the guest may draw into it again."""

    id: int


@dataclass(frozen=True)
class Presented:
    """Buffer `id` (the guest's frame `frame`) reached the screen at timestamp_ns (CLOCK_MONOTONIC)."""

    id: int
    frame: int
    timestamp_ns: int
    sequence: int


# Input from the compositor: evdev codes, positions in the guest's framebuffer pixels.

@dataclass(frozen=True)
class Key:
    """Keyboard key `code` (evdev KEY_*) pressed (down) or released."""

    code: int
    down: bool


@dataclass(frozen=True)
class Button:
    """Pointer button `code` (evdev BTN_LEFT ...) pressed (down) or released."""

    code: int
    down: bool


@dataclass(frozen=True)
class Pointer:
    """The pointer is at (x, y), framebuffer pixels (absolute pointer mode)."""

    x: int
    y: int


@dataclass(frozen=True)
class Motion:
    """The pointer moved by (dx, dy) device units (relative pointer mode)."""

    dx: int
    dy: int


@dataclass(frozen=True)
class Wheel:
    """Wheel detents: dy > 0 away from the user, dx > 0 to the right."""

    dx: int
    dy: int


@dataclass(frozen=True)
class Touch:
    """Touch contact `slot`: kind is "down", "motion", "up" or "cancel", at (x, y) framebuffer pixels."""

    kind: str
    slot: int
    x: int
    y: int


InputEvent = Key | Button | Pointer | Motion | Wheel | Touch
Event = Released | Presented | InputEvent


class FrameSocketClient:
    """A guest's end of the frame socket, blocking (no asyncio). `timeout` bounds connecting, waiting
    for welcome and any send the compositor is slow to take. fileno() is for the caller's own poll
    loop: readable means poll() has something. `pointer` ("absolute" or "relative") is how the guest
    wants the pointer; set_pointer_mode changes it later. set_cursor and move_cursor give the
    compositor the guest's own pointer image and position, for the monitor's cursor plane."""

    def __init__(self, path: str, name: str, uuid: str | None = None, timeout: float = 5.0, *,
                 pointer: str = "absolute", version: int = PROTOCOL_VERSION) -> None:
        _check_pointer_mode(pointer)
        if version not in VERSIONS:
            raise ValueError(f"frame-socket protocol version {version!r} is not one of {VERSIONS}")
        self.path = path
        self.timeout = timeout
        self.pointer = pointer
        self.version = 1  # what the compositor's welcome chose (at most `version`)
        self._decoder = Decoder(CLIENT)
        self._error: str | None = None  # set once the connection is dead
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._asked = version
            self._connect(path, timeout)
            self._sock.setblocking(False)
            hello = {"type": "hello", "version": 1, "name": name, "uuid": uuid, "pointer": pointer}
            if version > 1:
                hello["max_version"] = version   # a compositor that predates it welcomes version 1
            self._send(hello)
            self._await_welcome()
        except BaseException:
            self._sock.close()
            raise

    def announce(self, buffer_id: int, fd: int, fourcc: str, width: int, height: int, stride: int,
                 offset: int = 0, modifier: int = 0) -> None:
        """Hand the compositor a dma-buf (it gets its own duplicate; the caller keeps `fd`)."""
        self._send({"type": "buffer", "id": buffer_id, "fourcc": fourcc, "width": width, "height": height,
                    "stride": stride, "offset": offset, "modifier": modifier}, fd=fd)

    def flip(self, buffer_id: int, frame: int = 0) -> None:
        if self.version >= 2:
            if type(buffer_id) is not int or not 1 <= buffer_id <= MAX_BUFFER_ID or \
                    type(frame) is not int or not 0 <= frame <= _U64:
                raise ValueError(f"flip of buffer {buffer_id!r}, frame {frame!r}: out of range")
            self._send_bytes(flip_record(buffer_id, frame))
        else:
            self._send({"type": "flip", "id": buffer_id, "frame": frame})

    def hand_over_vfio(self, device_fd: int) -> None:
        """This guest is a vGPU: give the compositor (a duplicate of) its VFIO device fd. The
        compositor then polls the device's display plane itself; keep the connection open as long as
        the guest should be shown."""
        self._send({"type": "vfio-device"}, fd=device_fd)

    def forget(self, buffer_id: int) -> None:
        self._send({"type": "forget", "id": buffer_id})

    def set_cursor(self, width: int, height: int, hot_x: int, hot_y: int, pixels: bytes) -> None:
        """Define the guest's pointer image: width x height (1..MAX_CURSOR_SIZE) ARGB8888 pixels, rows
        of width * 4 bytes, B, G, R, A in memory; (hot_x, hot_y) is the pixel that points. It replaces
        the image sent before. Bad arguments raise ValueError here, not a protocol error later."""
        _check_cursor(width, height, hot_x, hot_y, pixels)
        self._send({"type": "cursor", "width": width, "height": height, "hot_x": hot_x, "hot_y": hot_y,
                    "pixels": base64.b64encode(pixels).decode("ascii")})

    def move_cursor(self, x: int, y: int, visible: bool = True) -> None:
        """Say where the pointer's hot spot is, in the guest's framebuffer pixels (0..16383), and
        whether the guest shows it. Send it at any rate: the compositor keeps only the latest."""
        for name, value in (("x", x), ("y", y)):
            if type(value) is not int or not 0 <= value < MAX_DIMENSION:
                raise ValueError(f"cursor {name} {value!r} is not an integer in 0..{MAX_DIMENSION - 1}")
        self._send({"type": "cursor-move", "x": x, "y": y, "visible": bool(visible)})

    def set_pointer_mode(self, mode: str) -> None:
        """Ask for the pointer as absolute positions (Pointer) or relative motion (Motion) from now
        on. Input already on its way still arrives the old way."""
        _check_pointer_mode(mode)
        self._send({"type": "pointer-mode", "mode": mode})
        self.pointer = mode

    def poll(self, timeout: float | None = 0) -> list[Event]:
        """What the compositor said: everything already there (Released, Presented and the input
        events), waiting up to `timeout` seconds (None: forever) for at least one. Raises ServerError
        when it sent an error or closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        events: list[Event] = []
        while True:
            for msg in self._drain():
                event = self._event(msg)
                if event is not None:
                    events.append(event)
            if events:
                return events
            if not self._wait(select.POLLIN, deadline):
                return events

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        """Say bye (if the connection still works) and close. Idempotent."""
        if self._sock.fileno() < 0:
            return
        if self._error is None:
            try:
                self._sock.send(encode({"type": "bye"}), socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
            except OSError:
                pass
        self._sock.close()

    def __enter__(self) -> FrameSocketClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals

    def _connect(self, path: str, timeout: float) -> None:
        self._sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    self._sock.connect(path)
                    break
                except BlockingIOError:
                    # EAGAIN: the compositor's listen backlog is full (it is accepting as fast as it
                    # can); try again until the timeout, as a connect on a TCP socket would wait.
                    if time.monotonic() >= deadline:
                        raise TimeoutError(errno.ETIMEDOUT, f"the frame socket {path} did not accept "
                                           f"the connection within {timeout:g} s (its backlog stayed "
                                           "full)") from None
                    time.sleep(0.01)
        except FileNotFoundError as exc:
            raise FileNotFoundError(exc.errno, f"{exc.strerror}: no frame socket at {path} "
                                    "(is the directflip compositor running?)") from None
        except ConnectionRefusedError as exc:
            raise ConnectionRefusedError(exc.errno, f"{exc.strerror}: nothing listens on {path} (a "
                                         "socket left behind by a compositor that stopped?)") from None
        except PermissionError as exc:
            raise PermissionError(exc.errno, f"{exc.strerror}: not allowed to connect to {path} "
                                  "(the frame socket's group may connect)") from None

    def _await_welcome(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            # Read up to the end of the message and no further: input may follow welcome at once, and
            # it must stay in the socket, where fileno() shows it to the guest's own poll loop.
            try:
                data = self._sock.recv(self._decoder.needed())
            except (BlockingIOError, InterruptedError):
                if not self._wait(select.POLLIN, deadline):
                    raise TimeoutError(f"no welcome from the compositor on {self.path} "
                                       f"within {self.timeout} s") from None
                continue
            except ConnectionResetError:  # the server closed with our bytes unread: an EOF
                data = b""
            try:
                messages = list(self._decoder.feed(data))
            except ProtocolError as exc:
                self._die(f"the compositor broke the protocol: {exc}")
            for msg in messages:
                if isinstance(msg, dict) and msg["type"] == "welcome":
                    # A version-1 compositor's welcome has no choice to make: it says 1.
                    chosen = msg.get("version", 1)
                    if type(chosen) is not int or chosen not in VERSIONS or chosen > self._asked:
                        self._die(f"the compositor broke the protocol: welcome chose version {chosen!r}")
                    self.version = self._decoder.version = chosen
                    return
                self._event(msg)  # error → ServerError
            if not data:
                self._die(CLOSED)

    def _event(self, msg: dict[str, Any] | Record) -> Event | None:
        if msg.__class__ is Record:
            if msg.kind == PRESENTED:
                return Presented(msg.id, msg.frame, msg.timestamp_ns, msg.sequence)
            return Released(msg.id)
        try:
            kind = msg["type"]
            if kind == "released":
                return Released(_int_field(msg, "id", 1, MAX_BUFFER_ID))
            if kind == "presented":
                return Presented(_int_field(msg, "id", 1, MAX_BUFFER_ID),
                                 _int_field(msg, "frame", 0, _U64, 0),
                                 _int_field(msg, "timestamp_ns", 0, _U64),
                                 _int_field(msg, "sequence", 0, _U64, 0))
            if kind in ("key", "button"):
                return (Key if kind == "key" else Button)(_int_field(msg, "code", 0, KEY_MAX),
                                                          _bool_field(msg, "down"))
            if kind == "pointer":
                return Pointer(_int_field(msg, "x", 0, MAX_DIMENSION - 1),
                               _int_field(msg, "y", 0, MAX_DIMENSION - 1))
            if kind in ("motion", "wheel"):
                return (Motion if kind == "motion" else Wheel)(_int_field(msg, "dx", _I32_MIN, _I32_MAX),
                                                               _int_field(msg, "dy", _I32_MIN, _I32_MAX))
            if kind == "touch":
                return Touch(_choice_field(msg, "kind", TOUCH_KINDS),
                             _int_field(msg, "slot", 0, MAX_TOUCH_SLOT),
                             _int_field(msg, "x", 0, MAX_DIMENSION - 1),
                             _int_field(msg, "y", 0, MAX_DIMENSION - 1))
            if kind == "error":
                reason = msg.get("reason")
                self._die(reason if isinstance(reason, str) else "the compositor sent an error")
        except ProtocolError as exc:
            self._die(f"the compositor broke the protocol: {exc}")
        return None  # welcome again, or a newer server's message: ignored

    def _drain(self) -> list[dict[str, Any] | Record]:
        """Every complete message readable right now; ServerError once the connection has ended."""
        if self._error is not None:
            raise ServerError(self._error)
        messages: list[dict[str, Any] | Record] = []
        while True:
            try:
                data = self._sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return messages
            except ConnectionResetError:  # the server closed with our bytes unread: an EOF
                data = b""
            try:
                messages.extend(self._decoder.feed(data))
            except ProtocolError as exc:
                self._die(f"the compositor broke the protocol: {exc}")
            if not data:
                for msg in messages:  # its error message, if it sent one, says why
                    self._event(msg)
                self._die(CLOSED)

    def _die(self, reason: str) -> None:
        if self._error is None:
            self._error = reason
        raise ServerError(self._error)

    def _wait(self, events: int, deadline: float | None) -> bool:
        """Wait until the socket is ready for `events`; False if the deadline passed first."""
        poller = select.poll()
        poller.register(self._sock, events)
        while True:
            if deadline is None:
                ms = None
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                ms = math.ceil(remaining * 1000)
            if poller.poll(ms):
                return True

    def _send(self, msg: dict[str, Any], fd: int | None = None) -> None:
        self._send_bytes(encode(msg), fd)

    def _send_bytes(self, raw: bytes, fd: int | None = None) -> None:
        if self._error is not None:
            raise ServerError(self._error)
        data = memoryview(raw)
        ancillary = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        deadline = time.monotonic() + self.timeout
        while data:
            try:
                sent = self._sock.sendmsg([data], ancillary, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                if not self._wait(select.POLLOUT, deadline):
                    raise TimeoutError(f"the compositor on {self.path} has not read its socket "
                                       f"for {self.timeout} s") from None
                continue
            except (BrokenPipeError, ConnectionResetError):
                self._drain()  # raises with the compositor's reason when it sent one
                self._die(CLOSED)
            data = data[sent:]
            ancillary = []  # the descriptor went with the first bytes


def _check_cursor(width: int, height: int, hot_x: int, hot_y: int, pixels: bytes) -> None:
    for name, value in (("width", width), ("height", height)):
        if type(value) is not int or not 1 <= value <= MAX_CURSOR_SIZE:
            raise ValueError(f"cursor {name} {value!r} is not an integer in 1..{MAX_CURSOR_SIZE}")
    if type(hot_x) is not int or type(hot_y) is not int or not (0 <= hot_x < width and 0 <= hot_y < height):
        raise ValueError(f"cursor hot spot ({hot_x!r}, {hot_y!r}) lies outside the {width}x{height} image")
    if len(pixels) != width * height * 4:
        raise ValueError(f"cursor pixels are {len(pixels)} bytes, not the {width * height * 4} "
                         f"of {width}x{height} ARGB8888")


def _check_pointer_mode(mode: str) -> None:
    if mode not in POINTER_MODES:
        raise ValueError(f"pointer mode {mode!r} is not one of {', '.join(POINTER_MODES)}")
