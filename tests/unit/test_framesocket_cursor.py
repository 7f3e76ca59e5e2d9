"""The guest's pointer image over the frame socket (docs/frame-socket.md, "Cursor"): cursor and
cursor-move from a real FrameSocketClient (or a raw socket, for what a client would never send) to a
real FrameSocketServer over a real Unix socket; GuestConnection.cursor / .pointer and the handler's
optional on_cursor; every malformed case as a protocol error naming its cause; and the synthetic
guest's --cursor and --cursor-at, through a reconnect."""

from __future__ import annotations

import argparse
import base64
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from framesocket_env import Env, raw_session, serve

from compositor.sources.frame import ARGB8888, Cursor
from compositor.sources.frame import Pointer as GuestPointer
from compositor.sources.framesocket import (
    MAX_CURSOR_SIZE,
    GuestConnection,
    GuestHandler,
    Refused,
    encode,
)
from directflip_tools import cli as tools_cli
from directflip_tools import synthetic as syn


@dataclass
class Recorder(GuestHandler):
    """A GuestHandler that writes down every on_cursor (what the connection held at that moment) and
    every close. `cursor_raises` makes on_cursor raise it; `on_flip_do` runs on every flip."""

    hellos: list[GuestConnection] = field(default_factory=list)
    seen: list[tuple[GuestConnection, Cursor | None, GuestPointer | None]] = field(default_factory=list)
    closed: list[tuple[str, str]] = field(default_factory=list)
    cursor_raises: Exception | None = None
    on_flip_do: Callable[[GuestConnection, Any], None] | None = None

    def on_hello(self, conn: GuestConnection) -> None:
        self.hellos.append(conn)

    def on_buffer(self, conn, buffer) -> None:
        pass

    def on_flip(self, conn, frame) -> None:
        if self.on_flip_do is not None:
            self.on_flip_do(conn, frame)

    def on_forget(self, conn, buffer) -> None:
        buffer.close()

    def on_cursor(self, conn: GuestConnection) -> None:
        self.seen.append((conn, conn.cursor, conn.pointer))
        if self.cursor_raises is not None:
            raise self.cursor_raises

    def on_close(self, conn: GuestConnection, reason: str) -> None:
        self.closed.append((conn.name, reason))
        for buffer in conn.buffers.values():
            buffer.close()


class WithoutCursor(GuestHandler):
    """A handler from before on_cursor existed: GuestHandler's default on_cursor stands in for it."""

    def __init__(self) -> None:
        self.closed: list[str] = []

    def on_hello(self, conn) -> None:
        pass

    def on_close(self, conn, reason: str) -> None:
        self.closed.append(reason)


@pytest.fixture
def env(tmp_path):
    yield from serve(tmp_path, Recorder())


HELLO = {"type": "hello", "version": 1, "name": "office"}
WELCOME = {"type": "welcome", "version": 1}


def argb(width: int, height: int, seed: int = 0) -> bytes:
    """width x height ARGB8888 pixels that differ from pixel to pixel (a swapped row or channel shows)."""
    return bytes((i * 7 + seed) % 256 for i in range(width * height * 4))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def memfd(size: int) -> int:
    fd = os.memfd_create("fake-dmabuf", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


# ------------------------------------------------------------------------------------ round trips

def test_a_cursor_reaches_the_connection_with_its_pixels_and_each_image_a_new_serial(env):
    client = env.client()
    conn = env.conn()
    assert (conn.cursor, conn.pointer) == (None, None)
    first, second = argb(32, 32), argb(MAX_CURSOR_SIZE, 17, seed=3)
    client.set_cursor(32, 32, 5, 6, first)
    env.until(lambda: conn.cursor is not None)
    assert conn.cursor == Cursor(32, 32, 5, 6, first, serial=1)
    assert conn.cursor.fourcc == ARGB8888
    client.set_cursor(MAX_CURSOR_SIZE, 17, MAX_CURSOR_SIZE - 1, 16, second)   # widest, hot spot in a corner
    client.set_cursor(32, 32, 5, 6, first)                                   # the same image again
    env.until(lambda: len(env.handler.seen) == 3)
    assert [(c.width, c.height, c.hot_x, c.hot_y, c.pixels, c.serial) for _, c, _ in env.handler.seen] == [
        (32, 32, 5, 6, first, 1), (MAX_CURSOR_SIZE, 17, MAX_CURSOR_SIZE - 1, 16, second, 2),
        (32, 32, 5, 6, first, 3)]
    assert all(p is None for _, _, p in env.handler.seen)   # no cursor-move yet
    assert not conn.closed


def test_cursor_move_reaches_the_connection_without_any_image(env):
    client = env.client()
    conn = env.conn()
    client.move_cursor(640, 360)
    env.until(lambda: conn.pointer is not None)
    assert (conn.pointer, conn.cursor) == (GuestPointer(640, 360, True), None)
    client.move_cursor(0, 16383, visible=False)
    env.until(lambda: len(env.handler.seen) == 2)
    assert conn.pointer == GuestPointer(0, 16383, False)
    assert [(c, p) for _, c, p in env.handler.seen] == [(None, GuestPointer(640, 360, True)),
                                                        (None, GuestPointer(0, 16383, False))]


def test_the_image_and_the_position_are_kept_apart(env):
    client = env.client()
    conn = env.conn()
    pixels = argb(8, 8)
    client.move_cursor(10, 20)
    client.set_cursor(8, 8, 0, 0, pixels)
    client.move_cursor(11, 21, visible=False)
    env.until(lambda: len(env.handler.seen) == 3)
    # each message changes only its own half; on_cursor sees both
    assert [(c and c.serial, p) for _, c, p in env.handler.seen] == [
        (None, GuestPointer(10, 20, True)), (1, GuestPointer(10, 20, True)), (1, GuestPointer(11, 21, False))]
    assert conn.cursor.pixels == pixels


def test_only_the_latest_counts_and_nothing_is_answered(env):
    # A burst of moves in one write: each replaces the last, on_cursor once per message, no reply.
    moves = [{"type": "cursor-move", "x": i, "y": 2 * i, "visible": i % 2 == 0} for i in range(500)]
    replies = raw_session(env, HELLO, *moves, {"type": "bye"})
    assert replies == [WELCOME]
    assert len(env.handler.seen) == 500
    conn = env.handler.seen[-1][0]
    assert conn.pointer == GuestPointer(499, 998, False)
    assert env.handler.closed == [("office", "bye")]


def test_cursor_messages_go_before_and_after_buffers_and_flips(env):
    client = env.client()
    conn = env.conn()
    flips: list[int] = []
    env.handler.on_flip_do = lambda c, frame: flips.append(frame.buffer.id)
    client.set_cursor(4, 4, 1, 1, argb(4, 4))                # before any buffer
    client.move_cursor(1, 1)
    fd = memfd(64 * 64 * 4)
    try:
        client.announce(1, fd, "XR24", 64, 64, 256)
    finally:
        os.close(fd)
    client.move_cursor(2, 2)                                 # between a buffer and its flip
    client.flip(1, 0)
    client.set_cursor(4, 4, 3, 3, argb(4, 4, seed=1))       # after
    env.until(lambda: len(env.handler.seen) == 4 and flips == [1])
    assert (conn.cursor.serial, conn.cursor.hot_x, conn.pointer) == (2, 3, GuestPointer(2, 2, True))
    assert list(conn.buffers) == [1] and not conn.closed


def test_serials_are_per_connection(env):
    one, two = env.client("one"), env.client("two")
    one.set_cursor(2, 2, 0, 0, argb(2, 2))
    one.set_cursor(2, 2, 0, 0, argb(2, 2))
    two.set_cursor(2, 2, 0, 0, argb(2, 2))
    env.until(lambda: len(env.handler.seen) == 3)
    assert (env.conn("one").cursor.serial, env.conn("two").cursor.serial) == (2, 1)


# -------------------------------------------------------------------------------- the handler

def test_a_handler_without_on_cursor_gets_the_default(tmp_path):
    for env in serve(tmp_path, WithoutCursor()):
        replies = raw_session(env, HELLO, {"type": "cursor", "width": 1, "height": 1, "hot_x": 0,
                                           "hot_y": 0, "pixels": b64(bytes(4))},
                              {"type": "cursor-move", "x": 1, "y": 1, "visible": True}, {"type": "bye"})
        assert replies == [WELCOME]
        assert env.handler.closed == ["bye"]


def test_on_cursor_raising_closes_only_that_client(env, caplog):
    bystander = env.client("media")
    env.handler.cursor_raises = Refused("no cursor plane for you")
    replies = raw_session(env, HELLO, {"type": "cursor-move", "x": 1, "y": 1, "visible": True})
    assert replies == [WELCOME, {"type": "error", "reason": "no cursor plane for you"}]
    env.handler.cursor_raises = RuntimeError("daemon bug")
    replies = raw_session(env, HELLO, {"type": "cursor-move", "x": 1, "y": 1, "visible": True})
    assert replies == [WELCOME, {"type": "error", "reason": "internal error in the compositor"}]
    assert "on_cursor failed" in caplog.text
    env.handler.cursor_raises = None
    conn = env.conn("media")
    bystander.move_cursor(3, 4)
    env.until(lambda: conn.pointer == GuestPointer(3, 4, True))
    assert not conn.closed


# ----------------------------------------------------------------------------- malformed input

PIXELS_2X2 = b64(argb(2, 2))  # 16 bytes: 24 characters ending "=="
GOOD_CURSOR = {"type": "cursor", "width": 2, "height": 2, "hot_x": 1, "hot_y": 0, "pixels": PIXELS_2X2}
GOOD_MOVE = {"type": "cursor-move", "x": 10, "y": 20, "visible": True}
# 12 bytes: base64 without padding, where Python's strict decoder still takes padding after the end
CURSOR_3X1 = {"type": "cursor", "width": 3, "height": 1, "hot_x": 0, "hot_y": 0, "pixels": b64(argb(3, 1))}
MISSING = object()


def _stray_bits(text: str) -> str:
    """`text` with the last data character before its padding changed in bits the decoder drops."""
    i = text.index("=") - 1
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    return text[:i] + alphabet[alphabet.index(text[i]) ^ 1] + text[i + 1:]


@pytest.mark.parametrize(("base", "key", "value", "cause"), [
    # sizes
    (GOOD_CURSOR, "width", 0, 'cursor: "width" 0 is outside 1..64'),
    (GOOD_CURSOR, "width", 65, 'cursor: "width" 65 is outside 1..64'),
    (GOOD_CURSOR, "height", 1000, 'cursor: "height" 1000 is outside 1..64'),
    (GOOD_CURSOR, "height", "2", 'cursor: "height" must be an integer, not a string'),
    (GOOD_CURSOR, "width", True, 'cursor: "width" must be an integer, not a boolean'),
    (GOOD_CURSOR, "width", 2.0, 'cursor: "width" must be an integer, not a number'),
    (GOOD_CURSOR, "width", MISSING, 'cursor: "width" is missing'),
    # the hot spot
    (GOOD_CURSOR, "hot_x", 2, "cursor: hot spot (2, 0) lies outside the 2x2 image"),
    (GOOD_CURSOR, "hot_y", 5, "cursor: hot spot (1, 5) lies outside the 2x2 image"),
    (GOOD_CURSOR, "hot_y", -1, 'cursor: "hot_y" -1 is outside 0..63'),
    (GOOD_CURSOR, "hot_x", 64, 'cursor: "hot_x" 64 is outside 0..63'),
    (GOOD_CURSOR, "hot_x", None, 'cursor: "hot_x" must be an integer, not null'),
    (GOOD_CURSOR, "hot_y", MISSING, 'cursor: "hot_y" is missing'),
    # the pixels
    (GOOD_CURSOR, "pixels", MISSING, 'cursor: "pixels" is missing'),
    (GOOD_CURSOR, "pixels", 5, 'cursor: "pixels" must be a string, not a number'),
    (GOOD_CURSOR, "pixels", [1, 2], 'cursor: "pixels" must be a string, not an array'),
    (GOOD_CURSOR, "pixels", PIXELS_2X2.rstrip("="), 'cursor: "pixels" is not base64 (Incorrect padding)'),
    (GOOD_CURSOR, "pixels", "*" + PIXELS_2X2[1:], 'cursor: "pixels" is not base64 (Only base64 data'),
    (GOOD_CURSOR, "pixels", PIXELS_2X2[:8] + "\n" + PIXELS_2X2[8:], 'cursor: "pixels" is not base64 ('),
    (GOOD_CURSOR, "pixels", PIXELS_2X2[:8] + " " + PIXELS_2X2[8:], 'cursor: "pixels" is not base64 ('),
    (GOOD_CURSOR, "pixels", PIXELS_2X2.replace("+", "-").replace("/", "_") + "-_==",
     'cursor: "pixels" is not base64 ('),                                    # the URL-safe alphabet
    (GOOD_CURSOR, "pixels", "é" + PIXELS_2X2[1:],
     'cursor: "pixels" is not base64 (a non-ASCII character at 0)'),
    (GOOD_CURSOR, "pixels", PIXELS_2X2 + "==", 'cursor: "pixels" is not base64 (Excess data after padding)'),
    (CURSOR_3X1, "pixels", b64(argb(3, 1)) + "==", 'cursor: "pixels" is not canonical base64'),
    (CURSOR_3X1, "pixels", b64(argb(3, 1)) + "====", 'cursor: "pixels" is not canonical base64'),
    (GOOD_CURSOR, "pixels", _stray_bits(PIXELS_2X2), 'cursor: "pixels" is not canonical base64'),
    (GOOD_CURSOR, "pixels", b64(argb(2, 2)[:13]),
     'cursor: "pixels" holds 13 bytes, not the 16 of 2x2 ARGB8888'),
    (GOOD_CURSOR, "pixels", b64(argb(2, 2) + b"\0"),
     'cursor: "pixels" holds 17 bytes, not the 16 of 2x2 ARGB8888'),
    (GOOD_CURSOR, "pixels", "", 'cursor: "pixels" holds 0 bytes, not the 16 of 2x2 ARGB8888'),
    (GOOD_CURSOR, "pixels", b64(argb(4, 4)), 'cursor: "pixels" holds 64 bytes, not the 16 of 2x2 ARGB8888'),
    # cursor-move
    (GOOD_MOVE, "x", -1, 'cursor-move: "x" -1 is outside 0..16383'),
    (GOOD_MOVE, "y", 16384, 'cursor-move: "y" 16384 is outside 0..16383'),
    (GOOD_MOVE, "x", "1", 'cursor-move: "x" must be an integer, not a string'),
    (GOOD_MOVE, "y", MISSING, 'cursor-move: "y" is missing'),
    (GOOD_MOVE, "visible", 1, 'cursor-move: "visible" must be a boolean, not a number'),
    (GOOD_MOVE, "visible", "true", 'cursor-move: "visible" must be a boolean, not a string'),
    (GOOD_MOVE, "visible", None, 'cursor-move: "visible" must be a boolean, not null'),
    (GOOD_MOVE, "visible", MISSING, 'cursor-move: "visible" is missing'),
])
def test_a_malformed_cursor_message_is_a_protocol_error_naming_the_cause(env, base, key, value, cause):
    msg = dict(base)
    if value is MISSING:
        del msg[key]
    else:
        msg[key] = value
    replies = raw_session(env, HELLO, msg)
    assert [m["type"] for m in replies] == ["welcome", "error"]
    assert replies[-1]["reason"].startswith(cause), replies[-1]["reason"]
    assert env.handler.closed == [("office", replies[-1]["reason"])]
    assert env.handler.seen == []                             # nothing half-kept reached the handler


def test_the_good_messages_of_the_table_above_are_good(env):
    replies = raw_session(env, HELLO, GOOD_CURSOR, GOOD_MOVE, {"type": "bye"})
    assert replies == [WELCOME]
    conn = env.handler.seen[-1][0]
    assert (conn.cursor, conn.pointer) == (Cursor(2, 2, 1, 0, argb(2, 2), 1), GuestPointer(10, 20, True))


def test_a_bad_message_after_a_good_one_leaves_the_good_one_and_closes(env):
    replies = raw_session(env, HELLO, GOOD_CURSOR, {**GOOD_CURSOR, "hot_x": 9})
    assert replies[-1] == {"type": "error", "reason": "cursor: hot spot (9, 0) lies outside the 2x2 image"}
    ((conn, cursor, _),) = env.handler.seen
    assert conn.closed and conn.cursor is cursor and cursor.serial == 1


@pytest.mark.parametrize("msg", [GOOD_CURSOR, GOOD_MOVE])
def test_cursor_messages_before_hello_are_a_protocol_error(env, msg):
    replies = raw_session(env, msg)
    assert replies == [{"type": "error",
                        "reason": f'the first message must be "hello", not {msg["type"]!r}'}]


def test_the_client_refuses_what_the_protocol_would_before_sending_it(env):
    client = env.client()
    conn = env.conn()
    for bad, match in [
        (lambda: client.set_cursor(0, 2, 0, 0, b""), "cursor width 0 is not an integer in 1..64"),
        (lambda: client.set_cursor(2, 65, 0, 0, bytes(2 * 65 * 4)), "cursor height 65"),
        (lambda: client.set_cursor(2.0, 2, 0, 0, bytes(16)), "cursor width 2.0"),
        (lambda: client.set_cursor(2, 2, 2, 0, bytes(16)), r"hot spot \(2, 0\) lies outside the 2x2 image"),
        (lambda: client.set_cursor(2, 2, 0, -1, bytes(16)), r"hot spot \(0, -1\)"),
        (lambda: client.set_cursor(2, 2, 0, 0, bytes(15)), "cursor pixels are 15 bytes, not the 16"),
        (lambda: client.move_cursor(-1, 0), "cursor x -1 is not an integer in 0..16383"),
        (lambda: client.move_cursor(0, 16384), "cursor y 16384"),
        (lambda: client.move_cursor(0.5, 0), "cursor x 0.5"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()
    client.move_cursor(1, 1)                                  # the connection is still good
    env.until(lambda: conn.pointer is not None)
    assert len(env.handler.seen) == 1 and not conn.closed


def test_the_largest_cursor_fits_one_message():
    msg = {"type": "cursor", "width": MAX_CURSOR_SIZE, "height": MAX_CURSOR_SIZE, "hot_x": 63, "hot_y": 63,
           "pixels": b64(bytes([255]) * MAX_CURSOR_SIZE * MAX_CURSOR_SIZE * 4)}
    assert len(encode(msg)) < 65536 // 2


# ------------------------------------------------------------------------- the synthetic guest

def test_the_synthetic_cursor_is_a_bordered_magenta_square():
    pixels = syn.cursor_pixels()
    image = np.frombuffer(pixels, np.uint8).reshape(syn.CURSOR_SIZE, syn.CURSOR_SIZE, 4)   # B, G, R, A
    assert syn.CURSOR_SIZE == 32 and syn.CURSOR_COLOUR == (255, 0, 255) and syn.CURSOR_BORDER == 2
    assert (image[..., 3] == 255).all()                                        # opaque everywhere
    rgb = image[..., 2::-1]
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert (rgb[border] == syn.CURSOR_BORDER_COLOUR).all() and (syn.CURSOR_BORDER_COLOUR == (0, 0, 0))
    assert (rgb[~border] == syn.CURSOR_COLOUR).all()
    assert tuple(image[0, 0]) == (0, 0, 0, 255) and tuple(image[16, 16]) == (255, 0, 255, 255)
    Cursor(32, 32, *syn.CURSOR_HOT_SPOT, pixels, serial=1)                    # a valid Cursor


def test_the_cursor_colour_is_no_guest_background():
    names = ["office", "media", "build-1", *(f"guest{i}" for i in range(200))]
    assert all(max(syn.guest_colour(n)) < 255 for n in names)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="directflip")
    tools_cli.register(p.add_subparsers(dest="command"))
    return p


def test_cli_cursor_options(capsys):
    args = parser().parse_args(["guest", "--name", "g"])
    assert (args.cursor, args.cursor_at) == (False, None)
    args = parser().parse_args(["guest", "--name", "g", "--cursor", "--cursor-at", "300,200"])
    assert (args.cursor, args.cursor_at) == (True, (300, 200))
    assert parser().parse_args(["guest", "--name", "g", "--cursor-at", "0,16383"]).cursor_at == (0, 16383)
    for bad in ("300", "1,2,3", "-1,5", "5,16384", "a,b", ""):
        with pytest.raises(SystemExit):
            parser().parse_args(["guest", "--name", "g", f"--cursor-at={bad}"])
        assert "expected X,Y in buffer pixels" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cursor position"):
        syn.SyntheticGuest("g", "/x", "/dev/null", 640, 480, 60, cursor_at=(0, 16384))


W, H = 640, 480


class SizedDumb:
    def __init__(self, width: int, height: int) -> None:
        self.handle, self.pitch = 1, width * 4
        self._map = bytearray(self.pitch * height)

    def map(self) -> bytearray:
        return self._map

    def destroy(self) -> None:
        pass


class SizedCard:
    """A card whose "dma-bufs" are memfds of the buffer's size, so a real server accepts them."""

    driver = "fake"

    def create_dumb(self, width: int, height: int, bpp: int = 32) -> SizedDumb:
        return SizedDumb(width, height)

    def export_dmabuf(self, handle: Any) -> int:
        return memfd(W * 4 * H)


def synthetic_guest(env: Env, **kwargs: Any) -> syn.SyntheticGuest:
    guest = syn.SyntheticGuest("office", env.path, "/dev/null", W, H, 0, buffers=2, **kwargs)
    guest.swapchain = syn.Swapchain(SizedCard(), W, H, 2, name="office")
    return guest


def test_the_synthetic_guest_sends_its_cursor_and_position_once_connected(env):
    guest = synthetic_guest(env, cursor=True, cursor_at=(300, 200))
    try:
        env.run(guest._connect)
        conn = env.conn()
        env.until(lambda: len(env.handler.seen) == 2)
        assert conn.cursor == Cursor(32, 32, 0, 0, syn.cursor_pixels(), serial=1)
        assert conn.pointer == GuestPointer(300, 200, True)
        assert sorted(conn.buffers) == [1, 2]                # after the buffers, as documented
    finally:
        guest.close()


def test_the_synthetic_guest_without_the_options_sends_no_cursor(env):
    guest = synthetic_guest(env)
    try:
        env.run(guest._connect)
        conn = env.conn()
        env.until(lambda: len(conn.buffers) == 2)
        env.run(guest.client.close)                           # bye: everything before it was read
        env.until(lambda: conn.closed)
        assert env.handler.seen == [] and (conn.cursor, conn.pointer) == (None, None)
    finally:
        guest.close()


def test_the_synthetic_guest_sends_its_cursor_again_after_a_reconnect(env):
    # The compositor "restarts" the guest's first connection at its first flip; with --reconnect the
    # guest connects again, and the new connection gets the image and the position too.
    latest: dict[GuestConnection, int] = {}

    def answer(conn: GuestConnection, frame: Any) -> None:
        if conn is env.handler.hellos[0]:
            env.loop.call_soon(conn.close, "compositor restarting")
            return
        if conn in latest and latest[conn] != frame.buffer.id:
            conn.released(latest[conn])
        latest[conn] = frame.buffer.id
        conn.presented(frame.buffer.id, frame.seq, time.monotonic_ns(), frame.seq)

    env.handler.on_flip_do = answer
    guest = synthetic_guest(env, cursor=True, cursor_at=(7, 9), reconnect=True)
    env.run(guest._connect)
    stats = env.run(guest.run, None, 6)
    assert stats.reconnects == 1 and stats.server_error is None and stats.frames_flipped == 6
    first, second = env.handler.hellos
    assert env.handler.closed[0] == ("office", "compositor restarting")
    for conn in (first, second):
        seen = [(c, p) for who, c, p in env.handler.seen if who is conn]
        assert seen[-1] == (Cursor(32, 32, 0, 0, syn.cursor_pixels(), serial=1), GuestPointer(7, 9, True))
        assert len(seen) == 2
