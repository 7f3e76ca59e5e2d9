"""Table-driven planner tests. Each case is a small machine (built through topology.from_probe, the
only way in), a policy, the running guests, and what each policy monitor must show: a guest name,
`slate` (plus the reason when it matters), or `off`. The comment on each case says why that answer is
the right one."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from compositor import policy, topology
from compositor.planner import Assignment, Guest, Rect, choose_mode, place, plan

# --- building machines ----------------------------------------------------------------------------


def mode(w: int, h: int, hz: float = 60.0, preferred: bool = False) -> dict[str, Any]:
    return {"name": f"{w}x{h}", "width": w, "height": h, "refresh": hz, "clock": 1, "preferred": preferred}


STD_MODES = [mode(1920, 1080, preferred=True), mode(1920, 1080, 50.0), mode(1280, 1024), mode(1280, 720),
             mode(1024, 768), mode(800, 600)]

QEMU_EDID = {"manufacturer": "RHT", "product": 4660, "serial": 0, "serial_string": None,
             "name": "QEMU Monitor", "year": 2014, "identity": "RHT:4660:0"}


def edid(mfg: str = "DEL", product: int = 1, serial: int = 0, name: str | None = "Monitor") -> dict[str, Any]:
    return {"manufacturer": mfg, "product": product, "serial": serial, "serial_string": None, "name": name,
            "year": 2020, "identity": f"{mfg}:{product}:{serial}"}


def conn(name: str, *, edid: dict[str, Any] | None = None, modes: list[dict[str, Any]] | None = None,
         status: str = "connected", crtcs: list[int] | None = None,
         current: int | None = None) -> dict[str, Any]:
    """`crtcs` and `current` are CRTC indices on the card; default: the connector's own index."""
    modes = STD_MODES if modes is None else modes
    return {"name": name, "type": name.rsplit("-", 1)[0], "status": status, "edid": edid, "modes": modes,
            "preferred_mode": next((m for m in modes if m["preferred"]), None), "crtcs": crtcs,
            "current": current, "link_status": None, "physical_size_mm": [0, 0]}


def card(*connectors: dict[str, Any], path: str = "/dev/dri/card0", driver: str = "virtio_gpu",
         ncrtcs: int | None = None, planes: list[dict[str, Any]] | None = None, seat: str | None = None,
         bus_path: str | None = "pci-0000:00:02.0") -> dict[str, Any]:
    """A card with one CRTC per connector (ids 100+i) and one XR24 primary plane per CRTC (200+i)
    unless `planes` (with `crtcs` as CRTC indices) says otherwise."""
    n = len(connectors) if ncrtcs is None else ncrtcs
    crtc_ids = [100 + i for i in range(n)]
    conns = []
    for i, c in enumerate(connectors):
        c = dict(c)
        idx = c.pop("crtcs")
        idx = [i] if idx is None else idx
        cur = c.pop("current")
        c["id"] = 10 + i
        c["possible_crtcs"] = [crtc_ids[j] for j in idx if j < n]
        c["current"] = {"crtc": crtc_ids[cur], "mode": None} if cur is not None else None
        conns.append(c)
    if planes is None:
        planes = [{"type": "primary", "crtcs": [i], "formats": {"XR24": ["LINEAR"]}} for i in range(n)]
        planes += [{"type": "cursor", "crtcs": [i], "formats": {"AR24": ["LINEAR"]}} for i in range(n)]
    plane_docs = [{"id": 200 + k, "type": p["type"], "possible_crtcs": [crtc_ids[j] for j in p["crtcs"]],
                   "formats": p["formats"], "zpos": p.get("zpos"), "crtc": None, "fb": None}
                  for k, p in enumerate(planes)]
    doc = {"path": path, "driver": driver, "driver_desc": "", "bus_path": bus_path, "caps": {},
           "connectors": conns, "crtcs": [{"id": c, "index": i, "active": False, "mode": None}
                                          for i, c in enumerate(crtc_ids)], "planes": plane_docs}
    if seat is not None:
        doc["seat"] = seat
    return doc


def machine(*cards: dict[str, Any]) -> tuple[topology.Output, ...]:
    return topology.from_probe({"schema": topology.SCHEMA, "cards": list(cards)}).outputs()


def three_monitors(**kw: Any) -> dict[str, Any]:
    return card(conn("Virtual-1", edid=QEMU_EDID), conn("Virtual-2", edid=QEMU_EDID),
                conn("Virtual-3", edid=QEMU_EDID), **kw)


THREE = """
monitors:
  left: Virtual-1
  centre: Virtual-2
  right: Virtual-3
"""


ONE = "guests: {a: }\nplacements: [{guest: a, monitor: m}]\n"  # guest a on monitor m


def g(name: str, kind: str = "vfio", **kw: Any) -> Guest:
    return Guest(name, kind, **kw)


# --- the table ------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    why: str
    policy: str
    outputs: tuple[topology.Output, ...]
    guests: list[Guest]
    shows: dict[str, str]  # monitor -> guest | "slate" | "slate: reason" | "off"
    unplaced: list[str] = field(default_factory=list)  # "guest: reason" substrings, in order
    check: Any = None  # extra assertions on the Assignment


CASES = [
    Case("simple-3x",
         "each guest has its own present monitor: nothing conflicts",
         THREE + """
guests: {a: , b: , c: }
placements:
  - {guest: a, monitor: left}
  - {guest: b, monitor: centre}
  - {guest: c, monitor: right}
""", machine(three_monitors()), [g("a"), g("b"), g("c")],
         {"left": "a", "centre": "b", "right": "c"}),

    Case("failover-absent",
         "Virtual-1 is disconnected, so `left` is unbound and a falls to its first failover",
         THREE + """
guests: {a: }
placements:
  - {guest: a, monitor: left, failover: [centre, right]}
""", machine(card(conn("Virtual-1", status="disconnected"), conn("Virtual-2"), conn("Virtual-3"))), [g("a")],
         {"left": "off", "centre": "a", "right": "slate: no guest is placed here"}),

    Case("failover-chain",
         "left and centre are both gone: the failover list is walked in order down to right",
         THREE + """
guests: {a: }
placements:
  - {guest: a, monitor: left, failover: [centre, right]}
""", machine(card(conn("Virtual-1", status="disconnected"), conn("Virtual-2", status="disconnected"),
                  conn("Virtual-3"))), [g("a")],
         {"right": "a"}),

    Case("priority-wins",
         "b comes second in the file but has the higher priority, so it takes left and a fails over",
         THREE + """
guests: {a: , b: }
placements:
  - {guest: a, monitor: left, failover: [centre]}
  - {guest: b, monitor: left, priority: 5}
""", machine(three_monitors()), [g("a"), g("b")],
         {"left": "b", "centre": "a", "right": "slate"}),

    Case("priority-tie-file-order",
         "equal priorities: the earlier placement in the file wins, the later one fails over",
         THREE + """
guests: {a: , b: }
placements:
  - {guest: b, monitor: left, failover: [right]}
  - {guest: a, monitor: left, failover: [centre]}
""", machine(three_monitors()), [g("a"), g("b")],
         {"left": "b", "centre": "a", "right": "slate"}),

    Case("priority-loser-unplaced",
         "the loser has no failover: it is not shown, and the reason names who holds its monitor",
         THREE + """
guests: {a: , b: }
placements:
  - {guest: a, monitor: left}
  - {guest: b, monitor: left, priority: -1}
""", machine(three_monitors()), [g("a"), g("b")],
         {"left": "a"}, unplaced=["b: left shows a"]),

    Case("mirror",
         "a's main view is on left; centre and right are free, so both mirror the same buffer",
         THREE + """
guests: {a: }
placements:
  - {guest: a, monitor: left, mirror: [centre, right]}
""", machine(three_monitors()), [g("a", width=1920, height=1080)],
         {"left": "a", "centre": "a", "right": "a"},
         check=lambda a: [o.mirror for o in a.outputs] == [False, True, True]),

    Case("mirror-yields-to-main-views",
         "a has the higher priority, but mirrors come after every main view: b's main view gets centre",
         THREE + """
guests: {a: , b: }
placements:
  - {guest: a, monitor: left, mirror: [centre], priority: 9}
  - {guest: b, monitor: centre}
""", machine(three_monitors()), [g("a"), g("b")],
         {"left": "a", "centre": "b", "right": "slate"}, unplaced=["a: mirror centre shows b"]),

    Case("mirror-only-when-main-gone",
         "a's only main monitor is absent; it is still shown, on its mirror",
         THREE + """
guests: {a: }
placements:
  - {guest: a, monitor: left, mirror: [right]}
""", machine(card(conn("Virtual-1", status="disconnected"), conn("Virtual-2"), conn("Virtual-3"))), [g("a")],
         {"right": "a", "centre": "slate"}, unplaced=["a: left is absent"]),

    Case("failover-and-mirror-same-monitor",
         "centre is both a's failover and its mirror: with left present it shows the mirror",
         THREE + """
guests: {a: }
placements:
  - {guest: a, monitor: left, failover: [centre], mirror: [centre]}
""", machine(three_monitors()), [g("a")],
         {"left": "a", "centre": "a", "right": "slate"},
         check=lambda a: a.for_monitor("centre").mirror and not a.unplaced),

    Case("not-running-slate",
         "a is not running: its monitor shows the slate, and the reason says whom it waits for",
         THREE + """
guests: {a: , b: }
placements:
  - {guest: a, monitor: left}
  - {guest: b, monitor: centre}
""", machine(three_monitors()), [g("b")],
         {"left": "slate: a is not running", "centre": "b", "right": "slate: no guest is placed here"}),

    Case("not-running-does-not-reserve",
         "a outranks b but is not running, so it holds nothing: b's failover may use a's monitor",
         THREE + """
guests: {a: , b: }
placements:
  - {guest: a, monitor: centre, priority: 10}
  - {guest: b, monitor: left, failover: [centre]}
""", machine(card(conn("Virtual-1", status="disconnected"), conn("Virtual-2"), conn("Virtual-3"))), [g("b")],
         {"centre": "b"}),

    Case("seat-only-placement",
         "a placement with only `seats` takes the seat's first free monitor; desk-b's monitor stays "
         "free even though c cannot be shown: the fence holds",
         THREE + """
seats:
  desk-a: {monitors: [left, centre]}
  desk-b: {monitors: [right]}
guests: {a: , b: , c: }
placements:
  - {guest: a, seats: [desk-a]}
  - {guest: b, seats: [desk-a]}
  - {guest: c, seats: [desk-a]}
""", machine(three_monitors()), [g("a"), g("b"), g("c")],
         {"left": "a", "centre": "b", "right": "slate"},
         unplaced=["c: left shows a; centre shows b"]),

    Case("logind-seat-membership",
         "desk-b takes every monitor on a card of logind seat1: the card1 monitor is allowed, the "
         "seat0 one is not, whatever order the placement lists them in",
         """
monitors:
  main: {connector: HDMI-A-1, card: card0}
  other: {connector: HDMI-A-1, card: card1}
seats:
  desk-b: {logind: seat1}
guests: {a: }
placements:
  - {guest: a, monitor: main, failover: [other], seats: [desk-b]}
""", machine(card(conn("HDMI-A-1")), card(conn("HDMI-A-1"), path="/dev/dri/card1", seat="seat1")), [g("a")],
         {"main": "slate", "other": "a"}, unplaced=[]),

    Case("missing-edid",
         "the monitor rule wants an EDID but DP-1 reports none: the rule binds nothing, DP-1 stays "
         "off, and a fails over to the monitor named by connector",
         """
monitors:
  dell: {edid: {manufacturer: DEL}}
  spare: {connector: DP-2}
guests: {a: }
placements:
  - {guest: a, monitor: dell, failover: [spare]}
""", machine(card(conn("DP-1"), conn("DP-2"), driver="i915")), [g("a")],
         {"dell": "off", "spare": "a"},
         check=lambda a: a.dark[0].connector == "DP-1" and a.dark[0].reason == "not in the policy"),

    Case("same-edid-twice",
         "both monitors report the same EDID; the first rule binds the first in connector order, the "
         "second rule the next one, so the answer does not depend on which was plugged first",
         """
monitors:
  one: {edid: {manufacturer: RHT, name: "QEMU*"}}
  two: {edid: "RHT:4660:0"}
guests: {a: , b: }
placements:
  - {guest: b, monitor: two}
  - {guest: a, monitor: one}
""", machine(card(conn("Virtual-1", edid=QEMU_EDID), conn("Virtual-2", edid=QEMU_EDID))), [g("a"), g("b")],
         {"one": "a", "two": "b"},
         check=lambda a: (a.for_monitor("one").connector, a.for_monitor("two").connector)
         == ("Virtual-1", "Virtual-2")),

    Case("edid-serial-tells-apart",
         "same model, different serials: the rules bind by serial, not by connector order",
         """
monitors:
  left: {edid: {manufacturer: DEL, product: 1, serial: 222}}
  right: {edid: {manufacturer: DEL, product: 1, serial: 111}}
guests: {a: }
placements:
  - {guest: a, monitor: left}
""", machine(card(conn("DP-1", edid=edid(serial=111)), conn("DP-2", edid=edid(serial=222)))), [g("a")],
         {"left": "a", "right": "slate"},
         check=lambda a: a.for_monitor("left").connector == "DP-2"),

    Case("port-path",
         "the port path is the card's ID_PATH and the connector: it picks the second card's HDMI-A-1",
         """
monitors:
  m: {port: "pci-0000:03:00.0/HDMI-A-1"}
guests: {a: }
placements:
  - {guest: a, monitor: m}
""", machine(card(conn("HDMI-A-1")),
              card(conn("HDMI-A-1"), path="/dev/dri/card1", bus_path="pci-0000:03:00.0")),
         [g("a")], {"m": "a"},
         check=lambda a: a.for_monitor("m").card == "/dev/dri/card1"),

    Case("guest-larger-than-mode-centred",
         "virtio_gpu planes cannot scale: a 2560x1440 buffer on a 1920x1080 mode is centred and cropped",
         "monitors: {m: {connector: Virtual-1, scaling: fit}}\n" + ONE,
         machine(card(conn("Virtual-1"))), [g("a", width=2560, height=1440)], {"m": "a"},
         check=lambda a: (a.outputs[0].src, a.outputs[0].dst, a.outputs[0].scaling)
         == (Rect(320, 180, 1920, 1080), Rect(0, 0, 1920, 1080), "none")),

    Case("guest-larger-than-mode-scaled",
         "i915 planes scale: the same buffer is fitted whole into the mode (16:9 into 16:9)",
         "monitors: {m: {connector: DP-1, scaling: fit}}\n" + ONE,
         machine(card(conn("DP-1"), driver="i915")), [g("a", width=2560, height=1440)], {"m": "a"},
         check=lambda a: (a.outputs[0].src, a.outputs[0].dst, a.outputs[0].scaling)
         == (Rect(0, 0, 2560, 1440), Rect(0, 0, 1920, 1080), "fit")),

    Case("match-guest-mode",
         "match-guest picks the mode of the guest's own size, so nothing needs scaling",
         "monitors: {m: {connector: DP-1, mode: match-guest}}\n" + ONE,
         machine(card(conn("DP-1"))), [g("a", width=1280, height=1024)], {"m": "a"},
         check=lambda a: (a.outputs[0].mode.width, a.outputs[0].mode.height, a.outputs[0].dst)
         == (1280, 1024, Rect(0, 0, 1280, 1024))),

    Case("match-guest-smallest-holding",
         "no 1100x700 mode: the smallest mode that holds it is 1280x720, and the buffer is centred in it",
         "monitors: {m: {connector: DP-1, mode: match-guest}}\n" + ONE,
         machine(card(conn("DP-1"))), [g("a", width=1100, height=700)], {"m": "a"},
         check=lambda a: (str(a.outputs[0].mode), a.outputs[0].dst)
         == ("1280x720@60.00", Rect(90, 10, 1100, 700))),

    Case("size-mode-closest-refresh",
         "1920x1080@49 is not offered; 50 Hz is the closest, within a hertz, so no note",
         "monitors: {m: {connector: DP-1, mode: 1920x1080@49}}\n" + ONE,
         machine(card(conn("DP-1"))), [g("a")], {"m": "a"},
         check=lambda a: a.outputs[0].mode.refresh == 50.0
         and not any("Hz" in n for n in a.outputs[0].notes)),

    Case("size-mode-not-offered",
         "2560x1440 is not offered: the preferred mode is used and a note says so",
         "monitors: {m: {connector: DP-1, mode: 2560x1440}}\n" + ONE,
         machine(card(conn("DP-1"))), [g("a", width=1920, height=1080)], {"m": "a"},
         check=lambda a: str(a.outputs[0].mode) == "1920x1080@60.00"
         and "not offered" in a.outputs[0].notes[0]),

    Case("crtc-routing-matching",
         "DP-1 reaches CRTCs 0 and 1, DP-2 only CRTC 0. Taking DP-1 first on CRTC 0 would strand DP-2; "
         "the matching moves DP-1 to CRTC 1 so both light",
         """
monitors: {one: DP-1, two: DP-2}
guests: {a: , b: }
placements:
  - {guest: a, monitor: one, priority: 1}
  - {guest: b, monitor: two}
""", machine(card(conn("DP-1", crtcs=[0, 1]), conn("DP-2", crtcs=[0]))), [g("a"), g("b")],
         {"one": "a", "two": "b"},
         check=lambda a: (a.for_monitor("one").crtc_id, a.for_monitor("two").crtc_id) == (101, 100)),

    Case("crtc-shortage-failover",
         "three connectors share two CRTCs: a and b take them, so c's monitor has no CRTC and c is "
         "not shown; the connector stays off with that reason",
         """
monitors: {one: DP-1, two: DP-2, three: DP-3}
guests: {a: , b: , c: }
placements:
  - {guest: a, monitor: one}
  - {guest: b, monitor: two}
  - {guest: c, monitor: three}
""", machine(card(conn("DP-1", crtcs=[0, 1]), conn("DP-2", crtcs=[0, 1]), conn("DP-3", crtcs=[0, 1]),
                  ncrtcs=2)), [g("a"), g("b"), g("c")],
         {"one": "a", "two": "b", "three": "off"}, unplaced=["c: three has no free CRTC"]),

    Case("keeps-current-crtc",
         "DP-1 is lit on CRTC 1 already: it keeps it, which spares a full modeset",
         "monitors: {m: DP-1}\n" + ONE,
         machine(card(conn("DP-1", crtcs=[0, 1], current=1), ncrtcs=2)), [g("a")], {"m": "a"},
         check=lambda a: a.outputs[0].crtc_id == 101),

    Case("unsupported-format-slate",
         "the guest scans out NV12 but the only plane takes XR24: the output shows the slate instead",
         "monitors: {m: Virtual-1}\n" + ONE,
         machine(card(conn("Virtual-1"))), [g("a", fourcc="NV12", width=1920, height=1080)],
         {"m": "slate: unsupported format"}, unplaced=["a: m: unsupported format"]),

    Case("plane-shortage",
         "two CRTCs but one plane that reaches both: a, first by priority, gets it; b's monitor stays "
         "off (no slate can be shown without a plane) and b is reported as not shown",
         """
monitors: {one: DP-1, two: DP-2}
guests: {a: , b: }
placements:
  - {guest: b, monitor: two}
  - {guest: a, monitor: one, priority: 1}
""", machine(card(conn("DP-1"), conn("DP-2"), planes=[
             {"type": "primary", "crtcs": [0, 1], "formats": {"XR24": ["LINEAR"]}}])), [g("a"), g("b")],
         {"one": "a", "two": "off"}, unplaced=["b: two: no plane free for CRTC 101"]),

    Case("format-picks-overlay",
         "the primary plane lacks NV12 but an overlay on the same CRTC has it: the overlay is used",
         "monitors: {m: Virtual-1}\n" + ONE,
         machine(card(conn("Virtual-1"), driver="vkms", planes=[
             {"type": "primary", "crtcs": [0], "formats": {"XR24": ["LINEAR"]}},
             {"type": "overlay", "crtcs": [0], "formats": {"XR24": ["LINEAR"], "NV12": ["LINEAR"]}},
             {"type": "cursor", "crtcs": [0], "formats": {"NV12": ["LINEAR"]}}])),
         [g("a", fourcc="NV12")], {"m": "a"}, check=lambda a: a.outputs[0].plane_id == 201),

    Case("modifier-must-match",
         "XR24 is listed, but only LINEAR: a Y-tiled buffer cannot be scanned out, so slate",
         "monitors: {m: DP-1}\n" + ONE,
         machine(card(conn("DP-1"))), [g("a", fourcc="XR24", modifier="I915_Y_TILED")],
         {"m": "slate: unsupported format"}, unplaced=["a: m: unsupported format"]),

    Case("glob-guest-first-by-name",
         "`build-*` binds one guest: the first by name, whatever order the guests were given in",
         "monitors: {m: DP-1}\nguests: {b: {name: 'build-*'}}\nplacements: [{guest: b, monitor: m}]",
         machine(card(conn("DP-1"))), [g("build-9"), g("build-10"), g("build-2")], {"m": "build-10"},
         unplaced=["build-2: no guest rule", "build-9: no guest rule"]),

    Case("uuid-and-kind",
         "two vfio guests with one name; the rule's uuid picks the second; a socket guest is never vfio",
         """
monitors: {m: DP-1, n: DP-2}
guests:
  v: {name: win, kind: vfio, uuid: 0B5D4A9E-7F3C-4C8E-9A1D-2F6E8B3C5D7A}
  s: {name: "*", kind: socket}
placements:
  - {guest: v, monitor: m}
  - {guest: s, monitor: n}
""", machine(card(conn("DP-1"), conn("DP-2"))),
         [g("win", uuid="00000000-0000-0000-0000-000000000000"),
          g("win", uuid="0b5d4a9e-7f3c-4c8e-9a1d-2f6e8b3c5d7a"), g("chat", kind="socket")],
         {"m": "win", "n": "chat"}, unplaced=["win: no guest rule"],
         check=lambda a: a.outputs[0].guest == "win" and a.unplaced[0].guest == "win"),

    Case("writeback-and-disconnected-ignored",
         "a writeback connector and a disconnected one are not monitors: neither is listed",
         "monitors: {m: 'Virtual-*'}\n" + ONE,
         machine(card(conn("Writeback-1", status="unknown", modes=[]),
                      conn("Virtual-1", status="disconnected"), conn("Virtual-2"))), [g("a")], {"m": "a"},
         check=lambda a: a.for_monitor("m").connector == "Virtual-2" and not a.dark),

    Case("unclaimed-output-off",
         "the policy names one monitor; the other present output is left off, not lit with a slate",
         "monitors: {m: DP-1}\n" + ONE,
         machine(card(conn("DP-1"), conn("HDMI-A-1"))), [g("a")], {"m": "a"},
         check=lambda a: [(d.connector, d.reason) for d in a.dark] == [("HDMI-A-1", "not in the policy")]),

    Case("no-modes-off",
         "a connected connector with no modes cannot be lit: a fails over and the output stays off",
         "monitors: {m: DP-1, n: DP-2}\nguests: {a: }\nplacements: [{guest: a, monitor: m, failover: [n]}]",
         machine(card(conn("DP-1", modes=[]), conn("DP-2"))), [g("a")], {"m": "off", "n": "a"},
         unplaced=[], check=lambda a: a.dark[0].reason == "monitor m has no modes"),

    Case("integer-scaling",
         "integer scaling on a scaling plane: 640x400 fits twice into 1920x1080 (three times is 1200 high)",
         "monitors: {m: {connector: DP-1, scaling: integer}}\n" + ONE,
         machine(card(conn("DP-1"), driver="amdgpu")), [g("a", width=640, height=400)], {"m": "a"},
         check=lambda a: a.outputs[0].dst == Rect(320, 140, 1280, 800)),

    Case("unknown-buffer-size",
         "the guest has not scanned out yet: the rectangles assume the mode, and a note says so",
         "monitors: {m: DP-1}\n" + ONE,
         machine(card(conn("DP-1"))), [g("a")], {"m": "a"},
         check=lambda a: a.outputs[0].src == Rect(0, 0, 1920, 1080) and "unknown" in a.outputs[0].notes[0]),
]


def describe(a: Assignment, monitor: str) -> str:
    o = a.for_monitor(monitor)
    if o is None:
        return "off"
    if o.guest is not None:
        return o.guest
    assert o.slate is not None
    return f"slate: {o.slate.reason}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_plan(case: Case) -> None:
    pol = policy.parse(case.policy, case.name)
    a = plan(pol, case.outputs, case.guests)
    for monitor, want in case.shows.items():
        got = describe(a, monitor)
        if want == "slate":
            assert got.startswith("slate"), f"{monitor}: {got}"
        else:
            assert got.startswith(want), f"{monitor}: want {want!r}, got {got!r}"
    got_unplaced = [f"{u.guest}: {u.reason}" for u in a.unplaced]
    assert len(got_unplaced) == len(case.unplaced), got_unplaced
    for got, want in zip(got_unplaced, case.unplaced, strict=True):
        assert got.startswith(want), (got, want)
    if case.check is not None:
        assert case.check(a), a
    # The planner is pure: same inputs, same answer, whatever order the guests come in.
    shuffled = list(case.guests)
    random.Random(1).shuffle(shuffled)
    assert plan(pol, case.outputs, shuffled) == a


# --- rectangles -----------------------------------------------------------------------------------

PLACE = [
    # (scaling, buffer, mode, can_scale) -> (src, dst, effective)
    # same size: nothing to do whatever was asked
    (("fit", (1920, 1080), (1920, 1080), True), (Rect(0, 0, 1920, 1080), Rect(0, 0, 1920, 1080), "none")),
    # smaller, centred
    (("none", (800, 600), (1920, 1080), True), (Rect(0, 0, 800, 600), Rect(560, 240, 800, 600), "none")),
    # larger, centred: the middle of the buffer is shown
    (("none", (2000, 1200), (1920, 1080), True), (Rect(40, 60, 1920, 1080), Rect(0, 0, 1920, 1080), "none")),
    # fit 4:3 into 16:9: pillarboxed, full height
    (("fit", (1024, 768), (1920, 1080), True), (Rect(0, 0, 1024, 768), Rect(240, 0, 1440, 1080), "fit")),
    # fill 4:3 into 16:9: full width, top and bottom of the buffer cut
    (("fill", (1024, 768), (1920, 1080), True), (Rect(0, 96, 1024, 576), Rect(0, 0, 1920, 1080), "fill")),
    # integer: 800x600 twice is 1600x1200, taller than the mode, so the factor is 1: plain centring
    (("integer", (800, 600), (1920, 1080), True), (Rect(0, 0, 800, 600), Rect(560, 240, 800, 600), "none")),
    # integer 3x
    (("integer", (640, 360), (1920, 1080), True), (Rect(0, 0, 640, 360), Rect(0, 0, 1920, 1080), "integer")),
    # a plane that cannot scale centres instead of fitting
    (("fit", (1024, 768), (1920, 1080), False), (Rect(0, 0, 1024, 768), Rect(448, 156, 1024, 768), "none")),
]


@pytest.mark.parametrize(("args", "want"), PLACE)
def test_place(args: tuple[Any, ...], want: tuple[Rect, Rect, str]) -> None:
    src, dst, effective, _ = place(*args)
    assert (src, dst, effective) == want


def test_choose_mode_prefers_flagged_mode() -> None:
    # the kernel's order puts a non-preferred mode first here; `preferred` still means the flagged one
    outs = machine(card(conn("DP-1", modes=[mode(800, 600), mode(1280, 720, preferred=True)])))
    rule = policy.parse("monitors: {m: DP-1}").monitors[0]
    assert str(choose_mode(rule, outs[0], None)[0]) == "1280x720@60.00"


def test_no_preferred_mode_uses_first() -> None:
    # a forced connector without a preferred mode: the first listed one is used
    outs = machine(card(conn("DP-1", modes=[mode(800, 600), mode(1280, 720)])))
    rule = policy.parse("monitors: {m: DP-1}").monitors[0]
    assert str(choose_mode(rule, outs[0], None)[0]) == "800x600@60.00"


def test_guest_rejects_bad_fields() -> None:
    with pytest.raises(ValueError):
        Guest("a", "vnc")
    with pytest.raises(ValueError):
        Guest("a", "vfio", width=10)


def test_lab_topology_demo() -> None:
    """The lab's demo policy on the saved lab topology: three guests on the three QEMU monitors."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    pol = policy.load(root / "tests" / "data" / "policies" / "lab-demo.yaml")
    topo = topology.load(root / "tests" / "data" / "lab-topology.json")
    a = plan(pol, topo.outputs(), [g("office"), g("media", "qemu-dbus"), g("build-7", "socket")])
    assert [(o.monitor, o.guest) for o in a.outputs] == [("left", "office"), ("centre", "media"),
                                                        ("right", "build-7")]


# --- runtime overrides (`directflip show`, the next-guest hotkey) ----------------------------------

OVERRIDE_POLICY = "version: 1\n" + THREE + """
seats:
  desk-a: {monitors: [left, centre]}
  desk-b: {monitors: [right]}
guests: {a: , b: , c: , d: }
placements:
  - {guest: a, monitor: left}
  - {guest: b, monitor: centre}
  - {guest: c, monitor: right, failover: [centre]}
  - {guest: d, seats: [desk-b]}
"""


def override_plan(overrides: dict[str, str]) -> Assignment:
    pol = policy.parse(OVERRIDE_POLICY)
    guests = [g("a"), g("b"), g("c"), g("d")]
    return plan(pol, machine(three_monitors()), guests, overrides)


def test_override_comes_before_every_placement_and_the_guest_keeps_its_own():
    a = override_plan({"centre": "a"})
    # a on centre by the override and on left by its placement; b, displaced, has no other monitor
    assert [describe(a, m) for m in ("left", "centre", "right")] == ["a", "a", "c"]
    assert "shown here by `directflip show`" in " ".join(a.for_monitor("centre").notes)
    assert [u.guest for u in a.unplaced if u.monitor is None] == ["b", "d"]


def test_override_obeys_the_guests_seat_fence():
    # d's placement keeps it to desk-b: an override onto desk-a's centre is refused, not applied
    a = override_plan({"centre": "d"})
    assert describe(a, "centre") == "b"
    assert any(u.guest == "d" and "outside the seats" in u.reason for u in a.unplaced)


def test_override_of_a_guest_not_running_waits():
    pol = policy.parse(OVERRIDE_POLICY)
    a = plan(pol, machine(three_monitors()), [g("a"), g("b")], {"centre": "c", "nowhere": "a"})
    assert describe(a, "centre") == "b"


def test_could_show_lists_the_guests_a_monitor_may_take_in_placement_order():
    from compositor.planner import could_show, may_show

    pol = policy.parse(OVERRIDE_POLICY)
    outs = {o.connector.name: o for o in machine(three_monitors())}
    assert could_show(pol, "centre", outs["Virtual-2"]) == ["b", "c"]
    assert could_show(pol, "right", outs["Virtual-3"]) == ["c", "d"]
    assert may_show(pol, "d", "right", outs["Virtual-3"])
    assert not may_show(pol, "d", "left", outs["Virtual-1"])


def test_a_guest_that_cannot_run_says_why_on_its_monitors_slate():
    pol = policy.parse(OVERRIDE_POLICY)
    why = "its VMM (pid 4242) still runs and holds vGPU x, which cannot be re-attached: the kernel refuses"
    a = plan(pol, machine(three_monitors()), [g("b"), g("c")], absent={"a": why})
    left = a.for_monitor("left")
    assert left.slate is not None and left.slate.reason == f"a: {why}"
    b = plan(pol, machine(three_monitors()), [g("b"), g("c")])
    assert b.for_monitor("left").slate.reason == "a is not running"
