"""Plays the guest OS of a vGPU, for lab tests and demos: ``python -m directflip_tools.lab.vgpu_guest``.

A vGPU's guest is normally a VM whose display driver programs the device through its BARs. In the lab
there is no VM: this module does what that driver would do, through the same VFIO device fd a VMM
would hold, so the compositor's side (VFIO_DEVICE_QUERY_GFX_PLANE, dma-bufs, regions, EDID) meets a
real kernel device with a real picture on it.

- `BochsGuest` (the mbochs sample, dma-buf planes) is the bochs DRM driver: it sets modes with the
  bochs "dispi" registers in BAR2 at 0x500 (u16 registers, index * 2) and draws into VRAM, BAR0.
  mbochs derives the plane from those registers alone (mbochs_check_framebuffer): ENABLE must have
  bit 0 set, BPP must be 32 (XRGB8888), XRES/YRES at least 64, stride = max(VIRT_WIDTH, XRES) * 4,
  offset = X_OFFSET * 4 + Y_OFFSET * stride, and offset + stride * YRES must fit VRAM. A dma-buf is
  made once per distinct mode (its id then stays the same for that mode). set_mode() writes the
  registers in the order the bochs driver does (disable, bpp, size, bank 0, virtual size = size,
  offsets 0, enable|LFB), so the plane is always VRAM from offset 0 with stride width * 4.
  The EDID the host wrote into the device's EDID region shows at BAR2 0x000..0x3ff while its link
  state is up (zeros otherwise): `read_edid_as_guest` reads it there, as the bochs driver does.
- `MdpyGuest` (the mdpy sample, region planes) is the mdpy-fb driver: the mode is fixed by the mdev
  type (vga 640x480, xga 1024x768, hd 1920x1080, XRGB8888) and read from the vendor capability in
  PCI config space (0x44 format, 0x48 width, 0x4c height); the framebuffer is BAR0, the same memory
  the host sees as the display region (index 16).

Both samples mishandle read()/write() of their memory BAR (mbochs lands 0x2000 bytes off, mdpy
always at offset 0): VRAM is only ever touched through mmap at the region's offset.

Frames are the synthetic guests' (directflip_tools.synthetic): the guest's colour with its name,
the frame counter band at (8, 8) and the moving bar, so a screenshot says whose frame n it is.

The control server lets a test drive a guest that another process launched: the compositor opens
the VFIO group (a group opens in one process only) and starts the "VMM" with a duplicate of the
device fd. It serves one JSON request per line on a Unix socket and answers one JSON line each:

    {"cmd": "mode", "width": W, "height": H}   {"ok": true}
    {"cmd": "draw", "name": S, "frame": N}     {"ok": true}
    {"cmd": "disable"}                         {"ok": true}
    {"cmd": "edid"}                            {"ok": true, "edid": "<hex>"}   ("" while link down)
    {"cmd": "info"}                            {"ok": true, "kind": ..., "width": W, "height": H, ...}
    {"cmd": "quit"}                            {"ok": true}, then the server exits
    anything that fails                        {"ok": false, "error": "..."}

`VgpuGuestControl` is the client.
"""

from __future__ import annotations

import argparse
import json
import logging
import mmap
import os
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compositor.kms.edid import EDID_HEADER
from compositor.sources.vfio import MDEV_DEVICES, VfioDevice, VfioError
from directflip_tools.synthetic import (
    check_size,
    draw_background,
    draw_bar,
    draw_counter,
    guest_colour,
    ink_colour,
    xrgb_view,
)

if TYPE_CHECKING:
    from compositor.sources.framesocket import FrameSocketClient

log = logging.getLogger("directflip.vgpu_guest")

MDEV_BUS = Path("/sys/class/mdev_bus")
EDID_BLOCK = 128
DRM_FORMAT_XRGB8888 = 0x34325258  # 'XR24'

# PCI regions (VFIO_PCI_*_REGION_INDEX)
BAR0, BAR2, CONFIG = 0, 2, 7

# bochs dispi interface (include/drm/bochs or qemu's vga_int.h): u16 registers in BAR2 at 0x500 + 2 * index
DISPI_MMIO = 0x500
DISPI_ID, DISPI_XRES, DISPI_YRES, DISPI_BPP, DISPI_ENABLE, DISPI_BANK = 0, 1, 2, 3, 4, 5
DISPI_VIRT_WIDTH, DISPI_VIRT_HEIGHT, DISPI_X_OFFSET, DISPI_Y_OFFSET = 6, 7, 8, 9
DISPI_ID5 = 0xB0C5
DISPI_DISABLED, DISPI_ENABLED, DISPI_LFB_ENABLED = 0x00, 0x01, 0x40
BOCHS_EDID_MMIO = 0x000  # mbochs: BAR2 0x000..0x3ff is the EDID block, as QEMU's bochs-display
BOCHS_EDID_MAX = 0x400
BOCHS_MIN_SIDE = 64      # mbochs refuses smaller modes

# mdpy: PCI config space vendor capability (samples/vfio-mdev/mdpy-defs.h)
MDPY_VENDORCAP = 0x40
MDPY_FORMAT, MDPY_WIDTH, MDPY_HEIGHT = 0x44, 0x48, 0x4C

# VgpuGuestControl waits this long for the server's socket (a guest starting on an emulated CPU that is
# kept busy; one that exits ends the wait at once)
CONTROL_TIMEOUT = 180.0
CALL_TIMEOUT = 60.0      # and for one answer (drawing a 1920x1080 background under TCG takes a while)


class VgpuGuestError(RuntimeError):
    """The guest cannot do what was asked (no mode set, a mode the device refuses, ...)."""


# ------------------------------------------------------------------------------------------- mdevs

def create_mdev(parent: str, type_glob: str, timeout: float = 10.0) -> str:
    """Create a mediated device of the first type of `parent` matching `type_glob` (e.g. "mbochs",
    "mbochs-small" or "mdpy", "mdpy-*"); returns its UUID once it shows in /sys/bus/mdev/devices."""
    types_dir = MDEV_BUS / parent / "mdev_supported_types"
    types = sorted(types_dir.glob(type_glob))
    if not types:
        offered = sorted(p.name for p in types_dir.glob("*")) if types_dir.is_dir() else []
        raise FileNotFoundError(f"{parent} offers no mdev type matching {type_glob!r} "
                                f"(offered: {', '.join(offered) or f'none; is {parent} loaded?'})")
    name = str(uuidlib.uuid4())
    (types[0] / "create").write_text(name)
    deadline = time.monotonic() + timeout
    while not (MDEV_DEVICES / name / "iommu_group").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"mdev {name} ({types[0].name}) did not appear within {timeout:.0f} s")
        time.sleep(0.02)
    return name


def remove_mdev(uuid: str) -> None:
    """Remove a mediated device; nothing if it is gone already. The kernel waits until every fd of
    the device is closed, so close them first or this blocks."""
    try:
        (MDEV_DEVICES / uuid / "remove").write_text("1")
    except FileNotFoundError:
        pass


# ------------------------------------------------------------------------------------------ guests

class _Guest:
    """What both guests share: a device, a framebuffer mapping, and drawing synthetic frames."""

    kind = ""

    def __init__(self, device: VfioDevice, *, close_device: bool = True) -> None:
        self.device = device
        self._close_device = close_device
        self._maps: list[mmap.mmap] = []
        self._background: tuple[tuple[str, int, int], np.ndarray, tuple[int, int, int]] | None = None

    def _map(self, index: int) -> mmap.mmap:
        region = self.device.region(index)
        size, offset = region.size, region.offset
        try:
            mapping = mmap.mmap(self.device.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                offset=offset)
        except OSError as exc:
            raise VfioError(exc.errno, f"mmap of region {index} of {self.device.name} "
                            f"({size} bytes at {offset:#x}): {exc.strerror}") from None
        self._maps.append(mapping)
        return mapping

    def _draw_into(self, mapping: mmap.mmap, width: int, height: int, name: str, n: int) -> None:
        check_size(width, height)
        key = (name, width, height)
        if self._background is None or self._background[0] != key:
            background = np.empty((height, width, 4), dtype=np.uint8)
            draw_background(background, name)
            self._background = (key, background, ink_colour(guest_colour(name)))
        _, background, ink = self._background
        view = xrgb_view(mapping, width, height, width * 4)
        try:
            view[:] = background
            draw_counter(view, n)
            draw_bar(view, n, background, ink)
        finally:
            del view  # the mapping cannot close while a view exports it

    def draw(self, name: str, n: int) -> None:
        raise NotImplementedError

    def set_mode(self, width: int, height: int) -> None:
        raise NotImplementedError

    def disable(self) -> None:
        raise NotImplementedError

    def read_edid_as_guest(self) -> bytes:
        raise NotImplementedError

    @property
    def mode(self) -> tuple[int, int] | None:
        raise NotImplementedError

    def close(self) -> None:
        for mapping in self._maps:
            mapping.close()
        self._maps.clear()
        if self._close_device:
            self.device.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BochsGuest(_Guest):
    """The bochs DRM driver of an mbochs vGPU (see the module docstring for the registers)."""

    kind = "bochs"

    def __init__(self, device: VfioDevice, *, close_device: bool = True) -> None:
        super().__init__(device, close_device=close_device)
        try:
            self._mmio = device.region(BAR2).offset
            ident = self._read_dispi(DISPI_ID)
            if ident != DISPI_ID5:
                raise VgpuGuestError(f"{device.name} is not a bochs display: dispi ID reads {ident:#06x}, "
                                     f"not {DISPI_ID5:#06x}")
            self._vram = self._map(BAR0)
        except BaseException:
            self.close()
            raise
        self._mode: tuple[int, int] | None = None

    @classmethod
    def open(cls, uuid: str) -> BochsGuest:
        return cls(VfioDevice.open(uuid))

    @property
    def vram_size(self) -> int:
        return len(self._vram)

    @property
    def mode(self) -> tuple[int, int] | None:
        """The mode this guest set (None: none yet, or disabled)."""
        return self._mode

    def _write_dispi(self, index: int, value: int) -> None:
        os.pwrite(self.device.fd, struct.pack("<H", value), self._mmio + DISPI_MMIO + 2 * index)

    def _read_dispi(self, index: int) -> int:
        return struct.unpack("<H", os.pread(self.device.fd, 2, self._mmio + DISPI_MMIO + 2 * index))[0]

    def set_mode(self, width: int, height: int) -> None:
        """XRGB8888 width x height, scanned out from VRAM offset 0 with stride width * 4."""
        if not (BOCHS_MIN_SIDE <= width <= 0xFFFF and BOCHS_MIN_SIDE <= height <= 0xFFFF):
            raise VgpuGuestError(f"mbochs takes modes of {BOCHS_MIN_SIDE}..65535 pixels a side, "
                                 f"not {width}x{height}")
        if width * height * 4 > self.vram_size:
            raise VgpuGuestError(f"{width}x{height} XRGB8888 needs {width * height * 4} bytes; "
                                 f"{self.device.name} has {self.vram_size} bytes of VRAM")
        for index, value in ((DISPI_ENABLE, DISPI_DISABLED), (DISPI_BPP, 32), (DISPI_XRES, width),
                             (DISPI_YRES, height), (DISPI_BANK, 0), (DISPI_VIRT_WIDTH, width),
                             (DISPI_VIRT_HEIGHT, height), (DISPI_X_OFFSET, 0), (DISPI_Y_OFFSET, 0),
                             (DISPI_ENABLE, DISPI_ENABLED | DISPI_LFB_ENABLED)):
            self._write_dispi(index, value)
        self._mode = (width, height)

    def disable(self) -> None:
        """Turn the display off: the plane query then answers a disabled plane."""
        self._write_dispi(DISPI_ENABLE, DISPI_DISABLED)
        self._mode = None

    def draw(self, name: str, n: int) -> None:
        """Draw frame n of guest `name` for the current mode into VRAM at offset 0."""
        if self._mode is None:
            raise VgpuGuestError(f"{self.device.name}: set a mode before drawing")
        self._draw_into(self._vram, *self._mode, name, n)

    def read_edid_as_guest(self) -> bytes:
        """The EDID the guest's driver sees in BAR2 (base block and extensions); b"" while the host
        holds the link down or wrote no EDID (mbochs then shows zeros)."""
        base = self._mmio + BOCHS_EDID_MMIO
        block = os.pread(self.device.fd, EDID_BLOCK, base)
        if block[:8] != EDID_HEADER:
            return b""
        size = min(EDID_BLOCK * (1 + block[126]), BOCHS_EDID_MAX)
        if size > EDID_BLOCK:
            block += os.pread(self.device.fd, size - EDID_BLOCK, base + EDID_BLOCK)
        return block


class MdpyGuest(_Guest):
    """The mdpy-fb driver of an mdpy vGPU: a fixed mode, a framebuffer in BAR0."""

    kind = "mdpy"

    def __init__(self, device: VfioDevice, *, close_device: bool = True) -> None:
        super().__init__(device, close_device=close_device)
        try:
            config = device.region(CONFIG).offset
            cap_id = os.pread(device.fd, 1, config + MDPY_VENDORCAP)[0]
            fmt, width, height = struct.unpack("<III", os.pread(device.fd, 12, config + MDPY_FORMAT))
            if cap_id != 0x09 or fmt != DRM_FORMAT_XRGB8888 or not width or not height:
                raise VgpuGuestError(f"{device.name} is not an XRGB8888 mdpy display (vendor capability "
                                     f"{cap_id:#x}, format {fmt:#x}, {width}x{height})")
            self.size = (width, height)
            self.stride = width * 4
            self._fb = self._map(BAR0)
            if len(self._fb) < self.stride * height:
                raise VgpuGuestError(f"{device.name}: BAR0 of {len(self._fb)} bytes does not hold "
                                     f"{width}x{height}")
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, uuid: str) -> MdpyGuest:
        return cls(VfioDevice.open(uuid))

    @property
    def mode(self) -> tuple[int, int]:
        return self.size

    def set_mode(self, width: int, height: int) -> None:
        """mdpy's mode is its mdev type's: only that one is accepted."""
        if (width, height) != self.size:
            raise VgpuGuestError(f"mdpy has one mode, {self.size[0]}x{self.size[1]}, set by its mdev "
                                 f"type; not {width}x{height}")

    def disable(self) -> None:
        raise VgpuGuestError("mdpy cannot turn its display off")

    def draw(self, name: str, n: int) -> None:
        """Draw frame n of guest `name` into the framebuffer (BAR0, the display region's memory)."""
        self._draw_into(self._fb, *self.size, name, n)

    def read_edid_as_guest(self) -> bytes:
        return b""  # mdpy has no EDID


GUEST_KINDS: dict[str, type[_Guest]] = {"bochs": BochsGuest, "mdpy": MdpyGuest}


def guest_for(kind: str, device: VfioDevice, *, close_device: bool = True) -> BochsGuest | MdpyGuest:
    try:
        cls = GUEST_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown guest kind {kind!r} (known: {', '.join(GUEST_KINDS)})") from None
    return cls(device, close_device=close_device)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------- control server

def handle_request(guest: _Guest, request: Any) -> dict[str, Any]:
    """One request's answer; never raises for a bad request (the answer says what was wrong)."""
    try:
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            raise ValueError('a request is a JSON object with a string "cmd"')
        cmd = request["cmd"]
        if cmd == "mode":
            guest.set_mode(_int(request, "width"), _int(request, "height"))
            return {"ok": True}
        if cmd == "draw":
            name = request.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError('draw needs a non-empty string "name"')
            guest.draw(name, _int(request, "frame"))
            return {"ok": True}
        if cmd == "disable":
            guest.disable()
            return {"ok": True}
        if cmd == "edid":
            return {"ok": True, "edid": guest.read_edid_as_guest().hex()}
        if cmd == "info":
            mode = guest.mode
            return {"ok": True, "kind": guest.kind, "device": guest.device.name, "enabled": mode is not None,
                    "width": mode[0] if mode else 0, "height": mode[1] if mode else 0}
        if cmd == "quit":
            return {"ok": True}
        raise ValueError(f"unknown cmd {cmd[:40]!r} (mode, draw, disable, edid, info, quit)")
    except (VgpuGuestError, ValueError, OSError) as exc:
        return {"ok": False, "error": str(exc)}


def _int(request: dict[str, Any], key: str) -> int:
    value = request.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f'"{key}" must be a non-negative integer, not {value!r}')
    return value


def _listen(path: str) -> socket.socket:
    """A listening Unix socket at path, replacing a stale one (nobody listening)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
        else:
            raise OSError(f"another process already listens on {path}")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(4)
    except BaseException:
        listener.close()
        raise
    return listener


class ControlServer:
    """Serves control requests for one guest on a Unix socket until "quit" (or a signal). Any number of
    clients, one request per line each, answered in order."""

    def __init__(self, guest: _Guest, path: str, frame_socket: FrameSocketClient | None = None,
                 keyboard: str | None = None) -> None:
        self.guest = guest
        # The VM's keyboard as a VMM would take it (QEMU's input-linux): the evdev device directflip
        # made for this guest. "keys" answers the (code, value) key events read from it so far.
        self.keyboard_fd = os.open(keyboard, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC) if keyboard else None
        self.keys: list[tuple[int, int]] = []
        self.path = path
        self.frame_socket = frame_socket  # a FrameSocketClient kept open (the compositor shows us)
        self._sel = selectors.DefaultSelector()
        self._listener = _listen(path)
        self._inode = os.stat(path).st_ino
        self._buffers: dict[socket.socket, bytearray] = {}
        self._quit = False

    def serve(self) -> None:
        self._sel.register(self._listener, selectors.EVENT_READ, "accept")
        if self.frame_socket is not None:
            self._sel.register(self.frame_socket.fileno(), selectors.EVENT_READ, "frames")
        if self.keyboard_fd is not None:
            self._sel.register(self.keyboard_fd, selectors.EVENT_READ, "keyboard")
        log.info("%s guest %s: control socket %s", self.guest.kind, self.guest.device.name, self.path)
        while not self._quit:
            for key, _ in self._sel.select():
                if key.data == "accept":
                    conn, _ = self._listener.accept()
                    self._buffers[conn] = bytearray()
                    self._sel.register(conn, selectors.EVENT_READ, "client")
                elif key.data == "frames":
                    self._on_frame_socket()
                elif key.data == "keyboard":
                    self._on_keyboard()
                else:
                    self._on_client(key.fileobj)  # type: ignore[arg-type]

    def _on_frame_socket(self) -> None:
        from compositor.sources.framesocket import ServerError

        assert self.frame_socket is not None
        try:
            self.frame_socket.poll(0)  # the compositor says nothing a vGPU needs; drain it
        except ServerError as exc:
            log.warning("frame socket: %s; the guest keeps running, unseen", exc)
            self._sel.unregister(self.frame_socket.fileno())
            self.frame_socket.close()
            self.frame_socket = None

    def _on_keyboard(self) -> None:
        from evdev import _input as evdev_io
        from evdev import ecodes

        assert self.keyboard_fd is not None
        try:
            events = evdev_io.device_read_many(self.keyboard_fd)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("keyboard: %s", exc)
            self._sel.unregister(self.keyboard_fd)
            os.close(self.keyboard_fd)
            self.keyboard_fd = None
            return
        self.keys += [(code, value) for _s, _u, etype, code, value in events if etype == ecodes.EV_KEY]

    def _on_client(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        buf = self._buffers[conn]
        buf += data
        while (end := buf.find(b"\n")) >= 0:
            line, buf[:] = bytes(buf[:end]), buf[end + 1:]
            if not line.strip():
                continue
            try:
                request = json.loads(line)
            except ValueError as exc:
                answer: dict[str, Any] = {"ok": False, "error": f"not JSON: {exc}"}
            else:
                if isinstance(request, dict) and request.get("cmd") == "keys":
                    answer = {"ok": True, "keys": self.keys}
                else:
                    answer = handle_request(self.guest, request)
                if answer["ok"] and request.get("cmd") == "quit":
                    self._quit = True
            try:
                conn.sendall(json.dumps(answer).encode() + b"\n")
            except OSError:
                self._drop(conn)
                return
            if self._quit:
                return

    def _drop(self, conn: socket.socket) -> None:
        self._sel.unregister(conn)
        self._buffers.pop(conn, None)
        conn.close()

    def close(self) -> None:
        for conn in list(self._buffers):
            self._drop(conn)
        self._sel.close()
        self._listener.close()
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self.frame_socket is not None:
            self.frame_socket.close()
            self.frame_socket = None
        if self.keyboard_fd is not None:
            os.close(self.keyboard_fd)
            self.keyboard_fd = None


class VgpuGuestControl:
    """Client of a control server: connects (retrying until the socket exists, up to `timeout`
    seconds) and sends one request per call. A refused request raises VgpuGuestError."""

    def __init__(self, path: str, timeout: float = CONTROL_TIMEOUT, *,
                 process: subprocess.Popen | None = None) -> None:
        """`process`: the guest's process, if the caller launched it; its exit ends the wait at once."""
        self.path = path
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if process is not None and process.poll() is not None:
                    raise ConnectionError(f"the vGPU guest exited ({process.returncode}) before it "
                                          f"served {path}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no vGPU guest control socket at {path} after {timeout:.0f} s "
                                       f"({exc.strerror})") from None
                time.sleep(0.05)
        sock.settimeout(CALL_TIMEOUT)
        self._sock = sock
        self._file = sock.makefile("rb")

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        line = self._file.readline()
        if not line:
            raise ConnectionError(f"the vGPU guest on {self.path} closed the control connection")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise VgpuGuestError(f"vGPU guest ({request.get('cmd')}): {answer.get('error')}")
        return answer

    def mode(self, width: int, height: int) -> None:
        self.call({"cmd": "mode", "width": width, "height": height})

    def draw(self, name: str, n: int) -> None:
        self.call({"cmd": "draw", "name": name, "frame": n})

    def disable(self) -> None:
        self.call({"cmd": "disable"})

    def edid(self) -> bytes:
        return bytes.fromhex(self.call({"cmd": "edid"})["edid"])

    def info(self) -> dict[str, Any]:
        return self.call({"cmd": "info"})

    def keys(self) -> list[tuple[int, int]]:
        """The (code, value) key events the guest's keyboard device delivered (with --keyboard)."""
        return [tuple(k) for k in self.call({"cmd": "keys"})["keys"]]

    def quit(self) -> None:
        """Ask the guest to exit, and close this connection."""
        try:
            self.call({"cmd": "quit"})
        finally:
            self.close()

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> VgpuGuestControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------ CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m directflip_tools.lab.vgpu_guest",
        description="Play the guest OS of an mbochs or mdpy vGPU, driven over a control socket.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--fd", type=int, help="an open VFIO device fd inherited from the launcher")
    source.add_argument("--uuid", help="open this mdev through its IOMMU group")
    parser.add_argument("--kind", required=True, choices=sorted(GUEST_KINDS))
    parser.add_argument("--control", required=True, metavar="PATH", help="Unix socket to serve on")
    parser.add_argument("--frame-socket", metavar="PATH",
                        help="also hand the device fd to the compositor on this frame socket")
    parser.add_argument("--name", help="the guest's name on the frame socket (default: the mdev UUID or "
                                       "vgpu-fdN)")
    parser.add_argument("--keyboard", metavar="PATH",
                        help="read the VM's keyboard from this evdev device (directflip's {keyboard})")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="vgpu-guest: %(message)s")
    name = args.name or args.uuid or f"vgpu-fd{args.fd}"

    # SIGTERM ends the server like quit does: the socket file is removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        device = VfioDevice.open(args.uuid) if args.uuid else VfioDevice(args.fd, name)
        guest = guest_for(args.kind, device)
    except (OSError, VgpuGuestError) as exc:
        log.error("%s", exc)
        return 1
    frames = server = None
    try:
        if args.frame_socket:
            from compositor.sources.framesocket import FrameSocketClient

            frames = FrameSocketClient(args.frame_socket, name, uuid=args.uuid)
            frames.hand_over_vfio(device.fd)
        server = ControlServer(guest, args.control, frames, keyboard=args.keyboard)
        frames = None  # the server owns it now
        server.serve()
        return 0
    except Exception as exc:
        log.error("%s", exc)
        return 1
    finally:
        if server is not None:
            server.close()
        if frames is not None:
            frames.close()
        guest.close()


if __name__ == "__main__":
    sys.exit(main())
