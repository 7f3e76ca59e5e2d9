"""Which policy seat takes an input device, and what a device is when udev has not said."""

from __future__ import annotations

from evdev import ecodes as e

from compositor.input.devices import DeviceInfo, kinds_from_capabilities, kinds_from_udev, seat_for
from compositor.policy import parse

DESKS = """version: 1
monitors: {a: DP-1, b: DP-2, c: HDMI-A-1, d: DP-3}
seats:
  desk-a: {monitors: [a], input: [{path: "pci-0000:00:14.0-usb-0:1*"}]}
  desk-b: {monitors: [b], input: [{name: "Logitech*"}]}
  upstairs: {logind: [seat1]}
  rest: {monitors: [c, d]}
"""


def dev(name: str, id_path: str | None = None, seat: str = "seat0") -> DeviceInfo:
    return DeviceInfo("/dev/input/event9", name, id_path, seat, frozenset({"keyboard"}))


def test_a_device_goes_to_the_first_seat_whose_input_matches_then_logind_then_the_first_free_seat():
    seats = parse(DESKS).seats
    # by ID_PATH, by name, by logind seat, and the rest to the first seat with neither `input` nor `logind`
    assert seat_for(dev("Dell keyboard", "pci-0000:00:14.0-usb-0:1.2:1.0"), seats) == "desk-a"
    assert seat_for(dev("Logitech USB Receiver", "pci-0000:00:14.0-usb-0:2:1.0"), seats) == "desk-b"
    assert seat_for(dev("Dell keyboard", "pci-0000:00:14.0-usb-0:3:1.0", seat="seat1"), seats) == "upstairs"
    assert seat_for(dev("AT Translated Set 2 keyboard", "platform-i8042-serio-0"), seats) == "rest"


def test_without_seats_one_implicit_seat_takes_everything():
    assert seat_for(dev("any"), ()) == "default"


def test_with_only_fenced_seats_a_stranger_goes_nowhere():
    seats = parse(DESKS.replace("  rest: {monitors: [c, d]}\n", "")).seats
    assert seat_for(dev("AT Translated Set 2 keyboard"), seats) is None


def test_kinds_from_udev_and_from_capabilities():
    assert kinds_from_udev({"ID_INPUT": "1", "ID_INPUT_KEYBOARD": "1", "ID_INPUT_KEY": "1"}) == {"keyboard"}
    assert kinds_from_udev({"ID_INPUT": "1", "ID_INPUT_KEY": "1"}) == frozenset()   # a power button
    assert kinds_from_udev({}) is None                                              # udev never saw it
    keyboard = {e.EV_KEY: list(range(e.KEY_ESC, e.KEY_MICMUTE + 1))}
    mouse = {e.EV_KEY: [e.BTN_LEFT, e.BTN_RIGHT], e.EV_REL: [e.REL_X, e.REL_Y, e.REL_WHEEL]}
    tablet = {e.EV_KEY: [e.BTN_LEFT], e.EV_ABS: [(e.ABS_X, None), (e.ABS_Y, None)]}
    touch = {e.EV_KEY: [e.BTN_TOUCH], e.EV_ABS: [e.ABS_X, e.ABS_Y, e.ABS_MT_POSITION_X, e.ABS_MT_POSITION_Y]}
    assert kinds_from_capabilities(keyboard) == {"keyboard"}
    assert kinds_from_capabilities(mouse) == {"mouse"}
    assert kinds_from_capabilities(tablet) == {"tablet"}
    assert kinds_from_capabilities(touch) == {"touchscreen"}
    assert kinds_from_capabilities({e.EV_KEY: [e.KEY_POWER]}) == frozenset()
