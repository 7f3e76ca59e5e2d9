"""The evdev → QEMU qnum key table: known scan codes, and what must hold for every row."""

from __future__ import annotations

from evdev import ecodes

from compositor.input.qnum import KEYS, QNUM, key_name, qnum

# A standard 105-key (ISO) PC keyboard plus the 104-key (ANSI) layout's keys, and F13-F24.
PC_KEYBOARD = (
    [f"KEY_{c}" for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"]
    + [f"KEY_F{n}" for n in range(1, 25)]
    + ["KEY_ESC", "KEY_GRAVE", "KEY_MINUS", "KEY_EQUAL", "KEY_BACKSPACE", "KEY_TAB", "KEY_LEFTBRACE",
       "KEY_RIGHTBRACE", "KEY_BACKSLASH", "KEY_CAPSLOCK", "KEY_SEMICOLON", "KEY_APOSTROPHE", "KEY_ENTER",
       "KEY_102ND", "KEY_COMMA", "KEY_DOT", "KEY_SLASH", "KEY_SPACE",
       "KEY_LEFTSHIFT", "KEY_RIGHTSHIFT", "KEY_LEFTCTRL", "KEY_RIGHTCTRL", "KEY_LEFTALT", "KEY_RIGHTALT",
       "KEY_LEFTMETA", "KEY_RIGHTMETA", "KEY_COMPOSE", "KEY_MENU",
       "KEY_SYSRQ", "KEY_SCROLLLOCK", "KEY_PAUSE",
       "KEY_INSERT", "KEY_HOME", "KEY_PAGEUP", "KEY_DELETE", "KEY_END", "KEY_PAGEDOWN",
       "KEY_UP", "KEY_DOWN", "KEY_LEFT", "KEY_RIGHT",
       "KEY_NUMLOCK", "KEY_KPSLASH", "KEY_KPASTERISK", "KEY_KPMINUS", "KEY_KPPLUS", "KEY_KPENTER",
       "KEY_KPDOT", "KEY_KPEQUAL"]
    + [f"KEY_KP{n}" for n in range(10)]
    + ["KEY_MUTE", "KEY_VOLUMEUP", "KEY_VOLUMEDOWN", "KEY_POWER"]
    + ["KEY_RO", "KEY_YEN", "KEY_HENKAN", "KEY_MUHENKAN", "KEY_KATAKANAHIRAGANA", "KEY_ZENKAKUHANKAKU"]
)


def test_known_scan_codes():
    # Set-1 make codes from the PC/AT keyboard; E0-prefixed ones with the high bit set.
    known = {
        "KEY_ESC": 0x01, "KEY_A": 0x1e, "KEY_Z": 0x2c, "KEY_ENTER": 0x1c, "KEY_SPACE": 0x39,
        "KEY_LEFTSHIFT": 0x2a, "KEY_RIGHTSHIFT": 0x36, "KEY_LEFTCTRL": 0x1d, "KEY_LEFTALT": 0x38,
        "KEY_F1": 0x3b, "KEY_F10": 0x44, "KEY_F11": 0x57, "KEY_F12": 0x58, "KEY_102ND": 0x56,
        "KEY_KP7": 0x47, "KEY_KPDOT": 0x53, "KEY_KPEQUAL": 0x59,
        "KEY_KPENTER": 0x9c,  # E0 1C
        "KEY_RIGHTCTRL": 0x9d,  # E0 1D
        "KEY_KPSLASH": 0xb5,  # E0 35
        "KEY_RIGHTALT": 0xb8,  # E0 38
        "KEY_HOME": 0xc7, "KEY_UP": 0xc8, "KEY_PAGEUP": 0xc9, "KEY_LEFT": 0xcb, "KEY_RIGHT": 0xcd,
        "KEY_END": 0xcf, "KEY_DOWN": 0xd0, "KEY_PAGEDOWN": 0xd1, "KEY_INSERT": 0xd2, "KEY_DELETE": 0xd3,
        "KEY_LEFTMETA": 0xdb, "KEY_RIGHTMETA": 0xdc, "KEY_COMPOSE": 0xdd,
        "KEY_SYSRQ": 0x54,  # Alt+Print Screen's code, what QEMU's keymaps give evdev's Print Screen
        "KEY_PAUSE": 0xc6,  # E0 46 (the key itself sends an E1 sequence, which has no qnum)
        "KEY_MUTE": 0xa0, "KEY_VOLUMEDOWN": 0xae, "KEY_VOLUMEUP": 0xb0, "KEY_POWER": 0xde,
        "KEY_RO": 0x73, "KEY_YEN": 0x7d, "KEY_HENKAN": 0x79, "KEY_MUHENKAN": 0x7b,
    }
    for name, number in known.items():
        assert qnum(getattr(ecodes, name)) == number, name


def test_every_row_names_a_real_evdev_key():
    for name, code, _ in KEYS:
        real = getattr(ecodes, name, None)
        assert real == code, f"{name} is {real}, the table says {code}"


def test_codes_and_numbers_are_unique_and_valid():
    codes = [code for _, code, _ in KEYS]
    numbers = [number for _, _, number in KEYS]
    assert len(set(codes)) == len(codes)
    assert len(set(numbers)) == len(numbers), "two keys would be one key to the guest"
    for name, _, number in KEYS:
        # One byte; never a bare 0x00 / E0 00, which are no key.
        assert 0 < number <= 0xff and number & 0x7f, name


def test_the_main_block_keeps_its_code():
    # evdev's first codes are the AT keyboard's scan codes: there, evdev code and qnum agree.
    for code in range(ecodes.KEY_ESC, ecodes.KEY_KPDOT + 1):
        assert qnum(code) == code, key_name(code)


def test_the_whole_pc_keyboard_is_covered():
    missing = [name for name in PC_KEYBOARD if qnum(getattr(ecodes, name)) is None]
    assert not missing


def test_what_has_no_number():
    assert qnum(ecodes.KEY_RESERVED) is None
    assert qnum(ecodes.BTN_LEFT) is None  # buttons go to the Mouse interface
    assert qnum(ecodes.KEY_HANGEUL) is None  # its set-1 byte collides with an E0 key's qnum
    assert qnum(0xfff) is None
    assert len(QNUM) == len(KEYS)


def test_key_names_for_logs():
    assert key_name(ecodes.KEY_A) == "KEY_A"
    assert key_name(ecodes.KEY_HANGEUL) == "KEY_HANGEUL"  # not in the table: python-evdev's name
    assert key_name(0x2f0) == "code 0x2f0"
