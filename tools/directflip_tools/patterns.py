"""Test patterns: XRGB8888 images that are unique per index and show their orientation.

Each pattern is a two-axis gradient (red grows left→right, green grows top→bottom, blue is set by
the index) with a one-pixel white frame on the outermost pixels, a white "flag" in the top-left
quadrant (a tall bar and a shorter arm to its right, like an F: any flip or rotation moves it),
and `index + 1` black squares along the top edge, so a wrong head, a mirrored or cropped picture
and an off-by-one scanout all change the pixels. light_patterns() puts them on outputs in one
commit; the lab tests and `make demo` use it.
"""

from __future__ import annotations

import numpy as np

from compositor.formats import XRGB8888
from compositor.kms import Card, choose_mode
from compositor.kms.atomic import AtomicRequest

WHITE = 0xFFFFFF
BLACK = 0x000000


def pattern(width: int, height: int, index: int = 0) -> np.ndarray:
    """An (height, width) uint32 array of XRGB8888 pixels (X bits zero)."""
    if width < 16 or height < 16:
        raise ValueError(f"pattern needs at least 16x16 pixels, not {width}x{height}")
    x = np.arange(width, dtype=np.uint32)
    y = np.arange(height, dtype=np.uint32)
    red = (x * 255 // (width - 1))[None, :]
    green = (y * 255 // (height - 1))[:, None]
    blue = np.uint32((40 + 70 * index) % 256)
    img = (red << 16) | (green << 8) | blue
    img = np.broadcast_to(img, (height, width)).astype(np.uint32)
    unit = max(2, min(width, height) // 16)
    # The flag: a bar 1 unit wide, 4 tall, and an arm 2 units long at its top.
    img[2 * unit:6 * unit, 2 * unit:3 * unit] = WHITE
    img[2 * unit:3 * unit, 3 * unit:5 * unit] = WHITE
    # index + 1 black squares along the top, right of the flag.
    for i in range(index + 1):
        x0 = 7 * unit + i * 2 * unit
        if x0 + unit < width - 1:
            img[unit:2 * unit, x0:x0 + unit] = BLACK
    img[0, :] = img[-1, :] = WHITE
    img[:, 0] = img[:, -1] = WHITE
    return img


def to_rgb(xrgb: np.ndarray) -> np.ndarray:
    """(H, W) XRGB8888 → (H, W, 3) uint8 RGB, the layout of a screendump."""
    return np.stack([(xrgb >> 16) & 0xFF, (xrgb >> 8) & 0xFF, xrgb & 0xFF], axis=-1).astype(np.uint8)


def write_xrgb(dest, img: np.ndarray, pitch: int) -> None:
    """Copy img into a mapped buffer (mmap or memoryview) with the given pitch in bytes."""
    height, width = img.shape
    view = np.frombuffer(dest, dtype=np.uint32, count=(pitch // 4) * height).reshape(height, pitch // 4)
    view[:, :width] = img


def read_xrgb(src, width: int, height: int, pitch: int) -> np.ndarray:
    """The (H, W) XRGB8888 pixels of a mapped buffer, X bits cleared."""
    view = np.frombuffer(src, dtype=np.uint32, count=(pitch // 4) * height).reshape(height, pitch // 4)
    return view[:, :width] & np.uint32(0xFFFFFF)


def mismatch(actual: np.ndarray, expected: np.ndarray) -> str | None:
    """None when equal; else a short description (size or the first differing pixels)."""
    if actual.shape != expected.shape:
        return f"size {actual.shape[:2][::-1]} != expected {expected.shape[:2][::-1]}"
    diff = np.argwhere(np.any(actual != expected, axis=-1) if actual.ndim == 3 else actual != expected)
    if not len(diff):
        return None
    y, x = diff[0]
    return (f"{len(diff)} pixels differ; first at x={x} y={y}: got {actual[y, x].tolist()}, "
            f"expected {expected[y, x].tolist()}")


class PatternHead:
    """One output lit with patterns: connector → CRTC → primary plane, fed from dumb buffers."""

    def __init__(self, card: Card, connector_name: str, crtc, mode_spec: str) -> None:
        self.card = card
        self.connector = card.connector(connector_name)
        self.crtc = crtc
        self.plane = card.planes_for(crtc, "primary")[0]
        self.mode = choose_mode(self.connector.modes, mode_spec)
        self.buffers: list = []

    def framebuffer(self, index: int):
        """A framebuffer holding pattern `index` at the head's mode size, and its expected RGB."""
        buf = self.card.create_dumb(self.mode.width, self.mode.height)
        img = pattern(self.mode.width, self.mode.height, index)
        write_xrgb(buf.map(), img, buf.pitch)
        fb = self.card.dumb_framebuffer(buf, XRGB8888)
        self.buffers.append((buf, fb))
        return fb, to_rgb(img)


def light_patterns(card: Card, specs: list[tuple[str, str, int]]):
    """Light every (connector, mode spec, pattern index) in ONE blocking atomic commit, each on a CRTC
    of its own. Returns (heads, expected RGB per head, properties in the commit)."""
    req = AtomicRequest(card)
    heads, expected, used = [], [], set()
    for name, spec, index in specs:
        conn = card.connector(name)
        crtc = next(c for c in conn.possible_crtcs if c.id not in used)
        used.add(crtc.id)
        head = PatternHead(card, name, crtc, spec)
        fb, rgb = head.framebuffer(index)
        req.add_output(head.connector, crtc, head.mode).add_plane(head.plane, crtc, fb)
        heads.append(head)
        expected.append(rgb)
    count = len(req)
    req.commit(allow_modeset=True)
    return heads, expected, count
