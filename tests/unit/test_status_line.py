"""What an operator reads about a running compositor: the STATUS= line for `systemctl status` (sent over a
real datagram socket standing in for systemd's notify socket, from a daemon driven without a kernel by
test_daemon_guests' fakes) and `directflip status`'s text."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from fakes.card import CRTC, FakeCard
from test_daemon_guests import CARD, Conn, fake_topology
from test_notify import drain, receiver
from test_scanout import guest_buffer

from compositor.control import format_status
from compositor.daemon import Daemon, status_line
from compositor.notify import Notifier
from compositor.output import OutputLayer
from compositor.sources.frame import Frame
from compositor.sources.framesocket import Peer

# OutputLayer commits on the fake card (tests/unit/conftest.py)
pytestmark = pytest.mark.usefixtures("fake_native_flip")


# --------------------------------------------------------------------------------- the line itself


def test_the_line_names_guest_monitor_and_path_in_plan_order() -> None:
    shown = [("left", "office", "zero-copy"), ("centre", "media", "copy"), ("right", None, "slate")]
    assert status_line(shown) == "3 lit: office→left zero-copy, media→centre copy, right slate"


def test_the_line_says_what_is_missing() -> None:
    assert status_line([]) == "nothing lit"
    assert status_line([("left", "office", "copy")], failed=["right"], not_shown=["media", "build"]) == \
        "1 lit: office→left copy, right failed; not shown: media, build"


def test_a_paused_session_gives_the_reason() -> None:
    away = "VT 7 switched away"
    assert status_line([], paused={"/dev/dri/card0": away, "/dev/dri/card1": away}) == f"paused: {away}"
    assert status_line([("left", "office", "zero-copy")], paused={"/dev/dri/card1": away}) == \
        f"1 lit: office→left zero-copy; paused: /dev/dri/card1 ({away})"


def test_many_monitors_are_counted_not_named() -> None:
    shown = [(f"m{i}", None, "slate") for i in range(9)]
    line = status_line(shown)
    assert line == "9 lit: m0 slate, m1 slate, m2 slate, m3 slate, m4 slate, m5 slate, +3 more"
    assert "\n" not in line


# ------------------------------------------------------------------- STATUS= from a running daemon

# No guest name on the overlay plane: the test hands the flip events over one frame at a time.
POLICY = """version: 1
defaults: {label: 0}
monitors:
  left: {connector: Virtual-1}
guests:
  office: {kind: socket}
  media: {kind: socket}
placements:
  - {guest: office, monitor: left}
"""


@pytest.fixture
def rig(tmp_path: Path):
    """A daemon on test_scanout's fake card (monitor `left`) whose notifier sends to a real socket."""
    (tmp_path / "policy.yaml").write_text(POLICY)
    daemon = Daemon(tmp_path / "policy.yaml", frame_socket=str(tmp_path / "f.sock"),
                    control_socket=str(tmp_path / "c.sock"))
    card = FakeCard()
    daemon.native = False
    daemon.cards, daemon.layers = {CARD: card}, {CARD: OutputLayer(card, native=False)}
    daemon.topology = fake_topology()
    sock = receiver(str(tmp_path / "notify"))
    daemon.notifier = Notifier(str(tmp_path / "notify"))
    yield daemon, card, sock
    for pipe in daemon.pipelines.values():
        pipe.stop()
    daemon.notifier.close()
    sock.close()


def statuses(sock: socket.socket) -> list[str]:
    return [message.removeprefix("STATUS=") for message in drain(sock)]


def test_status_follows_plans_and_guests_and_is_sent_only_when_it_changed(rig) -> None:
    daemon, card, sock = rig
    office = Conn("office", Peer(100, 0, 0))
    media = Conn("media", Peer(101, 0, 0))
    buffers = [guest_buffer(i) for i in (1, 2, 3)]
    lines: list[str] = []

    def counting(original=daemon.status_line) -> str:
        lines.append("")
        return original()

    async def settle() -> None:
        """Let replans and scheduled status refreshes run, and hand over the blocking commits' events."""
        for _ in range(5):
            await asyncio.sleep(0)
            if daemon._replan_task is not None:
                await daemon._replan_task
            events, card.events = card.events, []
            for event in events:
                daemon._flip_event(CARD, event)

    async def scenario() -> None:
        await daemon.apply(daemon.plan())
        assert statuses(sock) == ["1 lit: left slate"]
        await daemon.apply(daemon.plan())       # the same plan again: nothing new to say
        await settle()
        assert statuses(sock) == []

        daemon.on_hello(office)                 # connected, not planned before its first frame
        await settle()
        assert statuses(sock) == ["1 lit: left slate; not shown: office"]
        for buffer in buffers:
            office.buffers[buffer.id] = buffer
        daemon.on_flip(office, Frame(buffers[0], seq=0))
        await settle()
        assert statuses(sock) == ["1 lit: office→left zero-copy"]

        # Frames: the line is not even computed, let alone sent.
        daemon.status_line = counting
        for seq in range(1, 7):
            daemon.on_flip(office, Frame(buffers[seq % 2], seq=seq))
            daemon._flip_event(CARD, card.complete(CRTC))
        await settle()
        assert lines == [] and statuses(sock) == []

        # A buffer the card cannot take moves the output down the ladder between frames, with no plan.
        buffers[2].copy_only = "a shared map, not a dma-buf"
        daemon.on_flip(office, Frame(buffers[2], seq=7))
        await settle()
        assert statuses(sock) == ["1 lit: office→left copy"]
        assert len(lines) == 1
        daemon._flip_event(CARD, card.complete(CRTC))

        daemon.on_hello(media)                  # another guest, with no placement
        await settle()
        assert statuses(sock) == ["1 lit: office→left copy; not shown: media"]
        daemon.on_close(office, "bye")          # gone: re-planned
        await settle()
        assert statuses(sock) == ["1 lit: left slate; not shown: media"]

    try:
        asyncio.run(scenario())
    finally:
        for buffer in buffers:
            buffer.close()
    assert card.violations == []


def test_status_document_has_version_uptime_summary_and_card_states(rig) -> None:
    daemon, card, _sock = rig
    card.driver, card.is_master = "virtio_gpu", True  # what status reads of a card besides the fakes'

    async def scenario() -> dict:
        await daemon.apply(daemon.plan())
        return daemon.status()

    doc = asyncio.run(scenario())
    assert doc["schema"] == "directflip.status/1"
    assert doc["version"] and doc["version"] != "unknown"
    assert doc["uptime_s"] >= 0 and doc["started_ns"] > 0
    assert doc["summary"] == "1 lit: left slate"
    assert [c["state"] for c in doc["cards"]] == ["active"]


# ------------------------------------------------------------------------- `directflip status`

PAUSED = "logind paused the card (force): the session is not in front"


def status_doc() -> dict:
    """A status document as a seat instance under logind might give, one card paused."""
    return {
        "schema": "directflip.status/1", "version": "0.1.0", "started_ns": 1, "uptime_s": 7384.2,
        "summary": "1 lit: office→left zero-copy; not shown: vm, vm2, vm3", "seat": "seat1",
        "session": {"kind": "logind", "session_id": "4", "active": False, "switches": 1,
                    "session_path": "/org/freedesktop/login1/session/_34",
                    "paused": {"/dev/dri/card1": PAUSED}},
        "cards": [{"path": "/dev/dri/card0", "driver": "virtio_gpu", "seat": "seat1", "master": True,
                   "state": "active"},
                  {"path": "/dev/dri/card1", "driver": "vkms", "seat": "seat1", "master": False,
                   "state": "paused"}],
        "policy": {"path": "/etc/directflip/seat1.yaml", "generation": 0, "last_error": None},
        "outputs": [{"monitor": "left", "connector": "Virtual-1", "guest": "office", "path": "zero-copy",
                     "mode": "1024x768@60.00", "flips_per_s": 60.0, "latency_ms": {"p50": 1.0, "p99": 2.0},
                     "commit_delay_us": {"p50": 300.0}, "dropped": 0, "reason": ""}],
        "dark": [], "unplaced": [],
        "guests": [
            {"name": "office", "kind": "socket", "pid": 265, "uid": 0, "buffers": 3, "flips": 263,
             "framebuffer": "1024x768 XR24", "held": 2},
            {"name": "vm", "kind": "qemu-dbus", "pid": 276, "uid": 0, "buffers": 1, "flips": 40,
             "framebuffer": "720x400 XR24", "held": 0,
             "qemu": {"target": "QMP /run/vm/vm.qmp, console 0", "state": "connected",
                      "connection": "connected", "vm": "inner", "console": "VGA", "path": "dmabuf",
                      "error": None}},
            {"name": "vm2", "kind": "qemu-dbus", "pid": None, "uid": None, "buffers": 0, "flips": 0,
             "framebuffer": None, "held": 0,
             "qemu": {"target": "QMP /run/vm2/qmp.sock, console 0", "state": "waiting",
                      "connection": "waiting", "error": "No such file or directory (/run/vm2/qmp.sock)"}},
            {"name": "vm3", "kind": "qemu-dbus", "pid": None, "uid": None, "buffers": 0, "flips": 0,
             "framebuffer": None, "held": 0,
             "qemu": {"target": "bus unix:path=/run/vm3/bus, console 2", "state": "waiting",
                      "connection": "error", "error": "VM 'vm3' has consoles [0], not 2"}},
        ],
    }


def test_format_status_shows_version_uptime_session_and_qemu_displays() -> None:
    text = format_status(status_doc()).splitlines()
    assert text[0] == "directflip 0.1.0, up 2h 03m 04s, seat seat1"
    assert text[1] == ("session logind (logind session 4): /dev/dri/card0 active, /dev/dri/card1 paused "
                       "(logind paused the card (force): the session is not in front)")
    assert "    QEMU display QMP /run/vm/vm.qmp, console 0: connected to VM 'inner', console VGA, dmabuf" \
        in text
    assert ("    QEMU display QMP /run/vm2/qmp.sock, console 0: waiting for the VM "
            "(No such file or directory (/run/vm2/qmp.sock))") in text
    assert "    QEMU display bus unix:path=/run/vm3/bus, console 2: error: VM 'vm3' has consoles [0], not 2" \
        in text


def test_format_status_of_a_direct_session_with_the_vt_elsewhere() -> None:
    doc = status_doc()
    doc["seat"], doc["uptime_s"] = None, 42.0
    away = "VT 7 switched away"
    doc["session"] = {"kind": "direct", "vt": 7, "switches": 1,
                      "paused": {"/dev/dri/card0": away, "/dev/dri/card1": away}}
    for card in doc["cards"]:
        card["state"] = "paused"
    text = format_status(doc).splitlines()
    assert text[:2] == ["directflip 0.1.0, up 42s",
                        "session direct on VT 7: /dev/dri/card0 paused (VT 7 switched away), "
                        "/dev/dri/card1 paused (VT 7 switched away)"]


def test_format_status_of_an_older_compositor_without_the_new_fields() -> None:
    doc = status_doc()
    for key in ("version", "started_ns", "uptime_s", "summary"):
        del doc[key]
    for card in doc["cards"]:
        del card["state"]
    for guest in doc["guests"]:
        if "qemu" in guest:
            del guest["qemu"]["connection"]
    text = format_status(doc).splitlines()
    assert text[0].startswith("session logind") and "/dev/dri/card1 paused (logind paused" in text[0]
    assert "    QEMU display QMP /run/vm2/qmp.sock, console 0: waiting for the VM " \
           "(No such file or directory (/run/vm2/qmp.sock))" in text


def test_format_status_shows_libvirt_domains_and_launched_vmms() -> None:
    doc = status_doc()
    doc["guests"].append(
        {"name": "win11", "kind": "libvirt", "pid": None, "uid": None, "buffers": 0, "flips": 0,
         "framebuffer": None, "held": 0,
         "qemu": {"target": "libvirt domain win11 at qemu:///system, console 0", "state": "waiting",
                  "connection": "waiting", "error": "win11's display was taken over by another client",
                  "libvirt": {"domain": "win11", "name": "win11", "state": "running", "display": "p2p",
                              "taken_over": "win11's display was taken over by another client",
                              "libvirtd": {"state": "waiting", "error": "lost the connection to libvirtd"}}}})
    doc["launched"] = {
        "office": {"pid": 4242, "command": "/usr/bin/qemu-system-x86_64",
                   "scope": "directflip-vm-office.scope", "running": True, "attached": True, "error": None},
        "media": {"pid": 4243, "command": "/usr/bin/qemu-system-x86_64", "scope": None, "running": True,
                  "attached": False,
                  "error": "its VMM (pid 4243) still runs and holds vGPU x, which cannot be re-attached: the "
                           "kernel refuses"}}
    text = format_status(doc).splitlines()
    assert ("    libvirt: domain win11 running, D-Bus display peer to peer; libvirtd waiting: lost the "
            "connection to libvirtd; win11's display was taken over by another client") in text
    assert ("launched: office: /usr/bin/qemu-system-x86_64 pid 4242 in directflip-vm-office.scope, running; "
            "shown") in text
    assert ("launched: media: /usr/bin/qemu-system-x86_64 pid 4243, running; its VMM (pid 4243) still runs "
            "and holds vGPU x, which cannot be re-attached: the kernel refuses") in text
