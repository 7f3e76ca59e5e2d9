"""Which guest is shown on which monitor: the planner.

A pure function of three inputs: the validated policy, the outputs present now (connectors with their
card's CRTCs and planes), and the guests running now. Its result, an `Assignment`, says for each output
that will be lit which guest it shows (or which slate), in which mode, through which CRTC and plane,
and which rectangle of the guest's buffer lands on which rectangle of the screen. It does no I/O and
keeps no state, so the same inputs always give the same answer and the daemon can re-plan on every
hotplug, policy edit or guest change and apply only the difference.

The rules, in the order the planner applies them:

 1. Monitors are bound first. Each monitor of the policy, in file order, takes the first present output
    (cards in path order, connectors in the kernel's order) that it matches and no earlier monitor has
    taken. Two monitors with the same EDID are therefore told apart by connector order, and a rule that
    matches loosely (`edid: {manufacturer: DEL}`) should come after the precise ones. An output no
    monitor takes stays dark: the policy only lights what it names.

 2. Guests are bound the same way: each guest rule, in file order, takes the first running guest (by
    name, then uuid) that it matches and no earlier rule has taken.

 3. Main views, by priority. Placements are taken highest priority first, ties in file order. Each
    gets the first of its candidate monitors (`monitor`, then every `failover` in order; or the monitors
    of its `seats`) that is present, not already showing a guest, in one of the seats the placement
    allows, and reachable by a free CRTC. A placement that loses its monitor to a higher priority one
    fails over exactly as if the monitor were unplugged, so every conflict has one answer.

 4. Mirrors, after every main view. A mirror shows the same buffer on one more CRTC (still zero copy),
    but only on a monitor nobody's main view wanted: each guest is seen once before any is seen twice.
    A guest whose main monitors are all gone is still shown on its mirrors.

 5. Slates. Each monitor still free shows its slate, with the reason ("office is not running").

 CRTCs are routed as a bipartite matching: when a connector reaches only some CRTCs, taking a monitor
 may move an already-placed one to another CRTC (an augmenting path), but never leaves it without one;
 a monitor counts as available only if such a routing exists. Connectors keep the CRTC they are on
 when they can, which spares a full modeset.

 Then, per lit output: the mode (`preferred`, the closest `WxH@Hz`, or `match-guest`: the guest's size,
 else the smallest mode that holds it), a plane (the CRTC's primary first, then overlays by zpos; never a
 cursor plane; it must take the guest's format and modifier when known, else the output shows the
 "unsupported format" slate), and the rectangles for the monitor's scaling. Scaling asks the plane to
 scale only when its driver is known to (see topology.SCALING_DRIVERS); otherwise the buffer is centred,
 and cropped when larger than the mode. The scanout ladder still test-commits whatever is planned here.

Nothing is searched for an optimum the way libliftoff searches plane allocations: the policy states an
order of preference, and a greedy walk in that order is what an operator can predict by reading it.
Only the CRTC and plane routing, where greed could strand a monitor for no reason, is a matching.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from compositor.policy import GUEST_KINDS, MonitorRule, Placement, Policy
from compositor.topology import Card, Mode, Output, Plane

SLATE_FOURCC = "XR24"  # slates are drawn by the compositor into a linear XRGB8888 dumb buffer


# --- inputs and outputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Guest:
    """A running guest as the planner sees it. The framebuffer fields are None until known."""

    name: str
    kind: str | None  # vfio | qemu-dbus | socket; None: not known (`check` imagining a guest)
    uuid: str | None = None
    width: int | None = None
    height: int | None = None
    fourcc: str | None = None
    modifier: str | None = None

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in GUEST_KINDS:
            raise ValueError(f"guest kind must be one of {', '.join(GUEST_KINDS)}, not {self.kind!r}")
        if (self.width is None) != (self.height is None):
            raise ValueError("give both framebuffer width and height, or neither")
        if self.width is not None and self.height is not None and (self.width <= 0 or self.height <= 0):
            raise ValueError(f"framebuffer size must be positive, not {self.width}x{self.height}")


@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    w: int
    h: int

    def inside(self, width: int, height: int) -> bool:
        return self.w > 0 and self.h > 0 and self.x >= 0 and self.y >= 0 \
            and self.x + self.w <= width and self.y + self.h <= height

    def __str__(self) -> str:
        return f"{self.w}x{self.h}+{self.x}+{self.y}"


@dataclass(frozen=True)
class Slate:
    reason: str  # why nothing is shown, for logs and status ("office is not running")
    text: str  # what the operator wants on screen ("no signal")
    colour: str  # "#rrggbb"


@dataclass(frozen=True)
class OutputAssignment:
    """One lit output. Exactly one of `guest` and `slate` is set."""

    card: str
    connector: str
    connector_id: int
    monitor: str  # the policy's name for it
    crtc_id: int
    plane_id: int
    mode: Mode
    guest: str | None
    slate: Slate | None
    src: Rect  # in the guest buffer (the slate buffer is mode-sized)
    dst: Rect  # on the CRTC
    scaling: str  # what the rectangles do: none | fit | fill | integer
    mirror: bool = False  # shown through the placement's `mirror` list
    notes: tuple[str, ...] = ()
    # What the plan expects of the scanout ladder: False where the plane is known to refuse this
    # placement (a primary plane that must cover the CRTC, given a smaller rectangle), so the frame
    # will be copied into a screen-sized buffer. The ladder still test-commits zero copy first.
    zero_copy: bool = True


@dataclass(frozen=True)
class DarkOutput:
    """A present output left off, and why."""

    card: str
    connector: str
    connector_id: int
    monitor: str | None
    reason: str


@dataclass(frozen=True)
class Unplaced:
    """A running guest not shown where the policy wanted it. `monitor` names a mirror that was missed;
    when it is None the guest has no main view."""

    guest: str
    reason: str
    monitor: str | None = None


@dataclass(frozen=True)
class Assignment:
    outputs: tuple[OutputAssignment, ...]
    dark: tuple[DarkOutput, ...] = ()
    unplaced: tuple[Unplaced, ...] = ()

    def for_guest(self, name: str) -> tuple[OutputAssignment, ...]:
        return tuple(o for o in self.outputs if o.guest == name)

    def for_monitor(self, name: str) -> OutputAssignment | None:
        return next((o for o in self.outputs if o.monitor == name), None)


# --- rectangles and modes (public: the scanout ladder reuses them) --------------------------------


def _centre(bw: int, bh: int, mw: int, mh: int) -> tuple[Rect, Rect]:
    w, h = min(bw, mw), min(bh, mh)
    return Rect((bw - w) // 2, (bh - h) // 2, w, h), Rect((mw - w) // 2, (mh - h) // 2, w, h)


def place(scaling: str, buffer: tuple[int, int], mode: tuple[int, int],
          can_scale: bool) -> tuple[Rect, Rect, str, tuple[str, ...]]:
    """Source and destination rectangles for a `buffer`-sized image on a `mode`-sized CRTC.

    Returns (src, dst, the scaling actually done, notes). Without plane scaling every request falls
    back to centring, which crops a buffer larger than the mode."""
    bw, bh = buffer
    mw, mh = mode
    src, dst = _centre(bw, bh, mw, mh)
    if scaling == "fit":
        s = min(mw / bw, mh / bh)
        w, h = min(mw, max(1, round(bw * s))), min(mh, max(1, round(bh * s)))
        scaled = (Rect(0, 0, bw, bh), Rect((mw - w) // 2, (mh - h) // 2, w, h))
    elif scaling == "fill":
        s = max(mw / bw, mh / bh)
        w, h = min(bw, max(1, round(mw / s))), min(bh, max(1, round(mh / s)))
        scaled = (Rect((bw - w) // 2, (bh - h) // 2, w, h), Rect(0, 0, mw, mh))
    elif scaling == "integer":
        k = min(mw // bw, mh // bh)
        scaled = (Rect(0, 0, bw, bh), Rect((mw - bw * k) // 2, (mh - bh * k) // 2, bw * k, bh * k)) \
            if k > 1 else (src, dst)
    else:
        scaled = (src, dst)
    notes: list[str] = []
    s_src, s_dst = scaled
    if (s_src.w, s_src.h) == (s_dst.w, s_dst.h):
        effective = "none"
        src, dst = s_src, s_dst
    elif can_scale:
        return s_src, s_dst, scaling, ()
    else:
        effective = "none"
        notes.append(f"plane cannot scale; {scaling} falls back to centre")
    if (src.w, src.h) != (bw, bh):
        notes.append(f"buffer {bw}x{bh} cropped to {src.w}x{src.h}")
    return src, dst, effective, tuple(notes)


def _preferred(modes: Sequence[Mode], fallback: Mode | None) -> Mode:
    for m in modes:
        if m.preferred:
            return m
    if fallback is not None and fallback in modes:
        return fallback
    return modes[0]


def choose_mode(rule: MonitorRule, output: Output,
                buffer: tuple[int, int] | None) -> tuple[Mode, tuple[str, ...]]:
    """The mode for `output` under `rule`, given the guest's buffer size when known (None for slates)."""
    conn = output.connector
    modes = conn.modes
    pref = _preferred(modes, conn.preferred_mode)
    req = rule.mode
    if req.kind == "size":
        same = [(i, m) for i, m in enumerate(modes) if (m.width, m.height) == (req.width, req.height)]
        if not same:
            return pref, (f"mode {req} is not offered by {conn.name}; using preferred {pref}",)
        if req.refresh is None:
            # highest refresh; the preferred flag, then the kernel's order, break ties
            return max(same, key=lambda im: (im[1].refresh, im[1].preferred, -im[0]))[1], ()
        want = req.refresh
        best = min(same, key=lambda im: (abs(im[1].refresh - want), im[0]))[1]
        if abs(best.refresh - want) > 1:
            size = f"{req.width}x{req.height}"
            return best, (f"{want:g} Hz is not offered at {size}; using {best.refresh:.2f} Hz",)
        return best, ()
    if req.kind == "match-guest" and buffer is not None:
        bw, bh = buffer
        holds = [(i, m) for i, m in enumerate(modes) if m.width >= bw and m.height >= bh]
        if not holds:
            return pref, (f"no mode of {conn.name} holds the guest's {bw}x{bh}; using preferred {pref}",)
        return min(holds, key=lambda im: (im[1].width * im[1].height, -im[1].refresh, not im[1].preferred,
                                          im[0]))[1], ()
    return pref, ()


# --- routing: CRTCs and planes as bipartite matchings ---------------------------------------------

_Key = tuple[str, int]  # (card path, connector id)


def _key(output: Output) -> _Key:
    return output.card.path, output.connector.id


class _Matching:
    """Kuhn's augmenting paths: outputs (left) to CRTCs or planes (right). Adding an output may move
    earlier ones to other resources but never unmatches them, so the order outputs are added in is
    the order of precedence."""

    def __init__(self) -> None:
        self.options: dict[_Key, list[int]] = {}
        self.owner: dict[int, _Key] = {}

    def add(self, key: _Key, options: list[int]) -> bool:
        self.options[key] = options
        if self._augment(key, set()):
            return True
        del self.options[key]
        return False

    def _augment(self, key: _Key, seen: set[int]) -> bool:
        for r in self.options[key]:
            if r in seen:
                continue
            seen.add(r)
            holder = self.owner.get(r)
            if holder is None or self._augment(holder, seen):
                self.owner[r] = key
                return True
        return False

    def assigned(self) -> dict[_Key, int]:
        return {k: r for r, k in self.owner.items()}


def _crtc_options(output: Output) -> list[int]:
    conn = output.connector
    known = {c.id for c in output.card.crtcs}
    opts = sorted((c for c in set(conn.possible_crtcs) if c in known),
                  key=lambda c: next(x.index for x in output.card.crtcs if x.id == c))
    if conn.current_crtc in opts:
        opts.remove(conn.current_crtc)
        opts.insert(0, conn.current_crtc)
    return opts


def _plane_options(card: Card, crtc: int, fourcc: str | None, modifier: str | None) -> list[int]:
    def rank(p: Plane) -> tuple[int, int, int]:
        return (0 if p.type == "primary" else 1, p.zpos if p.zpos is not None else 0, p.id)

    usable = [p for p in card.planes if p.type != "cursor" and crtc in p.possible_crtcs
              and (fourcc is None or p.supports(fourcc, modifier))]
    return [p.id for p in sorted(usable, key=rank)]


# --- the planner ----------------------------------------------------------------------------------


def bind_guests(policy: Policy, guests: Iterable[Guest]) -> tuple[list[Guest], dict[str, Guest]]:
    """(the running guests in a stable order, guest rule → the one running guest it binds): each rule
    takes the first guest it matches that no earlier rule took. `directflip show` and the next-guest
    hotkey use the same binding, so they offer only guests the plan can show."""
    running = sorted(guests, key=lambda g: (g.name, g.uuid or "", g.kind or ""))
    by_name: dict[str, list[int]] = {}
    for i, g in enumerate(running):
        by_name.setdefault(g.name, []).append(i)
    everyone = range(len(running))
    taken: set[int] = set()
    guest_of: dict[str, Guest] = {}
    for grule in policy.guests:
        pool = by_name.get(grule.pattern.pattern, ()) if grule.pattern.literal else everyone
        for i in pool:
            g = running[i]
            if i not in taken and grule.matches(g.name, g.kind, g.uuid):
                taken.add(i)
                guest_of[grule.name] = g
                break
    return running, guest_of


def may_show(policy: Policy, rule: str, monitor: str, output: Output) -> bool:
    """Whether the guest rule `rule` may be shown on `monitor` by an override: every placement of the
    guest that names `seats` must include one of the monitor's seats (a seat fence holds for overrides
    as it does for placements)."""
    fences = [set(p.seats) for p in policy.placements if p.guest == rule and p.seats]
    seats = policy.seats_of(monitor, output)
    return all(f & seats for f in fences)


def could_show(policy: Policy, monitor: str, output: Output) -> list[str]:
    """The guest rules the policy could put on `monitor`, in placement order: those whose placements
    name it (main, failover or mirror), or that may go on any monitor of its seats."""
    seats = policy.seats_of(monitor, output)
    out: list[str] = []
    for p in sorted(policy.placements, key=lambda p: p.index):
        named = monitor in p.candidates or monitor in p.mirror
        by_seat = p.monitor is None and not p.failover and bool(set(p.seats) & seats)
        if (named or by_seat) and p.guest not in out:
            out.append(p.guest)
    return out


@dataclass
class _Shown:
    monitor: str
    output: Output
    guest: Guest | None
    mirror: bool = False
    slate_reason: str = ""
    override: bool = False  # put here by `directflip show` / the next-guest hotkey


@dataclass
class _Routed:
    """A shown monitor that got a plane: what it finally shows (a guest whose format no plane takes
    becomes a slate) on which CRTC."""

    shown: _Shown
    guest: Guest | None
    slate_reason: str
    crtc: int


def _slate_reason(waiting: Sequence[str], absent: Mapping[str, str]) -> str:
    """What the slate of a free monitor says: why the guests placed there are not shown."""
    told = [f"{n}: {absent[n]}" for n in waiting if n in absent]
    if told:
        return "; ".join(told)
    if waiting:
        return f"{' and '.join(waiting)} {'is' if len(waiting) == 1 else 'are'} not running"
    return "no guest is placed here"


def _unsupported_format(guest: Guest, crtc: int) -> str:
    fmt = f"{guest.fourcc}" + (f":{guest.modifier}" if guest.modifier else "")
    return f"unsupported format: no plane on CRTC {crtc} takes {fmt} from {guest.name}"


def _picture(rule: MonitorRule, output: Output, mode: Mode, buffer: tuple[int, int] | None,
             plane: Plane) -> tuple[Rect, Rect, str, bool, list[str]]:
    """(src, dst, the scaling done, zero copy expected, notes) for a guest buffer on `plane`."""
    notes: list[str] = []
    if buffer is None:
        buffer = (mode.width, mode.height)
        notes.append("buffer size unknown; rectangles assume the mode's size")
    src, dst, scaling, place_notes = place(rule.scaling, buffer, (mode.width, mode.height), plane.can_scale)
    notes += place_notes
    zero_copy = True
    if plane.must_cover and dst != Rect(0, 0, mode.width, mode.height):
        zero_copy = False
        notes.append(f"{output.card.driver}'s primary plane must cover the whole screen, so a "
                     f"{dst.w}x{dst.h} picture on {mode.width}x{mode.height} is copied (no zero "
                     "copy); a guest buffer of the mode's size or `mode: match-guest` avoids it")
    return src, dst, scaling, zero_copy, notes


@dataclass
class _PlanState:
    """One plan in the making. Each step of `plan` is a method that reads what the earlier steps
    decided and adds its own decisions: which output each policy monitor is bound to, which guest
    each guest rule binds, what each monitor shows, and the CRTC and plane matchings that must keep
    every shown monitor routable."""

    policy: Policy
    outputs: list[Output]
    # placements in the order they are served: highest priority first, ties in file order
    order: list[Placement] = field(init=False)
    rules_by_name: dict[str, MonitorRule] = field(init=False)
    bound: dict[str, Output] = field(default_factory=dict)  # policy monitor -> its output
    claimed: dict[_Key, str] = field(default_factory=dict)  # output -> the policy monitor bound to it
    running: list[Guest] = field(default_factory=list)
    guest_of: dict[str, Guest] = field(default_factory=dict)  # guest rule -> the running guest it binds
    crtcs: dict[str, _Matching] = field(default_factory=dict)  # per card path
    planes: dict[str, _Matching] = field(default_factory=dict)  # per card path
    shown: dict[str, _Shown] = field(default_factory=dict)  # policy monitor -> what it shows
    unplaced: list[Unplaced] = field(default_factory=list)
    dark_reason: dict[_Key, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.order = sorted(self.policy.placements, key=lambda p: (-p.priority, p.index))
        self.rules_by_name = {r.name: r for r in self.policy.monitors}

    # 1. and 2.: binding

    def bind_monitors(self) -> None:
        """Each monitor rule, in file order, takes the first output it matches that is still free."""
        for rule in self.policy.monitors:
            for out in self.outputs:
                k = _key(out)
                if k not in self.claimed and rule.matches(out):
                    self.bound[rule.name] = out
                    self.claimed[k] = rule.name
                    break

    def bind_guests(self, guests: Iterable[Guest]) -> None:
        self.running, self.guest_of = bind_guests(self.policy, guests)

    def unavailable(self, monitor: str, placement: Placement | None) -> str | None:
        """Why `monitor` cannot be taken now, or None after reserving a CRTC for it."""
        out = self.bound.get(monitor)
        if out is None:
            return "is absent"
        if monitor in self.shown:
            s = self.shown[monitor]
            return f"shows {s.guest.name if s.guest else 'a slate'}"
        if placement is not None and placement.seats and not (
                self.policy.seats_of(monitor, out) & set(placement.seats)):
            return "is outside the placement's seats"
        if not out.connector.modes:
            return "has no modes"
        matching = self.crtcs.setdefault(out.card.path, _Matching())
        if not matching.add(_key(out), _crtc_options(out)):
            return "has no free CRTC"
        return None

    # 3. runtime overrides, then main views by priority

    def show_overrides(self, overrides: Mapping[str, str]) -> None:
        running_rule = {g.name: r for r, g in self.guest_of.items()}
        for m, gname in overrides.items():
            rule = running_rule.get(gname)
            if rule is None or m not in self.bound or m in self.shown:
                continue
            if not may_show(self.policy, rule, m, self.bound[m]):
                self.unplaced.append(Unplaced(
                    gname, f"`directflip show` on {m}: outside the seats of its placements", monitor=m))
                continue
            why = self.unavailable(m, None)
            if why is None:
                self.shown[m] = _Shown(m, self.bound[m], self.guest_of[rule], override=True)
            else:
                self.unplaced.append(Unplaced(gname, f"`directflip show` on {m}: {m} {why}", monitor=m))

    def show_main_views(self) -> None:
        for p in self.order:
            guest = self.guest_of.get(p.guest)
            if guest is None:
                continue
            reasons = []
            for m in p.candidates:
                why = self.unavailable(m, p)
                if why is None:
                    self.shown[m] = _Shown(m, self.bound[m], guest)
                    break
                reasons.append(f"{m} {why}")
            else:
                self.unplaced.append(Unplaced(guest.name,
                                              "; ".join(reasons) or "no monitor of its seats is defined"))

    # 4. mirrors

    def show_mirrors(self) -> None:
        for p in self.order:
            guest = self.guest_of.get(p.guest)
            if guest is None:
                continue
            for m in p.mirror:
                if m in self.shown and self.shown[m].guest is guest:
                    continue  # the main view landed on this mirror: it is shown already
                why = self.unavailable(m, p)
                if why is None:
                    self.shown[m] = _Shown(m, self.bound[m], guest, mirror=True)
                else:
                    self.unplaced.append(Unplaced(guest.name, f"mirror {m} {why}", monitor=m))

    def report_unplaced_guests(self) -> None:
        """Running guests the policy does not place at all."""
        # by identity: two running guests may be equal as values (same name, kind and buffer)
        bound_guests = {id(g) for g in self.guest_of.values()}
        for g in self.running:
            if id(g) not in bound_guests:
                self.unplaced.append(Unplaced(g.name, "no guest rule of the policy matches it"))
        placed_rules = {p.guest for p in self.policy.placements}
        for rule_name, g in self.guest_of.items():
            if rule_name not in placed_rules:
                self.unplaced.append(Unplaced(g.name, f"guest `{rule_name}` has no placement"))

    # 5. slates on the monitors left over

    def show_slates(self, absent: Mapping[str, str]) -> None:
        waiting: dict[str, list[str]] = {}
        for p in self.order:
            if p.guest not in self.guest_of:
                for m in (*p.candidates, *p.mirror):
                    waiting.setdefault(m, []).append(p.guest)
        for rule in self.policy.monitors:
            m = rule.name
            if m not in self.bound or m in self.shown:
                continue
            why = self.unavailable(m, None)
            if why is not None:
                self.dark_reason[_key(self.bound[m])] = f"monitor {m} {why}"
                continue
            reason = _slate_reason(waiting.get(m, ()), absent)
            self.shown[m] = _Shown(m, self.bound[m], None, slate_reason=reason)

    # Per output: a plane, then mode and rectangles.

    def route_planes(self) -> list[_Routed]:
        """A plane for every shown monitor. Planes are matched in the order monitors were taken, so a
        higher priority guest is never left without a plane for a lower one; augmenting may still
        move an earlier output to another plane, so rectangles wait for the final matching."""
        crtc_of = {k: c for m in self.crtcs.values() for k, c in m.assigned().items()}
        routed = []
        for s in self.shown.values():
            r = self._route_plane(s, crtc_of[_key(s.output)])
            if r is not None:
                routed.append(r)
        return routed

    def _route_plane(self, s: _Shown, crtc: int) -> _Routed | None:
        out = s.output
        k = _key(out)
        guest, slate_reason = s.guest, s.slate_reason
        opts: list[int] = []
        if guest is not None:
            opts = _plane_options(out.card, crtc, guest.fourcc, guest.modifier)
            if not opts:
                slate_reason = _unsupported_format(guest, crtc)
                self.unplaced.append(Unplaced(guest.name, f"{s.monitor}: {slate_reason}",
                                              monitor=s.monitor if s.mirror else None))
                guest = None
        if guest is None:
            opts = _plane_options(out.card, crtc, SLATE_FOURCC, "LINEAR")
        if self.planes.setdefault(out.card.path, _Matching()).add(k, opts):
            return _Routed(s, guest, slate_reason, crtc)
        self.dark_reason[k] = f"monitor {s.monitor}: no plane free for CRTC {crtc}"
        if guest is not None:
            self.unplaced.append(Unplaced(guest.name, f"{s.monitor}: no plane free for CRTC {crtc}",
                                          monitor=s.monitor if s.mirror else None))
        return None

    def light(self, routed: list[_Routed]) -> dict[_Key, OutputAssignment]:
        """Mode and rectangles for every routed monitor, on the plane the final matching gave it."""
        plane_of = {k: p for m in self.planes.values() for k, p in m.assigned().items()}
        cards = {o.card.path: o.card for o in self.outputs}
        plane_by_id = {(c.path, p.id): p for c in cards.values() for p in c.planes}
        lit: dict[_Key, OutputAssignment] = {}
        for r in routed:
            k = _key(r.shown.output)
            lit[k] = self._light(r, plane_of[k], plane_by_id)
        return lit

    def _light(self, r: _Routed, plane_id: int,
               plane_by_id: Mapping[tuple[str, int], Plane]) -> OutputAssignment:
        s, guest = r.shown, r.guest
        out, rule = s.output, self.rules_by_name[s.monitor]
        buffer = (guest.width, guest.height) if guest is not None and guest.width and guest.height else None
        mode, mode_notes = choose_mode(rule, out, buffer)
        notes = list(mode_notes)
        slate = None
        zero_copy = True
        if guest is None:
            src = dst = Rect(0, 0, mode.width, mode.height)
            scaling, slate = "none", Slate(r.slate_reason, rule.slate.text, rule.slate.colour)
        else:
            if s.override:
                notes.append("shown here by `directflip show` (`directflip show --reset` clears it)")
            plane = plane_by_id[(out.card.path, plane_id)]
            src, dst, scaling, zero_copy, picture_notes = _picture(rule, out, mode, buffer, plane)
            notes += picture_notes
        return OutputAssignment(
            card=out.card.path, connector=out.connector.name, connector_id=out.connector.id,
            monitor=s.monitor, crtc_id=r.crtc, plane_id=plane_id, mode=mode,
            guest=guest.name if guest is not None else None, slate=slate, src=src, dst=dst,
            scaling=scaling, mirror=s.mirror and guest is not None, notes=tuple(notes),
            zero_copy=zero_copy)

    def assignment(self, lit: Mapping[_Key, OutputAssignment]) -> Assignment:
        """Every present output in its order, lit or dark with the reason."""
        result, dark = [], []
        for out in self.outputs:
            k = _key(out)
            if k in lit:
                result.append(lit[k])
            else:
                reason = self.dark_reason.get(k, "not in the policy")
                conn = out.connector
                dark.append(DarkOutput(out.card.path, conn.name, conn.id, self.claimed.get(k), reason))
        return Assignment(tuple(result), tuple(dark), tuple(self.unplaced))


def plan(policy: Policy, outputs: Iterable[Output], guests: Iterable[Guest],
         overrides: Mapping[str, str] | None = None, absent: Mapping[str, str] | None = None) -> Assignment:
    """Assign the running `guests` to the present `outputs` following `policy`. Pure.

    `overrides` (monitor → running guest's name, from `directflip show` and the next-guest hotkey)
    come before every placement: the guest is shown on that monitor as well as wherever its own
    placement puts it, provided its placements' `seats` allow the monitor (see `may_show`). An
    override of a guest that is not running, or of an absent monitor, waits.

    `absent` (guest name → why) says why a guest that is not running cannot be (its VMM holds its vGPU):
    a monitor waiting for it shows that on its slate instead of "office is not running"."""
    state = _PlanState(policy, list(outputs))
    state.bind_monitors()
    state.bind_guests(guests)
    state.show_overrides(overrides or {})
    state.show_main_views()
    state.show_mirrors()
    state.report_unplaced_guests()
    state.show_slates(absent or {})
    routed = state.route_planes()
    return state.assignment(state.light(routed))
