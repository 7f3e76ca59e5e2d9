"""The `monitors` section: which connected output each monitor of the policy is (by connector, EDID or
port, narrowed by card, driver and logind seat), how it shows its guest, and where it sits in its
seat's layout."""

from __future__ import annotations

import re

import yaml

from compositor.policy.display import DisplaySection, DisplaySettings
from compositor.policy.model import RELATIONS, EdidMatch, Glob, MonitorRule, Position, Seat
from compositor.policy.reader import STR, Keys, Reader

_MONITOR_KEYS = ("connector", "edid", "port", "card", "driver", "logind_seat", "mode", "scaling", "slate",
                 "label", "position")
_POSITION_KEYS = ("x", "y", *RELATIONS)
_MATCH_KEYS = ("connector", "edid", "port")
_EDID_KEYS = ("manufacturer", "product", "serial", "serial_string", "name", "identity")


class MonitorSection:
    """Reads the monitors into `rules`, in file order, and keeps each name's key node in `nodes` (a
    monitor with errors has a node but no rule, so references to it are not reported as undefined)."""

    def __init__(self, reader: Reader, display: DisplaySection):
        self.reader = reader
        self.display = display
        self.rules: list[MonitorRule] = []
        self.nodes: dict[str, yaml.Node] = {}

    def read(self, top: Keys, root: yaml.Node, defaults: DisplaySettings) -> None:
        if "monitors" not in top:
            self.reader.error(root, "no `monitors` section", "name the monitors the policy places guests on")
            return
        entries = self.reader.named_entries(top["monitors"][1], "monitors")
        if not entries and isinstance(top["monitors"][1], yaml.MappingNode):
            self.reader.error(top["monitors"][0], "`monitors` is empty")
        for name, knode, vnode in entries:
            self.nodes[name] = knode
            if (rule := self.monitor(name, knode, vnode, defaults)) is not None:
                self.rules.append(rule)

    def edid(self, node: yaml.Node) -> EdidMatch | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == STR:
            return EdidMatch(identity=Glob(node.value))
        keys = self.reader.mapping(node, "`edid`", _EDID_KEYS)
        if not isinstance(node, yaml.MappingNode):
            return None
        if not node.value:
            self.reader.error(node, "`edid` is empty", "give at least one of: " + ", ".join(_EDID_KEYS))
            return None
        manufacturer = self.manufacturer(keys["manufacturer"][1]) if "manufacturer" in keys else None
        product = serial = None
        if "product" in keys:
            product = self.reader.integer(keys["product"][1], "`product`", 0, 0xFFFF)
        if "serial" in keys:
            serial = self.reader.integer(keys["serial"][1], "`serial`", 0, 0xFFFFFFFF)
        globs = self.globs(keys, ("serial_string", "name", "identity"))
        return EdidMatch(manufacturer, product, serial, serial_string=globs.get("serial_string"),
                         name=globs.get("name"), identity=globs.get("identity"))

    def manufacturer(self, node: yaml.Node) -> str | None:
        """The EDID's three-letter PNP id, upper-case."""
        v = self.reader.string(node, "`manufacturer`")
        if v is not None and not re.fullmatch(r"[A-Za-z]{3}", v):
            self.reader.error(node, f"bad manufacturer `{v}`", "a three-letter PNP id such as `DEL` or `RHT`")
            return None
        return v.upper() if v is not None else None

    def globs(self, keys: Keys, names: tuple[str, ...]) -> dict[str, Glob]:
        """The patterns given for `names`, those that are strings."""
        return {key: Glob(v) for key in names
                if key in keys and (v := self.reader.string(keys[key][1], f"`{key}`")) is not None}

    def monitor(self, name: str, knode: yaml.Node, node: yaml.Node,
                defaults: DisplaySettings) -> MonitorRule | None:
        line = knode.start_mark.line + 1
        if isinstance(node, yaml.ScalarNode) and node.tag == STR:
            # `left: HDMI-A-1` is short for `left: {connector: HDMI-A-1}`
            return MonitorRule(name, line, connector=Glob(node.value), mode=defaults.mode,
                               scaling=defaults.scaling, slate=defaults.slate, label=defaults.label)
        errors_before = len(self.reader.errors)
        keys = self.reader.mapping(node, f"monitor `{name}`", _MONITOR_KEYS)
        if not isinstance(node, yaml.MappingNode):
            return None
        # With a misspelt key already reported, "matches nothing" would only repeat it.
        if not any(k in keys for k in _MATCH_KEYS) and len(self.reader.errors) == errors_before:
            self.reader.error(knode, f"monitor `{name}` matches nothing",
                              "give `connector`, `edid` or `port` to say which monitor this is")
        globs = self.globs(keys, ("connector", "port", "card", "driver"))
        logind_seat = None
        if "logind_seat" in keys:
            logind_seat = self.reader.string(keys["logind_seat"][1], "`logind_seat`")
        edid = self.edid(keys["edid"][1]) if "edid" in keys else None
        position = self.position(keys["position"][1]) if "position" in keys else None
        settings = self.display.display_settings(keys, defaults)
        return MonitorRule(name, line, connector=globs.get("connector"), edid=edid, port=globs.get("port"),
                           card=globs.get("card"), driver=globs.get("driver"), logind_seat=logind_seat,
                           mode=settings.mode, scaling=settings.scaling, slate=settings.slate,
                           label=settings.label, position=position)

    def position(self, node: yaml.Node) -> Position | None:
        hint = "write `{x: 1920, y: 0}` (layout pixels) or `{right-of: MONITOR}` (also left-of, above, below)"
        keys = self.reader.mapping(node, "`position`", _POSITION_KEYS)
        if not isinstance(node, yaml.MappingNode):
            return None
        relations = [k for k in RELATIONS if k in keys]
        if relations and ("x" in keys or "y" in keys):
            self.reader.error(node, "`position` gives both coordinates and a neighbour", hint)
            return None
        if len(relations) > 1:
            self.reader.error(node, f"`position` gives {' and '.join(relations)}: a monitor has one "
                              "neighbour to be placed by", hint)
            return None
        if relations:
            of = self.reader.string(keys[relations[0]][1], f"`{relations[0]}`")
            return Position(relation=relations[0], of=of) if of is not None else None
        if not keys:
            self.reader.error(node, "`position` is empty", hint)
            return None
        x = self.reader.integer(keys["x"][1], "`x`", -65536, 65536) if "x" in keys else 0
        y = self.reader.integer(keys["y"][1], "`y`", -65536, 65536) if "y" in keys else 0
        return Position(x or 0, y or 0)

    def layout(self, seats: dict[str, Seat]) -> None:
        """A neighbour must be a defined monitor of the same seat, and neighbours must not go round in
        a circle (the layout is built from monitors with coordinates outwards)."""
        seat_of = {m: s.name for s in seats.values() for m in s.monitors}
        rules = {m.name: m for m in self.rules}
        for m in self.rules:
            pos = m.position
            if pos is None or pos.of is None:
                continue
            node = self.nodes[m.name]
            if not self.reader.reference(pos.of, node, "monitor", rules):
                continue
            if pos.of == m.name:
                self.reader.error(node, f"monitor `{m.name}` is placed {pos.relation} itself")
            elif seat_of.get(pos.of) != seat_of.get(m.name):
                self.reader.error(node, f"monitor `{m.name}` is placed {pos.relation} `{pos.of}`, which is "
                                  "in another seat", "the pointer crosses only the monitors of one seat")
        circles: set[frozenset[str]] = set()
        for m in self.rules:
            chain, cur = [m.name], m
            while cur.position is not None and cur.position.of in rules and cur.position.of != cur.name:
                cur = rules[cur.position.of]
                if cur.name in chain:
                    if cur.name == m.name and frozenset(chain) not in circles:
                        circles.add(frozenset(chain))
                        self.reader.error(self.nodes[m.name], "monitor positions go round in a circle: "
                                          + " → ".join(f"`{n}`" for n in [*chain, cur.name]),
                                          "give one of them coordinates, `{x: 0, y: 0}`")
                    break
                chain.append(cur.name)
