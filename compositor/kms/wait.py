"""Waiting for a descriptor to become readable, with a bound, whatever its number.

select(2) takes only descriptors below FD_SETSIZE (1024); the compositor raises its descriptor limit
far above that at start (frame-socket guests may hold thousands), so a card opened late, a guest's
dma-buf or a fence can have any number. poll(2) has no such bound.
"""

from __future__ import annotations

import select


def readable(fd: int, timeout: float) -> bool:
    """Whether `fd` became readable (or hung up, or failed) within `timeout` seconds."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000 + 0.999))))
