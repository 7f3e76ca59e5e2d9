"""How a monitor shows what it shows: `mode`, `scaling`, `slate` and `label`, given under `defaults`
for every monitor and under each monitor for itself."""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

from compositor.policy.model import DEFAULT_LABEL_SECONDS, SCALING_ALIASES, SCALINGS, ModeRequest, SlateStyle
from compositor.policy.reader import FLOAT, INT, STR, Keys, Reader, did_you_mean

_MODE = re.compile(r"^(\d{1,9})x(\d{1,9})(?:@(\d+(?:\.\d+)?))?$")  # bounded: int() refuses 4300+ digits
_COLOUR = re.compile(r"^#[0-9a-fA-F]{6}$")

_DEFAULT_KEYS = ("mode", "scaling", "slate", "label")
_SLATE_KEYS = ("text", "colour", "color")


@dataclass(frozen=True)
class DisplaySettings:
    """A monitor's display settings (the MonitorRule fields of the same names)."""

    mode: ModeRequest = ModeRequest("preferred")
    scaling: str = "fit"
    slate: SlateStyle = SlateStyle()
    label: float = DEFAULT_LABEL_SECONDS


class DisplaySection:
    """The `defaults` section, and the display settings of a monitor on top of them."""

    def __init__(self, reader: Reader):
        self.reader = reader

    def defaults(self, top: Keys) -> DisplaySettings:
        defaults = DisplaySettings()
        if "defaults" in top:
            keys = self.reader.mapping(top["defaults"][1], "`defaults`", _DEFAULT_KEYS)
            defaults = self.display_settings(keys, defaults)
        return defaults

    def mode(self, node: yaml.Node) -> ModeRequest | None:
        hint = "expected `preferred`, `match-guest` or `WIDTHxHEIGHT[@HZ]` such as `1920x1080@60`"
        if not isinstance(node, yaml.ScalarNode) or node.tag not in (STR,):
            self.reader.error(node, f"`mode` must be a string, got {self.reader.describe(node)}", hint)
            return None
        text = node.value.strip()
        if text in ("preferred", "match-guest"):
            return ModeRequest(text)
        m = _MODE.match(text)
        if not m:
            self.reader.error(node, f"bad mode `{text}`",
                              did_you_mean(text, ("preferred", "match-guest")) or hint)
            return None
        w, h = int(m.group(1)), int(m.group(2))
        hz = float(m.group(3)) if m.group(3) else None
        if w == 0 or h == 0 or (hz is not None and hz == 0):
            self.reader.error(node, f"bad mode `{text}`: sizes and refresh rate must be positive")
            return None
        return ModeRequest("size", w, h, hz)

    def scaling(self, node: yaml.Node) -> str | None:
        choices = SCALINGS + tuple(SCALING_ALIASES)
        if not isinstance(node, yaml.ScalarNode) or node.tag != STR:
            self.reader.error(node, f"`scaling` must be a string, got {self.reader.describe(node)}",
                              "expected one of: " + ", ".join(choices))
            return None
        value = SCALING_ALIASES.get(node.value, node.value)
        if value not in SCALINGS:
            self.reader.error(node, f"unknown scaling `{node.value}`",
                              did_you_mean(node.value, choices) or "expected one of: " + ", ".join(choices))
            return None
        return value

    def slate(self, node: yaml.Node, base: SlateStyle) -> SlateStyle | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == STR:
            return SlateStyle(node.value, base.colour)
        keys = self.reader.mapping(node, "`slate`", _SLATE_KEYS)
        if not isinstance(node, yaml.MappingNode):
            return None
        text, colour = base.text, base.colour
        if "text" in keys:
            text = self.reader.string(keys["text"][1], "`text`") or text
        if "colour" in keys and "color" in keys:
            self.reader.error(keys["color"][0], "give `colour` or `color`, not both")
        for key in ("colour", "color"):
            if key in keys:
                vnode = keys[key][1]
                value = self.reader.string(vnode, f"`{key}`")
                if value is not None and not _COLOUR.match(value):
                    self.reader.error(vnode, f"bad colour `{value}`", "expected `#rrggbb`, e.g. `#101018`")
                elif value is not None:
                    colour = value.lower()
        return SlateStyle(text, colour)

    def display_settings(self, keys: Keys, base: DisplaySettings) -> DisplaySettings:
        mode, scaling, slate, label = base.mode, base.scaling, base.slate, base.label
        if "mode" in keys and (m := self.mode(keys["mode"][1])) is not None:
            mode = m
        if "scaling" in keys and (sc := self.scaling(keys["scaling"][1])) is not None:
            scaling = sc
        if "slate" in keys and (sl := self.slate(keys["slate"][1], base.slate)) is not None:
            slate = sl
        if "label" in keys and (seconds := self.label(keys["label"][1])) is not None:
            label = seconds
        return DisplaySettings(mode, scaling, slate, label)

    def label(self, node: yaml.Node) -> float | None:
        """How long the monitor shows a guest's name when it turns to it."""
        value = None
        if isinstance(node, yaml.ScalarNode) and node.tag in (INT, FLOAT):
            try:
                value = float(node.value)
            except ValueError:
                value = None
        if value is None or not 0 <= value <= 60:
            self.reader.error(node, "`label` must be seconds from 0 to 60, got "
                              f"{self.reader.describe(node)}",
                              "how long a monitor shows the guest's name when it turns to it; 0: never")
            return None
        return value
