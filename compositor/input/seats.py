"""The compositor's input, whole: a router per policy seat, the devices that feed them, the plan that
tells each router what its monitors show.

    SeatDevices ──events──▶ SeatRouter (one per policy seat) ──▶ the shown guest's InputSink
         ▲                        ▲
    udev, session            plan_applied(assignment): views of each seat's monitors

The daemon owns one SeatInput. It calls `plan_applied` after every plan it applies, `policy_changed`
after every valid policy edit, `pause`/`resume` with the session, and hands hotkey actions to its
`actions` callback (a router reports them; the daemon acts, since next-guest changes the plan).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from compositor.input.devices import IMPLICIT_SEAT, SeatDevices
from compositor.input.router import SeatRouter, View
from compositor.input.sink import InputSink
from compositor.planner import Assignment
from compositor.policy import Policy

log = logging.getLogger("directflip.input")


def seat_monitors(policy: Policy, card_seat: Mapping[str, str],
                  assignment: Assignment) -> dict[str, list[str]]:
    """Policy seat → the monitors of the plan it owns, in the seat's order (its `monitors`, then those
    it takes through `logind`, in policy order). A policy without seats has one seat of every monitor."""
    lit = {o.monitor: o for o in assignment.outputs}
    order = [m.name for m in policy.monitors if m.name in lit]
    if not policy.seats:
        return {IMPLICIT_SEAT: order}
    out: dict[str, list[str]] = {}
    for seat in policy.seats:
        mons = [m for m in seat.monitors if m in lit]
        mons += [m for m in order if m not in mons and card_seat.get(lit[m].card) in seat.logind
                 and not policy.monitor_seats.get(m)]
        out[seat.name] = mons
    return out


class SeatInput:
    def __init__(self, *, session_kind: str, logind_seat: str | None,
                 take: Callable[[str], Any], give_back: Callable[[str, int], Any],
                 sink_of: Callable[[str], InputSink | None],
                 actions: Callable[[str, str, object], None],
                 pointer_moved: Callable[[str, int, int], None] | None = None) -> None:
        self.sink_of = sink_of
        self.pointer_moved = pointer_moved
        self.actions = actions  # (policy seat, action, argument)
        # Ctrl+Alt+Fn: a grabbed keyboard (direct) or logind's K_OFF keyboard mode leaves the console
        # unable to switch VTs itself, so the compositor does it (logind: Seat.SwitchTo)
        self.vt_keys = session_kind in ("direct", "logind")
        self.routers: dict[str, SeatRouter] = {}
        self.devices = SeatDevices(logind_seat=logind_seat, grab=session_kind == "direct", take=take,
                                   give_back=give_back, router_of=self.routers.get)
        self.policy: Policy | None = None
        self.paused_why: str | None = None

    async def start(self, policy: Policy) -> None:
        self.policy = policy
        self._ensure_routers(policy)
        await self.devices.start(policy.seats)

    def _ensure_routers(self, policy: Policy) -> None:
        names = [s.name for s in policy.seats] or [IMPLICIT_SEAT]
        positions = {m.name: m.position for m in policy.monitors}
        for name in names:
            if name not in self.routers:
                self.routers[name] = SeatRouter(
                    name, sink_of=self.sink_of, actions=lambda a, arg, seat=name: self.actions(seat, a, arg),
                    hotkeys=policy.hotkey_list(), positions=positions, vt_keys=self.vt_keys,
                    pointer_moved=self.pointer_moved)
        for name in list(self.routers):
            if name not in names:
                self.routers.pop(name).release_all("its seat left the policy")

    def policy_changed(self, policy: Policy) -> None:
        self.policy = policy
        self._ensure_routers(policy)
        self.devices.set_seats(policy.seats)

    def plan_applied(self, assignment: Assignment, card_seat: Mapping[str, str]) -> None:
        if self.policy is None:
            return
        positions = {m.name: m.position for m in self.policy.monitors}
        by_monitor = {o.monitor: o for o in assignment.outputs}
        for seat, monitors in seat_monitors(self.policy, card_seat, assignment).items():
            router = self.routers.get(seat)
            if router is None:
                continue
            views = []
            for m in monitors:
                o = by_monitor[m]
                views.append(View(m, o.mode.width, o.mode.height, o.guest, o.src, o.dst))
            router.set_views(views, positions, self.policy.hotkey_list())

    def guest_changed(self) -> None:
        """A guest came, went, or changed how it wants the pointer: drop what a departed one held."""
        for router in self.routers.values():
            router.set_views(list(router.views.values()))

    def router_for_monitor(self, monitor: str) -> SeatRouter | None:
        return next((r for r in self.routers.values() if monitor in r.views), None)

    def focus(self, monitor: str) -> SeatRouter:
        router = self.router_for_monitor(monitor)
        if router is None:
            raise KeyError(monitor)
        router.focus(monitor)
        return router

    def pause(self, why: str) -> None:
        self.paused_why = why
        self.devices.pause(why)

    def resume(self) -> None:
        self.paused_why = None
        self.devices.resume()

    def set_grabbed(self, seat: str, grabbed: bool) -> None:
        """release-input: the seat's devices let go (the console and other readers see them again),
        though the hotkey still works since we keep reading them."""
        router = self.routers.get(seat)
        if router is None:
            return
        router.set_grabbed(grabbed)
        for dev in self.devices.devices.values():
            if dev.seat == seat:
                if grabbed and not self.devices.paused:
                    self.devices._grab(dev)
                else:
                    self.devices._ungrab(dev)
        log.info("seat %s: input %s", seat, "taken again" if grabbed else "released")

    async def close(self) -> None:
        for router in self.routers.values():
            router.release_all("the compositor stops")
        await self.devices.close()

    def status(self) -> dict[str, Any]:
        from compositor.stats import percentile

        route = list(self.devices.route_ns)
        return {"paused": self.paused_why,
                # evdev read → the calls to the guests made (their messages written, D-Bus calls queued)
                "route_us": {q: (round(percentile(route, p) / 1000, 1) if route else None)
                             for q, p in (("p50", 0.5), ("p99", 0.99))},
                "seats": {name: r.status() for name, r in self.routers.items()},
                "devices": self.devices.status()}


async def open_direct(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


async def close_direct(path: str, fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
