"""Bad input on the host side (issue 8): never a crash, never a pixel read outside a guest's buffer,
always a clear error on the offending client only.

- Frame socket: a real FrameSocketServer on its own loop thread, two well-behaved guests flipping on
  it, and a hostile client sending what hypothesis makes of the protocol: one bad field at a time (the
  error must name it), planes of every shape against memfds of every size, descriptors of the wrong
  kind or number, broken framing. After each hostile client the good guests still get their answers,
  the server logged no error and raised nothing into its loop, and no descriptor leaked.
- Plane checks and the copy path: whatever PlaneInfo.validate accepts lies inside the buffer, and the
  real CopyBuffers.copy over a memfd of exactly that size reads only inside it.
- VFIO: VfioDevice and VfioGuest.poll over a fake ioctl layer answering hypothesis' planes and regions.
- Policy: mutations of the shipped policies give a Policy or a PolicyError with file:line, nothing else.
- Control socket: a real ControlServer answers every bad request line with an error naming the cause.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import ctypes
import errno
import json
import logging
import mmap
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from compositor import control, fdguard, policy, scanout
from compositor.formats import DRM_FORMAT_MOD_INVALID, FORMATS, fourcc, fourcc_name
from compositor.planner import Rect
from compositor.sources import vfio
from compositor.sources.frame import MAX_DIMENSION, MAX_STRIDE_SLACK, BadPlane, Buffer, Frame, PlaneInfo
from compositor.sources.framesocket import (
    MAX_MESSAGE,
    MAX_PENDING_FDS,
    Decoder,
    FrameSocketClient,
    FrameSocketServer,
    GuestConnection,
    GuestHandler,
    Presented,
    Refused,
    Released,
    encode,
)

HERE = Path(__file__).resolve().parent
POLICIES = sorted((HERE.parents[1] / "policies").glob("*.yaml")) + sorted(
    (HERE.parent / "data" / "policies").glob("*.yaml"))
U32, U64 = 2**32 - 1, 2**64 - 1
W, H, STRIDE = 64, 64, 256  # the hostile client's base plane: XR24, 16384 bytes
SIZE = STRIDE * H
GOOD_GUESTS = ("office", "media")
SOCKET_TESTS = settings(max_examples=60, deadline=None, database=None,
                        suppress_health_check=[HealthCheck.too_slow])
PURE_TESTS = settings(max_examples=300, deadline=None, database=None)


def memfd(size: int, data: bytes | None = None) -> int:
    fd = os.memfd_create("reliability", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if data:
        os.pwrite(fd, data, 0)
    return fd


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# ================================================================================ the frame socket

class Answering(GuestHandler):
    """A GuestHandler that answers like the daemon does for a guest on screen: every flip is
    presented at once and the guest's previous buffer released. It closes every buffer it is handed,
    and a handed-over VFIO fd goes through the real VfioDevice probe."""

    def __init__(self) -> None:
        self.latest: dict[GuestConnection, int] = {}
        self.vfio_refusals: list[str] = []

    def on_hello(self, conn: GuestConnection) -> None:
        pass

    def on_buffer(self, conn: GuestConnection, buffer: Buffer) -> None:
        pass

    def on_flip(self, conn: GuestConnection, frame: Frame) -> None:
        previous = self.latest.get(conn)
        if previous is not None and previous != frame.buffer.id:
            conn.released(previous)
        self.latest[conn] = frame.buffer.id
        conn.presented(frame.buffer.id, frame.seq, time.monotonic_ns(), frame.seq)

    def on_forget(self, conn: GuestConnection, buffer: Buffer) -> None:
        buffer.close()

    def on_vfio_device(self, conn: GuestConnection, fd: int) -> None:
        conn.vfio_fd = None
        device = vfio.VfioDevice(fd, conn.name)
        try:
            device.probe()
        except vfio.VfioError as exc:
            device.close()
            self.vfio_refusals.append(str(exc))
            raise Refused(f"the handed-over device: {exc}") from None
        device.close()

    def on_close(self, conn: GuestConnection, reason: str) -> None:
        self.latest.pop(conn, None)
        for buffer in conn.buffers.values():
            buffer.close()


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


class GoodGuest:
    """A well-behaved guest: two buffers, flipped in turn, each flip answered before the next."""

    def __init__(self, path: str, name: str) -> None:
        self.fds = [memfd(SIZE), memfd(SIZE)]
        self.client = FrameSocketClient(path, name)
        for buffer_id, fd in enumerate(self.fds, 1):
            self.client.announce(buffer_id, fd, "XR24", W, H, STRIDE)
        self.frame = 0

    def roundtrip(self) -> None:
        buffer_id, other = (1, 2) if self.frame % 2 == 0 else (2, 1)
        self.client.flip(buffer_id, self.frame)
        wanted = {Presented}
        if self.frame:
            wanted.add(Released)
        deadline = time.monotonic() + 5
        while wanted:
            assert time.monotonic() < deadline, f"no answer to flip {self.frame}: still waiting for {wanted}"
            for event in self.client.poll(timeout=1):
                if isinstance(event, Presented) and (event.id, event.frame) == (buffer_id, self.frame):
                    wanted.discard(Presented)
                elif isinstance(event, Released) and event.id == other:
                    wanted.discard(Released)
        self.frame += 1

    def close(self) -> None:
        self.client.close()
        for fd in self.fds:
            os.close(fd)


class Watched:
    """A server's own event loop, and what the server raised into it or logged at ERROR."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.crashes: list[str] = []
        self.loop.set_exception_handler(lambda loop, ctx: self.crashes.append(
            f"{ctx.get('message')}: {ctx.get('exception')!r}"))
        self.errors = ErrorLog()
        logging.getLogger("directflip").addHandler(self.errors)

    def close(self) -> None:
        self.loop.close()
        logging.getLogger("directflip").removeHandler(self.errors)


class Arena(Watched):
    """A FrameSocketServer serving on its own loop thread, with good guests connected."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.handler = Answering()
        self.server = FrameSocketServer(path, self.handler)
        self.thread = threading.Thread(target=self.loop.run_forever, name="frame-socket-arena", daemon=True)
        self.thread.start()
        self.call(self.server.start, self.loop)
        self.good = [GoodGuest(path, name) for name in GOOD_GUESTS]

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn on the loop thread and wait for it: also a barrier behind everything queued."""
        done: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 — handed to the caller
                done.set_exception(exc)
        self.loop.call_soon_threadsafe(run)
        return done.result(timeout=10)

    def good_guests_flip(self) -> None:
        for guest in self.good:
            guest.roundtrip()

    def settle(self) -> None:
        """Wait until only the good guests are connected (every hostile connection fully closed)."""
        deadline = time.monotonic() + 5
        while self.call(lambda: len(self.server.connections)) != len(self.good):
            assert time.monotonic() < deadline, "a hostile connection was never closed"
            time.sleep(0.001)

    def check_healthy(self) -> None:
        assert not self.crashes, f"the server raised into its loop: {self.crashes}"
        assert not self.errors.records, f"the server logged errors: {self.errors.records}"
        assert [c.name for c in self.call(lambda: list(self.server.connections))] == list(GOOD_GUESTS)

    def close(self) -> None:
        for guest in self.good:
            guest.close()
        self.call(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        super().close()


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    with closing(Arena(str(tmp_path_factory.mktemp("frames") / "frames.sock"))) as arena:
        yield arena


def read_to_eof(sock: socket.socket) -> list[dict[str, Any]]:
    """Every message until the server closes (a reset after its last bytes is a close too)."""
    decoder = Decoder()
    return [msg for chunk in iter(lambda: _recv(sock), b"") for msg in decoder.feed(chunk)]


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


Send = tuple[bytes, list[int]]  # bytes and the descriptors that go with their first byte
HELLO = {"type": "hello", "version": 1, "name": "hostile", "uuid": None}
BUFFER = {"type": "buffer", "id": 1, "fourcc": "XR24", "width": W, "height": H, "stride": STRIDE,
          "offset": 0, "modifier": 0}


def hostile(arena: Arena, sends: list[Send], *, hello: bool = True) -> list[dict[str, Any]]:
    """Connect, say hello (unless told not to), send `sends`, let the good guests flip while the
    connection is open, then half-close and return everything the server said until it closed."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(arena.path)
        for data, fds in ([(encode(HELLO), [])] if hello else []) + sends:
            try:
                if fds:
                    socket.send_fds(sock, [data], fds)
                else:
                    sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server already closed: the rest is never read
        arena.good_guests_flip()
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return read_to_eof(sock)
    finally:
        sock.close()


def assert_closed_with(messages: list[dict[str, Any]], *causes: str) -> str:
    assert messages, "the server closed without a word"
    last = messages[-1]
    assert last["type"] == "error", f"the connection ended without an error: {messages}"
    for cause in causes:
        assert cause in last["reason"], f"{cause!r} not in the reason {last['reason']!r}"
    assert all(m["type"] in ("welcome", "presented", "released") for m in messages[:-1]), messages
    return last["reason"]


def survive(arena: Arena, scenario: Callable[[list[int]], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Run a hostile scenario (given a list to put the descriptors it creates in) and check that the
    server is unharmed: no leak, no crash, no error logged, good guests served before and after."""
    arena.errors.records.clear()
    arena.good_guests_flip()
    before = open_fds()
    mine: list[int] = []
    try:
        messages = scenario(mine)
    finally:
        for fd in mine:
            os.close(fd)
    arena.settle()
    assert fdguard.QUARANTINE.wait_idle(10), "a refused descriptor is still being closed"
    assert open_fds() == before, "descriptors leaked"
    arena.good_guests_flip()
    arena.check_healthy()
    return messages


# --- one bad field at a time: the error names it

MISSING = object()
JSON_NOT_INT = st.one_of(st.text(max_size=6), st.floats(allow_nan=False, allow_infinity=False),
                         st.booleans(), st.none(), st.lists(st.integers(0, 9), max_size=3),
                         st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2))
JSON_NOT_STR = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
                         st.booleans(), st.none(), st.lists(st.integers(0, 9), max_size=3),
                         st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2))
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
TYPES = ("hello", "buffer", "flip", "forget", "vfio-device", "pointer-mode", "cursor", "cursor-move", "bye")
POINTER_MODES = ("absolute", "relative")
CURSOR_W, CURSOR_H = 16, 8  # the hostile client's base pointer image: 512 bytes of ARGB8888
CURSOR_BYTES = CURSOR_W * CURSOR_H * 4
CURSOR = {"type": "cursor", "width": CURSOR_W, "height": CURSOR_H, "hot_x": 3, "hot_y": 2,
          "pixels": base64.b64encode(bytes(range(256)) * 2).decode()}  # 684 characters, ending "=="
CURSOR_MOVE = {"type": "cursor-move", "x": 100, "y": 200, "visible": True}
JSON_NOT_BOOL = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
                          st.text(max_size=6), st.none(), st.lists(st.booleans(), max_size=3),
                          st.dictionaries(st.text(max_size=3), st.booleans(), max_size=2))


@dataclass(frozen=True)
class BadField:
    message: str  # hello, buffer, flip, forget, pointer-mode, cursor, cursor-move
    field: str
    value: Any
    cause: str  # what the error must say

    def body(self) -> dict[str, Any]:
        base = {"hello": HELLO, "buffer": BUFFER, "flip": {"type": "flip", "id": 1, "frame": 5},
                "forget": {"type": "forget", "id": 1},
                "pointer-mode": {"type": "pointer-mode", "mode": "relative"},
                "cursor": CURSOR, "cursor-move": CURSOR_MOVE}[self.message]
        msg = dict(base)
        if self.value is MISSING:
            del msg[self.field]
        else:
            msg[self.field] = self.value
        return msg


def int_field(message: str, name: str, lo: int, hi: int, *, required: bool = True,
              semantic: st.SearchStrategy[tuple[Any, str]] | None = None) -> st.SearchStrategy[BadField]:
    """Bad values of an integer member: ill-typed, outside the wire range, missing, and (semantic)
    in range but refused for what they mean."""
    outside = st.one_of(st.integers(-2**70, lo - 1), st.integers(hi + 1, 2**70))
    cases = [JSON_NOT_INT.map(lambda v: BadField(message, name, v, f'"{name}" must be an integer')),
             outside.map(lambda v: BadField(message, name, v, f'"{name}" {v} is outside {lo}..{hi}'))]
    if required:
        cases.append(st.just(BadField(message, name, MISSING, f'{message}: "{name}" is missing')))
    if semantic is not None:
        cases.append(semantic.map(lambda vc: BadField(message, name, *vc)))
    return st.one_of(cases)


def _base64_cause(text: str) -> str | None:
    """What the server says of `text` as a cursor's "pixels" (CURSOR's size), None if it takes it."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except ValueError:  # binascii.Error and UnicodeEncodeError are both ValueErrors
        return 'cursor: "pixels" is not base64 ('
    if base64.b64encode(data).decode("ascii") != text:
        return 'cursor: "pixels" is not canonical base64'
    if len(data) != CURSOR_BYTES:
        return (f'cursor: "pixels" holds {len(data)} bytes, not the {CURSOR_BYTES} of '
                f"{CURSOR_W}x{CURSOR_H} ARGB8888")
    return None


# Spellings of CURSOR's pixels that break the base64 rules (and text near them): each must be named.
B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
BAD_PIXELS = st.one_of(
    st.tuples(st.integers(0, len(CURSOR["pixels"])), st.sampled_from(" \n\t-_.*=\u00e9\x00")).map(
        lambda ic: CURSOR["pixels"][:ic[0]] + ic[1] + CURSOR["pixels"][ic[0]:]),   # a stray character
    st.integers(1, 4).map(lambda n: CURSOR["pixels"][:-n]),                       # cut short
    st.sampled_from(["=", "==", "===", "A", "AA", "AAA="]).map(lambda t: CURSOR["pixels"] + t),
    st.binary(max_size=2 * CURSOR_BYTES).filter(lambda b: len(b) != CURSOR_BYTES).map(
        lambda b: base64.b64encode(b).decode()),                                  # well-formed, wrong size
    st.text(alphabet=B64_ALPHABET + "=", max_size=40),
).filter(lambda t: _base64_cause(t) is not None)


def _fourcc_cause(code: str) -> str:
    if len(code) != 4 or not code.isascii():
        return f'"fourcc" {code[:40]!r} is not four ASCII characters'
    return f"format {fourcc_name(fourcc(code))} is not one directflip can show"


SUPPORTED = {fourcc_name(f) for f in FORMATS}
BAD_FIELDS = st.one_of(
    int_field("hello", "version", 0, U32, semantic=st.just(0).map(   # 1, 2 and newer are all spoken
        lambda v: (v, f"protocol version {v} is not supported"))),
    JSON_NOT_STR.map(lambda v: BadField("hello", "name", v, '"name" must be a string')),
    st.text(max_size=80).filter(lambda s: not NAME.fullmatch(s)).map(
        lambda v: BadField("hello", "name", v, f"hello: name {v[:80]!r} is not 1..64 characters")),
    st.just(BadField("hello", "name", MISSING, 'hello: "name" is missing')),
    JSON_NOT_STR.filter(lambda v: v is not None).map(
        lambda v: BadField("hello", "uuid", v, '"uuid" must be a string or null')),
    int_field("buffer", "id", 1, U32),
    JSON_NOT_STR.map(lambda v: BadField("buffer", "fourcc", v, '"fourcc" must be a string')),
    st.text(max_size=6).filter(lambda s: s not in SUPPORTED).map(
        lambda v: BadField("buffer", "fourcc", v, _fourcc_cause(v))),
    *(int_field("buffer", dim, 0, U32, semantic=st.one_of(st.just(0), st.integers(MAX_DIMENSION + 1, U32))
                .map(lambda v, dim=dim: (v, f"{dim} {v} is outside 1..{MAX_DIMENSION}")))
      for dim in ("width", "height")),
    int_field("buffer", "stride", 0, U32, semantic=st.integers(0, W * 4 - 1).map(
        lambda v: (v, f"stride {v} is shorter than a row of {W} XR24 pixels"))),
    int_field("buffer", "offset", 0, U32, required=False, semantic=st.integers(1, U32).map(
        lambda v: (v, f"offset {v}) needs {v + SIZE} bytes but the dma-buf has {SIZE}"))),
    int_field("buffer", "modifier", 0, U64, required=False),
    *(int_field(kind, "id", 1, U32, semantic=st.integers(2, U32).map(
        lambda v, kind=kind: (v, f"{kind} of unknown buffer {v}"))) for kind in ("flip", "forget")),
    int_field("flip", "frame", 0, U64, required=False),
    *(JSON_NOT_STR.map(lambda v, m=m, f=f: BadField(m, f, v, f'{m}: "{f}" must be a string'))
      for m, f in (("hello", "pointer"), ("pointer-mode", "mode"))),
    *(st.text(max_size=12).filter(lambda s: s not in POINTER_MODES).map(
        lambda v, m=m, f=f: BadField(m, f, v, f'{m}: "{f}" {v[:40]!r} is not "absolute" or "relative"'))
      for m, f in (("hello", "pointer"), ("pointer-mode", "mode"))),
    st.just(BadField("pointer-mode", "mode", MISSING, 'pointer-mode: "mode" is missing')),
    *(int_field("cursor", dim, 1, 64) for dim in ("width", "height")),
    int_field("cursor", "hot_x", 0, 63, semantic=st.integers(CURSOR_W, 63).map(
        lambda v: (v, f"cursor: hot spot ({v}, 2) lies outside the {CURSOR_W}x{CURSOR_H} image"))),
    int_field("cursor", "hot_y", 0, 63, semantic=st.integers(CURSOR_H, 63).map(
        lambda v: (v, f"cursor: hot spot (3, {v}) lies outside the {CURSOR_W}x{CURSOR_H} image"))),
    JSON_NOT_STR.map(lambda v: BadField("cursor", "pixels", v, 'cursor: "pixels" must be a string')),
    st.just(BadField("cursor", "pixels", MISSING, 'cursor: "pixels" is missing')),
    BAD_PIXELS.map(lambda v: BadField("cursor", "pixels", v, _base64_cause(v))),
    *(int_field("cursor-move", axis, 0, MAX_DIMENSION - 1) for axis in ("x", "y")),
    JSON_NOT_BOOL.map(lambda v: BadField("cursor-move", "visible", v,
                                         'cursor-move: "visible" must be a boolean')),
    st.just(BadField("cursor-move", "visible", MISSING, 'cursor-move: "visible" is missing')),
)


@SOCKET_TESTS
@given(BAD_FIELDS)
def test_a_bad_field_closes_only_that_client_with_an_error_naming_it(arena, bad):
    def scenario(mine: list[int]) -> list[dict[str, Any]]:
        body = encode(bad.body())
        if bad.message == "hello":
            return hostile(arena, [(body, [])], hello=False)
        mine.append(memfd(SIZE))
        if bad.message == "buffer":
            return hostile(arena, [(body, [mine[0]])])
        return hostile(arena, [(encode(BUFFER), [mine[0]]), (body, [])])

    messages = survive(arena, scenario)
    assert_closed_with(messages, bad.cause)
    assert any(m["type"] == "welcome" for m in messages) == (bad.message != "hello")


UNKNOWN_TYPES = st.text(max_size=50).filter(lambda s: s not in TYPES)


@SOCKET_TESTS
@given(st.booleans(), st.one_of(
    st.tuples(UNKNOWN_TYPES, st.just("")),
    st.tuples(st.one_of(JSON_NOT_STR, st.just(MISSING)), st.just('message has no string "type"'))))
def test_a_message_of_no_known_type_is_named_in_the_error(arena, after_hello, case):
    kind, cause = case
    msg = {"id": 1} if kind is MISSING else {"type": kind, "id": 1}
    if not cause:
        cause = (f"unknown message type {kind[:40]!r}" if after_hello
                 else f'the first message must be "hello", not {kind[:40]!r}')
    messages = survive(arena, lambda mine: hostile(arena, [(_frame(json.dumps(msg).encode()), [])],
                                                   hello=after_hello))
    assert_closed_with(messages, cause)


# --- planes of every shape against buffers of every size

def plane_cause(info: PlaneInfo, size: int) -> str | None:
    """What the server must refuse a plane for (None: it must accept it), from docs/frame-socket.md."""
    fmt = FORMATS.get(info.fourcc)
    if fmt is None:
        return f"format {fourcc_name(info.fourcc)} is not one directflip can show"
    for name in ("width", "height"):
        value = getattr(info, name)
        if not 1 <= value <= MAX_DIMENSION:
            return f"{name} {value} is outside 1..{MAX_DIMENSION}"
    row = info.width * fmt.bpp // 8
    if info.offset < 0:
        return f"offset {info.offset} is negative"
    if info.modifier in (0, DRM_FORMAT_MOD_INVALID) and info.stride < row:
        return f"stride {info.stride} is shorter than a row"
    if info.stride <= 0:
        return f"stride {info.stride} is not positive"
    if info.stride > row + MAX_STRIDE_SLACK:
        return f"stride {info.stride} is longer than a row of {info.width}"
    needed = info.offset + info.stride * (info.height - 1) + row
    if needed > size:
        return f"needs {needed} bytes but the dma-buf has {size}"
    return None


MODIFIERS = st.one_of(st.sampled_from([0, DRM_FORMAT_MOD_INVALID, (1 << 56) | 1, (1 << 56) | 2]),
                      st.integers(0, U64))
CODES = st.one_of(st.sampled_from(sorted(FORMATS)),
                  st.sampled_from([fourcc(c) for c in ("NV12", "YUYV", "C8  ")]))  # not RGB: refused


def near(*points: int, spread: int = 3) -> st.SearchStrategy[int]:
    """Integers close to the boundaries that matter, and anywhere in between."""
    return st.one_of(*(st.integers(max(0, p - spread), p + spread) for p in points))


@st.composite
def planes_and_sizes(draw: st.DrawFn) -> tuple[PlaneInfo, int]:
    code = draw(CODES)
    bpp = FORMATS[code].bpp // 8 if code in FORMATS else 4
    width = draw(st.one_of(near(1, 7, 64, MAX_DIMENSION), st.integers(0, 20000)))
    height = draw(st.one_of(near(1, 2, 32, MAX_DIMENSION), st.integers(0, 20000)))
    row = width * bpp
    stride = draw(st.one_of(near(0, row, row + 60, row + MAX_STRIDE_SLACK), st.integers(0, 2**20),
                            st.integers(0, U32)))
    offset = draw(st.one_of(st.just(0), near(0, 4096), st.integers(0, 2**20), st.integers(0, U32)))
    info = PlaneInfo(code, width, height, stride, offset, draw(MODIFIERS))
    span = offset + stride * max(height - 1, 0) + row
    size = draw(st.one_of(near(span, span // 2), st.integers(0, 2**20)).filter(lambda s: 0 <= s <= 2**22))
    return info, size


@SOCKET_TESTS
@given(planes_and_sizes())
def test_any_plane_is_accepted_only_when_it_fits_its_buffer(arena, case):
    info, size = case
    cause = plane_cause(info, size)
    msg = {"type": "buffer", "id": 7, "fourcc": fourcc_name(info.fourcc), "width": info.width,
           "height": info.height, "stride": info.stride, "offset": info.offset, "modifier": info.modifier}
    sends: list[Send] = []

    def scenario(mine: list[int]) -> list[dict[str, Any]]:
        mine.append(memfd(size))
        sends.extend([(encode(msg), [mine[0]]), (encode({"type": "flip", "id": 7, "frame": 3}), []),
                      (encode({"type": "bye"}), [])])
        return hostile(arena, sends)

    messages = survive(arena, scenario)
    if cause is None:
        assert [m["type"] for m in messages] == ["welcome", "presented"], messages
        assert (messages[1]["id"], messages[1]["frame"]) == (7, 3)
    else:
        assert_closed_with(messages, "buffer 7: ", cause)


# --- descriptors of the wrong number or kind

def _pipe(mine: list[int]) -> int:
    r, w = os.pipe()
    mine += [r, w]
    return r


def _socket_end(mine: list[int]) -> int:
    a, b = socket.socketpair()
    mine += [a.detach(), b.detach()]
    return mine[-2]


def _directory(mine: list[int]) -> int:
    mine.append(os.open(HERE, os.O_RDONLY | os.O_DIRECTORY))
    return mine[-1]


def _path_only(mine: list[int]) -> int:
    mine.append(os.open(HERE / "test_bad_input.py", os.O_PATH))
    return mine[-1]


def _dev_null(mine: list[int]) -> int:
    mine.append(os.open("/dev/null", os.O_RDWR))
    return mine[-1]


def _small_memfd(mine: list[int]) -> int:
    mine.append(memfd(SIZE - 1))
    return mine[-1]


def _eventfd(mine: list[int]) -> int:
    mine.append(os.eventfd(0))
    return mine[-1]


NOT_A_BUFFER = {  # a descriptor maker → what the refusal says (compositor/fdguard.py tells the kind)
    "pipe": (_pipe, "a file descriptor sent is pipe:["),
    "socket": (_socket_end, "a file descriptor sent is socket:["),
    "eventfd": (_eventfd,
                "a file descriptor sent is anon_inode:[eventfd], not a dma-buf, memfd or VFIO device"),
    "O_PATH": (_path_only, f"a file descriptor sent is {HERE / 'test_bad_input.py'}, not"),
    "directory": (_directory, f"a file descriptor sent is {HERE}, not"),
    "/dev/null": (_dev_null, "a file descriptor sent is /dev/null, not"),
    "small memfd": (_small_memfd, f"needs {SIZE} bytes but the dma-buf has {SIZE - 1}"),
}


@SOCKET_TESTS
@given(st.sampled_from(sorted(NOT_A_BUFFER)), st.sampled_from(["buffer", "vfio-device"]))
def test_a_descriptor_that_is_not_a_buffer_is_refused_by_name(arena, kind, message):
    make, cause = NOT_A_BUFFER[kind]
    body = encode(BUFFER if message == "buffer" else {"type": "vfio-device"})
    messages = survive(arena, lambda mine: hostile(arena, [(body, [make(mine)])]))
    if message == "vfio-device" and kind == "small memfd":
        cause = "vfio-device: the file descriptor is a memfd, not a VFIO device"
    assert_closed_with(messages, cause)


@SOCKET_TESTS
@given(st.integers(0, 200), st.sampled_from(["eof", "flip", "buffer"]),
       st.sampled_from(["buffer", "flip", "hello"]))
def test_any_number_of_descriptors_on_any_message_is_an_error_and_none_leaks(arena, count, then, carrier):
    # `count` descriptors travel with a `carrier` message, then the client sends `then` (or hangs up).
    # Only a buffer message with exactly one is right, and it is followed by something correct.
    assume(count != (carrier == "buffer"))  # without descriptors, a hello or flip is no error
    if carrier == "hello":
        # before the welcome the server takes none: the kernel drops them and says so
        cause = "file descriptors came with hello or before it"
    elif count > 16:
        cause = "file descriptors were lost: more than 16 in one sendmsg"
    elif carrier == "buffer" and count == 0:
        # Buffer 1, or buffer 2 when the kernel hands over both in one read with buffer 2's descriptor
        # (it goes to the oldest buffer message of that read, as docs/frame-socket.md says).
        cause = ": no file descriptor came with the message"
    else:
        extra = count - (carrier == "buffer")
        cause = {"eof": f"{extra} file descriptor(s) sent that no buffer message claimed",
                 "flip": f"{extra} file descriptor(s) came with bytes before this message",
                 "buffer": f"{extra} file descriptor(s) came with bytes before this message"}[then]
    causes = [cause]
    if then == "buffer" and count + 1 > MAX_PENDING_FDS:
        # When one read takes in both sends, the following buffer's descriptor joins the stray ones
        # and their number is over the limit before either message is looked at.
        causes.append(f"{count + 1} file descriptors sent ahead of their buffer messages")
    body = {"buffer": BUFFER, "flip": {"type": "flip", "id": 1}, "hello": HELLO}[carrier]
    follow = {"eof": [], "flip": [{"type": "flip", "id": 1}], "buffer": [dict(BUFFER, id=2)]}[then]

    def scenario(mine: list[int]) -> list[dict[str, Any]]:
        shared = memfd(SIZE)
        mine.append(shared)
        sends: list[Send] = []
        if carrier == "flip":  # a flip needs an announced buffer
            sends.append((encode(BUFFER), [shared]))
        sends.append((encode(body), [shared] * count))
        for msg in follow:
            sends.append((encode(msg), [shared] if msg["type"] == "buffer" else []))
        return hostile(arena, sends, hello=carrier != "hello")

    reason = assert_closed_with(survive(arena, scenario))
    assert any(c in reason for c in causes), f"none of {causes} in the reason {reason!r}"


# --- framing

FRAMING = st.one_of(
    st.binary(min_size=1, max_size=3).map(lambda b: (b, "connection closed in the middle of a message")),
    st.one_of(st.just(0), st.integers(MAX_MESSAGE + 1, U32)).map(
        lambda n: (struct.pack("<I", n) + b"{}", f"message length {n} is outside 1..{MAX_MESSAGE}")),
    st.integers(2, MAX_MESSAGE).flatmap(lambda n: st.integers(0, n - 1).map(
        lambda k: (struct.pack("<I", n) + b"x" * k, "connection closed in the middle of a message"))),
    st.binary(min_size=1, max_size=40).filter(lambda b: _not_utf8(b)).map(
        lambda b: (_frame(b), "message is not UTF-8")),
    st.sampled_from([b"{", b"NaN", b'{"type": "flip", "id": NaN}', b'{"type": Infinity}', b"[1,2"]).map(
        lambda b: (_frame(b), "message is not valid JSON")),
    st.sampled_from([(b"[]", "an array"), (b'"hello"', "a string"), (b"17", "a number"), (b"null", "null"),
                     (b"true", "a boolean")]).map(
        lambda bc: (_frame(bc[0]), f"message is {bc[1]}, not a JSON object")),
    st.integers(25000, 32000).map(lambda d: (_frame(b"[" * d + b"]" * d), "nested too deeply")),
)


def _frame(body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + body


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@SOCKET_TESTS
@given(st.booleans(), FRAMING)
def test_broken_framing_is_named_in_the_error(arena, after_hello, case):
    data, cause = case
    messages = survive(arena, lambda mine: hostile(arena, [(data, [])], hello=after_hello))
    assert_closed_with(messages, cause)


@SOCKET_TESTS
@given(st.lists(st.tuples(
    st.fixed_dictionaries({"type": st.sampled_from(TYPES + ("released", "welcome"))}, optional={
        k: st.one_of(st.integers(-2**66, 2**66), JSON_NOT_INT)
        for k in ("id", "width", "height", "stride", "offset", "modifier", "frame", "version")} | {
        "fourcc": st.one_of(st.sampled_from(sorted(SUPPORTED)), st.text(max_size=5)),
        "name": st.one_of(st.just("g"), st.text(max_size=5))}),
    st.integers(0, 3), st.integers(0, 2 * SIZE)), max_size=6), st.booleans())
def test_random_messages_never_hurt_the_server(arena, script, hello):
    # Anything at all: the client ends with an error or a bye, and the server is unharmed.
    def scenario(mine: list[int]) -> list[dict[str, Any]]:
        sends: list[Send] = []
        for msg, nfds, size in script:
            fds = []
            for _ in range(nfds):
                mine.append(memfd(size))
                fds.append(mine[-1])
            sends.append((encode(msg), fds))
        return hostile(arena, sends, hello=hello)

    messages = survive(arena, scenario)
    if messages and messages[-1]["type"] == "error":
        assert messages[-1]["reason"]


# ================================================================== plane checks and the copy path

ANY_INT = st.one_of(st.integers(-2**66, 2**66), st.integers(-3, 20000))


@PURE_TESTS
@given(st.one_of(CODES, st.integers(0, U32)), ANY_INT, ANY_INT, ANY_INT, ANY_INT, MODIFIERS,
       st.integers(0, 2**64))
def test_validate_accepts_only_planes_inside_the_buffer(code, width, height, stride, offset, modifier, size):
    info = PlaneInfo(code, width, height, stride, offset, modifier)
    cause = plane_cause(info, size)
    try:
        info.validate(size)
    except BadPlane as exc:
        assert cause is not None, f"refused a plane that fits: {exc}"
        assert cause in str(exc), f"{exc} does not say {cause!r}"
        return
    assert cause is None, f"accepted a plane that must be refused: {cause}"
    bpp = info.bytes_per_pixel
    first, last = offset, offset + stride * (height - 1) + width * bpp  # [first, last) bytes read
    assert 0 <= first and last <= size and info.span == last


class DumbMemory:
    """What CopyBuffers needs of a dumb buffer: an anonymous mapping and its pitch."""

    def __init__(self, width: int, height: int, bpp: int, handle: int) -> None:
        self.handle, self.width, self.height = handle, width, height
        self.pitch = -(-width * bpp // 8 // 64) * 64
        self.size = self.pitch * height
        self._map = mmap.mmap(-1, self.size)

    def map(self) -> mmap.mmap:
        return self._map

    def destroy(self) -> None:
        self._map.close()


@dataclass
class CopyCard:
    """The two calls CopyBuffers makes of a card, without a device."""

    dumbs: list[DumbMemory] = field(default_factory=list)

    def create_dumb(self, width: int, height: int, bpp: int = 32) -> DumbMemory:
        self.dumbs.append(DumbMemory(width, height, bpp, len(self.dumbs) + 1))
        return self.dumbs[-1]

    def add_framebuffer(self, width, height, fmt, handles, pitches, offsets, modifier):
        return _Fb(handles[0])


@dataclass(eq=False)
class _Fb:
    handle: int

    def remove(self) -> None:
        pass


@st.composite
def copy_cases(draw: st.DrawFn) -> tuple[PlaneInfo, int, Rect, Rect, tuple[int, int]]:
    code = draw(st.sampled_from(sorted(FORMATS)))
    bpp = FORMATS[code].bpp // 8
    width, height = draw(st.integers(1, 96)), draw(st.integers(1, 64))
    stride = width * bpp + draw(st.one_of(st.just(0), st.integers(0, 70)))
    offset = draw(st.one_of(st.just(0), st.integers(0, 5000)))
    span = offset + stride * (height - 1) + width * bpp
    size = span + draw(st.one_of(st.just(0), st.integers(0, 5000)))
    info = PlaneInfo(code, width, height, stride, offset, draw(st.sampled_from([0, DRM_FORMAT_MOD_INVALID])))
    sw, sh = draw(st.integers(1, width)), draw(st.integers(1, height))
    src = Rect(draw(st.integers(0, width - sw)), draw(st.integers(0, height - sh)), sw, sh)
    mode = (draw(st.integers(sw, 128)), draw(st.integers(sh, 96)))
    dst = Rect(draw(st.integers(0, mode[0] - sw)), draw(st.integers(0, mode[1] - sh)), sw, sh)
    return info, size, src, dst, mode


@PURE_TESTS
@given(copy_cases(), st.randoms(use_true_random=False))
def test_the_copy_reads_only_inside_the_buffer(case, rnd):
    # The real copy rung over a memfd of exactly the buffer's size. Reading past the buffer cannot go
    # unnoticed: the source mapping is the plane's span, so a read past it raises, and pixels are
    # compared with what the guest's bytes say.
    info, size, src, dst, mode = case
    info.validate(size)
    pixels = rnd.randbytes(size)
    fd = memfd(size, pixels)
    buffer = Buffer("office", 1, info, fd)
    card = CopyCard()
    copy = scanout.CopyBuffers(card, info, mode, src, dst)
    try:
        copy.copy(buffer)
        bpp = info.bytes_per_pixel
        out = card.dumbs[0]
        got = bytes(out.map())
        want = bytearray(out.size)
        for y in range(src.h):
            start = info.offset + (src.y + y) * info.stride + src.x * bpp
            assert start + src.w * bpp <= size
            at = (dst.y + y) * out.pitch + dst.x * bpp
            want[at:at + src.w * bpp] = pixels[start:start + src.w * bpp]
        assert got == bytes(want)
    finally:
        copy.close()
        buffer.close()


@PURE_TESTS
@given(copy_cases(), st.integers(1, 200), st.integers(1, 200), st.integers(0, 300), st.integers(0, 300))
def test_a_source_rectangle_past_the_plane_is_never_read_past_the_buffer(case, w, h, x, y):
    # Even a plan that (wrongly) asks for more than the plane holds makes the copy raise what the
    # ladder catches (ValueError), never read past the mapping.
    info, size, _, _, _ = case
    src = Rect(x, y, w, h)
    mode = (w + 1, h + 1)
    fd = memfd(size, b"\x5a" * size)
    buffer = Buffer("office", 1, info, fd)
    copy = scanout.CopyBuffers(CopyCard(), info, mode, src, Rect(0, 0, w, h))
    try:
        copy.copy(buffer)
        bpp = info.bytes_per_pixel
        assert info.offset + (y + h - 1) * info.stride + (x + w) * bpp <= info.span
    except ValueError:
        pass
    finally:
        copy.close()
        buffer.close()


def copy_whole_plane(buffer: Buffer) -> None:
    info = buffer.info
    whole = Rect(0, 0, info.width, info.height)
    copy = scanout.CopyBuffers(CopyCard(), info, (info.width, info.height), whole, whole)
    try:
        copy.copy(buffer)
    finally:
        copy.close()


def shrink_then_copy() -> None:
    """Announced, copied once, then the guest shrinks its memfd and flips again (run in a child)."""
    info = PlaneInfo(fourcc("XR24"), 64, 64, 256)
    fd = memfd(info.span)
    buffer = Buffer("office", 1, info, fd)
    copy = scanout.CopyBuffers(CopyCard(), info, (64, 64), Rect(0, 0, 64, 64), Rect(0, 0, 64, 64))
    copy.copy(buffer)
    os.ftruncate(fd, 0)
    try:
        copy.copy(buffer)
    except (OSError, ValueError) as exc:  # what the ladder catches
        print("refused:", exc)
    print("survived")


def test_a_guest_shrinking_its_memfd_cannot_crash_the_copy():
    child = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                            "import test_bad_input; test_bad_input.shrink_then_copy()", str(HERE)],
                           capture_output=True, text=True, timeout=60, cwd=HERE.parents[1])
    assert child.returncode != -signal.SIGBUS, "the copy read past the end of the guest's memfd"
    assert child.returncode == 0 and "survived" in child.stdout, child.stderr


# ============================================================================================ VFIO

PAGE = mmap.PAGESIZE


@dataclass
class VfioAnswers:
    """What the fake kernel says: the plane, the dma-buf's real size, the region."""

    kind: int
    plane: tuple[int, ...]  # fourcc, modifier, width, height, stride, size, x, y, x_hot, y_hot, ident
    dmabuf_size: int
    region_size: int
    region_offset: int
    dmabuf_error: int = 0  # errno for GET_GFX_DMABUF, 0: answer


class FakeVfioKernel:
    """The ioctls VfioDevice makes, answered from VfioAnswers, with real memfds as dma-bufs."""

    def __init__(self, answers: VfioAnswers) -> None:
        self.a = answers
        self.exported: list[int] = []

    def ioctl(self, fd: int, request: int, arg: Any) -> int:
        a = self.a
        if request == vfio.VFIO_DEVICE_QUERY_GFX_PLANE:
            argsz, flags, plane_type = struct.unpack_from("<III", arg.raw, 0)
            if flags & vfio.VFIO_GFX_PLANE_TYPE_PROBE:
                return 0 if flags & a.kind else self._fail(errno.EINVAL)
            fcc, mod, w, h, stride, size, x, y, xh, yh, ident = a.plane
            ctypes.memmove(arg, vfio._PLANE.pack(argsz, flags, plane_type, fcc, mod, w, h, stride, size,
                                                 x, y, xh, yh, ident, 0), vfio.PLANE_INFO_SIZE)
            return 0
        if request == vfio.VFIO_DEVICE_GET_GFX_DMABUF:
            if a.dmabuf_error:
                return self._fail(a.dmabuf_error)
            out = memfd(a.dmabuf_size)
            self.exported.append(out)
            return out
        if request == vfio.VFIO_DEVICE_GET_REGION_INFO:
            argsz, _, index = struct.unpack_from("<III", arg.raw, 0)
            ctypes.memmove(arg, struct.pack("<IIIIQQ", 32, 3, index, 0, a.region_size, a.region_offset), 32)
            return 0
        return self._fail(errno.ENOTTY)

    @staticmethod
    def _fail(err: int) -> int:
        ctypes.set_errno(err)
        return -1


U32S = st.one_of(st.integers(0, 8), near(640, 4096, 16384, 2**31, U32), st.integers(0, U32)).filter(
    lambda v: 0 <= v <= U32)


@st.composite
def vfio_answers(draw: st.DrawFn) -> VfioAnswers:
    if draw(st.booleans()):  # a plausible plane, give or take a few bytes
        code = draw(st.sampled_from(sorted(FORMATS)))
        bpp = FORMATS[code].bpp // 8
        width, height = draw(st.integers(1, 300)), draw(st.integers(1, 300))
        stride = width * bpp + draw(st.sampled_from([0, 0, 1, 64, -1]))
    else:
        code = draw(st.one_of(CODES, st.just(0), st.integers(0, U32)))
        bpp = FORMATS[code].bpp // 8 if code in FORMATS else 4
        width, height = draw(U32S), draw(U32S)
        stride = draw(st.one_of(near(width * bpp).filter(lambda v: v <= U32), U32S))
    span = stride * max(height - 1, 0) + width * bpp
    real = draw(st.one_of(near(span, spread=2), st.integers(0, 2**20)).filter(lambda s: 0 <= s <= 2**22))
    return VfioAnswers(
        kind=draw(st.sampled_from([vfio.VFIO_GFX_PLANE_TYPE_DMABUF, vfio.VFIO_GFX_PLANE_TYPE_REGION])),
        plane=(code, draw(st.one_of(st.just(0), MODIFIERS)), width, height, stride,
               draw(st.one_of(st.just(real), U32S)), *(draw(U32S) for _ in range(4)), draw(U32S)),
        dmabuf_size=real, region_size=draw(st.one_of(st.just(real), st.integers(0, U64))),
        region_offset=draw(st.one_of(st.sampled_from([0, PAGE, 40 << 40]), st.integers(0, U64))),
        dmabuf_error=draw(st.sampled_from([0, 0, 0, errno.EINVAL, errno.ENOMEM])))


@pytest.fixture
def fake_vfio(monkeypatch):
    kernels: list[FakeVfioKernel] = []

    def install(answers: VfioAnswers) -> FakeVfioKernel:
        kernel = FakeVfioKernel(answers)
        monkeypatch.setattr(vfio, "_libc", kernel)
        kernels.append(kernel)
        return kernel
    return install


@settings(PURE_TESTS, max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(vfio_answers())
def test_any_vfio_plane_gives_a_frame_inside_its_buffer_or_a_clear_error(fake_vfio, answers):
    kernel = fake_vfio(answers)
    before = open_fds()
    region_end = answers.region_offset + answers.region_size
    device_fd = memfd(region_end if region_end <= 2**23 else 0)  # the device's memory, where it fits
    guest = vfio.VfioGuest("desk", vfio.VfioDevice(device_fd, "fake-mdev"))
    plane = vfio.GfxPlane(answers.kind, 1, answers.plane[0], *answers.plane[1:])
    try:
        frame = guest.poll()  # the daemon catches exactly these: anything else would kill its poll task
    except (vfio.VfioError, BadPlane, OSError) as exc:
        assert str(exc)
        if isinstance(exc, BadPlane):
            cause = plane_cause(plane.plane_info(), answers.dmabuf_size if plane.kind ==
                                vfio.VFIO_GFX_PLANE_TYPE_DMABUF else answers.region_size)
            assert cause is not None and cause in str(exc), (cause, str(exc))
        frame = None
    else:
        if frame is None:
            assert not plane.enabled
        else:
            info = frame.buffer.info
            if answers.kind == vfio.VFIO_GFX_PLANE_TYPE_DMABUF:
                assert info.span <= answers.dmabuf_size, "a plane larger than its dma-buf was accepted"
            else:
                assert info.span <= answers.region_size, "a plane larger than its region was accepted"
                assert frame.buffer.mmap_offset == answers.region_offset
                at = frame.buffer.mmap_offset
                assert at % PAGE == 0 and at + info.span < 2**63, "a region no mapping can reach was accepted"
            assert plane_cause(info, info.span) is None
            if info.modifier in (0, DRM_FORMAT_MOD_INVALID) and (
                    answers.kind == vfio.VFIO_GFX_PLANE_TYPE_DMABUF or region_end <= 2**23):
                copy_whole_plane(frame.buffer)  # the real copy rung reads it without a fault
    finally:
        guest.close()
        for b in list(guest.buffers.values()) + guest.evicted():
            b.close()
    assert open_fds() == before, "descriptors leaked"
    assert len(kernel.exported) <= 1


# ========================================================================================== policy

def _shipped() -> list[tuple[str, str]]:
    return [(p.name, p.read_text()) for p in POLICIES]


DIAGNOSTIC = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): ")
LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")  # what YAML counts lines by


def check_policy(text: str, source: str = "mutated.yaml") -> policy.Policy | None:
    """policy.parse gives a Policy or a PolicyError whose every line is file:line:column: ..."""
    try:
        return policy.parse(text, source)
    except policy.PolicyError as exc:
        assert exc.errors, "a PolicyError without errors"
        last_line = len(LINE_BREAK.findall(text)) + 2
        for line in str(exc).splitlines():
            m = DIAGNOSTIC.match(line)
            assert m, f"not file:line:column: {line!r}"
            assert m["file"] == source and 1 <= int(m["line"]) <= last_line, line
        return None


def test_the_shipped_policies_are_valid():
    assert len(POLICIES) >= 6
    for name, text in _shipped():
        assert check_policy(text, name) is not None, name


def test_a_policy_truncated_at_any_byte_is_valid_or_says_where():
    for name, text in _shipped():
        data = text.encode()
        for end in range(len(data)):
            check_policy(data[:end].decode("utf-8", "ignore"), name)


YAML_SCALARS = st.one_of(
    st.sampled_from(["", "~", "null", "yes", "no", "0x1F", "0o17", "1_000", "-1", "1e400", ".nan", ".inf",
                     "[]", "{}", "[a, b]", "{a: 1}", "*nothing", "&a x", "!!int x", "!!binary AAAA",
                     "!custom x",
                     '"\\0"', '"\\x00"', "²", "١٢", "9" * 5000, "9" * 5000 + "x1", "1920x1080@" + "9" * 5000,
                     "<<: *a", "'unterminated", "\"unterminated", "|", ">-", "@", "`", "%", "\t", "- -",
                     "[" * 300 + "]" * 300, "root", "nobody", "qmp:", "dbus:", "match-guest", "1920x1080"]),
    st.integers(-2**70, 2**70).map(str), st.floats().map(str), st.text(max_size=30))


@st.composite
def mutated_policies(draw: st.DrawFn) -> str:
    _, text = draw(st.sampled_from(_shipped()))
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "scalar", "key", "indent", "insert", "swap"]))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "scalar" and ":" in lines[i]:
            key = lines[i].split(":", 1)[0]
            lines[i] = f"{key}: {draw(YAML_SCALARS)}"
        elif op == "key":
            lines[i] = re.sub(r"^(\s*-?\s*)[\w.-]+:", lambda m: m[1] + draw(YAML_SCALARS) + ":", lines[i])
        elif op == "indent":
            lines[i] = " " * draw(st.integers(0, 8)) + lines[i].lstrip()
        elif op == "insert":
            lines.insert(i, draw(YAML_SCALARS))
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
    out = "\n".join(lines)
    return out[:draw(st.integers(0, len(out)))] if draw(st.booleans()) else out


@PURE_TESTS
@given(mutated_policies())
def test_a_mutated_policy_is_valid_or_says_where(text):
    check_policy(text)


@PURE_TESTS
@given(st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
                    lambda inner: st.one_of(st.lists(inner, max_size=4),
                                            st.dictionaries(st.sampled_from(
                                                ["version", "monitors", "guests", "seats", "placements",
                                                 "defaults", "connector", "edid", "mode", "kind", "users",
                                                 "uuid", "monitor", "guest", "failover", "mirror",
                                                 "priority", "display", "console", "launch", "name",
                                                 "slate", "scaling", "left", "office"]) | st.text(max_size=5),
                                                inner, max_size=5)), max_leaves=30))
def test_any_yaml_document_is_a_policy_or_a_policy_error(doc):
    import yaml

    check_policy(yaml.safe_dump(doc))


@pytest.mark.parametrize("text, cause", ids=["nul-user", "superscript-uid", "huge-uid", "superscript-console",
                                              "huge-console", "huge-mode", "deep-nesting"], argvalues=[
    ('monitors: {a: X}\nguests:\n  g: {users: "\\0"}\n', "no user"),
    ('monitors: {a: X}\nguests:\n  g: {users: "²"}\n', "no user"),
    ("monitors: {a: X}\nguests:\n  g: {users: " + "9" * 5000 + "}\n", "uid"),
    ("monitors: {a: X}\nguests:\n  g: {kind: qemu-dbus, display: 'qmp:/x', console: \"²\"}\n",
     "`console` must be"),
    ("monitors: {a: X}\nguests:\n  g: {kind: qemu-dbus, display: 'qmp:/x', console: " + "9" * 5000 + "}\n",
     "`console` must be"),
    ("monitors: {a: {connector: X, mode: " + "1" * 5000 + "x1}}\n", "bad mode"),
    ("monitors: {a: X}\nseats: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
])
def test_policy_inputs_that_once_escaped_as_other_exceptions(text, cause):
    with pytest.raises(policy.PolicyError, match=re.escape(cause)):
        policy.parse("version: 1\n" + text, "p.yaml")


# ================================================================================ control socket

class StubDaemon:
    """The two calls the control socket makes of the daemon. capture refuses what the real one does
    before it touches a card (a monitor that is not lit) and writes the file where it is told."""

    def status(self) -> dict[str, Any]:
        return {"schema": "directflip.status/1", "outputs": []}

    async def capture(self, monitor: str, path: str) -> dict[str, Any]:
        assert isinstance(path, str) and os.path.isabs(path), f"capture was handed the path {path!r}"
        if monitor != "left":
            raise ValueError(f"monitor {monitor!r} is not lit (lit: left)")
        with open(path, "wb") as f:
            f.write(b"\x89PNG")
        return {"path": path, "width": 1, "height": 1, "monitor": monitor}


class ControlArena(Watched):
    """A ControlServer on a loop the test drives, with a bystander client connected throughout."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.server = control.ControlServer(path, StubDaemon())
        self.run(self.server.start())
        self.bystander = self.run(asyncio.open_unix_connection(path))

    def run(self, coro):
        return self.loop.run_until_complete(asyncio.wait_for(coro, 10))

    async def ask(self, conn, line: bytes) -> dict[str, Any] | None:
        reader, writer = conn
        writer.write(line)
        await writer.drain()
        answer = await reader.readline()
        return json.loads(answer) if answer else None

    def close(self) -> None:
        self.bystander[1].close()
        self.run(self.server.close())
        super().close()


@pytest.fixture(scope="module")
def control_arena(tmp_path_factory):
    with closing(ControlArena(str(tmp_path_factory.mktemp("control") / "control.sock"))) as arena:
        yield arena


CAPTURE = {"cmd": "capture", "monitor": "left", "path": "/tmp/directflip-reliability-capture.png"}


def _json_line(value: Any) -> bytes:
    return json.dumps(value).encode() + b"\n"


JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                                     st.floats(allow_nan=False), st.text(max_size=8)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                           max_leaves=8)
BAD_REQUESTS = st.one_of(
    st.binary(max_size=60).filter(lambda b: b"\n" not in b).map(lambda b: (b + b"\n", "bad request")),
    JSON_VALUES.filter(lambda v: not isinstance(v, dict)).map(
        lambda v: (_json_line(v), "bad request: a request is a JSON object")),
    st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3).filter(
        lambda d: d.get("cmd") not in ("status", "capture")).map(
        lambda d: (_json_line(d), "unknown command")),
    st.sampled_from(["monitor", "path"]).map(
        lambda k: (_json_line({key: v for key, v in CAPTURE.items() if key != k}),
                   f'capture: "{k}" is missing')),
    st.tuples(st.sampled_from(["monitor", "path"]), JSON_VALUES.filter(lambda v: not isinstance(v, str))).map(
        lambda kv: (_json_line(CAPTURE | {kv[0]: kv[1]}), f'capture: "{kv[0]}" must be a string')),
    st.text(max_size=10).filter(lambda m: m != "left").map(
        lambda m: (_json_line(CAPTURE | {"monitor": m}), f"monitor {m!r} is not lit")),
    st.sampled_from(["/nonexistent/dir/x.png", "relative.png", "", "/"]).map(
        lambda p: (_json_line(CAPTURE | {"path": p}), "capture: \"path\"")),
    st.integers(100, 20000).map(lambda d: (b"[" * d + b"]" * d + b"\n", "bad request")),
).filter(lambda case: not _is_valid_request(case[0]))


def _is_valid_request(line: bytes) -> bool:
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return isinstance(request, dict) and request.get("cmd") == "status"


@settings(SOCKET_TESTS, max_examples=120)
@given(BAD_REQUESTS)
def test_a_bad_request_gets_an_error_naming_it_and_the_connection_stays_usable(control_arena, case):
    line, cause = case
    arena = control_arena
    arena.errors.records.clear()

    async def session() -> None:
        conn = await asyncio.open_unix_connection(arena.path)
        try:
            answer = await arena.ask(conn, line)
            assert answer is not None and answer["ok"] is False, answer
            assert cause in answer["error"], f"{cause!r} not in {answer['error']!r}"
            again = await arena.ask(conn, b'{"cmd": "status"}\n')
            assert again["ok"] is True and again["schema"] == "directflip.status/1"
            other = await arena.ask(arena.bystander, b'{"cmd": "status"}\n')
            assert other["ok"] is True
        finally:
            conn[1].close()

    arena.run(session())
    assert not arena.crashes and not arena.errors.records, (arena.crashes, arena.errors.records)


@settings(SOCKET_TESTS, max_examples=10)
@given(st.integers(control.MAX_REQUEST + 1, 4 * control.MAX_REQUEST), st.booleans())
def test_an_overlong_request_is_answered_then_the_connection_closed(control_arena, length, newline):
    arena = control_arena

    async def session() -> None:
        reader, writer = await asyncio.open_unix_connection(arena.path, limit=1 << 20)
        try:
            writer.write(b'{"cmd": "' + b"s" * length + b'"}' + (b"\n" if newline else b""))
            try:
                await writer.drain()
            except ConnectionError:
                pass  # the server closed before taking it all: its answer is still there to read
            answer = json.loads(await reader.readline())
            assert answer["ok"] is False and f"longer than {control.MAX_REQUEST} bytes" in answer["error"]
            try:
                rest = await reader.read()
            except ConnectionResetError:  # closed with our bytes unread: an end of stream too
                rest = b""
            assert rest == b"", "the connection stays open after an over-long request"
            other = await arena.ask(arena.bystander, b'{"cmd": "status"}\n')
            assert other["ok"] is True
        finally:
            writer.close()

    arena.run(session())
    assert not arena.crashes and not arena.errors.records


def test_a_valid_capture_request_goes_through(control_arena, tmp_path):
    # The good path the bad ones are measured against.
    target = tmp_path / "left.png"
    answer = control_arena.run(control_arena.ask(control_arena.bystander, _json_line(
        {"cmd": "capture", "monitor": "left", "path": str(target)})))
    assert answer["ok"] is True and target.read_bytes() == b"\x89PNG"
