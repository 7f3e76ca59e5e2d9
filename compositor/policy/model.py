"""The validated policy: what the planner, the input router and the daemon read. Matchers are compiled
once here (`Glob`), so the planner only calls `matches()`."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from compositor.policy.diagnostics import Diagnostic
from compositor.topology import Card, Edid, Output

if TYPE_CHECKING:
    from compositor.input.keys import Hotkey

# The hotkey actions (compositor.input.keys.ACTIONS, repeated here so that loading a policy without a
# `hotkeys` section does not import evdev, which imports asyncio: `check` stays quick).
HOTKEY_ACTIONS = ("next-guest", "next-monitor", "release-input")

GUEST_KINDS = ("vfio", "qemu-dbus", "libvirt", "socket")
LIBVIRT_URI = "qemu:///system"  # where `kind: libvirt` guests are looked for unless `uri` says
SCALINGS = ("none", "fit", "fill", "integer")
SCALING_ALIASES = {"centre": "none", "center": "none"}
DEFAULT_SLATE_TEXT = "no signal"
DEFAULT_SLATE_COLOUR = "#101018"
DEFAULT_LABEL_SECONDS = 1.5


@dataclass(frozen=True)
class Glob:
    """A shell-style pattern (`*`, `?`, `[...]`), compiled once. Literal patterns compare directly."""

    pattern: str
    literal: bool = field(init=False, compare=False)
    _match: Callable[[str], object] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        literal = not any(c in self.pattern for c in "*?[")
        object.__setattr__(self, "literal", literal)
        if literal:
            object.__setattr__(self, "_match", self.pattern.__eq__)
        else:
            object.__setattr__(self, "_match", re.compile(fnmatch.translate(self.pattern)).match)

    def matches(self, text: str | None) -> bool:
        return text is not None and bool(self._match(text))

    def __str__(self) -> str:
        return self.pattern


@dataclass(frozen=True)
class ModeRequest:
    """`preferred`, `match-guest`, or a size with an optional refresh rate."""

    kind: str  # preferred | match-guest | size
    width: int = 0
    height: int = 0
    refresh: float | None = None

    def __str__(self) -> str:
        if self.kind != "size":
            return self.kind
        hz = f"@{self.refresh:g}" if self.refresh is not None else ""
        return f"{self.width}x{self.height}{hz}"


@dataclass(frozen=True)
class SlateStyle:
    text: str = DEFAULT_SLATE_TEXT
    colour: str = DEFAULT_SLATE_COLOUR


@dataclass(frozen=True)
class EdidMatch:
    manufacturer: str | None = None  # compared upper-case
    product: int | None = None
    serial: int | None = None
    serial_string: Glob | None = None
    name: Glob | None = None
    identity: Glob | None = None

    def matches(self, edid: Edid | None) -> bool:
        """Every field given matches; a monitor without an EDID matches none."""
        if edid is None:
            return False
        if self.manufacturer is not None and edid.manufacturer.upper() != self.manufacturer:
            return False
        if self.product is not None and edid.product != self.product:
            return False
        if self.serial is not None and edid.serial != self.serial:
            return False
        if self.serial_string is not None and not self.serial_string.matches(edid.serial_string):
            return False
        if self.name is not None and not self.name.matches(edid.name):
            return False
        return self.identity is None or self.identity.matches(edid.identity)


RELATIONS = ("right-of", "left-of", "above", "below")


@dataclass(frozen=True)
class Position:
    """Where a monitor sits in its seat's layout, which the pointer crosses: `x`/`y` in layout pixels,
    or beside another monitor of the seat (`relation` in RELATIONS, `of` its name)."""

    x: int = 0
    y: int = 0
    relation: str | None = None
    of: str | None = None


@dataclass(frozen=True)
class MonitorRule:
    name: str
    line: int
    connector: Glob | None = None
    edid: EdidMatch | None = None
    port: Glob | None = None
    card: Glob | None = None
    driver: Glob | None = None
    logind_seat: str | None = None
    mode: ModeRequest = ModeRequest("preferred")
    scaling: str = "fit"
    slate: SlateStyle = SlateStyle()
    label: float = 1.5  # DEFAULT_LABEL_SECONDS: the guest's name shown this long when the monitor turns to it
    position: Position | None = None

    def matches(self, output: Output) -> bool:
        card, conn = output.card, output.connector
        if self.connector is not None and not self.connector.matches(conn.name):
            return False
        if not self._card_matches(card):
            return False
        if self.port is not None and not self._port_matches(self.port, card, conn.name):
            return False
        return self.edid is None or self.edid.matches(conn.edid)

    def _card_matches(self, card: Card) -> bool:
        """`card` (its path, or the path's last part), `driver` and `logind_seat`."""
        if self.card is not None and not (self.card.matches(card.path)
                                          or self.card.matches(card.path.rsplit("/", 1)[-1])):
            return False
        if self.driver is not None and not self.driver.matches(card.driver):
            return False
        return self.logind_seat is None or card.seat == self.logind_seat

    @staticmethod
    def _port_matches(port: Glob, card: Card, connector: str) -> bool:
        """`port` is the card's bus path, or with a `/` in the pattern that path and the connector's name
        (`pci-0000:01:00.0/DP-*`). A card with no bus path is on no port."""
        if card.bus_path is None:
            return False
        target = card.bus_path if "/" not in port.pattern else f"{card.bus_path}/{connector}"
        return port.matches(target)


@dataclass(frozen=True)
class GuestRule:
    name: str
    line: int
    pattern: Glob
    uuid: str | None = None  # lower-case
    kind: str | None = None
    # Who may connect as this guest over the frame socket (uids, from `users`); None: only root and
    # the compositor's own user.
    uids: tuple[int, ...] | None = None
    # kind vfio: a command to start with a duplicate of the vGPU's device fd ({fd} in it is replaced
    # by the fd's number; DIRECTFLIP_VFIO_FD says it too), e.g. the VMM that runs the guest.
    launch: str | None = None
    # kind qemu-dbus: where the VM's display is (qmp:PATH or dbus:ADDRESS) and which console of it.
    display: str | None = None
    console: int = 0
    # kind libvirt: the domain (name or UUID; default: the guest's name) and libvirt's URI.
    domain: str | None = None
    uri: str | None = None
    # kind qemu-dbus / libvirt: tell the guest its monitor's size (SetUIInfo), so it can take it.
    resize: bool = True

    @property
    def opened_here(self) -> str | None:
        """What directflip opens itself for this guest (a vGPU by its UUID, a QEMU display), or None
        for a guest that comes to it over the frame socket."""
        if self.kind == "vfio" and self.uuid is not None:
            return f"vGPU {self.uuid}"
        if self.kind == "qemu-dbus" and self.display is not None:
            return f"QEMU display {self.display}"
        if self.kind == "libvirt" and self.domain is not None:
            return f"libvirt domain {self.domain} at {self.uri}"
        return None

    @property
    def qemu_target(self) -> tuple[str, ...] | None:
        """Where a QEMU display this rule opens is: ("display", SPEC) or ("libvirt", URI, DOMAIN)."""
        if self.kind == "qemu-dbus" and self.display is not None:
            return ("display", self.display)
        if self.kind == "libvirt" and self.domain is not None and self.uri is not None:
            return ("libvirt", self.uri, self.domain)
        return None

    def matches(self, name: str, kind: str | None, uuid: str | None) -> bool:
        """Whether the rule takes this guest; kind None: whatever its kind (credentials go by name)."""
        if kind is not None and self.kind is not None and kind != self.kind:
            return False
        if self.uuid is not None and (uuid is None or uuid.lower() != self.uuid):
            return False
        return self.pattern.matches(name)


@dataclass(frozen=True)
class InputMatch:
    """One `input` item of a seat: an input device whose udev ID_PATH and/or name match."""

    path: Glob | None = None
    name: Glob | None = None

    def matches(self, id_path: str | None, name: str | None) -> bool:
        return (self.path is None or self.path.matches(id_path)) and \
            (self.name is None or self.name.matches(name))

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in (("path", self.path), ("name", self.name)) if v is not None)


@dataclass(frozen=True)
class Seat:
    name: str
    monitors: tuple[str, ...]
    logind: tuple[str, ...]
    # The input devices this seat takes; empty: the devices of its logind seats, or (for the first seat
    # without `input` or `logind`) those no other seat takes.
    input: tuple[InputMatch, ...] = ()


@dataclass(frozen=True)
class Placement:
    guest: str
    index: int  # position in the file: the tie-breaker between equal priorities
    line: int
    monitor: str | None = None
    failover: tuple[str, ...] = ()
    mirror: tuple[str, ...] = ()
    priority: int = 0
    seats: tuple[str, ...] = ()
    # Filled in by the loader: the monitors to try in order for the main view.
    candidates: tuple[str, ...] = ()


@dataclass(frozen=True)
class Policy:
    source: str
    monitors: tuple[MonitorRule, ...]
    guests: tuple[GuestRule, ...]
    seats: tuple[Seat, ...]
    placements: tuple[Placement, ...]
    # seat membership, precomputed: policy monitor -> policy seats listing it; logind seat -> policy seats
    monitor_seats: dict[str, frozenset[str]] = field(default_factory=dict, compare=False, hash=False)
    logind_seats: dict[str, frozenset[str]] = field(default_factory=dict, compare=False, hash=False)
    warnings: tuple[Diagnostic, ...] = field(default=(), compare=False)
    # None: the defaults (compositor.input.keys.DEFAULT_HOTKEYS); see `hotkey_list`
    hotkeys: tuple[Hotkey, ...] | None = None

    def hotkey_list(self) -> tuple[Hotkey, ...]:
        if self.hotkeys is not None:
            return self.hotkeys
        from compositor.input.keys import default_hotkeys

        return default_hotkeys()

    def monitor(self, name: str) -> MonitorRule:
        return next(m for m in self.monitors if m.name == name)

    def seats_of(self, monitor: str, output: Output) -> frozenset[str]:
        """The policy seats `monitor` belongs to while it is shown by `output`."""
        listed = self.monitor_seats.get(monitor, frozenset())
        by_logind = self.logind_seats.get(output.card.seat)
        return listed | by_logind if by_logind else listed

