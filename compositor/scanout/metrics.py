"""What one output counts: frames in, commits out, flips seen, and how long each took.

The pipeline counts as it goes; while the native data plane commits an output's frames instead, its
counters are folded in here (fold_data_plane), so status reads one set of numbers whoever committed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from compositor.stats import percentile

if TYPE_CHECKING:
    from compositor.dataplane import OutputStats

# The counters the data plane keeps as the pipeline does: folded in by their difference.
DATA_PLANE_COUNTERS = ("frames", "commits", "presented", "dropped", "errors", "busy")


@dataclass
class Metrics:
    """What status reports for one output. Latency: from the moment the source learnt of a frame to
    the kernel's timestamp of the flip that showed it (both CLOCK_MONOTONIC). Commit delay: from that
    same moment to the return of the frame's nonblocking commit (the import or copy included): the
    compositor's own cost per frame, plus any wait for the previous flip while the frame was pending."""

    frames: int = 0          # frames handed to the pipeline
    presented: int = 0       # frames that reached the screen (flip events)
    dropped: int = 0         # frames replaced by a newer one before they were committed
    commits: int = 0         # nonblocking commits issued
    copies: int = 0
    max_in_flight: int = 0   # most nonblocking commits ever awaiting their flip event at once
    max_pending: int = 0     # most frames ever waiting to be committed (one slot: a queue would show)
    busy: int = 0            # EBUSY answers (the kernel still had a flip pending)
    errors: int = 0
    latencies_ns: deque = field(default_factory=lambda: deque(maxlen=2000))
    present_times: deque = field(default_factory=lambda: deque(maxlen=4000))
    commit_delays_ns: deque = field(default_factory=lambda: deque(maxlen=4000))

    def flips_per_second(self, now_ns: int | None = None, window: float = 1.0) -> float:
        now_ns = now_ns or time.monotonic_ns()
        cutoff = now_ns - int(window * 1e9)
        return sum(1 for t in self.present_times if t >= cutoff) / window

    def latency_ms(self, q: float) -> float | None:
        value = percentile(self.latencies_ns, q)
        return None if value is None else value / 1e6

    def commit_delay_us(self, q: float) -> float | None:
        value = percentile(self.commit_delays_ns, q)
        return None if value is None else value / 1e3

    def fold_data_plane(self, now: OutputStats, seen: OutputStats | None) -> None:
        """Add what the data plane counted for the output between `seen` (its counters as last folded,
        None: never) and `now`."""
        from compositor.dataplane import DataPlane
        for name in DATA_PLANE_COUNTERS:
            before = getattr(seen, name) if seen else 0
            setattr(self, name, getattr(self, name) + getattr(now, name) - before)
        self.max_in_flight = max(self.max_in_flight, now.max_in_flight)
        self.max_pending = max(self.max_pending, now.max_pending)
        for delay, latency, when in DataPlane.samples(now, since=seen.presented if seen else 0):
            self.commit_delays_ns.append(delay)
            self.latencies_ns.append(latency)
            self.present_times.append(when)

    def summary(self) -> dict[str, Any]:
        """The counters and rates as an output's status shows them."""
        return {
            "flips_per_s": round(self.flips_per_second(), 1),
            "latency_ms": p50_p99(self.latency_ms, 2),
            "commit_delay_us": p50_p99(self.commit_delay_us, 1),
            "frames": self.frames, "presented": self.presented, "dropped": self.dropped,
            "commits": self.commits, "copies": self.copies, "max_in_flight": self.max_in_flight,
            "max_pending": self.max_pending, "busy": self.busy, "errors": self.errors,
        }


def p50_p99(quantile: Callable[[float], float | None], digits: int) -> dict[str, float | None]:
    values = {"p50": quantile(0.5), "p99": quantile(0.99)}
    return {k: None if v is None else round(v, digits) for k, v in values.items()}
