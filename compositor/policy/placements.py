"""The `placements` section: which monitors show each guest. A placement names the monitor for the
guest's main view and the `failover` monitors to try in order when it is gone, or the `seats` whose
monitors may show it; `mirror` monitors show a copy, and `priority` settles which guest a contested
monitor shows (ties go to the earlier placement)."""

from __future__ import annotations

import yaml

from compositor.policy.model import Placement, Seat
from compositor.policy.reader import Keys, Reader, where

_PLACEMENT_KEYS = ("guest", "monitor", "failover", "mirror", "priority", "seats")


class PlacementSection:
    """Reads the placements into `placements`, in file order, with the names the other sections
    define; `placed` keeps the node that placed each guest (a guest is placed once)."""

    def __init__(self, reader: Reader, monitors: list[str], guests: list[str], seats: dict[str, Seat],
                 monitor_seats: dict[str, frozenset[str]]):
        self.reader = reader
        self.monitors = monitors
        self.guests = guests
        self.seats = seats
        self.monitor_seats = monitor_seats
        self.placements: list[Placement] = []
        self.placed: dict[str, yaml.Node] = {}

    def read(self, top: Keys) -> None:
        if "placements" not in top:
            return
        pnode = top["placements"][1]
        if not isinstance(pnode, yaml.SequenceNode):
            self.reader.error(pnode, f"`placements` must be a list, got {self.reader.describe(pnode)}",
                              "each item starts with `- guest: NAME`")
            return
        for i, item in enumerate(pnode.value):
            if (p := self.placement(i, item)) is not None:
                self.placements.append(p)

    def placement(self, index: int, node: yaml.Node) -> Placement | None:
        keys = self.reader.mapping(node, "a placement", _PLACEMENT_KEYS)
        if not isinstance(node, yaml.MappingNode):
            return None
        line = node.start_mark.line + 1
        if "guest" not in keys:
            self.reader.error(node, "placement without a `guest`",
                              "every placement says which guest it shows")
            return None
        guest = self.guest(keys["guest"][1])
        refs = _MonitorRefs(self.reader, self.monitors)
        monitor = self.main_monitor(keys["monitor"][1], refs) if "monitor" in keys else None
        failover = self.monitor_list(keys, "failover", refs, "main")
        mirror = self.monitor_list(keys, "mirror", refs, "mirror")
        if "failover" in keys and "monitor" not in keys:
            self.reader.error(keys["failover"][0], "`failover` without `monitor`",
                              "`monitor` is tried first, then each `failover` monitor in order")
        priority = self.priority(keys["priority"][1]) if "priority" in keys else 0
        allowed = self.allowed_seats(keys["seats"][1]) if "seats" in keys else []
        if "monitor" not in keys and "seats" not in keys:
            self.reader.error(node, f"placement for `{guest or '?'}` names no monitor",
                              "add `monitor` with any `failover`, "
                              "or `seats` to use any monitor of those seats")
        self.fenced(allowed, refs.refs)
        if guest is None:
            return None
        candidates = (monitor, *failover) if monitor is not None else self.seat_monitors(allowed)
        return Placement(guest, index, line, monitor=monitor, failover=failover, mirror=mirror,
                         priority=priority, seats=tuple(allowed), candidates=candidates)

    def guest(self, gnode: yaml.Node) -> str | None:
        """The placed guest: defined, and placed by no earlier placement."""
        guest = self.reader.string(gnode, "`guest`")
        if guest is None or not self.reader.reference(guest, gnode, "guest", self.guests):
            return None
        if guest in self.placed:
            first = where(self.placed[guest], gnode)
            self.reader.error(gnode, f"guest `{guest}` is already placed at {first}",
                              "give one placement per guest, with `failover` and `mirror` for more monitors")
            return None
        self.placed[guest] = gnode
        return guest

    def main_monitor(self, mnode: yaml.Node, refs: _MonitorRefs) -> str | None:
        mname = self.reader.string(mnode, "`monitor`")
        if mname is not None and refs.take(mname, mnode, "main"):
            return mname
        return None

    def monitor_list(self, keys: Keys, key: str, refs: _MonitorRefs, role: str) -> tuple[str, ...]:
        """The monitors `failover` or `mirror` names that it may use, in the order given."""
        if key not in keys:
            return ()
        return tuple(n for n, nn in self.reader.names(keys[key][1], f"`{key}`") if refs.take(n, nn, role))

    def priority(self, node: yaml.Node) -> int:
        return self.reader.integer(node, "`priority`", -(2**31), 2**31 - 1) or 0

    def allowed_seats(self, node: yaml.Node) -> list[str]:
        """The defined seats `seats` names, in the order given."""
        allowed: list[str] = []
        for sname, snode in self.reader.names(node, "`seats`"):
            if self.reader.reference(sname, snode, "seat", self.seats):
                allowed.append(sname)
        return allowed

    def fenced(self, allowed: list[str], refs: list[tuple[str, yaml.Node]]) -> None:
        """A placement limited to seats that take no monitors by logind seat can use only the monitors
        those seats list: membership is fixed by the file, so any other monitor can never be used."""
        if not allowed or any(self.seats[s].logind for s in allowed):
            return
        for mname, mnode in refs:
            if not self.monitor_seats.get(mname, frozenset()) & set(allowed):
                fence = (f"seat `{allowed[0]}`" if len(allowed) == 1
                         else "seats " + ", ".join(f"`{s}`" for s in allowed))
                self.reader.error(mnode, f"monitor `{mname}` is not in {fence}, "
                                  "which this placement is limited to",
                                  f"add it to the `monitors` of seat `{allowed[0]}`, or remove it here")

    def seat_monitors(self, allowed: list[str]) -> tuple[str, ...]:
        """The candidates of a placement by `seats` alone: any monitor of the allowed seats, seats in the
        order given, monitors in the seat's order; if a seat also takes monitors by logind seat, every
        other monitor may qualify at run time."""
        ordered: list[str] = []
        for s in allowed:
            ordered += [m for m in self.seats[s].monitors if m not in ordered]
        if any(self.seats[s].logind for s in allowed):
            ordered += [m for m in self.monitors if m not in ordered]
        return tuple(ordered)


class _MonitorRefs:
    """The monitors one placement names, each defined, and named once among the main candidates
    (`monitor` and `failover`) and once among the mirrors: a monitor in both shows the guest's main
    view when the earlier candidates are gone, else its mirror. `refs` keeps them in the order named."""

    def __init__(self, reader: Reader, defined: list[str]):
        self.reader = reader
        self.defined = defined
        self.seen: dict[str, dict[str, yaml.Node]] = {"main": {}, "mirror": {}}
        self.refs: list[tuple[str, yaml.Node]] = []

    def take(self, mname: str, mnode: yaml.Node, role: str) -> bool:
        """Whether the monitor may be used in `role` ("main" or "mirror"); if not, says why."""
        if not self.reader.reference(mname, mnode, "monitor", self.defined):
            return False
        if mname in self.seen[role]:
            keys_named = "`mirror`" if role == "mirror" else "`monitor` and `failover`"
            self.reader.error(mnode, f"monitor `{mname}` appears twice in {keys_named}",
                              f"first at {where(self.seen[role][mname], mnode)}")
            return False
        self.seen[role][mname] = mnode
        self.refs.append((mname, mnode))
        return True
