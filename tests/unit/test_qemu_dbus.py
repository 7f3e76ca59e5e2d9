"""The QEMU D-Bus display source against a stand-in for QEMU over real D-Bus connections (socket pairs,
fds passed with SCM_RIGHTS), a private dbus-daemon for the bus mode, and — where this host's QEMU has
`-display dbus` — a real TCG VM whose SeaBIOS screen no one here drew."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import mmap
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from dbus_fast import DBusError

from compositor.formats import FORMATS, XRGB8888, fourcc
from compositor.sources.qemu_dbus import (
    ERROR_INVALID,
    ERROR_UNSUPPORTED,
    MAX_KEPT_BUFFERS,
    PIXMAN_A8R8G8B8,
    PIXMAN_TO_DRM,
    PIXMAN_X8R8G8B8,
    QemuDisplaySource,
    QemuTarget,
    UnsupportedFormat,
    pixman_to_fourcc,
    wait_for,
)
from directflip_tools.qemu_peer import QemuDisplayPeer

PIXMAN_R5G6B5 = 0x10020565
PIXMAN_X1R5G5B5 = 0x10020555


class Recorder:
    """The daemon's side, written down."""

    def __init__(self) -> None:
        self.frames = []
        self.forgotten = []
        self.blanks: list[str] = []
        self.cursor_events = 0
        self.closes: list[str] = []

    def on_frame(self, source, frame) -> None:
        self.frames.append(frame)

    def on_forget(self, source, buffer) -> None:
        self.forgotten.append(buffer)
        buffer.close()

    def on_blank(self, source, reason: str) -> None:
        self.blanks.append(reason)

    def on_cursor(self, source) -> None:
        self.cursor_events += 1

    def on_close(self, source, reason: str) -> None:
        self.closes.append(reason)
        for buffer in source.buffers.values():
            buffer.close()


def run(coro, timeout: float = 30.0):
    async def bounded():
        try:
            return await asyncio.wait_for(coro, timeout)
        finally:
            await asyncio.sleep(0.02)  # let closed connections' callbacks run before the loop goes
    return asyncio.run(bounded())


@pytest.fixture(autouse=True)
def collect_garbage():
    """Collect each test's garbage right away. A future that failed as its connection closed logs
    "exception was never retrieved" from its finalizer; run by a later automatic collection inside
    ast.parse (pytest rewriting a module it imports), that log's traceback formatting parses too,
    and CPython 3.11.7 fails the outer parse ("AST constructor recursion depth mismatch")."""
    yield
    gc.collect()


async def connected(**kwargs):
    """A source on one end of a socket pair, the stand-in for QEMU on the other, a listener registered."""
    ours, theirs = socket.socketpair()
    peer = QemuDisplayPeer(width=64, height=32)
    rec = Recorder()
    source = QemuDisplaySource("vm", QemuTarget(sock=ours), rec, **kwargs)
    source.start()
    await peer.serve_peer(theirs)
    listener = await peer.listener()
    assert await wait_for(lambda: source.state == "connected", 5)
    return peer, source, listener, rec


def memfd(size: int, fill: bytes | None = None) -> int:
    fd = os.memfd_create("test-dmabuf", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if fill is not None:
        os.pwrite(fd, fill, 0)
    return fd


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def read_plane(buffer) -> np.ndarray:
    """(height, width*bpp) bytes of a buffer as the copy path reads them."""
    info = buffer.info
    with mmap.mmap(buffer.fd, info.span, mmap.MAP_SHARED, mmap.PROT_READ, offset=buffer.mmap_offset) as m:
        rows = np.ndarray((info.height, info.width * info.bytes_per_pixel), np.uint8, buffer=m,
                          offset=info.offset, strides=(info.stride, 1))
        return rows.copy()


# ------------------------------------------------------------------------------------ pixel formats

def test_pixman_codes_become_drm_fourccs():
    assert PIXMAN_X8R8G8B8 == 0x20020888  # PIXMAN_FORMAT(32, PIXMAN_TYPE_ARGB, 0, 8, 8, 8)
    assert pixman_to_fourcc(PIXMAN_X8R8G8B8) == fourcc("XR24")
    assert pixman_to_fourcc(PIXMAN_A8R8G8B8) == fourcc("AR24")
    assert pixman_to_fourcc(PIXMAN_R5G6B5) == fourcc("RG16")
    assert pixman_to_fourcc(0x20090888) == fourcc("RX24")  # r8g8b8x8
    for code, (_, drm) in PIXMAN_TO_DRM.items():
        if drm in FORMATS:  # bits per pixel agree: pixman keeps them in the top byte
            assert FORMATS[drm].bpp == code >> 24


def test_unknown_pixman_code_is_named():
    with pytest.raises(UnsupportedFormat, match="0x12345678"):
        pixman_to_fourcc(0x12345678)
    with pytest.raises(UnsupportedFormat, match=r"x1r5g5b5 \(0x10020555\) is DRM XR15"):
        pixman_to_fourcc(PIXMAN_X1R5G5B5)


def test_pixman_codes_are_pixmans_own():
    """Each code of the table is a format libpixman accepts (where this host has libpixman)."""
    name = ctypes.util.find_library("pixman-1")
    if name is None:
        pytest.fail("no libpixman on this host (Debian: libpixman-1-0, which qemu-system-x86 brings; "
                    "`make unit` installs it)")
    lib = ctypes.CDLL(name)
    lib.pixman_format_supported_source.argtypes = [ctypes.c_uint32]
    for code, (label, _) in PIXMAN_TO_DRM.items():
        assert lib.pixman_format_supported_source(code), label
    assert not lib.pixman_format_supported_source(0x12345678)


def test_target_specs():
    assert QemuTarget.parse("qmp:/run/vm/qmp.sock", 1) == QemuTarget(qmp="/run/vm/qmp.sock", console=1)
    assert QemuTarget.parse("dbus:unix:path=/run/vm/bus").bus == "unix:path=/run/vm/bus"
    with pytest.raises(ValueError, match="qmp:PATH"):
        QemuTarget.parse("/run/vm/qmp.sock")
    with pytest.raises(ValueError, match="exactly one"):
        QemuTarget(qmp="a", bus="b")


# ------------------------------------------------------------------------------------ dma-bufs

def test_dmabuf_scanout_is_the_same_file_and_reused_by_inode():
    async def body():
        peer, source, listener, rec = await connected()
        w, h, stride = 64, 32, 320
        fd_a, fd_b = memfd(stride * h), memfd(stride * h)
        await listener.scanout_dmabuf(fd_a, w, h, stride, XRGB8888)
        frame = rec.frames[-1]
        info = frame.buffer.info
        assert (info.fourcc, info.width, info.height, info.stride, info.offset, info.modifier) == (
            XRGB8888, w, h, stride, 0, 0)
        assert frame.buffer.copy_only is None  # a dma-buf: the zero-copy rung is open
        assert os.fstat(frame.buffer.fd).st_ino == os.fstat(fd_a).st_ino
        assert frame.buffer.fd != fd_a  # the source's own fd, received over the socket
        assert frame.damage is None and frame.y0_top
        first = frame.buffer

        await listener.update_dmabuf(8, 4, 16, 2)
        assert rec.frames[-1].buffer is first and rec.frames[-1].damage == (8, 4, 16, 2)
        await listener.update_dmabuf(60, 30, 100, 100)  # clipped to the plane
        assert rec.frames[-1].damage == (60, 30, 4, 2)

        # A guest flipping between two buffers: QEMU sends a new fd every time; the inode tells.
        await listener.scanout_dmabuf(fd_b, w, h, stride, XRGB8888)
        second = rec.frames[-1].buffer
        assert second.id != first.id
        fds = open_fds()
        for i in range(40):
            await listener.scanout_dmabuf(fd_a if i % 2 else fd_b, w, h, stride, XRGB8888)
        assert {f.buffer.id for f in rec.frames[-40:]} == {first.id, second.id}
        assert open_fds() == fds  # every duplicate fd was closed
        assert set(source.buffers) == {first.id, second.id} and not rec.forgotten

        # The same file with another layout is another buffer (the framebuffer differs).
        await listener.scanout_dmabuf(fd_a, w, h // 2, stride, XRGB8888)
        assert rec.frames[-1].buffer.id not in (first.id, second.id)
        assert [f.seq for f in rec.frames] == list(range(1, len(rec.frames) + 1))
        peer.close()
        os.close(fd_a)
        os.close(fd_b)
        assert await wait_for(lambda: rec.closes, 5)
    run(body())


def test_bottom_up_dmabufs_say_so():
    async def body():
        peer, source, listener, rec = await connected()
        fd = memfd(256 * 32)
        await listener.scanout_dmabuf(fd, 64, 32, 256, XRGB8888, y0_top=False)
        assert rec.frames[-1].y0_top is False
        await listener.update_dmabuf(0, 0, 64, 32)
        assert rec.frames[-1].y0_top is False
        peer.close()
        os.close(fd)
    run(body())


def test_calls_queued_on_a_torn_down_listener_are_ignored():
    async def body():
        peer, source, listener, rec = await connected()
        stale = source._generation
        source._disconnect()  # what a reconnect does first
        fd = memfd(256 * 32)
        source._call(stale, "ScanoutDMABUF", source._scanout_dmabuf, fd, 64, 32, 256, XRGB8888, 0, True,
                     fd=fd)
        assert not rec.frames and not source.buffers
        with pytest.raises(OSError):
            os.fstat(fd)  # closed: nobody will show it
        peer.close()
    run(body())


def test_old_dmabufs_are_handed_back():
    async def body():
        peer, source, listener, rec = await connected()
        fds = [memfd(64 * 4 * 32) for _ in range(MAX_KEPT_BUFFERS + 2)]
        for fd in fds:
            await listener.scanout_dmabuf(fd, 64, 32, 256, XRGB8888)
        assert len(source.buffers) == MAX_KEPT_BUFFERS
        assert [b.id for b in rec.forgotten] == [1, 2]  # least recently scanned out first
        peer.close()
        for fd in fds:
            os.close(fd)
    run(body())


def test_update_dmabuf_replies_fast():
    async def body():
        peer, source, listener, rec = await connected()
        fd = memfd(256 * 32)
        await listener.scanout_dmabuf(fd, 64, 32, 256, XRGB8888)
        trips = sorted([await listener.update_dmabuf(0, 0, 64, 32) for _ in range(300)])
        handler_p50 = source.stats.reply_us("UpdateDMABUF")
        assert handler_p50 is not None and source.stats.replies["UpdateDMABUF"].maxlen
        assert handler_p50 < 5_000  # microseconds, very generous: the handler does no I/O
        assert trips[len(trips) // 2] < 50_000_000  # ns; QEMU's GL waits this long per update
        status = source.status()
        assert status["reply_us"]["UpdateDMABUF"]["n"] == 300
        assert status["path"] == "dmabuf" and status["state"] == "connected"
        peer.close()
        os.close(fd)
    run(body())


def test_bad_dmabufs_are_refused_and_the_connection_keeps_working():
    async def body():
        peer, source, listener, rec = await connected()
        fd = memfd(256 * 32)
        fds = open_fds()
        with pytest.raises(DBusError) as err:
            await listener.scanout_dmabuf(fd, 64, 32, 256, fourcc("NV12"))
        assert err.value.type == ERROR_INVALID and "NV12" in err.value.text
        with pytest.raises(DBusError) as err:
            await listener.scanout_dmabuf(fd, 64, 64, 256, XRGB8888)  # twice the memfd's size
        assert "16384 bytes but the dma-buf has 8192" in err.value.text
        assert open_fds() == fds  # the refused fds were closed
        assert not rec.frames and source.stats.errors == 2
        await listener.scanout_dmabuf(fd, 64, 32, 256, XRGB8888)
        assert len(rec.frames) == 1
        peer.close()
        os.close(fd)
    run(body())


# ------------------------------------------------------------------------------------ pixels

def test_scanout_and_update_pixels_land_in_a_copy_buffer():
    async def body():
        peer, source, listener, rec = await connected()
        w, h, stride = 64, 32, 272  # QEMU's stride may carry padding
        image = np.random.default_rng(7).integers(0, 256, (h, stride), np.uint8)
        await listener.scanout(w, h, stride, PIXMAN_X8R8G8B8, image.tobytes())
        frame = rec.frames[-1]
        assert frame.buffer.copy_only and "Scanout" in frame.buffer.copy_only
        assert frame.buffer.info.fourcc == XRGB8888 and frame.buffer.info.width == w
        assert np.array_equal(read_plane(frame.buffer), image[:, :w * 4])

        patch = np.full((8, 16 * 4), 0xAB, np.uint8)
        await listener.update(8, 4, 16, 8, 16 * 4, PIXMAN_X8R8G8B8, patch.tobytes())
        update = rec.frames[-1]
        assert update.buffer is frame.buffer and update.damage == (8, 4, 16, 8)
        expected = image[:, :w * 4].copy()
        expected[4:12, 32:96] = 0xAB
        assert np.array_equal(read_plane(update.buffer), expected)

        # Same size again: the same buffer (the copy path keeps its mapping), new pixels.
        await listener.scanout(w, h, w * 4, PIXMAN_X8R8G8B8, bytes(w * 4 * h))
        assert rec.frames[-1].buffer is frame.buffer
        assert not read_plane(frame.buffer).any()
        assert source.stats.pixel_bytes == stride * h + patch.size + w * 4 * h
        peer.close()
    run(body())


def test_bad_pixel_format_is_refused_and_the_connection_keeps_working():
    async def body():
        peer, source, listener, rec = await connected()
        with pytest.raises(DBusError) as err:
            await listener.scanout(4, 4, 16, 0x12345678, bytes(64))
        assert err.value.type == ERROR_UNSUPPORTED and "0x12345678" in err.value.text
        with pytest.raises(DBusError) as err:
            await listener.update(0, 0, 4, 4, 16, PIXMAN_X8R8G8B8, bytes(20))
        assert err.value.type == ERROR_INVALID and "QEMU sent 20" in err.value.text
        assert source.last_error is not None and "Update" in source.last_error
        await listener.scanout(4, 4, 16, PIXMAN_X8R8G8B8, bytes(64))
        assert len(rec.frames) == 1 and source.state == "connected"
        peer.close()
    run(body())


def test_a_resize_without_scanout_follows_the_console():
    """QEMU's pixel path switches surfaces without a Scanout and sends the new size in Update bands
    (VGA text mode: 720x400 in 16-row bands); the size is the console's."""
    async def body():
        peer, source, listener, rec = await connected()
        await listener.scanout(64, 32, 256, PIXMAN_X8R8G8B8, bytes([0x11]) * (256 * 32))
        old = rec.frames[-1].buffer

        # Grow, the bands first and the console's PropertiesChanged late: the source asks the size.
        peer.width, peer.height = 96, 40
        for y in range(0, 40, 8):
            await listener.update(0, y, 96, 8, 96 * 4, PIXMAN_X8R8G8B8, bytes([y + 1]) * (96 * 4 * 8))
        assert await wait_for(lambda: rec.frames[-1].buffer.info.width == 96, 5)
        assert await wait_for(lambda: read_plane(rec.frames[-1].buffer)[39, 0] == 33, 5)
        grown = rec.frames[-1].buffer
        assert (grown.info.width, grown.info.height) == (96, 40)
        plane = read_plane(grown)
        assert [plane[y, 0] for y in range(0, 40, 8)] == [1, 9, 17, 25, 33]
        assert old in rec.forgotten

        # Shrink: every band fits the old surface, only the console's signal tells.
        peer.resize(48, 16)
        await listener.update(0, 0, 48, 16, 48 * 4, PIXMAN_X8R8G8B8, bytes([0x77]) * (48 * 4 * 16))
        assert await wait_for(lambda: rec.frames[-1].buffer.info.width == 48, 5)
        assert (rec.frames[-1].buffer.info.height, read_plane(rec.frames[-1].buffer)[15, 191]) == (16, 0x77)
        peer.close()
    run(body())


# ------------------------------------------------------------------------------------ shared maps

def test_scanout_map_shares_qemus_memory():
    async def body():
        peer, source, listener, rec = await connected()
        assert listener.has_map  # read from the listener's Interfaces property, as QEMU does
        fd = memfd(8192 + 256 * 32)
        os.pwrite(fd, bytes([0x5A]) * 256, 8192)
        await listener.scanout_map(fd, 8192, 64, 32, 256, PIXMAN_X8R8G8B8)
        frame = rec.frames[-1]
        assert os.fstat(frame.buffer.fd).st_ino == os.fstat(fd).st_ino
        assert (frame.buffer.mmap_offset, frame.buffer.info.offset) == (8192, 0)
        assert frame.buffer.copy_only and "ScanoutMap" in frame.buffer.copy_only
        assert read_plane(frame.buffer)[0, 0] == 0x5A
        os.pwrite(fd, bytes([0x6B]) * 256, 8192 + 256)  # QEMU draws in place...
        await listener.update_map(0, 1, 64, 1)  # ...and says where
        assert rec.frames[-1].buffer is frame.buffer and rec.frames[-1].damage == (0, 1, 64, 1)
        assert read_plane(frame.buffer)[1, 0] == 0x6B

        await listener.scanout_map(fd, 100, 64, 32, 256, PIXMAN_X8R8G8B8)  # not page aligned
        assert (rec.frames[-1].buffer.mmap_offset, rec.frames[-1].buffer.info.offset) == (0, 100)
        with pytest.raises(DBusError, match="needs"):
            await listener.scanout_map(fd, 8192, 64, 64, 256, PIXMAN_X8R8G8B8)
        peer.close()
        os.close(fd)
    run(body())


def test_map_is_not_offered_when_disabled():
    async def body():
        peer, source, listener, rec = await connected(offer_map=False)
        assert not listener.has_map
        peer.close()
    run(body())


# ------------------------------------------------------------------------------------ slate, cursor

def test_disable_gives_the_slate():
    async def body():
        peer, source, listener, rec = await connected()
        fd = memfd(256 * 32)
        await listener.scanout_dmabuf(fd, 64, 32, 256, XRGB8888)
        buffer = rec.frames[-1].buffer
        await listener.disable()
        assert rec.blanks == ["vm's display is off"]
        assert rec.forgotten == [buffer] and not source.buffers
        frames = len(rec.frames)
        await listener.update_dmabuf(0, 0, 64, 32)  # nothing to update: answered, ignored
        assert len(rec.frames) == frames and source.stats.ignored == 1
        await listener.scanout_dmabuf(fd, 64, 32, 256, XRGB8888)  # and back
        assert len(rec.frames) == frames + 1
        peer.close()
        os.close(fd)
    run(body())


def test_cursor_shape_and_position_are_kept():
    async def body():
        peer, source, listener, rec = await connected()
        pixels = bytes(range(64))
        await listener.cursor_define(4, 4, 1, 2, pixels)
        assert (source.cursor.width, source.cursor.height, source.cursor.hot_x, source.cursor.hot_y) == (
            4, 4, 1, 2)
        assert source.cursor.pixels == pixels and source.cursor.serial == 1
        await listener.mouse_set(30, 20, 1)
        assert (source.pointer.x, source.pointer.y, source.pointer.visible) == (30, 20, True)
        await listener.mouse_set(0, 0, 0)
        assert not source.pointer.visible and rec.cursor_events == 3
        with pytest.raises(DBusError, match="needs 64 bytes"):
            await listener.cursor_define(4, 4, 1, 2, bytes(10))
        with pytest.raises(DBusError, match="hot spot"):
            await listener.cursor_define(4, 4, 4, 0, pixels)
        assert source.cursor.serial == 1
        peer.close()
    run(body())


def test_qemu_going_away_gives_the_slate_and_hands_back_buffers():
    async def body():
        peer, source, listener, rec = await connected()
        fd = memfd(256 * 32)
        await listener.scanout_dmabuf(fd, 64, 32, 256, XRGB8888)
        buffer = rec.frames[-1].buffer
        peer.close()
        assert await wait_for(lambda: rec.closes, 5)
        assert rec.blanks and "QEMU closed" in rec.blanks[0]
        assert buffer in rec.forgotten and buffer.fd == -1
        assert source.closed and source.state == "closed" and not source.buffers
        os.close(fd)
    run(body())


# ------------------------------------------------------------------------------------ bus mode


def test_bus_mode_reconnects_when_the_vm_comes_back(private_bus):
    async def body():
        rec = Recorder()
        source = QemuDisplaySource("vm", QemuTarget(bus=private_bus), rec, retry_initial=0.05, retry_max=0.2)
        source.start()
        await asyncio.sleep(0.3)  # nobody owns org.qemu yet: the source keeps trying
        assert source.state in ("waiting", "connecting") and source.last_error
        fd = memfd(256 * 32)
        for attempt in (1, 2):
            peer = QemuDisplayPeer(name=f"vm-run-{attempt}", width=64, height=32)
            await peer.serve_bus(private_bus)
            listener = await peer.listener()
            assert await wait_for(lambda: source.state == "connected", 5)
            assert source.vm_name == f"vm-run-{attempt}" and source.stats.connects == attempt
            await listener.scanout_dmabuf(fd, 64, 32, 256, XRGB8888)
            assert os.fstat(rec.frames[-1].buffer.fd).st_ino == os.fstat(fd).st_ino
            peer.resize(48, 16)  # signals reach the source through its match rule
            await listener.scanout(64, 32, 256, PIXMAN_X8R8G8B8, bytes(256 * 32))
            blanks_before = len(rec.blanks)
            peer.close()  # the VM stops
            assert await wait_for(lambda n=blanks_before: len(rec.blanks) > n, 5)
            assert not source.buffers and source.state in ("waiting", "connecting")
        source.close()
        assert rec.closes == ["closed"]
        os.close(fd)
    run(body())


# ------------------------------------------------------------------------------------ real QEMU

QEMU = shutil.which("qemu-system-x86_64")


def _qemu_has_dbus() -> bool:
    if QEMU is None:
        return False
    try:
        out = subprocess.run([QEMU, "-display", "help"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(line.strip() == "dbus" for line in out.splitlines())


@pytest.fixture
def needs_qemu_dbus_fixture():
    if not _qemu_has_dbus():
        pytest.fail("no qemu-system-x86_64 with -display dbus on this host (Debian: qemu-system-x86, "
                    "which `make unit` installs)")


needs_qemu_dbus = pytest.mark.usefixtures("needs_qemu_dbus_fixture")


def _start_qemu(qmp: Path, log_path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([QEMU, "-nodefaults", "-vga", "std", "-display", "dbus,p2p=yes",
                             "-qmp", f"unix:{qmp},server=on,wait=off", "-machine", "pc,accel=tcg",
                             "-m", "32", "-name", "dbus-test-vm"],
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _has_picture(rec: Recorder, since: int) -> bool:
    """A frame (after the first `since`) of VGA text mode (720x400, which QEMU reaches with a surface
    switch and Update bands, no Scanout) whose pixels are not all one colour: SeaBIOS's text."""
    for frame in rec.frames[since:]:
        if frame.buffer.fd < 0 or (frame.buffer.info.width, frame.buffer.info.height) != (720, 400):
            continue
        plane = read_plane(frame.buffer)
        words = plane.view(np.uint32) if plane.shape[1] % 4 == 0 else plane
        if len(np.unique(words)) > 1:
            return True
    return False


@needs_qemu_dbus
def test_real_qemu_boot_screen_and_restart(tmp_path):
    qmp, qlog = tmp_path / "qmp.sock", tmp_path / "qemu.log"

    async def body():
        rec = Recorder()
        proc = _start_qemu(qmp, qlog)
        source = QemuDisplaySource("bios", QemuTarget(qmp=str(qmp)), rec, retry_initial=0.1, retry_max=0.5)
        try:
            source.start()
            assert await wait_for(lambda: _has_picture(rec, 0), 20), (
                f"no SeaBIOS picture; source {source.status()}; qemu: {qlog.read_text()[-2000:]}")
            assert source.vm_name == "dbus-test-vm" and source.peer is not None
            assert source.peer.pid == proc.pid
            frame = rec.frames[-1]
            assert frame.buffer.info.fourcc == XRGB8888 and frame.buffer.copy_only

            _stop(proc)  # the VM goes away: the slate, and the source waits for it
            assert await wait_for(lambda: rec.blanks, 10)
            assert "QEMU closed" in rec.blanks[-1]
            seen = len(rec.frames)
            proc = _start_qemu(qmp, qlog)  # and comes back on the same QMP socket
            assert await wait_for(lambda: _has_picture(rec, seen), 20), source.status()
            assert source.stats.connects == 2
        finally:
            source.close()
            _stop(proc)
    run(body(), timeout=90)


@needs_qemu_dbus
def test_real_qemu_on_a_private_bus(private_bus, tmp_path):
    qlog = tmp_path / "qemu.log"
    proc = subprocess.Popen([QEMU, "-nodefaults", "-vga", "std", "-display", f"dbus,addr={private_bus}",
                             "-machine", "pc,accel=tcg", "-m", "32", "-name", "bus-vm"],
                            stdout=open(qlog, "ab"), stderr=subprocess.STDOUT, start_new_session=True)

    async def body():
        rec = Recorder()
        source = QemuDisplaySource("bios", QemuTarget(bus=private_bus), rec, retry_initial=0.1, retry_max=0.5)
        try:
            source.start()
            assert await wait_for(lambda: _has_picture(rec, 0), 20), (
                f"no SeaBIOS picture; source {source.status()}; qemu: {qlog.read_text()[-2000:]}")
            assert source.vm_name == "bus-vm" and source.peer is not None and source.peer.pid == proc.pid
        finally:
            source.close()
    try:
        run(body(), timeout=60)
    finally:
        _stop(proc)


def test_connection_tells_a_vm_not_there_yet_from_one_whose_display_is_unusable(private_bus, tmp_path):
    # `directflip status` shows a QEMU display as connected, waiting for the VM (the normal state of a
    # VM not started yet, or stopped) or in error (the VM is there, the display cannot be used: that
    # needs someone to look), with the reason.
    async def body():
        rec = Recorder()
        quick = {"retry_initial": 0.05, "retry_max": 0.1}
        no_socket = QemuDisplaySource("a", QemuTarget(qmp=str(tmp_path / "no-vm.qmp")), rec, **quick)
        no_owner = QemuDisplaySource("b", QemuTarget(bus=private_bus), rec, **quick)
        wrong_console = QemuDisplaySource("c", QemuTarget(bus=private_bus, console=2), rec, **quick)
        assert no_socket.connection == "connecting"  # before the first attempt
        sources = (no_socket, no_owner, wrong_console)
        for source in sources:
            source.start()
        assert await wait_for(lambda: no_socket.last_error and no_owner.last_error, 5)
        assert no_socket.connection == "waiting" and "No such file" in no_socket.last_error
        assert no_owner.connection == "waiting" and "ServiceUnknown" in no_owner.last_error
        assert no_socket.status()["connection"] == "waiting"

        peer = QemuDisplayPeer(name="vm-up", width=64, height=32)
        await peer.serve_bus(private_bus)
        await peer.listener()
        assert await wait_for(lambda: no_owner.connection == "connected", 5)
        assert await wait_for(lambda: wrong_console.connection == "error", 5)
        assert "not 2" in wrong_console.last_error, wrong_console.last_error
        assert wrong_console.status()["connection"] == "error"

        peer.close()  # the VM stops: waiting for it again, not an error
        assert await wait_for(lambda: no_owner.connection == "waiting", 5)
        for source in sources:
            source.close()
        assert {s.connection for s in sources} == {"closed"}
    run(body())


@pytest.mark.skipif(os.getuid() != 0, reason="binding a socket as another user needs root")
def test_a_qmp_socket_another_user_binds_is_not_taken_for_the_vm(tmp_path):
    # While the VM is away, nobody binds its QMP socket's path. The source refuses it by the peer's
    # credentials before sending it a byte (nobody would get our end of the display socket), says
    # so in last_error, and keeps waiting for the real VM.
    import shutil
    import socket as socket_mod
    import tempfile
    import time as time_mod

    where = Path(tempfile.mkdtemp(prefix="directflip-qmp-"))   # pytest's own are 0700: nobody cannot enter
    where.chmod(0o777)
    path = where / "qmp.sock"
    got = where / "got"
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            listener = socket_mod.socket(socket_mod.AF_UNIX)
            listener.bind(str(path))
            listener.listen(4)
            listener.settimeout(20)
            conn, _ = listener.accept()
            conn.settimeout(2)
            try:
                data = conn.recv(4096)
            except TimeoutError:
                data = b"(nothing)"
            got.write_bytes(data or b"(closed)")
        finally:
            os._exit(0)

    async def body():
        deadline = time_mod.monotonic() + 20
        while not path.exists():
            assert time_mod.monotonic() < deadline
            await asyncio.sleep(0.02)
        rec = Recorder()
        source = QemuDisplaySource("vm", QemuTarget(qmp=str(path)), rec, retry_initial=0.1, retry_max=0.5)
        try:
            source.start()
            assert await wait_for(lambda: source.last_error and "uid 65534" in source.last_error, 20), \
                source.status()
        finally:
            source.close()
        return source.last_error
    try:
        error = run(body(), timeout=60)
        os.waitpid(pid, 0)
        sent = got.read_bytes()
    finally:
        shutil.rmtree(where, ignore_errors=True)
    assert f"the QMP socket {path} is served by uid 65534" in error and "which may not be guest vm" in error
    assert sent == b"(closed)"   # not a byte was sent


def test_the_guest_is_told_its_monitors_size():
    async def body():
        peer, source, listener, rec = await connected()
        assert getattr(peer, "ui_info", None) is None   # not shown anywhere yet: nothing told
        source.show_size((1920, 1080, 527, 296))
        assert await wait_for(lambda: getattr(peer, "ui_info", None) is not None, 5)
        assert peer.ui_info == (527, 296, 0, 0, 1920, 1080)
        assert await wait_for(lambda: source.stats.resizes == 1, 5)
        source.show_size((1920, 1080, 527, 296))   # the same size again: not sent again
        await asyncio.sleep(0.1)
        assert source.stats.resizes == 1 and source.status()["ui_size"] == [1920, 1080]
        source.close()
    run(body())
