"""VFIO mediated devices (vGPUs) as guest sources: the kernel's gfx-plane interface.

A vGPU (Intel GVT-g, the mbochs and mdpy samples, vendors' SR-IOV/mdev drivers) describes the plane its
guest scans out when asked with VFIO_DEVICE_QUERY_GFX_PLANE. Two kinds exist:

- DMABUF: the answer carries a `dmabuf_id` naming the buffer; VFIO_DEVICE_GET_GFX_DMABUF turns a new id
  into a dma-buf fd once, and a known id is shown again without any ioctl beyond the query. The
  dma-buf goes to the scanout pipeline, zero copy where the display card imports it;
- REGION: the plane lies in a device region (mdpy); the compositor maps the region and copies.

Mainline has no flip notification for these planes (no eventfd, no display IRQ), so a consumer polls;
directflip polls once per refresh of the output that shows the guest, not on a fixed 30 ms timer.

The ioctls and structures follow include/uapi/linux/vfio.h; struct vfio_device_gfx_plane_info is 64
bytes in current kernels (kernels accept argsz >= 60).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compositor.formats import ARGB8888, fourcc_name
from compositor.sources import SourceDefaults
from compositor.sources.frame import (
    MAX_CURSOR,
    BadPlane,
    Buffer,
    Cursor,
    Frame,
    PlaneInfo,
    Pointer,
    dmabuf_size,
)

log = logging.getLogger("directflip.vfio")

MDEV_DEVICES = Path("/sys/bus/mdev/devices")

# _IO(';', 100 + n)
_VFIO_BASE = ord(";") << 8
VFIO_SET_IOMMU = _VFIO_BASE | 102
VFIO_GROUP_SET_CONTAINER = _VFIO_BASE | 104
VFIO_GROUP_GET_DEVICE_FD = _VFIO_BASE | 106
VFIO_DEVICE_GET_INFO = _VFIO_BASE | 107
VFIO_DEVICE_GET_REGION_INFO = _VFIO_BASE | 108
VFIO_DEVICE_QUERY_GFX_PLANE = _VFIO_BASE | 114
VFIO_DEVICE_GET_GFX_DMABUF = _VFIO_BASE | 115

VFIO_TYPE1v2_IOMMU = 3
VFIO_GFX_PLANE_TYPE_PROBE, VFIO_GFX_PLANE_TYPE_DMABUF, VFIO_GFX_PLANE_TYPE_REGION = 1, 2, 4
DRM_PLANE_TYPE_PRIMARY, DRM_PLANE_TYPE_CURSOR = 1, 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3
VFIO_REGION_INFO_CAP_TYPE = 2  # (1 is SPARSE_MMAP)
VFIO_REGION_TYPE_GFX, VFIO_REGION_SUBTYPE_GFX_EDID = 1, 1
VFIO_DEVICE_GFX_LINK_STATE_UP, VFIO_DEVICE_GFX_LINK_STATE_DOWN = 1, 2

PLANE_INFO_SIZE = 64
_PLANE = struct.Struct("<IIIIQIIIIIIIIII")  # argsz..y_hot, then the region_index/dmabuf_id union, reserved
assert _PLANE.size == PLANE_INFO_SIZE

_libc = ctypes.CDLL(None, use_errno=True)


class VfioError(OSError):
    """A VFIO call failed; the message names the ioctl and the device."""


def _ioctl(fd: int, request: int, arg, what: str) -> int:
    ret = _libc.ioctl(fd, request, arg)
    if ret < 0:
        err = ctypes.get_errno()
        raise VfioError(err, f"{what}: {os.strerror(err)}")
    return ret


@dataclass(frozen=True)
class Mdev:
    """A mediated device as sysfs shows it."""

    uuid: str
    type: str        # e.g. mbochs-small, mdpy-vga, i915-GVTg_V5_4
    parent: str      # the parent device's sysfs name (mbochs, 0000:00:02.0)
    iommu_group: int


def discover(root: Path = MDEV_DEVICES) -> list[Mdev]:
    """Every mdev that exists now, by UUID."""
    found = []
    try:
        entries = sorted(root.iterdir())
    except FileNotFoundError:
        return []
    for dev in entries:
        try:
            mdev_type = os.path.basename(os.readlink(dev / "mdev_type"))
            parent = os.path.basename(os.path.dirname(os.path.realpath(dev)))
            group = int(os.path.basename(os.readlink(dev / "iommu_group")))
        except (OSError, ValueError):
            continue
        found.append(Mdev(dev.name, mdev_type, parent, group))
    return found


@dataclass(frozen=True)
class GfxPlane:
    """One answer of VFIO_DEVICE_QUERY_GFX_PLANE. `enabled` is False for a disabled plane (the
    kernel answers success with zero format and size)."""

    kind: int  # VFIO_GFX_PLANE_TYPE_DMABUF or _REGION
    plane_type: int
    fourcc: int
    modifier: int
    width: int
    height: int
    stride: int
    size: int
    x: int
    y: int
    x_hot: int
    y_hot: int
    ident: int  # dmabuf_id (DMABUF) or region_index (REGION)

    @property
    def enabled(self) -> bool:
        return bool(self.fourcc and self.width and self.height and self.size)

    def plane_info(self, offset: int = 0) -> PlaneInfo:
        return PlaneInfo(self.fourcc, self.width, self.height, self.stride, offset, self.modifier)

    def describe(self) -> str:
        if not self.enabled:
            return "disabled"
        return f"{self.width}x{self.height} {fourcc_name(self.fourcc)} stride {self.stride} size {self.size}"


@dataclass(frozen=True)
class Region:
    index: int
    flags: int
    size: int
    offset: int  # in the device fd's file offsets
    type: tuple[int, int] | None = None  # (type, subtype) from the region's capability chain


class VfioDevice:
    """An open VFIO device fd, from a group (`open(uuid)`) or handed over (`VfioDevice(fd)`)."""

    def __init__(self, fd: int, name: str, *, owned: tuple[int, ...] = ()) -> None:
        self.fd = fd
        self.name = name
        self._owned = owned  # the container and group fds kept open with it
        self.kind: int | None = None  # the plane kind the device offers, after probe()

    @classmethod
    def open(cls, uuid: str, root: Path = MDEV_DEVICES) -> VfioDevice:
        """Open an mdev by UUID through its IOMMU group and a type1v2 container."""
        dev = root / uuid
        if not dev.exists():
            raise VfioError(errno.ENOENT, f"no mediated device {uuid} (is it created? see "
                            f"/sys/class/mdev_bus/*/mdev_supported_types/*/create)")
        group_no = os.path.basename(os.readlink(dev / "iommu_group"))
        fds: list[int] = []
        try:
            container = os.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
            fds.append(container)
            try:
                group = os.open(f"/dev/vfio/{group_no}", os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise VfioError(exc.errno, f"/dev/vfio/{group_no} (mdev {uuid}): {exc.strerror}; "
                                f"is the group held by another process (a running VM)?") from None
            fds.append(group)
            _ioctl(group, VFIO_GROUP_SET_CONTAINER, ctypes.byref(ctypes.c_int(container)),
                   f"VFIO_GROUP_SET_CONTAINER ({uuid})")
            _ioctl(container, VFIO_SET_IOMMU, ctypes.c_ulong(VFIO_TYPE1v2_IOMMU),
                   f"VFIO_SET_IOMMU ({uuid})")
            fd = _ioctl(group, VFIO_GROUP_GET_DEVICE_FD, ctypes.c_char_p(uuid.encode()),
                        f"VFIO_GROUP_GET_DEVICE_FD ({uuid})")
        except BaseException:
            for f in reversed(fds):
                os.close(f)
            raise
        os.set_inheritable(fd, False)
        return cls(fd, uuid, owned=tuple(fds))

    def dup(self) -> int:
        """A duplicate of the device fd, for a VMM this process launches or another process."""
        return os.dup(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for f in reversed(self._owned):
            os.close(f)
        self._owned = ()

    # --- regions ---------------------------------------------------------------------------------

    def region(self, index: int) -> Region:
        # Ask with the plain struct; a region with capabilities answers with the argsz it needs
        # (some drivers, mbochs among them, refuse an argsz larger than theirs), then ask again.
        size = 32
        while True:
            buf = ctypes.create_string_buffer(struct.pack("<IIIIQQ", size, 0, index, 0, 0, 0), size)
            _ioctl(self.fd, VFIO_DEVICE_GET_REGION_INFO, buf,
                   f"VFIO_DEVICE_GET_REGION_INFO {index} ({self.name})")
            argsz = struct.unpack_from("<I", buf.raw, 0)[0]
            if argsz <= size or size > 32:
                break
            size = min(argsz, 4096)
        argsz, flags, _, cap_offset, rsize, offset = struct.unpack_from("<IIIIQQ", buf.raw, 0)
        rtype = None
        if flags & VFIO_REGION_INFO_FLAG_CAPS and cap_offset:
            pos, seen = cap_offset, 0
            while pos and pos + 8 <= min(argsz, size) and seen < 16:
                cap_id, _version, nxt = struct.unpack_from("<HHI", buf.raw, pos)
                if cap_id == VFIO_REGION_INFO_CAP_TYPE and pos + 16 <= size:
                    rtype = struct.unpack_from("<II", buf.raw, pos + 8)
                pos, seen = nxt, seen + 1
        return Region(index, flags, rsize, offset, rtype)

    def num_regions(self) -> int:
        buf = ctypes.create_string_buffer(struct.pack("<IIII", 16, 0, 0, 0), 16)
        _ioctl(self.fd, VFIO_DEVICE_GET_INFO, buf, f"VFIO_DEVICE_GET_INFO ({self.name})")
        return struct.unpack_from("<I", buf.raw, 8)[0]

    def edid_region(self) -> Region | None:
        """The GFX EDID region (VFIO_REGION_SUBTYPE_GFX_EDID), if the vGPU has one."""
        for index in range(self.num_regions()):
            try:
                region = self.region(index)
            except VfioError:
                continue
            if region.type == (VFIO_REGION_TYPE_GFX, VFIO_REGION_SUBTYPE_GFX_EDID):
                return region
        return None

    # --- planes ----------------------------------------------------------------------------------

    def probe(self) -> int:
        """Which plane kind the device offers: VFIO_GFX_PLANE_TYPE_DMABUF or _REGION."""
        for kind in (VFIO_GFX_PLANE_TYPE_DMABUF, VFIO_GFX_PLANE_TYPE_REGION):
            buf = self._plane_buf(VFIO_GFX_PLANE_TYPE_PROBE | kind, DRM_PLANE_TYPE_PRIMARY)
            if _libc.ioctl(self.fd, VFIO_DEVICE_QUERY_GFX_PLANE, buf) == 0:
                self.kind = kind
                return kind
        err = ctypes.get_errno()
        raise VfioError(err, f"{self.name} offers neither dma-buf nor region display planes "
                        f"(VFIO_DEVICE_QUERY_GFX_PLANE probe: {os.strerror(err)}); it has no display")

    @staticmethod
    def _plane_buf(flags: int, plane_type: int):
        return ctypes.create_string_buffer(_PLANE.pack(PLANE_INFO_SIZE, flags, plane_type, *([0] * 12)),
                                           PLANE_INFO_SIZE)

    def query(self, plane_type: int = DRM_PLANE_TYPE_PRIMARY, retries: int = 2) -> GfxPlane:
        """The current plane. ENOMEM (stock mbochs answers the first query so) is retried."""
        if self.kind is None:
            self.probe()
        for attempt in range(retries + 1):
            buf = self._plane_buf(self.kind, plane_type)
            if _libc.ioctl(self.fd, VFIO_DEVICE_QUERY_GFX_PLANE, buf) == 0:
                f = _PLANE.unpack(buf.raw)
                return GfxPlane(self.kind, f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[11],
                                f[12], f[13])
            err = ctypes.get_errno()
            if err != errno.ENOMEM or attempt == retries:
                what = "primary" if plane_type == DRM_PLANE_TYPE_PRIMARY else "cursor"
                tail = f" after {retries} retries" if err == errno.ENOMEM else ""
                raise VfioError(err, f"VFIO_DEVICE_QUERY_GFX_PLANE ({what}) on {self.name}: "
                                f"{os.strerror(err)}{tail}")
            log.info("%s: plane query answered ENOMEM; retrying", self.name)
        raise AssertionError("unreachable")

    def get_dmabuf(self, plane: GfxPlane) -> tuple[int, PlaneInfo]:
        """The dma-buf of a DMABUF plane and its layout, checked against the dma-buf's real size."""
        fd = _ioctl(self.fd, VFIO_DEVICE_GET_GFX_DMABUF, ctypes.byref(ctypes.c_uint32(plane.ident)),
                    f"VFIO_DEVICE_GET_GFX_DMABUF {plane.ident} ({self.name})")
        try:
            info = plane.plane_info()
            info.validate(dmabuf_size(fd))
        except (BadPlane, OSError):
            os.close(fd)
            raise
        os.set_inheritable(fd, False)
        return fd, info

    def region_plane(self, plane: GfxPlane) -> tuple[int, PlaneInfo, int]:
        """For a REGION plane: an fd to map, the layout, and the file offset the layout starts at."""
        region = self.region(plane.ident)
        info = plane.plane_info()
        info.validate(region.size)
        # The copy maps [offset, offset + span) of the device fd: mmap takes only page-aligned offsets
        # below 2**63 (beyond, Python raises OverflowError, which no copy path expects).
        if region.offset % mmap.ALLOCATIONGRANULARITY or region.offset + info.span >= 2**63:
            raise VfioError(errno.EINVAL, f"{self.name}: region {plane.ident} at offset {region.offset:#x} "
                            "cannot be mapped (not page-aligned, or past the largest file offset)")
        return self.fd, info, region.offset

    # --- EDID --------------------------------------------------------------------------------------

    def write_edid(self, edid: bytes | None) -> None:
        """Show the guest this monitor: link down, the EDID blob, link up (None: link down only)."""
        region = self.edid_region()
        if region is None:
            raise VfioError(errno.ENOTSUP, f"{self.name} has no EDID region")
        base = region.offset
        edid_offset, max_size = struct.unpack("<II", os.pread(self.fd, 8, base))
        os.pwrite(self.fd, struct.pack("<I", VFIO_DEVICE_GFX_LINK_STATE_DOWN), base + 20)
        if edid is None:
            return
        if len(edid) > max_size:
            raise VfioError(errno.EINVAL, f"EDID of {len(edid)} bytes does not fit {self.name}'s "
                            f"{max_size}-byte EDID region")
        os.pwrite(self.fd, edid, base + edid_offset)
        os.pwrite(self.fd, struct.pack("<I", len(edid)), base + 8)
        os.pwrite(self.fd, struct.pack("<I", VFIO_DEVICE_GFX_LINK_STATE_UP), base + 20)

    def read_edid(self) -> tuple[bytes, int]:
        """(EDID blob, link state) as the EDID region holds them."""
        region = self.edid_region()
        if region is None:
            raise VfioError(errno.ENOTSUP, f"{self.name} has no EDID region")
        regs = os.pread(self.fd, 24, region.offset)
        edid_offset, _max, size, _xres, _yres, link = struct.unpack("<IIIIII", regs)
        return os.pread(self.fd, size, region.offset + edid_offset), link


# ------------------------------------------------------------------------------------ the guest

MAX_KEPT_DMABUFS = 4  # dma-bufs of ids not queried lately are dropped beyond this many
NO_HOTSPOT = 0xFFFFFFFF  # x_hot/y_hot of a cursor plane without a hot spot (vfio.h)


def _signed(value: int) -> int:
    """x_pos/y_pos are __u32 in the uapi, but a cursor partly off the top or left is negative."""
    return value - (1 << 32) if value >= 1 << 31 else value


class VfioGuest(SourceDefaults):
    """A vGPU as the daemon sees a guest: it has the same face as a frame-socket connection (name,
    uuid, peer, buffers, released/presented, closed), but its frames come from polling the device.

    `poll()` returns the Frame to show, or None while the guest's display is off. A DMABUF plane's
    dma-buf is fetched once per `dmabuf_id` and reused; ids not seen lately are handed back by
    `evicted()` for the daemon to free once off screen. A REGION plane becomes a copy-only buffer on
    the device fd at the region's offset."""

    kind = "vfio"

    def __init__(self, name: str, device: VfioDevice, *, uuid: str | None = None, peer=None,
                 connection=None) -> None:
        self.name = name
        self.uuid = uuid
        self.device = device
        self.peer = peer
        self.connection = connection  # the frame-socket connection that handed the device over, if any
        self.buffers: dict[int, Buffer] = {}
        self.closed = False
        self.last_error: str | None = None
        self.plane: GfxPlane | None = None
        self.edid_written: bytes | None = None
        self._order: list[int] = []  # buffer ids, least recently queried first
        self._evicted: list[Buffer] = []
        self._region_serial = 0
        # The guest's pointer, from the vGPU's cursor plane (GVT-g has one; see poll_cursor).
        self.cursor: Cursor | None = None
        self.pointer: Pointer | None = None
        self.cursor_unsupported: str | None = None  # why this vGPU gives no cursor plane
        self.cursor_off = False  # the last cursor query answered with a disabled plane
        self.cursor_error: str | None = None  # the last failure to read it, logged once
        self._cursor_fds: dict[int, tuple[int, PlaneInfo]] = {}  # cursor dmabuf_id → (fd, layout)
        self._cursor_serial = 0
        # The daemon's native data plane: this vGPU's connection there (-1: none), whether the data
        # plane polls it now, and the event that wakes the daemon's poll when it hands it back.
        self.dp_conn = -1
        self.on_dp = False
        self.needs_poll = False   # handed back by the data plane and not polled here since
        self.wake = None
        self.polls = 0   # polls made here (the data plane's are not counted)

    def released(self, buffer_id: int) -> None:  # a vGPU has no release: its memory is its own
        pass

    def presented(self, buffer_id: int, frame: int, timestamp_ns: int, sequence: int) -> None:
        pass

    def poll(self) -> Frame | None:
        self.polls += 1
        plane = self.device.query()
        self.plane = plane
        if not plane.enabled:
            return None
        if plane.kind == VFIO_GFX_PLANE_TYPE_DMABUF:
            buffer = self.buffers.get(plane.ident)
            if buffer is not None and buffer.info != plane.plane_info():
                self._evict(plane.ident)
                buffer = None
            if buffer is None:
                fd, info = self.device.get_dmabuf(plane)
                buffer = Buffer(self.name, plane.ident, info, fd)
                self.buffers[plane.ident] = buffer
                log.info("%s: new plane %s (dmabuf_id %d)", self.name, plane.describe(), plane.ident)
            self._touch(plane.ident)
        else:
            fd, info, offset = self.device.region_plane(plane)
            buffer = next((b for b in self.buffers.values()
                           if b.info == info and b.mmap_offset == offset), None)
            if buffer is None:
                for old in list(self.buffers):
                    self._evict(old)
                self._region_serial += 1
                buffer = Buffer(self.name, self._region_serial, info, os.dup(fd), mmap_offset=offset,
                                copy_only="the vGPU's plane is a device region, not a dma-buf")
                self.buffers[buffer.id] = buffer
                log.info("%s: region plane %s (region %d)", self.name, plane.describe(), plane.ident)
        return Frame(buffer)

    def poll_cursor(self) -> bool:
        """Ask the vGPU for its cursor plane (DRM_PLANE_TYPE_CURSOR): the image (read from its
        dma-buf, a new serial when the pixels change) and where the pointer is. True when `cursor` or
        `pointer` changed. A vGPU without a cursor plane (the query refused, or answered with what is
        not a cursor: mbochs answers every query with its primary plane) is asked once, and
        `cursor_unsupported` says why."""
        if self.cursor_unsupported is not None:
            return False
        try:
            plane = self.device.query(DRM_PLANE_TYPE_CURSOR)
        except VfioError as exc:
            if exc.errno in (errno.ENODEV, errno.EAGAIN):
                # GVT-g answers ENODEV while the guest's cursor is off: off now, asked again next time
                self.cursor_off = True
                hidden = Pointer(self.pointer.x, self.pointer.y, False) if self.pointer else None
                changed, self.pointer = hidden != self.pointer, hidden
                return changed
            return self._no_cursor(f"the cursor plane query is refused ({exc.strerror or exc})")
        if plane.plane_type != DRM_PLANE_TYPE_CURSOR:
            return self._no_cursor(f"it answers the cursor query with plane type {plane.plane_type}")
        self.cursor_off = not plane.enabled
        if not plane.enabled:
            hidden = Pointer(self.pointer.x, self.pointer.y, False) if self.pointer else None
            changed = hidden != self.pointer
            self.pointer = hidden
            return changed
        if plane.fourcc != ARGB8888 or not (0 < plane.width <= MAX_CURSOR and 0 < plane.height <= MAX_CURSOR):
            return self._no_cursor(f"its cursor plane is {plane.describe()}, not an ARGB8888 image of at "
                                   f"most {MAX_CURSOR}x{MAX_CURSOR}")
        if plane.kind != VFIO_GFX_PLANE_TYPE_DMABUF:
            return self._no_cursor("its cursor plane is a device region, not a dma-buf")
        pixels = self._cursor_pixels(plane)
        hot_x = 0 if plane.x_hot == NO_HOTSPOT else plane.x_hot
        hot_y = 0 if plane.y_hot == NO_HOTSPOT else plane.y_hot
        hot_x, hot_y = min(hot_x, plane.width - 1), min(hot_y, plane.height - 1)
        changed = False
        c = self.cursor
        if c is None or (c.width, c.height, c.hot_x, c.hot_y, c.pixels) != (plane.width, plane.height, hot_x,
                                                                           hot_y, pixels):
            self._cursor_serial += 1
            self.cursor = Cursor(plane.width, plane.height, hot_x, hot_y, pixels, self._cursor_serial)
            changed = True
        # x_pos/y_pos: the cursor plane's top-left on the primary plane; the pointer is its hot spot
        pointer = Pointer(_signed(plane.x) + hot_x, _signed(plane.y) + hot_y, True)
        if pointer != self.pointer:
            self.pointer = pointer
            changed = True
        return changed

    def _cursor_pixels(self, plane: GfxPlane) -> bytes:
        entry = self._cursor_fds.get(plane.ident)
        if entry is None or entry[1] != plane.plane_info():
            if entry is not None:
                os.close(entry[0])
            while len(self._cursor_fds) >= MAX_KEPT_DMABUFS:
                os.close(self._cursor_fds.pop(next(iter(self._cursor_fds)))[0])
            entry = self.device.get_dmabuf(plane)
            self._cursor_fds[plane.ident] = entry
        fd, info = entry
        with mmap.mmap(fd, info.offset + info.stride * info.height, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            row = info.width * 4
            return b"".join(m[info.offset + y * info.stride: info.offset + y * info.stride + row]
                            for y in range(info.height))

    def _no_cursor(self, why: str) -> bool:
        self.cursor_unsupported = why
        log.info("%s: no cursor plane: %s", self.name, why)
        return False

    def _touch(self, ident: int) -> None:
        if ident in self._order:
            self._order.remove(ident)
        self._order.append(ident)
        while len(self._order) > MAX_KEPT_DMABUFS:
            self._evict(self._order[0])

    def _evict(self, ident: int) -> None:
        buffer = self.buffers.pop(ident, None)
        if ident in self._order:
            self._order.remove(ident)
        if buffer is not None:
            self._evicted.append(buffer)

    def evicted(self) -> list[Buffer]:
        out, self._evicted = self._evicted, []
        return out

    def show_monitor(self, edid: bytes | None) -> None:
        """Tell the guest which monitor it is on (EDID passthrough); None: on no monitor (link down)."""
        if edid == self.edid_written:
            return
        try:
            self.device.write_edid(edid)
        except VfioError as exc:
            if exc.errno == errno.ENOTSUP:
                log.info("%s: %s; the guest cannot be told which monitor it is on", self.name, exc)
            else:
                log.warning("%s: writing the EDID region: %s", self.name, exc)
            self.edid_written = edid
            return
        self.edid_written = edid
        log.info("%s: EDID region %s", self.name,
                 "link down" if edid is None else f"holds a {len(edid)}-byte EDID")

    # --- compositor.sources.Source

    @property
    def mdev(self) -> str | None:
        return self.uuid

    def let_go(self) -> None:
        self.close("its guest is gone")

    def guest_status(self) -> dict[str, Any]:
        return {"vgpu": self.uuid or self.device.name,
                "plane": self.plane.describe() if self.plane is not None else None,
                "error": self.last_error,
                # who asks the vGPU for its planes now: the data plane's thread or the daemon's loop
                "polled_by": "data plane" if self.on_dp else "compositor",
                "polls": self.polls,
                "edid": None if self.edid_written is None else len(self.edid_written),
                # the vGPU's cursor plane: why there is none, "off" (disabled now), or the image's size
                "cursor": (self.cursor_unsupported if self.cursor_unsupported is not None
                           else "off" if self.cursor_off
                           else f"{self.cursor.width}x{self.cursor.height}" if self.cursor is not None
                           else None)}

    def close(self, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        for fd, _ in self._cursor_fds.values():
            os.close(fd)
        self._cursor_fds.clear()
        self.device.close()
