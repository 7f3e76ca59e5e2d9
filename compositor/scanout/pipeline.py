"""The per-output state machine: a guest's frames in, one commit in flight per CRTC, page flips out.

The slots (pending, in flight, on screen) and the ladder (zero copy, copy, slate) are described in
the package's docstring (compositor/scanout/__init__.py). This module decides what to commit and when;
the framebuffers it commits come from the framebuffer cache (zero copy), the copy buffers (copy) and
the slate (slate), and what it counts goes to its Metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from compositor.cursor import CursorLayer
from compositor.formats import ARGB8888
from compositor.kms import Busy, FlipEvent, Framebuffer, KmsError, Mode, Rejected
from compositor.kms.card import DumbBuffer
from compositor.planner import OutputAssignment, Rect
from compositor.scanout.copy import CopyBuffers, FenceTimeout
from compositor.scanout.metrics import Metrics
from compositor.scanout.slate import LABEL_MARGIN, UNSCALED, SlateBuffer, render_label
from compositor.sources.frame import Buffer, Cursor, Frame, Pointer

if TYPE_CHECKING:
    from compositor.dataplane import OutputStats
    from compositor.output import OutputLayer

log = logging.getLogger("directflip.scanout")

ZERO_COPY, COPY, SLATE = "zero-copy", "copy", "slate"


def live_mode(mode) -> Mode:
    """The KMS mode for a planner mode (the planner reads modes from the probe document)."""
    return Mode.from_json(asdict(mode))


@dataclass
class _Commit:
    frame: Frame | None
    fb: Framebuffer | None
    token: int
    # The plane's SRC rectangle in fb and its destination on the CRTC, as committed: what a capture
    # without a writeback connector reads back (None only in commits made before they were recorded).
    src: Rect | None = None
    dst: Rect | None = None
    cursor_only: bool = False  # moved the cursor plane alone: the primary plane kept its frame
    # The copy rung's copy of the frame, still running on a worker thread: (the job, its future). The
    # commit is made when it is over; till then this holds the CRTC as a commit in flight does.
    copying: tuple | None = None


@dataclass(frozen=True)
class Scanned:
    """What an output's plane scans out now, for `directflip capture` to read back from the buffer."""

    path: str                # ZERO_COPY (the guest's buffer), COPY or SLATE (a dumb buffer of ours)
    frame: Frame | None      # the guest's frame on the plane (zero copy) or copied into it; None: slate
    dumb: DumbBuffer | None  # our buffer on the plane (copy, slate); None when it is the guest's
    fourcc: int
    src: Rect                # the plane's SRC rectangle in that buffer
    dst: Rect                # where the CRTC shows it


class ScanoutPipeline:
    """One lit output: connector → CRTC → plane, fed with a guest's frames or a slate.

    `release(frame)` is called when the pipeline no longer needs a frame's buffer (dropped, or off
    screen); `present(frame, event)` when a frame's flip completed. `native` picks the C flip path and
    the C copy (kms_copy_rows) for the copy rung and the slate."""

    _tokens = 0

    def __init__(self, layer: OutputLayer, out: OutputAssignment, *,
                 release: Callable[[Frame], None], present: Callable[[Frame, object], None],
                 copier: Executor | None = None) -> None:
        # Its card's output layer (compositor/output.py): every commit goes through it, and it routes
        # this CRTC's flip events here.
        self.layer = layer
        self.card = layer.card
        self.crtc = None
        # Where the copy rung's per-frame copies run, off the loop (a 1080p copy takes milliseconds,
        # which no other output's frame should wait for); None: on the loop, as configuration
        # commits always do.
        self.copier = copier
        self.fbcache = layer.fbcache
        self.release = release
        self.present = present
        self.native = layer.native
        self.out = out
        self.metrics = Metrics()
        self.path = SLATE
        self.reason = "not started"
        self.fallbacks: list[str] = []
        self.pending: Frame | None = None
        self.in_flight: _Commit | None = None
        self._outstanding: set[int] = set()  # nonblocking commits whose flip event has not come yet
        # Frames a blocking configuration commit put on screen, by the token of that commit's flip
        # event, with when the commit returned: reported presented when the event is read.
        self._awaiting_event: dict[int, tuple[Frame, int]] = {}
        self.on_screen: _Commit | None = None
        self.plane_key: tuple | None = None  # the (fb size, format, src, dst) the plane was committed with
        self.copy: CopyBuffers | None = None
        self._slate: SlateBuffer | None = None
        self._retired: list = []  # what the next completed commit frees
        self._lit = False
        self.dead_end = False
        self.paused = False  # set by the daemon while it reconfigures: frames wait as `pending`
        self.suspended = False  # the session paused the card (VT switched away): nothing is committed
        self.configurations = 0  # how often the output was (re)configured: status shows it
        # Called when `path` changes (a rung given up, the slate, back to the guest): rare, never per
        # frame, so the daemon can keep its one-line summary current without looking at every flip.
        self.on_path_change: Callable[[], None] | None = None
        self.cursor_layer: CursorLayer | None = None  # made with the guest's first cursor
        self.cursor_plane = None
        self.cursor_reason = ""  # why this output has no cursor plane
        # The guest's name for a moment when the monitor turns to it, on an overlay plane the plan
        # leaves free (the daemon picks it: `label_plane`), so the guest stays zero copy.
        self.label_layer: CursorLayer | None = None
        self.label_plane = None
        self.label_reason = "no overlay plane is free on this CRTC"
        self.label_text: str | None = None
        # Layers let go of while their image is on screen: they stay until a commit turned their
        # plane off, so no framebuffer on screen is removed (the kernel would turn the plane off itself)
        self._dying: list[CursorLayer] = []
        # The native data plane (compositor.dataplane), set by the daemon when it runs one: while
        # `on_dp`, its thread commits the guest's frames to this CRTC (hand_over) and this object
        # holds none of them; take_back() makes it this object's again. `dp_buffer` finds the
        # Buffer of a data-plane buffer handle.
        self.dataplane = None
        self.dp_buffer: Callable[[int], Buffer | None] = lambda handle: None
        self.dp_output = -1
        self.on_dp = False
        self._dp_seen: OutputStats | None = None  # its counters as last folded into `metrics`
        self._bind(out)

    def _bind(self, out: OutputAssignment) -> None:
        self.out = out
        self.connector = next(c for c in self.card.connectors if c.id == out.connector_id)
        crtc = self.card.crtc_by_id(out.crtc_id)
        for attr in ("cursor_layer", "label_layer"):
            layer = getattr(self, attr)
            if layer is None:
                continue
            if layer.plane.id == out.plane_id:
                # The plan gives this plane to the picture now: the configuration commit below takes
                # it over, so the layer is forgotten without a commit of its own.
                layer.forget_commit()
                self._retire(layer)
                setattr(self, attr, None)
            elif layer.crtc is not crtc:
                self._drop_layer(layer)  # another CRTC: its cursor plane is another too
                setattr(self, attr, None)
        if self.crtc is not None and self.crtc is not crtc:
            self.layer.unbind(self.crtc.id, self)
        self.crtc = crtc
        self.layer.bind(crtc.id, self)
        self.plane = next(p for p in self.card.planes if p.id == out.plane_id)
        self.fb_prop = self.plane.prop("FB_ID").id
        self.mode = live_mode(out.mode)
        # The CRTC's cursor plane. The planner never gives a cursor plane to a guest's picture, so it
        # is this output's alone.
        own = next((p for p in self.card.planes if p.type == "cursor"
                    and crtc in p.possible_crtcs and p.supports(ARGB8888)), None)
        # Without one, the overlay the daemon lent for the cursor stays lent while it fits this CRTC.
        lent = self.cursor_plane if self.cursor_plane is not None and self.cursor_plane.type == "overlay" \
            and crtc in self.cursor_plane.possible_crtcs and self.cursor_plane.id != out.plane_id else None
        self.cursor_plane = own or lent
        self.cursor_reason = "" if self.cursor_plane is not None else \
            f"CRTC {crtc.id} has no cursor plane that takes ARGB8888"

    @property
    def name(self) -> str:
        return f"{self.out.monitor} ({self.out.connector})"

    # --- configuration (blocking commits; the caller makes sure nothing is in flight) -----------

    def start(self, first: Frame | None) -> None:
        """Light the output: mode, and the first frame (or the slate), TEST_ONLY first."""
        self._configure(first, modeset=True)

    def reconfigure(self, out: OutputAssignment, first: Frame | None) -> None:
        """A new assignment for the same connector: same guest or another, maybe a new mode."""
        self.take_back()
        assert self.in_flight is None, "reconfigure with a flip in flight"
        self._drop_dp_output()   # the CRTC or plane may change: the next hand-over makes it anew
        modeset = (out.crtc_id, out.mode) != (self.out.crtc_id, self.out.mode) or not self._lit
        old_plane = self.plane
        self._bind(out)
        self._retire(self.copy)
        self.copy = None
        self.path, self.fallbacks, self.plane_key, self.dead_end = SLATE, [], None, False
        pending, self.pending = self.pending, None
        if pending is not None:  # `first` comes with a hold of its own, even when it is this frame
            self.release(pending)
        self._configure(first, modeset=modeset, old_plane=old_plane)

    def _configure(self, first: Frame | None, *, modeset: bool, old_plane=None) -> None:
        self.configurations += 1
        if modeset:
            for layer in self._layers():
                layer.forget_commit()  # the commit below sets the whole cursor and label state again
        out = self.out
        if out.guest is None:
            self._show_slate(out.slate.reason if out.slate else "no guest", modeset, old_plane)
            return
        if first is None:
            self._show_slate(f"waiting for {out.guest}'s first frame", modeset, old_plane)
            return
        self._show_frame_blocking(first, modeset, old_plane)

    def _request(self, fb: Framebuffer, src: Rect, dst: Rect, modeset: bool, old_plane=None,
                 layers: list[CursorLayer] | None = None):
        req = self.layer.atomic()
        if modeset:
            req.add_output(self.connector, self.crtc, self.mode)
        if old_plane is not None and old_plane.id != self.plane.id:
            req.add_plane(old_plane, None, None)
        req.add_plane(self.plane, self.crtc, fb, (src.x, src.y, src.w, src.h), (dst.x, dst.y, dst.w, dst.h))
        for layer in layers or ():
            layer.add_to(req)
        return req

    # --- the cursor plane -----------------------------------------------------------------------------

    def set_cursor(self, cursor: Cursor | None, pointer: Pointer | None) -> None:
        """The guest's pointer image and position (guest buffer pixels): shown on this CRTC's cursor
        plane with the next commit — the next frame's, or one of its own if no frame is due. On the
        data plane a move (or a hide) of an image already drawn stays there: the data plane commits
        it; a new image takes the output back to be drawn and committed from here."""
        if self.on_dp:
            layer = self.cursor_layer
            if self.cursor_plane is None or (layer is None and cursor is None) or (
                    layer is not None and layer.disabled is not None):
                return   # nothing of it reaches this output's planes: no reason to take it back
            if self._dp_cursor(cursor, pointer):
                return
        self.take_back()
        if self.cursor_plane is None:
            return
        if self.cursor_layer is None:
            if cursor is None:
                return
            self.cursor_layer = CursorLayer(self.card, self.cursor_plane, self.crtc)
        if self.out.guest is None:
            cursor = pointer = None  # a slate shows no pointer
        if self.cursor_layer.set(cursor, pointer, self.out.src, self.out.dst):
            self._layers_kick()

    def _dp_cursor(self, cursor: Cursor | None, pointer: Pointer | None) -> bool:
        """Hand the cursor plane's new state to the data plane; False when it needs Python (no layer
        yet, the plane refused it, or an image not drawn in a slot yet)."""
        layer = self.cursor_layer
        if layer is None or layer.disabled is not None or self.out.guest is None:
            return False
        before = (layer.cursor, layer.pointer, layer.wanted)
        if not layer.set(cursor, pointer, self.out.src, self.out.dst):
            return True   # nothing changes on the plane
        values = layer.plane_values()
        if values is None:
            layer.cursor, layer.pointer, layer.wanted = before   # as it was: Python draws it
            return False
        props = [layer.plane.prop(name).id for name in self.dataplane.CURSOR_PROPS]
        try:
            self.dataplane.set_cursor(self.dp_output, layer.plane.id, props, values)
        except OSError:
            layer.cursor, layer.pointer, layer.wanted = before
            return False
        layer.handed_over()
        return True

    def use_cursor_plane(self, plane, reason: str, taken: bool = False) -> None:
        """The daemon's choice where the CRTC has no cursor plane: a free overlay plane, or none and why.
        `taken`: the plan gave the old plane to a picture (so nothing is committed to it from here)."""
        self.take_back()
        if plane is not self.cursor_plane and self.cursor_layer is not None:
            self._drop_layer(self.cursor_layer, taken)
            self.cursor_layer = None
        self.cursor_plane, self.cursor_reason = plane, reason

    def use_label_plane(self, plane, taken: bool = False) -> None:
        """The daemon's choice of overlay plane for the guest's name (None: none free); `taken` as above."""
        self.take_back()
        if plane is not self.label_plane and self.label_layer is not None:
            self._drop_layer(self.label_layer, taken)
            self.label_layer = None
        self.label_plane = plane

    def _drop_layer(self, layer: CursorLayer, taken: bool = False) -> None:
        """Let go of a layer: freed once nothing of it is on screen."""
        if layer.committed is None or taken or layer.disabled is not None:
            if taken:
                layer.forget_commit()
            self._retire(layer)
            return
        layer.set(None, None, UNSCALED, UNSCALED)
        self._dying.append(layer)
        self._layers_kick()

    def _reap(self) -> None:
        """Dying layers whose plane a commit turned off are retired (freed after the next commit)."""
        for layer in [lay for lay in self._dying if lay.committed is None or lay.disabled is not None]:
            self._dying.remove(layer)
            self._retire(layer)

    def show_label(self, text: str | None) -> None:
        """Show `text` (the guest's name) in the top-left corner on the label plane, or hide it (None).
        Where no overlay plane is free, nothing is shown and status says so: never the copy path."""
        self.take_back()
        self.label_text = text
        if self.label_plane is None:
            if self.label_layer is not None:
                self._retire(self.label_layer)
                self.label_layer = None
            return
        image = render_label(text) if text else None
        layer = self.label_layer
        if image is None and layer is None:
            return
        resized = image is not None and layer is not None and (layer.width, layer.height) != (image.width,
                                                                                             image.height)
        if layer is None or resized:
            if image is None:
                return
            if self.label_layer is not None:
                self._drop_layer(self.label_layer)  # off with the old size first
            self.label_layer = CursorLayer(self.card, self.label_plane, self.crtc,
                                           size=(image.width, image.height))
        where = Pointer(LABEL_MARGIN, LABEL_MARGIN, True) if image is not None else None
        if self.label_layer.set(image, where, UNSCALED, UNSCALED):
            self._layers_kick()

    def _layers(self) -> list[CursorLayer]:
        return [layer for layer in (self.cursor_layer, self.label_layer, *self._dying) if layer is not None]

    def _layers_due(self, full: bool) -> list[CursorLayer]:
        """The cursor and label planes the next commit must carry (`full`: a configuration commit,
        which sets everything)."""
        live = [layer for layer in (self.cursor_layer, self.label_layer) if layer is not None]
        planes = {layer.plane.id for layer in live}
        for layer in self._dying:
            if layer.plane.id in planes:
                layer.forget_commit()  # a live layer takes its plane over in the same commit
        dying = [layer for layer in self._dying if layer.committed is not None]
        return [layer for layer in (*dying, *live) if layer.disabled is None and (layer.dirty or full)]

    def _layers_kick(self) -> None:
        """A cursor or label change: commit it now if the CRTC is idle; else the flip event handler
        will, with the next frame or on its own."""
        if not self._lit or not self.may_commit or self.in_flight is not None or self._outstanding:
            return
        if self.pending is not None:
            self._commit_pending()
        elif self._layers_due(False):
            self._commit_layers()

    def _commit_layers(self) -> None:
        due = self._layers_due(False)
        ScanoutPipeline._tokens += 1
        token = ScanoutPipeline._tokens
        req = self.layer.atomic()
        for layer in due:
            layer.add_to(req)
        new_image = any(layer.wanted is not None and (layer.committed is None
                                                       or layer.committed[0] != layer.wanted[0])
                        for layer in due)
        try:
            if new_image:  # a position change alone is not worth a TEST_ONLY round trip
                req.test()
            req.commit(nonblock=True, event=True, user_data=token)
        except Rejected as exc:
            for layer in due:
                layer.refuse(f"the plane refused the image ({exc})")
            self._status_note()
            return
        except KmsError as exc:
            log.error("%s: cursor commit failed: %s", self.name, exc)
            return
        for layer in due:
            layer.done()
        self._reap()
        self.in_flight = _Commit(None, None, token, cursor_only=True)
        self._outstanding.add(token)

    def _status_note(self) -> None:
        if self.on_path_change is not None:
            self.on_path_change()

    def _show_frame_blocking(self, frame: Frame, modeset: bool, old_plane=None) -> None:
        problem = self._fits(frame)
        if problem:
            self.release(frame)
            self._show_slate(problem, modeset, old_plane)
            return
        ScanoutPipeline._tokens += 1
        token = ScanoutPipeline._tokens
        try:
            commit = self._commit_frame(frame, modeset=modeset, old_plane=old_plane, token=token,
                                        blocking=True)
        except KmsError:
            self.release(frame)   # it never reached the plane: its hold ends here
            raise
        if commit is None:
            self.release(frame)
            self.dead_end = True  # later frames go straight back to the guest
            self._show_slate(self.reason or "the guest's buffer cannot be shown", modeset, old_plane)
            return
        # The commit is done and the frame on screen, so the guest is owed `presented`: a first frame,
        # or the first of a new size, comes this way and its guest may wait for nothing else. It is
        # reported when the commit's flip event is read, with the kernel's timestamp and sequence.
        self._awaiting_event[token] = (frame, time.monotonic_ns())
        self._free_retired()
        self._lit = True
        self._replace_on_screen(commit)
        log.info("%s: %s shown (%s, %s)", self.name, self.out.guest, self.path, frame.buffer.info.describe())
        self.metrics.frames += 1

    def _commit_frame(self, frame: Frame, *, modeset: bool = False, old_plane=None, token: int,
                      blocking: bool = False, copied: Framebuffer | None = None) -> _Commit | None:
        """Walk the ladder from the pipeline's rung: the first framebuffer whose configuration the
        kernel accepts is committed, blocking or nonblocking, with a flip event carrying `token`
        either way. None when every rung refused. A nonblocking frame that keeps the plane's
        configuration is only an FB_ID flip, the hot path. KmsError from the commit propagates."""
        for fb, path, src, dst in self._ladder(frame, copied):
            key = self._plane_key(fb, src, dst)
            layers = self._layers_due(blocking or modeset)
            if not blocking and key == self.plane_key and not layers:
                self._flip(fb, token)
            else:
                req = self._request(fb, src, dst, modeset, old_plane, layers)
                try:
                    req.test(allow_modeset=modeset)
                except Rejected as exc:
                    if not layers:
                        self._fall(path, self._refusal(path, dst, exc))
                        continue
                    # Without the cursor and label? Then they were at fault: the frames go on without.
                    req = self._request(fb, src, dst, modeset, old_plane)
                    try:
                        req.test(allow_modeset=modeset)
                    except Rejected:
                        self._fall(path, self._refusal(path, dst, exc))
                        continue
                    for layer in layers:
                        layer.refuse(f"TEST_ONLY refused the plane with the frame ({exc})")
                    layers = []
                # A blocking commit asks for its event too: it is the frame's presentation time.
                req.commit(allow_modeset=modeset, nonblock=not blocking, event=True, user_data=token)
                for layer in layers:
                    layer.done()
                self._reap()
                self.plane_key = key
            changed = path != self.path
            if changed:
                log.info("%s: %s now shown %s", self.name, self.out.guest, path)
            self.path = path
            if changed and self.on_path_change is not None:
                self.on_path_change()
            if path == ZERO_COPY:
                self.reason = ""
            return _Commit(frame, fb, token, src, dst)
        return None

    def _ladder(self, frame: Frame, copied: Framebuffer | None = None):
        """(framebuffer, path, src, dst) for the frame, best rung first, from the rung the pipeline
        is on. `copied`: the copy rung's framebuffer, the frame copied into it already (off the loop)."""
        buffer, out = frame.buffer, self.out
        if ZERO_COPY not in self.fallbacks and buffer.copy_only:
            self._fall(ZERO_COPY, buffer.copy_only)
        if ZERO_COPY not in self.fallbacks:
            try:
                yield self.fbcache.framebuffer(buffer), ZERO_COPY, out.src, out.dst
            except KmsError as exc:
                self._fall(ZERO_COPY, f"import refused: {exc}")
        if COPY not in self.fallbacks and copied is not None:
            full = Rect(0, 0, self.mode.width, self.mode.height)
            yield copied, COPY, full, full
        elif COPY not in self.fallbacks:
            size = (self.mode.width, self.mode.height)
            try:
                if self.copy is None or not self.copy.fits(buffer.info, size, out.src, out.dst):
                    self._retire(self.copy)
                    self.copy = None
                    self.copy = CopyBuffers(self.card, buffer.info, size, out.src, out.dst,
                                            native=self.native)
                fb = self.copy.copy(buffer, self.on_screen.fb if self.on_screen else None)
                self.metrics.copies += 1
                full = Rect(0, 0, *size)
                yield fb, COPY, full, full
            except (KmsError, OSError, ValueError, MemoryError) as exc:
                self._fall(COPY, f"copy impossible: {exc or type(exc).__name__}")

    def _refusal(self, path: str, dst: Rect, exc: KmsError) -> str:
        text = f"TEST_ONLY refused the {path} configuration ({exc})"
        if (dst.x, dst.y, dst.w, dst.h) != (0, 0, self.mode.width, self.mode.height):
            text += (f"; the plan puts the buffer at {dst} on a {self.mode.width}x{self.mode.height} screen "
                     f"and this plane may have to cover the whole CRTC")
        return text

    def _fall(self, path: str, reason: str) -> None:
        if path not in self.fallbacks:
            self.fallbacks.append(path)
        self.reason = reason
        nxt = {ZERO_COPY: COPY, COPY: SLATE}.get(path, "dark")
        log.warning("%s: %s → %s: %s", self.name, path, nxt, reason)

    def _show_slate(self, reason: str, modeset: bool, old_plane=None) -> None:
        slate = self.out.slate
        text, colour = (slate.text, slate.colour) if slate else ("no signal", "#101018")
        self._retire(self._slate)
        self._slate = None
        w, h = self.mode.width, self.mode.height
        self._slate = SlateBuffer.draw(self.card, w, h, text, colour, reason, native=self.native)
        fb = self._slate.fb
        full = Rect(0, 0, w, h)
        for layer in self._layers():
            layer.set(None, None, full, full)  # no pointer and no name over a slate
        layers = [layer for layer in self._layers() if layer.disabled is None
                  and (layer.dirty or modeset)]
        req = self._request(fb, full, full, modeset, old_plane, layers)
        req.test(allow_modeset=modeset)
        req.commit(allow_modeset=modeset)
        for layer in layers:
            layer.done()
        self._reap()
        self._free_retired()
        self._lit = True
        self._replace_on_screen(_Commit(None, fb, 0, full, full))
        self.plane_key = None
        changed = self.path != SLATE
        self.path, self.reason = SLATE, reason
        log.info("%s: slate (%s)", self.name, reason)
        if changed and self.on_path_change is not None:
            self.on_path_change()

    def _fits(self, frame: Frame) -> str | None:
        info, src = frame.buffer.info, self.out.src
        if src.x + src.w > info.width or src.y + src.h > info.height:
            return (f"{self.out.guest}'s buffer is {info.width}x{info.height}, the plan needs {src} of it "
                    f"(re-planning)")
        return None

    def _plane_key(self, fb: Framebuffer, src: Rect, dst: Rect) -> tuple:
        return (fb.width, fb.height, fb.format, src, dst, self.plane.id)

    # --- frames (nonblocking) -------------------------------------------------------------------

    def submit(self, frame: Frame) -> None:
        """A new frame from the guest: commit now if nothing is in flight, else it waits as the
        single pending frame (replacing, and dropping, any older one)."""
        self.take_back()
        self.metrics.frames += 1
        if self.pending is not None:
            self.metrics.dropped += 1
            self.release(self.pending)
        self.pending = frame
        self.metrics.max_pending = max(self.metrics.max_pending, int(self.pending is not None))
        if self.in_flight is None and self.may_commit:
            self._commit_pending()

    @property
    def may_commit(self) -> bool:
        return not (self.paused or self.suspended)

    def resume(self) -> None:
        """Commit the pending frame, if any, now that nothing is in flight."""
        if self.in_flight is None and self.may_commit and self.pending is not None:
            self._commit_pending()

    def _commit_pending(self) -> None:
        frame, self.pending = self.pending, None
        if frame is None:
            return
        if self._fits(frame) is not None:
            # Not showable as planned (a new size); the daemon re-plans. Hold it until then.
            self.pending = frame
            return
        if self.dead_end:
            self.release(frame)
            return
        ScanoutPipeline._tokens += 1
        token = ScanoutPipeline._tokens
        if self._copy_off_loop(frame, token):
            return
        self._commit_now(frame, token)

    def _commit_now(self, frame: Frame, token: int, copied: Framebuffer | None = None) -> None:
        try:
            commit = self._commit_frame(frame, token=token, copied=copied)
            done_ns = time.monotonic_ns()
        except KmsError as exc:
            self.metrics.errors += 1
            self.metrics.busy += isinstance(exc, Busy)
            log.error("%s: flip failed: %s", self.name, exc)
            self.release(frame)
            return
        if commit is None:
            # Every rung refused: the slate says why, and later frames go straight back to the guest.
            self.release(frame)
            self.dead_end = True
            self._show_slate(self.reason, False)
            return
        self.in_flight = commit
        self._outstanding.add(commit.token)
        self.metrics.commits += 1
        self.metrics.commit_delays_ns.append(done_ns - frame.received_ns)
        self.metrics.max_in_flight = max(self.metrics.max_in_flight, len(self._outstanding))

    def _copy_off_loop(self, frame: Frame, token: int) -> bool:
        """On the copy rung, with a worker to copy on: start the frame's copy there and commit when
        it is over (_copied); the CRTC counts as busy meanwhile. False: commit on the loop."""
        copy = self.copy
        # Only a guest's dma-buf: a buffer its source writes in place on this loop (a QEMU pixel
        # surface, a vGPU's region) is copied on the loop, between two of its writes.
        if (self.copier is None or ZERO_COPY not in self.fallbacks or COPY in self.fallbacks
                or frame.buffer.copy_only is not None or copy is None
                or not copy.fits(frame.buffer.info, (self.mode.width, self.mode.height),
                                 self.out.src, self.out.dst)):
            return False
        try:
            loop = asyncio.get_running_loop()
            job = copy.prepare(frame.buffer, self.on_screen.fb if self.on_screen else None)
        except (RuntimeError, OSError, ValueError, MemoryError):
            return False   # no loop here, or the source cannot be mapped: the ladder says why
        try:
            future = self.copier.submit(copy.run, job)
        except RuntimeError:   # the workers are shutting down
            copy.finish(job)
            return False
        commit = _Commit(frame, job.fb, token, copying=(job, future, copy))
        self.in_flight = commit
        future.add_done_callback(lambda _f: loop.call_soon_threadsafe(self._copied, commit))
        return True

    def _copied(self, commit: _Commit) -> None:
        """A frame's copy is over: commit it, unless the pipeline let go of it meanwhile."""
        try:
            self._copied_now(commit)
        except Exception:  # noqa: BLE001 — a callback of the loop: nothing above it would say why
            log.exception("%s: committing a copied frame failed", self.name)

    def _copied_now(self, commit: _Commit) -> None:
        if commit.copying is None or self.in_flight is not commit:
            return   # settled by _settle_copy already (stop, abandon)
        job, future, copy = commit.copying
        commit.copying = None
        copy.finish(job)
        self.in_flight = None
        frame = commit.frame
        if not self.may_commit:
            # The card was paused meanwhile (a VT switch): the frame waits, unless a newer one does.
            if self.pending is None:
                self.pending = frame
            else:
                self.release(frame)
            return
        exc = future.exception()
        if isinstance(exc, FenceTimeout):
            # The guest is still writing the buffer: this frame is skipped, the rung stays.
            self.metrics.errors += 1
            log.warning("%s: %s", self.name, exc)
            self.release(frame)
        elif exc is not None:
            # As a copy on the loop would have: the rung is given up, the ladder goes on below it.
            self._fall(COPY, f"copy impossible: {exc}")
            self._commit_now(frame, commit.token)
        else:
            self.metrics.copies += 1
            self._commit_now(frame, commit.token, copied=job.fb)
        if self.in_flight is None and self.may_commit:
            if self.pending is not None:
                self._commit_pending()
            elif self._layers_due(False):
                self._commit_layers()

    def _settle_copy(self) -> None:
        """Wait for a copy on the worker (milliseconds) and drop its frame: the pipeline is about to
        stop or forget what is in flight, and the copy must not write into a slot being freed."""
        commit = self.in_flight
        if commit is None or commit.copying is None:
            return
        job, future, copy = commit.copying
        commit.copying = None
        try:
            future.result()
        except Exception:  # noqa: BLE001 — the frame is dropped either way
            pass
        copy.finish(job)
        self.in_flight = None
        if commit.frame is not None:
            self.release(commit.frame)

    def _flip(self, fb: Framebuffer, token: int) -> None:
        self.layer.flip(self.plane, self.fb_prop, fb, token)

    def expects(self, token: int) -> bool:
        """Whether a flip event carrying `token` completes a commit of this pipeline."""
        return token in self._outstanding or token in self._awaiting_event

    def on_flip(self, event) -> None:
        """The flip event of this CRTC. A token that is not ours (a commit made before the last
        reconfiguration) is ignored."""
        self._outstanding.discard(event.user_data)
        shown = self._awaiting_event.pop(event.user_data, None)
        if shown is not None:
            # A blocking commit's event: its frame has been on screen since the commit returned, and
            # nothing else (in flight, pending) depends on it.
            self._report(shown[0], event)
            return
        commit = self.in_flight
        if commit is None or event.user_data != commit.token:
            return
        self.in_flight = None
        if not commit.cursor_only:
            self._replace_on_screen(commit)
            self._free_retired()
            if commit.frame is not None:
                self._report(commit.frame, event)
        if self.pending is not None and self.may_commit:
            self._commit_pending()
        elif self.may_commit and self._layers_due(False):
            self._commit_layers()

    def _report(self, frame: Frame, event) -> None:
        """`frame`'s flip completed (event: its flip event): count it and tell its source."""
        m = self.metrics
        m.presented += 1
        m.present_times.append(event.timestamp_ns)
        if event.timestamp_ns:
            m.latencies_ns.append(max(0, event.timestamp_ns - frame.received_ns))
        self.present(frame, event)

    def _replace_on_screen(self, commit: _Commit) -> None:
        old, self.on_screen = self.on_screen, commit
        if old is not None and old.frame is not None:  # each hand-over brought its own hold
            self.release(old.frame)

    # --- the data plane ---------------------------------------------------------------------------

    def shows(self, buffer: Buffer) -> bool:
        """Whether the plane reads `buffer` itself, now or once what is in flight or pending lands
        (zero copy): a redraw in place then needs no commit."""
        if self.path != ZERO_COPY:
            return False
        frames = [self.pending, self.in_flight.frame if self.in_flight is not None else None,
                  self.on_screen.frame if self.on_screen is not None else None]
        return any(f is not None and f.buffer is buffer for f in frames)

    def dp_ready(self) -> bool:
        """Whether the data plane could take the frames over now: the guest on screen zero copy with
        the plane's configuration settled, nothing in flight or waiting, no layer (cursor, label)
        due, committing allowed."""
        shown = self.on_screen
        return (self.dataplane is not None and not self.on_dp and self.path == ZERO_COPY
                and self.in_flight is None and self.pending is None and not self._awaiting_event
                and self.may_commit and not self.dead_end and self.plane_key is not None
                and shown is not None and shown.frame is not None and shown.frame.buffer.dp_handle >= 0
                and not self._layers_due(False) and not self._dying)

    def dp_fb(self, buffer: Buffer) -> None:
        """Make sure the data plane has buffer's framebuffer for this output (imported once, as
        for any frame). KmsError when the import is refused: the caller takes the output back."""
        fb = self.fbcache.framebuffer(buffer)
        self.dataplane.set_fb(buffer.dp_handle, self.dp_output, fb.id)

    def hand_over(self, conn: int) -> None:
        """The data plane commits the guest's frames (connection `conn`) to this CRTC once the
        daemon gave it all the guest's outputs (DataPlane.conn_show); call when dp_ready(). The frame
        on screen becomes the data plane's: its hold moves there."""
        dp = self.dataplane
        if self.dp_output < 0:
            self.dp_output = dp.add_output(self.card.dp_card, self.crtc.id, self.plane.id, self.fb_prop)
        shown = self.on_screen
        assert shown is not None and shown.frame is not None
        dp.set_fb(shown.frame.buffer.dp_handle, self.dp_output, shown.fb.id)
        dp.show(self.dp_output, conn, shown.frame.buffer.dp_handle, shown.frame.seq)
        self.on_screen = None
        self.on_dp = True
        self.release(shown.frame)

    def take_back(self) -> None:
        """Commit from Python again: what the data plane holds for this output (on screen, in
        flight, pending) becomes this object's, holds included; the event of a flip it has in flight
        comes here, by its token."""
        if not self.on_dp:
            return
        self.on_dp = False
        held = self.dataplane.release_output(self.dp_output)
        self._fold_dp()
        out = self.out

        def frame(handle: int, seq: int, presented: bool = False) -> Frame | None:
            buffer = self.dp_buffer(handle)
            return None if buffer is None else Frame(buffer=buffer, seq=seq, presented=presented)

        if held.on_screen >= 0 and (f := frame(held.on_screen, held.on_screen_frame, True)) is not None:
            self.on_screen = _Commit(f, self.fbcache.framebuffer(f.buffer), 0, out.src, out.dst)
        if held.in_flight_token:
            # A commit in flight: a frame's, or the cursor's alone. Either way the CRTC is busy until
            # its event, which comes here by its token.
            f = None if held.in_flight < 0 else frame(held.in_flight, held.in_flight_frame,
                                                      held.in_flight_presented)
            if f is not None:
                self.in_flight = _Commit(f, self.fbcache.framebuffer(f.buffer), held.in_flight_token,
                                         out.src, out.dst)
            else:
                self.in_flight = _Commit(None, None, held.in_flight_token, cursor_only=True)
            self._outstanding.add(held.in_flight_token)
        if self.cursor_layer is not None:
            self.cursor_layer.taken_back(held.cursor_pending, held.cursor_fb)
        if held.pending >= 0:
            self.pending = frame(held.pending, held.pending_frame, held.pending_presented)

    def _drop_dp_output(self) -> None:
        """Forget the data plane's output for this CRTC (taken back already), its counts folded."""
        if self.dp_output >= 0:
            self._fold_dp()
            self.dataplane.remove_output(self.dp_output)
            self.dp_output = -1
            self._dp_seen = None

    def _fold_dp(self) -> None:
        """Add what the data plane counted for this output since the last fold to `metrics`."""
        if self.dp_output < 0:
            return
        now = self.dataplane.stats(self.dp_output)
        self.metrics.fold_data_plane(now, self._dp_seen)
        self._dp_seen = now

    # --- end --------------------------------------------------------------------------------------

    def forget(self, key: tuple[str, int, int]) -> None:
        if self.copy is not None:
            self.copy.forget(key)

    def stop(self, *, commit: bool = True) -> None:
        """Turn the output off (blocking) and free what the pipeline owns. `commit=False` when the
        card is not ours to commit to (the session is paused; a reset commit turned it off)."""
        self.take_back()
        self._settle_copy()
        if self._lit and commit:
            req = self.layer.atomic().add_plane(self.plane, None, None)
            for layer in self._layers():
                if layer.committed is not None:
                    req.add_plane(layer.plane, None, None)
            req.add_output(self.connector, self.crtc, None)
            try:
                req.commit(allow_modeset=True)
            except KmsError as exc:
                log.error("%s: turning the output off failed: %s", self.name, exc)
        self._lit = False
        # Blocking commits whose event the loop has not read yet: their frames were shown all the
        # same, and with this pipeline gone nothing would route the event to them. The time the
        # commit returned stands in for the event's.
        for token, (frame, done_ns) in list(self._awaiting_event.items()):
            self._report(frame, FlipEvent(self.crtc.id, 0, done_ns, token))
        self._awaiting_event.clear()
        held = [self.pending] + [c.frame for c in (self.in_flight, self.on_screen) if c is not None]
        for frame in held:
            if frame is not None:
                self.release(frame)
        self.pending = self.in_flight = self.on_screen = None
        self._retire(self.copy)
        self._retire(self._slate)
        for layer in self._layers():
            self._retire(layer)
        self._dying.clear()
        self.copy = self._slate = self.cursor_layer = self.label_layer = None
        self._free_retired()
        self._drop_dp_output()
        self.layer.unbind(self.crtc.id, self, gone=True)

    def blank(self, reason: str) -> None:
        """The guest shows nothing now (its display is off): the slate, until its next frame. Called
        with nothing in flight."""
        self.take_back()
        pending, self.pending = self.pending, None
        if pending is not None:
            self.release(pending)
        self.fallbacks, self.plane_key, self.dead_end = [], None, False
        self._show_slate(reason, False)

    def force_modeset(self) -> None:
        """Make the next configuration a full modeset (the link went bad; the mode must be set again)."""
        self.take_back()
        self._lit = False

    def abandon_in_flight(self) -> None:
        """The flip event never came (a driver bug): take the commit as done."""
        self.take_back()
        self._settle_copy()
        if self.in_flight is not None:
            commit, self.in_flight = self.in_flight, None
            self._outstanding.discard(commit.token)
            if not commit.cursor_only:
                self._replace_on_screen(commit)

    def _retire(self, thing) -> None:
        """Free `thing` (copy buffers, a slate) once the commit replacing it is done: removing a
        framebuffer that is on screen would turn the plane off."""
        if thing is not None:
            self._retired.append(thing)

    def _free_retired(self) -> None:
        for thing in self._retired:
            thing.close()
        self._retired.clear()

    def scanned_out(self) -> Scanned | None:
        """What the plane scans out now (the commit on screen, not one still in flight), or None
        when nothing is. The caller reads it at once on the loop (our dumb buffers: the copy rung
        writes into a slot again once it is off screen) or holds the guest's buffer while it reads."""
        self.take_back()
        shown = self.on_screen
        if shown is None or shown.src is None or shown.dst is None:
            return None
        if shown.frame is None:
            if self._slate is None or self._slate.fb is not shown.fb:
                return None
            return Scanned(SLATE, None, self._slate.buffer, shown.fb.format, shown.src, shown.dst)
        # A copy slot on screen may belong to copy buffers already retired (a new size): they are
        # freed only once the commit replacing them is done, so look there too.
        for owner in (self.copy, *self._retired):
            if isinstance(owner, CopyBuffers):
                for buf, fb in owner.slots:
                    if fb is shown.fb:
                        return Scanned(COPY, shown.frame, buf, fb.format, shown.src, shown.dst)
        return Scanned(ZERO_COPY, shown.frame, None, shown.fb.format, shown.src, shown.dst)

    def _on_screen_status(self) -> dict | None:
        if self.on_dp:
            seen = self._dp_seen
            return {"buffer": seen.on_screen_buffer, "frame": seen.on_screen_frame} \
                if seen.on_screen_buffer else None
        if self.on_screen is None or self.on_screen.frame is None:
            return None
        return {"buffer": self.on_screen.frame.buffer.id, "frame": self.on_screen.frame.seq}

    def status(self) -> dict:
        self._fold_dp()
        return {
            "monitor": self.out.monitor, "card": self.out.card, "connector": self.out.connector,
            "crtc": self.out.crtc_id, "plane": self.out.plane_id, "mode": self.mode.label(),
            "guest": self.out.guest, "mirror": self.out.mirror, "path": self.path, "reason": self.reason,
            "fallbacks": list(self.fallbacks),
            **self.metrics.summary(),
            "configurations": self.configurations,
            "in_flight": self.in_flight is not None or (self.on_dp and self._dp_seen.in_flight),
            "on_screen": self._on_screen_status(),
            "data_plane": self.on_dp,
            "src": str(self.out.src), "dst": str(self.out.dst),
            "cursor": (self.cursor_layer.status() if self.cursor_layer is not None
                       else {"plane": self.cursor_plane.id if self.cursor_plane else None,
                             "shown": False, "disabled": self.cursor_reason or None}),
            "label": {"plane": self.label_plane.id if self.label_plane is not None else None,
                      "text": self.label_text if self.label_layer is not None
                      and self.label_layer.wanted is not None else None,
                      "disabled": (self.label_layer.disabled if self.label_layer is not None else None)
                      or (None if self.label_plane is not None else self.label_reason)},
        }


__all__ = ["ScanoutPipeline", "Scanned", "live_mode", "ZERO_COPY", "COPY", "SLATE"]
