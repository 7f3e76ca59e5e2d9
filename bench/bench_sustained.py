"""Sustained load: four monitors, a guest on each, flipping at 60 and then 144 flips/s.

    python -m directflip_tools.lab run -- python bench/bench_sustained.py [--seconds S] [--rates 60,144]

Runs in the lab: the three virtio-gpu heads (plugged at 1024x768, 800x600 and 640x480) and the vkms
output (1024x768, its vblank at the mode's refresh), each showing one light guest (four buffers filled
once, then only flip messages): the virtio-gpu guests' buffers are dumb buffers of the display card
(zero copy), the vkms guest's are vgem buffers (a foreign dma-buf vkms imports: zero copy too). For
each rate a fresh `directflip run` is started, the guests flip for a warm-up and then for the
measured window. Printed per rate and output, over the window: the guest's flips/s and the ticks on
which it had no free buffer (all four held by the compositor), commits/s and presented/s, frames
dropped (replaced by a newer one before they were committed: latest frame wins), the most commits
ever in flight on the CRTC, EBUSY answers and errors, the commit delay and flip latency percentiles
of the run; and the compositor's CPU share (CPU time over wall time, 100% = one CPU), its CPU per
presented frame and how busy all the machine's CPUs were.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import labbench as lb  # noqa: E402

HEADS = {"left": (0, 1024, 768), "centre": (1, 800, 600), "right": (2, 640, 480)}
VKMS_SIZE = (1024, 768)
GUESTS = {"left": "g-left", "centre": "g-centre", "right": "g-right", "wb": "g-wb"}
# One buffer on screen, one in flight, one pending and one the guest may flip while all three are
# busy: a guest faster than its monitor then replaces the pending frame (dropped, latest frame wins)
# instead of waiting for a buffer.
BUFFERS = 4


def run_rate(cards: dict[str, str], rate: float, seconds: float, warmup: float) -> tuple[list, str]:
    monitors = {m: f"{{connector: Virtual-{head + 1}, driver: virtio_gpu}}"
                for m, (head, _, _) in HEADS.items()}
    monitors["wb"] = '{connector: "Virtual-*", driver: vkms}'
    text = lb.policy(monitors, {g: m for m, g in GUESTS.items()})
    sizes = {m: (w, h) for m, (_, w, h) in HEADS.items()} | {"wb": VKMS_SIZE}
    with lb.Compositor(text, "--device", cards["virtio_gpu"], "--device", cards["vkms"],
                       name="sustained") as comp:
        guests = {m: lb.LightGuest(g, comp.socket, cards["vgem"] if m == "wb" else cards["virtio_gpu"],
                                   *sizes[m], count=BUFFERS) for m, g in GUESTS.items()}
        with lb.flipping(comp, guests, rate) as driver:
            time.sleep(warmup)
            flips0 = {m: g.flips for m, g in guests.items()}
            stalls0 = {m: g.stalls for m, g in guests.items()}
            a = lb.Sample.take(comp)
            time.sleep(seconds)
            b = lb.Sample.take(comp)
            flips1 = {m: g.flips for m, g in guests.items()}
            stalls1 = {m: g.stalls for m, g in guests.items()}
    wall = (b.wall_ns - a.wall_ns) / 1e9
    cpu = (b.cpu_ns - a.cpu_ns) / 1e9
    rows, presented = [], 0
    for m in GUESTS:
        out = b.outputs[m]
        if out["path"] != "zero-copy" or a.outputs[m]["path"] != "zero-copy":
            raise lb.BenchError(f"{m}: path {out['path']!r} ({out['reason']}), expected zero-copy")
        d = {k: lb.delta(a, b, m, k) for k in ("commits", "presented", "dropped", "busy", "errors")}
        presented += d["presented"]
        driver_name = "vkms" if m == "wb" else "virtio_gpu"
        delay, lat = out["commit_delay_us"], out["latency_ms"]
        rows.append([m, driver_name, out["mode"], f"{(flips1[m] - flips0[m]) / wall:.1f}",
                     str(stalls1[m] - stalls0[m]),
                     f"{d['commits'] / wall:.1f}", f"{d['presented'] / wall:.1f}", str(d["dropped"]),
                     str(out["max_in_flight"]), str(d["busy"]), str(d["errors"]),
                     f"{lb.fmt(delay['p50'], 0)} / {lb.fmt(delay['p99'], 0)}",
                     f"{lb.fmt(lat['p50'], 2)} / {lb.fmt(lat['p99'], 2)}"])
    total = (f"compositor CPU: {cpu / wall:.1%} of one CPU over {wall:.1f} s, "
             f"{cpu / presented * 1e6:.0f} us per presented frame ({presented} frames on 4 outputs); "
             f"all CPUs of the machine busy: {lb.machine_load(a, b)}; guest ticks skipped (the "
             f"guests' thread late): {driver.skipped}")
    return rows, total


def main(argv: list[str] | None = None) -> int:
    parser = lb.arguments(__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per rate (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds flipped before it (2)")
    parser.add_argument("--rates", default="60,144", help="guest flip rates, comma-separated (60,144)")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]

    where, evidence = lb.platform()
    cards = lb.cards()
    for head, w, h in HEADS.values():
        lb.plug(head, w, h, cards["virtio_gpu"])
    results = []
    for rate in rates:
        print(f"bench_sustained: 4 outputs at {rate:.0f} flips/s ({args.seconds:.0f} s) ...", flush=True)
        results.append((rate, *run_rate(cards, rate, args.seconds, args.warmup)))
    print()
    print(f"Sustained: 4 outputs, one light guest each — {where}")
    print(f"  (platform test: {evidence})")
    headers = ["output", "card", "mode", "guest flips/s", "no free buffer", "commits/s", "presented/s",
               "dropped", "max in flight", "EBUSY", "errors", "commit delay p50/p99 us", "latency p50/p99 ms"]
    for rate, rows, total in results:
        print()
        print(f"guests at {rate:.0f} flips/s, {args.seconds:.0f} s window:")
        print(lb.table(headers, rows, left=3))
        print(total)
    return 0


if __name__ == "__main__":
    lb.script(main, "bench_sustained")
