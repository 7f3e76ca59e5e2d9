"""QEMU VMs through `-display dbus`. A real qemu-system-x86_64 (TCG, inside the lab guest) with a
std VGA: its SeaBIOS screen, which nobody here drew, appears on its policy monitor; killing it gives
the slate and starting it again brings the picture back, without restarting directflip. And a peer
speaking QEMU's interface on a private bus with vgem dma-bufs: zero copy on vkms, where the writeback
connector shows the buffer's new content with no new scanout. Pixels: QEMU screendumps of our monitor
compared with the inner VM's own screendump, and vkms writeback."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from labkit import Compositor, colour_share, wait_for
from PIL import Image

from compositor.control import request

POLICY = """version: 1
monitors:
  left:   {{connector: Virtual-1, driver: virtio_gpu}}
  centre: {{connector: Virtual-2, driver: virtio_gpu, scaling: none}}
  wb:     {{connector: "Virtual-*", driver: vkms, mode: match-guest}}
guests:
  vm:   {{kind: qemu-dbus, display: "qmp:{qmp}"}}
  menu: {{kind: qemu-dbus, display: "qmp:{menu_qmp}"}}
  peer: {{kind: qemu-dbus, display: "dbus:unix:path={bus}"}}
placements:
  - {{guest: vm, monitor: left}}
  - {{guest: menu, monitor: centre}}
  - {{guest: peer, monitor: wb}}
"""


def start_vm(qmp: Path, log: Path, *extra: str) -> subprocess.Popen:
    """A VM with no disk: SeaBIOS draws its text screen and waits for a bootable device."""
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu, "qemu-system-x86_64 missing (the lab installs qemu-system-x86)"
    return subprocess.Popen(
        [qemu, "-nodefaults", "-machine", "pc", "-accel", "tcg", "-m", "32", "-vga", "std", "-name", "inner",
         "-display", "dbus,p2p=yes", "-qmp", f"unix:{qmp},server=on,wait=off", *extra],
        stdout=log.open("w"), stderr=subprocess.STDOUT)


def vm_text(qmp: Path) -> str:
    """The inner VM's VGA text screen (80x25 at 0xb8000, character and attribute bytes), read through
    its monitor: what SeaBIOS wrote, whatever the pixels look like."""
    from qemu.qmp import QMPClient

    async def read() -> str:
        client = QMPClient("test")
        await client.connect(str(qmp))
        try:
            return await client.execute("human-monitor-command", {"command-line": "xp /4000xb 0xb8000"})
        finally:
            await client.disconnect()

    data = bytes(int(word, 16) for line in asyncio.run(read()).splitlines()
                 for word in line.split(":", 1)[-1].split())
    chars = "".join(chr(b) if 32 <= b < 127 else " " for b in data[::2])
    return "\n".join(chars[i:i + 80].rstrip() for i in range(0, len(chars), 80))


def vm_screendump(qmp: Path, path: Path) -> np.ndarray:
    """The inner VM's own picture, through its QMP (a second QMP client next to directflip's)."""
    from qemu.qmp import QMPClient

    async def dump() -> None:
        client = QMPClient("test")
        await client.connect(str(qmp))
        try:
            await client.execute("screendump", {"filename": str(path)})
        finally:
            await client.disconnect()

    asyncio.run(dump())
    return np.asarray(Image.open(path).convert("RGB"))


def placed(out: dict) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the guest on the monitor, from the status' `dst` (WxH+X+Y)."""
    size, x, y = out["dst"].split("+")
    w, h = size.split("x")
    return int(x), int(y), int(w), int(h)


def text_pixels(rgb: np.ndarray) -> float:
    return float(np.mean(np.any(rgb > 40, axis=-1)))


@pytest.fixture(scope="module")
def lab(cards, tmp_path_factory):
    work = tmp_path_factory.mktemp("qemu-dbus")
    qmp, bus = work / "vm.qmp", work / "peer.bus"
    daemon = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--nopidfile",
                               f"--address=unix:path={bus}"], stderr=subprocess.STDOUT,
                              stdout=(work / "dbus.log").open("w"))
    peer = subprocess.Popen([sys.executable, "-m", "directflip_tools.qemu_peer", "serve",
                             "--bus", f"unix:path={bus}", "--name", "peer-vm", "--on", "vgem",
                             "--mode", "dmabuf", "--buffers", "1", "--rate", "20"],
                            stdout=(work / "peer.log").open("w"), stderr=subprocess.STDOUT)
    vm = start_vm(qmp, work / "vm.log")
    comp = Compositor(work)
    comp.start(POLICY.format(qmp=qmp, bus=bus, menu_qmp=work / "menu.qmp"))
    comp.work, comp.qmp, comp.vm = work, qmp, vm
    yield comp
    code = comp.stop()
    for proc in (comp.vm, peer, daemon):
        proc.terminate()
        proc.wait(timeout=20)
    print(comp.tail(25))
    assert code == 0


def vm_matches_monitor(lab, host, name: str) -> float:
    """The share of the inner VM's pixels that our head 0 shows identically (1:1, where the plan put it)."""
    out = lab.wait_shown("left", "vm", timeout=120)
    mine = host.screendump(0)
    theirs = vm_screendump(lab.qmp, lab.work / f"{name}.ppm")
    x, y, w, h = placed(out)
    if (h, w) != theirs.shape[:2]:
        return 0.0  # the VM changed mode between the two dumps
    return float(np.mean(np.all(mine[y:y + h, x:x + w] == theirs, axis=-1)))


def test_a_real_vm_boot_screen_appears_on_its_monitor(lab, host):
    # SeaBIOS writes its banner and "No bootable device" within a minute or so under nested TCG.
    wait_for("SeaBIOS text on the VM's screen",
             lambda: text_pixels(vm_screendump(lab.qmp, lab.work / "probe.ppm")) > 0.003, timeout=180)
    share = wait_for("head 0 showing the VM's picture",
                     lambda: (s := vm_matches_monitor(lab, host, "vm")) > 0.98 and s, timeout=60)
    out = lab.output("left")
    guest = next(g for g in lab.status()["guests"] if g["name"] == "vm")
    print(f"vm on left: {out['dst']} via {out['path']}, {share:.4f} of the VM's pixels identical; "
          f"qemu {guest['qemu']['state']}, {guest['qemu']['path']}")
    assert guest["qemu"]["state"] == "connected"
    x, y, w, h = placed(out)
    assert text_pixels(host.screendump(0)[y:y + h, x:x + w]) > 0.003   # text, not an empty screen


def test_killing_the_vm_gives_the_slate_and_a_restart_brings_it_back(lab, host):
    x, y, w, h = placed(lab.output("left"))
    shown = host.screendump(0)[y:y + h, x:x + w]
    lab.vm.kill()
    lab.vm.wait(timeout=20)
    out = wait_for("left showing the slate", lambda: (o := lab.output("left"))["path"] == "slate" and o,
                   timeout=30)
    print("after the kill:", out["reason"])

    def vm_picture_gone():
        now = host.screendump(0)
        return float(np.mean(np.all(now[y:y + h, x:x + w] == shown, axis=-1))) < 0.5 and now

    slate = wait_for("the VM's picture gone from head 0", vm_picture_gone)
    assert colour_share(slate, (0, 0, 0)) < 0.99   # the slate is drawn, not a dark screen
    lab.vm = start_vm(lab.qmp, lab.work / "vm2.log")
    share = wait_for("the restarted VM on head 0",
                     lambda: (s := vm_matches_monitor(lab, host, "vm2")) > 0.98 and s, timeout=240)
    print(f"restarted: {share:.4f} of the VM's pixels identical on head 0")
    assert lab.proc.poll() is None   # the same compositor all along


def wb_bar(lab, name: str) -> int | None:
    """Where the peer's moving white bar is on the vkms writeback picture (its left column); None when
    the capture caught the peer mid-draw (one buffer, drawn in place: the gradient first, then the bar)."""
    rgb = lab.capture("wb", lab.work / f"{name}.png")
    white = np.all(rgb == 255, axis=-1).all(axis=0)
    cols = np.nonzero(white)[0]
    return int(cols[0]) if cols.size else None


def test_dmabuf_peer_is_zero_copy_and_followed_without_new_scanouts(lab):
    lab.wait_shown("wb", "peer", path="zero-copy", timeout=60)
    guest = next(g for g in lab.status()["guests"] if g["name"] == "peer")
    assert guest["qemu"]["path"] == "dmabuf", guest
    # its frames go through the data plane (the daemon reads QEMU's calls, the data plane commits)
    out = wait_for("wb on the data plane", lambda: (o := lab.output("wb"))["data_plane"] and o, timeout=30)
    commits = out["commits"]
    first = wait_for("the peer's bar on the writeback picture", lambda: wb_bar(lab, "wb1"), timeout=20)
    second = wait_for("the bar moving on the writeback picture",
                      lambda: (x := wb_bar(lab, "wb2")) not in (None, first) and x, timeout=20)
    after = lab.output("wb")
    print(f"peer on wb: zero-copy, bar at x={first} then x={second}; commits {commits} -> {after['commits']}")
    assert after["commits"] == commits, "a new scanout commit was made for an in-place update"
    assert after["path"] == "zero-copy"


def screen_with(qmp: Path, text: str) -> str | None:
    """The VM's text screen once it shows `text`; None before (or before its QMP socket is there)."""
    from qemu.qmp import ConnectError

    try:
        screen = vm_text(qmp)
    except ConnectError:
        return None
    return screen if text in screen else None


def test_a_key_on_the_lab_keyboard_opens_seabios_boot_menu(lab, host):
    """The lab's virtio keyboard (QMP input-send-event into the lab kernel's evdev) → directflip →
    the VM's Keyboard.Press over D-Bus: ESC at SeaBIOS' prompt opens its boot menu, on head 1."""
    qmp = lab.work / "menu.qmp"
    vm = start_vm(qmp, lab.work / "menu.log", "-boot", "menu=on,splash-time=65535")
    try:
        prompt = wait_for("SeaBIOS' boot menu prompt", lambda: screen_with(qmp, "ESC"), timeout=240)
        print(prompt.strip().splitlines()[-1])
        lab.wait_shown("centre", "menu", timeout=120)
        request(lab.control, {"cmd": "focus", "monitor": "centre"})
        wait_for("the VM's keyboard connected", lambda: next(
            g for g in lab.status()["guests"] if g["name"] == "menu")["qemu"]["input"]["keyboard"])
        host.keys("esc")
        menu = wait_for("SeaBIOS' boot menu", lambda: screen_with(qmp, "Select boot device"), timeout=120)
        print(menu.strip())
        out = lab.output("centre")

        def on_head() -> float | None:
            mine, theirs = host.screendump(1), vm_screendump(qmp, lab.work / "menu.ppm")
            x, y, w, h = placed(lab.output("centre"))
            if (h, w) != theirs.shape[:2]:
                return None
            share = float(np.mean(np.all(mine[y:y + h, x:x + w] == theirs, axis=-1)))
            return share if share > 0.98 else None

        share = wait_for("the boot menu on head 1", on_head, timeout=60)
        print(f"menu on centre: {out['dst']} via {out['path']}, {share:.4f} of the VM's pixels identical")
    finally:
        vm.terminate()
        vm.wait(timeout=20)

