"""The compositor in a systemd-logind session (`--session logind`): logind hands over the cards
(TakeControl, TakeDevice), brings the session's VT to the front, pauses every card when the console
is switched away (PauseDevice, master dropped by logind) and resumes them when it is switched back
(ResumeDevice). Pixels from QEMU screendumps.

The lab guest has no systemd as PID 1: `python -m directflip_tools.lab.logind session --vt 3 -- CMD` starts
a system bus, a stand-in for the parts of systemd's manager that logind calls, and the real
systemd-logind, then creates a session on seat0 / VT 3 with the compositor as its leader."""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from evdev import ecodes
from labkit import (
    Compositor,
    colour_share,
    console_text,
    set_master_works,
    switch_away,
    switch_back,
    vkms_on_seat1,
    wait_for,
)
from test_session import POLICY, SHOWN, start_guests

from compositor.control import request
from compositor.session import KD_TEXT, KDGETMODE, VT_AUTO, VT_GETMODE, activate_vt, active_vt
from directflip_tools.lab.logind import CGROUP_ROOT, SYSTEM_BUS, bus_listening
from directflip_tools.synthetic import decode_input, guest_colour

OUR_VT = 3
LAUNCHER = (sys.executable, "-m", "directflip_tools.lab.logind", "session", "--vt", str(OUR_VT), "--")
SEAT1_LAUNCHER = (sys.executable, "-m", "directflip_tools.lab.logind", "session", "--seat", "seat1", "--")
SEAT1_RULE = Path("/etc/udev/rules.d/72-directflip-lab-logind-seat1.rules")
SEAT1_POLICY = """version: 1
monitors:
  wb: {connector: "Virtual-*", driver: vkms}
guests:
  kiosk: {kind: socket}
placements:
  - {guest: kiosk, monitor: wb}
"""


def logind_session(session_id: str) -> dict:
    """The session's properties as logind tells them (busctl, over the session's own system bus)."""
    path = f"/org/freedesktop/login1/session/{session_id}"
    out = {}
    for name in ("Active", "Leader", "Seat", "VTNr", "Type", "Class", "Scope", "Service"):
        proc = subprocess.run(["busctl", "--json=short", "get-property", "org.freedesktop.login1", path,
                               "org.freedesktop.login1.Session", name],
                              capture_output=True, text=True, timeout=20)
        assert proc.returncode == 0, f"busctl get-property {name}: {proc.stderr}"
        out[name] = json.loads(proc.stdout)["data"]
    return out


def vt_modes(number: int) -> tuple[int, int]:
    """(KD mode, VT mode) of /dev/ttyN: text/auto once nobody holds it."""
    fd = os.open(f"/dev/tty{number}", os.O_RDWR | os.O_NOCTTY)
    try:
        kd = struct.unpack("i", fcntl.ioctl(fd, KDGETMODE, b"\0" * 4))[0]
        vt = struct.unpack("bbhhh", fcntl.ioctl(fd, VT_GETMODE, b"\0" * 8))[0]
        return kd, vt
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def comp(cards, host, tmp_path_factory):
    activate_vt(1)
    console_text()
    c = Compositor(tmp_path_factory.mktemp("logind"))
    c.start(POLICY, "--session", "logind", prefix=LAUNCHER)
    start_guests(c)
    yield c
    code = c.stop()
    print(c.tail(30))
    assert code == 0
    activate_vt(1)


def test_logind_hands_over_every_card_and_brings_the_session_to_the_front(comp, host):
    st = comp.status()
    session = st["session"]
    assert session["kind"] == "logind", session
    assert session["session_id"] and session["session_path"].endswith(session["session_id"])
    assert session["paused"] == {} and session["active"] is True
    assert active_vt() == OUR_VT           # the session was on VT 3 in the background; logind switched
    assert {c["driver"] for c in st["cards"]} == {"virtio_gpu", "vkms"}
    assert all(c["master"] for c in st["cards"]), st["cards"]
    for _, name, head in SHOWN:
        assert colour_share(host.screendump(head), guest_colour(name)) > 0.2, f"head {head} lacks {name}"
    comp.wait_shown("wb", "office")     # the mirror on the vkms card

    # logind's view: the compositor leads an active tty session on seat0 / VT 3, inside its scope.
    props = logind_session(session["session_id"])
    assert props["Active"] is True and props["Seat"][0] == "seat0" and props["VTNr"] == OUR_VT, props
    assert (props["Type"], props["Class"], props["Service"]) == ("tty", "user", "directflip"), props
    leader = props["Leader"]
    assert "compositor.cli" in Path(f"/proc/{leader}/cmdline").read_bytes().decode()
    assert Path(f"/proc/{leader}/cgroup").read_text().strip().endswith(f"/{props['Scope']}")


def test_switching_away_pauses_every_card_and_holds_no_master(comp, host):
    st = switch_away(comp, host)
    assert all("logind paused" in why for why in st["session"]["paused"].values()), st["session"]
    wait_for("the session inactive", lambda: comp.status()["session"]["active"] is False)
    assert logind_session(st["session"]["session_id"])["Active"] is False


def test_switching_back_resumes_every_card_and_guest(comp, host):
    st = switch_back(comp, host, OUR_VT, SHOWN)
    assert st["session"]["active"] is True
    # The keyboard came back too: logind revoked our descriptor on the way out and handed a new one
    # with ResumeDevice. A key typed now reaches build, on the 640x480 head at 1:1.
    assert any(d.get("name") == "QEMU Virtio Keyboard" for d in st["input"]["devices"]), st["input"]
    request(comp.control, {"cmd": "focus", "monitor": "right"})
    host.keys("q")
    got = wait_for("KEY_Q in build's frame", lambda: (s := decode_input(host.screendump(2))) is not None
                   and s.key == ecodes.KEY_Q and not s.key_down and s)
    print("after the switch back, build received:", got)


def test_stopping_ends_the_session_and_gives_the_vt_back(comp):
    session_id = comp.status()["session"]["session_id"]
    code = comp.stop()
    log = comp.log.read_text()
    print("\n".join(line for line in log.splitlines() if "logind" in line or "paused" in line
                    or "resumed" in line))
    assert code == 0, comp.tail(40)
    assert f"session {session_id} on seat0 VT {OUR_VT}" in log
    assert active_vt() == OUR_VT            # stopping does not switch VTs
    assert vt_modes(OUR_VT) == (KD_TEXT, VT_AUTO)   # logind restored the VT on ReleaseControl
    # The launcher stopped what it started: no bus, no session scope left.
    assert not bus_listening() and not os.path.exists(SYSTEM_BUS)
    assert not list(CGROUP_ROOT.glob(f"user.slice/*/session-{session_id}.scope"))


@pytest.fixture
def seat1(cards):
    """The vkms card on seat1, before logind starts."""
    with vkms_on_seat1(cards, SEAT1_RULE) as vkms:
        yield vkms


def test_on_a_seat_without_vts_logind_switches_sessions_itself(seat1, tmp_path_factory):
    """seat1 has no VTs: logind makes each new session the seat's active one and switches sessions on
    Activate. The compositor's session is in front from the start; a second login on seat1 takes the
    seat (PauseDevice), activating the compositor's session gives it back (ResumeDevice)."""
    work = tmp_path_factory.mktemp("logind-seat1")
    comp = Compositor(work)
    other = None
    try:
        comp.start(SEAT1_POLICY, "--seat", "seat1", "--session", "logind", prefix=SEAT1_LAUNCHER)
        comp.guest("--name", "kiosk", "--on", "vgem", "--size", "640x480", "--rate", "20",
                   "--duration", "300")
        comp.wait_shown("wb", "kiosk")
        st = comp.status()
        session = st["session"]
        assert session["active"] is True and session["paused"] == {}, session
        assert [(c["path"], c["seat"], c["master"]) for c in st["cards"]] == [(seat1, "seat1", True)]
        props = logind_session(session["session_id"])
        assert props["Seat"][0] == "seat1" and props["VTNr"] == 0 and props["Active"] is True, props
        assert colour_share(comp.capture("wb", work / "before.png"), guest_colour("kiosk")) > 0.2

        other = subprocess.Popen([*SEAT1_LAUNCHER, "sleep", "600"], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        st = wait_for("the card paused by the second login",
                      lambda: (s := comp.status())["session"]["paused"] != {} and s, timeout=30)
        assert "logind paused" in st["session"]["paused"][seat1], st["session"]
        assert not st["cards"][0]["master"]
        set_master_works(seat1)
        assert logind_session(session["session_id"])["Active"] is False

        subprocess.run(["busctl", "call", "org.freedesktop.login1", session["session_path"],
                        "org.freedesktop.login1.Session", "Activate"], check=True, timeout=20)
        wait_for("the card resumed", lambda: comp.status()["session"]["paused"] == {}, timeout=20)
        comp.wait_shown("wb", "kiosk", timeout=30)
        first = comp.output("wb")["on_screen"]["frame"]
        wait_for("kiosk's frames moving", lambda: comp.output("wb")["on_screen"]["frame"] != first)
        st = comp.status()
        assert st["cards"][0]["master"] and st["session"]["active"] is True
        assert colour_share(comp.capture("wb", work / "after.png"), guest_colour("kiosk")) > 0.2
    finally:
        if other is not None:
            other.terminate()
            print("--- second login", other.communicate(timeout=30)[0], sep="\n")
        code = comp.stop()
        print("--- compositor", comp.tail(30), sep="\n")
    assert code == 0
