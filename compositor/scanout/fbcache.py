"""The framebuffer cache: a guest's dma-bufs imported into a card, each once, as KMS framebuffers.

The zero copy rung puts the guest's own memory on the plane: its dma-buf is imported (PRIME) and
wrapped in a framebuffer the first time a frame of it arrives, and every later frame of the same
buffer flips to that framebuffer. One cache per card, shared by the card's outputs (a guest mirrored
on two monitors of a card imports its buffers once).
"""

from __future__ import annotations

import logging

from compositor.kms import Card, Framebuffer, KmsError
from compositor.sources.frame import Buffer

log = logging.getLogger("directflip.scanout")


class FramebufferCache:
    """Imported guest buffers of one card: Buffer.key (guest, buffer id, serial) → framebuffer,
    imported once.

    PRIME import of a dma-buf the card already knows gives back the same GEM handle, so handles are
    reference-counted: two buffer ids naming one dma-buf must not close each other's handle."""

    def __init__(self, card: Card) -> None:
        self.card = card
        self.entries: dict[tuple[str, int, int], tuple[Framebuffer, int]] = {}
        self._handle_refs: dict[int, int] = {}
        self.imports = 0

    def framebuffer(self, buffer: Buffer) -> Framebuffer:
        hit = self.entries.get(buffer.key)
        if hit is not None:
            return hit[0]
        info = buffer.info
        handle = self.card.import_dmabuf(buffer.fd)
        self._handle_refs[handle] = self._handle_refs.get(handle, 0) + 1
        try:
            fb = self.card.add_framebuffer(info.width, info.height, info.fourcc, [handle], [info.stride],
                                           [info.offset], info.modifier)
        except KmsError:
            self._unref(handle)
            raise
        self.entries[buffer.key] = (fb, handle)
        self.imports += 1
        return fb

    def drop(self, key: tuple[str, int, int]) -> None:
        entry = self.entries.pop(key, None)
        if entry is None:
            return
        fb, handle = entry
        try:
            fb.remove()
        except KmsError as exc:
            log.warning("removing framebuffer of %s buffer %d: %s", key[0], key[1], exc)
        self._unref(handle)

    def _unref(self, handle: int) -> None:
        self._handle_refs[handle] -= 1
        if not self._handle_refs[handle]:
            del self._handle_refs[handle]
            self.card.close_handle(handle)

    def clear(self) -> None:
        for key in list(self.entries):
            self.drop(key)
