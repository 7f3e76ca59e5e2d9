"""libFuzzer harness (atheris) for the reading side of the frame socket: the decoder and the message
checker of a real GuestConnection, fed through a real socketpair with real descriptors.

Each input is a script: raw bytes, version-2 binary records, well-formed messages with fuzzed members
(cursor images of fuzzed sizes, hot spots and base64 among them), bare length prefixes, and buffer
messages carrying memfds of fuzzed sizes, in fuzzed pieces; between them the compositor sends the guest
input through conn.input, and the guest reads (or does not read) what it was sent. The server's socket
buffer is small and its input bound zero here, so dropping input, keeping releases and catching up all
happen. After the script the client hangs up. Whatever happens, nothing may escape the connection's read
handler or its input sink, the connection must end closed, the handler must have been told once (if the
guest got past hello), no descriptor may be left open, and on_cursor must only ever see a cursor whose
pixels fill its image and whose hot spot lies in it, and a pointer in range.

    python tests/reliability/fuzz_framesocket.py -runs=100000        # or without -runs: until stopped
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import select
import socket
import struct
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["compositor"]):
    from compositor.sources import framesocket
    from compositor.sources.frame import MAX_DIMENSION, Buffer, Cursor, Frame
    from compositor.sources.frame import Pointer as GuestPointer
    from compositor.sources.framesocket import FrameSocketServer, GuestConnection, Peer, Refused, encode
    from compositor.sources.fswire import RECORD, flip_record

TYPES = ["hello", "buffer", "flip", "forget", "bye", "vfio-device", "pointer-mode", "cursor", "cursor-move",
         "released", "key", "", "HELLO"]
FIELDS = ["version", "name", "uuid", "pointer", "id", "fourcc", "width", "height", "stride", "offset",
          "modifier", "frame", "mode", "hot_x", "hot_y", "pixels", "x", "y", "visible"]
# What a "pixels" member may hold besides a well-formed image: base64 that breaks one rule each.
PIXELS = ["", "AAAA", "AAA=", "AA==", "AA", "A===", "AAAA====", "AA==AA==", "=AAA", "AA=A", "AB==",
          "AA\nAA", "AA AA", "AA-_", "\u00e9AAA", "/////w==", "AAAA" * 1024]
FOURCCS = ["XR24", "AR24", "RG16", "RG24", "NV12", "XR2", "XR245", "\u00e9R24", "\x00\x00\x00\x00"]
MODES = ["absolute", "relative", "Absolute", "", "tablet"]
TOUCH_KINDS = ["down", "motion", "up", "cancel"]
SNDBUF = 4096  # the server end's send buffer: a few messages fill it, and the rest queue in the connection
framesocket.MAX_QUEUED_INPUT = 0  # drop as soon as anything waits: a script fills SNDBUF, then drops


class Handler:
    """Answers flips, refuses a guest named `refuse`, owns what it is handed, counts closes, checks
    every cursor and pointer it is shown."""

    def __init__(self) -> None:
        self.closes = 0
        self.broken: list[str] = []  # what on_cursor found wrong

    def on_hello(self, conn: GuestConnection) -> None:
        if conn.name == "refuse":
            raise Refused("refused")

    def on_buffer(self, conn: GuestConnection, buffer: Buffer) -> None:
        pass

    def on_flip(self, conn: GuestConnection, frame: Frame) -> None:
        conn.presented(frame.buffer.id, frame.seq, 1, 1)
        conn.released(frame.buffer.id)

    def on_forget(self, conn: GuestConnection, buffer: Buffer) -> None:
        buffer.close()

    def on_vfio_device(self, conn: GuestConnection, fd: int) -> None:
        conn.vfio_fd = None
        os.close(fd)
        raise Refused("not a vGPU")

    def on_cursor(self, conn: GuestConnection) -> None:
        # The server catches what a callback raises (it closes that client), so a broken promise is
        # written down here and asserted after the script instead.
        try:
            check_cursor(conn)
        except AssertionError as exc:
            self.broken.append(f"on_cursor saw {conn.cursor!r:.200}, {conn.pointer!r}: {exc}")

    def on_close(self, conn: GuestConnection, reason: str) -> None:
        self.closes += 1
        for buffer in conn.buffers.values():
            buffer.close()


def check_cursor(conn: GuestConnection) -> None:
    """What the daemon will trust: a cursor whose pixels fill its image exactly and whose hot spot lies
    in it, a pointer in range."""
    cursor, pointer = conn.cursor, conn.pointer
    assert cursor is not None or pointer is not None, "nothing to show"
    if cursor is not None:
        assert isinstance(cursor, Cursor) and 1 <= cursor.width <= 64 and 1 <= cursor.height <= 64
        assert len(cursor.pixels) == cursor.width * cursor.height * 4
        assert 0 <= cursor.hot_x < cursor.width and 0 <= cursor.hot_y < cursor.height
        assert cursor.serial >= 1
    if pointer is not None:
        assert isinstance(pointer, GuestPointer) and type(pointer.visible) is bool
        assert 0 <= pointer.x < MAX_DIMENSION and 0 <= pointer.y < MAX_DIMENSION


LOOP = asyncio.new_event_loop()  # never run: the connection only registers its fd with it
HANDLER = Handler()
SERVER = FrameSocketServer("/nonexistent/frames.sock", HANDLER)  # never started: no listening socket
SERVER._loop = LOOP
BASELINE = sorted(os.listdir("/proc/self/fd"))


def value(fdp: atheris.FuzzedDataProvider) -> object:
    kind = fdp.ConsumeIntInRange(0, 6)
    if kind == 0:
        return fdp.ConsumeIntInRange(0, 70000)
    if kind == 1:
        return fdp.ConsumeInt(9)  # up to ±2**71
    if kind == 2:
        return fdp.PickValueInList(FOURCCS + MODES + PIXELS)
    if kind == 3:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 70))
    if kind == 4:
        return fdp.PickValueInList([None, True, False, 1.0, [], {}, [1], {"a": 1}])
    if kind == 5:
        return fdp.ConsumeRegularFloat()
    return 1


def message(fdp: atheris.FuzzedDataProvider) -> bytes:
    msg: dict[str, object] = {"type": fdp.PickValueInList(TYPES)}
    if msg["type"] == "hello":
        msg |= {"version": fdp.PickValueInList([1, 2, 2, 3]),
                "name": fdp.PickValueInList(["guest", "refuse", "g" * 65, "a b"])}
        if fdp.ConsumeBool():
            msg["pointer"] = fdp.PickValueInList(MODES)
    elif msg["type"] == "pointer-mode":
        msg["mode"] = fdp.PickValueInList(MODES)
    elif msg["type"] == "buffer":
        msg |= {"id": 1, "fourcc": "XR24", "width": 16, "height": 16, "stride": 64}
    elif msg["type"] in ("flip", "forget"):
        msg |= {"id": 1}
    elif msg["type"] == "cursor":
        # mostly near the limits: sizes 1..65, hot spots at and past the edge, pixels a few bytes off
        width, height = fdp.ConsumeIntInRange(1, 65), fdp.ConsumeIntInRange(1, 65)
        size = width * height * 4 + fdp.PickValueInList([0, 0, 0, -1, 1, -4, 4])
        msg |= {"width": width, "height": height, "hot_x": fdp.ConsumeIntInRange(0, width),
                "hot_y": fdp.ConsumeIntInRange(0, height),
                "pixels": base64.b64encode(fdp.ConsumeBytes(1) * max(size, 0)).decode()}
    elif msg["type"] == "cursor-move":
        msg |= {"x": fdp.ConsumeIntInRange(0, 16384), "y": fdp.ConsumeIntInRange(0, 16384),
                "visible": fdp.ConsumeBool()}
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        msg[fdp.PickValueInList(FIELDS)] = value(fdp)
    try:
        body = json.dumps(msg).encode()
    except ValueError:  # NaN, infinity: the server must refuse them as text
        body = json.dumps(msg, allow_nan=True).encode()
    return struct.pack("<I", len(body)) + body


def record(fdp: atheris.FuzzedDataProvider) -> bytes:
    """A version-2 binary record: a flip of a near buffer id, or any kind with any bits and bytes."""
    if fdp.ConsumeBool():
        return flip_record(fdp.ConsumeIntInRange(0, 3), fdp.ConsumeIntInRange(0, 2**64 - 1))
    word = RECORD | fdp.ConsumeIntInRange(0, 2**31 - 1)
    return struct.pack("<I", word) + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))


def memfd(size: int) -> int:
    fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def send(client: socket.socket, data: bytes, nfds: int, size: int) -> None:
    fds = [memfd(size) for _ in range(nfds)]
    try:
        if fds:
            socket.send_fds(client, [data], fds)
        else:
            client.sendall(data)
    finally:
        for fd in fds:
            os.close(fd)


def send_input(conn: GuestConnection, fdp: atheris.FuzzedDataProvider) -> None:
    """What the compositor's input router does: any sink call, in range, at any time."""
    sink = conn.input
    for _ in range(fdp.ConsumeIntInRange(1, 32)):
        what = fdp.ConsumeIntInRange(0, 5)
        if what == 0:
            sink.key(fdp.PickValueInList([29, 30, 0, 767]), fdp.ConsumeBool())  # few: presses get released
        elif what == 1:
            sink.button(fdp.PickValueInList([0x110, 0x111, 0x112, 0x117]), fdp.ConsumeBool())
        elif what == 2:
            sink.pointer_abs(fdp.ConsumeInt(4), fdp.ConsumeInt(4))  # clamped, never an error
        elif what == 3:
            sink.pointer_rel(fdp.ConsumeInt(9), fdp.ConsumeInt(9))
        elif what == 4:
            sink.wheel(fdp.ConsumeInt(2), fdp.ConsumeInt(2))
        else:
            sink.touch(fdp.PickValueInList(TOUCH_KINDS), fdp.ConsumeIntInRange(0, 3), fdp.ConsumeInt(3),
                       fdp.ConsumeInt(3))
    assert sink.absolute == (conn.pointer_mode == "absolute")


def catch_up(conn: GuestConnection, client: socket.socket) -> None:
    """The guest reads everything it was sent, and the server sends what it had queued (what the
    loop's writer callback would do)."""
    for _ in range(1000):  # each round moves a socket buffer's worth; 1 MiB at most is queued
        if conn._flush_due and not conn.closed:
            conn._flush()  # the records queued in one callback, as the loop would send them after it
        if conn._writing and not conn.closed:
            conn._on_writable()
        try:
            got = client.recv(1 << 20)
        except (BlockingIOError, ConnectionResetError):
            got = b""
        if not got and not (conn._writing and not conn.closed):
            return


def drain(conn: GuestConnection, server_end: socket.socket) -> None:
    """What the loop would do: call the read handler while the socket is readable."""
    poller = select.poll()
    poller.register(server_end, select.POLLIN)
    while not conn.closed and poller.poll(0):
        conn._on_readable()


def connect() -> tuple[socket.socket, socket.socket, GuestConnection]:
    """A connection of SERVER on one end of a socketpair, the guest's end returned with it; both
    non-blocking, and the server's send buffer small."""
    server_end, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server_end.setblocking(False)
    server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
    client.setblocking(False)
    conn = GuestConnection(SERVER, server_end, Peer(os.getpid(), 0, 0))
    SERVER.connections.append(conn)
    LOOP.add_reader(server_end.fileno(), conn._on_readable)
    return server_end, client, conn


def send_piece(client: socket.socket, fdp: atheris.FuzzedDataProvider, step: int) -> None:
    """What the guest sends for one step of the script: raw bytes (0), a message (1), a bare length
    prefix (2), a binary record (6), or a message with memfds (3)."""
    if step == 0:
        send(client, fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 300)), 0, 0)
    elif step == 1:
        send(client, message(fdp), 0, 0)
    elif step == 2:
        send(client, struct.pack("<I", fdp.ConsumeIntInRange(0, 2**32 - 1)), 0, 0)
    elif step == 6:
        send(client, record(fdp), 0, 0)
    else:
        nfds, size = fdp.ConsumeIntInRange(0, 20), fdp.ConsumeIntInRange(0, 1 << 14)
        send(client, message(fdp), nfds, size)


def play(conn: GuestConnection, server_end: socket.socket, client: socket.socket,
         fdp: atheris.FuzzedDataProvider) -> None:
    """The script: up to 12 steps of the guest sending, the compositor sending input (4) or the guest
    catching up (5), the server reading after each send; it ends early once the connection closes."""
    for _ in range(fdp.ConsumeIntInRange(0, 12)):
        if conn.closed:
            break
        step = fdp.ConsumeIntInRange(0, 6)
        if step == 4:
            send_input(conn, fdp)
            continue
        if step == 5:
            catch_up(conn, client)
            continue
        try:
            send_piece(client, fdp, step)
        except (BrokenPipeError, ConnectionResetError):
            break
        except BlockingIOError:
            pass  # the server is not reading fast enough: it will read what is there
        drain(conn, server_end)


def TestOneInput(data: bytes) -> None:  # noqa: N802 — libFuzzer's name
    fdp = atheris.FuzzedDataProvider(data)
    server_end, client, conn = connect()
    closes = HANDLER.closes
    if fdp.ConsumeBool():
        client.sendall(encode({"type": "hello", "version": fdp.PickValueInList([1, 2]), "name": "guest"}))
    try:
        play(conn, server_end, client, fdp)
        if not conn.closed:
            client.shutdown(socket.SHUT_WR)
            drain(conn, server_end)  # up to the end of stream
        assert conn.closed, "a connection outlived its client's hang-up"
        assert HANDLER.closes - closes <= 1, "on_close called twice"
        assert conn not in SERVER.connections
        assert not HANDLER.broken, HANDLER.broken
    finally:
        client.close()
        if not conn.closed:
            conn.close("harness")
    while LOOP._ready:  # flushes scheduled on the never-run loop: each finds its connection closed
        LOOP._ready.popleft()._run()
    left = sorted(os.listdir("/proc/self/fd"))
    assert left == BASELINE, f"descriptors leaked: {sorted(set(left) - set(BASELINE))}"


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
