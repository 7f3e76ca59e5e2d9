"""Scanout: one pipeline per lit output, turning a guest's frames into page flips.

How a frame reaches the screen. A source hands over a Frame (a buffer the guest has finished drawing).
The pipeline keeps three slots: `pending` (the newest frame not yet committed), `in_flight` (the one
commit the kernel is working on) and `on_screen`. A frame arriving while a commit is in flight
replaces `pending`; the frame it replaces is dropped and handed back to the guest at once, so a guest
flipping faster than the monitor never builds a queue: latest frame wins. When the flip event of the
in-flight commit arrives, the frame that was on screen goes back to the guest, and `pending`, if any,
is committed. There is therefore never more than one commit in flight per CRTC, which is also what the
kernel demands (EBUSY otherwise).

Which framebuffer a frame becomes is decided by a ladder, each rung logged and shown in status:
  1. zero copy: the guest's dma-buf is imported into the card once (FramebufferCache, keyed by the
     guest's buffer id) and scanned out directly; the guest's memory is on the plane;
  2. copy: the card refused the buffer (a foreign dma-buf on virtio-gpu, a buffer the TEST_ONLY commit
     rejects), so the pixels are copied into the pipeline's own dumb buffers, one copy per committed
     frame (dropped frames are never copied); with a `copier` (the daemon's worker threads) a flip's
     copy runs there and the frame is committed when it is over, the CRTC busy meanwhile;
  3. slate: nothing of the guest can be shown (a tiled buffer that cannot be copied, a refused
     configuration); the output shows its slate with the reason instead.
A pipeline stays on the rung it fell to until it is configured again (the next assignment).

Every configuration change (a mode, a new plane position, a first frame of a new size) is tried with
TEST_ONLY first. The per-frame flip, once the plane is configured, only changes FB_ID: that is the hot
path, done by native/kms_helpers.c (or, for comparison, the same through AtomicRequest).

A configuration that shows a frame is a blocking commit, but it asks for a flip event all the same:
that frame (a guest's first, or its first of a new size) is reported presented when the event is read,
exactly as a flipped frame is.

The modules, in the direction a frame travels:
  pipeline  the per-output state machine (ScanoutPipeline): the slots, the ladder, the commits, the
            hand-over to the native data plane;
  fbcache   the zero copy rung's framebuffers: a card's imported guest dma-bufs (FramebufferCache);
  copy      the copy rung: the guest's pixels copied into dumb buffers of the card's (CopyBuffers);
  slate     what the pipeline draws itself: the slate and the guest's name label;
  metrics   what each output counts, for status (Metrics).
The names other modules import are re-exported here; among them, with a redundant alias, what
compositor/capture.py reads a guest's buffer with as the copy rung does (DMA_BUF_SYNC_*, _dmabuf_sync,
_read_file, _source).
"""

from compositor.scanout.copy import DMA_BUF_SYNC_END as DMA_BUF_SYNC_END
from compositor.scanout.copy import DMA_BUF_SYNC_READ as DMA_BUF_SYNC_READ
from compositor.scanout.copy import DMA_BUF_SYNC_START as DMA_BUF_SYNC_START
from compositor.scanout.copy import CopyBuffers
from compositor.scanout.copy import _dmabuf_sync as _dmabuf_sync
from compositor.scanout.copy import _read_file as _read_file
from compositor.scanout.copy import _source as _source
from compositor.scanout.fbcache import FramebufferCache
from compositor.scanout.metrics import Metrics
from compositor.scanout.pipeline import COPY, SLATE, ZERO_COPY, Scanned, ScanoutPipeline, live_mode
from compositor.scanout.slate import render_slate

__all__ = ["ScanoutPipeline", "FramebufferCache", "CopyBuffers", "Metrics", "Scanned", "render_slate",
           "live_mode", "ZERO_COPY", "COPY", "SLATE"]
