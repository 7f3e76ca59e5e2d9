"""The command lines of the tools that `directflip` runs from a checkout: `directflip guest` (a synthetic
guest, directflip_tools.synthetic) and `directflip demo` (directflip_tools.demo). Light, like every
command line of compositor.cli: what a command needs is imported when it runs.
"""

from __future__ import annotations

import argparse
import re

from compositor.paths import DEFAULT_FRAME_SOCKET, RUN_DIR
from compositor.sources.frame import MAX_DIMENSION
from directflip_tools import demo
from directflip_tools.frame_layout import (
    CURSOR_BORDER,
    CURSOR_COLOUR,
    CURSOR_SIZE,
    MIN_HEIGHT,
    MIN_WIDTH,
    RGB,
    check_size,
)

# The frame socket's pointer modes (compositor.sources.framesocket.POINTER_MODES, which imports asyncio;
# tests/unit/test_synthetic.py checks the two agree).
POINTER_MODES = ("absolute", "relative")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `guest` and `demo`."""
    _register_guest(sub)
    p = sub.add_parser("demo", help="three synthetic guests on this machine's monitors (or in the lab VM)",
                       description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)


_DESCRIPTION = """\
Stand in for a virtual machine: allocate a few XRGB8888 buffers, hand them to a running
`directflip run` over its frame socket as dma-bufs, and flip them at a steady rate.

Each frame shows the guest's name on a colour of its own, a bar that moves 8 pixels per frame, and
the frame number as a band at (8, 8) of 34 cells of 16x16 pixels: a white and a black marker cell,
then the 32 bits of the number, most significant first (white = 1). Tests read it back from a
screenshot with directflip_tools.synthetic.decode_counter. Once the guest receives input, four
more such bands below it show what it received (decode_input; the layout is in the module's
docstring).

--on display allocates on the display card itself (a same-device import, like GVT-g on i915);
--on vgem allocates on vgem (a cross-device dma-buf: zero copy where the display driver imports
it, otherwise the compositor copies it)."""

_EPILOG = """\
examples:
  directflip guest --name office
  directflip guest --name build-1 --on vgem --size 800x600 --rate 30 --duration 10
  directflip guest --name media --rate 0 --frames 1000     # as fast as buffers come back
  directflip guest --name office --frames 60 --then-paint ff00ff --hold 5
      zero-copy proof: after 60 frames, paint a 64x64 square at (64, 64) into the buffer on
      screen without flipping; the monitor shows it only if it scans out the guest's memory
  directflip guest --name office --cursor --cursor-at 300,200
      hand the compositor a 32x32 magenta pointer image with a 2-pixel black border, its hot
      spot (the top-left pixel) at (300, 200) of the guest's buffer: the frames do not show it,
      so any magenta square on the monitor came from its cursor plane

At exit one line goes to stdout:
  guest NAME: flipped F frames in T s (R/s), presented P, last frame L, stalled S

exit status: 0 done (or stopped by SIGTERM/SIGINT), 1 --then-paint could not paint (the last
frame was never presented), 2 setup error (no device, no compositor listening, bad arguments),
3 the compositor refused the guest or closed the connection"""


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        check_size(w, h)
    except ValueError as exc:
        detail = str(exc) if "synthetic" in str(exc) else "expected WIDTHxHEIGHT, e.g. 1024x768"
        raise argparse.ArgumentTypeError(f"{text!r}: {detail}") from None
    return w, h


def _name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: a guest name is 1..64 characters of A-Z a-z 0-9 _ . -")
    return text


def _number(text: str, kind: type, lo: float, expected: str):
    """argparse type: a number of `kind` >= lo, else an error saying what was expected."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not value >= lo:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
    return value


def _rate(text: str) -> float:
    return _number(text, float, 0, "flips per second >= 0 (0: as fast as possible)")


def _seconds(text: str) -> float:
    return _number(text, float, 0, "seconds >= 0")


def _positive_int(text: str) -> int:
    return _number(text, int, 1, "a whole number >= 1")


def _buffers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 2..8 buffers")
    return value


def _colour(text: str) -> RGB:
    digits = text.removeprefix("#")
    if len(digits) != 6 or any(c not in "0123456789abcdefABCDEF" for c in digits):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a colour as RRGGBB, e.g. ff00ff")
    value = int(digits, 16)
    return ((value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF)


def _point(text: str) -> tuple[int, int]:
    try:
        x, y = (int(v) for v in text.split(","))
    except ValueError:
        x = y = -1
    if not (0 <= x < MAX_DIMENSION and 0 <= y < MAX_DIMENSION):
        raise argparse.ArgumentTypeError(f"{text!r}: expected X,Y in buffer pixels, "
                                         f"each 0..{MAX_DIMENSION - 1}")
    return x, y


def _hex(colour: RGB) -> str:
    return "{:02x}{:02x}{:02x}".format(*colour)


def _register_guest(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "guest", help="run a synthetic guest: flip numbered test frames through the frame socket",
        description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", type=_name, required=True,
                   help="the guest's name (policies match it; it also picks the colour)")
    p.add_argument("--seat", metavar="NAME",
                   help=f"connect to the compositor instance for this seat ({RUN_DIR}/NAME/frames.sock)")
    p.add_argument("--socket", metavar="PATH",
                   help=f"the compositor's frame socket (default {DEFAULT_FRAME_SOCKET})")
    p.add_argument("--on", default="display", metavar="{display,vgem,PATH}",
                   help="where to allocate the buffers: the first display card, vgem, or a "
                   "/dev/dri/cardN path (default display)")
    p.add_argument("--size", type=_size, default=(1024, 768), metavar="WxH",
                   help=f"buffer size (default 1024x768, at least {MIN_WIDTH}x{MIN_HEIGHT})")
    p.add_argument("--rate", type=_rate, default=60.0, metavar="HZ",
                   help="flips per second (default 60; 0: as fast as buffers come back)")
    p.add_argument("--buffers", type=_buffers, default=3, metavar="N", help="buffers, 2..8 (default 3)")
    p.add_argument("--duration", type=_seconds, metavar="S", help="stop after S seconds")
    p.add_argument("--frames", type=_positive_int, metavar="N", help="stop after N frames")
    p.add_argument("--then-paint", type=_colour, metavar="RRGGBB",
                   help="when the last frame is presented, paint a square into the buffer on screen "
                   "without flipping, and print `painted RRGGBB into buffer ID without flipping`")
    p.add_argument("--hold", type=_seconds, default=0.0, metavar="S",
                   help="after the last frame (and the paint), keep the connection open S seconds so "
                   "the compositor keeps showing the buffer")
    p.add_argument("--uuid", help="the guest's UUID, for policies that match on it")
    p.add_argument("--pointer", choices=POINTER_MODES, default="absolute",
                   help="how the guest wants the pointer: absolute positions or relative motion "
                   "(default absolute)")
    p.add_argument("--cursor", action="store_true",
                   help=f"give the compositor a pointer image ({CURSOR_SIZE}x{CURSOR_SIZE} "
                   f"#{_hex(CURSOR_COLOUR)} with a {CURSOR_BORDER}-pixel black border, hot spot at its "
                   "top-left pixel) for the monitor's cursor plane, once per connection")
    p.add_argument("--cursor-at", type=_point, metavar="X,Y",
                   help="say the pointer's hot spot is at X,Y of the buffer, visible, once per connection")
    p.add_argument("--reconnect", action="store_true",
                   help="when the compositor goes away (restarted, killed), connect again as soon as "
                   "one listens, announce the buffers again and keep flipping (default: exit with 3)")
    p.set_defaults(func=_guest)


def _guest(args: argparse.Namespace) -> int:
    from directflip_tools import synthetic

    return synthetic.run_cli(args)
