"""Writeback connectors: have the display engine write what a CRTC scans out into a framebuffer.

On vkms this is the pixel-exact readback of a "monitor"; on real hardware it is how directflip can
show an operator what a screen shows without copying the guest's buffer on the flip path.
"""

from __future__ import annotations

import os

from .atomic import AtomicRequest
from .card import Connector, Crtc, Framebuffer
from .drm import ffi
from .wait import readable


class WritebackJob:
    """The out-fence of one writeback; wait() returns once the frame is in the framebuffer."""

    def __init__(self) -> None:
        self._fence = ffi.new("int32_t *", -1)

    @property
    def fence_ptr(self) -> int:
        return int(ffi.cast("uintptr_t", self._fence))

    def wait(self, timeout: float = 2.0) -> None:
        fd = int(self._fence[0])
        if fd < 0:
            raise RuntimeError("the writeback was not committed (no out-fence)")
        try:
            if not readable(fd, timeout):
                raise TimeoutError(f"writeback did not complete within {timeout:.1f}s")
        finally:
            os.close(fd)
            self._fence[0] = -1


def add_writeback(req: AtomicRequest, connector: Connector, crtc: Crtc, fb: Framebuffer) -> WritebackJob:
    """Add a one-shot writeback of crtc into fb to req; commit req, then wait() on the job."""
    if not connector.is_writeback:
        raise ValueError(f"connector {connector.name} is not a writeback connector")
    job = WritebackJob()
    req.add(connector, "CRTC_ID", crtc)
    req.add(connector, "WRITEBACK_FB_ID", fb)
    req.add(connector, "WRITEBACK_OUT_FENCE_PTR", job.fence_ptr)
    return job
