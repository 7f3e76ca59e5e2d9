"""The output layer: one per card, the one way the daemon's frames and commits reach it.

It owns what a card's outputs share: the card, its cache of imported framebuffers, and which scanout
pipeline drives which CRTC. Every flip goes through `flip()` (the FB_ID-only hot path, native or
AtomicRequest), every configuration through `atomic()`, every flip event of the card through
`route()` (a table lookup by CRTC, never a scan of the outputs), and `reset()` is the first commit
after gaining master ("reset the world"). The pipelines (compositor/scanout/) decide what to commit
and when; this module is where it meets the card.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from compositor.kms import Card, FlipEvent, Framebuffer, KmsError
from compositor.kms.atomic import AtomicRequest
from compositor.kms.card import lib
from compositor.kms.errors import kms_error
from compositor.scanout import FramebufferCache

if TYPE_CHECKING:
    from compositor.scanout import ScanoutPipeline

log = logging.getLogger("directflip.output")


class OutputLayer:
    """One card's outputs. `native`: flips go through native/kms_helpers.c's kms_flip, else through
    AtomicRequest (the pure-Python path, for comparison)."""

    def __init__(self, card: Card, *, native: bool = True) -> None:
        self.card = card
        self.native = native
        self.fbcache = FramebufferCache(card)
        self._by_crtc: dict[int, ScanoutPipeline] = {}
        self._pipes: list[ScanoutPipeline] = []   # every pipeline bound here and not stopped

    @property
    def path(self) -> str:
        return self.card.path

    # --- commits

    def atomic(self) -> AtomicRequest:
        return AtomicRequest(self.card)

    def flip(self, plane, fb_prop: int, fb: Framebuffer, token: int) -> None:
        """Put `fb` on `plane` (configured already: only FB_ID changes), nonblocking, its flip event
        carrying `token`. KmsError when the kernel refuses (EBUSY: a commit in flight)."""
        if self.native:
            ret = lib.kms_flip(self.card.fd, plane.id, fb_prop, fb.id, token)
            if ret < 0:
                raise kms_error("kms_flip", -ret, f"plane {plane.id} FB {fb.id}")
        else:
            self.atomic().add(plane, "FB_ID", fb).commit(nonblock=True, event=True, user_data=token)

    def reset(self) -> None:
        """Every plane, CRTC and connector off (blocking), so nothing another program left on screen
        (fbcon, a crashed compositor) stays visible. Errors are logged: the outputs are lit anew
        after it either way."""
        card = self.card
        req = self.atomic()
        for plane in card.planes:
            req.add_plane(plane, None, None)
        for conn in card.connectors:
            if conn.crtc is not None:
                req.add(conn, "CRTC_ID", None)
        for crtc in card.crtcs:
            if crtc.active:
                req.add(crtc, "ACTIVE", 0).add(crtc, "MODE_ID", None)
        try:
            req.commit(allow_modeset=True)
        except KmsError as exc:
            log.error("%s: resetting the outputs failed: %s", card.path, exc)

    # --- flip events

    def bind(self, crtc_id: int, pipe: ScanoutPipeline) -> None:
        """`pipe` drives `crtc_id` from now on: its flip events go there."""
        self._by_crtc[crtc_id] = pipe
        if pipe not in self._pipes:
            self._pipes.append(pipe)

    def unbind(self, crtc_id: int, pipe: ScanoutPipeline, *, gone: bool = False) -> None:
        """`pipe` lets go of `crtc_id` (unless another pipeline has taken it over already); `gone`:
        it stopped for good."""
        if self._by_crtc.get(crtc_id) is pipe:
            del self._by_crtc[crtc_id]
        if gone and pipe in self._pipes:
            self._pipes.remove(pipe)

    def route(self, event: FlipEvent) -> ScanoutPipeline | None:
        """Hand a flip event of this card to the pipeline whose commit it completes: the one driving
        its CRTC, a table lookup. Only when that one does not expect it (a plan moved CRTCs between
        outputs while a flip was in flight) are the card's other pipelines asked, by the event's
        token. The pipeline it went to, or None when none is left (a commit of an output gone)."""
        pipe = self._by_crtc.get(event.crtc_id)
        if pipe is None or not pipe.expects(event.user_data):
            pipe = next((p for p in self._pipes if p.expects(event.user_data)), pipe)
        if pipe is not None:
            pipe.on_flip(event)
        return pipe
