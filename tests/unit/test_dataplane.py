"""The native data plane (native/dataplane.c) on its own thread, between real sockets and a fake card:
the card's "DRM fd" is a pipe that the C side's fake kernel writes each commit's flip event into 1 ms
after the commit (dataplane.h), parsed by libdrm's drmHandleEvent as a real card's would be.

What the guest sees is read from its end of a real socket pair with the protocol's own decoder."""

from __future__ import annotations

import os
import select
import socket
import struct
import time

import pytest

from compositor.dataplane import (
    CLOSED,
    DATA,
    FLIP,
    FREED,
    MAX_OUT,
    PRESENTED,
    TOKEN_BIT,
    DataPlane,
)
from compositor.sources.fswire import CLIENT, Decoder, Record, encode, flip_record, presented_record

CRTC, PLANE, FB_PROP = 40, 31, 20
FB = {1: 101, 2: 102, 3: 103}
DEADLINE = 10.0


class Rig:
    def __init__(self, delay_ns: int = 1_000_000) -> None:
        self.dp = DataPlane()
        self.dp.start()
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.card = self.dp.add_card(self.r, fake_write_fd=self.w, fake_delay_ns=delay_ns)
        self.output = self.dp.add_output(self.card, CRTC, PLANE, FB_PROP)
        self.server, self.client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.setblocking(False)
        self.conn = self.dp.add_conn(self.server.fileno())
        self.decoder = Decoder(CLIENT, 2)
        self.said: list = []
        self.seen: list = []
        self.buffers = {}
        for buffer_id, fb in FB.items():
            handle = self.dp.add_buffer(self.conn, buffer_id, layout=1)
            self.dp.set_fb(handle, self.output, fb)
            self.buffers[buffer_id] = handle

    def close(self) -> None:
        self.dp.close()
        for fd in (self.r, self.w):
            os.close(fd)
        self.server.close()
        self.client.close()

    def events(self, until, what: str) -> list:
        """Collect the data plane's events until until(all so far) holds."""
        deadline = time.monotonic() + DEADLINE
        while not until(self.seen):
            left = deadline - time.monotonic()
            assert left > 0, f"no {what} within {DEADLINE} s; events: {self.seen}"
            select.select([self.dp], [], [], left)
            self.seen += self.dp.events()
        return self.seen

    def read(self, until, what: str) -> list:
        """What the guest was told, until until(all so far) holds."""
        deadline = time.monotonic() + DEADLINE
        self.client.setblocking(False)
        while not until(self.said):
            left = deadline - time.monotonic()
            assert left > 0, f"the guest was not told {what} within {DEADLINE} s; it was told {self.said}"
            select.select([self.client], [], [], left)
            try:
                data = self.client.recv(65536)
            except BlockingIOError:
                continue
            self.said += list(self.decoder.feed(data))
        return self.said

    def first_frame(self, buffer_id: int = 1) -> None:
        """As the daemon does for a guest's first frame: Python shows it (dp_flip), then the output."""
        self.dp.show(self.output, self.conn)
        assert self.dp.conn_show(self.conn) == 1
        self.dp.flip(self.conn, self.buffers[buffer_id], 0, time.monotonic_ns())


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def presented(said):
    return [m for m in said if isinstance(m, Record) and m.kind == 2]


def released(said):
    return [m.id for m in said if isinstance(m, Record) and m.kind == 3]


def test_flips_reach_the_screen_and_come_back_presented_then_released(rig):
    rig.first_frame(1)
    rig.read(lambda s: len(presented(s)) == 1, "presented for the first frame")
    for frame, buffer_id in enumerate([2, 3, 1, 2], start=1):
        rig.client.send(flip_record(buffer_id, frame))
        rig.read(lambda s, n=frame + 1: len(presented(s)) == n, f"presented for frame {frame}")
    said = rig.said
    assert [(m.id, m.frame) for m in presented(said)] == [(1, 0), (2, 1), (3, 2), (1, 3), (2, 4)]
    # Each buffer is released once the next frame replaced it on screen (and as the latest frame).
    rig.read(lambda s: len(released(s)) >= 4, "released for the frames replaced")
    assert released(rig.said)[:4] == [1, 2, 3, 1]
    stats = rig.dp.stats(rig.output)
    samples = DataPlane.samples(stats)
    delays = sorted(d for d, _, _ in samples)
    print(f"commits {stats.commits}, presented {stats.presented}, "
          f"commit delay p50 {delays[len(delays) // 2] / 1000:.1f} µs")
    assert len(samples) == 5 and all(0 < lat < 10**9 for _, lat, _ in samples)
    assert [t for _, _, t in samples] == [m.timestamp_ns for m in presented(rig.said)]
    assert (stats.frames, stats.commits, stats.presented, stats.dropped) == (5, 5, 5, 0)
    assert rig.dp.flips(rig.conn) == 4   # the first frame was Python's (dp_flip)
    assert (stats.on_screen_buffer, stats.on_screen_frame) == (2, 4)
    # The timestamps are the (fake) kernel's, in CLOCK_MONOTONIC, and the sequence counts up.
    stamps = [m.timestamp_ns for m in presented(said)]
    assert stamps == sorted(stamps) and stamps[-1] <= time.monotonic_ns()
    assert [m.sequence for m in presented(said)] == [1, 2, 3, 4, 5]


def test_the_newest_frame_wins_and_older_ones_go_back_unshown(rig):
    rig.first_frame(1)
    rig.read(lambda s: len(presented(s)) == 1, "presented for the first frame")
    # Many flips in one send: one commit in flight, one pending, every older pending frame dropped.
    burst = [(2, 1), (3, 2), (2, 3), (3, 4), (2, 5), (3, 6)]
    rig.client.send(b"".join(flip_record(b, f) for b, f in burst))
    rig.read(lambda s: any(m.frame == 6 for m in presented(s)), "presented for the last frame")
    stats = rig.dp.stats(rig.output)
    assert stats.frames == 7 and stats.commits + stats.dropped == 7 and stats.dropped >= 1
    assert stats.presented == stats.commits
    shown = [m.frame for m in presented(rig.said)]
    assert shown == sorted(shown) and shown[-1] == 6
    # Nothing but the frame on screen (buffer 3, also the latest) is still held.
    rig.read(lambda s: released(s).count(2) >= 1, "released for buffer 2")
    assert rig.dp.holds(rig.buffers[2]) == 0 and rig.dp.holds(rig.buffers[3]) == 2


def test_a_json_message_is_handed_to_python_in_order_and_reading_waits_for_it(rig):
    rig.first_frame(1)
    rig.read(lambda s: len(presented(s)) == 1, "presented for the first frame")
    msg = encode({"type": "cursor-move", "x": 1, "y": 2, "visible": True})
    rig.client.send(flip_record(2, 1) + msg + flip_record(3, 2))
    events = rig.events(lambda e: any(x.kind == DATA for x in e), "handover")
    taken = rig.dp.take(rig.conn)
    # The flip before it was shown here; the JSON and everything after it is Python's.
    assert taken.data == msg + flip_record(3, 2) and taken.fds == [] and not taken.eof
    assert [e.kind for e in events].count(DATA) == 1
    # Until Python resumes the connection, nothing more is read.
    rig.client.send(flip_record(1, 3))
    time.sleep(0.05)
    assert rig.dp.stats(rig.output).frames == 2
    rig.dp.resume(rig.conn, fast=True)
    rig.read(lambda s: any(m.frame == 3 for m in presented(s)), "presented for frame 3")
    assert 2 not in [m.frame for m in presented(rig.said)]   # Python had frame 2, and did not show it


def test_descriptors_are_handed_over_with_where_they_came(rig):
    rig.first_frame(1)
    rig.read(lambda s: len(presented(s)) == 1, "presented for the first frame")
    r, w = os.pipe()
    try:
        msg = encode({"type": "buffer", "id": 9})
        rig.client.send(flip_record(2, 1)[:5])   # a flip cut short: kept here for its rest
        time.sleep(0.05)
        socket.send_fds(rig.client, [flip_record(2, 1)[5:] + msg], [r])
        rig.events(lambda e: any(x.kind == DATA for x in e), "handover")
        taken = rig.dp.take(rig.conn)
        assert taken.data == flip_record(2, 1) + msg and taken.fds_from == 5 and len(taken.fds) == 1
        assert os.fstat(taken.fds[0]).st_ino == os.fstat(r).st_ino
        os.close(taken.fds[0])
    finally:
        os.close(r)
        os.close(w)


def test_a_malformed_record_goes_to_python_which_names_it(rig):
    rig.first_frame(1)
    bad = struct.pack("<II", 0x80000100 | 1, 2) + b"\0" * 8   # reserved bits set
    rig.client.send(flip_record(2, 1) + bad)
    rig.events(lambda e: any(x.kind == DATA for x in e), "handover")
    assert rig.dp.take(rig.conn).data == bad


def test_a_flip_of_an_unknown_buffer_or_a_buffer_without_a_framebuffer_goes_to_python(rig):
    rig.first_frame(1)
    extra = rig.dp.add_buffer(rig.conn, 7, layout=1)
    rig.client.send(flip_record(7, 1))
    rig.events(lambda e: sum(x.kind == DATA for x in e) == 1, "handover")
    assert rig.dp.take(rig.conn).data == flip_record(7, 1)
    rig.dp.set_fb(extra, rig.output, 107)
    rig.dp.flip(rig.conn, extra, 1, time.monotonic_ns())   # Python shows it, once it could
    rig.dp.resume(rig.conn, fast=True)
    rig.client.send(flip_record(8, 2))
    rig.events(lambda e: sum(x.kind == DATA for x in e) == 2, "second handover")
    assert rig.dp.take(rig.conn).data == flip_record(8, 2)
    rig.read(lambda s: any(m.id == 7 for m in presented(s)), "presented for buffer 7")


def test_a_new_layout_goes_to_python(rig):
    rig.first_frame(1)
    other = rig.dp.add_buffer(rig.conn, 5, layout=2)
    rig.dp.set_fb(other, rig.output, 105)
    rig.client.send(flip_record(5, 1))
    rig.events(lambda e: any(x.kind == DATA for x in e), "handover")
    assert rig.dp.take(rig.conn).data == flip_record(5, 1)


def test_the_end_of_the_stream_is_handed_over(rig):
    rig.first_frame(1)
    rig.client.shutdown(socket.SHUT_WR)
    rig.events(lambda e: any(x.kind == DATA for x in e), "handover")
    taken = rig.dp.take(rig.conn)
    assert taken.data == b"" and taken.eof
    with pytest.raises(OSError):
        rig.dp.resume(rig.conn, fast=True)


def test_a_client_that_does_not_read_is_closed_not_waited_for(rig):
    with pytest.raises(OSError, match="No buffer space"):
        for _ in range(3):
            rig.dp.send(rig.conn, b"x" * (MAX_OUT // 2 + 1))
    rig.events(lambda e: any(x.kind == CLOSED for x in e), "the connection closed")
    assert [x.a for x in rig.seen if x.kind == CLOSED] == [105]   # ENOBUFS


def test_forgotten_buffers_are_freed_once_off_screen(rig):
    rig.first_frame(1)
    rig.read(lambda s: len(presented(s)) == 1, "presented for the first frame")
    rig.dp.forget(rig.buffers[1])        # on screen and the latest frame: still held
    rig.dp.forget(rig.buffers[3])        # never shown: freed at once
    rig.events(lambda e: [x.buffer_id for x in e if x.kind == FREED] == [3], "buffer 3 freed")
    rig.client.send(flip_record(2, 1))
    rig.events(lambda e: [x.buffer_id for x in e if x.kind == FREED] == [3, 1], "buffer 1 freed")
    rig.read(lambda s: len(presented(s)) == 2, "presented for frame 1")
    assert 1 not in released(rig.said)   # a forgotten buffer is not the guest's to reuse


def test_flip_events_of_commits_made_elsewhere_come_to_python(rig):
    ev = struct.pack("<IIQIIII", 2, 32, 12345, 7, 8, 9, CRTC)   # drm_event_vblank, FLIP_COMPLETE
    os.write(rig.w, ev)
    events = rig.events(lambda e: any(x.kind == FLIP for x in e), "the flip event")
    flip = next(x for x in events if x.kind == FLIP)
    assert (flip.crtc, flip.user_data, flip.sequence, flip.timestamp_ns) == (CRTC, 12345, 9, 7 * 10**9 + 8000)
    assert not flip.user_data & TOKEN_BIT


def test_releasing_an_output_hands_its_frames_back(rig):
    rig.first_frame(1)
    rig.read(lambda s: len(presented(s)) == 1, "presented for the first frame")
    rig.dp.watch(rig.output)
    rig.client.send(flip_record(2, 1))
    rig.events(lambda e: any(x.kind == PRESENTED for x in e), "the presented event")
    held = rig.dp.release_output(rig.output)
    assert held.on_screen == rig.buffers[2] and held.on_screen_frame == 1 and held.in_flight == -1
    # Its holds are the caller's now; the guest's latest frame still holds buffer 2 too.
    assert rig.dp.holds(rig.buffers[2]) == 2
    assert rig.dp.release(rig.buffers[2]) == 1
    # With no output, the next flip is Python's.
    rig.client.send(flip_record(3, 2))
    rig.events(lambda e: any(x.kind == DATA for x in e), "handover")


def test_a_closed_connection_frees_its_buffers_once_nothing_holds_them(rig):
    rig.first_frame(1)
    rig.read(lambda s: len(presented(s)) == 1, "presented for the first frame")
    rig.dp.remove_conn(rig.conn)
    freed = rig.events(lambda e: sorted(x.buffer_id for x in e if x.kind == FREED) == [2, 3], "2 and 3 freed")
    assert 1 not in [x.buffer_id for x in freed if x.kind == FREED]   # still on screen
    held = rig.dp.release_output(rig.output)
    assert held.on_screen == rig.buffers[1]
    rig.dp.release(held.on_screen)
    rig.events(lambda e: 1 in [x.buffer_id for x in e if x.kind == FREED], "buffer 1 freed")


def test_presented_record_layout_matches_the_protocol(rig):
    rig.first_frame(2)
    rig.client.setblocking(True)
    rig.client.settimeout(DEADLINE)
    data = rig.client.recv(36)
    assert len(data) == 36 and data[:12] == presented_record(2, 0, 0, 0)[:12]


def test_a_stale_handle_names_nothing_even_once_its_slot_is_reused(rig):
    old_conn, old_buffer = rig.conn, rig.buffers[3]
    rig.dp.forget(old_buffer)
    rig.dp.remove_conn(old_conn)
    a, b = socket.socketpair()
    try:
        new_conn = rig.dp.add_conn(a.fileno())
        new_buffer = rig.dp.add_buffer(new_conn, 3, layout=1)
        assert (new_conn, new_buffer) != (old_conn, old_buffer)
        for call in (lambda: rig.dp.resume(old_conn, True), lambda: rig.dp.holds(old_buffer),
                     lambda: rig.dp.send(old_conn, b"x")):
            with pytest.raises(OSError, match="No such file"):
                call()
        assert rig.dp.holds(new_buffer) == 0
    finally:
        a.close()
        b.close()


def test_a_mirror_gets_every_frame_and_the_guest_hears_presented_once(rig):
    mirror = rig.dp.add_output(rig.card, CRTC + 1, PLANE + 1, FB_PROP)
    for buffer_id, handle in rig.buffers.items():
        rig.dp.set_fb(handle, mirror, FB[buffer_id] + 100)
    rig.dp.show(rig.output, rig.conn)
    rig.dp.show(mirror, rig.conn)
    # Until conn_show, the guest's flips are Python's: no output sees a frame the other does not.
    rig.client.send(flip_record(1, 0))
    rig.events(lambda e: any(x.kind == DATA for x in e), "handover")
    rig.dp.take(rig.conn)
    assert rig.dp.conn_show(rig.conn) == 2
    rig.dp.flip(rig.conn, rig.buffers[1], 0, time.monotonic_ns())
    rig.dp.resume(rig.conn, fast=True)
    for frame, buffer_id in enumerate([2, 3, 1], start=1):
        rig.client.send(flip_record(buffer_id, frame))
        rig.read(lambda s, f=frame: any(m.frame == f for m in presented(s)), f"presented for frame {frame}")
    time.sleep(0.05)
    rig.read(lambda s: True, "")
    frames = [m.frame for m in presented(rig.said)]
    assert frames == sorted(set(frames)), f"a frame was presented twice: {frames}"
    a, b = rig.dp.stats(rig.output), rig.dp.stats(mirror)
    assert (a.frames, b.frames) == (4, 4) and a.presented == b.presented == 4
    # Releasing one sends the guest's flips to Python, for the mirror too.
    rig.dp.release_output(mirror)
    rig.client.send(flip_record(2, 9))
    rig.events(lambda e: sum(x.kind == DATA for x in e) == 2, "handover")
    assert rig.dp.stats(rig.output).frames == 4


def test_a_late_flip_event_of_a_removed_output_does_not_complete_its_successor(rig):
    # A card whose (fake) flips never complete during the test: a commit stays in flight.
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        card = rig.dp.add_card(r, fake_write_fd=w, fake_delay_ns=60 * 10**9)
        old = rig.dp.add_output(card, CRTC, PLANE, FB_PROP)
        for handle in rig.buffers.values():
            rig.dp.set_fb(handle, old, 500)
        rig.dp.show(old, rig.conn)
        rig.dp.conn_show(rig.conn)
        rig.dp.flip(rig.conn, rig.buffers[1], 0, time.monotonic_ns())   # its first commit: token 1
        held = rig.dp.release_output(old)
        assert held.in_flight == rig.buffers[1] and held.in_flight_token == TOKEN_BIT | old << 40 | 1
        rig.dp.release(held.in_flight)
        rig.dp.remove_output(old)
        new = rig.dp.add_output(card, CRTC, PLANE, FB_PROP)
        assert new == old   # the same slot
        for handle in rig.buffers.values():
            rig.dp.set_fb(handle, new, 600)
        rig.dp.show(new, rig.conn)
        rig.dp.conn_show(rig.conn)
        rig.dp.flip(rig.conn, rig.buffers[2], 1, time.monotonic_ns())
        assert rig.dp.stats(new).in_flight
        # The old commit's event comes late: it must not complete the new output's commit.
        os.write(w, struct.pack("<IIQIIII", 2, 32, held.in_flight_token, 1, 0, 1, CRTC))
        events = rig.events(lambda e: any(x.kind == FLIP for x in e), "the stale event")
        assert next(x for x in events if x.kind == FLIP).user_data == held.in_flight_token
        stats = rig.dp.stats(new)
        assert stats.in_flight and stats.presented == 0
    finally:
        rig.dp.close()
        os.close(r)
        os.close(w)


def test_a_reset_connection_hands_over_its_descriptors_once(rig):
    # A guest killed with our messages unread: recvmsg fails with ECONNRESET and fills in no control
    # data. The descriptors of the earlier recvmsg were handed over then; they must not come again
    # (Python would close them a second time, by then maybe another file's number).
    rig.first_frame(1)
    rig.read(lambda s: len(presented(s)) == 1, "presented for the first frame")
    r, w = os.pipe()
    try:
        socket.send_fds(rig.client, [encode({"type": "buffer", "id": 9})], [r])
        rig.events(lambda e: any(x.kind == DATA for x in e), "handover")
        first = rig.dp.take(rig.conn)
        assert len(first.fds) == 1
        os.close(first.fds[0])
        rig.dp.resume(rig.conn, fast=True)
        rig.dp.send(rig.conn, b"unread by the guest")
        time.sleep(0.1)   # sent: the guest's socket holds it
        rig.client.close()   # unread data: the compositor's next recvmsg says ECONNRESET
        rig.events(lambda e: sum(x.kind == DATA for x in e) == 2, "the end of the stream")
        last = rig.dp.take(rig.conn)
        assert (last.data, last.fds, last.eof) == (b"", [], True), last
    finally:
        os.close(r)
        os.close(w)


CURSOR_PLANE = 33
CURSOR_PROPS = list(range(301, 311))


def cursor_at(x: int, y: int) -> list[int]:
    return [901, CRTC, 0, 0, 64 << 16, 64 << 16, x, y, 64, 64]


@pytest.fixture
def slow_rig():
    r = Rig(delay_ns=300_000_000)   # each flip takes 300 ms: what is in flight stays so while looked at
    yield r
    r.close()


def test_a_cursor_move_on_an_idle_crtc_is_committed_alone_and_the_next_frame_waits_for_it(slow_rig):
    rig = slow_rig
    rig.first_frame(1)
    rig.read(lambda s: len(presented(s)) == 1, "presented for the first frame")
    rig.dp.set_cursor(rig.output, CURSOR_PLANE, CURSOR_PROPS, cursor_at(-5, 7))   # negative: off the edge
    rig.client.send(flip_record(2, 1))
    time.sleep(0.05)   # read by the data plane; the cursor's commit (300 ms) is still in flight
    held = rig.dp.release_output(rig.output)
    assert held.in_flight_token and held.in_flight == -1 and not held.cursor_pending, held
    assert held.pending == rig.buffers[2] and held.pending_frame == 1, held
    assert not any(e.kind == FLIP for e in rig.dp.events())


def test_a_cursor_move_during_a_flip_waits_and_is_handed_back_uncommitted(slow_rig):
    rig = slow_rig
    rig.first_frame(1)
    rig.read(lambda s: len(presented(s)) == 1, "presented for the first frame")
    rig.client.send(flip_record(2, 1))
    time.sleep(0.05)   # frame 1 in flight for 300 ms
    rig.dp.set_cursor(rig.output, CURSOR_PLANE, CURSOR_PROPS, cursor_at(10, 10))
    held = rig.dp.release_output(rig.output)
    assert held.in_flight == rig.buffers[2] and held.cursor_pending, held


def test_the_cursor_commits_flip_event_stays_in_the_data_plane(rig):
    # The cursor's own commit completes inside the data plane: Python hears of no flip event, and the
    # guest's next frame is committed and presented as usual.
    rig.first_frame(1)
    rig.read(lambda s: len(presented(s)) == 1, "presented for the first frame")
    for x in range(20):
        rig.dp.set_cursor(rig.output, CURSOR_PLANE, CURSOR_PROPS, cursor_at(x, x))
        time.sleep(0.002)
    rig.client.send(flip_record(3, 1))
    rig.read(lambda s: any(m.id == 3 for m in presented(s)), "presented for buffer 3")
    assert not [e for e in rig.events(lambda e: True, "nothing") if e.kind == FLIP]
    assert rig.dp.stats(rig.output).errors == 0
    with pytest.raises(ValueError):
        rig.dp.set_cursor(rig.output, CURSOR_PLANE, CURSOR_PROPS[:3], cursor_at(0, 0))


def test_taking_an_output_back_says_which_cursor_state_the_plane_shows(rig):
    # What the data plane committed of the cursor (its FB_ID), so Python knows which of the cursor's
    # buffers is on screen; nothing pending once the commit went out.
    rig.first_frame(1)
    rig.read(lambda s: len(presented(s)) == 1, "presented for the first frame")
    assert rig.dp.release_output(rig.output).cursor_fb is None   # none committed here
    rig.dp.show(rig.output, rig.conn)
    rig.dp.conn_show(rig.conn)
    rig.dp.set_cursor(rig.output, CURSOR_PLANE, CURSOR_PROPS, cursor_at(3, 4))
    held = rig.dp.release_output(rig.output)
    assert (held.cursor_fb, held.cursor_pending) == (901, False), held
