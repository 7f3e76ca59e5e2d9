"""The `placements` section: which monitors show each guest. A placement names the monitor for the
guest's main view and the `failover` monitors to try in order when it is gone, or the `seats` whose
monitors may show it; `mirror` monitors show a copy, and `priority` settles which guest a contested
monitor shows (ties go to the earlier placement)."""

from __future__ import annotations

from typing import Any

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
        gnode = keys["guest"][1]
        guest = self.reader.string(gnode, "`guest`")
        if guest is None or not self.reader.reference(guest, gnode, "guest", self.guests):
            guest = None
        elif guest in self.placed:
            first = where(self.placed[guest], gnode)
            self.reader.error(gnode, f"guest `{guest}` is already placed at {first}",
                              "give one placement per guest, with `failover` and `mirror` for more monitors")
            guest = None
        else:
            self.placed[guest] = gnode
        fields: dict[str, Any] = {}
        # A monitor may appear once among the main candidates and once among the mirrors: a monitor in
        # both shows the guest's main view when the earlier candidates are gone, else its mirror.
        seen: dict[str, dict[str, yaml.Node]] = {"main": {}, "mirror": {}}
        refs: list[tuple[str, yaml.Node]] = []

        def monitor_ref(mname: str, mnode: yaml.Node, role: str) -> bool:
            if not self.reader.reference(mname, mnode, "monitor", self.monitors):
                return False
            if mname in seen[role]:
                keys_named = "`mirror`" if role == "mirror" else "`monitor` and `failover`"
                self.reader.error(mnode, f"monitor `{mname}` appears twice in {keys_named}",
                                  f"first at {where(seen[role][mname], mnode)}")
                return False
            seen[role][mname] = mnode
            refs.append((mname, mnode))
            return True

        if "monitor" in keys:
            mnode = keys["monitor"][1]
            mname = self.reader.string(mnode, "`monitor`")
            if mname is not None and monitor_ref(mname, mnode, "main"):
                fields["monitor"] = mname
        for key, role in (("failover", "main"), ("mirror", "mirror")):
            if key in keys:
                fields[key] = tuple(n for n, nn in self.reader.names(keys[key][1], f"`{key}`")
                                    if monitor_ref(n, nn, role))
        if "failover" in keys and "monitor" not in keys:
            self.reader.error(keys["failover"][0], "`failover` without `monitor`",
                              "`monitor` is tried first, then each `failover` monitor in order")
        if "priority" in keys:
            fields["priority"] = self.reader.integer(keys["priority"][1], "`priority`",
                                                     -(2**31), 2**31 - 1) or 0
        allowed: list[str] = []
        if "seats" in keys:
            for sname, snode in self.reader.names(keys["seats"][1], "`seats`"):
                if self.reader.reference(sname, snode, "seat", self.seats):
                    allowed.append(sname)
            fields["seats"] = tuple(allowed)
        if "monitor" not in keys and "seats" not in keys:
            self.reader.error(node, f"placement for `{guest or '?'}` names no monitor",
                              "add `monitor` with any `failover`, "
                              "or `seats` to use any monitor of those seats")
        if allowed and not any(self.seats[s].logind for s in allowed):
            # Membership is fixed by the file, so a monitor outside the allowed seats can never be used.
            for mname, mnode in refs:
                if not self.monitor_seats.get(mname, frozenset()) & set(allowed):
                    fence = (f"seat `{allowed[0]}`" if len(allowed) == 1
                             else "seats " + ", ".join(f"`{s}`" for s in allowed))
                    self.reader.error(mnode, f"monitor `{mname}` is not in {fence}, "
                                      "which this placement is limited to",
                                      f"add it to the `monitors` of seat `{allowed[0]}`, or remove it here")
        if guest is None:
            return None
        candidates: tuple[str, ...]
        if "monitor" in fields:
            candidates = (fields["monitor"], *fields.get("failover", ()))
        else:
            # Any monitor of the allowed seats, seats in the order given, monitors in the seat's order; if
            # a seat also takes monitors by logind seat, every other monitor may qualify at run time.
            ordered: list[str] = []
            for s in allowed:
                ordered += [m for m in self.seats[s].monitors if m not in ordered]
            if any(self.seats[s].logind for s in allowed):
                ordered += [m for m in self.monitors if m not in ordered]
            candidates = tuple(ordered)
        return Placement(guest, index, line, candidates=candidates, **fields)
