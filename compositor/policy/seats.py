"""The `seats` section: which monitors and input devices make one desk. A seat takes its monitors by
name or by logind seat, and its keyboards and mice by udev ID_PATH and name (`input`), or those of its
logind seats."""

from __future__ import annotations

import yaml

from compositor.policy.model import Glob, InputMatch, Seat
from compositor.policy.reader import Keys, Reader

_SEAT_KEYS = ("monitors", "logind", "input")
_INPUT_KEYS = ("path", "name")


class SeatSection:
    """Reads the seats into `seats` (by name, in file order) and the seat of each monitor listed by
    name into `monitor_seats`; a monitor belongs to one seat."""

    def __init__(self, reader: Reader):
        self.reader = reader
        self.seats: dict[str, Seat] = {}
        self.monitor_seats: dict[str, frozenset[str]] = {}

    def read(self, top: Keys, monitors: list[str]) -> None:
        seat_of_monitor: dict[str, str] = {}
        if "seats" in top:
            for name, knode, vnode in self.reader.named_entries(top["seats"][1], "seats"):
                seat = self.seat(name, knode, vnode, monitors)
                if seat is None:
                    continue
                self.seats[name] = seat
                for m in seat.monitors:
                    if m in seat_of_monitor:
                        other = seat_of_monitor[m]
                        self.reader.error(knode, f"monitor `{m}` is in seats `{other}` and `{name}`",
                                          "a monitor belongs to one seat")
                    else:
                        seat_of_monitor[m] = name
        self.monitor_seats = {m: frozenset({s}) for m, s in seat_of_monitor.items()}

    def logind_seats(self) -> dict[str, frozenset[str]]:
        """logind seat -> the policy seats that take its monitors."""
        out: dict[str, set[str]] = {}
        for seat in self.seats.values():
            for ls in seat.logind:
                out.setdefault(ls, set()).add(seat.name)
        return {k: frozenset(v) for k, v in out.items()}

    def shared_input(self, top: Keys) -> None:
        """Seats that say nothing of their input devices all get the devices no other seat takes, and
        the first of them gets them all: worth a warning when there are several."""
        free_seats = [s.name for s in self.seats.values() if not s.input and not s.logind]
        if len(free_seats) > 1:
            self.reader.warn(top["seats"][1], f"seats {', '.join(f'`{n}`' for n in free_seats)} name no "
                             f"`input` or `logind`: their keyboards and mice all go to `{free_seats[0]}`",
                             "give each desk's devices with `input: [{path: ...}]`")

    def seat(self, name: str, knode: yaml.Node, node: yaml.Node, monitors: list[str]) -> Seat | None:
        keys = self.reader.mapping(node, f"seat `{name}`", _SEAT_KEYS)
        if not isinstance(node, yaml.MappingNode):
            return None
        listed = []
        if "monitors" in keys:
            for mname, mnode in self.reader.names(keys["monitors"][1], "`monitors`"):
                if self.reader.reference(mname, mnode, "monitor", monitors):
                    if mname in listed:
                        self.reader.error(mnode, f"monitor `{mname}` is listed twice in seat `{name}`")
                    else:
                        listed.append(mname)
        logind = []
        if "logind" in keys:
            logind = [n for n, _ in self.reader.names(keys["logind"][1], "`logind`")]
        if not listed and not logind:
            self.reader.error(knode, f"seat `{name}` has no monitors",
                              "list its `monitors`, or the `logind` seats whose monitors it owns")
        matches = self.input_matches(keys["input"][1]) if "input" in keys else []
        return Seat(name, tuple(listed), tuple(logind), tuple(matches))

    def input_matches(self, node: yaml.Node) -> list[InputMatch]:
        hint = 'each item is `{path: "pci-*-usb-0:1*"}` (udev ID_PATH) and/or `{name: "Logitech*"}`'
        if not isinstance(node, yaml.SequenceNode):
            self.reader.error(node, f"`input` must be a list, got {self.reader.describe(node)}", hint)
            return []
        if not node.value:
            self.reader.error(node, "`input` is empty: the seat would take no device", hint)
            return []
        out = []
        for item in node.value:
            keys = self.reader.mapping(item, "an `input` item", _INPUT_KEYS)
            if not isinstance(item, yaml.MappingNode):
                continue
            if not keys:
                self.reader.error(item, "an `input` item matches every device", hint)
                continue
            globs = {k: self.reader.string(keys[k][1], f"`{k}`") for k in _INPUT_KEYS if k in keys}
            if all(v is not None for v in globs.values()):
                out.append(InputMatch(**{k: Glob(v) for k, v in globs.items() if v is not None}))
        return out
