"""Guest sources: each knows one guest and emits Frames (VFIO mdev planes, QEMU D-Bus, frame socket,
synthetic guests). Sources never touch KMS.

`Source` is what the daemon knows every source by: it keeps one per guest and asks nothing of its
type. The frame socket's GuestConnection, the VFIO VfioGuest and the QEMU QemuDisplaySource implement
it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from compositor.input.sink import InputSink
    from compositor.sources.frame import Buffer


class Source(Protocol):
    """One guest's frames. Frames and buffers reach the daemon through the source's handler
    callbacks (on_frame, on_forget, on_close, ...); this is what the daemon asks of it besides."""

    name: str
    buffers: dict[int, Buffer]   # the buffers it announced and still has, by id
    peer: Any                    # the process at the other end (pid, uid), when one is known
    mdev: str | None             # the vGPU (mediated device UUID) it reads, if it is one
    dp_conn: int                 # its connection on the daemon's data plane (-1: none)
    input: InputSink | None      # where the guest's input goes, when the source carries it

    def close(self, reason: str) -> None:
        """Stop for good (idempotent); the handler's on_close follows where the guest was welcomed."""

    def let_go(self) -> None:
        """The daemon let go of the guest (it left, or its source was closed): free what only the
        guest's frames needed. The source may live on (a QEMU display source reconnects)."""

    def evicted(self) -> list[Buffer]:
        """Buffers the source dropped on its own (a vGPU's replaced dma-bufs) that the daemon still
        has to forget; empty for sources whose guest forgets its buffers itself."""

    def show_monitor(self, edid: bytes | None) -> None:
        """Where the guest is shown now: the EDID of its main monitor, or None when shown nowhere
        (a vGPU passes it on as its display's EDID; other sources ignore it)."""

    def guest_status(self) -> dict[str, Any]:
        """The source's own fields of the guest's entry in `directflip status --json`."""


class SourceDefaults:
    """What a source that asks nothing of these hooks answers: no vGPU, nothing freed when its guest
    goes, no buffers evicted, no EDID to pass on. Sources inherit it and override what they need."""

    mdev: str | None = None
    dp_conn: int = -1   # its connection on the daemon's data plane (-1: none)
    input: InputSink | None = None   # none of its own: a vGPU's input is the daemon's uinput devices

    def let_go(self) -> None:
        pass

    def evicted(self) -> list[Buffer]:
        return []

    def show_monitor(self, edid: bytes | None) -> None:
        pass
