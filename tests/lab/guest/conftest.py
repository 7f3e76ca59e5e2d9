"""Fixtures for tests that run inside the lab VM (``python -m directflip_tools.lab test``).

- ``host``: the services of the host that booted us: ``screendump(head)`` -> RGB array (H, W, 3),
  ``plug(head, width, height)``, ``unplug(head)``, ``ping()``. Heads are virtio-gpu's outputs, 0-based
  (head N is connector Virtual-(N+1) on the virtio_gpu card); ``boot_sizes`` are their sizes at boot.
- ``cards``: DRM driver name (``virtio_gpu``, ``vkms``, ``vgem``) -> ``/dev/dri/cardN``.

Outside the lab these fixtures fail, loudly: nothing here is ever skipped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from directflip_tools.lab.channel import HostChannel
from directflip_tools.lab.guest import lab_cards
from directflip_tools.lab.vm import DEFAULT_HEAD_SIZES


def decode_ppm(data: bytes) -> np.ndarray:
    """Binary PPM (P6, maxval 255) -> uint8 array (H, W, 3)."""
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:
        while data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while not data[end:end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    magic, width, height, maxval = fields[0], int(fields[1]), int(fields[2]), int(fields[3])
    if magic != b"P6" or maxval != 255:
        raise ValueError(f"unsupported PPM: {magic!r} maxval {maxval}")
    pixels = data[pos + 1: pos + 1 + width * height * 3]
    if len(pixels) != width * height * 3:
        raise ValueError(f"truncated PPM: {len(pixels)} of {width * height * 3} pixel bytes")
    return np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, 3)


class Host:
    """What the host offers to guest tests; every call blocks until the host has done it."""

    boot_sizes = DEFAULT_HEAD_SIZES

    def __init__(self, channel: HostChannel) -> None:
        self.channel = channel

    def ping(self) -> dict:
        return self.channel.ping()

    def screendump_file(self, head: int, fmt: str = "ppm") -> Path:
        """Ask QEMU for a dump of one head; returns the file (in the shared directory)."""
        reply = self.channel.screendump(head, fmt)
        path = Path(reply["path"])
        # The shared directory is 9p: the host's write may take a moment to show at full size.
        deadline = time.monotonic() + 5
        while True:
            try:
                if path.stat().st_size == reply["size"]:
                    return path
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} did not reach {reply['size']} bytes")
            time.sleep(0.02)

    def screendump(self, head: int) -> np.ndarray:
        """The exact pixels QEMU shows for one head: uint8 array (H, W, 3), RGB."""
        path = self.screendump_file(head, "ppm")
        try:
            return decode_ppm(path.read_bytes())
        finally:
            path.unlink(missing_ok=True)

    def plug(self, head: int, width: int, height: int) -> None:
        """Connect (or resize) a monitor: the guest gets a real HOTPLUG uevent."""
        self.channel.plug(head, width, height)

    def unplug(self, head: int) -> None:
        self.channel.unplug(head)

    # Input through the VM's virtio keyboard, mouse and tablet (QMP input-send-event): the lab kernel
    # sees them as evdev events of real devices.
    def keys(self, *qcodes: str, down: bool | None = None) -> None:
        """Tap each key (QEMU qcode names: "a", "ctrl", "alt", "f2") in turn, or only press
        (down=True) or release (down=False) them, all in one QMP call."""
        events = []
        for q in qcodes:
            for d in ((True, False) if down is None else (down,)):
                events.append({"type": "key", "data": {"down": d, "key": {"type": "qcode", "data": q}}})
        self.channel.input(events)

    def move(self, dx: int, dy: int) -> None:
        """Relative motion of the virtio mouse."""
        self.channel.input([{"type": "rel", "data": {"axis": "x", "value": dx}},
                            {"type": "rel", "data": {"axis": "y", "value": dy}}])

    def tablet(self, x: int, y: int) -> None:
        """The virtio tablet at (x, y) of 0..32767 (its whole range spans the seat's layout)."""
        self.channel.input([{"type": "abs", "data": {"axis": "x", "value": x}},
                            {"type": "abs", "data": {"axis": "y", "value": y}}])

    def click(self, button: str = "left") -> None:
        self.channel.input([{"type": "btn", "data": {"down": True, "button": button}}])
        self.channel.input([{"type": "btn", "data": {"down": False, "button": button}}])


@pytest.fixture(scope="module", autouse=True)
def no_compositor_outlives_its_module():
    """Set up before a module's other fixtures, torn down after them: a compositor a failed fixture
    left running is killed here, so it cannot hold DRM master over the next module's tests."""
    import labkit

    yield
    killed = labkit.kill_leftovers()
    if killed:
        print(f"killed compositor(s) left running: pids {killed}")


@pytest.fixture(scope="session")
def host() -> Host:
    try:
        channel = HostChannel.from_env()
    except Exception as exc:
        pytest.fail(str(exc), pytrace=False)
    return Host(channel)


@pytest.fixture(scope="session")
def cards() -> dict[str, str]:
    try:
        return lab_cards()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def debugfs() -> Path:
    """The DRM debugfs root, mounting debugfs if needed."""
    root = Path("/sys/kernel/debug")
    if not (root / "dri").is_dir():
        os.system("mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null")
    if not (root / "dri").is_dir():
        pytest.fail("debugfs (/sys/kernel/debug/dri) is not available in the guest", pytrace=False)
    return root / "dri"
