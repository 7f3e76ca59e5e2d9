"""VfioGuest's bookkeeping on a fake device: one dma-buf per dmabuf_id, reuse without a second
GET_GFX_DMABUF, bounded memory of old ids, region planes as copy-only buffers, disabled planes.
The ioctls themselves run against mbochs and mdpy in the lab (tests/lab/guest/test_vfio.py)."""

from __future__ import annotations

import os

import pytest

from compositor.kms.fourcc import fourcc
from compositor.sources.frame import BadPlane
from compositor.sources.vfio import (
    MAX_KEPT_DMABUFS,
    VFIO_GFX_PLANE_TYPE_DMABUF,
    VFIO_GFX_PLANE_TYPE_REGION,
    GfxPlane,
    VfioGuest,
)

XR24 = fourcc("XR24")


def plane(ident: int, w: int = 640, h: int = 480, kind: int = VFIO_GFX_PLANE_TYPE_DMABUF, enabled=True):
    if not enabled:
        return GfxPlane(kind, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, ident)
    return GfxPlane(kind, 1, XR24, 0, w, h, w * 4, w * h * 4, 0, 0, 0, 0, ident)


class FakeDevice:
    name = "fake-vgpu"

    def __init__(self) -> None:
        self.plane = plane(1)
        self.exports: list[int] = []
        self.fd = os.memfd_create("vgpu-device")
        os.ftruncate(self.fd, 1 << 22)
        self.closed = False

    def query(self):
        return self.plane

    def get_dmabuf(self, p: GfxPlane):
        self.exports.append(p.ident)
        fd = os.memfd_create(f"dmabuf-{p.ident}")
        os.ftruncate(fd, p.size)
        info = p.plane_info()
        info.validate(p.size)
        return fd, info

    def region_plane(self, p: GfxPlane):
        info = p.plane_info()
        info.validate(1 << 21)
        return self.fd, info, 4096

    def close(self) -> None:
        self.closed = True
        os.close(self.fd)


@pytest.fixture
def guest():
    g = VfioGuest("office", FakeDevice())
    yield g
    g.close()
    for b in list(g.buffers.values()) + g.evicted():
        b.close()


def test_a_dmabuf_id_is_fetched_once_and_reused(guest):
    first = guest.poll()
    second = guest.poll()
    assert first.buffer is second.buffer and first is not second  # a new frame of the same buffer
    assert guest.device.exports == [1]  # GET_GFX_DMABUF once for id 1


def test_a_new_mode_brings_a_new_buffer_and_old_ids_are_bounded(guest):
    seen = []
    for ident in range(1, MAX_KEPT_DMABUFS + 3):
        guest.device.plane = plane(ident, 640 + 16 * ident)
        seen.append(guest.poll().buffer)
    assert len(guest.buffers) == MAX_KEPT_DMABUFS
    evicted = guest.evicted()
    assert [b.id for b in evicted] == [1, 2]  # least recently queried first
    guest.device.plane = plane(3, 640 + 16 * 3)
    assert guest.poll().buffer is seen[2] and guest.device.exports.count(3) == 1
    for b in evicted:
        b.close()


def test_disabled_plane_gives_no_frame(guest):
    guest.device.plane = plane(0, enabled=False)
    assert guest.poll() is None
    assert guest.plane.describe() == "disabled"


def test_region_plane_is_a_copy_only_buffer_at_the_region_offset(guest):
    guest.device.plane = plane(16, kind=VFIO_GFX_PLANE_TYPE_REGION)
    frame = guest.poll()
    assert frame.buffer.copy_only and "region" in frame.buffer.copy_only
    assert frame.buffer.mmap_offset == 4096
    assert guest.poll().buffer is frame.buffer  # same layout: same buffer


def test_a_plane_larger_than_its_dmabuf_is_refused(guest):
    bad = plane(9)
    guest.device.plane = GfxPlane(bad.kind, 1, XR24, 0, 640, 480, 100, bad.size, 0, 0, 0, 0, 9)
    with pytest.raises(BadPlane, match="stride 100 is shorter"):
        guest.poll()
    assert 9 not in guest.buffers
