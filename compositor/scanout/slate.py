"""What the pipeline draws itself rather than take from a guest: the slate and the guest's name.

The slate is what a monitor shows when no guest can be shown (none assigned, its first frame not come
yet, a buffer no rung could show): the policy's colour and text, the reason below it, drawn into a
dumb buffer of the card's the size of the mode. The label is the guest's name, shown for a moment on
an overlay plane when a monitor turns to a guest; it is drawn in the slate's colours.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from compositor.formats import XRGB8888
from compositor.kms import Card, Framebuffer, KmsError
from compositor.kms.card import DumbBuffer
from compositor.pixelcopy import copy_rows
from compositor.planner import Rect
from compositor.sources.frame import Cursor

log = logging.getLogger("directflip.scanout")

LABEL_MARGIN = 16  # pixels from the top-left corner
UNSCALED = Rect(0, 0, 1, 1)  # a label is not scaled


def render_label(text: str) -> Cursor:
    """The guest's name as an opaque ARGB8888 image: white text on the slate's dark blue, padded."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=28)
    left, top, right, bottom = font.getbbox(text)
    w, h = right - left + 24, bottom - top + 16
    img = Image.new("RGBA", (w, h), (16, 16, 24, 255))
    ImageDraw.Draw(img).text((12 - left, 8 - top), text, font=font, fill=(255, 255, 255, 255))
    return Cursor(w, h, 0, 0, img.tobytes("raw", "BGRA"), hash(text) & 0x7FFFFFFF)


def render_slate(width: int, height: int, text: str, colour: str, reason: str) -> bytes:
    """A mode-sized XRGB8888 image: the slate colour, its text large and the reason below it."""
    from PIL import Image, ImageDraw, ImageFont

    rgb = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
    img = Image.new("RGB", (width, height), rgb)
    draw = ImageDraw.Draw(img)
    ink = (230, 230, 230) if sum(rgb) < 384 else (20, 20, 20)
    big = ImageFont.load_default(size=max(12, height // 12))
    small = ImageFont.load_default(size=max(10, height // 40))
    lines = ((big, text, height // 2 - height // 12), (small, reason, height // 2 + height // 24))
    for font, line, y in lines:
        if not line:
            continue
        box = draw.textbbox((0, 0), line, font=font)
        draw.text(((width - (box[2] - box[0])) // 2, y), line, font=font, fill=ink)
    return img.convert("RGBX").tobytes("raw", "BGRX")


@dataclass
class SlateBuffer:
    """A slate drawn into a dumb buffer, and the framebuffer the plane scans it out through."""

    buffer: DumbBuffer
    fb: Framebuffer

    @classmethod
    def draw(cls, card: Card, width: int, height: int, text: str, colour: str, reason: str, *,
             native: bool = True) -> SlateBuffer:
        """A mode-sized slate on `card`; `native`: the pixels go in with kms_copy_rows, as the copy
        rung's do, else with the pure-Python copy."""
        buf = card.create_dumb(width, height, 32)
        pixels = render_slate(width, height, text, colour, reason)
        copy_rows(buf.map(), 0, buf.pitch, pixels, 0, width * 4, height, width * 4, native=native)
        fb = card.dumb_framebuffer(buf, XRGB8888)
        return cls(buf, fb)

    def close(self) -> None:
        try:
            self.fb.remove()
        except KmsError as exc:
            log.warning("removing a slate framebuffer: %s", exc)
        self.buffer.destroy()
