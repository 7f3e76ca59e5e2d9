"""`directflip run`: the compositor daemon.

One asyncio loop over every fd: each card's DRM fd (flip events), the frame socket (guests), the
policy file's inotify watch, the control socket and signals. Frames take the short road: a guest's
flip goes straight to the scanout pipelines showing that guest and never waits for anything else.
Topology changes take the long road: a policy edit, a guest arriving or leaving, or a guest changing
its framebuffer size re-runs the planner, and `apply()` touches only the outputs whose assignment
changed (waiting for their in-flight flip first, so a CRTC never has two commits in flight).

Buffer lifetime. A guest may draw into a buffer again once it is told `released`. A buffer is held
while it is the guest's latest frame (so a monitor that turns to the guest later can show it) and
while any pipeline has it pending, in flight or on screen; the count reaching zero releases it. A
buffer the guest forgets, or every buffer of a guest that disconnects, is freed (framebuffers removed,
dma-buf closed) once nothing holds it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from compositor import capture as readback
from compositor import fdguard, launched, planner, topology
from compositor.capture import CaptureError
from compositor.formats import ARGB8888, fourcc_name, modifier_name
from compositor.guests import GuestRegistry, GuestState, deciding_rules
from compositor.input.seats import SeatInput
from compositor.input.sink import InputSink
from compositor.kms import Card, DeviceError, FlipEvent, KmsError, list_cards
from compositor.notify import NOTIFY_ENV, Notifier
from compositor.output import OutputLayer
from compositor.planner import Assignment, Guest, OutputAssignment
from compositor.policy import GuestRule, Policy
from compositor.probe import SCHEMA, probe_card
from compositor.scanout import ScanoutPipeline
from compositor.session import DirectSession, MasterTaken, Session, SessionError, make_session
from compositor.sources import vfio
from compositor.sources.frame import BadPlane, Buffer, Frame, Pointer
from compositor.sources.framesocket import (
    DEFAULT_FRAME_SOCKET,
    DEFAULT_LIMITS,
    FrameSocketServer,
    GuestConnection,
    Limits,
    Peer,
    Refused,
    socket_paths,
)
from compositor.sources.qemu_dbus import QemuDisplaySource, QemuFrame, QemuTarget
from compositor.sources.vfio import VFIO_GFX_PLANE_TYPE_DMABUF, VfioDevice, VfioError, VfioGuest
from compositor.watch import PolicyWatcher

log = logging.getLogger("directflip.daemon")

DEFAULT_CONTROL_SOCKET = socket_paths(None)[1]


def free_overlay(planes, used: set[int], crtc, keep=None):
    """An overlay plane of `crtc` that takes ARGB8888 and is not in `used` (plane ids): `keep` when
    it still qualifies (a cursor or label stays where it is), else the first, else None."""
    free = [p for p in planes if p.type == "overlay" and p.id not in used and crtc in p.possible_crtcs
            and p.supports(ARGB8888)]
    return keep if keep in free else (free[0] if free else None)


def card_seat(path: str) -> str:
    """The logind seat a card belongs to: udev's ID_SEAT, seat0 when it has none."""
    import pyudev

    try:
        dev = pyudev.Devices.from_device_file(pyudev.Context(), path)
    except (pyudev.DeviceNotFoundError, OSError, ValueError) as exc:
        log.debug("%s: no udev record (%s): taking it as seat0", path, exc)
        return topology.DEFAULT_SEAT
    return dev.properties.get("ID_SEAT") or topology.DEFAULT_SEAT


def status_line(shown: Sequence[tuple[str, str | None, str]], *, failed: Sequence[str] = (),
                not_shown: Sequence[str] = (), paused: Mapping[str, str] | None = None,
                limit: int = 6) -> str:
    """The one-line summary for sd_notify's STATUS= (what `systemctl status` prints) and the log of
    each plan: `3 lit: office→left zero-copy, media→centre copy, right slate`.

    `shown`: (monitor, guest or None, path) of each lit output of the cards not paused, in plan order;
    `failed`: monitors that could not be lit; `not_shown`: connected guests on no monitor; `paused`:
    card → why the session does not let us commit to it. Past `limit` outputs the rest are counted,
    not named: the line has to fit a terminal row, and `directflip status` has the full story."""
    items = [f"{guest}→{monitor} {path}" if guest else f"{monitor} {path}" for monitor, guest, path in shown]
    items += [f"{monitor} failed" for monitor in failed]
    if len(items) > limit:
        items = items[:limit] + [f"+{len(items) - limit} more"]
    parts = []
    if items:
        parts.append(f"{len(shown)} lit: " + ", ".join(items))
    elif not paused:
        parts.append("nothing lit")
    if not_shown:
        parts.append("not shown: " + ", ".join(not_shown))
    if paused:
        if items:  # some monitors show, so say which card does not
            parts.append("paused: " + ", ".join(f"{card} ({reason})" for card, reason in paused.items()))
        else:  # nothing shows: the reason is the news (the same for every card after a VT switch)
            parts.append("paused: " + ", ".join(dict.fromkeys(paused.values())))
    return "; ".join(parts)


@functools.cache
def running_version() -> str:
    """directflip's version for status: the installed distribution's, else the package's own."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("directflip")
    except PackageNotFoundError:  # a checkout run without being installed
        import compositor

        return str(getattr(compositor, "__version__", "unknown"))


class Daemon:
    def __init__(self, policy_path: str | Path, *, frame_socket: str = DEFAULT_FRAME_SOCKET,
                 control_socket: str = DEFAULT_CONTROL_SOCKET, cards: list[str] | None = None,
                 native: bool = True, seat: str | None = None, session: Session | None = None,
                 input: bool = True, data_plane: bool = True, limits: Limits = DEFAULT_LIMITS) -> None:
        self.policy_path = Path(policy_path)
        self.limits = limits   # what frame-socket clients may hold (compositor.sources.framesocket.Limits)
        self.seat = seat
        self.session = session if session is not None else DirectSession(None)
        self.session.on_pause = self._pause_card
        self.session.on_resume = self._resume_card
        self.card_seats: dict[str, str] = {}
        self.frame_socket_path = frame_socket
        self.control_socket_path = control_socket
        self.card_paths = cards
        self.native = native
        # The native data plane (compositor.dataplane): with data_plane (and native), a C thread
        # carries the frames of frame-socket guests (version 2) that are shown zero copy; the
        # pipelines hand their CRTCs to it once settled and take them back for anything else.
        self.use_dataplane = data_plane and native
        # Who is connected, their buffers and their holds (compositor.guests); holds of buffers on
        # the data plane are counted there.
        self.registry = GuestRegistry(self._drop_buffer)
        self._dp_cards: dict[int, Card] = {}        # data-plane card index → Card
        self._vgpus: dict[int, GuestState] = {}     # data-plane connection → a vGPU it can poll
        self._local_sources: dict[int, GuestState] = {}   # ... → a QEMU display whose frames go there
        self.watcher = PolicyWatcher(self.policy_path, self._policy_changed)  # raises on a bad policy
        self.cards: dict[str, Card] = {}
        self.layers: dict[str, OutputLayer] = {}   # each card's output layer, by its path
        self.topology: topology.Topology | None = None
        self._shown_by: dict[str, list[ScanoutPipeline]] | None = None   # guest -> pipelines (_showing)
        self.pipelines: dict[tuple[str, str], ScanoutPipeline] = {}
        self.failed: dict[tuple[str, str], str] = {}   # outputs the last apply could not light, and why
        self.assignment = Assignment(())
        self.frames: FrameSocketServer | None = None
        self.control = None
        self._replan_task: asyncio.Task | None = None
        self._replan_again = False
        self._apply_lock = asyncio.Lock()
        # The copy rung's copies run here, off the loop: two workers, as two outputs may copy at once.
        self.copier = ThreadPoolExecutor(max_workers=2, thread_name_prefix="copy")
        self._stopped: asyncio.Event | None = None
        self._stopping = False
        self.applied_generation = -1  # the policy generation the screens show, and since when
        self.applied_ns = 0
        self.loaded_ns = 0  # when the watcher handed over the last valid edit
        self.plans = 0
        self.vfio_tasks: dict[str, asyncio.Task] = {}
        # The QEMU displays this instance connects to itself (`kind: qemu-dbus` with a `display`),
        # by guest name: each reconnects while its VM is away, until its policy entry goes.
        self.qemu_sources: dict[str, QemuDisplaySource] = {}
        self.hotplug = None
        self.hotplugs = 0  # re-probes done for udev events
        self.launched: dict[str, subprocess.Popen] = {}  # VMMs this process started (reaped here)
        # Every launched VMM known, this process's and an earlier one's: they outlive the compositor
        # (compositor.launched); and why one could not be re-attached after a restart.
        self.launch_records = launched.Registry(Path(control_socket).parent / "launched")
        self.vmms: dict[str, launched.Launched] = {}
        self.reattach_errors: dict[str, str] = {}
        self.notifier: Notifier | None = None
        self.started_ns = time.monotonic_ns()  # CLOCK_MONOTONIC at start, for the uptime in status
        self.status_text: str | None = None  # the last STATUS= the service manager took
        self._status_pending = False  # a refresh of STATUS= is scheduled
        self.want_input = input
        self.input: SeatInput | None = None
        self.own_input_names: set[str] = set()  # uinput devices made for launched guests
        self._labelled: dict[tuple[str, str], str | None] = {}  # output → the guest last named on it
        self._label_timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        # `directflip show` and the next-guest hotkey: monitor → guest, before every placement
        self.overrides: dict[str, str] = {}

    @property
    def policy(self) -> Policy:
        return self.watcher.policy

    @property
    def guests(self) -> dict[str, GuestState]:
        return self.registry.guests

    @property
    def departed(self) -> list[GuestState]:
        """Disconnected guests whose buffers are still held."""
        return self.registry.departed

    @property
    def dataplane(self):
        return self.registry.dataplane

    @dataplane.setter
    def dataplane(self, dataplane) -> None:
        self.registry.dataplane = dataplane

    # --- start and stop ---------------------------------------------------------------------------

    async def open_cards(self) -> None:
        """Open the display cards of this instance's seat (every seat without --seat) through the
        session. A card that is not a display card is skipped; one that cannot become master stops
        the start (another display server owns it)."""
        paths = self.card_paths if self.card_paths is not None else list_cards()
        for path in paths:
            seat = card_seat(path)
            if self.seat is not None and seat != self.seat:
                log.info("%s: belongs to %s, not %s: not touched", path, seat, self.seat)
                continue
            try:
                card = await self.session.open_card(path)
            except MasterTaken:
                raise
            except (DeviceError, KmsError, SessionError) as exc:
                log.info("%s: not used: %s", path, exc)
                continue
            self.card_seats[path] = seat
            self.cards[path] = card
            self.layers[path] = OutputLayer(card, native=self.native)
            card.flip_handlers.append(lambda ev, path=path: self._flip_event(path, ev))
            log.info("%s (%s): %d connectors, %d CRTCs, %d planes", path, card.driver,
                     len(card.connectors), len(card.crtcs), len(card.planes))
        if not self.cards:
            where = f" of {self.seat}" if self.seat is not None else ""
            raise DeviceError(f"no display card{where} with CRTCs and planes under /dev/dri")

    def read_topology(self) -> topology.Topology:
        for card in self.cards.values():
            card.refresh()
        doc = {"schema": SCHEMA, "cards": [{**probe_card(card), "seat": self.card_seats.get(path)}
                                           for path, card in self.cards.items()]}
        return topology.from_probe(doc, "the live cards")

    def reset_outputs(self, cards: list[Card] | None = None) -> None:
        """The first commit after gaining master ("reset the world", OutputLayer.reset) on each card
        (all of them by default) that the session has not paused."""
        for card in cards if cards is not None else self.cards.values():
            if card.path not in self.session.paused:
                self.layers[card.path].reset()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self.started_ns = time.monotonic_ns()
        try:
            self.notifier = Notifier.from_env()   # a bad $NOTIFY_SOCKET or $WATCHDOG_USEC stops us early
        except ValueError as exc:
            raise SessionError(f"the service manager's environment: {exc}") from None
        await self.session.start()
        try:
            await self.open_cards()
        except BaseException:
            await self.session.close()
            raise
        if self.use_dataplane:
            from compositor.dataplane import DataPlane
            self.dataplane = DataPlane()
            self.dataplane.start()
            loop.add_reader(self.dataplane.fileno(), self._dataplane_events)
            log.info("data plane: frame-socket guests shown zero copy are flipped by its thread")
        for card in self.cards.values():
            card.attach(loop, self.dataplane)
            if card.dp_card >= 0:
                self._dp_cards[card.dp_card] = card
        self.topology = self.read_topology()
        self.reset_outputs()
        os.makedirs(os.path.dirname(self.frame_socket_path) or ".", exist_ok=True)
        self.frames = FrameSocketServer(self.frame_socket_path, self, limits=self.limits)
        _descriptor_budget(self.limits)
        self.frames.dataplane = self.dataplane
        self.frames.start(loop)
        from compositor.control import ControlServer
        self.control = ControlServer(self.control_socket_path, self)
        await self.control.start()
        self.watcher.start(loop)
        try:
            from compositor.hotplug import HotplugMonitor
            self.hotplug = HotplugMonitor(self._hotplug)
            self.hotplug.start(loop)
        except OSError as exc:
            log.error("no udev monitor (%s): monitors plugged or unplugged will not be noticed", exc)
        self.open_vfio_guests()
        self.open_qemu_guests()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopped.set)
        loop.add_signal_handler(signal.SIGHUP, self.watcher.reload_soon)
        await self.apply(self.plan())
        await self.start_input()
        await self.session.activate()
        self.status_text = self.status_line()
        self.notifier.ready(self.status_text)
        self.notifier.start_watchdog(loop)
        log.info("serving: frame socket %s, control socket %s, policy %s", self.frame_socket_path,
                 self.control_socket_path, self.policy_path)
        print(f"directflip: running (policy {self.policy_path}, frame socket {self.frame_socket_path}, "
              f"control socket {self.control_socket_path})", flush=True)
        try:
            await self._stopped.wait()
        finally:
            await self.shutdown()

    def stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    async def shutdown(self) -> None:
        """Leave a clean state: no guest buffer on any plane, every output off, every framebuffer
        and buffer freed, master dropped (the console comes back when the fd closes)."""
        log.info("shutting down")
        self._stopping = True
        if self.notifier is not None:
            self.notifier.stopping()
            self.notifier.stop_watchdog()
        self.watcher.stop()
        if self.hotplug is not None:
            self.hotplug.stop()
        if self.control is not None:
            await self.control.close()
        if self.input is not None:
            await self.input.close()   # every held key is released in its guest first
        async with self._apply_lock:
            for key, pipe in list(self.pipelines.items()):
                await self._idle(pipe)
                pipe.stop(commit=not pipe.suspended)
                del self.pipelines[key]
                self._shown_by = None
        if self.frames is not None:
            self.frames.close()
        if self.dataplane is not None:
            self._dataplane_events()   # buffers it freed as their guests went
            asyncio.get_running_loop().remove_reader(self.dataplane.fileno())
            self.dataplane.close()   # before the cards close: its thread reads their fds
            self.dataplane = None
        for task in self.vfio_tasks.values():
            task.cancel()
        for name, rec in self.vmms.items():
            if rec.alive():   # a VM keeps running when its viewer goes
                log.info("guest %s: its VMM (pid %d%s) keeps running", name, rec.pid,
                         f", {rec.scope}" if rec.scope else "")
        self.registry.close_all("compositor shutting down")   # a frame-socket guest's was, just above
        self.copier.shutdown(wait=True)   # the pipelines settled their copies as they stopped
        for path in self.cards:
            self.layers[path].fbcache.clear()
        await self.session.close()   # drops master, closes the cards, gives the VT back
        self.cards.clear()
        self.layers.clear()
        fdguard.QUARANTINE.stop()   # no close of a guest's descriptor may keep the process from ending

    # --- planning -------------------------------------------------------------------------------

    def plan(self) -> Assignment:
        assert self.topology is not None
        self.plans += 1
        return planner.plan(self.policy, self.topology.outputs(), [gs.guest for gs in self.guests.values()],
                            self.overrides, self.reattach_errors)

    def replan(self) -> None:
        """Re-plan soon (coalescing bursts of changes) and apply the difference."""
        if self._stopping:
            return
        if self._replan_task is not None and not self._replan_task.done():
            self._replan_again = True
            return
        self._replan_task = asyncio.get_running_loop().create_task(self._replan())

    async def _replan(self) -> None:
        while True:
            self._replan_again = False
            try:
                await self.apply(self.plan())
            except Exception:  # noqa: BLE001 — a planning bug must not stop the frames of others
                log.exception("re-planning failed")
            if not self._replan_again:
                return

    def _policy_changed(self, policy: Policy) -> None:
        self.loaded_ns = time.monotonic_ns()
        log.info("policy generation %d: re-planning", self.watcher.generation)
        self.open_vfio_guests()
        self.open_qemu_guests()
        if self.input is not None:
            self.input.policy_changed(policy)
        self.replan()

    async def apply(self, assignment: Assignment) -> None:
        """Make the screens show `assignment`, touching only outputs whose assignment changed."""
        async with self._apply_lock:
            if self._stopping:
                # shutdown() took the outputs down while this waited for the lock: a plan made
                # before would light them again on cards about to close
                return
            # Outputs of a paused card are left as they are: resuming re-takes them all.
            paused = self.session.paused
            new = {(o.card, o.connector): o for o in assignment.outputs if o.card not in paused}
            old_keys = {key for key in self.pipelines if key[0] not in paused}
            present = {(o.card.path, o.connector.name) for o in self.topology.outputs()}
            self._take_back_changing(new, old_keys)
            changed = await self._turn_off(old_keys - set(new), present)
            for key, out in new.items():
                pipe = self.pipelines.get(key)
                if pipe is not None and pipe.out == out and key not in self.failed:
                    continue
                changed += 1
                await self._light(key, out, pipe)
            for dark in assignment.dark:
                self.failed.pop((dark.card, dark.connector), None)
            self.assignment = assignment
            if self.applied_generation != self.watcher.generation:
                self.applied_generation = self.watcher.generation
                self.applied_ns = time.monotonic_ns()
            if changed:
                # What each monitor shows now, in one line: the journal's record of every plan.
                log.info("applied plan %d: %d output(s) changed; %s", self.plans, changed, self.status_line())
            self._follow_plan(assignment)

    async def _turn_off(self, keys: set[tuple[str, str]], present: set[tuple[str, str]]) -> int:
        """Stop the pipelines of outputs the plan no longer lights; returns how many."""
        for key in keys:
            pipe = self.pipelines.pop(key)
            self._shown_by = None
            if key in present:
                await self._idle(pipe)
            else:
                # Unplugged: a flip in flight on a connector that is gone may never complete
                # (virtio-gpu drops it); waiting for it would only hold up the failover.
                pipe.abandon_in_flight()
            pipe.stop()
            log.info("%s: off", pipe.name)
        return len(keys)

    async def _light(self, key: tuple[str, str], out: OutputAssignment, pipe: ScanoutPipeline | None) -> None:
        """Light the output `key` as `out` says: a new pipeline, or `pipe` reconfigured. An output the
        card refuses is recorded in `failed` and left dark."""
        first = self._first_frame(out)
        try:
            if pipe is None:
                pipe = ScanoutPipeline(self.layers[out.card], out, release=self.registry.release,
                                       present=self.registry.present, copier=self.copier)
                self.pipelines[key] = pipe
                self._shown_by = None
                pipe.on_path_change = self._status_changed
                pipe.dataplane = self.dataplane
                pipe.dp_buffer = self.registry.dp_buffers.get
                pipe.paused = True
                pipe.start(first)
            else:
                pipe.paused = True
                await self._idle(pipe)
                self._shown_by = None   # it may show another guest from here on
                pipe.reconfigure(out, first)
            self.failed.pop(key, None)
        except (KmsError, OSError) as exc:
            log.error("%s:%s (%s): cannot light it: %s", out.card, out.connector, out.monitor, exc)
            self.failed[key] = str(exc)
            if pipe is None and first is not None:
                self.registry.release(first)   # no pipeline took it (a pipeline releases its own)
            if pipe is not None:
                pipe.stop()
                self.pipelines.pop(key, None)
                self._shown_by = None
        finally:
            if pipe is not None:
                pipe.paused = False
                pipe.resume()

    def _follow_plan(self, assignment: Assignment) -> None:
        """What follows a new plan once its outputs are lit: buffers, EDIDs and sizes for the guests,
        input, then the cosmetic cursors and name labels, and the status for watchers."""
        self.registry.sweep()
        self._pass_edids()
        self._tell_sizes()
        if self.input is not None:  # input follows the plan first; names and cursors are cosmetic
            self.input.plan_applied(assignment, self.card_seats)
        self._assign_label_planes()
        for gs in {id(g): g for p in self.pipelines.values()
                   if p.out.guest and (g := self.guests.get(p.out.guest)) is not None}.values():
            if gs.cursor is not None:
                self._push_cursor(gs)
        for key, pipe in self.pipelines.items():
            if pipe.out.guest != self._labelled.get(key):
                self._labelled[key] = pipe.out.guest
                if pipe.out.guest is not None:
                    self._show_label(key, pipe, pipe.out.guest)
        self._send_status()

    def _first_frame(self, out: OutputAssignment) -> Frame | None:
        gs = self.guests.get(out.guest) if out.guest else None
        latest = self.registry.latest(gs) if gs is not None else None
        if latest is None:
            return None
        self.registry.hold(gs, latest.buffer)  # the pipeline's hold; released through _release
        return latest

    async def _idle(self, pipe: ScanoutPipeline, timeout: float = 1.0) -> None:
        """Wait until the pipeline has no flip in flight (its event can be lost only to a driver bug:
        after `timeout` the commit is taken as done). A pipeline on the data plane is taken back
        first: its flip in flight, if any, is then the pipeline's to wait for."""
        self._take_back(pipe.out.guest)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while pipe.in_flight is not None:
            if loop.time() > deadline:
                log.error("%s: no flip event within %.1fs; assuming the flip completed", pipe.name, timeout)
                pipe.abandon_in_flight()
                break
            await asyncio.sleep(0.002)

    # --- flip events ------------------------------------------------------------------------------

    def _showing(self, guest: str) -> list[ScanoutPipeline]:
        """The pipelines showing `guest` (its main view first, then mirrors): an index rebuilt only
        after the outputs changed (every place that adds, removes or reconfigures a pipeline sets
        `_shown_by` to None), so a frame or flip event never scans every output."""
        if self._shown_by is None:
            index: dict[str, list[ScanoutPipeline]] = {}
            for p in sorted(self.pipelines.values(), key=lambda p: p.out.mirror):
                if p.out.guest is not None:
                    index.setdefault(p.out.guest, []).append(p)
            self._shown_by = index
        return self._shown_by.get(guest, [])

    def _flip_event(self, card_path: str, event) -> None:
        layer = self.layers.get(card_path)
        pipe = layer.route(event) if layer is not None else None
        if pipe is not None and self.dataplane is not None and pipe.out.guest is not None:
            self._hand_over(pipe.out.guest)

    # --- the data plane ---------------------------------------------------------------------------

    def _dataplane_events(self) -> None:
        """What the data plane reports, in a batch: guests' bytes it handed over, connections it
        closed, flip events of Python's commits, buffers nothing holds any more, failed commits."""
        if self.dataplane is None:
            return
        for ev in self.dataplane.events():
            # One event that fails must not lose the others of the batch (a buffer to free among them).
            try:
                self._dataplane_event(ev)
            except Exception:
                log.exception("data plane event %s failed", ev)

    def _dataplane_event(self, ev) -> None:
        from compositor import dataplane as dpm
        if ev.kind == dpm.DATA and ev.handle in self._vgpus:
            self._vgpu_handed_back(self._vgpus[ev.handle], ev.a)
        elif ev.kind in (dpm.DATA, dpm.CLOSED, dpm.DRAINED):
            if self.frames is not None:
                self.frames.dataplane_event(ev)
        elif ev.kind == dpm.FLIP:
            card = self._dp_cards.get(ev.card)
            if card is not None:
                card.deliver([FlipEvent(ev.crtc, ev.sequence, ev.timestamp_ns, ev.user_data)])
        elif ev.kind == dpm.FREED:
            self.registry.freed(ev.handle)
        elif ev.kind == dpm.ERROR:
            pipe = next((p for p in self.pipelines.values() if p.dp_output == ev.handle), None)
            log.error("%s: flip failed: %s", pipe.name if pipe else f"data-plane output {ev.handle}",
                      os.strerror(ev.a))
            if pipe is not None:
                # What the plane shows is then not the guest's latest frame: the daemon commits the
                # guest's next frame itself, redraws in place included, until it hands over again.
                self._take_back(pipe.out.guest)

    def _hand_over(self, guest: str) -> None:
        """Give the data plane every output of `guest`, if each is ready (dp_ready): all or none, so
        a guest and its mirrors see the same frames."""
        conn = self.registry.dp_conn(guest)
        if conn < 0 or self._apply_lock.locked():   # a plan being applied: after it
            return
        pipes = self._showing(guest)
        if not pipes or not all(p.dp_ready() for p in pipes):
            return
        try:
            for pipe in pipes:
                pipe.hand_over(conn)
            self.dataplane.conn_show(conn)   # all at once: its mirrors see the same frames
        except (OSError, KmsError) as exc:
            log.warning("guest %s: the data plane cannot take its outputs (%s): flipped from Python",
                        guest, exc)
            self._take_back(guest)
            return
        log.debug("guest %s: %d output(s) on the data plane", guest, len(pipes))
        gs = self._vgpus.get(conn)
        if gs is not None:
            self._vgpu_to_dataplane(gs)

    def _take_back_changing(self, new: dict, old_keys: set) -> None:
        """Before a plan is applied: every guest whose outputs change (the one leaving an output, the
        one coming to it, with all their other outputs) is committed from Python, so nothing the
        apply does races the data plane's commits, and a first frame read for a new output is the
        frame the guest's other outputs show."""
        if self.dataplane is None:
            return
        for key in old_keys:
            pipe = self.pipelines[key]
            if new.get(key) != pipe.out or key in self.failed:
                self._take_back(pipe.out.guest)
                pipe.take_back()
        for key, out in new.items():
            pipe = self.pipelines.get(key)
            if pipe is None or pipe.out != out or key in self.failed:
                self._take_back(out.guest)

    def _take_back(self, guest: str | None) -> None:
        """Every output of `guest` committed from Python again."""
        if self.dataplane is None or guest is None:
            return
        for pipe in self._showing(guest):
            pipe.take_back()

    def on_dataplane(self, conn: GuestConnection) -> None:
        """The data plane serves `conn` from now on: its buffers and its latest frame go there."""
        self.registry.adopt(conn)

    # --- guests (the frame socket's handler) ------------------------------------------------------

    def may_connect(self, uid: int) -> str | None:
        """Checked as a frame-socket client connects, before it may send anything: None if `uid` may be
        some guest of the policy (hello then checks the name), else why not."""
        default = {0, os.getuid()}   # a name no rule matches, or a rule without `users`
        allowed = set(default)
        for rule in self.policy.guests:
            if not rule.opened_here:
                allowed |= default if rule.uids is None else set(rule.uids)
        if uid in allowed:
            return None
        return f"uid {uid} may be no guest of this policy (no guest rule lists it in users:)"

    def on_hello(self, conn: GuestConnection) -> None:
        own = next((r.opened_here for r in self.policy.guests
                    if r.opened_here and r.pattern.matches(conn.name)), None)
        self.registry.admit(conn, *deciding_rules(self.policy.guests, conn.name, conn.uuid), own)
        log.info("guest %s connected (pid %d, uid %d)", conn.name, conn.peer.pid, conn.peer.uid)
        self._status_changed()  # not shown anywhere until its first frame is planned: say so

    def on_buffer(self, conn: GuestConnection, buffer: Buffer) -> None:
        log.debug("guest %s: buffer %d: %s", conn.name, buffer.id, buffer.info.describe())
        if self.dataplane is not None and conn.dp_conn >= 0:
            self.registry.register(conn, buffer)

    def on_flip(self, conn: GuestConnection, frame: Frame) -> None:
        gs = self.guests[conn.name]
        gs.flips += 1
        info = frame.buffer.info
        on_dp = frame.buffer.dp_handle >= 0 and self.dataplane is not None
        latest = self.registry.latest(gs) if on_dp else gs.latest
        # The planner's view of the guest changes only with its buffer's layout: look only then.
        if latest is None or info != latest.buffer.info:
            guest = replace(gs.guest, width=info.width, height=info.height, fourcc=fourcc_name(info.fourcc),
                            modifier=modifier_name(info.modifier))
        else:
            guest = gs.guest
        if on_dp:
            if self._flip_on_dataplane(gs, frame, guest != gs.guest):
                return
        else:
            self.registry.new_latest(gs, frame)
        gs.latest = frame
        if guest != gs.guest:
            first = gs.guest.width is None
            gs.guest = guest
            log.info("guest %s: %s framebuffer %s", conn.name, "first" if first else "new", info.describe())
            self.replan()
            return  # the new plan shows it (and later frames go through the pipelines)
        for pipe in self._showing(conn.name):
            self.registry.hold(gs, frame.buffer)
            pipe.submit(frame)

    def _flip_on_dataplane(self, gs: GuestState, frame: Frame, new_layout: bool) -> bool:
        """A flip of a data-plane guest that its thread handed over (the first of a buffer on an
        output, a new layout, an output not on the data plane). True when the data plane shows it
        after all (the buffer's framebuffers added); else the guest's outputs are taken back and the
        data plane holds the frame as the guest's latest, and on_flip goes on as for any guest."""
        conn, buffer = gs.conn, frame.buffer
        buffer.owner = gs
        self.registry.latest_to_dataplane(gs)
        pipes = self._showing(conn.name)
        if not new_layout and pipes and all(p.on_dp for p in pipes):
            try:
                for pipe in pipes:
                    pipe.dp_fb(buffer)
                self.dataplane.flip(conn.dp_conn, buffer.dp_handle, frame.seq, frame.received_ns)
                gs.latest = frame
                return True
            except (OSError, KmsError) as exc:
                log.info("guest %s: buffer %d: from Python (%s)", conn.name, buffer.id, exc)
        self._take_back(conn.name)
        self.dataplane.set_latest(conn.dp_conn, buffer.dp_handle, frame.seq,
                                  self.registry.layout(buffer.info))
        return False

    def on_forget(self, conn: GuestConnection, buffer: Buffer) -> None:
        gs = self.guests[conn.name]
        self.registry.forget(gs, buffer)

    def on_close(self, conn: GuestConnection, reason: str) -> None:
        gs = self.guests.get(conn.name)
        if gs is None:
            return
        # a vGPU's guest also goes when the frame-socket connection that handed its device over closes
        handed_over = isinstance(gs.conn, VfioGuest) and gs.conn.connection is conn
        if gs.conn is not conn and not handed_over:
            return
        self._guest_gone(gs, f"disconnected: {reason}")

    def _guest_gone(self, gs: GuestState, reason: str) -> None:
        conn = gs.conn
        log.info("guest %s %s", conn.name, reason)
        try:
            self._unplug_input(gs)
        finally:   # whatever that raised, the guest goes: a name left taken would outlive its client
            self._guest_leaves(gs)

    def _unplug_input(self, gs: GuestState) -> None:
        if gs.input is not None and hasattr(gs.input, "close"):
            self.own_input_names.difference_update(getattr(gs.input, "names", ()))
            sink, gs.input = gs.input, None
            sink.close()   # its VM's keyboard and tablet are unplugged with it

    def _guest_leaves(self, gs: GuestState) -> None:
        conn = gs.conn
        task = self.vfio_tasks.pop(conn.name, None)   # a vGPU's polling
        if task is not None:
            task.cancel()
        dp_conn = conn.dp_conn
        # a connection the daemon made for it (a vGPU's, a QEMU display's): its buffers go with it
        if gs in (self._vgpus.pop(dp_conn, None), self._local_sources.pop(dp_conn, None)):
            if self.dataplane is not None:   # None: shutting down, the data plane is gone already
                try:
                    self.dataplane.remove_conn(dp_conn)   # a connection with no socket receives none
                except OSError:
                    pass
            conn.dp_conn = -1
        try:
            self.registry.depart(gs)
        finally:
            try:
                conn.let_go()
            finally:
                self.replan()

    def _drop_buffer(self, buffer: Buffer) -> None:
        """A buffer about to be closed (the registry's `free`): off every pipeline and card."""
        for pipe in self.pipelines.values():
            pipe.forget(buffer.key)
        for cache in [layer.fbcache for layer in self.layers.values()]:
            cache.drop(buffer.key)

    # --- capture ----------------------------------------------------------------------------------

    async def capture(self, monitor: str, path: str) -> dict:
        """Write what `monitor` shows into a PNG at `path`. Where a writeback connector of its card
        reaches its CRTC, the display engine writes what the CRTC scans out (source "writeback");
        elsewhere the buffer on its plane is read back (source "buffer": what was committed, see
        compositor/capture.py). Raises CaptureError saying why it cannot."""
        pipe = self._lit_pipeline(monitor)
        card = pipe.card
        if card.path in self.session.paused:
            raise CaptureError(f"{card.path} is paused ({self.session.paused[card.path]}): nothing is "
                               f"scanned out by directflip now")
        wb = next((c for c in card.connectors
                   if c.is_writeback and pipe.out.crtc_id in [x.id for x in c.possible_crtcs]), None)
        if wb is not None:
            source, (image, shown, scanout) = "writeback", await self._capture_writeback(pipe, wb)
        else:
            source, (image, shown, scanout) = "buffer", await self._capture_buffer(pipe)
        await asyncio.get_running_loop().run_in_executor(None, readback.write_png, image, path)
        height, width = image.shape[:2]
        return {"path": path, "width": width, "height": height, "monitor": monitor, "guest": pipe.out.guest,
                "frame": shown, "source": source, "scanout": scanout}

    def _lit_pipeline(self, monitor: str) -> ScanoutPipeline:
        """The pipeline of `monitor`; CaptureError saying why when it is not lit."""
        pipe = next((p for p in self.pipelines.values() if p.out.monitor == monitor), None)
        if pipe is not None:
            return pipe
        planned = self.assignment.for_monitor(monitor)
        dark = next((d for d in self.assignment.dark if d.monitor == monitor), None)
        if planned is not None and (planned.card, planned.connector) in self.failed:
            why = f"lighting {planned.connector} failed: {self.failed[(planned.card, planned.connector)]}"
        elif dark is not None:
            why = f"{dark.connector} is left dark: {dark.reason}"
        elif planned is not None:
            why = "it is being lit; ask again in a moment"
        elif any(m.name == monitor for m in self.policy.monitors):
            why = "no connected output matches it now"
        else:
            why = "the policy has no monitor of that name"
        lit = ", ".join(sorted(p.out.monitor for p in self.pipelines.values())) or "none"
        raise CaptureError(f"monitor {monitor!r} is not lit: {why} (lit: {lit})")

    @staticmethod
    def _frame_info(frame: Frame | None) -> dict | None:
        """A captured frame as status shows the one on screen (None: the slate)."""
        return None if frame is None else {"buffer": frame.buffer.id, "frame": frame.seq}

    async def _capture_writeback(self, pipe: ScanoutPipeline, wb) -> tuple:
        """(RGB image, frame shown, scanout path) of a one-shot writeback of the pipeline's CRTC."""
        from compositor.formats import XRGB8888
        from compositor.kms.atomic import AtomicRequest
        from compositor.kms.writeback import add_writeback

        card = pipe.card
        w, h = pipe.mode.width, pipe.mode.height
        full = planner.Rect(0, 0, w, h)
        buf = card.create_dumb(w, h)
        try:
            fb = card.dumb_framebuffer(buf, XRGB8888)
            try:
                async with self._apply_lock:
                    pipe.paused = True   # the written-back frame is the one on screen: none follows it
                    try:
                        await self._idle(pipe)
                        scanned = pipe.scanned_out()
                        req = AtomicRequest(card)
                        job = add_writeback(req, wb, pipe.crtc, fb)
                        req.commit(allow_modeset=True)
                        await asyncio.get_running_loop().run_in_executor(None, job.wait, 5.0)
                        AtomicRequest(card).add(wb, "CRTC_ID", None).commit(allow_modeset=True)
                    finally:
                        pipe.paused = False
                        pipe.resume()
                rows = readback.read_rect(buf.map(), 0, buf.pitch, XRGB8888, full)
            finally:
                fb.remove()
        finally:
            buf.destroy()
        image = await asyncio.get_running_loop().run_in_executor(None, readback.compose, rows, XRGB8888,
                                                                 full, full, (w, h))
        frame = scanned.frame if scanned is not None else None
        return image, self._frame_info(frame), pipe.path

    async def _capture_buffer(self, pipe: ScanoutPipeline) -> tuple:
        """(RGB image, frame shown, scanout path) read from the buffer on the pipeline's plane: its
        SRC rectangle placed at its destination on a black mode-sized image."""
        scanned = pipe.scanned_out()
        if scanned is None:
            raise CaptureError(f"monitor {pipe.out.monitor!r} shows nothing directflip could read back "
                               f"({pipe.path}: {pipe.reason or 'no buffer on screen'})")
        if scanned.dumb is not None:
            readback.check_layout(scanned.fourcc)
            # Our copy slot or slate: read now, on the loop, before any copy can write the slot again.
            dumb = scanned.dumb
            rows = readback.read_rect(dumb.map(), 0, dumb.pitch, scanned.fourcc, scanned.src)
        else:
            assert scanned.frame is not None
            rows = await self._read_guest_buffer(scanned.frame, scanned.src)
        size = (pipe.mode.width, pipe.mode.height)
        image = await asyncio.get_running_loop().run_in_executor(None, readback.compose, rows, scanned.fourcc,
                                                                 scanned.src, scanned.dst, size)
        return image, self._frame_info(scanned.frame), scanned.path

    async def _read_guest_buffer(self, frame: Frame, rect: planner.Rect):
        """`rect` of the guest's buffer that `frame` shows, read off the loop while the buffer is held."""
        buffer = frame.buffer
        readback.check_layout(buffer.info.fourcc, buffer.info.modifier)
        gs = buffer.owner
        if gs is None or buffer.fd < 0 or (buffer.forgotten and self.registry.holds(buffer) <= 0):
            raise CaptureError(f"{buffer.guest}'s buffer {buffer.id} was freed as the capture began (its "
                               f"guest went away); capture again")
        # Held as a pipeline holds it: the guest is not told `released`, so it does not draw into the
        # buffer, until the read has really ended (a request that timed out included).
        self.registry.hold(gs, buffer)
        try:
            own = readback.dup_buffer(buffer)
        except OSError as exc:
            self.registry.release(frame)
            raise CaptureError(f"{buffer.guest}'s buffer {buffer.id}: {exc.strerror}") from None
        reading = readback.in_thread(readback.read_guest_buffer, own, rect)
        reading.add_done_callback(lambda done: self._guest_buffer_read(frame, done))
        try:
            return await asyncio.wait_for(asyncio.shield(reading), readback.READ_TIMEOUT)
        except TimeoutError:
            raise CaptureError(f"{buffer.guest}'s buffer {buffer.id} did not become readable within "
                               f"{readback.READ_TIMEOUT:g} s (DMA_BUF_IOCTL_SYNC waits for the writes "
                               f"pending on it)") from None

    def _guest_buffer_read(self, frame: Frame, done: asyncio.Future) -> None:
        self.registry.release(frame)
        if not done.cancelled():
            done.exception()   # retrieved: a read that outlived its request is not an unhandled error

    # --- session: VT switches and logind pauses ---------------------------------------------------

    async def _pause_card(self, path: str, reason: str) -> None:
        """The session is about to lose `path` (VT switch away, logind pause): stop committing to it
        and wait for its flips in flight, so master can be dropped with nothing pending."""
        if self.input is not None and isinstance(self.session, DirectSession):
            self.input.pause(reason)  # the console gets its keyboard back; what guests held is released
        async with self._apply_lock:
            for pipe in self.pipelines.values():
                if pipe.card.path == path:
                    pipe.suspended = True
                    await self._idle(pipe)
        log.info("%s: not committing (%s)", path, reason)
        self._send_status()

    async def _resume_card(self, path: str) -> None:
        """`path` is ours again: reset the world on it (everything off), forget what its outputs
        showed, re-probe (monitors may have changed meanwhile) and light them again from the plan."""
        async with self._apply_lock:
            card = self.cards.get(path)
            if card is None:
                return
            self.reset_outputs([card])
            for key, pipe in list(self.pipelines.items()):
                if pipe.card is card:
                    pipe.stop(commit=False)
                    del self.pipelines[key]
                    self._shown_by = None
            for key in [k for k in self.failed if k[0] == path]:
                del self.failed[key]
            try:
                self.topology = self.read_topology()
            except (KmsError, DeviceError) as exc:
                log.error("re-probing %s after the session resumed failed: %s", path, exc)
        log.info("%s: resumed; restoring its outputs", path)
        if not self._stopping:
            await self.apply(self.plan())
        if self.input is not None and isinstance(self.session, DirectSession) and not self.session.paused:
            self.input.resume()

    # --- hotplug --------------------------------------------------------------------------------------

    def _hotplug(self, changes) -> None:
        """udev said monitors, cards or vGPUs changed: re-probe, re-plan, apply the difference."""
        for node in sorted(changes.cards_added | changes.cards_removed):
            if node in self.cards or node in changes.cards_added:
                log.warning("%s was %s: cards are taken at start; restart directflip to use the new set",
                            node, "removed" if node in changes.cards_removed else "added")
        if changes.mdevs_added:
            self.open_vfio_guests()
        for gs in list(self.guests.values()):
            if gs.conn.mdev is not None and gs.conn.mdev in changes.mdevs_removed:
                if (vfio.MDEV_DEVICES / gs.conn.mdev).exists():
                    # A `remove` written to the uevent file, or one replayed: the vGPU is still there.
                    log.warning("udev said vGPU %s was removed, but it is still present; ignored",
                                gs.conn.mdev)
                    continue
                self._guest_gone(gs, "vGPU removed")
        # Only our own cards: another seat's card is another instance's business.
        mine = [node for node in changes.drm_cards if node == "*" or node in self.cards]
        if mine and not self._stopping:
            asyncio.get_running_loop().create_task(self._rescan())

    async def _rescan(self) -> None:
        async with self._apply_lock:
            try:
                self.topology = self.read_topology()
            except (KmsError, DeviceError) as exc:
                log.error("re-probing after hotplug failed: %s", exc)
                return
            self.hotplugs += 1
            for key, pipe in self.pipelines.items():
                conn = next((c for c in pipe.card.connectors if c.id == pipe.out.connector_id), None)
                if conn is not None and (conn.link_status or "").lower() == "bad":
                    log.warning("%s: link-status BAD; doing the modeset again", pipe.name)
                    self.failed[key] = "link-status BAD"
                    pipe.force_modeset()
        self.replan()

    # --- seat input -------------------------------------------------------------------------------

    async def start_input(self) -> None:
        """Take the seat's keyboards, mice, tablets and touchscreens (--no-input: none)."""
        if not self.want_input:
            log.info("input: not taken (--no-input)")
            return
        self.input = SeatInput(session_kind=self.session.kind, logind_seat=self.seat,
                               take=self.session.take_input, give_back=self.session.release_input,
                               sink_of=self.sink_of, actions=self._input_action,
                               pointer_moved=self._local_pointer)
        self.input.devices.own_names = self.own_input_names
        if hasattr(self.session, "on_input_pause"):
            self.session.on_input_pause = self.input.devices.suspend_device
            self.session.on_input_resume = self.input.devices.replace_fd
        try:
            await self.input.start(self.policy)
        except Exception:  # noqa: BLE001 — no input must not mean no screens
            log.exception("input: starting failed; the monitors are served without input")
        self.input.plan_applied(self.assignment, self.card_seats)

    def sink_of(self, guest: str) -> InputSink | None:
        """The input sink of a running guest (None: it takes no input)."""
        gs = self.guests.get(guest)
        if gs is None:
            return None
        return gs.input if gs.input is not None else gs.conn.input

    def _input_action(self, seat: str, action: str, arg: object) -> None:
        assert self.input is not None
        router = self.input.routers.get(seat)
        if router is None:
            return
        if action == "next-monitor":
            router.next_monitor()
        elif action == "next-guest" and router.focused is not None:
            try:
                self.next_guest(router.focused)
            except ValueError as exc:
                log.warning("seat %s: next guest on %s: %s", seat, router.focused, exc)
        elif action == "release-input":
            self.input.set_grabbed(seat, not router.grabbed)
        elif action == "vt" and isinstance(arg, int):
            task = asyncio.get_running_loop().create_task(self._switch_vt(arg))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._send_status()

    async def _switch_vt(self, number: int) -> None:
        try:
            await self.session.switch_vt(number)
        except (SessionError, OSError) as exc:
            log.error("switching to VT %d: %s", number, exc)

    def _output_of(self, monitor: str):
        assert self.topology is not None
        out = self.assignment.for_monitor(monitor)
        if out is None:
            return None
        return next((o for o in self.topology.outputs()
                     if o.card.path == out.card and o.connector.name == out.connector), None)

    def next_guest(self, monitor: str) -> str | None:
        """The next running guest the policy could place on `monitor`, shown there (cycling)."""
        output = self._output_of(monitor)
        if output is None:
            return None
        _, bound = planner.bind_guests(self.policy, [gs.guest for gs in self.guests.values()])
        allowed = planner.could_show(self.policy, monitor, output)
        names = list(dict.fromkeys(bound[rule].name for rule in allowed if rule in bound))
        if not names:
            log.info("next guest on %s: no running guest may be shown there", monitor)
            return None
        current = self.assignment.for_monitor(monitor)
        now = current.guest if current is not None else None
        target = names[(names.index(now) + 1) % len(names)] if now in names else names[0]
        self.show(target, monitor)
        return target

    def show(self, guest: str, monitor: str) -> None:
        """Show `guest` on `monitor` until `show --reset`: checked as a placement would be."""
        if monitor not in {m.name for m in self.policy.monitors}:
            raise ValueError(f"no monitor {monitor!r} in the policy")
        output = self._output_of(monitor)
        if output is None:
            raise ValueError(f"monitor {monitor} is not lit")
        gs = self.guests.get(guest)
        if gs is None:
            raise ValueError(f"guest {guest!r} is not running")
        _, bound = planner.bind_guests(self.policy, [g.guest for g in self.guests.values()])
        rule = next((r for r, g in bound.items() if g.name == guest), None)
        if rule is None:
            raise ValueError(f"no guest rule of the policy takes {guest} (a rule takes one running guest: "
                             "the first it matches)")
        if not planner.may_show(self.policy, rule, monitor, output):
            raise ValueError(f"{guest} may not be shown on {monitor}: its placements keep it to seats "
                             + ", ".join(sorted({s for p in self.policy.placements if p.guest == rule
                                                 for s in p.seats})))
        self.overrides[monitor] = guest
        log.info("show: %s on %s (until `directflip show --reset`)", guest, monitor)
        self.replan()

    def reset_overrides(self) -> list[str]:
        cleared = sorted(self.overrides)
        self.overrides.clear()
        if cleared:
            log.info("show --reset: %s back to the policy", ", ".join(cleared))
            self.replan()
        return cleared

    def focus(self, monitor: str) -> dict:
        if self.input is None:
            raise ValueError("input is not taken (--no-input)")
        try:
            router = self.input.focus(monitor)
        except KeyError:
            raise ValueError(f"monitor {monitor!r} is not lit in any seat") from None
        self._send_status()
        return {"seat": router.name, "monitor": monitor, "guest": router.focused_guest}

    # --- vGPUs (VFIO mediated devices) --------------------------------------------------------------

    def open_vfio_guests(self) -> None:
        """Open every vGPU the policy names by UUID (kind vfio) and is not open yet; launch its VMM
        with a duplicate of the device fd when the rule says `launch`. A vGPU that cannot be opened is
        reported and skipped: the others are served."""
        for rule in self.policy.guests:
            if rule.kind != "vfio" or not rule.opened_here or rule.name in self.guests:
                continue
            if rule.launch and self._reattach(rule):
                continue
            try:
                device = VfioDevice.open(rule.uuid)
                device.probe()
            except (VfioError, OSError) as exc:
                log.error("guest %s: cannot open vGPU %s: %s", rule.name, rule.uuid, exc)
                continue
            me = Peer(os.getpid(), os.getuid(), os.getgid())
            self._add_vfio(VfioGuest(rule.name, device, uuid=rule.uuid, peer=me))
            if rule.launch:
                self._launch(rule.name, rule.launch, device)

    def _reattach(self, rule: GuestRule) -> bool:
        """A VMM an earlier compositor launched for this guest and that still runs: take its duplicate
        of the vGPU's device fd back and show the guest again (True). True also when it cannot be taken
        (said in the log and status: the VMM holds the vGPU, so it is neither opened nor launched
        again); False when there is no such VMM."""
        rec = self.vmms.get(rule.name) or self.launch_records.load(rule.name)
        if rec is None:
            return False
        if not rec.alive():
            self.launch_records.forget(rule.name)
            self.vmms.pop(rule.name, None)
            return False
        self.vmms[rule.name] = rec
        if rule.name in self.launched:
            return True   # ours, still running: its vGPU is shown (or was let go) already
        try:
            fd = launched.take_back(rec)
            try:
                fdguard.expect(fd, {fdguard.Kind.VFIO_DEVICE}, f"fd {rec.fd} of the VMM")
                device = VfioDevice(fd, rule.uuid or rule.name)
            except BaseException:
                os.close(fd)
                raise
            device.probe()
        except (OSError, VfioError, fdguard.BadDescriptor) as exc:
            why = f"its VMM (pid {rec.pid}) still runs and holds vGPU {rule.uuid}, which cannot be " \
                  f"re-attached: {exc}"
            if self.reattach_errors.get(rule.name) != why:
                log.error("guest %s: %s", rule.name, why)
            self.reattach_errors[rule.name] = why
            return True
        self.reattach_errors.pop(rule.name, None)
        me = Peer(os.getpid(), os.getuid(), os.getgid())
        self._add_vfio(VfioGuest(rule.name, device, uuid=rule.uuid, peer=me))
        log.info("guest %s: re-attached to the vGPU its VMM (pid %d) holds", rule.name, rec.pid)
        return True

    def _uinput_for(self, name: str) -> dict[str, str]:
        """A launched vGPU guest's own keyboard and tablet (uinput), for its VMM to pass into the VM:
        {placeholder: device path}. Empty when they cannot be made (said in the log)."""
        from compositor.input.uinput import UinputSink

        gs = self.guests.get(name)
        if gs is None or not self.want_input:
            return {}

        def size() -> tuple[int, int] | None:
            g = gs.guest
            return (g.width, g.height) if g.width and g.height else None

        try:
            sink = UinputSink(name, size)
        except OSError as exc:
            log.error("guest %s: no input for its VM: %s", name, exc)
            return {}
        gs.input = sink
        self.own_input_names.update(sink.names)
        return {"keyboard": sink.keyboard_path, "tablet": sink.tablet_path}

    def _launch(self, name: str, template: str, device: VfioDevice) -> None:
        devices = self._uinput_for(name)
        wanted = [k for k in ("keyboard", "tablet") if "{" + k + "}" in template]
        if wanted and not devices:
            log.error("guest %s: not launched: its launch command takes {%s}, and there are no input "
                      "devices for it (see above, or --no-input)", name, "} and {".join(wanted))
            return
        fd = device.dup()
        try:
            command = template.replace("{fd}", str(fd))
            for key, path in devices.items():
                command = command.replace("{" + key + "}", path)
            argv = shlex.split(command)
            env = {k: v for k, v in os.environ.items() if k not in NOTIFY_ENV}  # systemd talks to us only
            env |= {"DIRECTFLIP_VFIO_FD": str(fd), "DIRECTFLIP_GUEST": name}
            env |= {f"DIRECTFLIP_INPUT_{k.upper()}": v for k, v in devices.items()}
            proc, rec = launched.spawn(name, argv, env, fd, device.name)
        except OSError as exc:
            log.error("guest %s: cannot launch %r: %s", name, template, exc)
            return
        finally:
            os.close(fd)
        self.launched[name] = proc
        self.vmms[name] = rec
        self._save_launch(rec)
        log.info("guest %s: launched %s (pid %d) with the vGPU's device fd, in a session of its own",
                 name, argv[0], proc.pid)
        if launched.systemd_runs():
            asyncio.get_running_loop().create_task(self._scope(rec))

    def _save_launch(self, rec: launched.Launched) -> None:
        try:
            self.launch_records.save(rec)
        except OSError as exc:
            log.error("guest %s: the record of its VMM cannot be written (%s): a restarted compositor "
                      "will not know it", rec.name, exc)

    async def _scope(self, rec: launched.Launched) -> None:
        """Move a launched VMM out of the compositor's cgroup into a scope of its own."""
        try:
            rec.scope = await launched.move_to_scope(rec)
        except Exception as exc:  # noqa: BLE001 - no systemd bus, refused: the VMM runs on where it is
            log.error("guest %s: its VMM (pid %d) stays in the compositor's cgroup, so stopping the "
                      "compositor's unit stops it too: %s", rec.name, rec.pid, exc)
            return
        log.info("guest %s: its VMM runs in %s", rec.name, rec.scope)
        self._save_launch(rec)

    def on_vfio_device(self, conn: GuestConnection, fd: int) -> None:
        """A VMM handed its vGPU's device fd over the frame socket: poll it as this guest."""
        conn.vfio_fd = None  # the VfioDevice owns it now
        device = VfioDevice(fd, conn.name)
        try:
            device.probe()
        except VfioError as exc:
            device.close()
            raise Refused(f"the handed-over device: {exc}") from None
        del self.guests[conn.name]
        self._add_vfio(VfioGuest(conn.name, device, uuid=conn.uuid, peer=conn.peer, connection=conn))

    def _add_vfio(self, vg: VfioGuest) -> None:
        gs = self.registry.add(vg, Guest(vg.name, "vfio", vg.uuid))
        log.info("guest %s: vGPU %s (%s planes)", vg.name, vg.uuid or vg.device.name,
                 "dma-buf" if vg.device.kind == VFIO_GFX_PLANE_TYPE_DMABUF else "region")
        vg.wake = asyncio.Event()
        if self.dataplane is not None and vg.device.kind == VFIO_GFX_PLANE_TYPE_DMABUF:
            # The data plane polls it once every output showing it is committed from there.
            try:
                vg.dp_conn = self.dataplane.add_vgpu(vg.device.fd, 100_000_000, True)
                self._vgpus[vg.dp_conn] = gs
            except OSError as exc:
                log.warning("guest %s: the data plane cannot poll the vGPU (%s): polled from Python",
                            vg.name, exc.strerror or exc)
        self.vfio_tasks[vg.name] = asyncio.get_running_loop().create_task(self._poll_vfio(gs))
        self.replan()

    def _poll_period(self, name: str) -> float:
        """Once per refresh of the (first) output showing the guest; 10 Hz while it is shown nowhere."""
        showing = self._showing(name)
        return 1.0 / max(1.0, showing[0].mode.refresh) if showing else 0.1

    async def _poll_vfio(self, gs: GuestState) -> None:
        """Poll the vGPU once per refresh; while the data plane polls it (`on_dp`), wait until it
        hands the vGPU back (something changed that it cannot show itself), then poll at once."""
        vg: VfioGuest = gs.conn
        while not vg.closed:
            if vg.on_dp:
                vg.wake.clear()
                await vg.wake.wait()
            else:
                await asyncio.sleep(self._poll_period(vg.name))
            if vg.on_dp:   # still, or handed over meanwhile
                continue
            try:
                self._poll_vfio_once(gs)
                self._vgpu_to_dataplane(gs)
            except Exception:   # the vGPU must be polled by one side: this one, from now on
                log.exception("guest %s: polling its vGPU failed", vg.name)
                if vg.on_dp and self.dataplane is not None:
                    try:
                        self.dataplane.pause(vg.dp_conn)
                    except OSError:
                        pass
                vg.on_dp = False
                await asyncio.sleep(self._poll_period(vg.name))

    def _poll_vfio_once(self, gs: GuestState) -> None:
        vg: VfioGuest = gs.conn
        vg.needs_poll = False
        try:
            frame = vg.poll()
            reason = f"{vg.name}'s display is off"
            if vg.last_error is not None:
                log.info("guest %s: the vGPU answers again", vg.name)
                vg.last_error = None
        except (VfioError, BadPlane, OSError) as exc:
            frame, reason = None, f"{vg.name}: {exc}"
            if str(exc) != vg.last_error:
                log.error("guest %s: %s", vg.name, exc)
                vg.last_error = str(exc)
        for buffer in vg.evicted():
            self.on_forget(vg, buffer)
        if frame is None:
            self._blank(gs, reason)
            return
        self._guest_frame(gs, frame)
        try:
            if vg.poll_cursor():
                gs.cursor, gs.pointer = vg.cursor, vg.pointer
                self._push_cursor(gs)
        except (VfioError, BadPlane, OSError) as exc:  # the picture goes on; asked again next time
            if str(exc) != vg.cursor_error:
                log.error("guest %s: reading its cursor plane failed: %s", vg.name, exc)
            vg.cursor_error = str(exc)

    def _register_source_buffer(self, source, buffer: Buffer) -> None:
        """A vGPU's or a QEMU display's new dma-buf goes to the data plane (its holds are counted
        there), with the layout it was fetched with: the data plane flips a vGPU's itself when the
        vGPU shows it again with that layout. Only a buffer nothing holds yet: one the data plane
        refused stays with Python, whose holds on it stay Python's."""
        if (source.dp_conn < 0 or buffer.dp_handle >= 0 or buffer.copy_only is not None or buffer.fd < 0
                or buffer.holds):
            return
        try:
            self.registry.register(source, buffer)
            info = buffer.info
            self.dataplane.buffer_plane(buffer.dp_handle, info.fourcc, info.modifier, info.width,
                                        info.height, info.stride)
        except (Refused, OSError) as exc:
            log.warning("guest %s: dma-buf %d stays with Python: %s", source.name, buffer.id, exc)

    def _vgpu_to_dataplane(self, gs: GuestState) -> None:
        """The data plane polls the vGPU from now on, if every output that shows it is committed from
        there (a vGPU shown anywhere else, or blanked, is polled here)."""
        vg: VfioGuest = gs.conn
        if (vg.on_dp or vg.needs_poll or vg.dp_conn < 0 or vg.closed or gs.blanked
                or self.dataplane is None):
            return
        pipes = self._showing(vg.name)
        if not pipes or not all(p.on_dp for p in pipes):
            return
        try:
            self.dataplane.vgpu_set(vg.dp_conn, int(self._poll_period(vg.name) * 1e9),
                                    vg.cursor_unsupported is None)
            self.dataplane.resume(vg.dp_conn, True)
        except OSError as exc:
            log.warning("guest %s: the data plane cannot poll the vGPU (%s)", vg.name, exc.strerror or exc)
            return
        vg.on_dp = True
        log.debug("guest %s: the data plane polls the vGPU", vg.name)

    VGPU_WHY = {1: "no monitor of its on the data plane", 2: "a plane query failed", 3: "its display is off",
                4: "a new dma-buf or layout", 5: "its cursor plane changed", 6: "a frame it cannot show"}

    def _vgpu_handed_back(self, gs: GuestState, why: int) -> None:
        """The data plane stopped polling the vGPU (DP_EV_DATA, `why`: dp_vgpu_why): Python polls it
        now."""
        vg: VfioGuest = gs.conn
        log.debug("guest %s: the data plane hands the vGPU back: %s", vg.name, self.VGPU_WHY.get(why, why))
        vg.on_dp = False
        vg.needs_poll = True   # what made the data plane hand it back is read before it goes again
        vg.wake.set()

    # --- QEMU VMs (-display dbus) ----------------------------------------------------------------------

    def open_qemu_guests(self) -> None:
        """Connect to the display of every `kind: qemu-dbus` guest with a `display` (the source keeps
        reconnecting while the VM is away); close those whose rule is gone or changed."""
        # The policy allows `display` and `domain` only with a literal name: the pattern is the guest's.
        wanted = {r.pattern.pattern: (r, _qemu_target(r)) for r in self.policy.guests
                  if r.qemu_target is not None}
        for name, source in list(self.qemu_sources.items()):
            rule, target = wanted.get(name, (None, None))
            if source.closed or target != source.target:
                source.close("its policy entry changed" if rule else "no longer in the policy")
                del self.qemu_sources[name]
        for name, (rule, target) in wanted.items():
            if name in self.qemu_sources:
                continue
            if name in self.guests:
                log.error("guest %s: a %s guest of that name is connected; not connecting to the "
                          "QEMU display %s", name, self.guests[name].guest.kind, rule.display)
                continue
            source = QemuDisplaySource(name, target, self, uuid=rule.uuid, resize=rule.resize,
                                       users=frozenset(rule.uids) if rule.uids is not None else None)
            self.qemu_sources[name] = source
            gs = self.registry.add(source, Guest(name, source.kind, rule.uuid))
            if self.dataplane is not None:   # its dma-buf frames are flipped through the data plane
                try:
                    source.dp_conn = self.dataplane.add_local()
                    self._local_sources[source.dp_conn] = gs
                except OSError as exc:
                    log.warning("guest %s: the data plane cannot take its frames (%s): flipped from Python",
                                name, exc.strerror or exc)
            log.info("guest %s: QEMU display at %s", name, source.target.describe())
            source.start()
        self.replan()

    def on_frame(self, source: QemuDisplaySource, frame: QemuFrame) -> None:
        gs = self.guests.get(source.name)
        if gs is not None and gs.conn is source:
            self._guest_frame(gs, frame)

    def on_blank(self, source: QemuDisplaySource, reason: str) -> None:
        gs = self.guests.get(source.name)
        if gs is not None and gs.conn is source:
            self._blank(gs, reason)

    def on_cursor(self, source) -> None:
        """A guest defined its pointer image or moved its pointer (QEMU's CursorDefine/MouseSet, the
        frame socket's cursor/cursor-move): onto the cursor planes of the monitors showing it."""
        gs = self.guests.get(source.name)
        if gs is None or gs.conn is not source:
            return
        gs.cursor, gs.pointer = source.cursor, source.pointer
        self._push_cursor(gs)

    def _push_cursor(self, gs: GuestState) -> None:
        for pipe in self._showing(gs.guest.name):
            try:
                pipe.set_cursor(gs.cursor, gs.pointer)
            except (KmsError, OSError) as exc:  # the picture goes on without the pointer
                log.error("%s: the cursor cannot be shown: %s", pipe.name, exc)

    def _assign_label_planes(self) -> None:
        """Give each lit output an overlay plane of its CRTC that the plan leaves free, for the guest's
        name: the plan's planes are never taken (the guest stays zero copy), and each free overlay goes
        to one output at most."""
        by_card: dict[str, list[ScanoutPipeline]] = {}
        for pipe in self.pipelines.values():
            by_card.setdefault(pipe.out.card, []).append(pipe)
        for path, pipes in by_card.items():
            planes = pipes[0].card.planes
            planned = {o.plane_id for o in self.assignment.outputs if o.card == path}
            taken: set[int] = set()
            for pipe in pipes:
                if pipe.cursor_plane is None or pipe.cursor_plane.type == "overlay":
                    # No cursor plane on this CRTC: the pointer goes on a free overlay, before the name
                    old = pipe.cursor_plane
                    plane = free_overlay(planes, planned | taken, pipe.crtc, old)
                    why = f"CRTC {pipe.crtc.id} has no cursor plane and no overlay plane is free"
                    pipe.use_cursor_plane(plane, "" if plane is not None else why,
                                          taken=old is not None and old.id in planned)
                    if plane is not None:
                        taken.add(plane.id)
                old = pipe.label_plane
                plane = free_overlay(planes, planned | taken, pipe.crtc, old)
                pipe.use_label_plane(plane, taken=old is not None and old.id in planned)
                if plane is not None:
                    taken.add(plane.id)

    def _show_label(self, key: tuple[str, str], pipe: ScanoutPipeline, guest: str) -> None:
        """The guest's name on `pipe` for the monitor's `label` seconds, as the monitor turns to it."""
        old = self._label_timers.pop(key, None)
        if old is not None:
            old.cancel()
        seconds = next((m.label for m in self.policy.monitors if m.name == pipe.out.monitor), 0.0)
        if pipe.label_plane is None or seconds <= 0:
            return
        try:
            pipe.show_label(guest)
        except (KmsError, OSError) as exc:
            log.warning("%s: the guest's name cannot be shown: %s", pipe.name, exc)
            return

        def hide() -> None:
            self._label_timers.pop(key, None)
            if self.pipelines.get(key) is pipe:
                try:
                    pipe.show_label(None)
                except (KmsError, OSError) as exc:
                    log.warning("%s: hiding the guest's name: %s", pipe.name, exc)

        self._label_timers[key] = asyncio.get_running_loop().call_later(seconds, hide)

    def _local_pointer(self, guest: str, x: int, y: int) -> None:
        """The seat's pointer moved over `guest` (absolute mode): its cursor follows at once, without
        waiting for the guest to say where its pointer went."""
        gs = self.guests.get(guest)
        if gs is None or gs.cursor is None:
            return
        gs.pointer = Pointer(x, y, gs.pointer.visible if gs.pointer is not None else True)
        self._push_cursor(gs)

    def _guest_frame(self, gs: GuestState, frame: Frame) -> None:
        """A frame from a source that shows its buffers in place (a polled vGPU, a QEMU display)."""
        gs.blanked, gs.blank_reason = False, None
        self._register_source_buffer(gs.conn, frame.buffer)
        latest = self.registry.latest(gs)
        same = latest is not None and frame.buffer is latest.buffer
        if same and self._scanned_directly(gs.conn.name, frame.buffer):
            # The plane reads the guest's memory itself: nothing to flip. An output taken back (a
            # capture, a cursor image) goes to the data plane again here, as no flip event will come.
            if self.dataplane is not None and gs.conn.dp_conn >= 0:
                self._hand_over(gs.conn.name)
            return
        self.on_flip(gs.conn, frame)

    def _scanned_directly(self, name: str, buffer: Buffer) -> bool:
        """Every output of the guest's reads `buffer` itself (zero copy): on the data plane, whose
        latest frame it is (a commit the data plane could not make takes the outputs back), or on
        screen, in flight or pending in the output's pipeline."""
        showing = self._showing(name)
        return bool(showing) and all(p.on_dp or p.shows(buffer) for p in showing)

    def _blank(self, gs: GuestState, reason: str) -> None:
        if gs.blanked and reason == gs.blank_reason:
            return
        gs.blanked, gs.blank_reason = True, reason   # a new reason (a domain paused, then shut off) is shown
        log.info("guest %s: display off (%s)", gs.conn.name, reason)
        self.registry.drop_latest(gs)
        for pipe in self._showing(gs.conn.name):
            asyncio.get_running_loop().create_task(self._blank_output(pipe, reason))

    async def _blank_output(self, pipe: ScanoutPipeline, reason: str) -> None:
        async with self._apply_lock:
            if self.pipelines.get((pipe.out.card, pipe.out.connector)) is not pipe or pipe.suspended:
                return  # a suspended output is re-taken with the guest's state when the session resumes
            pipe.paused = True
            try:
                await self._idle(pipe)
                pipe.blank(reason)
            except KmsError as exc:
                log.error("%s: showing the slate failed: %s", pipe.name, exc)
            finally:
                pipe.paused = False

    def _tell_sizes(self) -> None:
        """Tell each QEMU guest the size of the monitor it is shown on (its main view), as virt-viewer
        does, so a guest that can (virtio-gpu, a vGPU with a display) takes its resolution. Not where
        its rule says `resize: false`, nor where the monitor's `mode: match-guest` follows the guest."""
        matching = {m.name for m in self.policy.monitors if m.mode.kind == "match-guest"}
        for name, source in self.qemu_sources.items():
            shown = self._showing(name)
            if not shown or not source.resize or shown[0].out.monitor in matching:
                source.show_size(None)
                continue
            pipe = shown[0]
            try:
                mm = pipe.connector.mm_size
            except (KmsError, AttributeError):
                mm = (0, 0)
            source.show_size((pipe.mode.width, pipe.mode.height, *mm))

    def _pass_edids(self) -> None:
        """EDID passthrough: each vGPU's EDID region holds the EDID of the monitor it is shown on
        (its main view); a vGPU shown nowhere sees its link down."""
        for gs in self.guests.values():
            shown = self._showing(gs.conn.name)
            if not shown:
                gs.conn.show_monitor(None)
                continue
            try:
                edid = shown[0].connector.edid_blob
            except KmsError:
                edid = None
            if edid:
                gs.conn.show_monitor(edid)

    # --- status -----------------------------------------------------------------------------------

    def status_line(self) -> str:
        """This instance's `status_line`: built from what the pipelines show now, in plan order."""
        paused = {path: reason for path, reason in self.session.paused.items() if path in self.cards}
        shown: list[tuple[str, str | None, str]] = []
        for out in self.assignment.outputs:
            pipe = self.pipelines.get((out.card, out.connector))
            if pipe is not None and out.card not in paused:
                shown.append((pipe.out.monitor or pipe.out.connector, pipe.out.guest, pipe.path))
        monitors = {(o.card, o.connector): o.monitor for o in self.assignment.outputs}
        failed = [monitors.get(key) or key[1] for key in self.failed if key[0] not in paused]
        on_screen = {guest for _, guest, _ in shown}
        not_shown = [name for name in self.guests if name not in on_screen]
        return status_line(shown, failed=failed, not_shown=not_shown, paused=paused)

    def _send_status(self) -> None:
        """STATUS= to the service manager when the summary changed. Called after each plan is applied,
        a card paused, and (through _status_changed) a guest connecting or an output changing path:
        never per frame."""
        if self.notifier is None or not self.notifier.enabled or self._stopping:
            return
        text = self.status_line()
        if text != self.status_text and self.notifier.status(text):
            self.status_text = text

    def _status_changed(self) -> None:
        """Something the status line shows may have changed outside apply(). The refresh waits for the
        apply lock: an apply under way sends the line itself once every output is configured, and a
        line from halfway through would only be noise in `systemctl status`."""
        if self.notifier is None or not self.notifier.enabled or self._status_pending:
            return
        self._status_pending = True
        asyncio.get_running_loop().create_task(self._refresh_status())

    async def _refresh_status(self) -> None:
        try:
            async with self._apply_lock:
                pass
        finally:
            self._status_pending = False
        self._send_status()

    def status(self) -> dict:
        outputs = [pipe.status() for pipe in self.pipelines.values()]
        for (card, conn), reason in self.failed.items():
            outputs.append({"card": card, "connector": conn, "path": "failed", "reason": reason})
        return {
            "schema": "directflip.status/1",
            "version": running_version(),
            "started_ns": self.started_ns,
            "uptime_s": round((time.monotonic_ns() - self.started_ns) / 1e9, 1),
            "summary": self.status_line(),
            "seat": self.seat,
            "session": self.session.status(),
            "cards": [{"path": path, "driver": card.driver, "seat": self.card_seats.get(path),
                       "master": card.is_master,
                       "state": "paused" if path in self.session.paused else "active"}
                      for path, card in self.cards.items()],
            "hotplugs": self.hotplugs,
            "udev_events": self.hotplug.events if self.hotplug is not None else 0,
            "policy": {"path": str(self.policy_path), "generation": self.watcher.generation,
                       "last_error": self.watcher.last_error,
                       # CLOCK_MONOTONIC ns when the screens started showing this generation's plan
                       "applied_generation": self.applied_generation, "applied_ns": self.applied_ns,
                       "loaded_ns": self.loaded_ns},
            "outputs": outputs,
            "overrides": dict(self.overrides),
            "launched": {name: {**rec.status(), "attached": name in self.guests,
                                "error": self.reattach_errors.get(name)} for name, rec in self.vmms.items()},
            "input": self.input.status() if self.input is not None else None,
            "dark": [{"card": d.card, "connector": d.connector, "monitor": d.monitor, "reason": d.reason}
                     for d in self.assignment.dark],
            "unplaced": [{"guest": u.guest, "reason": u.reason, "monitor": u.monitor}
                         for u in self.assignment.unplaced],
            "guests": [{"name": name, "kind": gs.guest.kind,
                        "pid": gs.conn.peer.pid if gs.conn.peer else None,
                        "uid": gs.conn.peer.uid if gs.conn.peer else None,
                        **gs.conn.guest_status(),
                        "buffers": len(gs.conn.buffers), "flips": self.registry.flips(gs),
                        "framebuffer": (None if gs.guest.width is None else
                                        f"{gs.guest.width}x{gs.guest.height} {gs.guest.fourcc}"),
                        "held": self.registry.held(gs)}
                       for name, gs in self.guests.items()],
            # Guests gone whose buffers are still held (on screen until replaced): freed after that.
            "departed": [{"name": gs.conn.name, "buffers": len(gs.forgotten),
                          "held": self.registry.held(gs, forgotten_only=True)}
                         for gs in self.departed],
            "data_plane": None if self.dataplane is None else {"buffers": len(self.registry.dp_buffers)},
        }


# ------------------------------------------------------------------------------------------------ CLI

# Descriptors the compositor holds besides its frame-socket clients': cards, buffers of its own,
# framebuffers' dma-bufs, QEMU and vGPU guests, input devices, sockets, pipes.
OWN_DESCRIPTORS = 4096


def _qemu_target(rule: GuestRule) -> QemuTarget:
    """Where the QEMU display of a `kind: qemu-dbus` (display) or `kind: libvirt` guest is."""
    where = rule.qemu_target
    assert where is not None
    if where[0] == "libvirt":
        return QemuTarget(libvirt=(where[1], where[2]), console=rule.console)
    return QemuTarget.parse(where[1], rule.console)


def _descriptor_budget(limits: Limits) -> None:
    """Raise the soft descriptor limit to what the frame socket's limits let clients take plus the
    compositor's own, within the hard limit (the unit's LimitNOFILE); say so if it falls short."""
    need = limits.descriptors() + OWN_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning("the descriptor limit is %d, below the %d that frame-socket clients within their "
                    "limits and the compositor may hold: raise LimitNOFILE (or ulimit -n), or lower "
                    "--max-connections or --max-buffers", soft, need)
    else:
        log.info("descriptor limit %s for a budget of %d (%d frame-socket connections)", soft, need,
                 limits.connections)


def run_command(args: argparse.Namespace) -> int:
    """`directflip run` with its parsed arguments (compositor.cli.run): the exit status."""
    from compositor.policy import PolicyError

    try:
        frame_socket, control_socket = socket_paths(args.seat)
        session = make_session(args.session, args.vt)
    except (SessionError, ValueError) as exc:
        print(f"directflip run: {exc}", file=sys.stderr)
        return 2
    try:
        daemon = Daemon(args.policy, frame_socket=args.socket or frame_socket,
                        control_socket=args.control or control_socket, cards=args.device or None,
                        native=not args.pure_python, seat=args.seat, session=session,
                        input=not args.no_input, data_plane=args.data_plane == "native",
                        limits=Limits(hello_timeout=args.hello_timeout, connections=args.max_connections,
                                      per_user=args.max_connections_per_user, buffers=args.max_buffers,
                                      buffer_bytes=args.max_buffer_bytes))
    except PolicyError as exc:
        print(f"directflip run: the policy is invalid, not starting:\n{exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"directflip run: cannot read the policy: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(daemon.run())
    except (DeviceError, SessionError) as exc:
        print(f"directflip run: {exc}", file=sys.stderr)
        return 2
    return 0
