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
