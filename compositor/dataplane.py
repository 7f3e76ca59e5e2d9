"""The native data plane (native/dataplane.h), as the control plane sees it.

The C side runs on its own thread: it reads frame-socket guests' `flip` records, commits each frame's
framebuffer to every output that shows the guest, reads the flip events and answers `presented` and
`released` itself. This module hands it its tables (cards, outputs, connections, buffers and their
framebuffers, which guest each output shows) and turns what it reports back into Python values, in
batches, when its eventfd (`fileno()`) is readable. Errors come back as OSError with the errno the C
side returned.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import NamedTuple

from compositor._native import ffi, lib

MAX_OUTPUTS = lib.DP_MAX_OUTPUTS
MAX_OUT = lib.DP_MAX_OUT
SAMPLES = lib.DP_SAMPLES
TOKEN_BIT = lib.DP_TOKEN_BIT
DATA, CLOSED, FLIP, FREED, PRESENTED, ERROR, DRAINED = (
    lib.DP_EV_DATA, lib.DP_EV_CLOSED, lib.DP_EV_FLIP, lib.DP_EV_FREED, lib.DP_EV_PRESENTED, lib.DP_EV_ERROR,
    lib.DP_EV_DRAINED)
_BATCH = 256


class Event(NamedTuple):
    """One report of the data plane; the fields a kind does not use are 0 (dataplane.h)."""

    kind: int
    handle: int
    a: int = 0
    card: int = 0
    crtc: int = 0
    sequence: int = 0
    timestamp_ns: int = 0
    user_data: int = 0
    buffer_id: int = 0
    frame: int = 0


class Held(NamedTuple):
    """What an output handed back: buffer handles (-1: none) and frame numbers; the caller now owns
    their holds, and the token of the commit in flight (0: none)."""

    on_screen: int
    on_screen_frame: int
    in_flight: int
    in_flight_frame: int
    pending: int
    pending_frame: int
    in_flight_token: int
    in_flight_presented: bool   # the guest was told `presented` for it already (a mirror showed it)
    pending_presented: bool
    cursor_pending: bool        # a cursor state given with set_cursor was not committed (yet, or refused)
    cursor_fb: int | None       # the FB_ID of the last cursor state committed here (0: off); None: none was


@dataclass
class Taken:
    """Bytes of a connection handed to Python: `fds` came with the recvmsg that began at
    data[fds_from:]; `eof`: the stream ended after them; `lost_fds`: MSG_CTRUNC."""

    data: bytes
    fds: list[int]
    fds_from: int
    eof: bool
    lost_fds: bool


@dataclass
class OutputStats:
    frames: int
    commits: int
    presented: int
    dropped: int
    errors: int
    busy: int
    max_in_flight: int
    max_pending: int
    in_flight: bool
    pending: bool
    on_screen_buffer: int
    on_screen_frame: int
    # Per presented frame k (counting from 0), its samples lie at index k % SAMPLES: the newest
    # SAMPLES of them are there.
    commit_delay_ns: list[int]
    latency_ns: list[int]
    present_ns: list[int]


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


class DataPlane:
    """The C data plane and its thread, from start() until close()."""

    def __init__(self) -> None:
        self._dp = lib.dp_new()
        if self._dp == ffi.NULL:
            raise OSError(errno.ENOMEM, "the data plane could not be created")
        self._events = ffi.new("struct dp_event[]", _BATCH)
        self._stats = ffi.new("struct dp_output_stats *")
        self._state = ffi.new("struct dp_output_state *")
        self._cursor_props = ffi.new("uint32_t[10]")
        self._cursor_values = ffi.new("uint64_t[10]")
        self._take_buf = ffi.new("uint8_t[]", lib.DP_IN_SIZE + 64)
        self._take_fds = ffi.new("int[]", lib.DP_MAX_FDS)
        self._take_n = ffi.new("int *")
        self._take_from = ffi.new("size_t *")
        self._take_flags = ffi.new("int *")

    def _live(self):
        if self._dp is None:
            raise OSError(errno.EBADF, "the data plane is closed")
        return self._dp

    def start(self) -> None:
        _check(lib.dp_start(self._live()), "starting the data plane's thread")

    def close(self) -> None:
        if self._dp is not None:
            lib.dp_free(self._live())
            self._dp = None

    def fileno(self) -> int:
        return lib.dp_notify_fd(self._live())

    def events(self) -> list[Event]:
        """Every event waiting, oldest first."""
        out: list[Event] = []
        while True:
            n = lib.dp_poll_events(self._live(), self._events, _BATCH)
            for i in range(n):
                e = self._events[i]
                out.append(Event(e.kind, e.handle, e.a, e.card, e.crtc, e.sequence, e.timestamp_ns,
                                 e.user_data, e.buffer_id, e.frame))
            if n < _BATCH:
                return out

    # --- tables

    def add_card(self, fd: int, *, fake_write_fd: int = -1, fake_delay_ns: int = 0) -> int:
        return _check(lib.dp_card_add(self._live(), fd, fake_write_fd, fake_delay_ns), "adding a card")

    def add_output(self, card: int, crtc_id: int, plane_id: int, fb_prop_id: int) -> int:
        return _check(lib.dp_output_add(self._live(), card, crtc_id, plane_id, fb_prop_id),
                      "adding an output")

    def show(self, output: int, conn: int, on_screen: int = -1, frame: int = 0) -> None:
        _check(lib.dp_output_show(self._live(), output, conn, on_screen, frame), f"output {output}: show")

    def release_output(self, output: int) -> Held:
        _check(lib.dp_output_release(self._live(), output, self._state), f"output {output}: release")
        s = self._state
        return Held(s.on_screen, s.on_screen_frame, s.in_flight, s.in_flight_frame, s.pending,
                    s.pending_frame, s.in_flight_token, bool(s.in_flight_presented),
                    bool(s.pending_presented), bool(s.cursor_pending),
                    int(s.cursor_fb) if s.cursor_committed else None)

    CURSOR_PROPS = ("FB_ID", "CRTC_ID", "SRC_X", "SRC_Y", "SRC_W", "SRC_H", "CRTC_X", "CRTC_Y", "CRTC_W",
                    "CRTC_H")

    def set_cursor(self, output: int, plane_id: int, props: list[int], values: list[int]) -> None:
        """The output's cursor plane state: plane `plane_id`, the ids of its CURSOR_PROPS and their
        values (FB_ID and CRTC_ID 0: off). Committed with the output's next frame, or alone at once
        when its CRTC is idle; the latest state wins."""
        if len(props) != len(self.CURSOR_PROPS) or len(values) != len(self.CURSOR_PROPS):
            raise ValueError(f"a cursor state has {len(self.CURSOR_PROPS)} properties")
        self._cursor_props[0:len(props)] = props
        self._cursor_values[0:len(values)] = [v & 0xFFFFFFFFFFFFFFFF for v in values]
        _check(lib.dp_output_cursor(self._live(), output, plane_id, self._cursor_props,
                                    self._cursor_values), f"output {output}: cursor")

    def watch(self, output: int, watch: bool = True) -> None:
        _check(lib.dp_output_watch(self._live(), output, int(watch)), f"output {output}: watch")

    def remove_output(self, output: int) -> None:
        _check(lib.dp_output_remove(self._live(), output), f"output {output}: remove")

    def stats(self, output: int) -> OutputStats:
        _check(lib.dp_output_stats(self._live(), output, self._stats), f"output {output}: stats")
        s = self._stats
        return OutputStats(s.frames, s.commits, s.presented, s.dropped, s.errors, s.busy, s.max_in_flight,
                           s.max_pending, bool(s.in_flight),
                           bool(s.pending), s.on_screen_buffer, s.on_screen_frame,
                           ffi.unpack(s.commit_delay_ns, SAMPLES), ffi.unpack(s.latency_ns, SAMPLES),
                           ffi.unpack(s.present_ns, SAMPLES))

    @staticmethod
    def samples(stats: OutputStats, since: int = 0) -> list[tuple[int, int, int]]:
        """(commit delay, latency, present time) in ns of the frames presented from number `since`
        on, oldest first, as far as the newest SAMPLES reach back."""
        first = max(since, stats.presented - SAMPLES)
        return [(stats.commit_delay_ns[i], stats.latency_ns[i], stats.present_ns[i])
                for i in (k % SAMPLES for k in range(first, stats.presented))]

    # --- connections

    def add_conn(self, fd: int) -> int:
        return _check(lib.dp_conn_add(self._live(), fd), "adding a connection")

    def remove_conn(self, conn: int) -> list[int]:
        """Stop serving `conn`; the descriptors it received that Python had not taken yet, now the
        caller's (let them go through compositor.fdguard.discard: nothing has looked at them)."""
        n = _check(lib.dp_conn_remove(self._live(), conn, self._take_fds, lib.DP_MAX_FDS),
                   f"connection {conn}: remove")
        return [self._take_fds[i] for i in range(n)]

    def take(self, conn: int) -> Taken:
        """Everything a DP_EV_DATA handed over, in one piece."""
        data = bytearray()
        fds: list[int] = []
        fds_from, eof, lost = 0, False, False
        while True:
            n = _check(lib.dp_conn_take(self._live(), conn, self._take_buf, len(self._take_buf),
                                        self._take_fds, lib.DP_MAX_FDS, self._take_n, self._take_from,
                                        self._take_flags),
                       f"connection {conn}: take")
            if self._take_n[0]:
                fds.extend(self._take_fds[i] for i in range(self._take_n[0]))
                fds_from = len(data) + self._take_from[0]
            data += ffi.buffer(self._take_buf, n)
            eof = bool(self._take_flags[0] & 1)
            lost = lost or bool(self._take_flags[0] & 2)
            if n < len(self._take_buf):
                return Taken(bytes(data), fds, fds_from, eof, lost)

    def pause(self, conn: int) -> None:
        _check(lib.dp_conn_pause(self._live(), conn), f"connection {conn}: pause")

    def resume(self, conn: int, fast: bool) -> None:
        _check(lib.dp_conn_resume(self._live(), conn, int(fast)), f"connection {conn}: resume")

    def send(self, conn: int, data: bytes, *, drained: bool = False) -> int:
        """Queue bytes for the client; the bytes queued in all. OSError ENOBUFS: it does not read."""
        return _check(lib.dp_conn_send(self._live(), conn, data, len(data), int(drained)),
                      f"connection {conn}: send")

    def latest(self, conn: int) -> tuple[int, int, bool]:
        """The guest's latest frame: buffer handle (-1: none), frame number, whether presented."""
        buf, frame, presented = ffi.new("int *"), ffi.new("uint64_t *"), ffi.new("int *")
        _check(lib.dp_conn_latest(self._live(), conn, buf, frame, presented), f"connection {conn}: latest")
        return buf[0], frame[0], bool(presented[0])

    def flips(self, conn: int) -> int:
        """The guest's flips the data plane read and showed itself (not those handed to Python)."""
        return _check(lib.dp_conn_flips(self._live(), conn), f"connection {conn}: flips")

    def conn_show(self, conn: int) -> int:
        """The guest's flips go to every output that shows it, from now on; how many."""
        return _check(lib.dp_conn_show(self._live(), conn), f"connection {conn}: show")

    def set_latest(self, conn: int, buffer: int, frame: int, layout: int) -> None:
        _check(lib.dp_conn_set_latest(self._live(), conn, buffer, frame, layout),
               f"connection {conn}: latest")

    # --- buffers

    def add_buffer(self, conn: int, buffer_id: int, layout: int) -> int:
        return _check(lib.dp_buffer_add(self._live(), conn, buffer_id, layout), f"buffer {buffer_id}: add")

    def set_fb(self, buffer: int, output: int, fb_id: int) -> None:
        _check(lib.dp_buffer_fb(self._live(), buffer, output, fb_id), f"buffer {buffer}: framebuffer")

    def forget(self, buffer: int) -> None:
        _check(lib.dp_buffer_forget(self._live(), buffer), f"buffer {buffer}: forget")

    def hold(self, buffer: int) -> int:
        return _check(lib.dp_buffer_hold(self._live(), buffer), f"buffer {buffer}: hold")

    def release(self, buffer: int) -> int:
        return _check(lib.dp_buffer_release(self._live(), buffer), f"buffer {buffer}: release")

    def holds(self, buffer: int) -> int:
        return _check(lib.dp_buffer_holds(self._live(), buffer), f"buffer {buffer}: holds")

    def flip(self, conn: int, buffer: int, frame: int, received_ns: int) -> None:
        _check(lib.dp_flip(self._live(), conn, buffer, frame, received_ns), f"buffer {buffer}: flip")

    def add_local(self) -> int:
        """A connection for a source Python reads itself (a QEMU display): frames with flip()."""
        return _check(lib.dp_local_add(self._live()), "adding a source")

    # --- vGPUs

    def add_vgpu(self, device_fd: int, period_ns: int, cursor: bool) -> int:
        """A vGPU's connection (paused: Python polls it until resume)."""
        return _check(lib.dp_vgpu_add(self._live(), device_fd, period_ns, int(cursor)), "adding a vGPU")

    def vgpu_set(self, conn: int, period_ns: int, cursor: bool) -> None:
        _check(lib.dp_vgpu_set(self._live(), conn, period_ns, int(cursor)), f"vGPU {conn}: set")

    def buffer_plane(self, buffer: int, fourcc: int, modifier: int, width: int, height: int,
                     stride: int) -> None:
        _check(lib.dp_buffer_plane(self._live(), buffer, fourcc, modifier, width, height, stride),
               f"buffer {buffer}: plane")


__all__ = ["DataPlane", "Event", "Held", "Taken", "OutputStats", "DATA", "CLOSED", "FLIP", "FREED",
           "PRESENTED", "ERROR", "DRAINED", "MAX_OUTPUTS", "MAX_OUT", "TOKEN_BIT"]
