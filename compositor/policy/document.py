"""The policy file as a whole: YAML text composed into nodes, the top-level keys, and the sections read
in the order their names depend on (monitors and guests first, then the seats that list monitors, then
the placements that name all three), into one `Policy` or one `PolicyError` with every problem."""

from __future__ import annotations

import re
from typing import NoReturn

import yaml

from compositor.policy.diagnostics import PolicyError
from compositor.policy.display import DisplaySection
from compositor.policy.guests import GuestSection
from compositor.policy.hotkeys import HotkeySection
from compositor.policy.model import Placement, Policy
from compositor.policy.monitors import MonitorSection
from compositor.policy.placements import PlacementSection
from compositor.policy.reader import Reader
from compositor.policy.seats import SeatSection

_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")  # what YAML counts lines by

_TOP_KEYS = ("version", "defaults", "monitors", "guests", "seats", "placements", "hotkeys")


class Validator:
    """Reads one policy text; `run` gives the `Policy` or raises `PolicyError` with all its errors."""

    def __init__(self, source: str):
        self.reader = Reader(source)

    def run(self, text: str) -> Policy:
        try:
            self.reader.loader = yaml.SafeLoader(text)
            root = self.reader.loader.get_single_node()
        except RecursionError:
            self.too_deep()
        except yaml.reader.ReaderError as exc:  # a character YAML does not allow; no mark, a position
            breaks = list(_LINE_BREAK.finditer(text, 0, exc.position))
            line, col = len(breaks) + 1, exc.position - (breaks[-1].end() if breaks else 0) + 1
            self.reader.error_at(line, col, f"YAML: character #x{exc.character:04x} is not allowed in YAML",
                                 "remove it, or write it as an escape in a double-quoted string")
            raise PolicyError(self.reader.errors) from None
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
            problem = exc.problem or exc.context or "cannot parse"
            hint = None
            if exc.problem and exc.context and exc.context_mark is not None:
                hint = f"{exc.context} started at line {exc.context_mark.line + 1}"
            self.reader.error_at(line, col, f"YAML syntax: {problem}", hint)
            raise PolicyError(self.reader.errors) from None
        except yaml.YAMLError as exc:
            self.reader.error_at(1, 1, f"YAML: {exc}")
            raise PolicyError(self.reader.errors) from None
        try:
            if root is None:
                self.reader.error(None, "the policy is empty",
                                  "`directflip init` writes one for the monitors plugged in")
                raise PolicyError(self.reader.errors)
            return self.document(root)
        except RecursionError:
            self.too_deep()
        finally:
            self.reader.loader.dispose()

    def too_deep(self) -> NoReturn:
        assert self.reader.loader is not None
        mark = self.reader.loader.get_mark()
        self.reader.error_at(mark.line + 1, mark.column + 1, "the policy is nested too deeply",
                             "a policy is a few levels deep")
        raise PolicyError(self.reader.errors) from None

    def document(self, root: yaml.Node) -> Policy:
        reader = self.reader
        top = reader.mapping(root, "the policy", _TOP_KEYS)
        if not isinstance(root, yaml.MappingNode):
            raise PolicyError(reader.errors)
        if reader.errors and any(d.message.startswith("duplicate key") for d in reader.errors):
            # A section given twice: only the first is read, so everything said about the sections
            # (one empty, names the second defines undefined) would follow from this one cause.
            raise PolicyError(reader.errors)
        if "version" in top:
            vnode = top["version"][1]
            if reader.int_value(vnode) != 1:
                shown = vnode.value if isinstance(vnode, yaml.ScalarNode) else "?"
                reader.error(vnode, f"unsupported policy version `{shown}`",
                             "this directflip reads `version: 1`")

        display = DisplaySection(reader)
        defaults = display.defaults(top)
        monitors = MonitorSection(reader, display)
        monitors.read(top, root, defaults)
        guests = GuestSection(reader)
        guests.read(top)
        seats = SeatSection(reader)
        seats.read(top, list(monitors.nodes))
        placements = PlacementSection(reader, list(monitors.nodes), list(guests.nodes), seats.seats,
                                      seats.monitor_seats)
        placements.read(top)

        monitors.layout(seats.seats)
        hotkeys = HotkeySection(reader).read(top["hotkeys"][1]) if "hotkeys" in top else None
        seats.shared_input(top)
        self.unused(placements.placements, guests.nodes, placements.placed, monitors.nodes)

        reader.errors.sort()
        reader.warnings.sort()
        if reader.errors:
            raise PolicyError(reader.errors, reader.warnings)
        return Policy(
            source=reader.source,
            monitors=tuple(monitors.rules),
            guests=tuple(guests.rules),
            seats=tuple(seats.seats.values()),
            placements=tuple(placements.placements),
            monitor_seats=seats.monitor_seats,
            logind_seats=seats.logind_seats(),
            warnings=tuple(reader.warnings),
            hotkeys=hotkeys,
        )

    def unused(self, placements: list[Placement], guest_nodes: dict[str, yaml.Node],
               placed: dict[str, yaml.Node], monitor_nodes: dict[str, yaml.Node]) -> None:
        """Guests never placed and monitors no placement uses: not errors, but almost always a slip."""
        used = {m for p in placements for m in (*p.candidates, *p.mirror)}
        for g, knode in guest_nodes.items():
            if g not in placed:
                self.reader.warn(knode, f"guest `{g}` is never placed",
                                 "add a placement, or remove the guest")
        for m, knode in monitor_nodes.items():
            if m not in used:
                self.reader.warn(knode, f"no placement uses monitor `{m}`; it will only show its slate")
