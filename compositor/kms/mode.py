"""Display modes: the kernel's drmModeModeInfo as a frozen dataclass, and choosing one."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

DRM_MODE_FLAG_INTERLACE = 1 << 4
DRM_MODE_FLAG_DBLSCAN = 1 << 5
DRM_MODE_TYPE_PREFERRED = 1 << 3
DRM_MODE_TYPE_DRIVER = 1 << 6
DRM_MODE_TYPE_USERDEF = 1 << 5

# Without a preferred mode (forced connectors list 5120x2160 first), pick the largest mode that fits
# in this box: a sane picture on any real monitor, and affordable for the lab.
DEFAULT_MAX_SIZE = (1920, 1080)


@dataclass(frozen=True)
class Mode:
    name: str
    clock: int
    hdisplay: int
    hsync_start: int
    hsync_end: int
    htotal: int
    vdisplay: int
    vsync_start: int
    vsync_end: int
    vtotal: int
    hskew: int = 0
    vscan: int = 0
    vrefresh: int = 0
    flags: int = 0
    type: int = 0

    @property
    def width(self) -> int:
        return self.hdisplay

    @property
    def height(self) -> int:
        return self.vdisplay

    @property
    def preferred(self) -> bool:
        return bool(self.type & DRM_MODE_TYPE_PREFERRED)

    @property
    def refresh(self) -> float:
        """Refresh rate in Hz from the timings, as the kernel's drm_mode_vrefresh computes it."""
        if not self.htotal or not self.vtotal:
            return float(self.vrefresh)
        hz = self.clock * 1000.0 / (self.htotal * self.vtotal)
        if self.flags & DRM_MODE_FLAG_INTERLACE:
            hz *= 2
        if self.flags & DRM_MODE_FLAG_DBLSCAN:
            hz /= 2
        if self.vscan > 1:
            hz /= self.vscan
        return hz

    def label(self) -> str:
        return f"{self.width}x{self.height}@{self.refresh:.2f}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "width": self.width, "height": self.height,
            "refresh": round(self.refresh, 3), "clock": self.clock,
            "hsync_start": self.hsync_start, "hsync_end": self.hsync_end, "htotal": self.htotal,
            "vsync_start": self.vsync_start, "vsync_end": self.vsync_end, "vtotal": self.vtotal,
            "flags": self.flags, "preferred": self.preferred,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Mode:
        return cls(name=d["name"], clock=d["clock"], hdisplay=d["width"], hsync_start=d["hsync_start"],
                   hsync_end=d["hsync_end"], htotal=d["htotal"], vdisplay=d["height"],
                   vsync_start=d["vsync_start"], vsync_end=d["vsync_end"], vtotal=d["vtotal"],
                   vrefresh=round(d.get("refresh", 0)), flags=d.get("flags", 0),
                   type=DRM_MODE_TYPE_PREFERRED if d.get("preferred") else 0)


_MODE_SPEC = re.compile(r"^(\d+)x(\d+)(?:@(\d+(?:\.\d+)?))?$")


class ModeError(ValueError):
    """A mode request that is malformed or that no mode of the connector satisfies."""


def parse_mode_spec(spec: str) -> tuple[int, int, float | None]:
    """'1920x1080' or '1920x1080@60' → (1920, 1080, 60.0 | None)."""
    m = _MODE_SPEC.match(spec.strip())
    if not m:
        raise ModeError(f"mode {spec!r} is not WIDTHxHEIGHT or WIDTHxHEIGHT@HZ")
    hz = float(m.group(3)) if m.group(3) else None
    return int(m.group(1)), int(m.group(2)), hz


def default_mode(modes: list[Mode], max_size: tuple[int, int] = DEFAULT_MAX_SIZE) -> Mode | None:
    """The preferred mode; without one, the largest (then fastest) mode inside max_size; without
    that, the first mode listed. None only when there are no modes."""
    if not modes:
        return None
    for mode in modes:
        if mode.preferred:
            return mode
    fitting = [m for m in modes if m.width <= max_size[0] and m.height <= max_size[1]]
    if fitting:
        return max(fitting, key=lambda m: (m.width * m.height, m.refresh))
    return modes[0]


def choose_mode(modes: list[Mode], spec: str = "preferred") -> Mode:
    """The mode for a request: 'preferred' (see default_mode) or 'WxH[@Hz]'. For WxH without a rate
    the fastest such mode wins (preferred first among equals); with a rate, the closest within
    0.5 Hz. Raises ModeError naming what the connector offers when nothing fits."""
    if spec == "preferred":
        mode = default_mode(modes)
        if mode is None:
            raise ModeError("the connector lists no modes")
        return mode
    width, height, hz = parse_mode_spec(spec)
    same = [m for m in modes if m.width == width and m.height == height]
    if hz is not None:
        same = [m for m in same if abs(m.refresh - hz) < 0.5]
        same.sort(key=lambda m: abs(m.refresh - hz))
    else:
        same.sort(key=lambda m: (-m.refresh, not m.preferred))
    if not same:
        offered = ", ".join(sorted({m.label() for m in modes})) or "none"
        raise ModeError(f"no mode {spec} on this connector (offered: {offered})")
    return same[0]
