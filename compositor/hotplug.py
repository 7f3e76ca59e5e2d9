"""Hotplug: udev events for display cards and vGPUs, on the daemon's asyncio loop.

A monitor plugged, unplugged or resized arrives as a DRM `change` uevent with HOTPLUG=1 on the card
(CONNECTOR= and PROPERTY= name the connector when the driver says; virtio-gpu does not, so every
connector is re-probed either way). A card or a vGPU (mdev) coming or going is an `add`/`remove`. The
events of one physical action come in bursts (a monitor's connect and its EDID, several connectors of
a dock), so they are coalesced for `debounce` seconds and handed to the daemon as one `Changes`: the
daemon re-probes, re-plans and applies only the difference.

The events are the kernel's own (the netlink group udevd reads), not udevd's re-broadcast of them:
nothing here needs what udev rules add, and udevd handles events one after another, so behind a burst
of noise (1000 uevents written to sysfs in the lab) a real unplug reached udev listeners seconds late.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pyudev

log = logging.getLogger("directflip.hotplug")


@dataclass
class Changes:
    """What happened since the last report."""

    drm_cards: set[str] = field(default_factory=set)       # device nodes with a hotplug/change event
    cards_added: set[str] = field(default_factory=set)
    cards_removed: set[str] = field(default_factory=set)
    mdevs_added: set[str] = field(default_factory=set)     # UUIDs
    mdevs_removed: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return any((self.drm_cards, self.cards_added, self.cards_removed, self.mdevs_added,
                    self.mdevs_removed))


def classify(changes: Changes, action: str, subsystem: str, sys_name: str, device_node: str | None,
             properties: Mapping[str, str]) -> str | None:
    """Record one uevent in `changes`; returns a short description, or None for noise."""
    if subsystem == "drm":
        if not sys_name.startswith("card") or "-" in sys_name:
            return None  # connectors (card0-DP-1) and render nodes: the card's own event says it
        node = device_node or f"/dev/dri/{sys_name}"
        if action == "change":
            if properties.get("HOTPLUG") != "1" and "CONNECTOR" not in properties:
                return None
            changes.drm_cards.add(node)
            what = f"connector {properties['CONNECTOR']}" if "CONNECTOR" in properties else "connectors"
            return f"{node}: hotplug ({what})"
        return _came_or_went(changes, action, "cards", node, f"{node}: card")
    if subsystem == "mdev":
        return _came_or_went(changes, action, "mdevs", sys_name, f"vGPU {sys_name}")
    return None


def _came_or_went(changes: Changes, action: str, kind: str, key: str, label: str) -> str | None:
    if action not in ("add", "remove"):
        return None
    verb = "added" if action == "add" else "removed"
    getattr(changes, f"{kind}_{verb}").add(key)
    return f"{label} {verb}"


BATCH = 32  # uevents read per wakeup of the loop


class HotplugMonitor:
    """pyudev's netlink monitor on the loop; `on_changes(Changes)` after each debounced burst."""

    def __init__(self, on_changes: Callable[[Changes], None], *, debounce: float = 0.05,
                 source: str = "kernel") -> None:
        self.on_changes = on_changes
        self.debounce = debounce
        self.context = pyudev.Context()
        self.monitor = pyudev.Monitor.from_netlink(self.context, source=source)
        self.monitor.filter_by("drm")
        self.monitor.filter_by("mdev")
        self._pending = Changes()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.events = 0

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self.monitor.start()
        self._loop.add_reader(self.monitor.fileno(), self._readable)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.monitor.fileno())
            if self._timer is not None:
                self._timer.cancel()
            self._loop = None

    def _readable(self) -> None:
        # At most a batch per wakeup: a burst that keeps arriving (a storm of uevents) must not keep the
        # loop here, away from flips and from the timer that hands over what was collected.
        for _ in range(BATCH):
            try:
                device = self.monitor.poll(timeout=0)
            except OSError as exc:  # ENOBUFS: the kernel dropped events; re-probe everything
                log.warning("udev monitor: %s; re-probing every card", exc)
                self._pending.drm_cards.add("*")
                device = None
            if device is None:
                break
            self.events += 1
            what = classify(self._pending, device.action or "", device.subsystem or "", device.sys_name,
                            device.device_node, device.properties)
            if what is None:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("udev: %s %s ignored", device.action, device.sys_path)
                continue
            log.info("udev: %s", what)
        if self._pending and self._timer is None and self._loop is not None:
            self._timer = self._loop.call_later(self.debounce, self._flush)

    def _flush(self) -> None:
        self._timer = None
        changes, self._pending = self._pending, Changes()
        try:
            self.on_changes(changes)
        except Exception:  # noqa: BLE001 — one bad reaction must not stop hotplug handling
            log.exception("handling hotplug changes failed")
