"""Where a guest's input goes: the one interface every transport implements.

Codes are Linux evdev codes (`KEY_*`, `BTN_*`, linux/input-event-codes.h) whatever the transport:
each sink translates them to what its peer speaks (QEMU qnum codes and button numbers, frame-socket
JSON, uinput events). Positions are pixels of the guest's framebuffer (the buffer it shows, not the
monitor), already mapped through the plane's source and destination rectangles.

Every method returns at once and never raises for a slow or vanished peer: a sink that cannot keep up
drops input (and says so once in its log), so no guest can hold up the compositor's loop.
"""

from __future__ import annotations

from typing import Protocol

TOUCH_KINDS = ("down", "motion", "up", "cancel")


class InputSink(Protocol):
    @property
    def absolute(self) -> bool:
        """True when the guest takes absolute pointer positions (`pointer_abs`), False when it wants
        relative motion (`pointer_rel`). It may change while the guest runs."""

    def key(self, code: int, down: bool) -> None:
        """A keyboard key (evdev `KEY_*`) pressed or released. Autorepeat is the guest's business:
        the compositor sends only real presses and releases."""

    def button(self, code: int, down: bool) -> None:
        """A pointer button (evdev `BTN_LEFT` … `BTN_TASK`) pressed or released."""

    def wheel(self, dx: int, dy: int) -> None:
        """Wheel detents: dy > 0 is away from the user (evdev `REL_WHEEL`), dx > 0 to the right."""

    def pointer_abs(self, x: int, y: int) -> None:
        """The pointer is at (x, y) in the guest's framebuffer pixels."""

    def pointer_rel(self, dx: int, dy: int) -> None:
        """The pointer moved by (dx, dy) device units."""

    def touch(self, kind: str, slot: int, x: int, y: int) -> None:
        """A touch contact (`kind` in TOUCH_KINDS) of multitouch `slot` at (x, y), framebuffer pixels."""
