"""pytest plugin for the lab's guest suite (``-p directflip_tools.lab.progress``): tells the host which
test starts and how each one ended, over the lab's channel.

The host keeps the record, so a run stopped for taking too long still says which test was running
and where the time went (`Progress.report`), even though pytest never prints its summary then."""

from __future__ import annotations

import time
from typing import Any

from directflip_tools.lab.channel import ChannelError, HostChannel

_channel: HostChannel | None = None
_started: dict[str, float] = {}
_outcome: dict[str, str] = {}


def _send(**args: Any) -> None:
    global _channel
    try:
        if _channel is None:
            _channel = HostChannel.from_env()
        _channel.call("progress", timeout=30.0, **args)
    except ChannelError:
        pass   # outside the lab, or the host went away: the run goes on without a record


def pytest_runtest_logstart(nodeid: str, location) -> None:
    _started[nodeid] = time.monotonic()
    _outcome[nodeid] = "passed"
    _send(event="start", test=nodeid)


def pytest_runtest_logreport(report) -> None:
    if report.failed:
        _outcome[report.nodeid] = "failed"
    elif report.skipped and report.when in ("setup", "call"):
        _outcome[report.nodeid] = "skipped"


def pytest_runtest_logfinish(nodeid: str, location) -> None:
    seconds = time.monotonic() - _started.pop(nodeid, time.monotonic())
    _send(event="end", test=nodeid, outcome=_outcome.pop(nodeid, "passed"), seconds=round(seconds, 1))


class Progress:
    """The host's record of the guest suite's progress."""

    def __init__(self) -> None:
        self.done: list[tuple[str, str, float]] = []   # (test, outcome, seconds)
        self.running: tuple[str, float] | None = None  # (test, monotonic start on the host)

    def note(self, request: dict[str, Any]) -> dict[str, Any]:
        test = request.get("test")
        if not isinstance(test, str):
            raise ValueError("progress needs a test name")
        if request.get("event") == "start":
            self.running = (test, time.monotonic())
        elif request.get("event") == "end":
            seconds = request.get("seconds")
            self.done.append((test, str(request.get("outcome")),
                              float(seconds) if isinstance(seconds, (int, float)) else 0.0))
            self.running = None
        else:
            raise ValueError(f"progress event must be start or end, got {request.get('event')!r}")
        return {}

    def report(self, slowest: int = 12) -> list[str]:
        """Lines for a run that was stopped: how far it got, what was running, the slowest tests."""
        if not self.done and self.running is None:
            return ["no test had started"]
        counts: dict[str, int] = {}
        for _, outcome, _ in self.done:
            counts[outcome] = counts.get(outcome, 0) + 1
        lines = [f"{len(self.done)} tests finished ("
                 + ", ".join(f"{n} {o}" for o, n in sorted(counts.items())) + ") in "
                 f"{sum(s for _, _, s in self.done):.0f} s"]
        if self.running is not None:
            test, t0 = self.running
            lines.append(f"running when stopped: {test}, for {time.monotonic() - t0:.0f} s")
        failed = [t for t, o, _ in self.done if o == "failed"]
        if failed:
            lines.append("failed: " + ", ".join(failed))
        lines.append("slowest finished tests:")
        for test, outcome, seconds in sorted(self.done, key=lambda d: -d[2])[:slowest]:
            lines.append(f"  {seconds:7.1f} s  {test} ({outcome})")
        return lines
