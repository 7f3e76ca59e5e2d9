"""The hostile side of tests/reliability/test_hostile.py, run as its own processes.

`python hostile.py fuse MOUNTPOINT OWNER_UID`: a FUSE filesystem served from /dev/fuse with the
kernel's raw protocol (include/uapi/linux/fuse.h), mounted `allow_other` with `user_id=OWNER_UID` (whose
mount it is). It holds one file, `/frame`, 1 MiB, and answers everything needed to open it, but never
answers a FLUSH: a descriptor of `/frame` cannot be closed (by anyone) until the mount is aborted or
this process dies. Needs root (it calls mount(2)). Prints "ready" once mounted, then one line per
request.

`python hostile.py guest SOCKET NAME WHEN FILE`: a frame-socket client (run as the user the test wants)
that opens FILE and passes its descriptor to the compositor: WHEN is `hello` (with its hello) or
`buffer` (with a buffer message after the welcome). It prints every message the compositor sent as one
JSON line, then exits.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import struct
import sys

_IN_HEADER = struct.Struct("<IIQQIIIHH")   # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
_OUT_HEADER = struct.Struct("<IiQ")        # len, error, unique
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # struct fuse_attr (88 bytes)
LOOKUP, GETATTR, OPEN, RELEASE, FLUSH, INIT, OPENDIR, RELEASEDIR, ACCESS = 1, 3, 14, 18, 25, 26, 27, 29, 34
ROOT, FILE = 1, 2
SIZE = 1 << 20


def _attr(node: int) -> bytes:
    mode = 0o040755 if node == ROOT else 0o100666
    return _ATTR.pack(node, 0 if node == ROOT else SIZE, 0, 0, 0, 0, 0, 0, 0, mode, 1, 0, 0, 0, 4096, 0)


def _reply(dev: int, unique: int, payload: bytes = b"", err: int = 0) -> None:
    try:
        os.write(dev, _OUT_HEADER.pack(_OUT_HEADER.size + len(payload), -err, unique) + payload)
    except OSError:
        pass   # the request was interrupted meanwhile


def serve_fuse(mountpoint: str, owner: int) -> None:
    dev = _mount(mountpoint, owner)
    print("ready", flush=True)
    while True:
        try:
            req = os.read(dev, 1 << 20)
        except OSError as exc:
            if exc.errno == errno.ENODEV:   # unmounted, or the connection aborted
                print("gone", flush=True)
                return
            if exc.errno in (errno.EINTR, errno.ENOENT):
                continue
            raise
        _answer(dev, req)


def _mount(mountpoint: str, owner: int) -> int:
    """Mount the filesystem at `mountpoint` as `owner`'s; returns the /dev/fuse descriptor to serve."""
    libc = ctypes.CDLL(None, use_errno=True)
    dev = os.open("/dev/fuse", os.O_RDWR)
    opts = f"fd={dev},rootmode=40000,user_id={owner},group_id={owner},allow_other".encode()
    if libc.mount(b"hostile", mountpoint.encode(), b"fuse.hostile", 0x6, opts) != 0:  # nosuid, nodev
        sys.exit(f"mount: {os.strerror(ctypes.get_errno())}")
    return dev


def _answer(dev: int, req: bytes) -> None:
    """One request from the kernel: printed, then answered, except a FLUSH, which is left waiting."""
    _, opcode, unique, node, *_ = _IN_HEADER.unpack_from(req)
    body = req[_IN_HEADER.size:]
    print(f"op {opcode} node {node}", flush=True)
    if opcode == INIT:
        # fuse_init_out: major, minor, max_readahead, flags, max_background, congestion_threshold,
        # max_write, time_gran, max_pages, map_alignment, flags2, unused[7]
        init = struct.pack("<IIIIHHIIHHI7I", 7, 31, 0, 0, 16, 12, 65536, 1, 16, 0, 0, *[0] * 7)
        _reply(dev, unique, init)
    elif opcode == LOOKUP:
        if body.rstrip(b"\0") == b"frame":
            _reply(dev, unique, struct.pack("<QQQQII", FILE, 0, 3600, 3600, 0, 0) + _attr(FILE))
        else:
            _reply(dev, unique, err=errno.ENOENT)
    elif opcode == GETATTR:
        _reply(dev, unique, struct.pack("<QII", 3600, 0, 0) + _attr(node))
    elif opcode in (OPEN, OPENDIR):
        _reply(dev, unique, struct.pack("<QII", 1, 0, 0))
    elif opcode in (RELEASE, RELEASEDIR):
        _reply(dev, unique)
    elif opcode == FLUSH:
        print("flush: never answered", flush=True)
    else:
        _reply(dev, unique, err=errno.ENOSYS)


def _frame(msg: dict) -> bytes:
    body = json.dumps(msg).encode()
    return struct.pack("<I", len(body)) + body


def _read_all(sock: socket.socket) -> list[dict]:
    sock.settimeout(20)
    data = b""
    while True:
        try:
            got = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            got = b""
        if not got:
            break
        data += got
    out = []
    while len(data) >= 4:
        (n,) = struct.unpack_from("<I", data)
        out.append(json.loads(data[4:4 + n]))
        data = data[4 + n:]
    return out


def guest(path: str, name: str, when: str, file: str) -> None:
    fd = os.open(file, os.O_RDWR)
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    hello = _frame({"type": "hello", "version": 1, "name": name})
    if when == "hello":
        socket.send_fds(sock, [hello], [fd])
    else:
        sock.sendall(hello)
        sock.settimeout(20)
        first = sock.recv(65536)
        print(json.dumps(json.loads(first[4:])), flush=True)
        buffer = {"type": "buffer", "id": 1, "fourcc": "XR24", "width": 64, "height": 64, "stride": 256}
        socket.send_fds(sock, [_frame(buffer)], [fd])
    for msg in _read_all(sock):
        print(json.dumps(msg), flush=True)
    sock.close()
    sys.stdout.flush()
    os.close(1)   # the reader's end of the stream, before exit closes `fd` (which may wait on FUSE)
    os._exit(0)


def connections(path: str, names: list[str], then: int) -> None:
    """Connect once per name and say hello as it (each waits for its welcome), then open `then` more
    connections that say nothing; print one line per connection: what it was told first (`none`:
    nothing within a second). The connections stay open until stdin ends."""
    socks = []
    for name in names:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        sock.sendall(_frame({"type": "hello", "version": 1, "name": name}))
        socks.append(sock)
        print(json.dumps(_first(sock, 20)), flush=True)
    for _ in range(then):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        socks.append(sock)
        print(json.dumps(_first(sock, 1)), flush=True)
    sys.stdin.read()


def _first(sock: socket.socket, timeout: float) -> dict:
    sock.settimeout(timeout)
    try:
        head = sock.recv(4, socket.MSG_WAITALL)
    except TimeoutError:
        return {"type": "none"}
    if len(head) < 4:
        return {"type": "eof"}
    (n,) = struct.unpack("<I", head)
    return json.loads(sock.recv(n, socket.MSG_WAITALL))


def garbage(path: str, count: int) -> None:
    """`count` clients, one after the other, each sending a malformed message; print how many were
    closed with an error."""
    errors = 0
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        sock.sendall(_frame({"type": "hello", "version": 1, "name": "intruder-x", "pointer": 7}))
        messages = _read_all(sock)
        errors += bool(messages) and messages[-1]["type"] == "error"
        sock.close()
    print(json.dumps({"errors": errors}), flush=True)


def qemu_peer(fd: int, file: str) -> None:
    """A QEMU display peer (directflip_tools.qemu_peer) on the D-Bus connection `fd` that
    answers the compositor's handshake, then calls ScanoutDMABUF with a descriptor of `file`; prints
    what the compositor answered."""
    from dbus_fast import DBusError

    from compositor.formats import XRGB8888
    from directflip_tools.qemu_peer import QemuDisplayPeer

    async def run() -> dict:
        peer = QemuDisplayPeer(width=64, height=64)
        await peer.serve_peer(socket.socket(fileno=fd))
        listener = await peer.listener(timeout=60)
        handed = os.open(file, os.O_RDWR)
        try:
            await listener.scanout_dmabuf(handed, 64, 64, 256, XRGB8888)
            return {"answer": "accepted"}
        except DBusError as exc:
            return {"answer": "error", "text": exc.text}
    import asyncio
    print(json.dumps(asyncio.run(run())), flush=True)
    os.close(1)   # before exit closes the file's descriptor, which may wait on the FUSE server
    os._exit(0)


if __name__ == "__main__":
    if sys.argv[1] == "fuse":
        serve_fuse(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "guest":
        guest(*sys.argv[2:6])
    elif sys.argv[1] == "qemu-peer":
        qemu_peer(int(sys.argv[2]), sys.argv[3])
    else:
        sys.exit(__doc__)
