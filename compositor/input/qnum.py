"""Linux evdev key codes → QEMU "qnum" key numbers, what org.qemu.Display1.Keyboard's Press/Release take.

A qnum is the key's XT (PC/AT scan code set 1) make code, one byte: a key whose make code is one byte
keeps it (`A` is 0x1e), a key with the 0xE0 prefix gets the high bit set instead (`E0 1C`, keypad
Enter, is 0x9c). QEMU turns the number back into its own key code (qemu_input_key_number_to_qcode) and
then into what the guest's keyboard speaks (PS/2 set 1 or 2, USB HID, virtio), so one table serves every
guest.

The table holds facts (which scan code a key has), one row per key: the evdev name (checked against
python-evdev by the tests), the evdev code (linux/input-event-codes.h) and the qnum. What it leaves out,
and why:

- KEY_HANGEUL and KEY_HANJA: their set-1 codes (0xF2, 0xF1) are single bytes above 0x7f, which qnum
  cannot tell from E0 72 / E0 71 (KEY_BLUETOOTH / KEY_BATTERY). Korean keyboards are rare on PS/2; a
  guest with a USB keyboard still gets every other key.
- KEY_PRINT: evdev's Print Screen key is KEY_SYSRQ (the PC key sends E0 37, or 0x54 with Alt, which is
  what QEMU's keymaps give KEY_SYSRQ); KEY_PRINT is a separate "print" key of some media keyboards.
- Buttons (BTN_*): mouse buttons go to org.qemu.Display1.Mouse, not here.
"""

from __future__ import annotations

# (evdev name, evdev code, qnum). Grouped as on a keyboard; E0-prefixed keys have qnum >= 0x80.
KEYS: tuple[tuple[str, int, int], ...] = (
    # Main block, row by row. Here evdev code and qnum agree (evdev's numbering began as the AT
    # keyboard's); spelled out anyway, so that every row can be checked on its own.
    ("KEY_ESC", 1, 0x01),
    ("KEY_1", 2, 0x02), ("KEY_2", 3, 0x03), ("KEY_3", 4, 0x04), ("KEY_4", 5, 0x05),
    ("KEY_5", 6, 0x06), ("KEY_6", 7, 0x07), ("KEY_7", 8, 0x08), ("KEY_8", 9, 0x09),
    ("KEY_9", 10, 0x0a), ("KEY_0", 11, 0x0b), ("KEY_MINUS", 12, 0x0c), ("KEY_EQUAL", 13, 0x0d),
    ("KEY_BACKSPACE", 14, 0x0e),
    ("KEY_TAB", 15, 0x0f),
    ("KEY_Q", 16, 0x10), ("KEY_W", 17, 0x11), ("KEY_E", 18, 0x12), ("KEY_R", 19, 0x13),
    ("KEY_T", 20, 0x14), ("KEY_Y", 21, 0x15), ("KEY_U", 22, 0x16), ("KEY_I", 23, 0x17),
    ("KEY_O", 24, 0x18), ("KEY_P", 25, 0x19), ("KEY_LEFTBRACE", 26, 0x1a), ("KEY_RIGHTBRACE", 27, 0x1b),
    ("KEY_ENTER", 28, 0x1c),
    ("KEY_LEFTCTRL", 29, 0x1d),
    ("KEY_A", 30, 0x1e), ("KEY_S", 31, 0x1f), ("KEY_D", 32, 0x20), ("KEY_F", 33, 0x21),
    ("KEY_G", 34, 0x22), ("KEY_H", 35, 0x23), ("KEY_J", 36, 0x24), ("KEY_K", 37, 0x25),
    ("KEY_L", 38, 0x26), ("KEY_SEMICOLON", 39, 0x27), ("KEY_APOSTROPHE", 40, 0x28),
    ("KEY_GRAVE", 41, 0x29),
    ("KEY_LEFTSHIFT", 42, 0x2a),
    ("KEY_BACKSLASH", 43, 0x2b),
    ("KEY_Z", 44, 0x2c), ("KEY_X", 45, 0x2d), ("KEY_C", 46, 0x2e), ("KEY_V", 47, 0x2f),
    ("KEY_B", 48, 0x30), ("KEY_N", 49, 0x31), ("KEY_M", 50, 0x32), ("KEY_COMMA", 51, 0x33),
    ("KEY_DOT", 52, 0x34), ("KEY_SLASH", 53, 0x35),
    ("KEY_RIGHTSHIFT", 54, 0x36),
    ("KEY_KPASTERISK", 55, 0x37),
    ("KEY_LEFTALT", 56, 0x38),
    ("KEY_SPACE", 57, 0x39),
    ("KEY_CAPSLOCK", 58, 0x3a),
    ("KEY_102ND", 86, 0x56),  # the ISO key between left Shift and Z (105-key layouts)
    # Right-hand modifiers and the Windows / menu keys: E0-prefixed.
    ("KEY_RIGHTCTRL", 97, 0x9d),
    ("KEY_RIGHTALT", 100, 0xb8),
    ("KEY_LEFTMETA", 125, 0xdb),
    ("KEY_RIGHTMETA", 126, 0xdc),
    ("KEY_COMPOSE", 127, 0xdd),  # the PC "Menu" (application) key
    ("KEY_MENU", 139, 0x9e),
    # Function keys. F11/F12 came after the keypad; F13-F24 are scattered over set 1.
    ("KEY_F1", 59, 0x3b), ("KEY_F2", 60, 0x3c), ("KEY_F3", 61, 0x3d), ("KEY_F4", 62, 0x3e),
    ("KEY_F5", 63, 0x3f), ("KEY_F6", 64, 0x40), ("KEY_F7", 65, 0x41), ("KEY_F8", 66, 0x42),
    ("KEY_F9", 67, 0x43), ("KEY_F10", 68, 0x44), ("KEY_F11", 87, 0x57), ("KEY_F12", 88, 0x58),
    ("KEY_F13", 183, 0x5d), ("KEY_F14", 184, 0x5e), ("KEY_F15", 185, 0x5f), ("KEY_F16", 186, 0x55),
    ("KEY_F17", 187, 0x83), ("KEY_F18", 188, 0xf7), ("KEY_F19", 189, 0x84), ("KEY_F20", 190, 0x5a),
    ("KEY_F21", 191, 0x74), ("KEY_F22", 192, 0xf9), ("KEY_F23", 193, 0x6d), ("KEY_F24", 194, 0x6f),
    # Print Screen / SysRq, Scroll Lock, Pause.
    ("KEY_SYSRQ", 99, 0x54),
    ("KEY_SCROLLLOCK", 70, 0x46),
    ("KEY_PAUSE", 119, 0xc6),
    # Navigation block and arrows: E0-prefixed (the keypad's keys without it).
    ("KEY_INSERT", 110, 0xd2), ("KEY_HOME", 102, 0xc7), ("KEY_PAGEUP", 104, 0xc9),
    ("KEY_DELETE", 111, 0xd3), ("KEY_END", 107, 0xcf), ("KEY_PAGEDOWN", 109, 0xd1),
    ("KEY_UP", 103, 0xc8), ("KEY_LEFT", 105, 0xcb), ("KEY_DOWN", 108, 0xd0), ("KEY_RIGHT", 106, 0xcd),
    # Keypad.
    ("KEY_NUMLOCK", 69, 0x45),
    ("KEY_KPSLASH", 98, 0xb5),
    ("KEY_KPMINUS", 74, 0x4a),
    ("KEY_KP7", 71, 0x47), ("KEY_KP8", 72, 0x48), ("KEY_KP9", 73, 0x49),
    ("KEY_KPPLUS", 78, 0x4e),
    ("KEY_KP4", 75, 0x4b), ("KEY_KP5", 76, 0x4c), ("KEY_KP6", 77, 0x4d),
    ("KEY_KP1", 79, 0x4f), ("KEY_KP2", 80, 0x50), ("KEY_KP3", 81, 0x51),
    ("KEY_KPENTER", 96, 0x9c),
    ("KEY_KP0", 82, 0x52), ("KEY_KPDOT", 83, 0x53),
    ("KEY_KPEQUAL", 117, 0x59),
    ("KEY_KPCOMMA", 121, 0x7e),  # Brazilian keypad "."
    # Japanese (JIS) keys.
    ("KEY_ZENKAKUHANKAKU", 85, 0x76),
    ("KEY_RO", 89, 0x73),
    ("KEY_KATAKANA", 90, 0x78),
    ("KEY_HIRAGANA", 91, 0x77),
    ("KEY_HENKAN", 92, 0x79),
    ("KEY_KATAKANAHIRAGANA", 93, 0x70),
    ("KEY_MUHENKAN", 94, 0x7b),
    ("KEY_KPJPCOMMA", 95, 0x5c),
    ("KEY_YEN", 124, 0x7d),
    # Media, power and browser keys: all E0-prefixed.
    ("KEY_MUTE", 113, 0xa0),
    ("KEY_VOLUMEDOWN", 114, 0xae),
    ("KEY_VOLUMEUP", 115, 0xb0),
    ("KEY_POWER", 116, 0xde),
    ("KEY_SLEEP", 142, 0xdf),
    ("KEY_WAKEUP", 143, 0xe3),
    ("KEY_NEXTSONG", 163, 0x99),
    ("KEY_PLAYPAUSE", 164, 0xa2),
    ("KEY_PREVIOUSSONG", 165, 0x90),
    ("KEY_STOPCD", 166, 0xa4),
    ("KEY_CALC", 140, 0xa1),
    ("KEY_MAIL", 155, 0xec),
    ("KEY_BOOKMARKS", 156, 0xe6),
    ("KEY_COMPUTER", 157, 0xeb),
    ("KEY_BACK", 158, 0xea),
    ("KEY_FORWARD", 159, 0xe9),
    ("KEY_HOMEPAGE", 172, 0xb2),
    ("KEY_REFRESH", 173, 0xe7),
    ("KEY_STOP", 128, 0xe8),
    ("KEY_SEARCH", 217, 0xe5),
    ("KEY_MEDIA", 226, 0xed),
)

QNUM: dict[int, int] = {code: number for _, code, number in KEYS}
NAMES: dict[int, str] = {code: name for name, code, _ in KEYS}


def qnum(evdev_code: int) -> int | None:
    """The QEMU key number of an evdev KEY_* code; None for a key QEMU's keyboard has no number for
    (or a BTN_* code)."""
    return QNUM.get(evdev_code)


def key_name(evdev_code: int) -> str:
    """KEY_A for 30, for log lines: the table's name, else python-evdev's (where it is installed: the
    table itself needs nothing), else `code 0x2f0`."""
    name = NAMES.get(evdev_code)
    if name is None:
        try:
            from evdev import ecodes
        except ImportError:
            ecodes = None
        if ecodes is not None:
            found = ecodes.KEY.get(evdev_code) or ecodes.BTN.get(evdev_code)
            name = found[0] if isinstance(found, list | tuple) else found
    return name or f"code {evdev_code:#x}"
