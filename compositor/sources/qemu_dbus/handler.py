"""What a QEMU display source hands the daemon: `QemuFrame`s, and the events of
`QemuDisplayHandler`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from compositor.sources.frame import Buffer, Frame

if TYPE_CHECKING:
    from compositor.sources.qemu_dbus.source import QemuDisplaySource


@dataclass(eq=False)
class QemuFrame(Frame):
    """A Frame from QEMU: also what changed and which way up the picture is."""

    damage: tuple[int, int, int, int] | None = None  # x, y, width, height that changed; None: all
    y0_top: bool = True  # False: QEMU's buffer is bottom-up (a GL texture); shown as it is


class QemuDisplayHandler(Protocol):
    """What the daemon does with a QEMU display. Callbacks run on the event loop, must not block and
    must not raise (an exception is logged; QEMU still gets its reply). The source calls each of them:
    a handler that needs only some inherits QemuDisplayHandlerDefaults for the rest."""

    def on_frame(self, source: QemuDisplaySource, frame: QemuFrame) -> None:
        """Show frame.buffer (one of source.buffers) now."""

    def on_forget(self, source: QemuDisplaySource, buffer: Buffer) -> None:
        """The source dropped `buffer`: it left source.buffers and the handler owns it; close it once
        it is off screen."""

    def on_blank(self, source: QemuDisplaySource, reason: str) -> None:
        """Nothing to show (Disable, or the VM went away and the source is waiting for it): the slate."""

    def on_cursor(self, source: QemuDisplaySource) -> None:
        """source.cursor or source.pointer changed."""

    def on_close(self, source: QemuDisplaySource, reason: str) -> None:
        """The source stopped for good (closed, or a handed-over connection ended). The handler owns
        every buffer still in source.buffers."""


class QemuDisplayHandlerDefaults:
    """A QemuDisplayHandler that does nothing with any event. The source calls every method of the
    handler, so a handler that cares for only some events (a tool, a test) inherits this and overrides
    those."""

    def on_frame(self, source: QemuDisplaySource, frame: QemuFrame) -> None:
        pass

    def on_forget(self, source: QemuDisplaySource, buffer: Buffer) -> None:
        pass

    def on_blank(self, source: QemuDisplaySource, reason: str) -> None:
        pass

    def on_cursor(self, source: QemuDisplaySource) -> None:
        pass

    def on_close(self, source: QemuDisplaySource, reason: str) -> None:
        pass
