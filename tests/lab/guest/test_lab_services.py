"""The lab itself works: three real monitors we can read from outside, real hotplug, vkms and vgem."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import pyudev

SYS_DRM = Path("/sys/class/drm")


def connector(card: str, head: int) -> Path:
    return SYS_DRM / f"{os.path.basename(card)}-Virtual-{head + 1}"


def status(card: str, head: int) -> str:
    return (connector(card, head) / "status").read_text().strip()


def modes(card: str, head: int, probe: bool = False) -> list[str]:
    if probe:
        # "detect" makes the kernel probe the connector again and refill its mode list, whoever else
        # (fbcon) probed it last and with whatever size limit.
        (connector(card, head) / "status").write_text("detect")
    return (connector(card, head) / "modes").read_text().split()


def active_mode(debugfs: Path, card: str, name: str) -> tuple[int, int] | None:
    """Size of the mode of the CRTC driving connector `name`, from the atomic state in debugfs."""
    minor = os.path.basename(card).removeprefix("card")
    state = (debugfs / minor / "state").read_text()
    crtc = re.search(rf"^connector\[\d+\]: {re.escape(name)}\n\tcrtc=(\S+)", state, re.M)
    if not crtc or crtc.group(1) == "(null)":
        return None
    block = re.search(rf"^crtc\[\d+\]: {re.escape(crtc.group(1))}\n((?:\t.*\n)+)", state, re.M)
    if not block or "\tactive=1" not in block.group(1):
        return None
    mode = re.search(r'mode: "(\d+)x(\d+)', block.group(1))
    return (int(mode.group(1)), int(mode.group(2))) if mode else None


def wait_until(what: str, check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def wait_hotplug(monitor: pyudev.Monitor, card: str, timeout: float = 15.0) -> pyudev.Device:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        device = monitor.poll(timeout=left)
        if device is None:
            break
        if device.sys_name == os.path.basename(card) and device.properties.get("HOTPLUG") == "1":
            return device
    pytest.fail(f"no HOTPLUG=1 uevent on {card} within {timeout:.0f} s")


@pytest.mark.parametrize("head", [0, 1, 2])
def test_screendump_has_the_size_of_the_heads_mode(host, cards, debugfs, head):
    card = cards["virtio_gpu"]
    name = f"Virtual-{head + 1}"
    assert status(card, head) == "connected", f"{name} should be connected (the lab plugs all heads)"
    # Whoever drives the head (fbcon after boot, or what an earlier test left), the dump has the size
    # of the mode its CRTC scans out.
    mode = wait_until(f"an active CRTC on {name}", lambda: active_mode(debugfs, card, name))
    assert f"{mode[0]}x{mode[1]}" in modes(card, head, probe=True)
    image = host.screendump(head)
    assert image.dtype.name == "uint8"
    assert image.shape == (mode[1], mode[0], 3), f"{name} shows {mode[0]}x{mode[1]}"


def test_unplug_and_plug_are_real_hotplugs(host, cards):
    card = cards["virtio_gpu"]
    head = 1
    context = pyudev.Context()
    monitor = pyudev.Monitor.from_netlink(context, source="kernel")
    monitor.filter_by("drm")
    monitor.start()
    try:
        host.unplug(head)
        wait_hotplug(monitor, card)
        wait_until("Virtual-2 disconnected", lambda: status(card, head) == "disconnected")

        host.plug(head, 800, 600)
        wait_hotplug(monitor, card)
        wait_until("Virtual-2 connected", lambda: status(card, head) == "connected")
        assert modes(card, head, probe=True)[0] == "800x600"
    finally:
        width, height = host.boot_sizes[head]
        host.plug(head, width, height)
        wait_until("Virtual-2 back at its boot size",
                   lambda: status(card, head) == "connected"
                   and modes(card, head, probe=True)[:1] == [f"{width}x{height}"])


def test_vkms_and_vgem_are_loaded_with_writeback(cards):
    assert cards["vkms"] != cards["vgem"] != cards["virtio_gpu"]
    vkms = os.path.basename(cards["vkms"])
    # Connector names are numbered per type across all cards: virtio-gpu took Virtual-1..3 first.
    assert [p.name for p in SYS_DRM.glob(f"{vkms}-Virtual-*")], "vkms has no Virtual connector"
    assert (SYS_DRM / f"{vkms}-Writeback-1").is_dir(), "vkms was loaded without enable_writeback=1"
    assert Path("/sys/module/vkms/parameters/enable_overlay").read_text().strip() == "Y"
    assert Path("/sys/class/mdev_bus/mbochs/mdev_supported_types").is_dir(), "mbochs is not loaded"


# --------------------------------------------------------------------------------------------- mbochs

def _vfio_ioctl(fd: int, nr: int, arg) -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    ret = libc.ioctl(fd, (ord(";") << 8) | nr, arg)  # VFIO ioctls are _IO(';', 100 + n)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"VFIO ioctl {nr}: {os.strerror(err)}")
    return ret


def test_mbochs_gives_a_mappable_dmabuf_on_the_first_query(cards):
    """The lab's mbochs patch: the first plane query succeeds and the dma-buf maps read-back exact."""
    import ctypes
    import mmap
    import struct
    import uuid

    import numpy as np

    types = sorted(Path("/sys/class/mdev_bus/mbochs/mdev_supported_types").glob("mbochs-*"))
    assert types, "mbochs offers no mdev types"
    name = str(uuid.uuid4())
    (types[0] / "create").write_text(name)
    mdev = Path("/sys/bus/mdev/devices") / name
    fds: list[int] = []
    try:
        group_no = os.path.basename(os.readlink(mdev / "iommu_group"))
        container = os.open("/dev/vfio/vfio", os.O_RDWR)
        fds.append(container)
        group = os.open(f"/dev/vfio/{group_no}", os.O_RDWR)
        fds.append(group)
        _vfio_ioctl(group, 104, ctypes.byref(ctypes.c_int(container)))  # GROUP_SET_CONTAINER
        _vfio_ioctl(container, 102, ctypes.c_ulong(3))  # SET_IOMMU TYPE1v2
        device = _vfio_ioctl(group, 106, ctypes.c_char_p(name.encode()))  # GROUP_GET_DEVICE_FD
        fds.append(device)

        def region(index: int) -> tuple[int, int]:
            info = ctypes.create_string_buffer(struct.pack("IIIIQQ", 32, 0, index, 0, 0, 0), 32)
            _vfio_ioctl(device, 108, info)  # DEVICE_GET_REGION_INFO
            return struct.unpack_from("QQ", info.raw, 16)  # size, offset

        (vram_size, vram_offset), (_, mmio_offset) = region(0), region(2)
        width, height = 640, 480
        # Act as the guest's bochs driver: dispi registers at 0x500 in BAR2, index * 2.
        for index, value in ((4, 0), (1, width), (2, height), (3, 32), (4, 0x41)):
            os.pwrite(device, struct.pack("<H", value), mmio_offset + 0x500 + 2 * index)
        y, x = np.mgrid[0:height, 0:width]
        image = ((x * 255 // width) << 16 | (y * 255 // height) << 8 | ((x ^ y) & 0xFF)).astype("<u4")
        with mmap.mmap(device, vram_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                       offset=vram_offset) as vram:
            vram[: image.nbytes] = image.tobytes()

        plane = ctypes.create_string_buffer(struct.pack("IIII", 64, 2, 1, 0) + bytes(48), 64)
        _vfio_ioctl(device, 114, plane)  # QUERY_GFX_PLANE, DMABUF, primary: stock mbochs fails here
        fourcc, = struct.unpack_from("I", plane.raw, 12)
        w, h, stride, size = struct.unpack_from("IIII", plane.raw, 24)
        dmabuf_id, = struct.unpack_from("I", plane.raw, 56)
        assert (fourcc, w, h, stride) == (0x34325258, width, height, width * 4)  # XR24

        first = _vfio_ioctl(device, 115, ctypes.byref(ctypes.c_uint32(dmabuf_id)))  # GET_GFX_DMABUF
        fds.append(first)
        second = _vfio_ioctl(device, 115, ctypes.byref(ctypes.c_uint32(dmabuf_id)))
        os.close(second)  # each fd holds its own reference: closing one leaves the other usable
        with mmap.mmap(first, size, mmap.MAP_SHARED, mmap.PROT_READ) as shown:
            got = np.frombuffer(shown, dtype="<u4", count=w * h).reshape(h, w).copy()
        assert (got == image).all(), "the dma-buf does not show what was drawn in VRAM"
    finally:
        for fd in reversed(fds):
            os.close(fd)
        (mdev / "remove").write_text("1")
