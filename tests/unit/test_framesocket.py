"""The frame socket (compositor/sources/framesocket.py, docs/frame-socket.md): a real server on an
asyncio loop, real Unix sockets, memfds standing in for dma-bufs. Blocking client calls that need the
server to answer run in the loop's executor while the loop serves them; everything else drives the
loop until a condition holds."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from framesocket_env import Env, serve
from hypothesis import given, settings
from hypothesis import strategies as st

from compositor.formats import fourcc
from compositor.sources.frame import Buffer, Frame, PlaneInfo
from compositor.sources.framesocket import (
    MAX_BUFFERS,
    MAX_MESSAGE,
    Decoder,
    FrameSocketClient,
    FrameSocketServer,
    GuestConnection,
    GuestHandler,
    Peer,
    Presented,
    ProtocolError,
    Refused,
    Released,
    ServerError,
    encode,
)

W, H, STRIDE = 64, 64, 256  # an XR24 plane of 16384 bytes
TRIP = 10**12  # a frame number the recording handler fails on


@dataclass
class Recorder(GuestHandler):
    """A GuestHandler that writes down everything and, as the daemon must, closes the buffers it is
    handed (on forget, on close)."""

    refuse: set[str] = field(default_factory=set)
    hellos: list[GuestConnection] = field(default_factory=list)
    buffers: list[Buffer] = field(default_factory=list)
    flips: list[tuple[str, Frame]] = field(default_factory=list)
    forgotten: list[Buffer] = field(default_factory=list)
    closed: list[tuple[str, str]] = field(default_factory=list)

    def on_hello(self, conn: GuestConnection) -> None:
        if conn.name in self.refuse:
            raise Refused(f"no seat for {conn.name}")
        self.hellos.append(conn)

    def on_buffer(self, conn: GuestConnection, buffer: Buffer) -> None:
        self.buffers.append(buffer)

    def on_flip(self, conn: GuestConnection, frame: Frame) -> None:
        if frame.seq == TRIP:
            raise RuntimeError("the daemon tripped")
        self.flips.append((conn.name, frame))

    def on_forget(self, conn: GuestConnection, buffer: Buffer) -> None:
        self.forgotten.append(buffer)
        buffer.close()

    def on_close(self, conn: GuestConnection, reason: str) -> None:
        self.closed.append((conn.name, reason))
        for buffer in conn.buffers.values():
            buffer.close()

    def flips_of(self, name: str) -> list[int]:
        return [frame.seq for guest, frame in self.flips if guest == name]


@pytest.fixture
def env(tmp_path):
    yield from serve(tmp_path, Recorder())


def memfd(size: int = STRIDE * H) -> int:
    fd = os.memfd_create("fake-dmabuf", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def open_fds() -> set[str]:
    gc.collect()   # a socket object some earlier test dropped must not close its fd mid-count
    return set(os.listdir("/proc/self/fd"))


def raw_frame(body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + body


HELLO = {"type": "hello", "version": 1, "name": "rogue", "uuid": None}
BUFFER = {"type": "buffer", "id": 1, "fourcc": "XR24", "width": W, "height": H, "stride": STRIDE}


def send_with_fd(sock: socket.socket, data: bytes, fd: int) -> None:
    socket.send_fds(sock, [data], [fd])


def read_to_eof(sock: socket.socket) -> list[dict[str, Any]]:
    """Everything the server sends until it closes (blocking: run it in the executor)."""
    sock.settimeout(5)
    decoder, out = Decoder(), []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            return out
        out.extend(decoder.feed(data))


@pytest.fixture
def announced(env):
    """A client 'office' with buffer 1 announced and seen by the server."""
    client = env.client("office", "8d3c1c1e-0000-4000-8000-000000000001")
    fd = memfd()
    client.announce(1, fd, "XR24", W, H, STRIDE)
    env.until(lambda: env.handler.buffers)
    yield client, fd
    os.close(fd)


# ------------------------------------------------------------------------------------- happy paths

def test_hello_is_welcomed_and_the_peer_is_known(env):
    client = env.client("office", "8d3c1c1e-0000-4000-8000-000000000001")
    (conn,) = env.handler.hellos
    assert (conn.name, conn.uuid) == ("office", "8d3c1c1e-0000-4000-8000-000000000001")
    assert conn.peer == Peer(os.getpid(), os.getuid(), os.getgid())   # SO_PEERCRED: same process
    assert env.server.connections == [conn] and not conn.closed
    client.close()
    env.until(lambda: env.handler.closed)
    assert env.handler.closed == [("office", "bye")]
    assert env.server.connections == []


def test_uuid_is_optional(env):
    env.client("office")
    assert env.handler.hellos[0].uuid is None


def test_announced_buffer_has_its_plane_and_a_duplicate_of_the_fd(env, announced):
    _, fd = announced
    (buffer,) = env.handler.buffers
    conn = env.conn("office")
    assert conn.buffers == {1: buffer}
    assert (buffer.guest, buffer.id) == ("office", 1)
    assert buffer.info == PlaneInfo(fourcc=fourcc("XR24"), width=W, height=H, stride=STRIDE, offset=0,
                                    modifier=0)
    assert buffer.fd != fd and os.fstat(buffer.fd).st_ino == os.fstat(fd).st_ino   # same file, own fd
    os.pwrite(buffer.fd, b"pixels", 100)
    assert os.pread(fd, 6, 100) == b"pixels"


def test_offset_and_modifier_are_carried(env):
    client = env.client("office")
    fd = memfd(STRIDE * H + 4096)
    client.announce(9, fd, "AR24", W, H, STRIDE, offset=4096, modifier=0)
    env.until(lambda: env.handler.buffers)
    assert env.handler.buffers[0].info == PlaneInfo(fourcc("AR24"), W, H, STRIDE, 4096, 0)
    os.close(fd)


def test_flip_reaches_the_handler_and_answers_reach_the_client(env, announced):
    client, _ = announced
    before = time.monotonic_ns()
    client.flip(1, frame=42)
    env.until(lambda: env.handler.flips)
    ((guest, frame),) = env.handler.flips
    conn = env.conn("office")
    assert guest == "office" and frame.buffer is conn.buffers[1] and frame.seq == 42
    assert before <= frame.received_ns <= time.monotonic_ns()

    conn.presented(1, 42, 123_456_789, 7)
    conn.released(1)
    env.spin(0.01)   # version 2's records leave together, once the loop runs
    assert client.poll(timeout=1) == [Presented(1, 42, 123_456_789, 7), Released(1)]
    assert client.poll() == []   # nothing more: poll(0) does not wait


def test_frame_defaults_to_zero(env, announced):
    client, _ = announced
    client._send({"type": "flip", "id": 1})
    env.until(lambda: env.handler.flips)
    assert env.handler.flips[0][1].seq == 0


def test_unknown_keys_are_ignored(env, announced):
    client, _ = announced
    client._send({"type": "flip", "id": 1, "frame": 3, "damage": [[0, 0, 8, 8]]})
    env.until(lambda: env.handler.flips)
    assert env.handler.flips_of("office") == [3]


def test_forget_hands_the_buffer_to_the_handler_and_the_id_can_come_back(env, announced):
    client, fd = announced
    conn = env.conn("office")
    client.forget(1)
    env.until(lambda: env.handler.forgotten)
    assert env.handler.forgotten == env.handler.buffers and conn.buffers == {}
    conn.released(1)                       # late answer about a forgotten buffer: not sent
    assert client.poll(timeout=0.05) == []
    client.announce(1, fd, "XR24", W, H, STRIDE)
    env.until(lambda: len(env.handler.buffers) == 2)
    assert conn.buffers == {1: env.handler.buffers[1]}


def test_a_thousand_flips_in_one_write_all_arrive_in_order(env, announced):
    """All 1000 reach the server in one or two recvmsg: the server must parse every buffered message
    per readable callback, or the rest would sit in its buffer forever."""
    client, _ = announced
    os.write(client.fileno(), b"".join(encode({"type": "flip", "id": 1, "frame": i}) for i in range(1000)))
    env.until(lambda: len(env.handler.flips) == 1000)
    assert env.handler.flips_of("office") == list(range(1000))


def test_a_thousand_flips_back_to_back_all_arrive(env, announced):
    client, _ = announced
    env.run(lambda: [client.flip(1, frame=i) for i in range(1000)])
    env.until(lambda: len(env.handler.flips) == 1000)
    assert env.handler.flips_of("office") == list(range(1000))


def test_interleaved_announces_and_flips_each_get_their_own_fd(env):
    """Descriptors are matched to buffer messages by stream position, not by luck: twenty buffers of
    different sizes announced back to back between flips, and each Buffer holds its own memfd."""
    client = env.client("office")
    fds = {i: memfd(STRIDE * H + i * 4096) for i in range(1, 21)}

    def burst() -> None:
        for i, fd in fds.items():
            client.announce(i, fd, "XR24", W, H, STRIDE)
            client.flip(i, frame=i)
    env.run(burst)
    env.until(lambda: len(env.handler.flips) == 20)
    assert env.handler.flips_of("office") == list(range(1, 21))
    for buffer in env.handler.buffers:
        assert os.fstat(buffer.fd).st_ino == os.fstat(fds[buffer.id]).st_ino
    for fd in fds.values():
        os.close(fd)


def test_buffers_per_connection_are_capped(env):
    client = env.client("office")
    fd = memfd()
    for i in range(1, MAX_BUFFERS + 2):
        client.announce(i, fd, "XR24", W, H, STRIDE)
    os.close(fd)
    with pytest.raises(ServerError, match=f"buffer {MAX_BUFFERS + 1}: more than {MAX_BUFFERS} buffers"):
        env.run(client.poll, 5)


# ------------------------------------------------------------------------------------------ refusal

def test_refused_hello_reaches_the_client_as_server_error(env, caplog):
    env.handler.refuse.add("intruder")
    with caplog.at_level(logging.WARNING, "directflip.framesocket"):
        with pytest.raises(ServerError, match="no seat for intruder"):
            env.client("intruder")
    assert env.handler.closed == []          # never got past hello: no on_close
    env.until(lambda: env.server.connections == [])
    assert "no seat for intruder" in caplog.text and f"pid {os.getpid()}" in caplog.text


@dataclass
class OneByName(Recorder):
    """Refuses a name that an open connection holds, as the daemon does (daemon.on_hello)."""

    holders: dict[str, GuestConnection] = field(default_factory=dict)

    def on_hello(self, conn: GuestConnection) -> None:
        held = self.holders.get(conn.name)
        if held is not None:
            raise Refused(f"a guest named {conn.name} is already connected (pid {held.peer.pid})")
        super().on_hello(conn)
        self.holders[conn.name] = conn

    def on_close(self, conn: GuestConnection, reason: str) -> None:
        if self.holders.get(conn.name) is conn:
            del self.holders[conn.name]
        super().on_close(conn, reason)


@pytest.fixture
def one_by_name(env) -> OneByName:
    env.handler = env.server.handler = OneByName()
    return env.handler


def test_an_immediate_reconnect_is_admitted_after_the_old_connection_ends(env, one_by_name):
    # 100 quick cycles: announce 8 buffers (each fd-carrying message is a recvmsg of its own, so the
    # server is far behind), flip each, then end the connection (bye on even cycles, a hang-up
    # without bye on odd ones) and connect again at once. The old connection's end is still unread
    # when the new hello arrives; the name must not be found taken by it.
    cycles, per = 100, 8
    fd = memfd()

    def run() -> list[str]:
        refusals = []
        for cycle in range(cycles):
            try:
                client = FrameSocketClient(env.path, "office")
            except ServerError as exc:
                refusals.append(f"cycle {cycle}: {exc}")
                continue
            for i in range(1, per + 1):
                client.announce(i, fd, "XR24", W, H, STRIDE)
                client.flip(i, frame=cycle * per + i)
            if cycle % 2:
                client._sock.close()   # hung up without bye
            else:
                client.close()
        return refusals

    try:
        assert env.run(run) == []
        env.until(lambda: len(one_by_name.closed) == cycles)
    finally:
        os.close(fd)
    assert len(one_by_name.hellos) == cycles
    ends = [reason for _, reason in one_by_name.closed]
    assert ends == ["bye", "client hung up without bye"] * (cycles // 2)
    # Every message each old connection sent before its end was handled, in order.
    assert one_by_name.flips_of("office") == list(range(1, cycles * per + 1))
    assert one_by_name.holders == {} and env.server.connections == []


def test_a_live_connection_keeps_its_name(env, one_by_name):
    # The holder has messages queued but has not ended: a second claim of its name is refused (with
    # the holder's pid), the queued messages are handled, and the holder goes on unharmed.
    holder = env.client("office")
    fd = memfd()
    try:
        holder.announce(1, fd, "XR24", W, H, STRIDE)
        for frame in range(200):
            holder.flip(1, frame=frame)
        taken = rf"a guest named office is already connected \(pid {os.getpid()}\)"
        with pytest.raises(ServerError, match=taken):
            env.client("office")
    finally:
        os.close(fd)
    conn = one_by_name.holders["office"]
    assert not conn.closed and one_by_name.closed == []
    env.until(lambda: len(one_by_name.flips) == 200)
    assert one_by_name.flips_of("office") == list(range(200))
    holder.flip(1, frame=200)
    env.until(lambda: one_by_name.flips_of("office")[-1:] == [200])
    conn.presented(1, 200, 1, 1)
    env.spin(0.01)
    assert holder.poll(timeout=1) == [Presented(1, 200, 1, 1)]


class Endless:
    """A holder's socket that always has one more flip to read: a peer writing as fast as the server
    reads. It runs dry after `limit` reads, so a server that reads until the holder stops ends
    (and fails the test) instead of hanging it."""

    def __init__(self, sock: socket.socket, limit: int = 1000) -> None:
        self.sock, self.limit, self.reads = sock, limit, 0

    def recvmsg(self, *args: Any) -> tuple[bytes, list, int, Any]:
        if self.reads >= self.limit:
            raise BlockingIOError
        self.reads += 1
        return encode({"type": "flip", "id": 1, "frame": self.reads}), [], 0, None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def test_a_claim_never_reads_the_holder_until_it_stops(env, one_by_name, announced):
    # A holder that keeps writing cannot hold the loop through a newcomer's claim: the claim reads
    # what was queued when it came (nothing here) and one recvmsg more, then judges the name, which
    # is still taken.
    holder = env.conn("office")
    endless = Endless(holder._sock)
    holder._sock = endless  # type: ignore[assignment]
    with pytest.raises(ServerError, match="a guest named office is already connected"):
        env.client("office")
    assert endless.reads == 1 and not holder.closed
    assert one_by_name.flips_of("office") == [1]
    holder._sock = endless.sock


def test_client_without_a_server_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no frame socket at"):
        FrameSocketClient(str(tmp_path / "nothing.sock"), "office")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()
    with pytest.raises(ConnectionRefusedError, match="nothing listens on"):
        FrameSocketClient(str(tmp_path / "stale.sock"), "office")


# ------------------------------------------------------------------------------- malformed clients

def _send(data: bytes) -> Callable[[socket.socket], None]:
    return lambda sock: sock.sendall(data)


def _buffer(fd_factory: Callable[[], int], **fields: Any) -> Callable[[socket.socket], None]:
    def act(sock: socket.socket) -> None:
        fd = fd_factory()
        send_with_fd(sock, encode({**BUFFER, **fields}), fd)
        os.close(fd)
    return act


def _send_with_memfd(msg: dict[str, Any]) -> Callable[[socket.socket], None]:
    def act(sock: socket.socket) -> None:
        fd = memfd()
        send_with_fd(sock, encode(msg), fd)
        os.close(fd)
    return act


def _pipe_read_end() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def _twice(act: Callable[[socket.socket], None]) -> Callable[[socket.socket], None]:
    def both(sock: socket.socket) -> None:
        act(sock)
        act(sock)
    return both


def _fd_with_a_flip(sock: socket.socket) -> None:
    _buffer(memfd)(sock)
    fd = memfd()
    send_with_fd(sock, encode({"type": "flip", "id": 1}), fd)   # an fd no buffer message claims
    os.close(fd)
    sock.sendall(encode({"type": "flip", "id": 1}))


# (case, says hello first, what the rogue client sends, what the error names)
MALFORMED = [
    ("length 0", True, _send(b"\0\0\0\0"), "message length 0 is outside 1..65536"),
    ("length over 64 KiB", True, _send(struct.pack("<I", MAX_MESSAGE + 1)), "message length 65537"),
    ("invalid JSON", True, _send(raw_frame(b'{"type": "flip",')), "not valid JSON"),
    ("not UTF-8", True, _send(raw_frame(b'{"type": "\xff"}')), "not UTF-8"),
    ("NaN", True, _send(raw_frame(b'{"type": "flip", "id": NaN}')), "NaN is not a JSON number"),
    ("not an object", True, _send(raw_frame(b"[1, 2]")), "message is an array, not a JSON object"),
    ("no type", True, _send(raw_frame(b'{"id": 1}')), 'no string "type"'),
    ("unknown type", True, _send(encode({"type": "dance"})), "unknown message type 'dance'"),
    ("message before hello", False, _send(encode({"type": "flip", "id": 1})),
     'first message must be "hello", not \'flip\''),
    ("second hello", True, _send(encode(HELLO)), "hello sent twice"),
    ("unsupported version", False, _send(encode({**HELLO, "version": 0})), "version 0 is not supported"),
    ("bad name", False, _send(encode({**HELLO, "name": "my guest"})), "'my guest' is not 1..64 characters"),
    ("uuid not a string", False, _send(encode({**HELLO, "uuid": 7})), '"uuid" must be a string or null'),
    ("boolean id", True, _send(encode({"type": "flip", "id": True})),
     '"id" must be an integer, not a boolean'),
    ("id out of range", True, _buffer(memfd, id=2**32), '"id" 4294967296 is outside 1..4294967295'),
    ("null field", True, _buffer(memfd, width=None), 'buffer: "width" must be an integer, not null'),
    ("missing field", True, _send_with_memfd({k: v for k, v in BUFFER.items() if k != "height"}),
     'buffer: "height" is missing'),
    ("missing fourcc", True, _send_with_memfd({k: v for k, v in BUFFER.items() if k != "fourcc"}),
     'buffer: "fourcc" is missing'),
    ("bad fourcc", True, _buffer(memfd, fourcc="XRGB8888"), "is not four ASCII characters"),
    ("unsupported format", True, _buffer(memfd, fourcc="NV12"), "format NV12 is not one directflip can show"),
    ("buffer without fd", True, _send(encode(BUFFER)), "buffer 1: no file descriptor came with the message"),
    ("fd that is not a dma-buf", True, _buffer(_pipe_read_end),
     "a file descriptor sent is pipe:["),
    ("plane too large for the memfd", True, _buffer(lambda: memfd(4096)),
     "buffer 1: the plane (64x64, stride 256, offset 0) needs 16384 bytes but the dma-buf has 4096"),
    ("stride shorter than a row", True, _buffer(memfd, stride=100), "stride 100 is shorter than a row"),
    ("flip of unknown id", True, _send(encode({"type": "flip", "id": 7})), "flip of unknown buffer 7"),
    ("forget of unknown id", True, _send(encode({"type": "forget", "id": 7})), "forget of unknown buffer 7"),
    ("duplicate id", True, _twice(_buffer(memfd)), "buffer 1 is already announced"),
    ("fd sent with a flip", True, _fd_with_a_flip,
     "1 file descriptor(s) came with bytes before this message"),
]


@pytest.mark.parametrize("hello, act, cause", [case[1:] for case in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_message_closes_only_that_client(env, announced, caplog, hello, act, cause):
    good, _ = announced
    before = open_fds()
    rogue = socket.socket(socket.AF_UNIX)
    rogue.connect(env.path)
    if hello:
        rogue.sendall(encode(HELLO))
    with caplog.at_level(logging.WARNING, "directflip.framesocket"):
        act(rogue)
        messages = env.run(read_to_eof, rogue)
    rogue.close()

    assert messages[-1]["type"] == "error" and cause in messages[-1]["reason"], messages
    assert [m["type"] for m in messages] == (["welcome", "error"] if hello else ["error"])
    assert cause in caplog.text and f"pid {os.getpid()} uid {os.getuid()}" in caplog.text
    if hello:
        assert "guest 'rogue'" in caplog.text
        assert env.handler.closed == [("rogue", messages[-1]["reason"])]
    else:
        assert env.handler.closed == []         # never got past hello: no on_close
    env.until(lambda: len(env.server.connections) == 1)
    assert open_fds() == before                 # the rogue's socket, fds and buffers are all closed

    good.flip(1, frame=5)                       # the other client never noticed
    env.until(lambda: env.handler.flips_of("office") == [5])
    env.conn("office").released(1)
    env.spin(0.01)
    assert good.poll(timeout=1) == [Released(1)]


def test_fds_left_over_at_close_are_an_error_and_do_not_leak(env, caplog):
    before = open_fds()
    rogue = socket.socket(socket.AF_UNIX)
    rogue.connect(env.path)
    rogue.sendall(encode(HELLO))
    fd = memfd()
    data = encode(BUFFER)
    send_with_fd(rogue, data[:10], fd)     # the fd and the start of a buffer message, then hang up
    os.close(fd)
    env.until(lambda: env.handler.hellos)
    with caplog.at_level(logging.WARNING, "directflip.framesocket"):
        rogue.close()
        env.until(lambda: env.handler.closed)
    assert env.handler.closed == [("rogue", "1 file descriptor(s) sent that no buffer message claimed")]
    assert "no buffer message claimed" in caplog.text
    assert open_fds() == before


def test_a_failing_step_of_closing_skips_none_of_the_others(env, monkeypatch, caplog):
    # Two descriptors wait for their messages when the client hangs up; letting the first go raises,
    # and so does the handler's on_close. The second is closed all the same, the connection leaves
    # the server (its name is free again) and its socket is closed.
    from compositor import fdguard
    before = open_fds()
    rogue = socket.socket(socket.AF_UNIX)
    rogue.connect(env.path)
    rogue.sendall(encode(HELLO))
    env.until(lambda: env.handler.hellos)
    first, second = memfd(), memfd()
    socket.send_fds(rogue, [encode(BUFFER)[:10]], [first, second])
    os.close(first)
    os.close(second)
    real = fdguard.discard
    calls = []

    def failing_once(fd, who, uid=None):
        calls.append(fd)
        if len(calls) == 1:
            os.close(fd)
            raise OSError(5, "Input/output error")
        real(fd, who, uid)

    def on_close(conn, reason):
        raise RuntimeError("handler broke")
    monkeypatch.setattr(fdguard, "discard", failing_once)
    monkeypatch.setattr(env.handler, "on_close", on_close)
    with caplog.at_level(logging.ERROR, "directflip.framesocket"):
        rogue.close()
        env.until(lambda: not env.server.connections)
    assert len(calls) == 2
    assert caplog.text.count("a step of closing the connection failed") == 2
    assert open_fds() == before
    client = env.client("rogue")   # the name is free
    assert client.version >= 1


def test_hanging_up_mid_message_is_reported(env):
    rogue = socket.socket(socket.AF_UNIX)
    rogue.connect(env.path)
    rogue.sendall(encode(HELLO) + encode({"type": "flip", "id": 1})[:6])
    env.until(lambda: env.handler.hellos)
    rogue.close()
    env.until(lambda: env.handler.closed)
    assert env.handler.closed == [("rogue", "connection closed in the middle of a message")]


def test_protocol_error_is_the_reason_the_client_sees(env, announced):
    client, _ = announced
    client.flip(99)
    with pytest.raises(ServerError, match="flip of unknown buffer 99"):
        env.run(client.poll, 5)
    with pytest.raises(ServerError, match="flip of unknown buffer 99"):   # and it stays dead
        client.flip(1)


# ------------------------------------------------------------------------------ handler and output

def test_handler_exception_is_logged_and_closes_only_that_client(env, announced, caplog):
    good, _ = announced
    bad = env.client("kiosk")
    fd = memfd()
    bad.announce(1, fd, "XR24", W, H, STRIDE)
    os.close(fd)
    with caplog.at_level(logging.ERROR, "directflip.framesocket"):
        bad.flip(1, frame=TRIP)
        with pytest.raises(ServerError, match="internal error in the compositor"):
            env.run(bad.poll, 5)
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "on_flip failed" in record.getMessage() and "guest 'kiosk'" in record.getMessage()
    assert record.exc_info and "the daemon tripped" in str(record.exc_info[1])
    assert env.handler.closed == [("kiosk", "internal error in the compositor")]
    good.flip(1, frame=1)
    env.until(lambda: env.handler.flips_of("office") == [1])


def test_a_client_that_does_not_read_is_closed(env, announced):
    client, _ = announced
    conn = env.conn("office")
    for _ in range(200_000):            # ~25 bytes each: 1 MiB queues long before this ends
        conn.released(1)
        if conn._failing:
            break
    assert not conn.closed              # closing waits for the loop: never inside released()
    env.until(lambda: conn.closed)
    assert env.handler.closed == [("office", "not reading its socket")]


def test_handler_may_close_a_connection(env, announced):
    client, _ = announced
    env.conn("office").close("guest removed from the policy")
    assert env.handler.closed == [("office", "guest removed from the policy")]
    with pytest.raises(ServerError, match="guest removed from the policy"):
        client.poll(timeout=1)


# ------------------------------------------------------------------------------------ socket file

def test_close_tells_every_client_and_unlinks_the_socket(env, announced):
    client, _ = announced
    env.server.close()
    assert not os.path.exists(env.path)
    assert env.server.connections == []
    assert env.handler.closed == [("office", "compositor shutting down")]
    with pytest.raises(ServerError, match="compositor shutting down"):
        client.poll(timeout=1)


def test_stale_socket_file_is_replaced_at_start(tmp_path):
    path = str(tmp_path / "frames.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()                            # the file stays, nobody listens: a crashed compositor
    loop = asyncio.new_event_loop()
    server = FrameSocketServer(path, Recorder(), mode=0o600)
    server.start(loop)
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        env = Env(loop, server, server.handler, path)
        env.client("office").close()
        env.until(lambda: server.handler.closed)
    finally:
        server.close()
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
    assert not os.path.exists(path)


def test_start_refuses_a_path_that_is_not_a_stale_socket(env, tmp_path):
    regular = tmp_path / "regular"
    regular.write_text("not a socket")
    with pytest.raises(FileExistsError, match="is not a socket"):
        FrameSocketServer(str(regular), Recorder()).start(env.loop)
    assert regular.read_text() == "not a socket"
    with pytest.raises(OSError, match="already listens"):   # env.server is alive on env.path
        FrameSocketServer(env.path, Recorder()).start(env.loop)
    env.client("office")                     # and still serving


# ------------------------------------------------------------------------------------ the framing

def test_encode_is_length_prefixed_compact_json():
    data = encode({"type": "flip", "id": 3, "frame": 9})
    assert data == struct.pack("<I", len(data) - 4) + b'{"type":"flip","id":3,"frame":9}'
    with pytest.raises(ValueError, match='needs a string "type"'):
        encode({"id": 1})
    with pytest.raises(ValueError, match="over the 65536-byte limit"):
        encode({"type": "x", "pad": "a" * MAX_MESSAGE})


def test_decoder_reports_where_each_message_starts():
    first, second = encode({"type": "a"}), encode({"type": "b"})
    decoder = Decoder()
    assert list(decoder.feed(first + second[:3])) == [{"type": "a"}] and decoder.start == 0
    assert decoder.pending == 3
    assert list(decoder.feed(second[3:])) == [{"type": "b"}] and decoder.start == len(first)


def test_decoder_refuses_deep_nesting_as_a_protocol_error():
    with pytest.raises(ProtocolError, match="nested too deeply"):
        list(Decoder().feed(raw_frame(b"[" * 30000 + b"]" * 30000)))


keys = st.text(max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=10)
messages = st.builds(lambda kind, extra: {**extra, "type": kind},
                     st.text(min_size=1, max_size=10), st.dictionaries(keys, json_values, max_size=5))


@settings(max_examples=200, deadline=None)
@given(st.lists(messages, max_size=8), st.data())
def test_any_split_of_a_stream_decodes_to_the_same_messages(msgs, data):
    stream = b"".join(encode(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    decoder, out = Decoder(), []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out.extend(decoder.feed(stream[start:end]))
    assert out == json.loads(json.dumps(msgs)) and decoder.pending == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=6))
def test_garbage_is_a_protocol_error_or_messages_never_a_crash(chunks):
    decoder = Decoder()
    try:
        for chunk in chunks:
            for msg in decoder.feed(chunk):
                assert isinstance(msg, dict) and isinstance(msg["type"], str)
    except ProtocolError:
        pass


def test_the_client_waits_out_a_full_backlog_until_its_timeout(tmp_path):
    # A listener that never accepts: once its backlog is full, connect() says EAGAIN at once. The
    # client keeps trying until its timeout, then says why.
    path = str(tmp_path / "full.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(0)
    fillers = []
    try:
        while True:
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                s.close()
                break
            fillers.append(s)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="did not accept the connection within 0.5 s"):
            FrameSocketClient(path, "late", timeout=0.5)
        assert time.monotonic() - t0 >= 0.45
    finally:
        for s in fillers:
            s.close()
        listener.close()
