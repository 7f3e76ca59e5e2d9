"""Flip path cost: a guest's flip message → the compositor's commit ioctl, per frame, at 1920x1080.

    python -m directflip_tools.lab run -- \
        python bench/bench_flip_path.py [--rounds N] [--seconds S] [--rate HZ]

Runs in the lab (it plugs virtio-gpu head 0 at 1920x1080 through the host channel). For each path it
starts the real `directflip run` with a policy that puts one guest on that head at 1920x1080, and a
light guest (three XRGB8888 buffers filled once, then only flip messages over the frame socket) that
flips at a fixed rate. Three paths on the same card and mode:

- C zero-copy: the guest's buffers are virtio-gpu dumb buffers, imported back into the same card
  (zero copy), flipped by native/kms_helpers.c from the daemon's loop (the default --data-plane);
- Python zero-copy: the same, `directflip run --pure-python` (the flip built with AtomicRequest);
- C copy: the guest's buffers are on vgem; virtio-gpu refuses a foreign dma-buf (ENODEV), so the
  compositor copies every committed frame into its own dumb buffer.

Measured from the compositor's side: `commit_delay_us` of its status (the frame socket received the
flip → the commit ioctl returned, the import or copy included), and its CPU time from /proc over the
measurement window divided by the frames it committed in that window. The paths take turns, round
after round (a fresh compositor each time), so a change in the machine's speed hits them alike;
ratios are taken within a round and their median printed. The path the status reports must be the
one the row claims, or the bench stops without numbers. Then the submit-only
microbenchmark of bench_flip.py (kms_flip vs AtomicRequest, nothing else) at 1920x1080 on virtio-gpu
and vkms, and one table with every row, the ratios and the goals of issue 8.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_flip  # noqa: E402
import labbench as lb  # noqa: E402

WIDTH, HEIGHT = 1920, 1080
MONITOR, GUEST = "bench", "flip"
GOAL_C_P50_US = 50.0
GOAL_PY_OVER_C = 5.0
GOAL_COPY_OVER_ZERO = 30.0


@dataclass
class PathResult:
    label: str
    path: str
    commits: int
    presented: int
    dropped: int
    copies: int
    errors: int
    busy: int
    stalls: int
    seconds: float
    cpu_s: float
    delay_p50: float | None
    delay_p99: float | None
    latency_p50: float | None   # ms, flip received → kernel flip timestamp
    machine: str                # how busy all CPUs were over the window

    @property
    def cpu_per_flip_us(self) -> float:
        return self.cpu_s / self.commits * 1e6 if self.commits else float("nan")

    @property
    def cpu_share(self) -> float:
        return self.cpu_s / self.seconds


def measure_path(label: str, path: str, card: str, buffers_on: str, native: bool, rate: float,
                 seconds: float, warmup: float) -> PathResult:
    text = lb.policy({MONITOR: f"{{connector: Virtual-1, driver: virtio_gpu, mode: {WIDTH}x{HEIGHT}}}"},
                     {GUEST: MONITOR})
    args = ["--device", card] + ([] if native else ["--pure-python"])
    with lb.Compositor(text, *args, name="flip-path") as comp:
        guest = lb.LightGuest(GUEST, comp.socket, buffers_on, WIDTH, HEIGHT)
        with lb.flipping(comp, {MONITOR: guest}, rate):
            time.sleep(warmup)
            a = lb.Sample.take(comp)
            stalls0 = guest.stalls
            time.sleep(seconds)
            b = lb.Sample.take(comp)
            stalls = guest.stalls - stalls0
    out = b.outputs[MONITOR]
    mode = out["mode"].split("@")[0]
    if mode != f"{WIDTH}x{HEIGHT}":
        raise lb.BenchError(f"{label}: the output runs {out['mode']}, not {WIDTH}x{HEIGHT}")
    if out["path"] != path or a.outputs[MONITOR]["path"] != path:
        raise lb.BenchError(f"{label}: the compositor says path {out['path']!r} ({out['reason']}), "
                            f"not {path!r}: refusing to report it as {path}")
    keys = ("commits", "presented", "dropped", "copies", "errors", "busy")
    d = {k: lb.delta(a, b, MONITOR, k) for k in keys}
    if path == "copy" and d["copies"] < d["commits"]:
        raise lb.BenchError(f"{label}: {d['copies']} copies for {d['commits']} commits")
    if path == "zero-copy" and d["copies"]:
        raise lb.BenchError(f"{label}: {d['copies']} copies on the zero-copy path")
    if not d["commits"]:
        raise lb.BenchError(f"{label}: nothing committed in {seconds} s")
    delay = out["commit_delay_us"]
    return PathResult(label, path, d["commits"], d["presented"], d["dropped"], d["copies"], d["errors"],
                      d["busy"], stalls, (b.wall_ns - a.wall_ns) / 1e9, (b.cpu_ns - a.cpu_ns) / 1e9,
                      delay["p50"], delay["p99"], out["latency_ms"]["p50"], lb.machine_load(a, b))


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def median_range(values: list[float], unit: str = "") -> str:
    """`median (min–max)` of per-round values; just the value for one round."""
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.1f}{unit}"
    return f"{med:.1f}{unit} ({min(values):.1f}–{max(values):.1f})"


def main(argv: list[str] | None = None) -> int:
    parser = lb.arguments(__doc__)
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="measurement window per path and round (5)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds; each runs every path once, one after the other (3)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds flipped before each window (2)")
    parser.add_argument("--rate", type=float, default=60.0, help="guest flips per second (60)")
    parser.add_argument("--flips", type=int, default=400, help="submit-only flips per path and card (400)")
    args = parser.parse_args(argv)

    where, evidence = lb.platform()
    cards = lb.cards()
    lb.plug(0, WIDTH, HEIGHT, cards["virtio_gpu"])
    virtio, vgem = cards["virtio_gpu"], cards["vgem"]
    paths = [
        ("C zero-copy", "zero-copy", virtio, True),
        ("Python zero-copy", "zero-copy", virtio, False),
        ("C copy", "copy", vgem, True),
    ]
    # Paths alternate within a round, so a change in the machine's speed (under TCG: other load on
    # the host) hits every path alike; ratios are taken within a round, then their median.
    rounds: list[dict[str, PathResult]] = []
    for n in range(args.rounds):
        results = {}
        for label, path, buffers_on, native in paths:
            print(f"bench_flip_path: round {n + 1}/{args.rounds}, {label} ({args.seconds:.0f} s at "
                  f"{args.rate:.0f} flips/s) ...", flush=True)
            results[label] = measure_path(label, path, virtio, buffers_on, native, args.rate, args.seconds,
                                          args.warmup)
        rounds.append(results)
    print(f"bench_flip_path: submit only, {args.flips} flips per path and card ...", flush=True)
    micro = bench_flip.measure(args.flips, (WIDTH, HEIGHT))
    if not micro:
        raise lb.BenchError("submit-only: no card could light 1920x1080")

    print()
    print(f"Flip path cost, 1920x1080 XRGB8888 — {where}")
    print(f"  (platform test: {evidence})")
    print(f"  compositor rows: `directflip run` with one light guest at {args.rate:.0f} flips/s on "
          f"virtio-gpu head 0, {args.rounds} rounds of {args.seconds:.0f} s per path (a fresh compositor "
          f"each); commit delay = flip message received → commit ioctl returned (p50/p99 over every "
          f"commit of that compositor); CPU = its CPU time / frames committed in the window; median "
          f"(min–max) over the rounds")
    print("  submit-only rows: bench_flip.py, the flip ioctl alone (time to submit; CPU = thread CPU time "
          "per submit), one flip in flight")
    rows = []
    for label, path, _, _ in paths:
        rs = [r[label] for r in rounds]
        rows.append([f"compositor, {label}", "virtio_gpu", path,
                     median_range([r.delay_p50 for r in rs]), median_range([r.delay_p99 for r in rs]),
                     median_range([r.cpu_per_flip_us for r in rs]),
                     median_range([r.cpu_share * 100 for r in rs], "%"),
                     str(sum(r.commits for r in rs)), str(sum(r.presented for r in rs)),
                     str(sum(r.dropped for r in rs)), str(sum(r.errors + r.busy for r in rs))])
    for m in micro:
        rows.append([f"submit only, {m.path}", m.driver, "zero-copy", lb.fmt(m.submit_p50),
                     lb.fmt(m.submit_p99), lb.fmt(m.cpu_mean), "-", str(m.flips), str(m.flips), "-", "-"])
    print(lb.table(["what", "card", "path", "p50 us", "p99 us", "CPU/flip us", "CPU share", "commits",
                    "presented", "dropped", "errors"], rows, left=3))
    print("per round (p50 us / CPU per flip us / all CPUs of the machine busy):")
    for n, results in enumerate(rounds):
        print(f"  round {n + 1}: " + "; ".join(
            f"{r.label} {r.delay_p50:.0f} / {r.cpu_per_flip_us:.0f} / {r.machine}" for r in results.values()))

    def ratio(num: str, den: str, key) -> list[float]:
        return [key(r[num]) / key(r[den]) for r in rounds]

    delay = ratio("Python zero-copy", "C zero-copy", lambda r: r.delay_p50)
    cpu_py = ratio("Python zero-copy", "C zero-copy", lambda r: r.cpu_per_flip_us)
    cpu_copy = ratio("C copy", "C zero-copy", lambda r: r.cpu_per_flip_us)
    delay_copy = ratio("C copy", "C zero-copy", lambda r: r.delay_p50)
    c_p50 = statistics.median(r["C zero-copy"].delay_p50 for r in rounds)
    virt_c = next(m for m in micro if m.driver == "virtio_gpu" and m.path.startswith("C"))
    virt_py = next(m for m in micro if m.driver == "virtio_gpu" and not m.path.startswith("C"))
    print()
    print("Ratios (same run; compositor rows: per round, median (min–max) over the rounds):")
    lines = [
        ["compositor commit delay p50, Python / C", median_range(delay, "x")],
        ["compositor CPU per flip, Python / C", median_range(cpu_py, "x")],
        ["compositor CPU per flip, copy / zero-copy (C)", median_range(cpu_copy, "x")],
        ["compositor commit delay p50, copy / zero-copy (C)", median_range(delay_copy, "x")],
    ]
    for m_c, m_py in zip(micro[0::2], micro[1::2], strict=True):
        lines.append([f"submit only ({m_c.driver}) p50, Python / C",
                      f"{m_py.submit_p50 / m_c.submit_p50:.2f}x"])
        lines.append([f"submit only ({m_c.driver}) CPU, Python / C", f"{m_py.cpu_mean / m_c.cpu_mean:.2f}x"])
    print(lb.table(["ratio", "value"], lines))
    print()
    print(f"Goals (issue 8), judged on the compositor rows — {where.split(',')[0]}:")
    goals = [
        [f"C path commit delay median <= {GOAL_C_P50_US:.0f} us", f"{c_p50:.1f} us",
         verdict(c_p50 <= GOAL_C_P50_US)],
        [f"C path >= {GOAL_PY_OVER_C:.0f}x below pure Python (commit delay p50)",
         f"{statistics.median(delay):.2f}x", verdict(statistics.median(delay) >= GOAL_PY_OVER_C)],
        [f"zero-copy >= {GOAL_COPY_OVER_ZERO:.0f}x less CPU per flip than copy",
         f"{statistics.median(cpu_copy):.2f}x", verdict(statistics.median(cpu_copy) >= GOAL_COPY_OVER_ZERO)],
        ["(for comparison) submit-only C p50 on virtio_gpu <= 50 us", f"{virt_c.submit_p50:.1f} us",
         verdict(virt_c.submit_p50 <= GOAL_C_P50_US)],
        ["(for comparison) submit-only Python / C p50 on virtio_gpu >= 5x",
         f"{virt_py.submit_p50 / virt_c.submit_p50:.2f}x",
         verdict(virt_py.submit_p50 / virt_c.submit_p50 >= GOAL_PY_OVER_C)],
    ]
    print(lb.table(["goal", "measured", "verdict"], goals, left=1))
    stalls = {label: sum(r[label].stalls for r in rounds) for label, _, _, _ in paths}
    if any(stalls.values()):
        print("note: ticks on which the guest had no free buffer (all three held by the compositor): "
              + ", ".join(f"{label} {n}" for label, n in stalls.items()))
    return 0


if __name__ == "__main__":
    lb.script(main, "bench_flip_path")
