"""Where a directflip instance's sockets live.

Kept apart from the frame socket's implementation so that `directflip status` and `capture`, which only
need the control socket's path, do not import asyncio and the KMS layer to find it.
"""

from __future__ import annotations

import re

RUN_DIR = "/run/directflip"
DEFAULT_FRAME_SOCKET = f"{RUN_DIR}/frames.sock"  # where `directflip run` listens unless told otherwise
SEAT_NAME = re.compile(r"seat[A-Za-z0-9_-]+")  # logind's rule for seat names


def socket_paths(seat: str | None) -> tuple[str, str]:
    """Default (frame socket, control socket) of the instance for `seat` (None: the one instance that
    serves every seat). One directory per seat, so instances for different seats never share one."""
    if seat is None:
        return DEFAULT_FRAME_SOCKET, f"{RUN_DIR}/control.sock"
    if not SEAT_NAME.fullmatch(seat):
        raise ValueError(f"{seat!r} is not a seat name: logind seats are `seat` followed by letters, "
                         f"digits, `_` or `-` (seat0, seat1, seat-kiosk)")
    return f"{RUN_DIR}/{seat}/frames.sock", f"{RUN_DIR}/{seat}/control.sock"
