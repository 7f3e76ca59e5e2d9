"""What the lab reliability tests measure of a running compositor: its process (descriptors, resident
memory, CPU time) and the kernel's own account of its framebuffers (DRM debugfs)."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from labkit import Compositor, colour_share, wait_for

from directflip_tools.synthetic import decode_counter, guest_colour

HEADS = {"left": 0, "centre": 1, "right": 2}
SIZES = {"left": (1024, 768), "centre": (800, 600), "right": (640, 480)}   # the heads' boot sizes
RATE = 60            # flips per second per guest, about what the lab's heads present under TCG
MONITORS = """version: 1
monitors:
  left:   {connector: Virtual-1, driver: virtio_gpu}
  centre: {connector: Virtual-2, driver: virtio_gpu}
  right:  {connector: Virtual-3, driver: virtio_gpu}
"""
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def start_guest(comp: Compositor, monitor: str, name: str, *args: str):
    """A synthetic guest the size of `monitor`'s head, flipping at RATE for up to an hour."""
    w, h = SIZES[monitor]
    return comp.guest("--name", name, "--on", "display", "--size", f"{w}x{h}", "--rate", str(RATE),
                      "--duration", "3600", *args)


@dataclass(frozen=True)
class Sample:
    fds: int
    rss_kib: int
    framebuffers: int   # the card's framebuffers as the kernel lists them (fbcon's included)
    cpu_s: float

    def __str__(self) -> str:
        return (f"{self.fds} fds, RSS {self.rss_kib} KiB, {self.framebuffers} framebuffers, "
                f"CPU {self.cpu_s:.1f} s")


def dri_debugfs(debugfs: Path, driver: str) -> Path:
    """The debugfs directory of the DRM device whose driver is `driver`."""
    for entry in sorted(debugfs.iterdir()):
        name = entry / "name"
        if name.exists() and name.read_text().split()[0] == driver:
            return entry
    raise AssertionError(f"no DRM debugfs entry for {driver} under {debugfs}")


def framebuffers(dri: Path) -> int:
    return len(re.findall(r"^framebuffer\[\d+\]:", (dri / "framebuffer").read_text(), re.M))


def open_fds(proc: Path) -> int:
    """The process's descriptors, once two counts 0.2 s apart agree: a control-socket connection of a
    status request just made may still be open on its side for a moment."""
    count = len(os.listdir(proc / "fd"))
    for _ in range(50):
        time.sleep(0.2)
        again = len(os.listdir(proc / "fd"))
        if again == count:
            return count
        count = again
    return count


def sample(pid: int, dri: Path) -> Sample:
    proc = Path(f"/proc/{pid}")
    rss = next(int(line.split()[1]) for line in (proc / "status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICK   # utime, stime
    return Sample(open_fds(proc), rss, framebuffers(dri), cpu)


def total(status: dict, key: str) -> int:
    return sum(o.get(key, 0) for o in status["outputs"] if o.get("guest"))


def counter(host, head: int) -> int | None:
    return decode_counter(host.screendump(head))


def shows(host, head: int, guest: str) -> bool:
    """Head `head` shows `guest`: its colour covers a fifth of the screen."""
    return colour_share(host.screendump(head), guest_colour(guest)) > 0.2


def all_back(comp: Compositor, placements: dict[str, str]) -> bool:
    """Every monitor of `placements` (monitor -> guest) has a frame of its guest on screen (its flip
    completed) — the compositor's account, checked against pixels by the caller."""
    try:
        st = comp.status()
    except (ConnectionError, OSError):
        return False
    outs = {o.get("monitor"): o for o in st["outputs"]}
    for monitor, guest in placements.items():
        o = outs.get(monitor)
        if o is None or o.get("guest") != guest or not o.get("on_screen") or not o.get("presented"):
            return False
    return True


def moving(host, head: int, timeout: float = 30) -> tuple[int, int]:
    """Two counters read from head `head`, the second later and higher: the picture is live."""
    first = wait_for(f"a frame counter on head {head}", lambda: counter(host, head), timeout=timeout)
    second = wait_for(f"head {head}'s counter moving past {first}",
                      lambda: (c := counter(host, head)) is not None and c > first and c, timeout=timeout)
    return first, second


def wait_until(check, timeout: float, step: float = 0.02) -> float | None:
    """Seconds until check() is true, or None if it never was within `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return time.monotonic() - t0
        time.sleep(step)
    return None
