"""kms_drain_events (native/kms_helpers.c) on a pipe carrying DRM event records exactly as the
kernel writes them on a DRM fd: struct drm_event_vblank { drm_event {u32 type, length}; u64 user_data;
u32 tv_sec, tv_usec, sequence, crtc_id; }."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from compositor._native import ffi, lib

DRM_EVENT_VBLANK = 0x01
DRM_EVENT_FLIP_COMPLETE = 0x02


def event(kind, user_data, sec, usec, seq, crtc):
    return struct.pack("<IIQIIII", kind, 32, user_data, sec, usec, seq, crtc)


@pytest.fixture
def pipe():
    r, w = os.pipe2(os.O_NONBLOCK)
    yield r, w
    os.close(r)
    os.close(w)


def drain(fd, max_events=64):
    out = ffi.new(f"struct kms_flip_event[{max_events}]")
    dropped = ffi.new("int *")
    n = lib.kms_drain_events(fd, out, max_events, dropped)
    return n, [(out[i].crtc_id, out[i].sequence, out[i].timestamp_ns, out[i].user_data)
               for i in range(max(n, 0))], dropped[0]


def test_flip_events_come_back_with_crtc_time_and_user_data(pipe):
    r, w = pipe
    os.write(w, event(DRM_EVENT_FLIP_COMPLETE, 4242, 10, 500, 7, 41)
             + event(DRM_EVENT_VBLANK, 1, 0, 0, 0, 41)          # not requested by us: ignored
             + event(DRM_EVENT_FLIP_COMPLETE, 2**40 + 3, 11, 0, 8, 55))
    n, events, dropped = drain(r)
    assert n == 2 and dropped == 0
    assert events == [(41, 7, 10_000_500_000, 4242), (55, 8, 11_000_000_000, 2**40 + 3)]


def test_nothing_pending_is_zero_not_an_error(pipe):
    assert drain(pipe[0])[0] == 0


def test_overflow_is_counted_not_lost_silently(pipe):
    r, w = pipe
    os.write(w, b"".join(event(DRM_EVENT_FLIP_COMPLETE, i, 1, 0, i, 30 + i) for i in range(5)))
    n, events, dropped = drain(r, max_events=3)
    assert n == 3 and dropped == 2
    assert [e[3] for e in events] == [0, 1, 2]


def test_read_error_is_negative_errno():
    n, _, _ = drain(12345)   # not an open fd
    assert n == -errno.EBADF


def test_kms_flip_on_a_non_drm_fd_returns_negative_errno(pipe):
    ret = lib.kms_flip(pipe[0], 1, 2, 3, 0)
    assert ret < 0 and -ret in (errno.ENOTTY, errno.EINVAL)
