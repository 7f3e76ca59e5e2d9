"""VT switching on the bare console (direct session): switching away gives the screens back to the
console and holds no DRM master; switching back restores every guest. Pixels from QEMU screendumps.

The lab kernel has VTs and fbcon on virtio-gpu's fbdev (tty1 in the foreground at boot)."""

from __future__ import annotations

import socket
import time

import pytest
from labkit import Compositor, colour_share, console_text, switch_away, switch_back

from compositor.session import activate_vt, active_vt
from compositor.sources.synthetic import guest_colour

POLICY = """version: 1
monitors:
  left:   {connector: Virtual-1, driver: virtio_gpu}
  centre: {connector: Virtual-2, driver: virtio_gpu}
  right:  {connector: Virtual-3, driver: virtio_gpu}
  wb:     {connector: "Virtual-*", driver: vkms}
guests:
  office: {kind: socket}
  media:  {kind: socket}
  build:  {kind: socket}
placements:
  - {guest: office, monitor: left, mirror: [wb]}
  - {guest: media, monitor: centre}
  - {guest: build, monitor: right}
"""
SHOWN = (("left", "office", 0), ("centre", "media", 1), ("right", "build", 2))
OUR_VT = 2


def start_guests(comp: Compositor) -> None:
    """The three guests of SHOWN, each on its head."""
    for _, name, _ in SHOWN:
        comp.guest("--name", name, "--on", "display", "--size", "640x480", "--rate", "30",
                   "--duration", "600")
    for monitor, name, _ in SHOWN:
        comp.wait_shown(monitor, name)


@pytest.fixture(scope="module")
def notify_socket(tmp_path_factory):
    """A stand-in for systemd's notify socket: what a Type=notify unit's daemon sends arrives here."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path_factory.mktemp("notify") / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(0.2)
    yield sock, str(path)
    sock.close()


def notifications(sock: socket.socket) -> list[str]:
    got = []
    while True:
        try:
            got += sock.recv(4096).decode().splitlines()
        except TimeoutError:
            return got


@pytest.fixture(scope="module")
def comp(cards, host, tmp_path_factory, notify_socket):
    activate_vt(1)
    console_text()
    c = Compositor(tmp_path_factory.mktemp("session"))
    c.start(POLICY, "--vt", str(OUR_VT), env={"NOTIFY_SOCKET": notify_socket[1], "WATCHDOG_USEC": "400000"})
    start_guests(c)
    yield c
    code = c.stop()
    print(c.tail(15))
    assert code == 0
    assert active_vt() == OUR_VT   # stopping does not switch VTs; the console is usable again
    activate_vt(1)


def test_the_compositor_switches_to_its_vt_and_shows_the_guests(comp, host):
    assert active_vt() == OUR_VT
    st = comp.status()
    assert st["session"]["kind"] == "direct" and st["session"]["vt"] == OUR_VT
    assert st["session"]["paused"] == {}
    assert all(c["master"] for c in st["cards"]), st["cards"]
    for _, name, head in SHOWN:
        assert colour_share(host.screendump(head), guest_colour(name)) > 0.2, f"head {head} lacks {name}"
    comp.wait_shown("wb", "office")     # the mirror on the vkms card


def test_ready_and_watchdog_reach_the_notify_socket(comp, notify_socket):
    time.sleep(1.0)
    got = notifications(notify_socket[0])
    assert "READY=1" in got, got
    assert f"MAINPID={comp.proc.pid}" in got
    assert got.count("WATCHDOG=1") >= 3, got      # every 0.2 s, from the daemon's loop
    assert got.index("READY=1") < len(got)
    status = next(line for line in got if line.startswith("STATUS="))
    assert "3 guest" in status or "output" in status, status


def test_switching_away_shows_the_console_and_holds_no_master(comp, host):
    st = switch_away(comp, host)
    assert "switched away" in next(iter(st["session"]["paused"].values()))


def test_switching_back_restores_every_guest(comp, host):
    switch_back(comp, host, OUR_VT, SHOWN)
