"""Input over the frame socket (docs/frame-socket.md, "Input"): the server's InputSink
(GuestConnection.input) to a real FrameSocketClient over a real Unix socket, the pointer mode from
hello and pointer-mode, and what happens to input for a client that does not read."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from framesocket_env import ON_DATAPLANE, raw_session, serve

from compositor.sources.framesocket import (
    MAX_QUEUED_INPUT,
    Button,
    Decoder,
    FrameSocketClient,
    FrameSocketInput,
    GuestConnection,
    GuestHandler,
    Key,
    Motion,
    Pointer,
    Presented,
    ServerError,
    Touch,
    Wheel,
    encode,
)

KEY_A, KEY_B, KEY_LEFTCTRL, BTN_LEFT, BTN_RIGHT = 30, 48, 29, 0x110, 0x111


@dataclass
class Recorder(GuestHandler):
    """A GuestHandler that writes down hellos and closes. `during_hello` runs inside on_hello (before
    welcome), `after_welcome` on the loop's next round, as a router reacting to a new guest would."""

    hellos: list[GuestConnection] = field(default_factory=list)
    closed: list[tuple[str, str]] = field(default_factory=list)
    during_hello: Callable[[GuestConnection], None] | None = None
    after_welcome: Callable[[GuestConnection], None] | None = None

    def on_hello(self, conn: GuestConnection) -> None:
        self.hellos.append(conn)
        if self.during_hello is not None:
            self.during_hello(conn)
        if self.after_welcome is not None:
            asyncio.get_running_loop().call_soon(self.after_welcome, conn)

    def on_buffer(self, conn, buffer) -> None:
        pass

    def on_flip(self, conn, frame) -> None:
        pass

    def on_forget(self, conn, buffer) -> None:
        buffer.close()

    def on_close(self, conn: GuestConnection, reason: str) -> None:
        self.closed.append((conn.name, reason))
        for buffer in conn.buffers.values():
            buffer.close()


@pytest.fixture
def env(tmp_path):
    yield from serve(tmp_path, Recorder())


HELLO = {"type": "hello", "version": 1, "name": "office"}


# ---------------------------------------------------------------------------- round trips

def test_every_input_message_reaches_the_client(env):
    client = env.client("office")
    sink = env.conn("office").input
    assert isinstance(sink, FrameSocketInput) and sink.absolute
    sink.key(KEY_A, True)
    sink.key(KEY_A, False)
    sink.button(BTN_LEFT, True)
    sink.pointer_abs(640, 360)
    sink.pointer_rel(-3, 5)
    sink.wheel(-1, 2)
    for kind in ("down", "motion", "up", "cancel"):
        sink.touch(kind, 2, 100, 200)
    assert env.events(client, 10) == [
        Key(KEY_A, True), Key(KEY_A, False), Button(BTN_LEFT, True), Pointer(640, 360), Motion(-3, 5),
        Wheel(-1, 2), Touch("down", 2, 100, 200), Touch("motion", 2, 100, 200), Touch("up", 2, 100, 200),
        Touch("cancel", 2, 100, 200)]


def test_input_events_are_frozen(env):
    client = env.client("office")
    conn = env.conn("office")
    conn.input.key(KEY_A, True)
    (event,) = env.events(client, 1)
    with pytest.raises(AttributeError):
        event.code = 31  # type: ignore[misc]


def test_positions_are_clamped_and_bad_arguments_are_the_callers_bug(env):
    client = env.client("office")
    sink = env.conn("office").input
    sink.pointer_abs(-5, 100_000)
    sink.touch("down", 0, 20_000, -1)
    sink.pointer_rel(2**40, -2**40)
    assert env.events(client, 3) == [Pointer(0, 16383), Touch("down", 0, 16383, 0),
                                     Motion(2**31 - 1, -2**31)]
    for bad in (lambda: sink.key(-1, True), lambda: sink.button(0x300, True),
                lambda: sink.touch("press", 0, 1, 1), lambda: sink.touch("down", 256, 1, 1)):
        with pytest.raises(ValueError):
            bad()


def test_input_right_behind_welcome_is_not_lost(env):
    # The router may send input as soon as the guest is welcomed: it can share a read with welcome.
    env.handler.after_welcome = lambda conn: conn.input.key(KEY_A, True)
    client = env.client("office")
    assert env.events(client, 1) == [Key(KEY_A, True)]


def test_no_input_before_welcome_or_after_close(env):
    env.handler.during_hello = lambda conn: conn.input.key(KEY_A, True)   # not welcomed yet
    client = env.client("office")
    conn = env.conn("office")
    assert env.run(client.poll, 0.2) == []
    conn.close("guest removed")
    conn.input.key(KEY_A, False)             # a closed connection: nothing, no error
    conn.input.pointer_abs(1, 1)
    assert conn.dropped_input == 0


# ----------------------------------------------------------------------------- pointer mode

def test_pointer_mode_defaults_to_absolute(env):
    client = env.client("office")
    conn = env.conn("office")
    assert (client.pointer, conn.pointer_mode, conn.input.absolute) == ("absolute", "absolute", True)


def test_hello_pointer_and_pointer_mode_change_absolute(env):
    client = env.client("office", pointer="relative")
    conn = env.conn("office")
    assert (conn.pointer_mode, conn.input.absolute) == ("relative", False)
    client.set_pointer_mode("absolute")
    env.until(lambda: conn.input.absolute)
    client.set_pointer_mode("relative")
    env.until(lambda: not conn.input.absolute)
    assert client.pointer == "relative" and not conn.closed


def test_the_client_refuses_an_unknown_mode_before_sending_it(env, tmp_path):
    with pytest.raises(ValueError, match="pointer mode 'sideways'"):
        FrameSocketClient(str(tmp_path / "nowhere.sock"), "office", pointer="sideways")
    client = env.client("office")
    with pytest.raises(ValueError, match="pointer mode 'Relative'"):
        client.set_pointer_mode("Relative")
    assert client.pointer == "absolute" and env.conn("office").input.absolute


MISSING = object()


@pytest.mark.parametrize(("value", "cause"), [
    ("sideways", 'pointer-mode: "mode" \'sideways\' is not "absolute" or "relative"'),
    ("Absolute", 'pointer-mode: "mode" \'Absolute\' is not "absolute" or "relative"'),
    ("", 'pointer-mode: "mode" \'\' is not "absolute" or "relative"'),
    (1, 'pointer-mode: "mode" must be a string, not a number'),
    (None, 'pointer-mode: "mode" must be a string, not null'),
    (True, 'pointer-mode: "mode" must be a string, not a boolean'),
    (["relative"], 'pointer-mode: "mode" must be a string, not an array'),
    (MISSING, 'pointer-mode: "mode" is missing'),
])
def test_a_bad_pointer_mode_is_a_protocol_error(env, caplog, value, cause):
    msg: dict[str, Any] = {"type": "pointer-mode"}
    if value is not MISSING:
        msg["mode"] = value
    with caplog.at_level(logging.WARNING, "directflip.framesocket"):
        replies = raw_session(env, HELLO, msg)
    assert [m["type"] for m in replies] == ["welcome", "error"]
    assert replies[-1]["reason"] == cause
    assert env.handler.closed == [("office", cause)]
    assert any(cause in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize(("value", "cause"), [
    ("tablet", 'hello: "pointer" \'tablet\' is not "absolute" or "relative"'),
    (None, 'hello: "pointer" must be a string, not null'),
    (0, 'hello: "pointer" must be a string, not a number'),
])
def test_a_bad_hello_pointer_is_a_protocol_error(env, value, cause):
    replies = raw_session(env, {**HELLO, "pointer": value})
    assert replies == [{"type": "error", "reason": cause}]
    assert env.handler.hellos == []


def test_pointer_mode_before_hello_is_a_protocol_error(env):
    replies = raw_session(env, {"type": "pointer-mode", "mode": "relative"})
    assert replies == [{"type": "error", "reason": 'the first message must be "hello", not \'pointer-mode\''}]


def test_pointer_mode_needs_no_reply_and_later_messages_still_work(env):
    replies = raw_session(env, {**HELLO, "pointer": "relative"}, {"type": "pointer-mode", "mode": "absolute"},
                          {"type": "pointer-mode", "mode": "absolute", "extra": [1]}, {"type": "bye"})
    assert replies == [{"type": "welcome", "version": 1}]
    assert env.handler.closed == [("office", "bye")]


# ------------------------------------------------------------------- a client that does not read

def flood(conn: GuestConnection, until: Callable[[], bool], limit: int = 1_000_000) -> int:
    """Pointer positions until `until()` holds; how many were sent."""
    for i in range(limit):
        if until():
            return i
        conn.input.pointer_abs(i % 1000, i % 700)
    raise AssertionError("the condition never held")


def test_a_client_that_does_not_read_loses_input_but_stays_connected(env, caplog):
    client = env.client("office")
    conn = env.conn("office")
    with caplog.at_level(logging.INFO, "directflip.framesocket"):
        flood(conn, lambda: conn.dropped_input >= 1000)
        env.spin()
        assert not conn.closed and env.handler.closed == []
        # bounded: input stopped queueing once past the bound
        assert len(conn._out) <= MAX_QUEUED_INPUT + len(encode({"type": "pointer", "x": 999, "y": 699}))
        dropped = conn.dropped_input
        flood(conn, lambda: conn.dropped_input >= dropped + 5000)
        env.spin()
        assert not conn.closed and env.handler.closed == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropping input" in warnings[0] and "guest 'office'" in warnings[0]
    assert not [r for r in caplog.records if "reading its socket again" in r.getMessage()]
    # the client may still talk, and the server still reads it
    client.set_pointer_mode("relative")
    env.until(lambda: not conn.input.absolute)


def test_input_flows_again_once_the_client_catches_up_and_no_key_stays_pressed(env, caplog):
    client = env.client("office")
    conn = env.conn("office")
    conn.input.key(KEY_LEFTCTRL, True)
    conn.input.button(BTN_RIGHT, True)
    conn.input.touch("down", 3, 10, 10)
    with caplog.at_level(logging.INFO, "directflip.framesocket"):
        flood(conn, lambda: conn.dropped_input > 0)
        dropped = conn.dropped_input
        conn.input.key(KEY_A, True)             # dropped: the guest never hears of it
        conn.input.key(KEY_LEFTCTRL, False)     # kept: the guest was told it is down
        conn.input.button(BTN_RIGHT, False)     # kept
        conn.input.button(BTN_RIGHT, True)      # pressed again: its release is no longer owed
        conn.input.touch("cancel", 3, 10, 10)   # kept
        assert conn.dropped_input == dropped + 2
        received: list[Any] = []
        deadline = time.monotonic() + 10
        while conn._out or conn._dropping_input:   # read until the server has nothing left
            assert time.monotonic() < deadline, "the server never drained"
            received += env.run(client.poll, 0.05)
        received += env.run(client.poll, 0.2)
        conn.input.key(KEY_A, False)
        received += env.events(client, 1)
    assert received[:3] == [Key(KEY_LEFTCTRL, True), Button(BTN_RIGHT, True), Touch("down", 3, 10, 10)]
    assert received[-3:] == [Key(KEY_LEFTCTRL, False), Touch("cancel", 3, 10, 10), Key(KEY_A, False)]
    assert Key(KEY_A, True) not in received and Button(BTN_RIGHT, False) not in received
    infos = [r.getMessage() for r in caplog.records if "reading its socket again" in r.getMessage()]
    assert len(infos) == 1 and f"{conn.dropped_input} input messages dropped" in infos[0]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert not conn.closed


def test_released_still_closes_a_client_that_does_not_read(env):
    # Input stops at MAX_QUEUED_INPUT; the server's own answers keep their 1 MiB limit.
    client = env.client("office")
    fd = os.memfd_create("fake-dmabuf", os.MFD_CLOEXEC)
    os.ftruncate(fd, 64 * 64 * 4)
    try:
        client.announce(1, fd, "XR24", 64, 64, 256)
    finally:
        os.close(fd)
    conn = env.conn("office")
    env.until(lambda: 1 in conn.buffers)
    flood(conn, lambda: conn.dropped_input > 0)
    for _ in range(200_000):
        conn.released(1)
        if conn._failing:
            break
    env.until(lambda: conn.closed)
    assert env.handler.closed == [("office", "not reading its socket")]


# ----------------------------------------------------------------- the client against a raw server

def serve_once(path: str, replies: list[bytes]) -> threading.Thread:
    """A one-shot server: accept, read the hello, send `replies`, keep the socket until the client
    hangs up."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    hellos: list[dict[str, Any]] = []

    def serve() -> None:
        with listener, listener.accept()[0] as sock:
            sock.settimeout(5)
            decoder = Decoder()
            while not hellos:
                hellos.extend(decoder.feed(sock.recv(65536)))
            sock.sendall(b"".join(replies))
            while sock.recv(65536):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.hellos = hellos  # type: ignore[attr-defined]
    thread.start()
    return thread


WELCOME = encode({"type": "welcome", "version": 1})


def test_the_client_says_its_pointer_mode_and_ignores_unknown_server_messages(tmp_path):
    path = str(tmp_path / "raw.sock")
    server = serve_once(path, [WELCOME, encode({"type": "haptic", "strength": 3}),
                               encode({"type": "key", "code": KEY_A, "down": True, "repeat": 0})])
    with FrameSocketClient(path, "office", pointer="relative") as client:
        # All three came in one write with welcome: the constructor read only up to welcome, so the
        # rest is still in the socket and a guest's own poll loop sees it.
        assert select.select([client], [], [], 5)[0] == [client]
        assert client.poll(5) == [Key(KEY_A, True)]
    server.join(5)
    (hello,) = server.hellos  # type: ignore[attr-defined]
    assert hello["pointer"] == "relative"


@pytest.mark.parametrize(("msg", "cause"), [
    ({"type": "key", "code": KEY_A, "down": 1}, '"down" must be a boolean, not a number'),
    ({"type": "button", "code": 0x300, "down": True}, '"code" 768 is outside 0..767'),
    ({"type": "pointer", "x": -1, "y": 0}, '"x" -1 is outside 0..16383'),
    ({"type": "motion", "dx": 1.0, "dy": 0}, '"dx" must be an integer, not a number'),
    ({"type": "wheel", "dx": 0}, '"dy" is missing'),
    ({"type": "touch", "kind": "press", "slot": 0, "x": 0, "y": 0},
     '"kind" \'press\' is not "down", "motion", "up" or "cancel"'),
])
def test_the_client_refuses_a_malformed_input_message(tmp_path, msg, cause):
    path = str(tmp_path / "raw.sock")
    server = serve_once(path, [WELCOME, encode(msg)])
    with FrameSocketClient(path, "office") as client:
        with pytest.raises(ServerError, match="the compositor broke the protocol") as exc:
            client.poll(5)
        assert cause in str(exc.value)
    server.join(5)


def test_wire_format_of_input(env):
    # What other languages' clients parse: compact JSON, exactly these members.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)

    def hello() -> None:
        sock.connect(env.path)
        sock.sendall(encode(HELLO))

    def read(count: int) -> list[bytes]:
        data = b""
        while len(_bodies(data)) < count:
            data += sock.recv(65536)
        return _bodies(data)

    try:
        env.run(hello)
        conn = env.conn("office")
        env.until(lambda: conn.input.absolute and conn.name == "office" and env.handler.hellos)
        conn.input.key(KEY_A, True)
        conn.input.touch("up", 1, 5, 6)
        bodies = env.run(read, 3)
    finally:
        sock.close()
    assert bodies == [b'{"type":"welcome","version":1}', b'{"type":"key","code":30,"down":true}',
                      b'{"type":"touch","kind":"up","slot":1,"x":5,"y":6}']
    assert [json.loads(b)["type"] for b in bodies] == ["welcome", "key", "touch"]


def _bodies(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos + 4 <= len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        if pos + 4 + n > len(data):
            break
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


@pytest.mark.skipif(os.environ.get(ON_DATAPLANE) == "1",
                    reason="the Python writer's own queue: on the data plane, its thread writes")
def test_input_queued_behind_a_flip_answer_flows_again_once_it_is_sent(env):
    """A version-2 flip answer waits in the queue until the loop runs again; input added meanwhile
    past MAX_QUEUED_INPUT starts dropping. The flush that sends it all must let input flow again."""
    client = env.client("office")
    conn = env.conn("office")
    assert conn.version == 2
    conn.buffers[1] = object()   # presented is sent for a buffer the connection knows
    conn.presented(1, 7, 1, 1)
    while not conn._dropping_input:   # the whole queue waits for the loop: nothing is being written
        conn.input.key(KEY_A, True)
        conn.input.key(KEY_A, False)
    assert not conn._writing and conn._flush_due
    received: list[Any] = []
    deadline = time.monotonic() + 10
    while conn._out or conn._dropping_input:
        assert time.monotonic() < deadline, "input never flowed again"
        received += env.run(client.poll, 0.05)
    received += env.run(client.poll, 0.2)   # what was still in the socket
    conn.input.key(KEY_B, True)              # after the flush: not dropped
    assert env.events(client, 1) == [Key(KEY_B, True)]
    assert received[0] == Presented(1, 7, 1, 1) and conn.dropped_input > 0
    del conn.buffers[1]
