"""Key names and hotkeys: what the policy's `hotkeys` section says, turned into evdev codes.

A hotkey is written as modifiers and one key joined by `+`, case-insensitive: `ctrl+alt+n`,
`super+f1`, `ctrl+alt+pagedown`. The key is any evdev key name without its `KEY_` prefix
(linux/input-event-codes.h: `n`, `f1`, `pagedown`, `space`, `esc`, `kp5`), or one of a few common
aliases (`escape`, `return`, `del`, `pgup`, `pgdn`). Modifiers are `ctrl`, `alt`, `shift` and
`super` (also `meta`, `logo`, `win`); either side's key counts (left or right Ctrl).

A hotkey matches when its key goes down while exactly its modifiers are held (no more, no fewer), and
acts when that key comes back up; neither the press nor the release reaches any guest.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from evdev import ecodes

MODIFIER_KEYS: dict[str, tuple[int, ...]] = {
    "ctrl": (ecodes.KEY_LEFTCTRL, ecodes.KEY_RIGHTCTRL),
    "alt": (ecodes.KEY_LEFTALT, ecodes.KEY_RIGHTALT),
    "shift": (ecodes.KEY_LEFTSHIFT, ecodes.KEY_RIGHTSHIFT),
    "super": (ecodes.KEY_LEFTMETA, ecodes.KEY_RIGHTMETA),
}
_MODIFIER_ALIASES = {"control": "ctrl", "meta": "super", "logo": "super", "win": "super"}
MODIFIER_OF: dict[int, str] = {code: name for name, codes in MODIFIER_KEYS.items() for code in codes}
_KEY_ALIASES = {"escape": "esc", "return": "enter", "del": "delete", "pgup": "pageup", "pgdn": "pagedown",
                "ins": "insert", "bksp": "backspace", "prtsc": "sysrq", "printscreen": "sysrq"}

# What the actions do is the router's business; the names are the policy's (policy.HOTKEY_ACTIONS).
ACTIONS = ("next-guest", "next-monitor", "release-input")
DEFAULT_HOTKEYS = {"next-guest": "ctrl+alt+n", "next-monitor": "ctrl+alt+m", "release-input": "ctrl+alt+g"}

# Keyboard keys, as opposed to pointer buttons (BTN_MISC 0x100 … BTN_GEAR_UP 0x151) and the
# joystick/trigger ranges above KEY_MAX's keyboard part: these are the codes a keyboard sends.
_BTN_FIRST, _BTN_LAST = 0x100, 0x15F


def is_keyboard_key(code: int) -> bool:
    return 0 < code < _BTN_FIRST or _BTN_LAST < code < 0x2C0


def is_pointer_button(code: int) -> bool:
    return ecodes.BTN_MOUSE <= code <= ecodes.BTN_TASK


@dataclass(frozen=True)
class Hotkey:
    action: str
    modifiers: frozenset[str]  # of MODIFIER_KEYS' names
    key: int  # evdev KEY_* code
    text: str  # as the policy wrote it, for status and messages

    def __str__(self) -> str:
        return self.text


class HotkeyError(ValueError):
    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def key_code(name: str) -> int | None:
    """The evdev code of a key name (`n`, `F1`, `KEY_PAGEDOWN`, `escape`), or None."""
    word = name.strip().lower()
    word = word[4:] if word.startswith("key_") else word
    word = _KEY_ALIASES.get(word, word)
    code = getattr(ecodes, "KEY_" + word.upper(), None)
    return code if isinstance(code, int) and is_keyboard_key(code) else None


def _suggest(word: str) -> str | None:
    names = [n[4:].lower() for n in ecodes.ecodes if n.startswith("KEY_")]
    close = difflib.get_close_matches(word.lower(), [*names, *MODIFIER_KEYS, *_KEY_ALIASES], n=1)
    return f"did you mean `{close[0]}`?" if close else None


def parse_hotkey(action: str, text: str) -> Hotkey:
    """`ctrl+alt+n` → Hotkey; raises HotkeyError naming what is wrong."""
    parts = [p.strip() for p in text.split("+")]
    if any(not p for p in parts):
        raise HotkeyError(f"hotkey `{text}` has an empty part", "write modifiers and a key joined by `+`, "
                          "such as `ctrl+alt+n`")
    *mods, last = parts
    modifiers: set[str] = set()
    for m in mods:
        name = _MODIFIER_ALIASES.get(m.lower(), m.lower())
        if name not in MODIFIER_KEYS:
            hint = "modifiers are " + ", ".join(f"`{k}`" for k in MODIFIER_KEYS)
            if key_code(m) is not None:
                hint = f"`{m}` is a key, not a modifier: a hotkey is modifiers and one key"
            raise HotkeyError(f"hotkey `{text}`: `{m}` is not a modifier", hint)
        if name in modifiers:
            raise HotkeyError(f"hotkey `{text}` names `{name}` twice")
        modifiers.add(name)
    if _MODIFIER_ALIASES.get(last.lower(), last.lower()) in MODIFIER_KEYS:
        raise HotkeyError(f"hotkey `{text}` ends with a modifier",
                          "end it with the key, such as `ctrl+alt+n`")
    code = key_code(last)
    if code is None:
        raise HotkeyError(f"hotkey `{text}`: `{last}` names no key",
                          _suggest(last) or "keys are evdev names without KEY_: `n`, `f1`, `pagedown`")
    if not modifiers:
        raise HotkeyError(f"hotkey `{text}` has no modifier",
                          "a bare key would be taken from every guest; add `ctrl`, `alt`, `shift` or `super`")
    return Hotkey(action, frozenset(modifiers), code, text)


def default_hotkeys() -> tuple[Hotkey, ...]:
    return tuple(parse_hotkey(a, t) for a, t in DEFAULT_HOTKEYS.items())
