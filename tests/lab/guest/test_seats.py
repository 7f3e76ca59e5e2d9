"""Seats. Two compositor instances, one per logind seat (the vkms card put on seat1 by a udev rule,
the virtio-gpu card left on seat0), run side by side from the same careless policy that names the
monitors of both cards: each lights only its own seat's monitors, and both hold DRM master at once
(one master per card: had either opened the other's card, the second would not start). Then, within
one card, policy seats fence guests to their seat's monitors even when a monitor of another seat is
free. Pixels from QEMU screendumps (virtio-gpu) and vkms writeback."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from labkit import Compositor, colour_share, vkms_on_seat1, wait_for

from compositor.daemon import card_seat
from directflip_tools.synthetic import guest_colour

RULE = Path("/etc/udev/rules.d/72-directflip-lab-seat1.rules")

BOTH_CARDS = """version: 1
monitors:
  left:   {connector: Virtual-1, driver: virtio_gpu}
  centre: {connector: Virtual-2, driver: virtio_gpu}
  wb:     {connector: "Virtual-*", driver: vkms}
guests:
  office: {kind: socket}
  media:  {kind: socket}
  kiosk:  {kind: socket}
placements:
  - {guest: office, monitor: left, failover: [wb]}
  - {guest: media, monitor: centre}
  - {guest: kiosk, monitor: wb, failover: [left]}
"""

DESKS = """version: 1
monitors:
  left:   {connector: Virtual-1, driver: virtio_gpu}
  centre: {connector: Virtual-2, driver: virtio_gpu}
  right:  {connector: Virtual-3, driver: virtio_gpu}
seats:
  desk-a: {monitors: [left]}
  desk-b: {monitors: [centre, right]}
guests:
  office: {kind: socket}
  media:  {kind: socket}
placements:
  - {guest: office, seats: [desk-a]}
  - {guest: media, monitor: centre, seats: [desk-b]}
"""


def size_head0(host) -> None:
    """Until head 0's VNC display has been sized once, QEMU accepts an unplug (0x0) of it but leaves
    the connector connected: size it at its boot size before a test unplugs it."""
    host.plug(0, 1024, 768)


def unplaced(comp: Compositor, guest: str) -> str | None:
    """Why `guest` is shown nowhere, or None while it is shown."""
    return next((u["reason"] for u in comp.status()["unplaced"] if u["guest"] == guest), None)


def run_guest(comp: Compositor, name: str) -> None:
    comp.guest("--name", name, "--on", "vgem", "--size", "640x480", "--rate", "20", "--duration", "300")


@pytest.fixture(scope="module")
def seat1(cards):
    with vkms_on_seat1(cards, RULE) as vkms:
        assert card_seat(cards["virtio_gpu"]) == "seat0"
        yield vkms


def test_two_seat_instances_never_touch_each_others_monitors(seat1, cards, host, tmp_path_factory):
    size_head0(host)
    seat0 = Compositor(tmp_path_factory.mktemp("seat0"))
    other = Compositor(tmp_path_factory.mktemp("seat1"))
    try:
        seat0.start(BOTH_CARDS, "--seat", "seat0", "--vt", "none")
        other.start(BOTH_CARDS, "--seat", "seat1", "--vt", "none")   # starts: card0 is not its
        for comp, name in ((seat0, "office"), (seat0, "media"), (other, "kiosk")):
            run_guest(comp, name)
        seat0.wait_shown("left", "office")
        seat0.wait_shown("centre", "media")
        other.wait_shown("wb", "kiosk")

        for comp, seat, card in ((seat0, "seat0", cards["virtio_gpu"]), (other, "seat1", seat1)):
            st = comp.status()
            assert st["seat"] == seat
            assert [(c["path"], c["seat"], c["master"]) for c in st["cards"]] == [(card, seat, True)]
            assert {o["card"] for o in st["outputs"]} == {card}, st["outputs"]
        assert {o["monitor"] for o in seat0.status()["outputs"]} == {"left", "centre"}
        assert [o["monitor"] for o in other.status()["outputs"]] == ["wb"]

        assert colour_share(host.screendump(0), guest_colour("office")) > 0.2
        assert colour_share(host.screendump(1), guest_colour("media")) > 0.2
        shot = other.capture("wb", tmp_path_factory.mktemp("shots") / "wb.png")
        assert colour_share(shot, guest_colour("kiosk")) > 0.2
        assert colour_share(shot, guest_colour("office")) == 0.0

        # office's failover (wb) is on the other seat: unplugging left leaves it unplaced, never there.
        host.unplug(0)
        wait_for("office unplaced", lambda: unplaced(seat0, "office"))
        time.sleep(1.0)
        assert other.output("wb")["guest"] == "kiosk"
        shot = other.capture("wb", tmp_path_factory.mktemp("shots") / "wb2.png")
        assert colour_share(shot, guest_colour("kiosk")) > 0.2
        assert colour_share(shot, guest_colour("office")) == 0.0
    finally:
        host.plug(0, 1024, 768)
        codes = (seat0.stop(), other.stop())
        print("--- seat0", seat0.tail(40), "--- seat1", other.tail(20), sep="\n")
    assert codes == (0, 0)


def test_policy_seats_keep_guests_on_their_seats_monitors(cards, host, tmp_path_factory):
    size_head0(host)
    comp = Compositor(tmp_path_factory.mktemp("desks"))
    try:
        comp.start(DESKS, "--vt", "none", "--device", cards["virtio_gpu"])
        run_guest(comp, "office")
        run_guest(comp, "media")
        comp.wait_shown("left", "office")
        comp.wait_shown("centre", "media")
        assert "right" in {o["monitor"] for o in comp.status()["outputs"]}   # lit, free: desk-b's slate

        host.unplug(0)   # desk-a's only monitor
        reason = wait_for("office unplaced", lambda: unplaced(comp, "office"))
        time.sleep(1.0)
        right = comp.output("right")
        assert right.get("guest") != "office", right    # free, but on desk-b
        assert colour_share(host.screendump(2), guest_colour("office")) == 0.0
        assert colour_share(host.screendump(1), guest_colour("media")) > 0.2
        print("office unplaced:", reason)

        host.plug(0, 800, 600)
        comp.wait_shown("left", "office")
        wait_for("office back on head 0 (screendump)",
                 lambda: colour_share(host.screendump(0), guest_colour("office")) > 0.2)
    finally:
        host.plug(0, 1024, 768)
        code = comp.stop()
        print(comp.tail(10))
    assert code == 0
