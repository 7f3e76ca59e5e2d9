"""Property-based planner tests: any valid policy on any topology gives a valid assignment.

Policies are generated as documents, dumped to YAML and read back through the loader, so the
generator can only produce what an operator could write (and the loader must accept all of it)."""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compositor import policy, topology
from compositor.planner import Assignment, Guest, plan

CONNECTOR_NAMES = ["DP-1", "DP-2", "HDMI-A-1", "Virtual-1", "Virtual-2", "eDP-1"]
SIZES = [(640, 480), (800, 600), (1024, 768), (1280, 720), (1920, 1080), (2560, 1440)]
EDIDS = [None, ("DEL", 1, 0, "U2720Q"), ("DEL", 1, 7, "U2720Q"), ("RHT", 4660, 0, "QEMU Monitor")]
FORMATS = ["XR24", "AR24", "NV12"]
MODIFIERS = ["LINEAR", "I915_Y_TILED"]
GUEST_NAMES = ["office", "media", "build-1", "build-2", "kiosk", "win"]


@st.composite
def cards(draw: st.DrawFn) -> list[dict[str, Any]]:
    docs = []
    for c in range(draw(st.integers(1, 3))):
        driver = draw(st.sampled_from(["virtio_gpu", "vkms", "i915"]))
        ncrtcs = draw(st.integers(1, 4))
        crtc_ids = [100 * (c + 1) + i for i in range(ncrtcs)]
        crtc_subset = st.lists(st.sampled_from(crtc_ids), max_size=ncrtcs, unique=True)
        # usually at least one CRTC: a connector no CRTC reaches is rare, but it happens
        reachable = st.one_of(crtc_subset, st.lists(st.sampled_from(crtc_ids), min_size=1, max_size=ncrtcs,
                                                    unique=True))
        names = draw(st.lists(st.sampled_from(CONNECTOR_NAMES), max_size=5, unique=True))
        conns = []
        for k, name in enumerate(names):
            sizes = draw(st.lists(st.sampled_from(SIZES), min_size=draw(st.sampled_from([0, 1, 1, 1])),
                                  max_size=4))
            preferred = draw(st.integers(-1, len(sizes) - 1)) if sizes else -1
            modes = [{"name": f"{w}x{h}", "width": w, "height": h, "clock": 1, "preferred": i == preferred,
                      "refresh": draw(st.sampled_from([50.0, 60.0]))} for i, (w, h) in enumerate(sizes)]
            e = draw(st.sampled_from(EDIDS))
            possible = draw(reachable)
            current = draw(st.sampled_from([None, *possible])) if possible else None
            conns.append({
                "id": 10 * (c + 1) + k, "name": name, "type": name.rsplit("-", 1)[0],
                "status": draw(st.sampled_from(["connected", "connected", "disconnected", "unknown"])),
                "edid": None if e is None else {"manufacturer": e[0], "product": e[1], "serial": e[2],
                                                "serial_string": None, "name": e[3], "year": 2020,
                                                "identity": f"{e[0]}:{e[1]}:{e[2]}"},
                "modes": modes, "preferred_mode": modes[preferred] if preferred >= 0 else None,
                "current": {"crtc": current, "mode": None} if current is not None else None,
                "link_status": None, "possible_crtcs": possible, "physical_size_mm": [0, 0]})
        planes = []
        for i, crtc in enumerate(crtc_ids):  # most drivers: one primary plane per CRTC
            if draw(st.integers(0, 4)):
                fmts = ["XR24", *draw(st.lists(st.sampled_from(FORMATS[1:]), max_size=2, unique=True))]
                planes.append({"id": 900 * (c + 1) + i, "type": "primary", "possible_crtcs": [crtc],
                               "formats": {f: ["LINEAR"] for f in fmts},
                               "zpos": None, "crtc": None, "fb": None})
        for i in range(draw(st.integers(0, ncrtcs + 2))):
            fmts = draw(st.lists(st.sampled_from(FORMATS), min_size=1, max_size=3, unique=True))
            planes.append({
                "id": 1000 * (c + 1) + i,
                "type": draw(st.sampled_from(["primary", "overlay", "cursor"])),
                "possible_crtcs": draw(crtc_subset),
                "formats": {f: draw(st.lists(st.sampled_from(MODIFIERS), min_size=1, max_size=2, unique=True))
                            for f in fmts},
                "zpos": None, "crtc": None, "fb": None})
        docs.append({"path": f"/dev/dri/card{c}", "driver": driver, "driver_desc": "",
                     "bus_path": f"pci-0000:0{c}:00.0", "seat": draw(st.sampled_from(["seat0", "seat1"])),
                     "caps": {}, "connectors": conns,
                     "crtcs": [{"id": x, "index": i, "active": False, "mode": None}
                               for i, x in enumerate(crtc_ids)],
                     "planes": planes})
    return docs


@st.composite
def monitor_rule(draw: st.DrawFn) -> dict[str, Any]:
    """One policy monitor, matched by connector name, glob, EDID or port, with its mode and scaling."""
    how = draw(st.sampled_from(["connector", "glob", "edid", "port"]))
    if how == "connector":
        m: dict[str, Any] = {"connector": draw(st.sampled_from(CONNECTOR_NAMES))}
    elif how == "glob":
        m = {"connector": draw(st.sampled_from(["*", "DP-*", "*-1", "Virtual-?"]))}
    elif how == "edid":
        e = draw(st.sampled_from(EDIDS[1:]))
        m = {"edid": draw(st.sampled_from([{"manufacturer": e[0]}, {"manufacturer": e[0], "serial": e[2]},
                                           {"name": e[3]}]))}
    else:
        m = {"port": draw(st.sampled_from(["pci-*", "pci-0000:01:00.0/*", "pci-*/DP-1"]))}
    if draw(st.booleans()):
        m["driver"] = draw(st.sampled_from(["virtio_gpu", "vkms", "i915"]))
    m["mode"] = draw(st.sampled_from(["preferred", "match-guest", "1920x1080", "1024x768@60",
                                      "3000x2000"]))
    m["scaling"] = draw(st.sampled_from(["none", "centre", "fit", "fill", "integer"]))
    return m


@st.composite
def monitor_rules(draw: st.DrawFn) -> dict[str, Any]:
    """The `monitors` section: one to six monitors named m0, m1, ..."""
    return {f"m{i}": draw(monitor_rule()) for i in range(draw(st.integers(1, 6)))}


@st.composite
def seat_sections(draw: st.DrawFn, names: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(the `seats` section, monitor -> the seat listing it): up to two seats, each listing some
    monitors no other seat lists, or a logind seat, or both."""
    seats: dict[str, Any] = {}
    seat_of: dict[str, str] = {}
    for s in range(draw(st.integers(0, 2))):
        members = [n for n in names if n not in seat_of and draw(st.booleans())]
        seat: dict[str, Any] = {}
        if members:
            seat["monitors"] = members
            seat_of.update({n: f"s{s}" for n in members})
        if not members or draw(st.booleans()):
            seat["logind"] = [draw(st.sampled_from(["seat0", "seat1"]))]
        seats[f"s{s}"] = seat
    return seats, seat_of


@st.composite
def guest_rules(draw: st.DrawFn) -> dict[str, Any]:
    """The `guests` section: up to five rules by name or glob, some also by kind."""
    guests: dict[str, Any] = {}
    for i in range(draw(st.integers(1, 5))):
        rule: dict[str, Any] = {"name": draw(st.sampled_from([*GUEST_NAMES, "build-*", "*"]))}
        if not draw(st.integers(0, 3)):
            rule["kind"] = draw(st.sampled_from(policy.GUEST_KINDS))
        if rule["name"] not in ("build-*", "*") and any(
                r["name"] == rule["name"] and r.get("kind") == rule.get("kind") for r in guests.values()):
            continue  # the loader rejects a rule that can never bind
        guests[f"g{i}"] = rule
    return guests


@st.composite
def placement(draw: st.DrawFn, gname: str, names: list[str], seats: dict[str, Any],
              seat_of: dict[str, str]) -> dict[str, Any]:
    """A placement of guest rule `gname`: a priority, maybe seats, a monitor with failovers (or only
    seats), maybe mirrors, all inside the seats it names when those seats list monitors."""
    p: dict[str, Any] = {"guest": gname, "priority": draw(st.integers(-3, 3))}
    allowed = names
    if seats and draw(st.booleans()):
        p["seats"] = draw(st.lists(st.sampled_from(list(seats)), min_size=1, unique=True))
        if not any("logind" in seats[s] for s in p["seats"]):
            allowed = [n for n in names if seat_of.get(n) in p["seats"]]
    main = draw(st.lists(st.sampled_from(allowed), max_size=3, unique=True)) if allowed else []
    if main:
        p["monitor"] = main[0]
        if main[1:]:
            p["failover"] = main[1:]
    elif "seats" not in p:
        p["monitor"] = draw(st.sampled_from(names))
    if allowed and draw(st.booleans()):
        p["mirror"] = draw(st.lists(st.sampled_from(allowed), min_size=1, max_size=3, unique=True))
    return p


@st.composite
def placement_list(draw: st.DrawFn, guests: list[str], names: list[str], seats: dict[str, Any],
                   seat_of: dict[str, str]) -> list[dict[str, Any]]:
    """The `placements` section: one placement for most guest rules, always one for the first."""
    placements: list[dict[str, Any]] = []
    for gname in guests:
        if not draw(st.integers(0, 5)) and placements:
            continue  # a guest rule without a placement is legal (the loader warns)
        placements.append(draw(placement(gname, names, seats, seat_of)))
    return placements


@st.composite
def policies(draw: st.DrawFn) -> dict[str, Any]:
    monitors = draw(monitor_rules())
    names = list(monitors)
    seats, seat_of = draw(seat_sections(names))
    guests = draw(guest_rules())
    placements = draw(placement_list(list(guests), names, seats, seat_of))

    doc: dict[str, Any] = {"version": 1, "monitors": monitors}
    if guests:
        doc["guests"] = guests
    if seats:
        doc["seats"] = seats
    if placements:
        doc["placements"] = placements
    return doc


@st.composite
def running_guests(draw: st.DrawFn) -> list[Guest]:
    out = []
    for name in draw(st.lists(st.sampled_from(GUEST_NAMES), min_size=draw(st.sampled_from([0, 3])),
                              max_size=6, unique=True)):
        size = draw(st.sampled_from([None, *SIZES, (333, 222), (4000, 3000)]))
        out.append(Guest(name, draw(st.sampled_from(policy.GUEST_KINDS)),
                         width=size and size[0], height=size and size[1],
                         fourcc=draw(st.sampled_from([None, *FORMATS])),
                         modifier=draw(st.sampled_from([None, "LINEAR"]))))
    return out


def check_assignment(pol: policy.Policy, topo: topology.Topology, guests: list[Guest], a: Assignment) -> None:
    outputs = {(o.card.path, o.connector.id): o for o in topo.outputs()}
    cards = {c.path: c for c in topo.cards}
    # every present output is either lit or off, once
    keys = [(o.card, o.connector_id) for o in a.outputs] + [(d.card, d.connector_id) for d in a.dark]
    assert sorted(keys) == sorted(outputs), "each present output is listed exactly once"
    used_crtcs, used_planes = set(), set()
    monitors = set()
    by_name = {g.name: g for g in guests}
    placement_of = {p.guest: p for p in pol.placements}
    # the binding the policy defines: each guest rule, in file order, takes the first free running
    # guest by name that it matches
    rule_of_guest: dict[str, str] = {}
    for r in pol.guests:
        for g in sorted(guests, key=lambda g: g.name):
            if g.name not in rule_of_guest and r.matches(g.name, g.kind, g.uuid):
                rule_of_guest[g.name] = r.name
                break
    for o in a.outputs:
        out = outputs[(o.card, o.connector_id)]
        card = cards[o.card]
        assert o.monitor not in monitors, "a policy monitor binds one output"
        monitors.add(o.monitor)
        assert pol.monitor(o.monitor).matches(out)
        assert (o.card, o.crtc_id) not in used_crtcs, "no CRTC used twice"
        used_crtcs.add((o.card, o.crtc_id))
        assert (o.card, o.plane_id) not in used_planes, "no plane used twice"
        used_planes.add((o.card, o.plane_id))
        assert o.crtc_id in out.connector.possible_crtcs
        plane = next(p for p in card.planes if p.id == o.plane_id)
        assert plane.type != "cursor"
        assert o.crtc_id in plane.possible_crtcs
        assert o.mode in out.connector.modes
        assert (o.guest is None) != (o.slate is None)
        assert o.dst.inside(o.mode.width, o.mode.height), "destination inside the mode"
        if o.guest is None:
            assert o.src == o.dst
            assert plane.supports("XR24")
            continue
        g = by_name[o.guest]
        bw, bh = (g.width, g.height) if g.width and g.height else (o.mode.width, o.mode.height)
        assert o.src.inside(bw, bh), "source inside the buffer"
        if not plane.can_scale:
            assert (o.src.w, o.src.h) == (o.dst.w, o.dst.h), "no scaling on a plane that cannot"
        if g.fourcc is not None:
            assert plane.supports(g.fourcc, g.modifier)
        # the guest is on a monitor its own placement names, inside the seats that placement allows
        p = placement_of[rule_of_guest[g.name]]
        assert o.monitor in (*p.candidates, *p.mirror)
        if p.seats:
            assert pol.seats_of(o.monitor, out) & set(p.seats), "never outside the placement's seats"
    # no guest shown as its main view twice
    mains = [o.guest for o in a.outputs if o.guest is not None and not o.mirror]
    assert len(mains) == len(set(mains))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cards(), policies(), running_guests(), st.randoms(use_true_random=False))
def test_any_valid_policy_gives_a_valid_assignment(card_docs: list[dict[str, Any]], doc: dict[str, Any],
                                                    guests: list[Guest], rnd: Any) -> None:
    text = yaml.safe_dump(doc, sort_keys=False)
    pol = policy.parse(text, "generated.yaml")  # the generator only writes valid policies
    topo = topology.from_probe({"schema": topology.SCHEMA, "cards": card_docs})
    a = plan(pol, topo.outputs(), guests)
    check_assignment(pol, topo, guests, a)
    shuffled = list(guests)
    rnd.shuffle(shuffled)
    assert plan(pol, topo.outputs(), shuffled) == a, "the result does not depend on the guests' order"


@settings(max_examples=200, deadline=None)
@given(cards(), policies())
def test_unplugging_never_breaks_the_plan(card_docs: list[dict[str, Any]], doc: dict[str, Any]) -> None:
    # the same policy and guests with any one connector gone still plan validly
    pol = policy.parse(yaml.safe_dump(doc, sort_keys=False), "generated.yaml")
    topo = topology.from_probe({"schema": topology.SCHEMA, "cards": card_docs})
    guests = [Guest(n, "vfio") for n in GUEST_NAMES]
    for out in topo.outputs():
        smaller = topo.without({f"{out.card.path}:{out.connector.name}"})
        check_assignment(pol, smaller, guests, plan(pol, smaller.outputs(), guests))
