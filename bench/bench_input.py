"""Input: an evdev event → the guest's message, and what a 1000 Hz mouse costs the compositor.

    python -m directflip_tools.lab run -- python bench/bench_input.py [--events N] [--seconds S]

Runs in the lab against the real `directflip run` (bare console, no VT). The bench is the guest: a
frame-socket client named `probe` that shows one buffer on head 0 and reads the input the compositor
sends it. The mouse is a uinput device the bench makes ("directflip-bench mouse"); the kernel hands
its events to the compositor through evdev exactly as a USB mouse's.

1. Latency. N single motions (REL_X alternately +1 and −1, then SYN_REPORT), 10 ms apart. For each:
   from the uinput write returning to the `pointer` message read by the probe (one process, one
   clock), p50/p99/max; and the compositor's own part, from its read of the evdev events to its call
   to the guest's sink returning (its status `input.route_us`, p50/p99).
2. Cost. The mouse at 1000 reports a second (REL_X, REL_Y, SYN_REPORT each: ~3000 events/s) for S
   seconds, the probe reading as it goes. The compositor's CPU time over the window, as a share of one
   CPU and per report; the reports it turned into messages.
3. D-Bus. The same single motions with a QEMU D-Bus display focused instead (the project's stand-in
   for QEMU, directflip_tools.qemu_peer, on a private bus): the compositor's read of the
   events to its Mouse.SetAbsPosition call sent (status `input.route_us`), and the calls QEMU's side
   answered.

The lab's CPU is emulated (QEMU TCG) on a shared machine: compare runs on the same machine, and read
the load average `make bench` prints beside them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import labbench as lb  # noqa: E402

from compositor.stats import percentile  # noqa: E402

POLICY = """version: 1
monitors:
  left: {connector: Virtual-1, driver: virtio_gpu}
guests:
  probe: {kind: socket}
placements:
  - {guest: probe, monitor: left}
"""
MOUSE = "directflip-bench mouse"


def _probe(comp: lb.Compositor, card: str):
    """The bench's own guest: one dumb buffer of head 0's size, flipped once, until it is shown."""
    from compositor.kms import Card
    from compositor.sources.framesocket import FrameSocketClient
    from directflip_tools.synthetic import Swapchain

    kms = Card(card)
    chain = Swapchain(kms, 1024, 768, count=1, name="probe")
    client = FrameSocketClient(comp.socket, "probe")
    for slot in chain.slots.values():
        client.announce(slot.id, slot.fd, "XR24", 1024, 768, slot.pitch)
    client.flip(1, 0)
    comp.wait_shown({"left": "probe"})
    return kms, chain, client


def _mouse():
    from evdev import UInput
    from evdev import ecodes as e

    return UInput({e.EV_KEY: [e.BTN_LEFT, e.BTN_RIGHT], e.EV_REL: [e.REL_X, e.REL_Y]}, name=MOUSE)


def _wait_taken(comp: lb.Compositor, timeout: float = 60) -> None:
    """Until the compositor has taken the bench's mouse."""
    deadline = time.monotonic() + timeout
    while not any(d.get("name") == MOUSE for d in (comp.status().get("input") or {}).get("devices", [])):
        if time.monotonic() > deadline:
            raise lb.BenchError(f"the compositor did not take {MOUSE}:\n{comp.tail()}")
        time.sleep(0.1)


DBUS_POLICY = """version: 1
monitors:
  left: {{connector: Virtual-1, driver: virtio_gpu}}
guests:
  peer: {{kind: qemu-dbus, display: "dbus:unix:path={bus}"}}
placements:
  - {{guest: peer, monitor: left}}
"""


def _dbus_route(events: int) -> tuple[dict, dict]:
    """Phase 3: (route_us, the display's input counters) with a D-Bus guest focused."""
    import subprocess
    import tempfile

    from evdev import ecodes as e

    work = Path(tempfile.mkdtemp(prefix="directflip-bench-dbus-"))
    bus = work / "peer.bus"
    procs = [subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--nopidfile",
                               f"--address=unix:path={bus}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT)]
    try:
        deadline = time.monotonic() + 30
        while not bus.exists():
            if time.monotonic() > deadline:
                raise lb.BenchError("dbus-daemon did not create its socket")
            time.sleep(0.05)
        procs.append(subprocess.Popen([sys.executable, "-m", "directflip_tools.qemu_peer", "serve",
                                       "--bus", f"unix:path={bus}", "--name", "peer-vm", "--on", "vgem",
                                       "--mode", "dmabuf", "--buffers", "1", "--rate", "5"],
                                      stdout=(work / "peer.log").open("w"), stderr=subprocess.STDOUT))
        with lb.Compositor(DBUS_POLICY.format(bus=bus), name="input-dbus") as comp:
            comp.wait_shown({"left": "peer"}, timeout=120)
            mouse = _mouse()
            try:
                _wait_taken(comp)
                for i in range(events):
                    mouse.write(e.EV_REL, e.REL_X, 1 if i % 2 == 0 else -1)
                    mouse.syn()
                    time.sleep(0.01)
                time.sleep(1.0)
                st = comp.status()
            finally:
                mouse.close()
        peer = next(g for g in st["guests"] if g["name"] == "peer")
        return st["input"]["route_us"], peer["qemu"]["input"]
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=20)


def main(argv: list[str] | None = None) -> int:
    parser = lb.arguments(__doc__)
    parser.add_argument("--events", type=int, default=300, help="single motions timed (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="the 1000 Hz window (default: %(default)s)")
    args = parser.parse_args(argv)
    from evdev import ecodes as e

    from compositor.sources.framesocket import Pointer

    cards = lb.cards()
    with lb.Compositor(POLICY, name="input") as comp:
        kms, chain, client = _probe(comp, cards["virtio_gpu"])
        mouse = _mouse()
        try:
            _wait_taken(comp)
            client.poll(0)

            # 1. latency, one motion at a time
            lat_us: list[float] = []
            lost = 0
            for i in range(args.events):
                mouse.write(e.EV_REL, e.REL_X, 1 if i % 2 == 0 else -1)
                mouse.syn()
                t0 = time.monotonic_ns()
                got = None
                end = time.monotonic() + 2.0
                while got is None and time.monotonic() < end:
                    got = next((ev for ev in client.poll(0.5) if isinstance(ev, Pointer)), None)
                if got is None:
                    lost += 1
                else:
                    lat_us.append((time.monotonic_ns() - t0) / 1000)
                time.sleep(0.01)
            route = comp.status()["input"]["route_us"]

            # 2. cost of a 1000 Hz mouse
            client.poll(0)
            before = lb.cpu_ns(comp.pid)
            start = time.monotonic()
            reports = received = 0
            period = 0.001
            while time.monotonic() - start < args.seconds:
                due = start + reports * period
                if time.monotonic() < due:
                    received += sum(isinstance(ev, Pointer) for ev in client.poll(0))
                    time.sleep(max(0.0, min(period, due - time.monotonic())))
                    continue
                mouse.write(e.EV_REL, e.REL_X, 1 if reports % 2 == 0 else -1)
                mouse.write(e.EV_REL, e.REL_Y, 1 if reports % 4 < 2 else -1)
                mouse.syn()
                reports += 1
            elapsed = time.monotonic() - start
            time.sleep(0.5)
            received += sum(isinstance(ev, Pointer) for ev in client.poll(0))
            cpu = (lb.cpu_ns(comp.pid) - before) / 1e9
        finally:
            mouse.close()
            client.close()
            chain.close()
            kms.close()

    print("input latency: uinput write → the guest's `pointer` message read (frame socket)")
    rows = [["write → message read", lb.fmt(percentile(lat_us, 0.5)), lb.fmt(percentile(lat_us, 0.99)),
             lb.fmt(max(lat_us) if lat_us else None), str(len(lat_us)), str(lost)],
            ["compositor: read → sent", lb.fmt(route.get("p50")), lb.fmt(route.get("p99")), "-", "-", "-"]]
    print(lb.table(["µs", "p50", "p99", "max", "n", "lost"], rows))
    print(f"\n1000 Hz mouse for {elapsed:.1f} s: {reports} reports written ({reports / elapsed:.0f}/s), "
          f"{received} pointer messages received")
    print(lb.table(["compositor CPU", "value"],
                   [["share of one CPU", f"{100 * cpu / elapsed:.1f} %"],
                    ["per report", f"{1e6 * cpu / max(1, reports):.0f} µs"]]))

    dbus_route, counters = _dbus_route(args.events)
    print(f"\nQEMU D-Bus guest focused ({args.events} motions): the display's input {counters}")
    print(lb.table(["µs", "p50", "p99"],
                   [["compositor: read → D-Bus call sent", lb.fmt(dbus_route.get("p50")),
                     lb.fmt(dbus_route.get("p99"))]]))
    return 0 if lat_us and counters.get("answered") else 1


if __name__ == "__main__":
    lb.script(main, "bench_input")
