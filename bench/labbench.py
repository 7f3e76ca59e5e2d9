"""What the lab benches share: the real compositor as a subprocess, light guests, CPU accounting,
the host channel, and saying where the numbers come from.

The benches measure `directflip run` itself, not a model of it: each starts `python -m compositor.cli
run` with a policy of its own, feeds it frames from light guests and reads the compositor's own account
(the control socket's status) and its CPU time (the kernel's, from /proc). Nothing here draws per
frame: a light guest fills its buffers once and then only sends flip messages, so the guest side costs
little and the compositor is what is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from compositor.control import request  # noqa: E402

TCG_LABEL = "QEMU TCG (emulated CPU)"


class BenchError(RuntimeError):
    """The bench did not measure what it claims to (wrong path, output not lit, ...): no numbers."""


# ------------------------------------------------------------------------------------------ where

def platform() -> tuple[str, str]:
    """(label, evidence) for the machine the numbers come from. Under QEMU without KVM (TCG: every
    instruction emulated) times are many times those of real hardware, so they are labelled as such.

    The test: `systemd-detect-virt --vm` says `qemu` for QEMU without a hardware hypervisor (it says
    `kvm` under KVM, `none` on bare metal). Without it: DMI's sys_vendor is QEMU and the kernel offers
    no kvm-clock (a KVM guest always gets one)."""
    try:
        virt = subprocess.run(["systemd-detect-virt", "--vm"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        evidence = f"systemd-detect-virt --vm: {virt}"
    except (OSError, subprocess.TimeoutExpired):
        vendor = _read("/sys/class/dmi/id/sys_vendor")
        clocks = _read("/sys/devices/system/clocksource/clocksource0/available_clocksource")
        virt = ("qemu" if vendor == "QEMU" and "kvm-clock" not in clocks
                else "kvm" if "kvm-clock" in clocks else "unknown")
        evidence = f"sys_vendor {vendor or '?'}, clocksources {clocks or '?'}"
    cpus = os.cpu_count() or 0
    model = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                  if line.startswith("model name")), "?")
    if virt == "qemu":
        return f"{TCG_LABEL}, {cpus} vCPUs ({model})", evidence
    if virt in ("none", ""):
        return f"bare metal, {cpus} CPUs ({model})", evidence
    return f"virtual machine ({virt}), {cpus} vCPUs ({model})", evidence


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def cpu_ns(pid: int) -> int:
    """CPU time (user + system) of every thread of `pid` so far, in ns: the scheduler's own account
    (/proc/PID/task/*/schedstat, ns resolution). Kernels without schedstat: utime + stime of
    /proc/PID/stat (clock ticks, 10 ms resolution)."""
    total, found = 0, False
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
            found = True
        except (OSError, ValueError, IndexError):
            continue
    if found:
        return total
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """A bench's argument parser, its module docstring as the description."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def script(main, name: str) -> None:
    """Run a bench's main() as a script: a BenchError is one line on stderr and exit status 1."""
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        sys.exit(1)


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    """A plain text table; the first `left` columns are left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells) -> str:
        return "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


# ------------------------------------------------------------------------------------------ lab

_host = None


def host():
    """The lab host's services (plug, unplug, screendump): one channel per process."""
    global _host
    if _host is None:
        from directflip_tools.lab.channel import HostChannel
        _host = HostChannel.from_env()
    return _host


def cards() -> dict[str, str]:
    """DRM driver → /dev/dri/cardN; the lab has virtio_gpu, vkms and vgem."""
    from directflip_tools.lab.guest import lab_cards
    try:
        return lab_cards()
    except RuntimeError as exc:
        raise BenchError(str(exc)) from None


def plug(head: int, width: int, height: int, card: str) -> None:
    """Connect virtio-gpu head `head` at width x height (a real hotplug) and wait until a probe of
    the connector gives that size as its preferred mode (sysfs `modes` is only refreshed by a probe)."""
    from compositor.kms import Card

    host().plug(head, width, height)
    deadline = time.monotonic() + 20
    while True:
        with Card(card) as c:   # opening a card probes its connectors
            conn = c.connector(f"Virtual-{head + 1}")
            mode = conn.preferred_mode if conn.connected else None
        if mode is not None and (mode.width, mode.height) == (width, height):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"head {head} did not come up at {width}x{height} (preferred mode: "
                             f"{mode.label() if mode else None})")
        time.sleep(0.1)


# ------------------------------------------------------------------------------------- compositor

class Compositor:
    """`directflip run` as a subprocess with its own sockets and policy in a temporary directory."""

    def __init__(self, policy: str, *args: str, name: str = "bench",
                 env: dict[str, str] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"directflip-{name}-"))
        self.policy = self.dir / "policy.yaml"
        self.socket = str(self.dir / "frames.sock")
        self.control = str(self.dir / "control.sock")
        self.log = self.dir / "compositor.log"
        self.policy.write_text(policy)
        self.cmd = [sys.executable, "-m", "compositor.cli", "-v", "run", "--policy", str(self.policy),
                    "--socket", self.socket, "--control", self.control, "--vt", "none", *args]
        self.env = env
        self._spawn("w")

    def restart(self) -> None:
        """Start it again (after kill()) on the same policy and sockets, until it answers."""
        self._spawn("a")

    def _spawn(self, log_mode: str) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=self.log.open(log_mode), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=REPO, env=self.env)
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"the compositor exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                self.status()
                return
            except (ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise BenchError(f"the compositor did not answer within 90 s:\n{self.tail()}")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self) -> dict:
        return request(self.control, {"cmd": "status"})

    def outputs(self) -> dict[str, dict]:
        return {o["monitor"]: o for o in self.status()["outputs"] if o.get("monitor")}

    def wait_shown(self, wanted: dict[str, str], timeout: float = 60) -> dict[str, dict]:
        """Until every monitor of `wanted` (monitor → guest) has that guest's frame on screen."""
        deadline = time.monotonic() + timeout
        while True:
            outs = self.outputs()
            if all(outs.get(m, {}).get("guest") == g and outs[m].get("on_screen") for m, g in wanted.items()):
                return outs
            if time.monotonic() > deadline:
                seen = {m: (o.get("guest"), o.get("path"), o.get("reason")) for m, o in outs.items()}
                raise BenchError(f"not shown within {timeout:.0f} s: wanted {wanted}, outputs {seen}\n"
                                 f"{self.tail()}")
            time.sleep(0.1)

    def set_policy(self, text: str) -> int:
        """Save a new policy the way editors do (write aside, rename over); returns CLOCK_MONOTONIC
        ns when the rename returned."""
        tmp = self.policy.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.policy)
        return time.monotonic_ns()

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-n:])
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> Compositor:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def machine_busy() -> tuple[int, int]:
    """(busy, total) clock ticks of every CPU of the machine so far (/proc/stat; idle and iowait
    are not busy)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


@dataclass
class Sample:
    """The compositor at one moment: its status, its CPU time, the whole machine's CPU ticks and the
    wall clock."""

    wall_ns: int
    cpu_ns: int
    outputs: dict[str, dict]
    busy: tuple[int, int]

    @classmethod
    def take(cls, comp: Compositor) -> Sample:
        outputs = comp.outputs()
        return cls(time.monotonic_ns(), cpu_ns(comp.pid), outputs, machine_busy())


def delta(a: Sample, b: Sample, monitor: str, key: str) -> int:
    return b.outputs[monitor][key] - a.outputs[monitor][key]


def machine_load(a: Sample, b: Sample) -> str:
    """How busy all the machine's CPUs were between two samples (compositor, guests, kernel)."""
    busy, total = b.busy[0] - a.busy[0], b.busy[1] - a.busy[1]
    return f"{busy / total:.0%} of {os.cpu_count()} CPUs" if total else "-"


# ------------------------------------------------------------------------------------------ guests

@dataclass(eq=False)
class LightGuest:
    """A guest that costs little: `count` XRGB8888 dumb buffers on `card_path`, filled once with one
    grey, exported as dma-bufs and announced; then only flip messages. The buffer flipped is the free
    one flipped longest ago (a buffer is busy from its flip until the compositor releases it)."""

    name: str
    socket: str
    card_path: str
    width: int
    height: int
    count: int = 3
    flips: int = 0
    stalls: int = 0          # ticks with no free buffer (the compositor held them all)
    presented: deque = field(default_factory=lambda: deque(maxlen=20000))  # kernel timestamps (ns)
    error: str | None = None

    def open(self) -> None:
        import numpy as np

        from compositor.kms import Card
        from compositor.sources.framesocket import FrameSocketClient

        self.card = Card(self.card_path, kms=False)
        self.buffers, self.fds, self.busy, self.last = [], [], set(), {}
        shade = 0x30 + (sum(self.name.encode()) * 37) % 0xA0
        for i in range(self.count):
            buf = self.card.create_dumb(self.width, self.height, 32)
            np.frombuffer(buf.map(), np.uint8)[:] = shade
            self.buffers.append(buf)
            self.fds.append(self.card.export_dmabuf(buf.handle))
            self.last[i + 1] = -1
        self.client = FrameSocketClient(self.socket, self.name)
        for i, (buf, fd) in enumerate(zip(self.buffers, self.fds, strict=True)):
            self.client.announce(i + 1, fd, "XR24", self.width, self.height, buf.pitch)

    def flip(self) -> None:
        free = [b for b in self.last if b not in self.busy]
        if not free:
            self.stalls += 1
            return
        buf = min(free, key=self.last.__getitem__)
        self.busy.add(buf)
        self.last[buf] = self.flips
        self.client.flip(buf, frame=self.flips)
        self.flips += 1

    def dispatch(self) -> None:
        from compositor.sources.framesocket import Presented, Released

        for ev in self.client.poll(0):
            if isinstance(ev, Released):
                self.busy.discard(ev.id)
            elif isinstance(ev, Presented):
                self.presented.append(ev.timestamp_ns or time.monotonic_ns())

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        for fd in getattr(self, "fds", []):
            os.close(fd)
        for buf in getattr(self, "buffers", []):
            buf.destroy()
        card = getattr(self, "card", None)
        if card is not None:
            card.close()


class FlipDriver(threading.Thread):
    """Flips every guest at `rate` per second on absolute deadlines (tick k at start + k/rate, a tick
    already past is skipped, never made up in a burst) and answers the compositor's messages, in one
    thread of its own."""

    def __init__(self, guests: list[LightGuest], rate: float) -> None:
        super().__init__(daemon=True, name="flip-driver")
        self.guests, self.period = guests, 1.0 / rate
        self.skipped = 0
        self._halt = threading.Event()

    def run(self) -> None:
        by_fd = {g.client.fileno(): g for g in self.guests}
        start = time.monotonic()
        tick = 0
        try:
            while not self._halt.is_set():
                due = start + tick * self.period
                while True:
                    left = due - time.monotonic()
                    ready, _, _ = select.select(list(by_fd), [], [], max(0.0, left))
                    for fd in ready:
                        by_fd[fd].dispatch()
                    if left <= 0 or self._halt.is_set():
                        break
                for g in self.guests:
                    g.flip()
                tick += 1
                behind = int((time.monotonic() - start) / self.period)
                if behind > tick:
                    self.skipped += behind - tick
                    tick = behind
        except Exception as exc:  # noqa: BLE001 — reported by the bench, which stops
            for g in self.guests:
                g.error = g.error or f"{type(exc).__name__}: {exc}"

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def check(self) -> None:
        bad = [f"{g.name}: {g.error}" for g in self.guests if g.error]
        if bad:
            raise BenchError("a guest failed: " + "; ".join(bad))


@contextlib.contextmanager
def flipping(comp: Compositor, guests: dict[str, LightGuest], rate: float):
    """Open `guests` (monitor → the guest the policy puts there), flip them all at `rate` and wait
    until every monitor shows its guest; yields the FlipDriver. On the way out the flipping stops,
    the guests close, and a guest that failed meanwhile raises BenchError."""
    driver = None
    try:
        for g in guests.values():
            g.open()
        driver = FlipDriver(list(guests.values()), rate)
        driver.start()
        comp.wait_shown({m: g.name for m, g in guests.items()})
        yield driver
    finally:
        if driver is not None:
            driver.stop()
        for g in guests.values():
            g.close()
    driver.check()


def policy(monitors: dict[str, str], placements: dict[str, str]) -> str:
    """A policy: monitor → its YAML flow mapping, guest → monitor (every guest kind socket)."""
    lines = ["version: 1", "monitors:"]
    lines += [f"  {m}: {spec}" for m, spec in monitors.items()]
    lines.append("guests:")
    lines += [f"  {g}: {{kind: socket}}" for g in placements]
    lines.append("placements:")
    lines += [f"  - {{guest: {g}, monitor: {m}}}" for g, m in placements.items()]
    return "\n".join(lines) + "\n"
