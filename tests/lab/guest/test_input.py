"""Seat input on the lab's real kernel: the VM's virtio keyboard, mouse and tablet, driven from the host
with QMP input-send-event, reach the lab kernel as evdev events of real devices; `directflip run`
takes them (direct session, EVIOCGRAB) and routes them to the guest on the focused monitor. Three
synthetic guests fill the three heads at 1:1 and draw the input they received into their frames
(directflip_tools.synthetic: the input bands), so every check reads pixels from outside: QEMU
screendumps of the heads.

The layout is the seat's monitors left to right: left (1024x768) at x 0, centre (800x600) at 1024,
right (640x480) at 1824, then vkms' wb.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from evdev import ecodes
from labkit import LAB_MONITORS, Compositor, colour_share, console_text, wait_for

from compositor.session import activate_vt, active_vt
from directflip_tools.synthetic import CURSOR_COLOUR, CURSOR_SIZE, decode_input, guest_colour

POLICY = """version: 1
""" + LAB_MONITORS + """guests:
  ann: {kind: socket}
  ben: {kind: socket}
  cat: {kind: socket}
  dot: {kind: socket}
placements:
  - {guest: ann, monitor: left}
  - {guest: ben, monitor: centre}
  - {guest: cat, monitor: right, failover: [centre]}
  - {guest: dot, monitor: wb}
"""
HEADS = {"ann": (0, "left", "1024x768"), "ben": (1, "centre", "800x600"), "cat": (2, "right", "640x480")}
OUR_VT = 2


@pytest.fixture(scope="module")
def comp(cards, host, tmp_path_factory):
    activate_vt(1)
    console_text()
    c = Compositor(tmp_path_factory.mktemp("input"))
    c.start(POLICY, "--vt", str(OUR_VT))
    t0 = time.monotonic()
    for name, (_, _, size) in HEADS.items():
        c.guest("--name", name, "--on", "display", "--size", size, "--rate", "30")
    # dot, on vkms (whose writeback shows the cursor plane), defines a pointer image and puts it at
    # (100, 200) of its buffer
    c.guest("--name", "dot", "--on", "display", "--size", "1024x768", "--rate", "30", "--cursor",
            "--cursor-at", "100,200")
    for name, (_, monitor, _) in HEADS.items():
        c.wait_shown(monitor, name)
    c.wait_shown("wb", "dot")
    print(f"three guests shown {time.monotonic() - t0:.1f} s after they were started")
    yield c
    c.stop_guests()
    code = c.stop()
    print(c.tail(20))
    assert code == 0, c.tail()
    activate_vt(1)


def state(host, head: int):
    return decode_input(host.screendump(head))


def seat(comp: Compositor) -> dict:
    return comp.status()["input"]["seats"]["default"]


def directflip(*args: str, comp: Compositor) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compositor.cli", *args, "--control", comp.control],
                          capture_output=True, text=True, timeout=60)


def test_the_seat_takes_the_vms_keyboard_and_pointers(comp):
    st = comp.status()["input"]
    taken = {d["name"]: d for d in st["devices"] if "name" in d}
    print("devices:", {n: (d["kinds"], d["grabbed"]) for n, d in taken.items()})
    assert taken["QEMU Virtio Keyboard"]["kinds"] == ["keyboard"]
    assert taken["QEMU Virtio Keyboard"]["grabbed"]
    assert "mouse" in taken["QEMU Virtio Mouse"]["kinds"]
    # udev's input_id calls an absolute pointer without pen tools a mouse, as it does QEMU's USB tablet
    assert "mouse" in taken["QEMU Virtio Tablet"]["kinds"]
    assert all(d["seat"] == "default" for d in taken.values())
    assert st["seats"]["default"]["layout"] == {"left": "1024x768+0+0", "centre": "800x600+1024+0",
                                                "right": "640x480+1824+0", "wb": "1024x768+2464+0"}


def test_keys_reach_only_the_focused_guest(comp, host):
    assert directflip("focus", "left", comp=comp).returncode == 0
    t0 = time.monotonic()
    host.keys("a")
    got = wait_for("ann's frame shows KEY_A released", lambda: (s := state(host, 0)) is not None
                   and s.key == ecodes.KEY_A and not s.key_down and s)
    print(f"KEY_A on head 0 after {time.monotonic() - t0:.2f} s: {got}")
    assert got.keys == 2  # one press, one release: no autorepeat, nothing else
    assert state(host, 1) is None and state(host, 2) is None  # ben and cat received nothing
    assert seat(comp)["focused"] == "left"


def test_the_pointer_crossing_an_edge_moves_the_focus(comp, host):
    assert directflip("focus", "left", comp=comp).returncode == 0   # the pointer at left's centre (512, 384)
    host.move(600, 0)                                                # to 1112: 88 px into centre
    wait_for("the focus on centre", lambda: seat(comp)["focused"] == "centre")
    ben = wait_for("ben's frame shows the pointer", lambda: (s := state(host, 1)) is not None and s)
    print(f"ben's pointer: {ben.x},{ben.y}")
    assert (ben.x, ben.y) == (88, 384)
    host.keys("b")
    ben = wait_for("ben's frame shows KEY_B", lambda: (s := state(host, 1)) is not None
                   and s.key == ecodes.KEY_B and not s.key_down and s)
    assert state(host, 0).key == ecodes.KEY_A   # ann kept what she had: nothing of KEY_B
    host.move(-200, 0)                          # back across the edge
    wait_for("the focus back on left", lambda: seat(comp)["focused"] == "left")
    host.tablet(32767 * 2000 // 3488, 100)      # the tablet spans the layout (3488 px): x 2000 is right's
    wait_for("the tablet moved the focus to right", lambda: seat(comp)["focused"] == "right")
    cat = wait_for("cat's frame shows the pointer", lambda: (s := state(host, 2)) is not None and s)
    print(f"cat's pointer: {cat.x},{cat.y}")
    assert abs(cat.x - (2000 - 1824)) <= 1


def test_the_next_guest_hotkey_changes_the_focused_monitor(comp, host):
    assert directflip("focus", "centre", comp=comp).returncode == 0
    host.keys("ctrl", "alt", down=True)
    host.keys("n")
    host.keys("ctrl", "alt", down=False)
    comp.wait_shown("centre", "cat")
    wait_for("cat on head 1 (screendump)",
             lambda: colour_share(host.screendump(1), guest_colour("cat")) > 0.4)
    st = comp.status()
    assert st["overrides"] == {"centre": "cat"}
    assert [o["guest"] for o in st["outputs"] if o["monitor"] == "right"] == ["cat"]  # still on its own too
    cat = state(host, 2)
    assert cat is None or cat.key != ecodes.KEY_N, "the hotkey reached a guest"
    print(seat(comp))


def test_ctrl_alt_g_lets_go_of_the_devices_and_takes_them_back(comp, host):
    assert directflip("focus", "left", comp=comp).returncode == 0
    keys_before = state(host, 0).keys
    host.keys("ctrl", "alt", down=True)
    host.keys("g")
    host.keys("ctrl", "alt", down=False)
    wait_for("the seat's input released", lambda: not seat(comp)["grabbed"])
    devices = [d for d in comp.status()["input"]["devices"] if "name" in d]
    assert not any(d["grabbed"] for d in devices), devices
    host.keys("y")                       # the console's now: ann must not see it
    time.sleep(2)
    ann = state(host, 0)
    assert ann.key != ecodes.KEY_Y, ann
    host.keys("ctrl", "alt", down=True)
    host.keys("g")
    host.keys("ctrl", "alt", down=False)
    wait_for("the seat's input taken again", lambda: seat(comp)["grabbed"])
    assert all(d["grabbed"] for d in comp.status()["input"]["devices"] if "name" in d)
    host.keys("u")
    ann = wait_for("KEY_U reaches ann", lambda: (s := state(host, 0)) is not None
                   and s.key == ecodes.KEY_U and s)
    # ann saw Ctrl and Alt of each hotkey (the hotkey's own key never), and u; never y
    print(f"ann's key events: {keys_before} before, {ann.keys} after")


def test_show_overrides_and_reset(comp, host):
    r = directflip("show", "ann", "centre", comp=comp)
    print(r.stdout, r.stderr)
    assert r.returncode == 0
    comp.wait_shown("centre", "ann")
    wait_for("ann on head 1", lambda: colour_share(host.screendump(1), guest_colour("ann")) > 0.4)
    bad = directflip("show", "nobody", "centre", comp=comp)
    print(bad.stderr.strip())
    assert bad.returncode != 0 and "nobody" in bad.stderr
    r = directflip("show", "--reset", comp=comp)
    print(r.stdout.strip())
    assert r.returncode == 0 and "centre" in r.stdout
    comp.wait_shown("centre", "ben")
    assert comp.status()["overrides"] == {}


def test_a_vt_switch_away_releases_the_key_held(comp, host):
    assert directflip("focus", "left", comp=comp).returncode == 0
    host.keys("x", down=True)
    wait_for("ann's frame shows KEY_X held", lambda: (s := state(host, 0)) is not None
             and s.key == ecodes.KEY_X and s.key_down)
    t0 = time.monotonic()
    activate_vt(1)
    wait_for("the compositor paused", lambda: comp.status()["session"]["paused"] != {})
    st = comp.status()["input"]
    assert st["paused"] is not None
    assert not any(d.get("grabbed") for d in st["devices"]), "devices still grabbed with the console in front"
    host.keys("x", down=False)   # the console's key now
    activate_vt(OUR_VT)
    wait_for("the compositor resumed", lambda: comp.status()["session"]["paused"] == {})
    comp.wait_shown("left", "ann")
    ann = wait_for("ann's frame shows KEY_X released", lambda: (s := state(host, 0)) is not None
                   and s.key == ecodes.KEY_X and not s.key_down and s)
    print(f"KEY_X released in ann {time.monotonic() - t0:.2f} s after the switch: {ann}")
    assert all(d.get("grabbed") for d in comp.status()["input"]["devices"] if "name" in d)


def test_ctrl_alt_f1_switches_the_vt(comp, host):
    host.keys("ctrl", "alt", down=True)
    host.keys("f1")
    host.keys("ctrl", "alt", down=False)
    wait_for("VT 1 in front", lambda: active_vt() == 1)
    wait_for("the compositor paused", lambda: comp.status()["session"]["paused"] != {})
    host.keys("ctrl", "alt", down=True)   # the console's keyboard handler switches back on its own
    host.keys("f2")
    host.keys("ctrl", "alt", down=False)
    try:
        wait_for("VT 2 in front again (the console's Ctrl+Alt+F2)", lambda: active_vt() == OUR_VT, timeout=20)
    except BaseException:
        print("the console did not switch back on Ctrl+Alt+F2; switching with VT_ACTIVATE")
        activate_vt(OUR_VT)
        raise
    wait_for("the compositor resumed", lambda: comp.status()["session"]["paused"] == {})


def cursor_at(rgb) -> tuple[int, int] | None:
    """The top-left of the pointer image's magenta inside, minus its border: where its hot spot is."""
    import numpy as np

    hits = np.argwhere(np.all(rgb == CURSOR_COLOUR, axis=-1))
    if len(hits) == 0:
        return None
    (y0, x0), (y1, x1) = hits.min(axis=0), hits.max(axis=0)
    assert (x1 - x0, y1 - y0) == (CURSOR_SIZE - 5, CURSOR_SIZE - 5), f"magenta spans {x0},{y0}..{x1},{y1}"
    return int(x0) - 2, int(y0) - 2   # the 2-pixel black border


def test_the_guests_cursor_is_on_the_cursor_plane_and_follows_the_tablet(comp, host, tmp_path):
    wb = comp.output("wb")
    print("wb cursor:", wb["cursor"])
    assert wb["cursor"]["type"] == "cursor" and wb["cursor"]["shown"]
    first = wait_for("the cursor at (100, 200) in vkms' writeback",
                     lambda: cursor_at(comp.capture("wb", tmp_path / "wb1.png")) == (100, 200), timeout=60)
    assert first
    # the tablet over wb (x 2464..3487 of the 3488-pixel layout) at (500, 300) of it
    t0 = time.monotonic()
    host.tablet(32767 * (2464 + 500) // 3487, 32767 * 300 // 767)
    wait_for("the focus on wb", lambda: seat(comp)["focused"] == "wb")
    wait_for("the cursor at (500, 300)", lambda: cursor_at(comp.capture("wb", tmp_path / "wb2.png"))
             == (500, 300), timeout=60)
    print(f"the cursor followed the tablet in {time.monotonic() - t0:.2f} s; {comp.output('wb')['cursor']}")
    assert comp.output("wb")["max_in_flight"] == 1


def device(comp: Compositor, name: str) -> dict | None:
    return next((d for d in comp.status()["input"]["devices"] if d.get("name") == name), None)


def test_a_keyboard_plugged_later_is_taken_and_unplugged_with_a_key_held_gives_the_release(comp, host):
    from evdev import UInput

    assert directflip("focus", "left", comp=comp).returncode == 0
    # a whole keyboard's keys: udev calls a device with a few keys a key device, not a keyboard
    kbd = UInput({ecodes.EV_KEY: list(range(ecodes.KEY_ESC, ecodes.KEY_MICMUTE + 1))},
                 name="directflip-test keyboard")
    try:
        taken = wait_for("the new keyboard taken", lambda: device(comp, "directflip-test keyboard"))
        print("plugged:", taken)
        assert taken["grabbed"] and taken["kinds"] == ["keyboard"]
        kbd.write(ecodes.EV_KEY, ecodes.KEY_J, 1)
        kbd.syn()
        wait_for("ann's frame shows KEY_J held", lambda: (s := state(host, 0)) is not None
                 and s.key == ecodes.KEY_J and s.key_down)
    finally:
        kbd.close()   # unplugged with KEY_J down
    ann = wait_for("ann's frame shows KEY_J released", lambda: (s := state(host, 0)) is not None
                   and s.key == ecodes.KEY_J and not s.key_down and s)
    print("after the unplug:", ann)
    wait_for("the keyboard gone from the status", lambda: device(comp, "directflip-test keyboard") is None)


def test_a_flooding_device_loses_motion_not_keys_and_the_flips_go_on(comp, host):
    """A mouse writing far beyond any real one (hundreds of thousands of events in a burst, straight
    into uinput): the compositor reads within its budget, the guests' flips go on meanwhile, and a key
    typed right after reaches the focused guest."""
    import struct

    from evdev import UInput

    assert directflip("focus", "left", comp=comp).returncode == 0
    mouse = UInput({ecodes.EV_KEY: [ecodes.BTN_LEFT], ecodes.EV_REL: [ecodes.REL_X, ecodes.REL_Y]},
                   name="directflip-test flood")
    try:
        wait_for("the flooding mouse taken", lambda: device(comp, "directflip-test flood"))
        before = comp.output("left")["presented"]
        event = struct.Struct("llHHi")
        burst = b"".join(event.pack(0, 0, ecodes.EV_REL, ecodes.REL_X, 1 - 2 * (i % 2)) +
                         event.pack(0, 0, ecodes.EV_SYN, ecodes.SYN_REPORT, 0) for i in range(2000))
        t0 = time.monotonic()
        written = 0
        while time.monotonic() - t0 < 5:
            written += os.write(mouse.fd, burst) // event.size
        dev = device(comp, "directflip-test flood")
        presented = comp.output("left")["presented"]
        print(f"{written} events written in 5 s; the compositor read {dev['events']}, dropped "
              f"{dev['dropped']}; left presented {presented - before} frames meanwhile")
        assert presented > before, "no frame presented on left during the flood"
    finally:
        mouse.close()
    host.keys("z")
    wait_for("KEY_Z reaches ann after the flood", lambda: (s := state(host, 0)) is not None
             and s.key == ecodes.KEY_Z and not s.key_down)



def test_the_guests_name_shows_on_a_free_overlay_when_a_monitor_turns_to_it(comp, host, tmp_path):
    """vkms has overlay planes the plan leaves free: `show` turns wb to ann, and ann's name appears in
    its top-left corner for the monitor's `label` seconds (30 here, so a busy machine's capture is in
    time), on a plane of its own. virtio-gpu has no overlay plane: its status says so."""
    import numpy as np

    labelled = POLICY.replace('wb:     {connector: "Virtual-*", driver: vkms, label: 0}',
                              'wb:     {connector: "Virtual-*", driver: vkms, label: 30}')
    assert labelled != POLICY
    comp.set_policy(labelled)
    try:
        assert directflip("show", "ann", "wb", comp=comp).returncode == 0
        comp.wait_shown("wb", "ann")
        out = wait_for("ann's name on wb's label plane",
                       lambda: (o := comp.output("wb"))["label"]["text"] == "ann" and o)
        print("wb:", out["path"], out["label"])
        rgb = comp.capture("wb", tmp_path / "label.png")
        box = rgb[16:16 + 40, 16:16 + 60]
        dark = float(np.mean(np.all(box == (16, 16, 24), axis=-1)))
        white = float(np.mean(np.all(box == (255, 255, 255), axis=-1)))
        print(f"label box: {dark:.2f} dark, {white:.2f} white")
        assert dark > 0.4 and white > 0.02
        assert colour_share(box, guest_colour("ann")) < 0.05     # the name is on top of the picture
        assert colour_share(rgb[200:, 200:], guest_colour("ann")) > 0.5
        assert comp.output("left")["label"]["disabled"] == "no overlay plane is free on this CRTC"
    finally:
        directflip("show", "--reset", comp=comp)
        comp.set_policy(POLICY)
