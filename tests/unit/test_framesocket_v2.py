"""Frame-socket protocol version 2 (docs/frame-socket.md, "Version 2"): negotiation in hello and
welcome, binary flip / presented / released records between real sockets, version-1 clients beside
version-2 ones, and the C decoder (native/fs_codec.c) against the format's definition, whole and in
pieces, for good records and every kind of bad one."""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from typing import Any

import pytest
from framesocket_env import serve
from hypothesis import given, settings
from hypothesis import strategies as st
from test_framesocket import BUFFER, STRIDE, H, Recorder, W, memfd, open_fds, send_with_fd
from wire_reference import reference

from compositor.sources.framesocket import FrameSocketClient, Presented, Released, encode
from compositor.sources.fswire import (
    CLIENT,
    FLIP,
    MAX_MESSAGE,
    PRESENTED,
    RECORD,
    RELEASED,
    SERVER,
    Decoder,
    ProtocolError,
    Record,
    flip_record,
    presented_record,
    released_record,
    split,
)

HELLO2 = {"type": "hello", "version": 2, "name": "rogue", "uuid": None}


@pytest.fixture
def env(tmp_path):
    yield from serve(tmp_path, Recorder())


def talk(env, *chunks: bytes) -> bytes:
    """Send raw chunks on a plain socket, half-close, return every byte the server sent until it
    closed (blocking parts in the executor while the loop serves)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)

    def run() -> bytes:
        sock.connect(env.path)
        for chunk in chunks:
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while data := sock.recv(65536):
            got += data
        return got

    try:
        return env.run(run)
    finally:
        sock.close()


def messages(raw: bytes, version: int = 2) -> list[Any]:
    return list(Decoder(CLIENT, version).feed(raw))


# --------------------------------------------------------------------------------- negotiation

@pytest.mark.parametrize("version, newest, chosen", [(1, None, 1), (2, None, 2), (1, 2, 2), (1, 7, 2),
                                                     (2, 2**32 - 1, 2)])
def test_welcome_chooses_the_newest_version_both_speak(env, version, newest, chosen):
    hello = {**HELLO2, "version": version, **({} if newest is None else {"max_version": newest})}
    raw = talk(env, encode(hello), encode({"type": "bye"}))
    assert messages(raw)[0] == {"type": "welcome", "version": chosen}


@pytest.mark.parametrize("fields, cause", [
    ({"version": 0}, "version 0 is not supported"),
    ({"version": 3}, "version 3 is not supported (this compositor speaks versions 1 to 2)"),
    ({"version": 3, "max_version": 5}, "version 3 is not supported"),
    ({"version": 2, "max_version": 1}, "max_version 1 is older than version 2"),
    ({"version": 1, "max_version": "2"}, '"max_version" must be an integer'),
])
def test_a_hello_with_no_common_version_is_refused(env, fields, cause):
    (error,) = messages(talk(env, encode({**HELLO2, **fields})))
    assert error["type"] == "error" and cause in error["reason"], error


def test_a_version_2_client_says_version_1_to_older_compositors(tmp_path):
    """A compositor that knows only version 1 reads `version` and ignores `max_version`: the client's
    hello must say 1 there, and the client then speaks version 1."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "old.sock")
    listener.bind(path)
    listener.listen(1)
    seen: list[dict] = []

    def old_compositor() -> None:
        conn, _ = listener.accept()
        with conn:
            (hello,) = list(Decoder(SERVER, 1).feed(conn.recv(65536)))
            seen.append(hello)
            conn.sendall(encode({"type": "welcome", "version": 1}))
            conn.recv(65536)

    server = threading.Thread(target=old_compositor, daemon=True)
    server.start()
    client = FrameSocketClient(path, "office")
    try:
        assert client.version == 1
        assert seen[0]["version"] == 1 and seen[0]["max_version"] == 2
    finally:
        client.close()
        server.join(5)
        listener.close()


def test_client_takes_the_version_the_welcome_chose(env):
    assert env.client("v2").version == 2
    assert env.client("v1", version=1).version == 1
    with pytest.raises(ValueError, match="version 3"):
        FrameSocketClient(env.path, "v3", version=3)


# --------------------------------------------------------------------------------- the frame's records

def test_a_version_2_frame_is_one_record_each_way(env):
    fd = memfd()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(5)
        env.run(sock.connect, env.path)
        sock.sendall(encode({**HELLO2, "name": "office"}))
        send_with_fd(sock, encode(BUFFER), fd)
        sock.sendall(flip_record(1, 2**64 - 1))
        env.until(lambda: env.handler.flips)
        ((guest, frame),) = env.handler.flips
        assert guest == "office" and frame.seq == 2**64 - 1 and frame.buffer.id == 1
        conn = env.conn("office")
        conn.presented(1, 2**64 - 1, 123, 9)
        conn.released(1)
        env.spin(0.01)
        raw = env.run(sock.recv, 65536)
        welcome = encode({"type": "welcome", "version": 2})
        assert raw == welcome + presented_record(1, 2**64 - 1, 123, 9) + released_record(1)
        assert len(raw) - len(welcome) == (4 + 32) + (4 + 4)   # word + record, each
    finally:
        sock.close()
        os.close(fd)


def test_version_1_and_2_clients_side_by_side(env):
    old, new = env.client("old", version=1), env.client("new")
    fds = [memfd(), memfd()]
    try:
        for client, fd in zip((old, new), fds, strict=True):
            client.announce(1, fd, "XR24", W, H, STRIDE)
            client.flip(1, frame=3)
        env.until(lambda: len(env.handler.flips) == 2)
        for name in ("old", "new"):
            env.conn(name).presented(1, 3, 5, 6)
            env.conn(name).released(1)
        env.spin(0.01)
        for client in (old, new):
            assert env.events(client, 2) == [Presented(1, 3, 5, 6), Released(1)]
        assert env.conn("old").version == 1 and env.conn("new").version == 2
    finally:
        for fd in fds:
            os.close(fd)


BAD_RECORDS = [
    ("unknown kind", struct.pack("<III", RECORD | 9, 1, 0),
     "binary record kind 9 (word 0x80000009) is not one the compositor receives"),
    ("reserved bits", struct.pack("<IIQ", RECORD | 0x100 | FLIP, 1, 0), "has reserved bits set"),
    ("buffer id 0", flip_record(0, 1),
     "binary record flip names buffer id 0"),
    ("a presented record", presented_record(1, 1, 1, 1), "binary record presented (word 0x80000002) is not "
                                                         "one the compositor receives"),
    ("unknown buffer", flip_record(5, 1), "flip of unknown buffer 5"),
]


@pytest.mark.parametrize("record, cause", [c[1:] for c in BAD_RECORDS], ids=[c[0] for c in BAD_RECORDS])
def test_a_bad_record_closes_only_that_client(env, caplog, record, cause):
    good = env.client("office")
    before = open_fds()
    with caplog.at_level(logging.WARNING, "directflip.framesocket"):
        got = messages(talk(env, encode(HELLO2), record))
    assert [m["type"] for m in got] == ["welcome", "error"] and cause in got[-1]["reason"], got
    assert cause in caplog.text
    assert env.handler.closed == [("rogue", got[-1]["reason"])]
    env.until(lambda: len(env.server.connections) == 1)
    assert open_fds() == before
    fd = memfd()
    try:
        good.announce(1, fd, "XR24", W, H, STRIDE)
        good.flip(1, frame=4)
        env.until(lambda: env.handler.flips_of("office") == [4])
    finally:
        os.close(fd)


def test_a_record_on_a_version_1_connection_is_a_bad_length(env):
    got = messages(talk(env, encode({**HELLO2, "version": 1}), flip_record(1, 1)), version=1)
    assert got[-1]["type"] == "error"
    assert got[-1]["reason"] == f"message length {RECORD | FLIP} is outside 1..{MAX_MESSAGE}"


# --------------------------------------------------------------------------------- the decoder

def test_records_cut_anywhere_come_out_whole():
    stream = (encode({"type": "hello", "version": 2}) + flip_record(1, 2) + flip_record(2**32 - 1, 2**64 - 1)
              + encode({"type": "bye"}))
    whole = list(Decoder(SERVER, 2).feed(stream))
    assert whole == [{"type": "hello", "version": 2}, Record(FLIP, 1, 2), Record(FLIP, 2**32 - 1, 2**64 - 1),
                     {"type": "bye"}]
    piecewise, decoder = [], Decoder(SERVER, 2)
    for i in range(len(stream)):
        piecewise += decoder.feed(stream[i:i + 1])
        assert decoder.needed() >= 1
    assert piecewise == whole and decoder.pending == 0


def test_the_version_rises_in_the_middle_of_a_batch():
    """hello and the client's first record in one read: the record is read as version 2 once the
    hello raised the version, not refused as a version-1 length."""
    decoder, got = Decoder(SERVER, 1), []
    for msg in decoder.feed(encode({"type": "hello"}) + flip_record(3, 4)):
        got.append(msg)
        decoder.version = 2
    assert got == [{"type": "hello"}, Record(FLIP, 3, 4)]


def test_thousands_of_records_in_one_feed():
    stream = b"".join(flip_record(1 + i % 64, i) for i in range(5000))
    got = list(Decoder(SERVER, 2).feed(stream))
    assert [r.frame for r in got] == list(range(5000))


def test_the_client_reads_presented_and_released_only():
    decoder = Decoder(CLIENT, 2)
    assert list(decoder.feed(presented_record(1, 2, 3, 4) + released_record(9))) == [
        Record(PRESENTED, 1, 2, 3, 4), Record(RELEASED, 9)]
    with pytest.raises(ProtocolError, match="flip .* is not one a client receives"):
        list(Decoder(CLIENT, 2).feed(flip_record(1, 1)))
    bad = bytearray(presented_record(1, 2, 3, 4))
    bad[8] = 1   # the reserved word
    with pytest.raises(ProtocolError, match="reserved bits"):
        list(Decoder(CLIENT, 2).feed(bytes(bad)))


_piece = st.one_of(
    st.builds(flip_record, st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)),
    st.builds(presented_record, st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1),
              st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    st.builds(released_record, st.integers(0, 2**32 - 1)),
    st.binary(min_size=0, max_size=12).map(lambda b: struct.pack("<I", len(b)) + b),
    st.binary(min_size=1, max_size=12),
    st.integers(0, 2**32 - 1).map(lambda w: struct.pack("<I", w)),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_piece, max_size=12).map(b"".join), st.sampled_from([SERVER, CLIENT]))
def test_the_c_decoder_agrees_with_the_definition(stream, reader):
    want, bad = reference(stream, reader)
    assert split(stream, 2, reader) == (want, bad)
