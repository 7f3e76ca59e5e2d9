"""libFuzzer harness (atheris) for the reading side of the frame socket: the decoder and the message
checker of a real GuestConnection, fed through a real socketpair with real descriptors.

Each input is a script: raw bytes, well-formed messages with fuzzed members, bare length prefixes, and
buffer messages carrying memfds of fuzzed sizes, in fuzzed pieces. After the script the client hangs
up. Whatever happens, nothing may escape the connection's read handler, the connection must end
closed, the handler must have been told once (if the guest got past hello), and no descriptor may be
left open.

    python tests/reliability/fuzz_framesocket.py -runs=100000        # or without -runs: until stopped
"""

from __future__ import annotations

import asyncio
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
    from compositor.sources.frame import Buffer, Frame
    from compositor.sources.framesocket import FrameSocketServer, GuestConnection, Peer, Refused, encode

TYPES = ["hello", "buffer", "flip", "forget", "bye", "vfio-device", "released", "", "HELLO"]
FIELDS = ["version", "name", "uuid", "id", "fourcc", "width", "height", "stride", "offset", "modifier",
          "frame"]
FOURCCS = ["XR24", "AR24", "RG16", "RG24", "NV12", "XR2", "XR245", "\u00e9R24", "\x00\x00\x00\x00"]


class Handler:
    """Answers flips, refuses a guest named `refuse`, owns what it is handed, counts closes."""

    def __init__(self) -> None:
        self.closes = 0

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

    def on_close(self, conn: GuestConnection, reason: str) -> None:
        self.closes += 1
        for buffer in conn.buffers.values():
            buffer.close()


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
        return fdp.PickValueInList(FOURCCS)
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
        msg |= {"version": 1, "name": fdp.PickValueInList(["guest", "refuse", "g" * 65, "a b"])}
    elif msg["type"] == "buffer":
        msg |= {"id": 1, "fourcc": "XR24", "width": 16, "height": 16, "stride": 64}
    elif msg["type"] in ("flip", "forget"):
        msg |= {"id": 1}
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        msg[fdp.PickValueInList(FIELDS)] = value(fdp)
    try:
        body = json.dumps(msg).encode()
    except ValueError:  # NaN, infinity: the server must refuse them as text
        body = json.dumps(msg, allow_nan=True).encode()
    return struct.pack("<I", len(body)) + body


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


def drain(conn: GuestConnection, server_end: socket.socket) -> None:
    """What the loop would do: call the read handler while the socket is readable."""
    poller = select.poll()
    poller.register(server_end, select.POLLIN)
    while not conn.closed and poller.poll(0):
        conn._on_readable()


def TestOneInput(data: bytes) -> None:  # noqa: N802 — libFuzzer's name
    fdp = atheris.FuzzedDataProvider(data)
    server_end, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server_end.setblocking(False)
    client.setblocking(False)
    conn = GuestConnection(SERVER, server_end, Peer(os.getpid(), 0, 0))
    SERVER.connections.append(conn)
    LOOP.add_reader(server_end.fileno(), conn._on_readable)
    closes = HANDLER.closes
    if fdp.ConsumeBool():
        client.sendall(encode({"type": "hello", "version": 1, "name": "guest"}))
    try:
        for _ in range(fdp.ConsumeIntInRange(0, 12)):
            if conn.closed:
                break
            step = fdp.ConsumeIntInRange(0, 3)
            try:
                if step == 0:
                    send(client, fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 300)), 0, 0)
                elif step == 1:
                    send(client, message(fdp), 0, 0)
                elif step == 2:
                    send(client, struct.pack("<I", fdp.ConsumeIntInRange(0, 2**32 - 1)), 0, 0)
                else:
                    nfds, size = fdp.ConsumeIntInRange(0, 20), fdp.ConsumeIntInRange(0, 1 << 14)
                    send(client, message(fdp), nfds, size)
            except (BrokenPipeError, ConnectionResetError):
                break
            except BlockingIOError:
                pass  # the server is not reading fast enough: it will read what is there
            drain(conn, server_end)
        if not conn.closed:
            client.shutdown(socket.SHUT_WR)
            drain(conn, server_end)  # up to the end of stream
        assert conn.closed, "a connection outlived its client's hang-up"
        assert HANDLER.closes - closes <= 1, "on_close called twice"
        assert conn not in SERVER.connections
    finally:
        client.close()
        if not conn.closed:
            conn.close("harness")
    left = sorted(os.listdir("/proc/self/fd"))
    assert left == BASELINE, f"descriptors leaked: {sorted(set(left) - set(BASELINE))}"


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
