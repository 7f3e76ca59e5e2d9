"""How a QEMU display source treats its handler: every event is a call of a QemuDisplayHandler method;
one that raises is logged and the source goes on (QEMU still gets its reply); a handler that needs
only some events takes the rest from QemuDisplayHandlerDefaults."""

from __future__ import annotations

import logging
import socket

from test_qemu_dbus import XRGB8888, Recorder, memfd, run

from compositor.sources.qemu_dbus import QemuDisplayHandlerDefaults, QemuDisplaySource, QemuTarget, wait_for
from directflip_tools.qemu_peer import QemuDisplayPeer

LOGGER = "directflip.qemu_dbus"


class Tripping(Recorder):
    """Records every event, then raises on each."""

    def on_frame(self, source, frame) -> None:
        super().on_frame(source, frame)
        raise RuntimeError("on_frame tripped")

    def on_forget(self, source, buffer) -> None:
        super().on_forget(source, buffer)
        raise RuntimeError("on_forget tripped")

    def on_blank(self, source, reason: str) -> None:
        super().on_blank(source, reason)
        raise RuntimeError("on_blank tripped")

    def on_cursor(self, source) -> None:
        super().on_cursor(source)
        raise RuntimeError("on_cursor tripped")

    def on_close(self, source, reason: str) -> None:
        super().on_close(source, reason)
        raise RuntimeError("on_close tripped")


class FramesOnly(QemuDisplayHandlerDefaults):
    def __init__(self) -> None:
        self.frames = []

    def on_frame(self, source, frame) -> None:
        self.frames.append(frame)


async def connected(handler):
    ours, theirs = socket.socketpair()
    peer = QemuDisplayPeer(width=64, height=32)
    source = QemuDisplaySource("vm", QemuTarget(sock=ours), handler)
    source.start()
    await peer.serve_peer(theirs)
    listener = await peer.listener()
    assert await wait_for(lambda: source.state == "connected", 5)
    return peer, source, listener


def test_a_handler_that_raises_is_logged_and_every_event_still_comes(caplog):
    caplog.set_level(logging.ERROR, logger=LOGGER)

    async def body():
        rec = Tripping()
        peer, source, listener = await connected(rec)
        w, h, stride = 64, 32, 256
        for _ in range(2):   # answered without an error, though on_frame raised
            await listener.scanout_dmabuf(memfd(stride * h), w, h, stride, XRGB8888)
        await listener.update_dmabuf(0, 0, 8, 8)
        await listener.cursor_define(4, 4, 0, 0, bytes(64))
        await listener.mouse_set(1, 2, 1)
        await listener.disable()   # both buffers handed back, though the first on_forget raised
        source.close()
        peer.close()
        return rec

    rec = run(body())
    assert len(rec.frames) == 3 and rec.cursor_events == 2
    assert len(rec.forgotten) == 2 and len(rec.blanks) == 1 and len(rec.closes) == 1
    failed = [r.getMessage() for r in caplog.records if "the handler's" in r.getMessage()]
    assert failed == [f"vm: the handler's {event} failed" for event in (
        "on_frame", "on_frame", "on_frame", "on_cursor", "on_cursor", "on_forget", "on_forget", "on_blank",
        "on_close")]
    assert all(r.exc_info is not None for r in caplog.records if "the handler's" in r.getMessage())


def test_a_handler_of_frames_only_takes_the_other_events_from_the_defaults(caplog):
    caplog.set_level(logging.ERROR, logger=LOGGER)

    async def body():
        handler = FramesOnly()
        peer, source, listener = await connected(handler)
        w, h, stride = 64, 32, 256
        await listener.scanout_dmabuf(memfd(stride * h), w, h, stride, XRGB8888)
        await listener.cursor_define(4, 4, 0, 0, bytes(64))
        await listener.disable()
        source.close()
        peer.close()
        return handler

    frames = run(body()).frames
    assert len(frames) == 1
    frames[0].buffer.close()   # handed back through the defaults' on_forget, which keeps nothing
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
