"""What a synthetic guest's frame looks like, in buffer pixels: where the counter band, the bar, the
input bands and the paint square lie, and the pointer image it hands over. Pure numbers, so that the
command line can name them without importing numpy (directflip_tools.synthetic draws and reads them).
"""

from __future__ import annotations

# Layout of a frame, in buffer pixels.
BAND_X, BAND_Y = 8, 8                 # top-left of the counter band
CELL = 16                             # a counter cell is CELL x CELL pixels
COUNTER_BITS = 32
MARKER = (1, 0)                       # white, black: the cells before the bits
BAND_CELLS = len(MARKER) + COUNTER_BITS
BAND_WIDTH = BAND_CELLS * CELL        # 544
BAR_WIDTH = 16
BAR_STEP = 8                          # pixels the bar moves per frame
BAR_TOP = BAND_Y + CELL + 8           # the bar starts below the band, with a gap of background
PAINT_RECT = (64, 64, 64, 64)         # x, y, w, h of paint_on_screen's square
MIN_WIDTH = BAND_X + BAND_WIDTH + BAND_X
MIN_HEIGHT = PAINT_RECT[1] + PAINT_RECT[3]
INPUT_BAND_Y = BAND_Y + CELL          # the input bands, stacked right below the counter band
INPUT_BANDS = 4
KEY_EVENTS_MODULO = 1 << 12           # band 0 counts key events in its low 12 bits
BTN_LEFT, BTN_RIGHT, BTN_MIDDLE = 0x110, 0x111, 0x112
BUTTON_BITS = {BTN_LEFT: 1, BTN_RIGHT: 2, BTN_MIDDLE: 4}


WHITE = (255, 255, 255)
BLACK = (0, 0, 0)

RGB = tuple[int, int, int]
Rect = tuple[int, int, int, int]      # x, y, width, height

# --cursor's pointer image: a colour that no guest background or bar takes (guest_colour's value is
# 0.75, so no channel reaches 255), to be found on a screenshot of the monitor.
CURSOR_SIZE = 32                      # pixels per side
CURSOR_COLOUR: RGB = (255, 0, 255)    # the inside, opaque
CURSOR_BORDER = 2                     # pixels of border on each side
CURSOR_BORDER_COLOUR: RGB = BLACK     # the border, opaque
CURSOR_HOT_SPOT = (0, 0)              # the pixel that points: the top-left corner


def check_size(width: int, height: int) -> None:
    """Raise ValueError unless a frame fits: the band, the bar and the paint square need room."""
    if width < MIN_WIDTH or height < MIN_HEIGHT:
        raise ValueError(f"a synthetic guest needs at least {MIN_WIDTH}x{MIN_HEIGHT} pixels "
                         f"(the counter band is {BAND_WIDTH} wide), not {width}x{height}")
