"""The display topology: cards, their connectors, CRTCs and planes, as typed read-only data.

There is one way in: `from_probe(document)`, which takes the `directflip.probe/1` document that
`directflip probe --json` prints (see docs/probe-json.md). The daemon builds its topology from the
live probe through the same function, so a saved probe file and the running machine can never be
read differently.

Malformed documents raise `TopologyError`, which carries every problem found, each located by a path
into the document (`cards[0].connectors[2].modes[1].width: expected an integer, got "1920"`). Fields the
schema adds later are ignored; fields it promises are checked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

SCHEMA = "directflip.probe/1"

# Drivers whose primary and overlay planes are known to scale (SRC size != CRTC size). The probe
# schema has no scaling capability, and KMS has no generic way to ask short of a TEST_ONLY commit, so
# the planner asks for scaling only where it is known to work and centres elsewhere; the scanout ladder
# still tests every configuration before committing it.
SCALING_DRIVERS = frozenset({"i915", "xe", "amdgpu", "radeon", "nouveau", "msm", "rockchip", "vc4",
                             "mediatek"})

# Drivers whose primary plane must cover its whole CRTC (the atomic helpers' check without
# positioning): a guest buffer placed anywhere else is refused by TEST_ONLY, and the scanout ladder
# shows it through the copy path instead. Seen on virtio_gpu in the lab; the drivers built on the
# simple-KMS helper (bochs, cirrus, simpledrm) check the same way.
FULL_SCREEN_PRIMARY_DRIVERS = frozenset({"virtio_gpu", "bochs", "cirrus", "simpledrm"})

DEFAULT_SEAT = "seat0"


class TopologyError(ValueError):
    """A probe document that does not follow the schema. `problems` lists every one found."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + p for p in problems))


@dataclass(frozen=True)
class Mode:
    name: str
    width: int
    height: int
    refresh: float
    clock: int
    hsync_start: int = 0
    hsync_end: int = 0
    htotal: int = 0
    vsync_start: int = 0
    vsync_end: int = 0
    vtotal: int = 0
    flags: int = 0
    preferred: bool = False

    def __str__(self) -> str:
        return f"{self.width}x{self.height}@{self.refresh:.2f}"


@dataclass(frozen=True)
class Edid:
    manufacturer: str
    product: int
    serial: int
    serial_string: str | None
    name: str | None
    year: int
    identity: str


@dataclass(frozen=True)
class Crtc:
    id: int
    index: int
    active: bool
    mode: Mode | None


@dataclass(frozen=True)
class Plane:
    id: int
    type: str  # primary | overlay | cursor
    possible_crtcs: tuple[int, ...]
    # fourcc -> modifiers; excluded from hashing because dicts are not hashable.
    formats: Mapping[str, tuple[str, ...]] = field(hash=False)
    zpos: int | None
    can_scale: bool
    must_cover: bool = False   # a primary plane that must cover its whole CRTC (see above)

    def supports(self, fourcc: str, modifier: str | None = None) -> bool:
        modifiers = self.formats.get(fourcc)
        if modifiers is None:
            return False
        return modifier is None or modifier in modifiers


@dataclass(frozen=True)
class Connector:
    card: str  # the card's device path
    id: int
    name: str
    type: str
    status: str
    edid: Edid | None
    modes: tuple[Mode, ...]
    preferred_mode: Mode | None
    current_crtc: int | None
    link_status: str | None
    possible_crtcs: tuple[int, ...]
    physical_size_mm: tuple[int, int]

    @property
    def present(self) -> bool:
        """A monitor is there to show something on. Writeback connectors never count."""
        if self.type == "Writeback":
            return False
        return self.status == "connected" or (self.status == "unknown" and bool(self.modes))


@dataclass(frozen=True)
class Card:
    path: str
    driver: str
    driver_desc: str
    bus_path: str | None
    seat: str
    caps: Mapping[str, bool | int] = field(hash=False)
    connectors: tuple[Connector, ...]
    crtcs: tuple[Crtc, ...]
    planes: tuple[Plane, ...]
    error: str | None = None


@dataclass(frozen=True)
class Output:
    """A present connector and the card it hangs off: what the planner places guests on."""

    card: Card
    connector: Connector

    @property
    def label(self) -> str:
        return f"{self.card.path}:{self.connector.name}"


@dataclass(frozen=True)
class Topology:
    cards: tuple[Card, ...]

    def outputs(self) -> tuple[Output, ...]:
        """Present connectors, cards in path order, connectors in the kernel's order."""
        return tuple(Output(card, conn) for card in self.cards for conn in card.connectors if conn.present)

    def without(self, connectors: set[str]) -> Topology:
        """The same topology with the named connectors (`NAME` or `CARD:NAME`) unplugged."""
        cards = []
        for card in self.cards:
            conns = []
            for conn in card.connectors:
                if conn.name in connectors or f"{card.path}:{conn.name}" in connectors:
                    conn = replace(conn, status="disconnected", edid=None, modes=(), preferred_mode=None)
                conns.append(conn)
            cards.append(replace(card, connectors=tuple(conns)))
        return Topology(tuple(cards))


# --- reading the document -------------------------------------------------------------------------


class _Reader:
    """Reads typed fields and collects problems instead of stopping at the first.

    The document is parsed JSON, typed only by the `kinds` each read checks at run time, so `field`
    returns Any: the static type is the one the caller asked `kinds` for."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def field(self, obj: Mapping[str, Any], key: str, where: str, kinds: tuple[type, ...], default: Any = ...,
              nullable: bool = False) -> Any:
        path = f"{where}.{key}" if where else key
        if key not in obj:
            if default is not ...:
                return default
            self.fail(path, "missing")
            return None
        value = obj[key]
        if value is None and nullable:
            return None
        # bool is an int in Python; the schema never means a boolean where it says integer.
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        elif float in kinds and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        else:
            ok = isinstance(value, kinds)
        if not ok:
            want = " or ".join(_KIND_NAMES[k] for k in kinds) + (" or null" if nullable else "")
            self.fail(path, f"expected {want}, got {_describe(value)}")
            return None
        return value

    def items(self, obj: Mapping[str, Any], key: str, where: str) -> list[tuple[str, Mapping[str, Any]]]:
        seq = self.field(obj, key, where, (list,), default=[])
        out: list[tuple[str, Mapping[str, Any]]] = []
        for i, item in enumerate(seq or []):
            path = f"{where}.{key}[{i}]" if where else f"{key}[{i}]"
            if not isinstance(item, dict):
                self.fail(path, f"expected an object, got {_describe(item)}")
                continue
            out.append((path, item))
        return out

    def ints(self, obj: Mapping[str, Any], key: str, where: str) -> tuple[int, ...]:
        seq = self.field(obj, key, where, (list,), default=[])
        out = []
        for i, v in enumerate(seq or []):
            if isinstance(v, int) and not isinstance(v, bool):
                out.append(v)
            else:
                self.fail(f"{where}.{key}[{i}]", f"expected an integer, got {_describe(v)}")
        return tuple(out)


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list",
               dict: "an object"}


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _mode(r: _Reader, obj: object, where: str) -> Mode | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        r.fail(where, f"expected a mode object or null, got {_describe(obj)}")
        return None
    f = r.field
    width = f(obj, "width", where, (int,))
    height = f(obj, "height", where, (int,))
    refresh = f(obj, "refresh", where, (float,))
    for key, value in (("width", width), ("height", height)):
        if value is not None and value <= 0:
            r.fail(f"{where}.{key}", f"must be positive, got {value}")
            return None
    if width is None or height is None or refresh is None:
        return None
    timings = {k: f(obj, k, where, (int,), default=0) or 0
               for k in ("hsync_start", "hsync_end", "htotal", "vsync_start", "vsync_end", "vtotal", "flags")}
    return Mode(
        name=f(obj, "name", where, (str,), default=f"{width}x{height}") or f"{width}x{height}",
        width=width,
        height=height,
        refresh=float(refresh),
        clock=f(obj, "clock", where, (int,), default=0) or 0,
        preferred=bool(f(obj, "preferred", where, (bool,), default=False)),
        **timings,
    )


def _edid(r: _Reader, obj: object, where: str) -> Edid | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        r.fail(where, f"expected an EDID object or null, got {_describe(obj)}")
        return None
    f = r.field
    manufacturer = f(obj, "manufacturer", where, (str,))
    product = f(obj, "product", where, (int,))
    serial = f(obj, "serial", where, (int,), default=0)
    if manufacturer is None or product is None:
        return None
    serial = serial or 0
    serial_string = f(obj, "serial_string", where, (str,), default=None, nullable=True)
    identity = f(obj, "identity", where, (str,), default=None)
    if identity is None:
        identity = f"{manufacturer}:{product}:{serial}" + (f":{serial_string}" if serial_string else "")
    return Edid(
        manufacturer=manufacturer,
        product=product,
        serial=serial,
        serial_string=serial_string,
        name=f(obj, "name", where, (str,), default=None, nullable=True),
        year=f(obj, "year", where, (int,), default=0) or 0,
        identity=identity,
    )


def _connector(r: _Reader, card_path: str, obj: Mapping[str, Any], where: str) -> Connector | None:
    f = r.field
    cid = f(obj, "id", where, (int,))
    name = f(obj, "name", where, (str,))
    status = f(obj, "status", where, (str,))
    if status is not None and status not in ("connected", "disconnected", "unknown"):
        r.fail(f"{where}.status",
               f'expected "connected", "disconnected" or "unknown", got {_describe(status)}')
    ctype = f(obj, "type", where, (str,), default=None)
    if ctype is None and name is not None:
        ctype = name.rsplit("-", 1)[0]
    modes = tuple(mode for i, raw in enumerate(f(obj, "modes", where, (list,), default=[]) or [])
                  if (mode := _mode(r, raw, f"{where}.modes[{i}]")) is not None)
    preferred = _mode(r, f(obj, "preferred_mode", where, (dict,), default=None, nullable=True),
                      f"{where}.preferred_mode")
    current = f(obj, "current", where, (dict,), default=None, nullable=True)
    current_crtc = None
    if current is not None:
        current_crtc = f(current, "crtc", f"{where}.current", (int,), default=None, nullable=True)
    size = f(obj, "physical_size_mm", where, (list,), default=[0, 0]) or [0, 0]
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
        r.fail(f"{where}.physical_size_mm", "expected [width, height] in millimetres")
        size = [0, 0]
    edid = _edid(r, f(obj, "edid", where, (dict,), default=None, nullable=True), f"{where}.edid")
    if cid is None or name is None or status is None:
        return None
    return Connector(
        card=card_path,
        id=cid,
        name=name,
        type=ctype or name,
        status=status,
        edid=edid,
        modes=modes,
        preferred_mode=preferred,
        current_crtc=current_crtc,
        link_status=f(obj, "link_status", where, (str,), default=None, nullable=True),
        possible_crtcs=r.ints(obj, "possible_crtcs", where),
        physical_size_mm=(size[0], size[1]),
    )


def _plane(r: _Reader, driver: str, obj: Mapping[str, Any], where: str) -> Plane | None:
    f = r.field
    pid = f(obj, "id", where, (int,))
    ptype = f(obj, "type", where, (str,))
    if ptype is not None and ptype not in ("primary", "overlay", "cursor"):
        r.fail(f"{where}.type", f'expected "primary", "overlay" or "cursor", got {_describe(ptype)}')
        ptype = None
    raw_formats = f(obj, "formats", where, (dict,), default={}) or {}
    formats: dict[str, tuple[str, ...]] = {}
    for fourcc, mods in raw_formats.items():
        if not isinstance(mods, list) or not all(isinstance(m, str) for m in mods):
            r.fail(f"{where}.formats.{fourcc}", "expected a list of modifier names")
            continue
        formats[fourcc] = tuple(mods)
    zpos_obj = f(obj, "zpos", where, (dict,), default=None, nullable=True)
    zpos = None
    if zpos_obj is not None:
        zpos = f(zpos_obj, "value", f"{where}.zpos", (int,), default=None)
    if pid is None or ptype is None:
        return None
    return Plane(
        id=pid,
        type=ptype,
        possible_crtcs=r.ints(obj, "possible_crtcs", where),
        formats=formats,
        zpos=zpos,
        can_scale=ptype != "cursor" and driver in SCALING_DRIVERS,
        must_cover=ptype == "primary" and driver in FULL_SCREEN_PRIMARY_DRIVERS,
    )


def _card(r: _Reader, obj: Mapping[str, Any], where: str) -> Card | None:
    f = r.field
    path = f(obj, "path", where, (str,))
    driver = f(obj, "driver", where, (str,))
    if path is None or driver is None:
        return None
    caps = f(obj, "caps", where, (dict,), default={}) or {}
    connectors = tuple(c for p, o in r.items(obj, "connectors", where)
                       if (c := _connector(r, path, o, p)) is not None)
    crtcs: list[Crtc] = []
    for p, o in r.items(obj, "crtcs", where):
        cid = f(o, "id", p, (int,))
        index = f(o, "index", p, (int,), default=len(crtcs))
        mode = _mode(r, f(o, "mode", p, (dict,), default=None, nullable=True), f"{p}.mode")
        if cid is not None:
            crtcs.append(Crtc(id=cid, index=index, active=bool(f(o, "active", p, (bool,), default=False)),
                              mode=mode))
    planes = tuple(pl for p, o in r.items(obj, "planes", where)
                   if (pl := _plane(r, driver, o, p)) is not None)
    return Card(
        path=path,
        driver=driver,
        driver_desc=f(obj, "driver_desc", where, (str,), default="") or "",
        bus_path=f(obj, "bus_path", where, (str,), default=None, nullable=True),
        # Not in probe/1 yet: udev's ID_SEAT for the card, which logind uses; seat0 when untagged.
        seat=f(obj, "seat", where, (str,), default=DEFAULT_SEAT, nullable=True) or DEFAULT_SEAT,
        caps=dict(caps),
        connectors=connectors,
        crtcs=tuple(crtcs),
        planes=planes,
        error=f(obj, "error", where, (str,), default=None, nullable=True),
    )


def from_probe(document: Any, source: str | None = None) -> Topology:
    """Turn a `directflip.probe/1` document into a `Topology`, or raise `TopologyError`."""
    r = _Reader()
    if not isinstance(document, dict):
        raise TopologyError([f"expected a probe object, got {_describe(document)}"], source)
    schema = document.get("schema")
    if schema != SCHEMA:
        hint = " (is this the output of `directflip probe --json`?)" if schema is None else ""
        raise TopologyError([f"schema: expected {json.dumps(SCHEMA)}, got {_describe(schema)}{hint}"], source)
    cards = tuple(c for p, o in r.items(document, "cards", "") if (c := _card(r, o, p)) is not None)
    seen: set[str] = set()
    for i, card in enumerate(cards):
        if card.path in seen:
            r.fail(f"cards[{i}].path", f"card {json.dumps(card.path)} listed twice")
        seen.add(card.path)
    if r.problems:
        raise TopologyError(r.problems, source)
    return Topology(cards)


def load(path: str | Path) -> Topology:
    """Read a saved `probe --json` file. Raises OSError if unreadable, TopologyError if malformed."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TopologyError([f"{exc.lineno}:{exc.colno}: not JSON: {exc.msg}"], str(path)) from None
    return from_probe(document, str(path))
