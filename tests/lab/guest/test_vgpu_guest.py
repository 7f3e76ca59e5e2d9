"""The vGPU guest stand-in against the real mbochs and mdpy samples: what it draws is what the plane
query shows, modes and EDIDs go through the registers a guest driver uses, and the control server
drives a guest that another process holds the device fd of."""

from __future__ import annotations

import asyncio
import mmap
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import compositor
from compositor.kms.edid import build_edid
from compositor.sources.framesocket import GuestHandler
from compositor.sources.vfio import (
    DRM_PLANE_TYPE_PRIMARY,
    VFIO_DEVICE_GFX_LINK_STATE_UP,
    VFIO_GFX_PLANE_TYPE_DMABUF,
    VFIO_GFX_PLANE_TYPE_REGION,
    GfxPlane,
    VfioDevice,
)
from directflip_tools.lab.vgpu_guest import (
    BochsGuest,
    MdpyGuest,
    VgpuGuestControl,
    VgpuGuestError,
    create_mdev,
    remove_mdev,
)
from directflip_tools.synthetic import decode_counter, guest_colour

REPO = Path(compositor.__file__).resolve().parents[1]
XR24 = 0x34325258
@contextmanager
def mdev(parent: str, type_glob: str) -> Iterator[str]:
    uuid = create_mdev(parent, type_glob)
    try:
        yield uuid
    finally:
        remove_mdev(uuid)


def rgb_of(mapping, plane: GfxPlane, offset: int = 0) -> np.ndarray:
    """The plane's pixels as an (H, W, 3) RGB array, from a mapping of its XRGB8888 memory; only the
    whole rows the mapping holds (see dmabuf_rgb)."""
    rows = min(plane.height, (len(mapping) - offset) // plane.stride)
    raw = np.frombuffer(mapping, dtype=np.uint8, count=plane.stride * rows, offset=offset)
    bgrx = raw.reshape(rows, plane.stride // 4, 4)[:, :plane.width]
    return bgrx[..., 2::-1].copy()


def dmabuf_rgb(device: VfioDevice, plane: GfxPlane) -> np.ndarray:
    """The top of the plane's dma-buf. mbochs exports a dma-buf of exactly stride * height bytes and
    the dma-buf core refuses an mmap reaching past size >> PAGE_SHIFT pages, so the last, partial page
    of a mode like 800x600 (1920000 bytes) cannot be mapped: map the whole pages only."""
    fd, info = device.get_dmabuf(plane)
    try:
        with mmap.mmap(fd, plane.size // mmap.PAGESIZE * mmap.PAGESIZE, mmap.MAP_SHARED,
                       mmap.PROT_READ) as shown:
            return rgb_of(shown, plane)
    finally:
        os.close(fd)


def assert_shows(rgb: np.ndarray, name: str, n: int) -> None:
    assert decode_counter(rgb) == n, f"the plane does not show frame {n} (decoded {decode_counter(rgb)})"
    # (4, 4) is background: left of and above the counter band, above the bar and the name.
    assert tuple(rgb[4, 4]) == guest_colour(name), f"the plane does not have {name}'s colour"


def test_bochs_guest_modes_show_in_the_plane_query():
    with mdev("mbochs", "mbochs-small") as uuid:
        guest = BochsGuest(VfioDevice.open(uuid))
        try:
            device = guest.device
            assert device.query().enabled is False  # no mode set yet: a disabled plane

            guest.set_mode(640, 480)
            guest.draw("office", 7)
            first = device.query()
            assert first.kind == VFIO_GFX_PLANE_TYPE_DMABUF
            assert (first.fourcc, first.width, first.height, first.stride) == (XR24, 640, 480, 640 * 4)
            assert_shows(dmabuf_rgb(device, first), "office", 7)

            guest.draw("office", 8)  # same mode: same buffer, new pixels
            again = device.query()
            assert again.ident == first.ident
            assert_shows(dmabuf_rgb(device, again), "office", 8)

            guest.set_mode(800, 600)
            guest.draw("kiosk", 0xDEADBEEF)
            second = device.query()
            assert (second.width, second.height, second.stride) == (800, 600, 800 * 4)
            assert second.ident != first.ident, "a new mode should be a new dma-buf"
            assert_shows(dmabuf_rgb(device, second), "kiosk", 0xDEADBEEF)

            guest.disable()
            off = device.query()
            assert off.enabled is False and off.ident == 0
            with pytest.raises(VgpuGuestError):
                guest.draw("kiosk", 1)  # no mode
            with pytest.raises(VgpuGuestError):
                guest.set_mode(2048, 2048)  # 16 MB does not fit mbochs-small's 4 MB
        finally:
            guest.close()


def test_vfio_device_edid_reaches_the_guest():
    edid = build_edid("DFL", 0x4321, 7, name="passthrough")
    with mdev("mbochs", "mbochs-small") as uuid:
        guest = BochsGuest(VfioDevice.open(uuid))
        try:
            assert guest.read_edid_as_guest() == b"", "a fresh mbochs has its link down"
            guest.device.write_edid(edid)
            assert guest.read_edid_as_guest() == edid
            assert guest.device.read_edid() == (edid, VFIO_DEVICE_GFX_LINK_STATE_UP)
            guest.device.write_edid(None)
            assert guest.read_edid_as_guest() == b""
        finally:
            guest.close()


def test_mdpy_guest_draws_into_the_display_region():
    with mdev("mdpy", "mdpy-vga") as uuid:
        guest = MdpyGuest(VfioDevice.open(uuid))
        try:
            assert guest.size == (640, 480)
            guest.draw("mdpy-lab", 11)
            plane = guest.device.query()
            assert plane.kind == VFIO_GFX_PLANE_TYPE_REGION
            assert (plane.fourcc, plane.width, plane.height, plane.stride) == (XR24, 640, 480, 640 * 4)
            fd, info, offset = guest.device.region_plane(plane)
            region = guest.device.region(plane.ident)
            with mmap.mmap(fd, region.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=offset) as shown:
                assert_shows(rgb_of(shown, plane), "mdpy-lab", 11)
            guest.set_mode(640, 480)  # its one mode is fine
            with pytest.raises(VgpuGuestError):
                guest.set_mode(800, 600)
            assert guest.read_edid_as_guest() == b""
        finally:
            guest.close()


def launch(args: list[str], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "directflip_tools.lab.vgpu_guest", *args], cwd=REPO,
                            pass_fds=pass_fds)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_control_server_drives_a_guest_launched_with_the_device_fd(tmp_path):
    control = str(tmp_path / "guest.sock")
    edid = build_edid("DFL", 7, 1)
    with mdev("mbochs", "mbochs-small") as uuid:
        device = VfioDevice.open(uuid)  # the "compositor" holds the group; the guest gets an fd
        proc = None
        try:
            fd = device.dup()
            try:
                proc = launch(["--fd", str(fd), "--kind", "bochs", "--control", control], (fd,))
            finally:
                os.close(fd)
            ctl = VgpuGuestControl(control, process=proc)
            try:
                ctl.mode(640, 480)
                ctl.draw("remote", 42)
                plane = device.query(DRM_PLANE_TYPE_PRIMARY)
                assert (plane.width, plane.height) == (640, 480)
                assert_shows(dmabuf_rgb(device, plane), "remote", 42)
                assert ctl.info()["enabled"] is True

                device.write_edid(edid)
                assert ctl.edid() == edid

                ctl.disable()
                assert device.query().enabled is False
                with pytest.raises(VgpuGuestError, match="set a mode"):
                    ctl.draw("remote", 43)
            finally:
                ctl.quit()
            assert proc.wait(20) == 0
            assert not os.path.exists(control), "the control socket was left behind"
        finally:
            if proc is not None:
                stop(proc)
            device.close()


class RecordingHandler(GuestHandler):
    """A compositor's frame-socket handler that keeps what vGPUs hand over."""

    def __init__(self) -> None:
        self.devices: queue.Queue[int] = queue.Queue()

    def on_hello(self, conn) -> None:
        pass

    def on_vfio_device(self, conn, fd: int) -> None:
        self.devices.put(fd)

    def on_close(self, conn, reason: str) -> None:
        pass


def test_guest_hands_its_device_over_the_frame_socket(tmp_path):
    from compositor.sources.framesocket import FrameSocketServer

    frames, control = str(tmp_path / "frames.sock"), str(tmp_path / "guest.sock")
    handler = RecordingHandler()
    loop = asyncio.new_event_loop()
    server = FrameSocketServer(frames, handler)
    server.start(loop)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    handed: VfioDevice | None = None
    try:
        with mdev("mbochs", "mbochs-small") as uuid:
            proc = launch(["--uuid", uuid, "--kind", "bochs", "--control", control,
                           "--frame-socket", frames, "--name", "handed"])
            try:
                ctl = VgpuGuestControl(control, process=proc)
                handed = VfioDevice(handler.devices.get(timeout=30), "handed-over")
                try:
                    ctl.mode(640, 480)
                    ctl.draw("handed", 5)
                    assert_shows(dmabuf_rgb(handed, handed.query()), "handed", 5)
                finally:
                    ctl.quit()
                assert proc.wait(20) == 0
            finally:
                stop(proc)
                # Every fd of the device must be closed before the mdev's removal, which waits for them.
                if handed is not None:
                    handed.close()
                while not handler.devices.empty():
                    os.close(handler.devices.get())
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
