"""`check --render`: draw a plan as a picture of the monitors and what each one shows.

Monitors are drawn side by side, grouped by card, at a common scale so that relative mode sizes are
true. Inside each screen, the guest's destination rectangle is filled with the guest's colour (the same
colour on every monitor that mirrors it); slates are drawn in their own colour with their text and
reason; outputs left off are dashed outlines. Pillow is imported only here, and only when asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compositor.planner import Assignment, Guest, OutputAssignment
from compositor.topology import Output

SCREEN_HEIGHT = 260  # pixels for the tallest mode
MARGIN = 36
GAP = 28
BEZEL = 8
CAPTION = 74
BACKGROUND = (236, 236, 240)
INK = (30, 30, 36)
MUTED = (110, 110, 120)


class RenderUnavailable(RuntimeError):
    pass


# Distinct colours, handed out in the order guests appear in the plan; a mirrored guest keeps its colour.
PALETTE = [(78, 154, 214), (230, 145, 56), (106, 180, 96), (196, 92, 146), (214, 190, 72), (120, 110, 200),
           (70, 175, 170), (205, 90, 80), (150, 150, 90), (160, 120, 90)]


def guest_colours(assignment: Assignment) -> dict[str, tuple[int, int, int]]:
    colours: dict[str, tuple[int, int, int]] = {}
    for a in assignment.outputs:
        if a.guest is not None and a.guest not in colours:
            colours[a.guest] = PALETTE[len(colours) % len(PALETTE)]
    return colours


def _hex(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def _ink_on(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return (255, 255, 255) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 140 else INK


def render(assignment: Assignment, outputs: Sequence[Output], guests: Sequence[Guest], path: Path,
           title: str = "") -> None:
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise RenderUnavailable("--render needs Pillow (pip install Pillow)") from None

    fonts = big, mid, small = _font(ImageFont, 20), _font(ImageFont, 14), _font(ImageFont, 12)
    kinds = {g.name: g for g in guests}
    colours = guest_colours(assignment)
    placed, right = _place(assignment, outputs)
    top = MARGIN + 64
    width = max(right - GAP + MARGIN, 640)
    bottom_lines = len(assignment.unplaced) + (1 if assignment.unplaced else 0)
    height = top + SCREEN_HEIGHT + 2 * BEZEL + CAPTION + 24 + 18 * bottom_lines + MARGIN

    img = Image.new("RGB", (width, height), BACKGROUND)
    d = ImageDraw.Draw(img)
    d.text((MARGIN, MARGIN - 8), f"directflip plan{': ' + title if title else ''}", fill=INK, font=big)

    card_spans: dict[str, list[int]] = {}
    for out, a, w, h, bx, sw, sh in placed:
        span = card_spans.setdefault(out.card.path, [bx, bx])
        span[1] = bx + sw + 2 * BEZEL
        screen = (bx + BEZEL, top + (SCREEN_HEIGHT - sh), sw, sh)  # monitors stand on a common baseline
        if a is None:
            _draw_off(d, assignment, out, screen, fonts)
            caption = [out.connector.name, f"{w}x{h} (not lit)"]
        else:
            _draw_lit(d, a, screen, w, h, colours, kinds, fonts)
            caption = [f"{a.monitor}  ·  {out.connector.name}",
                       f"{a.mode}  ·  CRTC {a.crtc_id}  plane {a.plane_id}"]
        cy = top + SCREEN_HEIGHT + BEZEL + 10
        d.text((bx, cy), caption[0], fill=INK, font=mid)
        d.text((bx, cy + 20), caption[1], fill=MUTED, font=small)
        notes = a.notes if a is not None else ()
        for i, n in enumerate(notes[:2]):
            d.text((bx, cy + 38 + 14 * i), _clip(d, n, sw + 2 * BEZEL, small), fill=(160, 60, 40), font=small)

    for card_path, (x0, x1) in card_spans.items():
        card = next(o.card for o in outputs if o.card.path == card_path)
        d.text((x0, top - 40), f"{card_path}  ({card.driver})", fill=MUTED, font=mid)
        d.line((x0, top - 20, x1, top - 20), fill=(190, 190, 198), width=1)

    _draw_unplaced(d, assignment, top + SCREEN_HEIGHT + 2 * BEZEL + CAPTION + 10, width, fonts)
    img.save(path, "PNG")


def _font(image_font: Any, size: int) -> Any:
    try:
        return image_font.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: one fixed size
        return image_font.load_default()


def _place(assignment: Assignment, outputs: Sequence[Output]
           ) -> tuple[list[tuple[Output, OutputAssignment | None, int, int, int, int, int]], int]:
    """Each present output's box: its mode (an output left off at its preferred size), its left edge
    and its drawn size at the common scale; and the right edge of the last box, past its gap.
    Cards go left to right, a gap between monitors, a wider one between cards."""
    lit = {(a.card, a.connector_id): a for a in assignment.outputs}
    boxes: list[tuple[Output, OutputAssignment | None, int, int]] = []
    for out in outputs:
        a = lit.get((out.card.path, out.connector.id))
        if a is not None:
            w, h = a.mode.width, a.mode.height
        else:
            m = out.connector.preferred_mode or (out.connector.modes[0] if out.connector.modes else None)
            w, h = (m.width, m.height) if m else (1024, 768)
        boxes.append((out, a, w, h))
    tallest = max((h for *_, h in boxes), default=768)
    scale = SCREEN_HEIGHT / tallest

    x = MARGIN
    placed = []
    last_card = None
    for out, a, w, h in boxes:
        if last_card is not None and out.card.path != last_card:
            x += GAP * 2
        sw, sh = max(140, round(w * scale)), max(60, round(h * scale))
        placed.append((out, a, w, h, x, sw, sh))
        x += sw + 2 * BEZEL + GAP
        last_card = out.card.path
    return placed, x


def _draw_off(d: Any, assignment: Assignment, out: Output, screen: tuple[int, int, int, int],
              fonts: tuple[Any, Any, Any]) -> None:
    """An output left off: a dashed outline with the reason the plan gives."""
    big, _, small = fonts
    sx, sy, sw, sh = screen
    _dashed_rect(d, (sx, sy, sx + sw, sy + sh), MUTED)
    dark = next((dk for dk in assignment.dark if (dk.card, dk.connector_id) ==
                 (out.card.path, out.connector.id)), None)
    d.text((sx + 10, sy + 10), "off", fill=MUTED, font=big)
    if dark is not None:
        _wrapped(d, (sx + 10, sy + 40), dark.reason, sw - 20, small, MUTED)


def _draw_lit(d: Any, a: OutputAssignment, screen: tuple[int, int, int, int], w: int, h: int,
              colours: dict[str, tuple[int, int, int]], kinds: dict[str, Guest],
              fonts: tuple[Any, Any, Any]) -> None:
    """A lit output: the bezel, then the guest's destination rectangle in its colour with what it
    shows, or the slate with its text and reason."""
    big, _, small = fonts
    sx, sy, sw, sh = screen
    bx = sx - BEZEL
    d.rounded_rectangle((bx, sy - BEZEL, bx + sw + 2 * BEZEL, sy + sh + BEZEL), radius=6,
                        fill=(40, 40, 46))
    if a.guest is not None:
        d.rectangle((sx, sy, sx + sw - 1, sy + sh - 1), fill=(0, 0, 0))
        colour = colours[a.guest]
        fx, fy = sw / w, sh / h
        r = a.dst
        box = (sx + round(r.x * fx), sy + round(r.y * fy),
               sx + round((r.x + r.w) * fx) - 1, sy + round((r.y + r.h) * fy) - 1)
        d.rectangle(box, fill=colour)
        ink = _ink_on(colour)
        g = kinds.get(a.guest)
        d.text((box[0] + 10, box[1] + 8), a.guest, fill=ink, font=big)
        for i, line in enumerate(_guest_detail(a, g)):
            d.text((box[0] + 10, box[1] + 36 + 16 * i), line, fill=ink, font=small)
    else:
        assert a.slate is not None
        colour = _hex(a.slate.colour)
        d.rectangle((sx, sy, sx + sw - 1, sy + sh - 1), fill=colour)
        ink = _ink_on(colour)
        tw = d.textlength(a.slate.text, font=big)
        d.text((sx + (sw - tw) / 2, sy + sh / 2 - 22), a.slate.text, fill=ink, font=big)
        _wrapped(d, (sx + 10, sy + sh / 2 + 6), a.slate.reason, sw - 20, small, ink, centre=True)


def _guest_detail(a: OutputAssignment, g: Guest | None) -> list[str]:
    """The lines under a guest's name: its kind, mirror, rectangles and scaling."""
    detail = [(g.kind or "any kind") if g else ""]
    if a.mirror:
        detail.append("mirror")
    detail.append(f"src {a.src}")
    detail.append(f"dst {a.dst}")
    if a.scaling != "none":
        detail.append(f"scaled: {a.scaling}")
    return [t for t in detail if t]


def _draw_unplaced(d: Any, assignment: Assignment, y: int, width: int, fonts: tuple[Any, Any, Any]) -> None:
    """The guests the plan shows nowhere, with the reason, under the monitors."""
    _, mid, small = fonts
    if assignment.unplaced:
        d.text((MARGIN, y), "not shown:", fill=INK, font=mid)
        for u in assignment.unplaced:
            y += 18
            d.text((MARGIN + 12, y), _clip(d, f"{u.guest}: {u.reason}", width - 2 * MARGIN, small),
                   fill=MUTED, font=small)


def _clip(d: Any, text: str, width: float, font: Any) -> str:
    if d.textlength(text, font=font) <= width:
        return text
    while text and d.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _wrapped(d: Any, at: tuple[float, float], text: str, width: float, font: Any, fill: Any,
             centre: bool = False) -> None:
    words, lines, line = text.split(), [], ""
    for w in words:
        trial = f"{line} {w}".strip()
        if d.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = w
    if line:
        lines.append(line)
    x, y = at
    for i, ln in enumerate(lines[:3]):
        dx = (width - d.textlength(ln, font=font)) / 2 if centre else 0
        d.text((x + dx, y + 15 * i), ln, fill=fill, font=font)


def _dashed_rect(d: Any, box: tuple[int, int, int, int], fill: Any, dash: int = 8) -> None:
    x0, y0, x1, y1 = box
    for x in range(x0, x1, dash * 2):
        d.line((x, y0, min(x + dash, x1), y0), fill=fill, width=2)
        d.line((x, y1, min(x + dash, x1), y1), fill=fill, width=2)
    for y in range(y0, y1, dash * 2):
        d.line((x0, y, x0, min(y + dash, y1)), fill=fill, width=2)
        d.line((x1, y, x1, min(y + dash, y1)), fill=fill, width=2)
