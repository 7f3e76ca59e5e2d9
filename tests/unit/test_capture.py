"""`directflip capture` without a writeback connector (compositor/capture.py and Daemon.capture): the
buffer on the plane read back, its SRC rectangle placed at its destination on a black mode-sized
image, on test_scanout's fake card (whose guest buffers are memfds and whose dumb buffers are
anonymous mappings) and test_daemon_guests' daemon, which is never started.

A guest pixel (x, y) of buffer `tag` is the XRGB8888 bytes x, y, tag, 0x80, so it reads back as the
RGB (tag, y, x): where a pixel lands in the picture says where in which buffer it came from."""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading

import numpy as np
import pytest
from fakes.card import CRTC, FakeCard
from PIL import Image
from test_daemon_guests import CARD, POLICY, Conn, fake_topology
from test_scanout import (
    H,
    Rig,
    W,
    assignment,
    composed,
    guest_buffer,
)

from compositor import capture as readback
from compositor.capture import CaptureError
from compositor.control import ControlServer, describe_capture
from compositor.daemon import Daemon
from compositor.formats import XRGB8888, fourcc
from compositor.output import OutputLayer
from compositor.planner import Rect
from compositor.scanout import COPY, SLATE, ZERO_COPY, render_slate
from compositor.sources.frame import Buffer, Frame, PlaneInfo
from compositor.sources.framesocket import Peer

# OutputLayer commits on the fake card (tests/unit/conftest.py)
pytestmark = pytest.mark.usefixtures("fake_native_flip")


FULL = Rect(0, 0, W, H)
SRC, DST = Rect(4, 2, 16, 10), Rect(10, 7, 16, 10)
LAYOUT = dict(w=24, h=16, stride=24 * 4 + 16, offset=64)  # a padded stride and an offset to skip


def expected(tag: int, src: Rect, dst: Rect) -> np.ndarray:
    """The screen the plane shows: src of buffer `tag` at dst, black elsewhere, as RGB."""
    return np.frombuffer(composed(W * 4, tag, src, dst), np.uint8).reshape(H, W, 4)[..., [2, 1, 0]]


def picture(rig: Rig) -> np.ndarray:
    """What capture gives for the pipeline's plane, read as the daemon reads it."""
    shown = rig.pipe.scanned_out()
    assert shown is not None
    if shown.dumb is not None:
        rows = readback.read_rect(shown.dumb.map(), 0, shown.dumb.pitch, shown.fourcc, shown.src)
    else:
        rows = readback.read_guest_buffer(readback.dup_buffer(shown.frame.buffer), shown.src)
    return readback.compose(rows, shown.fourcc, shown.src, shown.dst, (W, H))


def sealed_buffer(tag: int, w: int = W, h: int = H) -> Buffer:
    """A guest buffer in a memfd sealed against shrinking: read through a mapping, as a dma-buf is."""
    plain = guest_buffer(tag, w, h)
    try:
        data = os.pread(plain.fd, plain.info.span, 0)
    finally:
        plain.close()
    fd = os.memfd_create(f"sealed-{tag}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, len(data))
    os.pwrite(fd, data, 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return Buffer("office", tag, PlaneInfo(XRGB8888, w, h, w * 4), fd)


# ------------------------------------------------------------------------- what the plane shows


def test_zero_copy_reads_the_src_rectangle_of_the_guest_buffer_and_places_it_at_dst():
    # The plan shows 16x10 from 4,2 of a 24x16 buffer (padded stride, offset) at 10,7. Capture reads
    # exactly that rectangle from the guest's buffer (skipping the offset and the stride's padding,
    # which are 0xEE and would show) and puts it at 10,7 on a black 40x30 picture.
    rig = Rig(assignment(src=SRC, dst=DST), native=False)
    buf = guest_buffer(5, **LAYOUT)
    try:
        rig.pipe.start(Frame(buf, seq=3))
        shown = rig.pipe.scanned_out()
        assert (shown.path, shown.frame.buffer, shown.dumb, shown.src, shown.dst) == (ZERO_COPY, buf, None,
                                                                                       SRC, DST)
        assert (picture(rig) == expected(5, SRC, DST)).all()
    finally:
        rig.pipe.stop()
        buf.close()


def test_the_copy_rung_and_zero_copy_give_the_same_picture():
    # The card refusing the import: the plane shows our mode-sized copy buffer (SRC and destination
    # the whole screen). Reading it back gives the picture zero copy gives for the same plan.
    rig = Rig(assignment(src=SRC, dst=DST), native=False)
    rig.card.refuse_import = lambda fd: True
    buf = guest_buffer(5, **LAYOUT)
    try:
        rig.pipe.start(Frame(buf))
        shown = rig.pipe.scanned_out()
        assert (shown.path, shown.frame.buffer, shown.src, shown.dst) == (COPY, buf, FULL, FULL)
        assert shown.dumb is not None and shown.dumb.pitch > W * 4   # the fake pads the pitch to 64
        assert (picture(rig) == expected(5, SRC, DST)).all()
    finally:
        rig.pipe.stop()
        buf.close()


def test_the_copy_on_screen_is_read_not_the_one_in_flight():
    # A new frame copied into the other slot and in flight: until its flip event the screen still
    # shows the first copy, and that is what capture reads; after the event, the second.
    rig = Rig(native=False)
    rig.card.refuse_import = lambda fd: True
    first, second = guest_buffer(1), guest_buffer(2)
    try:
        rig.pipe.start(Frame(first))
        rig.pipe.submit(Frame(second))
        assert rig.pipe.in_flight is not None
        assert (picture(rig) == expected(1, FULL, FULL)).all()
        rig.flip()
        assert (picture(rig) == expected(2, FULL, FULL)).all()
    finally:
        rig.pipe.stop()
        first.close()
        second.close()


def test_the_slate_is_read_from_its_buffer():
    rig = Rig(assignment(guest=None), native=False)
    try:
        rig.pipe.start(None)
        shown = rig.pipe.scanned_out()
        assert (shown.path, shown.frame, shown.fourcc, shown.src, shown.dst) == (SLATE, None, XRGB8888, FULL,
                                                                               FULL)
        slate = np.frombuffer(render_slate(W, H, "no signal", "#101018", "no guest"), np.uint8)
        assert (picture(rig) == slate.reshape(H, W, 4)[..., [2, 1, 0]]).all()
    finally:
        rig.pipe.stop()


def test_nothing_on_screen_after_stop():
    rig = Rig(native=False)
    rig.pipe.start(None)
    rig.pipe.stop()
    assert rig.pipe.scanned_out() is None


# ------------------------------------------------------------------------- reading and converting


def test_a_mapped_buffer_is_read_between_sync_start_and_end(monkeypatch):
    # A dma-buf is mapped read-only and read between DMA_BUF_IOCTL_SYNC START|READ and END|READ, on
    # the capture's own duplicate of the fd, which the read closes.
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(readback, "_dmabuf_sync", lambda fd, flags: calls.append((fd, flags)))
    buf = sealed_buffer(9)
    try:
        own = readback.dup_buffer(buf)
        fd = own.fd
        rows = readback.read_guest_buffer(own, FULL)
        assert (readback.compose(rows, XRGB8888, FULL, FULL, (W, H)) == expected(9, FULL, FULL)).all()
        start, end = readback.DMA_BUF_SYNC_START, readback.DMA_BUF_SYNC_END
        assert calls == [(fd, start | readback.DMA_BUF_SYNC_READ), (fd, end | readback.DMA_BUF_SYNC_READ)]
        assert own.fd == -1 and buf.fd >= 0
    finally:
        buf.close()


def test_a_buffer_that_cannot_be_mapped_is_refused_with_the_reason():
    # What an exporter without mmap (or the stock mbochs, whose dma-buf is O_RDONLY) gives: mmap fails.
    # A pipe cannot be mapped either (ENODEV).
    r, w = os.pipe()
    os.close(w)
    buf = Buffer("office", 4, PlaneInfo(XRGB8888, W, H, W * 4), r)
    with pytest.raises(CaptureError, match=r"office's buffer 4 cannot be read back: mapping its dma-buf "
                       r"for reading failed: No such device\. Its exporter gives the CPU no access"):
        readback.read_guest_buffer(buf, FULL)
    assert buf.fd == -1


def test_alpha_is_dropped_and_the_8_bit_formats_keep_their_channel_order():
    # One pixel, red 0x11, green 0x22, blue 0x33, alpha 0x44, in each layout.
    one = Rect(0, 0, 1, 1)
    for code, pixel in {"XR24": b"\x33\x22\x11\x00", "AR24": b"\x33\x22\x11\x44", "XB24": b"\x11\x22\x33\x00",
                        "AB24": b"\x11\x22\x33\x44", "RX24": b"\x00\x33\x22\x11", "BX24": b"\x00\x11\x22\x33",
                        "RG24": b"\x33\x22\x11", "BG24": b"\x11\x22\x33"}.items():
        readback.check_layout(fourcc(code))
        rows = readback.read_rect(bytearray(pixel), 0, len(pixel), fourcc(code), one)
        assert readback.compose(rows, fourcc(code), one, one, (1, 1)).tolist() == [[[0x11, 0x22, 0x33]]], code


def test_a_format_or_tiling_it_cannot_read_is_named():
    with pytest.raises(CaptureError, match=r"the buffer on the plane is RG16, which directflip cannot read "
                       r"back without a writeback connector \(it reads XR24, AR24"):
        readback.check_layout(fourcc("RG16"))
    with pytest.raises(CaptureError, match=r"is tiled \(I915_X_TILED\)"):
        readback.check_layout(XRGB8888, (1 << 56) | 1)


def test_a_scaling_plane_is_scaled_and_what_lies_off_screen_is_cut():
    two = np.full((2, 2 * 4), 0xFF, np.uint8)     # 2x2 white
    image = readback.compose(two, XRGB8888, Rect(0, 0, 2, 2), Rect(1, 1, 4, 4), (6, 6))
    assert image[1:5, 1:5].min() == 255 and image.sum() == 16 * 3 * 255
    image = readback.compose(two, XRGB8888, Rect(0, 0, 2, 2), Rect(5, 5, 2, 2), (6, 6))
    assert image[5, 5].tolist() == [255, 255, 255] and image.sum() == 3 * 255


# ------------------------------------------------------------------------------------- the daemon


class Lab:
    """The daemon on a fake card lit by the real planner, with one connected guest `office`."""

    def __init__(self, tmp_path) -> None:
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY)
        self.daemon = daemon = Daemon(policy, frame_socket=str(tmp_path / "f.sock"),
                                      control_socket=str(tmp_path / "c.sock"))
        self.card = FakeCard()
        self.card.path = CARD
        for conn in self.card.connectors:
            conn.is_writeback = False
        daemon.native = False
        daemon.cards, daemon.layers = {CARD: self.card}, {CARD: OutputLayer(self.card, native=False)}
        daemon.topology = fake_topology()
        self.conn = Conn("office", Peer(100, 0, 0))
        self.buffers: list[Buffer] = []

    async def show(self, buf: Buffer, seq: int) -> None:
        """The guest flips `buf`: shown by a re-plan (its first frame) or flipped and completed."""
        d = self.daemon
        if self.conn.name not in d.guests:
            d.on_hello(self.conn)
        if buf.id not in self.conn.buffers:
            self.conn.buffers[buf.id] = buf
            self.buffers.append(buf)
            d.on_buffer(self.conn, buf)
        d.on_flip(self.conn, Frame(buf, seq=seq))
        if d._replan_task is not None:
            await d._replan_task
        if CRTC in self.card.in_flight:
            d._flip_event(CARD, self.card.complete(CRTC))

    def close(self) -> None:
        for pipe in self.daemon.pipelines.values():
            pipe.stop()
        for buf in self.buffers:
            buf.close()


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path)
    yield lab
    lab.close()


def shot(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_capture_without_writeback_reads_the_committed_buffer(lab, tmp_path):
    # No writeback connector: the answer says the picture is the buffer (what was committed), which
    # frame of which guest, and through which rung; the PNG is the guest's picture.
    async def scenario() -> None:
        await lab.daemon.apply(lab.daemon.plan())
        answer = await lab.daemon.capture("left", str(tmp_path / "slate.png"))
        assert (answer["source"], answer["scanout"], answer["frame"]) == ("buffer", "slate", None)
        await lab.show(guest_buffer(1), 0)
        answer = await lab.daemon.capture("left", str(tmp_path / "left.png"))
        assert answer == {"path": str(tmp_path / "left.png"), "width": W, "height": H, "monitor": "left",
                          "guest": "office", "frame": {"buffer": 1, "frame": 0}, "source": "buffer",
                          "scanout": "zero-copy"}
        assert (shot(tmp_path / "left.png") == expected(1, FULL, FULL)).all()
        assert describe_capture(answer) == "buffer: what was committed, guest office frame 0"

    asyncio.run(scenario())


def test_capture_of_the_copy_rung_reads_our_copy(lab, tmp_path):
    lab.card.refuse_import = lambda fd: True

    async def scenario() -> None:
        await lab.daemon.apply(lab.daemon.plan())
        await lab.show(guest_buffer(2), 7)
        answer = await lab.daemon.capture("left", str(tmp_path / "left.png"))
        assert (answer["source"], answer["scanout"], answer["frame"]) == ("buffer", "copy",
                                                                         {"buffer": 2, "frame": 7})
        assert (shot(tmp_path / "left.png") == expected(2, FULL, FULL)).all()
        assert describe_capture(answer) == "buffer: what was committed, guest office frame 7 (copied)"

    asyncio.run(scenario())


def test_the_guest_buffer_is_held_until_the_read_ends(lab, tmp_path, monkeypatch):
    # The read runs off the loop and waits (as DMA_BUF_IOCTL_SYNC may). Meanwhile the guest flips two
    # newer frames and buffer 1 leaves the screen: the flip path goes on, but the guest is not told
    # `released` for buffer 1 until the read is over, so it cannot draw into it mid-read.
    go, reading = threading.Event(), threading.Event()
    real = readback.read_guest_buffer

    def slow(buffer: Buffer, rect: Rect) -> np.ndarray:
        reading.set()
        assert go.wait(10)
        return real(buffer, rect)

    monkeypatch.setattr(readback, "read_guest_buffer", slow)

    async def scenario() -> None:
        await lab.daemon.apply(lab.daemon.plan())
        await lab.show(guest_buffer(1), 0)
        task = asyncio.create_task(lab.daemon.capture("left", str(tmp_path / "left.png")))
        while not reading.is_set():
            assert not task.done(), task.result()
            await asyncio.sleep(0.01)
        await lab.show(guest_buffer(2), 1)
        await lab.show(guest_buffer(3), 2)
        (pipe,) = lab.daemon.pipelines.values()
        assert pipe.status()["on_screen"] == {"buffer": 3, "frame": 2}
        assert ("released", 2) in lab.conn.said and ("released", 1) not in lab.conn.said
        go.set()
        answer = await task
        assert answer["frame"] == {"buffer": 1, "frame": 0}
        assert ("released", 1) in lab.conn.said
        assert lab.daemon.guests["office"].conn.buffers[1].holds == 0
        assert (shot(tmp_path / "left.png") == expected(1, FULL, FULL)).all()

    asyncio.run(scenario())


def test_a_read_that_does_not_end_is_answered_and_the_hold_kept_until_it_does(lab, tmp_path, monkeypatch):
    go = threading.Event()
    real = readback.read_guest_buffer

    def stuck(buffer: Buffer, rect: Rect) -> np.ndarray:
        assert go.wait(10)
        return real(buffer, rect)

    monkeypatch.setattr(readback, "read_guest_buffer", stuck)
    monkeypatch.setattr(readback, "READ_TIMEOUT", 0.1)

    async def scenario() -> None:
        await lab.daemon.apply(lab.daemon.plan())
        await lab.show(guest_buffer(1), 0)
        with pytest.raises(CaptureError, match=r"office's buffer 1 did not become readable within 0.1 s "
                           r"\(DMA_BUF_IOCTL_SYNC waits for the writes pending on it\)"):
            await lab.daemon.capture("left", str(tmp_path / "left.png"))
        await lab.show(guest_buffer(2), 1)                 # buffer 1 leaves the screen
        assert ("released", 1) not in lab.conn.said
        go.set()
        for _ in range(500):
            if ("released", 1) in lab.conn.said:
                break
            await asyncio.sleep(0.01)
        assert ("released", 1) in lab.conn.said, "the hold was not released once the read ended"
        assert not (tmp_path / "left.png").exists()

    asyncio.run(scenario())


def test_capture_of_a_monitor_that_is_not_lit_says_why(lab, tmp_path):
    async def scenario() -> None:
        with pytest.raises(CaptureError, match=r"monitor 'left' is not lit: no connected output matches it "
                           r"now \(lit: none\)"):
            await lab.daemon.capture("left", str(tmp_path / "x.png"))
        await lab.daemon.apply(lab.daemon.plan())
        with pytest.raises(CaptureError, match=r"monitor 'right' is not lit: the policy has no monitor of "
                           r"that name \(lit: left\)"):
            await lab.daemon.capture("right", str(tmp_path / "x.png"))
        lab.daemon.session.paused[CARD] = "VT 7 is not in the foreground"
        with pytest.raises(CaptureError, match="is paused"):
            await lab.daemon.capture("left", str(tmp_path / "x.png"))

    asyncio.run(scenario())


# ------------------------------------------------------------------------------ the control socket


class Refusing:
    async def capture(self, monitor: str, path: str) -> dict:
        raise CaptureError("monitor 'left' is not lit: the policy has no monitor of that name (lit: none)")


def test_control_answers_a_capture_refusal_as_an_error(tmp_path):
    server = ControlServer(str(tmp_path / "c.sock"), Refusing())
    request = {"cmd": "capture", "monitor": "left", "path": str(tmp_path / "a.png")}
    answer = asyncio.run(server.handle(request))
    assert answer == {"ok": False, "error": "capture: monitor 'left' is not lit: the policy has no monitor "
                      "of that name (lit: none)"}


@pytest.mark.parametrize("path, reason", [
    ("/no/such/dir/a.png", r"is not a file in an existing directory: /no/such/dir does not exist"),
    ("a.png", r"is not absolute"),
    ("/", r"is a directory"),
])
def test_control_refuses_a_path_it_cannot_write_first(tmp_path, path, reason):
    server = ControlServer(str(tmp_path / "c.sock"), Refusing())
    with pytest.raises(ValueError, match=r'capture: "path" .* ' + reason):
        asyncio.run(server.handle({"cmd": "capture", "monitor": "left", "path": path}))


def test_the_cli_line_says_which_source_was_used():
    assert describe_capture({"source": "writeback", "guest": "vg", "frame": {"buffer": 2, "frame": 19},
                             "scanout": "zero-copy"}) == \
        "writeback: what the CRTC scanned out, guest vg frame 19"
    assert describe_capture({"source": "buffer", "guest": None, "frame": None, "scanout": "slate"}) == \
        "buffer: what was committed, the slate"


def test_an_unwritable_file_is_a_capture_error(tmp_path):
    # Checked before anything is read, the directory can still go away (or turn read-only) before the
    # file is written: the answer says so, without a traceback.
    (tmp_path / "gone").write_text("a file where the directory was")
    with pytest.raises(CaptureError, match=r"cannot write .*/gone/a\.png: Not a directory"):
        readback.write_png(np.zeros((1, 1, 3), np.uint8), str(tmp_path / "gone" / "a.png"))


def test_a_capture_replaces_a_planted_symlink_instead_of_following_it(tmp_path):
    # Someone who may write the directory points the capture's name at a file of root's: the PNG
    # lands in the directory and the file pointed at is untouched.
    import numpy as np

    from compositor.capture import write_png
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "shot.png").symlink_to(victim)
    write_png(np.zeros((4, 4, 3), np.uint8), str(tmp_path / "shot.png"))
    assert victim.read_text() == "precious"
    assert not (tmp_path / "shot.png").is_symlink()
    assert (tmp_path / "shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shot.png", "victim"]   # no temporary left
