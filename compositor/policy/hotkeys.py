"""The `hotkeys` section: the key chords that switch guests and monitors and release the input, each
`ctrl+alt+KEY`, or off. compositor.input.keys is imported only when the section is given, so a policy
without one loads without evdev."""

from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

from compositor.policy.model import HOTKEY_ACTIONS
from compositor.policy.reader import BOOL, NULL, Reader

if TYPE_CHECKING:
    from compositor.input.keys import Hotkey


class HotkeySection:
    """Reads `hotkeys` over the defaults: an action given replaces its default chord or turns it off."""

    def __init__(self, reader: Reader):
        self.reader = reader

    def read(self, node: yaml.Node) -> tuple[Hotkey, ...]:
        from compositor.input.keys import HotkeyError, default_hotkeys, parse_hotkey

        keys = self.reader.mapping(node, "`hotkeys`", HOTKEY_ACTIONS)
        chosen = {h.action: h for h in default_hotkeys()}
        for action, (_, vnode) in keys.items():
            if isinstance(vnode, yaml.ScalarNode) and vnode.tag in (NULL, BOOL) and \
                    vnode.value in ("", "~", "null", "false", "no", "off"):
                chosen.pop(action, None)  # `release-input: off` turns that hotkey off
                continue
            text = self.reader.string(vnode, f"hotkey `{action}`")
            if text is None:
                continue
            try:
                chosen[action] = parse_hotkey(action, text)
            except HotkeyError as exc:
                self.reader.error(vnode, str(exc), exc.hint)
        seen: dict[tuple[frozenset[str], int], str] = {}
        for h in chosen.values():
            other = seen.setdefault((h.modifiers, h.key), h.action)
            if other != h.action:
                where = keys.get(h.action, keys.get(other, (node, node)))[1]
                self.reader.error(where, f"hotkeys `{other}` and `{h.action}` are both `{h.text}`")
        return tuple(chosen.values())
