"""The guest registry: who is connected, their buffers, and who holds each buffer.

Every source (a frame-socket client, a polled vGPU, a QEMU display) becomes one `GuestState` here,
by name. A buffer has one owner (`Buffer.owner`, the GuestState of the guest that flipped it) and one
count of holds: the registry's own `Buffer.holds` for buffers the Python frame path carries, or the
data plane's count once the buffer is registered there (`Buffer.dp_handle` >= 0). Holders are the
guest's latest frame and each scanout pipeline with the buffer pending, in flight or on screen. The
last release tells the guest `released`, or frees a buffer the guest forgot (or left behind when it
went): its framebuffers are dropped by the output side (the `free` callback), then its dma-buf is
closed.

The registry does not plan, commit or look at outputs: the daemon wires its events to the scanout
pipelines, and the pipelines hold and release through it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from compositor.input.sink import InputSink
from compositor.planner import Guest
from compositor.sources.frame import Buffer, Cursor, Frame, PlaneInfo, Pointer
from compositor.sources.framesocket import GuestConnection, Refused

log = logging.getLogger("directflip.guests")


@dataclass(eq=False)
class GuestState:
    conn: GuestConnection
    guest: Guest
    latest: Frame | None = None
    blanked: bool = False  # a guest whose display is off: its monitors show the slate
    blank_reason: str | None = None  # what the slate says while blanked
    forgotten: set[Buffer] = field(default_factory=set)  # freed once nothing holds them (Buffer.holds)
    flips: int = 0
    input: InputSink | None = None  # a sink of the daemon's own (a launched vGPU's uinput devices)
    cursor: Cursor | None = None   # the guest's pointer image, on the cursor planes of its monitors
    pointer: Pointer | None = None  # where its pointer is (guest buffer pixels) and whether it shows


def deciding_rules(rules, name: str, uuid: str | None) -> tuple:
    """The two guest rules whose `users` decide whether a frame-socket client may be guest `name`
    (GuestRegistry.admit): the first whose name matches, and the first that matches its name and
    claimed `uuid` (the one that binds it, as the planner binds). Either may be None."""
    by_name = next((r for r in rules if r.pattern.matches(name)), None)
    binding = next((r for r in rules if r.matches(name, None, uuid)), None)
    return by_name, binding


class GuestRegistry:
    """The guests by name, the departed ones whose buffers are still held, and every buffer's holds.

    `free(buffer)` is called for a buffer nothing holds any more and that its guest will not flip
    again, before it is closed: the output side drops its framebuffers there."""

    def __init__(self, free: Callable[[Buffer], None]) -> None:
        self.guests: dict[str, GuestState] = {}
        self.departed: list[GuestState] = []  # disconnected guests whose buffers are still held
        self.dataplane = None                 # compositor.dataplane.DataPlane, once started
        self.dp_buffers: dict[int, Buffer] = {}   # data-plane buffer handle → Buffer
        self._layouts: dict[PlaneInfo, int] = {}  # layouts by number, for the data plane
        self._free = free

    # --- admission

    def admit(self, conn: GuestConnection, by_name, binding, opened_here: str | None) -> GuestState:
        """A frame-socket client said hello as `conn.name`: refused (Refused, with the reason) unless
        its uid is allowed by both guest rules that decide (policies/README.md, "Who may connect"):
        `by_name`, the first rule whose name matches (a UUID claim, which no one can prove, cannot get
        past it), and `binding`, the rule that binds it as the planner does (the first that matches
        its name and claimed UUID: it is shown only where that rule's users allow). A rule without
        `users`, or no rule, allows root and the compositor's user. Also refused: a name that is
        connected already, or one the daemon opens itself (`opened_here`)."""
        if opened_here:
            # The daemon opens this guest itself; a client by that name would only keep it out.
            raise Refused(f"guest {conn.name} is the {opened_here}, which directflip opens itself; it "
                          f"cannot connect over the frame socket")
        default = {0, os.getuid()}
        for rule, why in ((by_name, "the first guest rule its name matches"),
                          (binding, "the guest rule that would show it")):
            allowed = default if rule is None or rule.uids is None else set(rule.uids)
            if conn.peer.uid not in allowed:
                which = f"{why}, {rule.name}" if rule is not None else "no guest rule matches it"
                raise Refused(f"uid {conn.peer.uid} may not connect as guest {conn.name} ({which}, "
                              f"allows uid {', '.join(map(str, sorted(allowed))) or 'none'})")
        if conn.name in self.guests:
            other = self.guests[conn.name].conn
            raise Refused(f"a guest named {conn.name} is already connected (pid {other.peer.pid})")
        if binding is None:
            log.warning("guest %s connected, but no guest rule of the policy matches it: it is not shown",
                        conn.name)
        return self.add(conn, Guest(conn.name, "socket", conn.uuid))

    def add(self, conn, guest: Guest) -> GuestState:
        gs = self.guests[guest.name] = GuestState(conn, guest)
        return gs

    def get(self, name: str | None) -> GuestState | None:
        return self.guests.get(name) if name is not None else None

    def all(self) -> list[GuestState]:
        """Every guest, connected or departed with buffers still held."""
        return [*self.guests.values(), *self.departed]

    # --- the data plane's share

    def layout(self, info: PlaneInfo) -> int:
        return self._layouts.setdefault(info, len(self._layouts) + 1)

    def dp_conn(self, name: str | None) -> int:
        gs = self.get(name)
        return gs.conn.dp_conn if gs is not None else -1

    def register(self, conn: GuestConnection, buffer: Buffer) -> None:
        """The data plane keeps the buffer's holds from now on (those already taken move there).
        A buffer it cannot take ends the connection: a guest's holds are counted in one place."""
        try:
            handle = self.dataplane.add_buffer(conn.dp_conn, buffer.id, self.layout(buffer.info))
        except OSError as exc:
            raise Refused(f"buffer {buffer.id}: the compositor's data plane cannot take it "
                          f"({exc.strerror})") from None
        for _ in range(buffer.holds):
            self.dataplane.hold(handle)
        buffer.holds = 0
        buffer.dp_handle = handle
        self.dp_buffers[handle] = buffer

    def adopt(self, conn: GuestConnection) -> None:
        """The data plane serves `conn` from now on: its buffers and its latest frame go there."""
        gs = self.guests.get(conn.name)
        if gs is None or gs.conn is not conn:   # (a VMM's socket whose vGPU took over the name)
            return
        for buffer in conn.buffers.values():
            self.register(conn, buffer)
        latest, gs.latest = gs.latest, None
        if latest is None:
            return
        if latest.buffer.dp_handle >= 0:
            # The hold moved with the buffer; the data plane keeps it as the guest's latest.
            self.dataplane.set_latest(conn.dp_conn, latest.buffer.dp_handle, latest.seq,
                                      self.layout(latest.buffer.info))
            gs.latest = latest
        self.release(latest)   # a buffer forgotten before: freed once nothing else holds it

    def freed(self, handle: int) -> None:
        """The data plane let go of buffer `handle` (DP_EV_FREED): nothing holds it and its guest
        forgot it."""
        buffer = self.dp_buffers.pop(handle, None)
        if buffer is None:
            return
        buffer.dp_handle = -1
        gs = buffer.owner
        if gs is not None:
            gs.forgotten.discard(buffer)
        self._free_buffer(buffer)

    def latest(self, gs: GuestState) -> Frame | None:
        """The guest's latest frame. The data plane keeps (and holds) it for its guests: it may have
        shown newer frames than Python saw."""
        conn = gs.conn
        if self.dataplane is None or conn.dp_conn < 0:
            return gs.latest
        try:
            handle, seq, presented = self.dataplane.latest(conn.dp_conn)
        except OSError:
            return None
        buffer = self.dp_buffers.get(handle)
        if buffer is None:
            # None there: a frame of a buffer the data plane could not take, if any, is Python's
            latest = gs.latest
            return latest if latest is not None and latest.buffer.dp_handle < 0 else None
        if gs.latest is None or gs.latest.buffer is not buffer or gs.latest.seq != seq:
            gs.latest = Frame(buffer=buffer, seq=seq, presented=presented)
        return gs.latest

    def flips(self, gs: GuestState) -> int:
        """The guest's flips: those Python saw and those its data plane showed without Python."""
        conn = gs.conn.dp_conn
        if self.dataplane is None or conn < 0:
            return gs.flips
        try:
            return gs.flips + self.dataplane.flips(conn)
        except OSError:
            return gs.flips

    # --- holds

    def holds(self, buffer: Buffer) -> int:
        if buffer.dp_handle >= 0 and self.dataplane is not None:
            try:
                return self.dataplane.holds(buffer.dp_handle)
            except OSError:
                return 0
        return buffer.holds

    def held(self, gs: GuestState, *, forgotten_only: bool = False) -> int:
        """The holds on the guest's buffers (those it forgot, or all of them)."""
        buffers = [*gs.forgotten] if forgotten_only else [*gs.conn.buffers.values(), *gs.forgotten]
        return sum(self.holds(b) for b in buffers)

    def hold(self, gs: GuestState, buf: Buffer) -> None:
        buf.owner = gs
        if buf.dp_handle >= 0 and self.dataplane is not None:
            self.dataplane.hold(buf.dp_handle)
        else:
            buf.holds += 1

    def release(self, frame: Frame) -> None:
        """One holder of frame's buffer is done with it: the last one frees a forgotten buffer, or
        tells its guest `released`."""
        buf = frame.buffer
        gs = buf.owner
        if buf.dp_handle >= 0:
            # The data plane counts: the last hold tells the guest `released`, or frees the buffer
            # (DP_EV_FREED) if its guest forgot it.
            if self.dataplane is not None:
                try:
                    self.dataplane.release(buf.dp_handle)
                except OSError:
                    pass   # freed already
            return
        if gs is None or buf.holds <= 0:
            return   # never held (a frame of a guest that was already gone), or freed already
        buf.holds -= 1
        if buf.holds == 0:
            if buf.forgotten:
                gs.forgotten.discard(buf)
                self._free_buffer(buf)
            elif not gs.conn.closed:
                gs.conn.released(buf.id)

    def present(self, frame: Frame, event) -> None:
        if frame.presented:
            return
        frame.presented = True
        gs = frame.buffer.owner   # not the guest's name: a guest that connected again has new buffers
        if gs is not None and not gs.conn.closed:
            gs.conn.presented(frame.buffer.id, frame.seq, event.timestamp_ns, event.sequence)

    def new_latest(self, gs: GuestState, frame: Frame) -> None:
        """`frame`, of a buffer Python counts the holds of, is the guest's latest: it holds its
        buffer, the one before lets go (the data plane's, if the data plane held it)."""
        self.hold(gs, frame.buffer)
        self.drop_latest(gs)
        gs.latest = frame

    def latest_to_dataplane(self, gs: GuestState) -> None:
        """The data plane holds the guest's latest frame from now on: a frame before it that Python
        held lets go."""
        latest = gs.latest
        if latest is not None and latest.buffer.dp_handle < 0:
            gs.latest = None
            self.release(latest)

    def drop_latest(self, gs: GuestState) -> None:
        """The guest has no latest frame any more (a vGPU's display went off): its hold goes."""
        latest, gs.latest = gs.latest, None
        if latest is not None and latest.buffer.dp_handle < 0:
            self.release(latest)
        conn = gs.conn.dp_conn
        if self.dataplane is not None and conn >= 0:
            try:
                self.dataplane.set_latest(conn, -1, 0, 0)   # the data plane holds its guests' latest
            except OSError:
                pass

    # --- buffers the guest lets go of

    def forget(self, gs: GuestState, buffer: Buffer) -> None:
        """The guest will not flip `buffer` again: close it now, or once nothing holds it."""
        if buffer.dp_handle >= 0 and self.dataplane is not None:
            buffer.forgotten = True
            buffer.owner = gs   # DP_EV_FREED finds it here: a buffer only ever flipped there has no owner yet
            gs.forgotten.add(buffer)
            try:
                self.dataplane.forget(buffer.dp_handle)   # freed by DP_EV_FREED, now or later
            except OSError:
                pass
            return
        if buffer.holds > 0:
            buffer.forgotten = True
            gs.forgotten.add(buffer)
        else:
            self._free_buffer(buffer)

    def depart(self, gs: GuestState) -> None:
        """The guest is gone: each of its buffers is freed once nothing holds it; until then it is
        among the departed."""
        conn = gs.conn
        if self.guests.get(conn.name) is gs:   # first: whatever fails below, the name is free again
            del self.guests[conn.name]
        self.departed.append(gs)
        buffers = [*conn.evicted(), *conn.buffers.values()]
        conn.buffers.clear()
        for buffer in buffers:
            try:
                self.forget(gs, buffer)
            except Exception:   # one buffer that cannot be dropped must not keep the others open
                log.exception("guest %s: freeing buffer %d failed", conn.name, buffer.id)
                buffer.close()
        if gs.latest is not None:
            latest, gs.latest = gs.latest, None
            if latest.buffer.dp_handle < 0:   # the data plane lets go of its own with the connection
                self.release(latest)

    def sweep(self) -> None:
        """After a plan: free what nothing holds any more; drop departed guests with nothing left."""
        for gs in self.all():
            for buffer in [b for b in gs.forgotten if b.dp_handle < 0 and b.holds <= 0]:
                gs.forgotten.discard(buffer)
                self._free_buffer(buffer)
        self.departed = [gs for gs in self.departed if gs.forgotten]

    def close_all(self, reason: str) -> None:
        """Shutting down: every guest's connection closed and every buffer freed, held or not."""
        for gs in self.all():
            gs.conn.close(reason)
            if gs.input is not None and hasattr(gs.input, "close"):
                gs.input.close()
                gs.input = None
            for buffer in [*gs.forgotten, *gs.conn.buffers.values()]:
                self._free_buffer(buffer)
            gs.forgotten.clear()
        self.guests.clear()
        self.departed.clear()

    def _free_buffer(self, buffer: Buffer) -> None:
        self._free(buffer)
        buffer.close()


__all__ = ["GuestRegistry", "GuestState"]
