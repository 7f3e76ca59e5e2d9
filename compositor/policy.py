"""The policy file: YAML in, a validated `Policy` out, or every problem in it at once.

The file is composed into PyYAML's node tree rather than loaded into plain dicts, so that every value
keeps the line and column it came from: each problem is reported as `file:line:column: message (hint)`
and the loader carries on to find the next one. Nothing here raises anything but `PolicyError` for a
bad file (and `OSError` for an unreadable one).

The format itself is documented for operators in policies/README.md. In short:

    version: 1
    defaults:   {mode, scaling, slate}
    monitors:   name -> {connector, edid, port, card, driver, logind_seat, mode, scaling, slate}
    guests:     name -> {name, uuid, kind}
    seats:      name -> {monitors, logind, input}
    placements: [{guest, monitor, failover, mirror, priority, seats}]
    hotkeys:    action -> "ctrl+alt+KEY"

Matchers are compiled once here, so the planner only calls `matches()`.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from compositor import policyfile
from compositor.topology import Output

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

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_MODE = re.compile(r"^(\d{1,9})x(\d{1,9})(?:@(\d+(?:\.\d+)?))?$")  # bounded: int() refuses 4300+ digits
_COLOUR = re.compile(r"^#[0-9a-fA-F]{6}$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_CONSOLE = re.compile(r"[0-9]{1,9}")  # ASCII digits: int() also takes `١`, and refuses 4300+ digits
_MAX_UID = 2**32 - 2  # (uid_t)-1 means "no user"
_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")  # what YAML counts lines by

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"
_MERGE = "tag:yaml.org,2002:merge"


# --- diagnostics ----------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Diagnostic:
    file: str
    line: int
    column: int
    message: str
    hint: str | None = None
    warning: bool = False

    def __str__(self) -> str:
        kind = "warning: " if self.warning else ""
        hint = f" ({self.hint})" if self.hint else ""
        return _one_line(f"{self.file}:{self.line}:{self.column}: {kind}{self.message}{hint}")


def _one_line(text: str) -> str:
    """Escape what would break a diagnostic's line (a key such as "a\\nb", a control character): each
    diagnostic stays one `file:line:column:` line in `check` output and in the log."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


class PolicyError(ValueError):
    """A policy file with errors. `errors` holds all of them, in file order."""

    def __init__(self, errors: list[Diagnostic], warnings: list[Diagnostic] | None = None):
        self.errors = errors
        self.warnings = warnings or []
        super().__init__("\n".join(str(e) for e in errors))


# --- the validated model --------------------------------------------------------------------------


@dataclass(frozen=True)
class Glob:
    """A shell-style pattern (`*`, `?`, `[...]`), compiled once. Literal patterns compare directly."""

    pattern: str
    literal: bool = field(init=False, compare=False)
    _match: Callable[[str], Any] = field(init=False, compare=False, repr=False)

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
        if self.card is not None and not (self.card.matches(card.path)
                                          or self.card.matches(card.path.rsplit("/", 1)[-1])):
            return False
        if self.driver is not None and not self.driver.matches(card.driver):
            return False
        if self.logind_seat is not None and card.seat != self.logind_seat:
            return False
        if self.port is not None:
            if card.bus_path is None:
                return False
            target = card.bus_path if "/" not in self.port.pattern else f"{card.bus_path}/{conn.name}"
            if not self.port.matches(target):
                return False
        if self.edid is not None:
            e, m = conn.edid, self.edid
            if e is None:
                return False
            if m.manufacturer is not None and e.manufacturer.upper() != m.manufacturer:
                return False
            if m.product is not None and e.product != m.product:
                return False
            if m.serial is not None and e.serial != m.serial:
                return False
            if m.serial_string is not None and not m.serial_string.matches(e.serial_string):
                return False
            if m.name is not None and not m.name.matches(e.name):
                return False
            if m.identity is not None and not m.identity.matches(e.identity):
                return False
        return True


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


# --- loading --------------------------------------------------------------------------------------


def load(path: str | Path) -> Policy:
    """Read and validate a policy file. Raises `PolicyError` (all problems) or `OSError` (among them
    compositor.policyfile.PolicyFileError: not a regular file, too large, not UTF-8).

    A policy with `launch:` is refused unless nobody but root and the compositor's user could have
    written it or swapped it (compositor.policyfile.unsafe): `launch` runs its command as root."""
    pol = parse(policyfile.read(path), str(path))
    launching = [rule for rule in pol.guests if rule.launch is not None]
    if launching:
        why = policyfile.unsafe(path)
        if why is not None:
            hint = ("launch runs its command as the compositor's user: the policy, every symlink to it "
                    "and every directory above them must be owned by root or that user and writable by "
                    "no one else")
            raise PolicyError([Diagnostic(str(path), rule.line, 1, f"guest {rule.name}: `launch` is refused: "
                                          f"{why}", hint) for rule in launching], list(pol.warnings))
    return pol


def parse(text: str, source: str = "<policy>") -> Policy:
    """Validate policy text; `source` names the file in diagnostics."""
    return _Validator(source).run(text)


_Keys = dict[str, tuple[yaml.Node, yaml.Node]]  # key -> (key node, value node)

_TOP_KEYS = ("version", "defaults", "monitors", "guests", "seats", "placements", "hotkeys")
_DEFAULT_KEYS = ("mode", "scaling", "slate", "label")
_MONITOR_KEYS = ("connector", "edid", "port", "card", "driver", "logind_seat", "mode", "scaling", "slate",
                 "label", "position")
_POSITION_KEYS = ("x", "y", *RELATIONS)
_INPUT_KEYS = ("path", "name")
_MATCH_KEYS = ("connector", "edid", "port")
_EDID_KEYS = ("manufacturer", "product", "serial", "serial_string", "name", "identity")
_GUEST_KEYS = ("name", "uuid", "kind", "users", "launch", "display", "console", "domain", "uri", "resize")
_SEAT_KEYS = ("monitors", "logind", "input")
_PLACEMENT_KEYS = ("guest", "monitor", "failover", "mirror", "priority", "seats")
_SLATE_KEYS = ("text", "colour", "color")


def _where(first: yaml.Node, here: yaml.Node) -> str:
    """Where `first` is, said as briefly as tells it apart from `here`."""
    line = first.start_mark.line + 1
    if line == here.start_mark.line + 1:
        return f"line {line}, column {first.start_mark.column + 1}"
    return f"line {line}"


def _did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None


class _Validator:
    def __init__(self, source: str):
        self.source = source
        self.errors: list[Diagnostic] = []
        self.warnings: list[Diagnostic] = []
        self.loader: yaml.SafeLoader | None = None

    # -- reporting

    def error(self, node: yaml.Node | None, message: str, hint: str | None = None) -> None:
        line, col = (node.start_mark.line + 1, node.start_mark.column + 1) if node is not None else (1, 1)
        self.errors.append(Diagnostic(self.source, line, col, message, hint))

    def warn(self, node: yaml.Node, message: str, hint: str | None = None) -> None:
        self.warnings.append(Diagnostic(self.source, node.start_mark.line + 1, node.start_mark.column + 1,
                                        message, hint, warning=True))

    # -- node helpers

    def describe(self, node: yaml.Node) -> str:
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        if node.tag == _NULL:
            return "nothing"
        if node.tag == _BOOL:
            return f"the boolean `{node.value}`"
        if node.tag in (_INT, _FLOAT):
            return f"the number `{node.value}`"
        return f'the string "{node.value}"'

    def int_value(self, node: yaml.Node) -> int | None:
        """The integer a scalar node holds (YAML 1.1: 0x1F, 0o17, 1_000), or None."""
        if not isinstance(node, yaml.ScalarNode) or node.tag != _INT:
            return None
        assert self.loader is not None
        try:
            return int(self.loader.construct_object(node, deep=True))
        except (ValueError, TypeError, yaml.YAMLError):  # `!!int abc`
            return None

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...]) -> _Keys:
        """Check a mapping's keys; return key -> (key node, value node) for the allowed ones."""
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{what} must be a mapping, got {self.describe(node)}")
            return {}
        self.merge(node)
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode) or knode.tag not in (_STR, _INT):
                self.error(knode, f"keys in {what} must be names, got {self.describe(knode)}")
                continue
            key = str(knode.value)
            if key in out:
                self.error(knode, f"duplicate key `{key}` in {what}",
                           f"first given at {_where(out[key][0], knode)}")
                continue
            if allowed and key not in allowed:
                hint = _did_you_mean(key, allowed) or "expected one of: " + ", ".join(allowed)
                self.error(knode, f"unknown key `{key}` in {what}", hint)
                continue
            out[key] = (knode, vnode)
        return out

    def merge(self, node: yaml.MappingNode) -> None:
        """Resolve `<<: *anchor` merge keys in place: keys given in the mapping itself win over merged
        ones, as YAML says, and are not reported as duplicates of them."""
        if not any(k.tag == _MERGE for k, _ in node.value):
            return
        explicit = {k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode) and k.tag != _MERGE}
        own = {id(k) for k, _ in node.value}
        assert self.loader is not None
        try:
            self.loader.flatten_mapping(node)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
            self.errors.append(Diagnostic(self.source, line, col, f"YAML merge: {exc.problem}"))
            node.value = [(k, v) for k, v in node.value if k.tag != _MERGE]
            return
        seen: set[str] = set()
        kept = []
        for k, v in node.value:
            if id(k) not in own and isinstance(k, yaml.ScalarNode):
                if k.value in explicit or k.value in seen:
                    continue
                seen.add(k.value)
            kept.append((k, v))
        node.value = kept

    def named_entries(self, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """A `name: {...}` section: returns (name, key node, value node), checking the names."""
        entries = []
        for key, (knode, vnode) in self.mapping(node, f"`{what}`", ()).items():
            if not _NAME.match(key):
                self.error(knode, f"`{key}` is not a valid name",
                           "use letters, digits, `_`, `-` and `.`, not starting with `-` or `.`")
                continue
            entries.append((key, knode, vnode))
        return entries

    def string(self, node: yaml.Node, what: str) -> str | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag != _STR:
            self.error(node, f"{what} must be a string, got {self.describe(node)}")
            return None
        if node.value == "":
            self.error(node, f"{what} must not be empty")
            return None
        return node.value

    def boolean(self, node: yaml.Node, what: str) -> bool | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag != _BOOL:
            self.error(node, f"{what} must be true or false, got {self.describe(node)}")
            return None
        return node.value.lower() in ("true", "yes", "on")

    def integer(self, node: yaml.Node, what: str, lo: int, hi: int) -> int | None:
        v = self.int_value(node)
        if v is None:
            self.error(node, f"{what} must be an integer, got {self.describe(node)}")
            return None
        if not lo <= v <= hi:
            self.error(node, f"{what} must be between {lo} and {hi}, got {v}")
            return None
        return v

    def names(self, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node]]:
        """A name or a list of names."""
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR:
            return [(node.value, node)]
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, f"{what} must be a name or a list of names, got {self.describe(node)}")
            return []
        out = []
        for item in node.value:
            if isinstance(item, yaml.ScalarNode) and item.tag == _STR and item.value:
                out.append((item.value, item))
            else:
                self.error(item, f"{what} must list names, got {self.describe(item)}")
        return out

    def reference(self, name: str, node: yaml.Node, kind: str, defined: Iterable[str]) -> bool:
        defined = list(defined)
        if name in defined:
            return True
        hint = _did_you_mean(name, defined)
        if hint is None:
            hint = (f"{kind}s defined: " + ", ".join(f"`{d}`" for d in defined)) if defined \
                else f"no {kind}s are defined"
        self.error(node, f"undefined {kind} `{name}`", hint)
        return False

    # -- sections

    def mode(self, node: yaml.Node) -> ModeRequest | None:
        hint = "expected `preferred`, `match-guest` or `WIDTHxHEIGHT[@HZ]` such as `1920x1080@60`"
        if not isinstance(node, yaml.ScalarNode) or node.tag not in (_STR,):
            self.error(node, f"`mode` must be a string, got {self.describe(node)}", hint)
            return None
        text = node.value.strip()
        if text in ("preferred", "match-guest"):
            return ModeRequest(text)
        m = _MODE.match(text)
        if not m:
            self.error(node, f"bad mode `{text}`", _did_you_mean(text, ("preferred", "match-guest")) or hint)
            return None
        w, h = int(m.group(1)), int(m.group(2))
        hz = float(m.group(3)) if m.group(3) else None
        if w == 0 or h == 0 or (hz is not None and hz == 0):
            self.error(node, f"bad mode `{text}`: sizes and refresh rate must be positive")
            return None
        return ModeRequest("size", w, h, hz)

    def scaling(self, node: yaml.Node) -> str | None:
        choices = SCALINGS + tuple(SCALING_ALIASES)
        if not isinstance(node, yaml.ScalarNode) or node.tag != _STR:
            self.error(node, f"`scaling` must be a string, got {self.describe(node)}",
                       "expected one of: " + ", ".join(choices))
            return None
        value = SCALING_ALIASES.get(node.value, node.value)
        if value not in SCALINGS:
            self.error(node, f"unknown scaling `{node.value}`",
                       _did_you_mean(node.value, choices) or "expected one of: " + ", ".join(choices))
            return None
        return value

    def slate(self, node: yaml.Node, base: SlateStyle) -> SlateStyle | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR:
            return SlateStyle(node.value, base.colour)
        keys = self.mapping(node, "`slate`", _SLATE_KEYS)
        if not isinstance(node, yaml.MappingNode):
            return None
        text, colour = base.text, base.colour
        if "text" in keys:
            text = self.string(keys["text"][1], "`text`") or text
        if "colour" in keys and "color" in keys:
            self.error(keys["color"][0], "give `colour` or `color`, not both")
        for key in ("colour", "color"):
            if key in keys:
                vnode = keys[key][1]
                value = self.string(vnode, f"`{key}`")
                if value is not None and not _COLOUR.match(value):
                    self.error(vnode, f"bad colour `{value}`", "expected `#rrggbb`, e.g. `#101018`")
                elif value is not None:
                    colour = value.lower()
        return SlateStyle(text, colour)

    def display_settings(self, keys: _Keys, base: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        if "mode" in keys and (m := self.mode(keys["mode"][1])) is not None:
            out["mode"] = m
        if "scaling" in keys and (s := self.scaling(keys["scaling"][1])) is not None:
            out["scaling"] = s
        if "slate" in keys and (sl := self.slate(keys["slate"][1], base["slate"])) is not None:
            out["slate"] = sl
        if "label" in keys:
            node = keys["label"][1]
            value = None
            if isinstance(node, yaml.ScalarNode) and node.tag in (_INT, _FLOAT):
                try:
                    value = float(node.value)
                except ValueError:
                    value = None
            if value is None or not 0 <= value <= 60:
                self.error(node, f"`label` must be seconds from 0 to 60, got {self.describe(node)}",
                           "how long a monitor shows the guest's name when it turns to it; 0: never")
            else:
                out["label"] = value
        return out

    def edid(self, node: yaml.Node) -> EdidMatch | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR:
            return EdidMatch(identity=Glob(node.value))
        keys = self.mapping(node, "`edid`", _EDID_KEYS)
        if not isinstance(node, yaml.MappingNode):
            return None
        if not node.value:
            self.error(node, "`edid` is empty", "give at least one of: " + ", ".join(_EDID_KEYS))
            return None
        fields: dict[str, Any] = {}
        if "manufacturer" in keys:
            vnode = keys["manufacturer"][1]
            v = self.string(vnode, "`manufacturer`")
            if v is not None and not re.fullmatch(r"[A-Za-z]{3}", v):
                self.error(vnode, f"bad manufacturer `{v}`", "a three-letter PNP id such as `DEL` or `RHT`")
            elif v is not None:
                fields["manufacturer"] = v.upper()
        if "product" in keys:
            fields["product"] = self.integer(keys["product"][1], "`product`", 0, 0xFFFF)
        if "serial" in keys:
            fields["serial"] = self.integer(keys["serial"][1], "`serial`", 0, 0xFFFFFFFF)
        for key in ("serial_string", "name", "identity"):
            if key in keys and (v := self.string(keys[key][1], f"`{key}`")) is not None:
                fields[key] = Glob(v)
        return EdidMatch(**fields)

    def monitor(self, name: str, knode: yaml.Node, node: yaml.Node,
                defaults: dict[str, Any]) -> MonitorRule | None:
        line = knode.start_mark.line + 1
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR:
            # `left: HDMI-A-1` is short for `left: {connector: HDMI-A-1}`
            return MonitorRule(name, line, connector=Glob(node.value), **defaults)
        errors_before = len(self.errors)
        keys = self.mapping(node, f"monitor `{name}`", _MONITOR_KEYS)
        if not isinstance(node, yaml.MappingNode):
            return None
        # With a misspelt key already reported, "matches nothing" would only repeat it.
        if not any(k in keys for k in _MATCH_KEYS) and len(self.errors) == errors_before:
            self.error(knode, f"monitor `{name}` matches nothing",
                       "give `connector`, `edid` or `port` to say which monitor this is")
        fields: dict[str, Any] = {}
        for key in ("connector", "port", "card", "driver"):
            if key in keys and (v := self.string(keys[key][1], f"`{key}`")) is not None:
                fields[key] = Glob(v)
        if "logind_seat" in keys:
            fields["logind_seat"] = self.string(keys["logind_seat"][1], "`logind_seat`")
        if "edid" in keys:
            fields["edid"] = self.edid(keys["edid"][1])
        if "position" in keys:
            fields["position"] = self.position(keys["position"][1])
        fields.update(self.display_settings(keys, defaults))
        return MonitorRule(name, line, **fields)

    def position(self, node: yaml.Node) -> Position | None:
        hint = "write `{x: 1920, y: 0}` (layout pixels) or `{right-of: MONITOR}` (also left-of, above, below)"
        keys = self.mapping(node, "`position`", _POSITION_KEYS)
        if not isinstance(node, yaml.MappingNode):
            return None
        relations = [k for k in RELATIONS if k in keys]
        if relations and ("x" in keys or "y" in keys):
            self.error(node, "`position` gives both coordinates and a neighbour", hint)
            return None
        if len(relations) > 1:
            self.error(node, f"`position` gives {' and '.join(relations)}: a monitor has one neighbour "
                       "to be placed by", hint)
            return None
        if relations:
            of = self.string(keys[relations[0]][1], f"`{relations[0]}`")
            return Position(relation=relations[0], of=of) if of is not None else None
        if not keys:
            self.error(node, "`position` is empty", hint)
            return None
        x = self.integer(keys["x"][1], "`x`", -65536, 65536) if "x" in keys else 0
        y = self.integer(keys["y"][1], "`y`", -65536, 65536) if "y" in keys else 0
        return Position(x or 0, y or 0)

    def guest(self, name: str, knode: yaml.Node, node: yaml.Node) -> GuestRule | None:
        line = knode.start_mark.line + 1
        if isinstance(node, yaml.ScalarNode) and node.tag == _NULL:
            return GuestRule(name, line, Glob(name))  # `office:` alone matches the guest named office
        keys = self.mapping(node, f"guest `{name}`", _GUEST_KEYS)
        if not isinstance(node, yaml.MappingNode):
            return None
        pattern = Glob(name)
        if "name" in keys and (v := self.string(keys["name"][1], "`name`")) is not None:
            pattern = Glob(v)
        uuid = None
        if "uuid" in keys:
            vnode = keys["uuid"][1]
            v = self.string(vnode, "`uuid`")
            if v is not None and not _UUID.match(v):
                self.error(vnode, f"bad uuid `{v}`",
                           "expected the mdev UUID, e.g. 0b5d4a9e-7f3c-4c8e-9a1d-2f6e8b3c5d7a")
            elif v is not None:
                uuid = v.lower()
        kind = None
        if "kind" in keys:
            vnode = keys["kind"][1]
            v = self.string(vnode, "`kind`")
            if v is not None and v not in GUEST_KINDS:
                self.error(vnode, f"unknown guest kind `{v}`",
                           _did_you_mean(v, GUEST_KINDS) or "expected one of: " + ", ".join(GUEST_KINDS))
            else:
                kind = v
        uids = None
        if "users" in keys:
            uids = tuple(self.user(v, n) for v, n in self.user_names(keys["users"][1]))
            uids = tuple(u for u in uids if u is not None)
        launch = None
        if "launch" in keys:
            vnode = keys["launch"][1]
            launch = self.string(vnode, "`launch`")
            if launch is not None and (kind != "vfio" or uuid is None):
                self.error(vnode, "`launch` needs `kind: vfio` and the vGPU's `uuid`",
                           "directflip opens the vGPU and starts the command with its device fd")
        display, console = None, 0
        if "display" in keys:
            vnode = keys["display"][1]
            display = self.string(vnode, "`display`")
            if display is not None and kind != "qemu-dbus":
                self.error(vnode, "`display` needs `kind: qemu-dbus`",
                           "it says where a QEMU VM started with -display dbus shows its picture")
            elif display is not None and not pattern.literal:
                self.error(vnode, f"guest `{name}` names one VM's display, so its `name` cannot be a "
                           f"pattern (`{pattern}`)", "give the VM's guest name, or drop `name`")
            elif display is not None:
                from compositor.sources.qemu_target import QemuTarget

                try:
                    QemuTarget.parse(display)
                except ValueError as exc:
                    self.error(vnode, str(exc))
        elif kind == "qemu-dbus":
            self.warn(knode, f"guest `{name}` has `kind: qemu-dbus` but no `display`: directflip does "
                      "not know where to connect, so it never runs",
                      "add `display: qmp:/path/to/qmp.sock` (QEMU with -display dbus,p2p=yes) or "
                       "`display: dbus:unix:path=/path/to/bus` (-display dbus,addr=...)")
        domain, uri = self.libvirt_keys(name, pattern, kind, keys)
        if "console" in keys:
            vnode = keys["console"][1]
            if kind not in ("qemu-dbus", "libvirt"):
                self.error(vnode, "`console` needs `kind: qemu-dbus` or `kind: libvirt`")
            elif not (isinstance(vnode, yaml.ScalarNode) and _CONSOLE.fullmatch(vnode.value)):
                shown = vnode.value if isinstance(vnode, yaml.ScalarNode) else "..."
                self.error(vnode, f"`console` must be a console number (0, 1, ...), not `{shown}`")
            else:
                console = int(vnode.value)
        resize = True
        if "resize" in keys:
            vnode = keys["resize"][1]
            if kind not in ("qemu-dbus", "libvirt"):
                self.error(vnode, "`resize` needs `kind: qemu-dbus` or `kind: libvirt`",
                           "it tells a QEMU guest its monitor's size")
            elif (v := self.boolean(vnode, "`resize`")) is not None:
                resize = v
        return GuestRule(name, line, pattern, uuid, kind, uids, launch, display, console, domain, uri, resize)

    def libvirt_keys(self, name: str, pattern: Glob, kind: str | None,
                     keys: _Keys) -> tuple[str | None, str | None]:
        """`domain` and `uri` of a `kind: libvirt` guest (the domain defaults to the guest's name, the
        URI to qemu:///system)."""
        given = {k: self.string(keys[k][1], f"`{k}`") for k in ("domain", "uri") if k in keys}
        if kind != "libvirt":
            for k in given:
                self.error(keys[k][1], f"`{k}` needs `kind: libvirt`",
                           "it names the libvirt domain whose display directflip shows")
            return None, None
        domain = given.get("domain") or (pattern.pattern if pattern.literal else None)
        if domain is None:
            self.warn(keys["name"][1] if "name" in keys else keys["kind"][1],
                      f"guest `{name}` has `kind: libvirt` and a pattern for a name (`{pattern}`): it names "
                      "no domain, so directflip never shows one",
                      "give `domain: NAME` (or UUID), or drop `name`")
        elif not pattern.literal:
            self.error(keys["name"][1], f"guest `{name}` names one libvirt domain, so its `name` cannot be "
                       f"a pattern (`{pattern}`)", "give the guest's name, or drop `name`")
        uri = given.get("uri") or LIBVIRT_URI
        if "://" not in uri:
            self.error(keys["uri"][1], f"`uri` `{uri}` is not a libvirt URI",
                       "e.g. qemu:///system (the default) or qemu:///session")
        return domain, uri

    def user_names(self, node: yaml.Node) -> list[tuple[str, yaml.Node]]:
        if isinstance(node, yaml.ScalarNode):
            return [(node.value, node)]
        if isinstance(node, yaml.SequenceNode):
            return [(item.value, item) for item in node.value if isinstance(item, yaml.ScalarNode)] + [
                ("", item) for item in node.value if not isinstance(item, yaml.ScalarNode)]
        self.error(node, f"`users` must be a user or a list of users, got {self.describe(node)}")
        return []

    def user(self, value: str, node: yaml.Node) -> int | None:
        """A user name or numeric uid → uid. Names are resolved when the policy loads, so a typo is
        reported then, not when the guest is refused."""
        import pwd

        if value.isascii() and value.isdigit():
            if len(value) > 10 or int(value) > _MAX_UID:
                self.error(node, f"uid {value[:20]} is out of range", f"uids go from 0 to {_MAX_UID}")
                return None
            return int(value)
        try:
            return pwd.getpwnam(value).pw_uid
        except (KeyError, ValueError):  # ValueError: a NUL in the name
            self.error(node, f"no user `{value}` on this machine", "give a user name or a numeric uid")
            return None

    def seat(self, name: str, knode: yaml.Node, node: yaml.Node, monitors: list[str]) -> Seat | None:
        keys = self.mapping(node, f"seat `{name}`", _SEAT_KEYS)
        if not isinstance(node, yaml.MappingNode):
            return None
        listed = []
        if "monitors" in keys:
            for mname, mnode in self.names(keys["monitors"][1], "`monitors`"):
                if self.reference(mname, mnode, "monitor", monitors):
                    if mname in listed:
                        self.error(mnode, f"monitor `{mname}` is listed twice in seat `{name}`")
                    else:
                        listed.append(mname)
        logind = []
        if "logind" in keys:
            logind = [n for n, _ in self.names(keys["logind"][1], "`logind`")]
        if not listed and not logind:
            self.error(knode, f"seat `{name}` has no monitors",
                       "list its `monitors`, or the `logind` seats whose monitors it owns")
        matches = self.input_matches(keys["input"][1]) if "input" in keys else []
        return Seat(name, tuple(listed), tuple(logind), tuple(matches))

    def input_matches(self, node: yaml.Node) -> list[InputMatch]:
        hint = 'each item is `{path: "pci-*-usb-0:1*"}` (udev ID_PATH) and/or `{name: "Logitech*"}`'
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, f"`input` must be a list, got {self.describe(node)}", hint)
            return []
        if not node.value:
            self.error(node, "`input` is empty: the seat would take no device", hint)
            return []
        out = []
        for item in node.value:
            keys = self.mapping(item, "an `input` item", _INPUT_KEYS)
            if not isinstance(item, yaml.MappingNode):
                continue
            if not keys:
                self.error(item, "an `input` item matches every device", hint)
                continue
            globs = {k: self.string(keys[k][1], f"`{k}`") for k in _INPUT_KEYS if k in keys}
            if all(v is not None for v in globs.values()):
                out.append(InputMatch(**{k: Glob(v) for k, v in globs.items() if v is not None}))
        return out

    def hotkeys(self, node: yaml.Node) -> tuple[Hotkey, ...]:
        from compositor.input.keys import HotkeyError, default_hotkeys, parse_hotkey

        keys = self.mapping(node, "`hotkeys`", HOTKEY_ACTIONS)
        chosen = {h.action: h for h in default_hotkeys()}
        for action, (_, vnode) in keys.items():
            if isinstance(vnode, yaml.ScalarNode) and vnode.tag in (_NULL, _BOOL) and \
                    vnode.value in ("", "~", "null", "false", "no", "off"):
                chosen.pop(action, None)  # `release-input: off` turns that hotkey off
                continue
            text = self.string(vnode, f"hotkey `{action}`")
            if text is None:
                continue
            try:
                chosen[action] = parse_hotkey(action, text)
            except HotkeyError as exc:
                self.error(vnode, str(exc), exc.hint)
        seen: dict[tuple[frozenset[str], int], str] = {}
        for h in chosen.values():
            other = seen.setdefault((h.modifiers, h.key), h.action)
            if other != h.action:
                where = keys.get(h.action, keys.get(other, (node, node)))[1]
                self.error(where, f"hotkeys `{other}` and `{h.action}` are both `{h.text}`")
        return tuple(chosen.values())

    def layout(self, monitors: list[MonitorRule], seats: dict[str, Seat],
               monitor_nodes: dict[str, yaml.Node]) -> None:
        """A neighbour must be a defined monitor of the same seat, and neighbours must not go round in
        a circle (the layout is built from monitors with coordinates outwards)."""
        seat_of = {m: s.name for s in seats.values() for m in s.monitors}
        rules = {m.name: m for m in monitors}
        for m in monitors:
            pos = m.position
            if pos is None or pos.of is None:
                continue
            node = monitor_nodes[m.name]
            if not self.reference(pos.of, node, "monitor", rules):
                continue
            if pos.of == m.name:
                self.error(node, f"monitor `{m.name}` is placed {pos.relation} itself")
            elif seat_of.get(pos.of) != seat_of.get(m.name):
                self.error(node, f"monitor `{m.name}` is placed {pos.relation} `{pos.of}`, which is in "
                           "another seat", "the pointer crosses only the monitors of one seat")
        circles: set[frozenset[str]] = set()
        for m in monitors:
            chain, cur = [m.name], m
            while cur.position is not None and cur.position.of in rules and cur.position.of != cur.name:
                cur = rules[cur.position.of]
                if cur.name in chain:
                    if cur.name == m.name and frozenset(chain) not in circles:
                        circles.add(frozenset(chain))
                        self.error(monitor_nodes[m.name], "monitor positions go round in a circle: "
                                   + " → ".join(f"`{n}`" for n in [*chain, cur.name]),
                                   "give one of them coordinates, `{x: 0, y: 0}`")
                    break
                chain.append(cur.name)

    def placement(self, index: int, node: yaml.Node, monitors: list[str], guests: list[str],
                  seats: dict[str, Seat], placed: dict[str, yaml.Node],
                  monitor_seats: dict[str, frozenset[str]]) -> Placement | None:
        keys = self.mapping(node, "a placement", _PLACEMENT_KEYS)
        if not isinstance(node, yaml.MappingNode):
            return None
        line = node.start_mark.line + 1
        if "guest" not in keys:
            self.error(node, "placement without a `guest`", "every placement says which guest it shows")
            return None
        gnode = keys["guest"][1]
        guest = self.string(gnode, "`guest`")
        if guest is None or not self.reference(guest, gnode, "guest", guests):
            guest = None
        elif guest in placed:
            self.error(gnode, f"guest `{guest}` is already placed at {_where(placed[guest], gnode)}",
                       "give one placement per guest, with `failover` and `mirror` for more monitors")
            guest = None
        else:
            placed[guest] = gnode
        fields: dict[str, Any] = {}
        # A monitor may appear once among the main candidates and once among the mirrors: a monitor in
        # both shows the guest's main view when the earlier candidates are gone, else its mirror.
        seen: dict[str, dict[str, yaml.Node]] = {"main": {}, "mirror": {}}
        refs: list[tuple[str, yaml.Node]] = []

        def monitor_ref(mname: str, mnode: yaml.Node, role: str) -> bool:
            if not self.reference(mname, mnode, "monitor", monitors):
                return False
            if mname in seen[role]:
                where = "`mirror`" if role == "mirror" else "`monitor` and `failover`"
                self.error(mnode, f"monitor `{mname}` appears twice in {where}",
                           f"first at {_where(seen[role][mname], mnode)}")
                return False
            seen[role][mname] = mnode
            refs.append((mname, mnode))
            return True

        if "monitor" in keys:
            mnode = keys["monitor"][1]
            mname = self.string(mnode, "`monitor`")
            if mname is not None and monitor_ref(mname, mnode, "main"):
                fields["monitor"] = mname
        for key, role in (("failover", "main"), ("mirror", "mirror")):
            if key in keys:
                fields[key] = tuple(n for n, nn in self.names(keys[key][1], f"`{key}`")
                                    if monitor_ref(n, nn, role))
        if "failover" in keys and "monitor" not in keys:
            self.error(keys["failover"][0], "`failover` without `monitor`",
                       "`monitor` is tried first, then each `failover` monitor in order")
        if "priority" in keys:
            fields["priority"] = self.integer(keys["priority"][1], "`priority`", -(2**31), 2**31 - 1) or 0
        allowed: list[str] = []
        if "seats" in keys:
            for sname, snode in self.names(keys["seats"][1], "`seats`"):
                if self.reference(sname, snode, "seat", seats):
                    allowed.append(sname)
            fields["seats"] = tuple(allowed)
        if "monitor" not in keys and "seats" not in keys:
            self.error(node, f"placement for `{guest or '?'}` names no monitor",
                       "add `monitor` with any `failover`, or `seats` to use any monitor of those seats")
        if allowed and not any(seats[s].logind for s in allowed):
            # Membership is fixed by the file, so a monitor outside the allowed seats can never be used.
            for mname, mnode in refs:
                if not monitor_seats.get(mname, frozenset()) & set(allowed):
                    fence = (f"seat `{allowed[0]}`" if len(allowed) == 1
                             else "seats " + ", ".join(f"`{s}`" for s in allowed))
                    self.error(mnode, f"monitor `{mname}` is not in {fence}, "
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
                ordered += [m for m in seats[s].monitors if m not in ordered]
            if any(seats[s].logind for s in allowed):
                ordered += [m for m in monitors if m not in ordered]
            candidates = tuple(ordered)
        return Placement(guest, index, line, candidates=candidates, **fields)

    # -- the whole file

    def run(self, text: str) -> Policy:
        try:
            self.loader = yaml.SafeLoader(text)
            root = self.loader.get_single_node()
        except RecursionError:
            self.too_deep()
        except yaml.reader.ReaderError as exc:  # a character YAML does not allow; no mark, a position
            breaks = list(_LINE_BREAK.finditer(text, 0, exc.position))
            line, col = len(breaks) + 1, exc.position - (breaks[-1].end() if breaks else 0) + 1
            self.errors.append(Diagnostic(self.source, line, col, f"YAML: character #x{exc.character:04x} "
                                          "is not allowed in YAML", "remove it, or write it as an escape "
                                          "in a double-quoted string"))
            raise PolicyError(self.errors) from None
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
            problem = exc.problem or exc.context or "cannot parse"
            hint = None
            if exc.problem and exc.context and exc.context_mark is not None:
                hint = f"{exc.context} started at line {exc.context_mark.line + 1}"
            self.errors.append(Diagnostic(self.source, line, col, f"YAML syntax: {problem}", hint))
            raise PolicyError(self.errors) from None
        except yaml.YAMLError as exc:
            self.errors.append(Diagnostic(self.source, 1, 1, f"YAML: {exc}"))
            raise PolicyError(self.errors) from None
        try:
            if root is None:
                self.error(None, "the policy is empty",
                           "`directflip init` writes one for the monitors plugged in")
                raise PolicyError(self.errors)
            return self.document(root)
        except RecursionError:
            self.too_deep()
        finally:
            self.loader.dispose()

    def too_deep(self) -> NoReturn:
        assert self.loader is not None
        mark = self.loader.get_mark()
        self.errors.append(Diagnostic(self.source, mark.line + 1, mark.column + 1,
                                      "the policy is nested too deeply", "a policy is a few levels deep"))
        raise PolicyError(self.errors) from None

    def document(self, root: yaml.Node) -> Policy:
        top = self.mapping(root, "the policy", _TOP_KEYS)
        if not isinstance(root, yaml.MappingNode):
            raise PolicyError(self.errors)
        if self.errors and any(d.message.startswith("duplicate key") for d in self.errors):
            # A section given twice: only the first is read, so everything said about the sections
            # (one empty, names the second defines undefined) would follow from this one cause.
            raise PolicyError(self.errors)
        if "version" in top:
            vnode = top["version"][1]
            if self.int_value(vnode) != 1:
                shown = vnode.value if isinstance(vnode, yaml.ScalarNode) else "?"
                self.error(vnode, f"unsupported policy version `{shown}`",
                           "this directflip reads `version: 1`")

        defaults: dict[str, Any] = {"mode": ModeRequest("preferred"), "scaling": "fit", "slate": SlateStyle(),
                                    "label": DEFAULT_LABEL_SECONDS}
        if "defaults" in top:
            keys = self.mapping(top["defaults"][1], "`defaults`", _DEFAULT_KEYS)
            defaults = self.display_settings(keys, defaults)

        monitors: list[MonitorRule] = []
        monitor_nodes: dict[str, yaml.Node] = {}
        if "monitors" not in top:
            self.error(root, "no `monitors` section", "name the monitors the policy places guests on")
        else:
            entries = self.named_entries(top["monitors"][1], "monitors")
            if not entries and isinstance(top["monitors"][1], yaml.MappingNode):
                self.error(top["monitors"][0], "`monitors` is empty")
            for name, knode, vnode in entries:
                monitor_nodes[name] = knode
                if (rule := self.monitor(name, knode, vnode, defaults)) is not None:
                    monitors.append(rule)
        monitor_names = list(monitor_nodes)

        guests: list[GuestRule] = []
        guest_nodes: dict[str, yaml.Node] = {}
        if "guests" in top:
            for name, knode, vnode in self.named_entries(top["guests"][1], "guests"):
                guest_nodes[name] = knode
                if (grule := self.guest(name, knode, vnode)) is not None:
                    for earlier in guests:
                        if grule.pattern.literal and (earlier.pattern, earlier.uuid, earlier.kind) == (
                                grule.pattern, grule.uuid, grule.kind):
                            self.error(knode, f"guest `{name}` matches what guest `{earlier.name}` matches",
                                       "a running guest binds to the first rule that matches it, "
                                       f"so `{name}` could never be used")
                            break
                    guests.append(grule)
        guest_names = list(guest_nodes)

        seats: dict[str, Seat] = {}
        seat_of_monitor: dict[str, tuple[str, yaml.Node]] = {}
        if "seats" in top:
            for name, knode, vnode in self.named_entries(top["seats"][1], "seats"):
                seat = self.seat(name, knode, vnode, monitor_names)
                if seat is None:
                    continue
                seats[name] = seat
                for m in seat.monitors:
                    if m in seat_of_monitor:
                        other = seat_of_monitor[m][0]
                        self.error(knode, f"monitor `{m}` is in seats `{other}` and `{name}`",
                                   "a monitor belongs to one seat")
                    else:
                        seat_of_monitor[m] = (name, knode)
        monitor_seats = {m: frozenset({s}) for m, (s, _) in seat_of_monitor.items()}
        logind_seats: dict[str, set[str]] = {}
        for seat in seats.values():
            for ls in seat.logind:
                logind_seats.setdefault(ls, set()).add(seat.name)

        placements: list[Placement] = []
        placed: dict[str, yaml.Node] = {}
        if "placements" in top:
            pnode = top["placements"][1]
            if not isinstance(pnode, yaml.SequenceNode):
                self.error(pnode, f"`placements` must be a list, got {self.describe(pnode)}",
                           "each item starts with `- guest: NAME`")
            else:
                for i, item in enumerate(pnode.value):
                    p = self.placement(i, item, monitor_names, guest_names, seats, placed, monitor_seats)
                    if p is not None:
                        placements.append(p)

        self.layout(monitors, seats, monitor_nodes)
        hotkeys = self.hotkeys(top["hotkeys"][1]) if "hotkeys" in top else None
        free_seats = [s.name for s in seats.values() if not s.input and not s.logind]
        if len(free_seats) > 1:
            self.warn(top["seats"][1], f"seats {', '.join(f'`{n}`' for n in free_seats)} name no `input` "
                      f"or `logind`: their keyboards and mice all go to `{free_seats[0]}`",
                      "give each desk's devices with `input: [{path: ...}]`")

        # Not errors, but almost always a slip.
        used = {m for p in placements for m in (*p.candidates, *p.mirror)}
        for g, knode in guest_nodes.items():
            if g not in placed:
                self.warn(knode, f"guest `{g}` is never placed", "add a placement, or remove the guest")
        for m, knode in monitor_nodes.items():
            if m not in used:
                self.warn(knode, f"no placement uses monitor `{m}`; it will only show its slate")

        self.errors.sort()
        self.warnings.sort()
        if self.errors:
            raise PolicyError(self.errors, self.warnings)
        return Policy(
            source=self.source,
            monitors=tuple(monitors),
            guests=tuple(guests),
            seats=tuple(seats.values()),
            placements=tuple(placements),
            monitor_seats=monitor_seats,
            logind_seats={k: frozenset(v) for k, v in logind_seats.items()},
            warnings=tuple(self.warnings),
            hotkeys=hotkeys,
        )
