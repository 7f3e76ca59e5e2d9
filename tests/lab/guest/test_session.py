"""VT switching on the bare console (direct session): switching away gives the screens back to the
console and holds no DRM master; switching back restores every guest. Pixels from QEMU screendumps.

The lab kernel has VTs and fbcon on virtio-gpu's fbdev (tty1 in the foreground at boot)."""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest
from labkit import LAB_MONITORS, Compositor, colour_share, console_text, switch_away, switch_back

from compositor.session import activate_vt, active_vt
from directflip_tools.synthetic import guest_colour

POLICY = """version: 1
""" + LAB_MONITORS + """guests:
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
    """A stand-in for systemd's notify socket: what a Type=notify unit's daemon sends arrives here.
    It is read all along, as systemd reads its own: a datagram socket holds only net.unix.max_dgram_qlen
    datagrams unread (the kernel's default is 10; systemd raises it to 512 where it boots the machine),
    so left unread through the first tests it would fill up with the watchdog's pings and the daemon's
    later STATUS= lines would be refused."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path_factory.mktemp("notify") / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(0.2)
    received: list[str] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                received.extend(sock.recv(4096).decode().splitlines())
            except TimeoutError:
                continue

    reader = threading.Thread(target=read, name="notify socket", daemon=True)
    reader.start()
    yield received, str(path)
    done.set()
    reader.join(5)
    sock.close()


def notifications(received: list[str]) -> list[str]:
    """The lines received since the last call."""
    got = received[:]
    del received[:len(got)]
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
    statuses = [line.removeprefix("STATUS=") for line in got if line.startswith("STATUS=")]
    # Sent again as the guests came and were planned, and only then: the guests have flipped some
    # hundreds of frames by now, and a line per frame would show here as hundreds.
    assert 2 <= len(statuses) <= 30, statuses
    st = comp.status()
    last = statuses[-1]
    assert last == st["summary"], (last, st["summary"])
    assert last.startswith(f"{len(st['outputs'])} lit: "), last
    for monitor, name, _ in SHOWN + (("wb", "office", None),):
        assert re.search(rf"\b{name}→{monitor} (zero-copy|copy)\b", last), (name, monitor, last)
    assert "not shown" not in last and "paused" not in last, last


def test_switching_away_shows_the_console_and_holds_no_master(comp, host):
    st = switch_away(comp, host)
    assert "switched away" in next(iter(st["session"]["paused"].values()))


def test_switching_back_restores_every_guest(comp, host):
    switch_back(comp, host, OUR_VT, SHOWN)
