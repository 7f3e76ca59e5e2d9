"""VfioGuest's bookkeeping on a fake device: one dma-buf per dmabuf_id, reuse without a second
GET_GFX_DMABUF, bounded memory of old ids, region planes as copy-only buffers, disabled planes.
The ioctls themselves run against mbochs and mdpy in the lab (tests/lab/guest/test_vfio.py)."""

from __future__ import annotations

import os

import pytest

from compositor.formats import fourcc
from compositor.sources.frame import BadPlane
from compositor.sources.vfio import (
    DRM_PLANE_TYPE_CURSOR,
    DRM_PLANE_TYPE_PRIMARY,
    MAX_KEPT_DMABUFS,
    VFIO_GFX_PLANE_TYPE_DMABUF,
    VFIO_GFX_PLANE_TYPE_REGION,
    GfxPlane,
    VfioError,
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


# --- the cursor plane ---------------------------------------------------------------------------

AR24 = fourcc("AR24")


class CursorDevice(FakeDevice):
    """A vGPU with a cursor plane (as GVT-g has): `cursor` is what a cursor query answers."""

    def __init__(self) -> None:
        super().__init__()
        self.cursor: GfxPlane | Exception = cursor_plane(7)
        self.pixels: dict[int, bytes] = {}

    def query(self, plane_type: int = DRM_PLANE_TYPE_PRIMARY):
        if plane_type == DRM_PLANE_TYPE_PRIMARY:
            return self.plane
        if isinstance(self.cursor, Exception):
            raise self.cursor
        return self.cursor

    def get_dmabuf(self, p: GfxPlane):
        if p.plane_type != DRM_PLANE_TYPE_CURSOR:
            return super().get_dmabuf(p)
        self.exports.append(p.ident)
        fd = os.memfd_create(f"cursor-{p.ident}")
        os.pwrite(fd, self.pixels.get(p.ident, bytes(p.size)), 0)
        return fd, p.plane_info()


def cursor_plane(ident: int, x: int = 100, y: int = 50, hot: tuple[int, int] = (3, 4), enabled: bool = True,
                 w: int = 8, h: int = 8, fmt: int = AR24) -> GfxPlane:
    if not enabled:
        return GfxPlane(VFIO_GFX_PLANE_TYPE_DMABUF, DRM_PLANE_TYPE_CURSOR, 0, 0, 0, 0, 0, 0, x, y, 0, 0,
                        ident)
    return GfxPlane(VFIO_GFX_PLANE_TYPE_DMABUF, DRM_PLANE_TYPE_CURSOR, fmt, 0, w, h, w * 4, w * h * 4,
                    x, y, *hot, ident)


@pytest.fixture
def cursor_guest():
    g = VfioGuest("office", CursorDevice())
    yield g
    g.close()


def test_the_cursor_plane_gives_image_and_hot_spot_position(cursor_guest):
    dev = cursor_guest.device
    dev.pixels[7] = bytes(range(256)) * 1
    assert cursor_guest.poll_cursor()
    c, p = cursor_guest.cursor, cursor_guest.pointer
    assert (c.width, c.height, c.hot_x, c.hot_y) == (8, 8, 3, 4) and c.pixels == bytes(range(256))
    assert (p.x, p.y, p.visible) == (103, 54, True)
    assert not cursor_guest.poll_cursor()          # nothing changed: no update, no second export
    assert dev.exports == [7]
    dev.cursor = cursor_plane(7, x=0xFFFFFFFE, y=10)  # two pixels off the left edge
    assert cursor_guest.poll_cursor() and cursor_guest.pointer.x == 1 and cursor_guest.cursor is c


def test_new_pixels_in_the_same_dmabuf_are_a_new_image(cursor_guest):
    cursor_guest.poll_cursor()
    first = cursor_guest.cursor
    os.pwrite(cursor_guest._cursor_fds[7][0], b"\xff" * 4, 0)   # the guest draws in place
    assert cursor_guest.poll_cursor() and cursor_guest.cursor.serial == first.serial + 1


def test_a_hidden_cursor_hides_the_pointer(cursor_guest):
    cursor_guest.poll_cursor()
    cursor_guest.device.cursor = cursor_plane(7, enabled=False)
    assert cursor_guest.poll_cursor() and cursor_guest.pointer.visible is False


@pytest.mark.parametrize("answer, why", [
    (VfioError(22, "VFIO_DEVICE_QUERY_GFX_PLANE (cursor): Invalid argument"), "refused"),
    (cursor_plane(1, w=640, h=480, fmt=XR24), "not an ARGB8888 image"),   # mbochs: its primary plane
])
def test_a_vgpu_without_a_cursor_plane_is_asked_once(cursor_guest, answer, why):
    cursor_guest.device.cursor = answer
    assert not cursor_guest.poll_cursor()
    assert why in cursor_guest.cursor_unsupported
    cursor_guest.device.cursor = cursor_plane(7)
    assert not cursor_guest.poll_cursor() and cursor_guest.cursor is None


def test_gvt_answers_enodev_while_the_cursor_is_off_and_it_is_asked_again(cursor_guest):
    cursor_guest.poll_cursor()
    cursor_guest.device.cursor = VfioError(19, "VFIO_DEVICE_QUERY_GFX_PLANE (cursor): No such device")
    assert cursor_guest.poll_cursor() and cursor_guest.pointer.visible is False
    assert cursor_guest.cursor_unsupported is None and cursor_guest.cursor_off
    cursor_guest.device.cursor = cursor_plane(7)
    assert cursor_guest.poll_cursor() and cursor_guest.pointer.visible
