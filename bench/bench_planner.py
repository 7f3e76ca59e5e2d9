"""Planner timing: how long `plan()` takes for G guests on M monitors.

    python bench/bench_planner.py [--runs N]

The budget is 5 ms for 64 guests on 16 monitors: the daemon re-plans on every hotplug, policy edit and
guest change, and the plan must be ready before the next frame would have been. Prints one row per
scenario with the median, p95 and best of N runs, and the median as a share of the budget. Then the
CPU side of a policy reload: parsing and validating the policy text (what the daemon does when the
file is saved) followed by the plan, for the same scenarios. No KMS device is needed: the outputs are
a probe document of DP monitors on i915-like cards.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compositor import policy, topology  # noqa: E402
from compositor.planner import Guest, plan  # noqa: E402

BUDGET_MS = 5.0
SIZES = [(3840, 2160), (2560, 1440), (1920, 1200), (1920, 1080), (1680, 1050), (1600, 900), (1280, 1024),
         (1280, 800), (1280, 720), (1024, 768), (800, 600), (640, 480)]


def machine(monitors: int, per_card: int = 8) -> topology.Topology:
    """`monitors` DP connectors, `per_card` to a card, each card with as many CRTCs (any connector may
    use any CRTC, which is the hard case for routing), a primary plane per CRTC and two overlays."""
    cards = []
    for c in range((monitors + per_card - 1) // per_card):
        n = min(per_card, monitors - c * per_card)
        crtcs = [100 * (c + 1) + i for i in range(n)]
        modes = [{"name": f"{w}x{h}", "width": w, "height": h, "refresh": hz, "clock": 1, "preferred": i == 3}
                 for i, (w, h) in enumerate(SIZES) for hz in (60.0, 50.0)]
        conns = [{"id": 1000 * (c + 1) + k, "name": f"DP-{k + 1}", "type": "DP", "status": "connected",
                  "edid": {"manufacturer": "DEL", "product": 0xA0C1, "serial": 1000 * c + k,
                           "serial_string": None, "name": "DELL U2720Q", "year": 2021,
                           "identity": f"DEL:41153:{1000 * c + k}"},
                  "modes": modes, "preferred_mode": modes[3], "current": None, "link_status": "good",
                  "possible_crtcs": crtcs, "physical_size_mm": [597, 336]} for k in range(n)]
        planes = [{"id": 2000 * (c + 1) + i, "type": "primary", "possible_crtcs": [x],
                   "formats": {"XR24": ["LINEAR", "I915_X_TILED"], "AR24": ["LINEAR"]}, "zpos": None}
                  for i, x in enumerate(crtcs)]
        planes += [{"id": 3000 * (c + 1) + i, "type": "overlay", "possible_crtcs": crtcs,
                    "formats": {"XR24": ["LINEAR"], "NV12": ["LINEAR"]}, "zpos": None} for i in range(2)]
        crtc_docs = [{"id": x, "index": i, "active": False, "mode": None} for i, x in enumerate(crtcs)]
        cards.append({"path": f"/dev/dri/card{c}", "driver": "i915", "driver_desc": "", "bus_path": None,
                      "caps": {}, "connectors": conns, "crtcs": crtc_docs, "planes": planes})
    return topology.from_probe({"schema": topology.SCHEMA, "cards": cards})


def policy_text(guests: int, monitors: int, contended: bool, globs: bool) -> str:
    lines = ["monitors:"]
    for m in range(monitors):
        if globs:
            lines.append(f"  m{m}: {{edid: {{manufacturer: DEL, serial: {1000 * (m // 8) + m % 8}}}, "
                         "mode: match-guest, scaling: fit}")
        else:
            lines.append(f"  m{m}: {{connector: DP-{m % 8 + 1}, card: card{m // 8}, scaling: fit}}")
    lines.append("seats:")
    lines.append(f"  left: {{monitors: [{', '.join(f'm{m}' for m in range(0, monitors, 2))}]}}")
    lines.append(f"  right: {{monitors: [{', '.join(f'm{m}' for m in range(1, monitors, 2))}]}}")
    lines.append("guests:")
    for g in range(guests):
        name = f"'vm-{g:03d}*'" if globs else f"vm-{g:03d}"
        lines.append(f"  g{g}: {{name: {name}, kind: vfio}}")
    lines.append("placements:")
    for g in range(guests):
        first = 0 if contended else g % monitors
        failover = [f"m{(first + k) % monitors}" for k in range(1, min(4, monitors))]
        mirror = f", mirror: [m{(first + 5) % monitors}]" if g % 4 == 0 else ""
        lines.append(f"  - {{guest: g{g}, monitor: m{first}, failover: [{', '.join(failover)}], "
                     f"priority: {g % 7}{mirror}}}")
    return "\n".join(lines) + "\n"


def guests(n: int) -> list[Guest]:
    return [Guest(f"vm-{g:03d}", "vfio", width=SIZES[g % len(SIZES)][0], height=SIZES[g % len(SIZES)][1],
                  fourcc="XR24", modifier="LINEAR") for g in range(n)]


def measure(label: str, n_guests: int, n_monitors: int, runs: int, *, contended: bool = False,
            globs: bool = False, reload: bool = False) -> tuple[str, float, float, float, int]:
    """Time plan() (or, with `reload`, parse + validate the policy text and then plan)."""
    text = policy_text(n_guests, n_monitors, contended, globs)
    pol = policy.parse(text, "bench.yaml")
    outputs = machine(n_monitors).outputs()
    running = guests(n_guests)
    result = plan(pol, outputs, running)
    shown = sum(1 for o in result.outputs if o.guest is not None)

    def once() -> None:
        plan(policy.parse(text, "bench.yaml") if reload else pol, outputs, running)

    for _ in range(max(3, runs // 10)):  # warm up
        once()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        once()
        times.append((time.perf_counter_ns() - t0) / 1e6)
    times.sort()
    return label, statistics.median(times), times[int(len(times) * 0.95) - 1], times[0], shown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=300, help="timed runs per scenario (default 300)")
    args = parser.parse_args()

    rows = [
        measure("4 guests x 2 monitors", 4, 2, args.runs),
        measure("16 guests x 4 monitors", 16, 4, args.runs),
        measure("64 guests x 16 monitors", 64, 16, args.runs),
        measure("64 x 16, EDID + name globs", 64, 16, args.runs, globs=True),
        measure("64 x 16, all want one monitor", 64, 16, args.runs, contended=True),
        measure("128 guests x 32 monitors", 128, 32, args.runs),
    ]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    print(f"planner: {args.runs} runs per scenario, Python {sys.version.split()[0]}, on this host "
          f"({cpu}, no KMS needed)")
    print()
    head = (f"{'scenario':<32} {'median ms':>10} {'p95 ms':>8} {'best ms':>8} {'shown':>6} "
            f"{'of 5 ms budget':>15}")
    print(head)
    print("-" * len(head))
    for label, med, p95, best, shown in rows:
        print(f"{label:<32} {med:>10.3f} {p95:>8.3f} {best:>8.3f} {shown:>6} {med / BUDGET_MS:>14.1%}")

    reload_runs = max(10, args.runs // 10)
    reloads = [
        measure("16 guests x 4 monitors", 16, 4, reload_runs, reload=True),
        measure("64 guests x 16 monitors", 64, 16, reload_runs, reload=True),
        measure("64 x 16, EDID + name globs", 64, 16, reload_runs, globs=True, reload=True),
    ]
    print()
    print(f"policy reload, CPU part: parse + validate the YAML text, then plan ({reload_runs} runs)")
    print()
    head = f"{'scenario':<32} {'median ms':>10} {'p95 ms':>8} {'best ms':>8} {'shown':>6}"
    print(head)
    print("-" * len(head))
    for label, med, p95, best, shown in reloads:
        print(f"{label:<32} {med:>10.3f} {p95:>8.3f} {best:>8.3f} {shown:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
