"""compositor.fdguard: what a descriptor is, told from /proc alone, and refused ones let go."""

from __future__ import annotations

import os
import socket

import pytest

from compositor import fdguard
from compositor.fdguard import Kind


def test_a_memfd_is_a_memfd():
    fd = os.memfd_create("guest-buffer", os.MFD_CLOEXEC)
    try:
        described = fdguard.classify(fd)
        assert described.kind is Kind.MEMFD and str(described) == "a memfd"
    finally:
        os.close(fd)


@pytest.mark.parametrize("make, link", [
    (lambda: os.pipe()[0], "pipe:["),
    (lambda: socket.socketpair()[0].detach(), "socket:["),
    (lambda: os.eventfd(0), "anon_inode:[eventfd]"),
    (lambda: os.open("/dev/null", os.O_RDONLY), "/dev/null"),
    (lambda: os.open("/", os.O_RDONLY | os.O_DIRECTORY), "/"),
])
def test_anything_else_is_other_and_named_by_its_link(make, link):
    fd = make()
    try:
        described = fdguard.classify(fd)
        assert described.kind is Kind.OTHER and str(described).startswith(link), described
        with pytest.raises(fdguard.BadDescriptor,
                           match=r"buffer 1's descriptor is .*, not a dma-buf or memfd"):
            fdguard.expect(fd, {Kind.DMABUF, Kind.MEMFD}, "buffer 1's descriptor")
    finally:
        os.close(fd)


@pytest.mark.skipif(os.getuid() != 0, reason="making a file at / needs root")
def test_a_real_file_named_like_a_memfd_is_not_one():
    # Its link reads "/memfd:…" as a memfd's does, but it lives on a real mount, not the kernel's
    # internal shmem mount.
    path = "/memfd:directflip-spoof (deleted)"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
        assert fdguard.classify(fd).kind is Kind.OTHER
    finally:
        os.close(fd)
        os.unlink(path)


def test_a_closed_descriptor_cannot_be_inspected():
    fd = os.memfd_create("gone")
    os.close(fd)
    with pytest.raises(fdguard.BadDescriptor, match="the descriptor cannot be inspected"):
        fdguard.expect(fd, {Kind.MEMFD}, "the descriptor")


def test_discard_closes_safe_kinds_at_once_and_others_on_its_thread():
    quarantine = fdguard.Quarantine()
    memfd = os.memfd_create("x")
    r, w = os.pipe()
    other = os.open("/dev/null", os.O_RDONLY)
    quarantine.discard(memfd, "test")
    quarantine.discard(r, "test")
    assert not os.path.exists(f"/proc/self/fd/{memfd}") and not os.path.exists(f"/proc/self/fd/{r}")
    quarantine.discard(other, "test")
    assert quarantine.wait_idle(10)
    assert quarantine.discarded == 1 and not os.path.exists(f"/proc/self/fd/{other}")
    os.close(w)
