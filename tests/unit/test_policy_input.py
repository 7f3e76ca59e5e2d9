"""Policy keys for input: monitor `position`, seat `input`, `hotkeys` — values and file:line errors."""

from __future__ import annotations

import pytest
from evdev import ecodes

from compositor.input.keys import ACTIONS, DEFAULT_HOTKEYS
from compositor.policy import HOTKEY_ACTIONS, InputMatch, PolicyError, Position, parse

BASE = """version: 1
monitors:
  a: {connector: DP-1}
  b: {connector: DP-2, position: {right-of: a}}
  c: {connector: DP-3, position: {x: 0, y: -768}}
seats:
  s1: {monitors: [a, b, c], input: [{path: "pci-*usb*"}, {name: "Logi*"}]}
guests:
  g: {kind: socket}
placements:
  - guest: g
    monitor: a
"""


def errors(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse(text, "p.yaml")
    return [str(d) for d in info.value.errors]


def test_actions_are_the_same_list_in_both_modules():
    assert HOTKEY_ACTIONS == ACTIONS


def test_positions_and_input_matches():
    p = parse(BASE)
    assert [m.position for m in p.monitors] == [None, Position(relation="right-of", of="a"),
                                                Position(0, -768)]
    s = p.seats[0]
    assert [str(m) for m in s.input] == ["path=pci-*usb*", "name=Logi*"]
    assert s.input[0].matches("pci-0000:00:14.0-usb-0:1:1.0", "Dell keyboard")
    assert not s.input[0].matches(None, "Dell keyboard")
    assert InputMatch(name=s.input[1].name).matches(None, "Logitech USB Receiver")


def test_default_hotkeys_without_a_section():
    p = parse(BASE)
    assert p.hotkeys is None
    assert {h.action: h.text for h in p.hotkey_list()} == DEFAULT_HOTKEYS


def test_hotkeys_section_overrides_and_turns_off():
    p = parse(BASE + "hotkeys:\n  next-guest: super+pagedown\n  release-input: off\n")
    got = {h.action: (h.modifiers, h.key) for h in p.hotkey_list()}
    assert got == {"next-guest": (frozenset({"super"}), ecodes.KEY_PAGEDOWN),
                   "next-monitor": (frozenset({"ctrl", "alt"}), ecodes.KEY_M)}


def test_hotkey_that_names_no_key_is_a_file_line_error():
    assert errors(BASE + "hotkeys:\n  next-guest: ctrl+alt+pagedwn\n") == [
        "p.yaml:14:15: hotkey `ctrl+alt+pagedwn`: `pagedwn` names no key (did you mean `pagedown`?)"]


def test_hotkey_errors():
    assert errors(BASE + "hotkeys:\n  next-guest: n\n")[0].startswith(
        "p.yaml:14:15: hotkey `n` has no modifier")
    assert errors(BASE + "hotkeys:\n  next-guest: ctrl+alt+m\n") == [
        "p.yaml:14:15: hotkeys `next-guest` and `next-monitor` are both `ctrl+alt+m`"]
    assert errors(BASE + "hotkeys:\n  next-gest: ctrl+alt+x\n")[0].startswith(
        "p.yaml:14:3: unknown key `next-gest` in `hotkeys`")


def test_position_errors():
    assert errors(BASE.replace("{right-of: a}", "{right-of: a, x: 3}")) == [
        "p.yaml:4:34: `position` gives both coordinates and a neighbour (write `{x: 1920, y: 0}` (layout "
        "pixels) or `{right-of: MONITOR}` (also left-of, above, below))"]
    circle = BASE.replace("{right-of: a}", "{right-of: c}").replace("{x: 0, y: -768}", "{below: b}")
    assert errors(circle) == ["p.yaml:4:3: monitor positions go round in a circle: `b` → `c` → `b` "
                              "(give one of them coordinates, `{x: 0, y: 0}`)"]
    assert errors(BASE.replace("{right-of: a}", "{right-of: z}"))[0].startswith(
        "p.yaml:4:3: undefined monitor `z`")


def test_neighbour_in_another_seat_is_an_error():
    text = BASE.replace("s1: {monitors: [a, b, c],", "s2: {monitors: [a]}\n  s1: {monitors: [b, c],")
    assert errors(text) == ["p.yaml:4:3: monitor `b` is placed right-of `a`, which is in another seat "
                            "(the pointer crosses only the monitors of one seat)"]


def test_input_errors():
    assert errors(BASE.replace('input: [{path: "pci-*usb*"}, {name: "Logi*"}]', "input: []"))[0].startswith(
        "p.yaml:7:36: `input` is empty: the seat would take no device")
    assert errors(BASE.replace('{name: "Logi*"}', "{}"))[0].startswith(
        "p.yaml:7:58: an `input` item matches every device")


def test_two_seats_without_input_warn():
    text = BASE.replace('s1: {monitors: [a, b, c], input: [{path: "pci-*usb*"}, {name: "Logi*"}]}',
                        "s1: {monitors: [a]}\n  s2: {monitors: [b, c]}")
    text = text.replace("position: {right-of: a}", "position: {x: 0, y: 0}")
    p = parse(text, "p.yaml")
    assert any("their keyboards and mice all go to `s1`" in str(w) for w in p.warnings)
