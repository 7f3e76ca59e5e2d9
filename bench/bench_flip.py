"""The per-flip hot path: native/kms_helpers.c against the same flip built in Python.

Needs a KMS device: run it in the lab with `make bench` (or `python -m directflip_tools.lab run -- python
bench/bench_flip.py`). For each display card it lights one output with two dumb framebuffers and
flips between them, one flip in flight at a time, first through `kms_flip` (C: ids resolved once, one
ioctl) and then through `AtomicRequest` (Python: property lookup, cffi arrays, the generic commit).
Printed per path: the time to submit a flip (the CPU the compositor spends per frame) and the time
from submit to the flip event (what the driver and display take), as p50 / p99, the mean CPU time of a
submit (the thread's own clock), and the ratio. `--size 1920x1080` lights that mode on every card
(bench_flip_path.py runs it so, in the same boot as the compositor's own flip path).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compositor.formats import XRGB8888  # noqa: E402
from compositor.kms import Card, DeviceError, KmsError, list_cards  # noqa: E402
from compositor.kms.atomic import AtomicRequest  # noqa: E402
from compositor.kms.card import lib  # noqa: E402
from compositor.kms.errors import kms_error  # noqa: E402
from compositor.kms.mode import default_mode  # noqa: E402
from compositor.stats import percentile as pct  # noqa: E402


def pick_mode(conn, size: tuple[int, int] | None):
    if size is None:
        return default_mode(conn.modes)
    fits = [m for m in conn.modes if (m.width, m.height) == size]
    if not fits:
        return None
    return max(fits, key=lambda m: m.refresh)


def light(card: Card, size: tuple[int, int] | None = None):
    conn = next(c for c in card.connectors if c.connected and not c.is_writeback)
    crtc = conn.possible_crtcs[0]
    plane = card.planes_for(crtc, "primary")[0]
    mode = pick_mode(conn, size)
    if mode is None:
        raise ValueError(f"{card.driver} {conn.name} offers no {size[0]}x{size[1]} mode")
    fbs = []
    for shade in (0x40, 0xC0):
        buf = card.create_dumb(mode.width, mode.height)
        buf.map()[:] = bytes([shade]) * buf.size
        fbs.append((buf, card.dumb_framebuffer(buf, XRGB8888)))
    req = AtomicRequest(card).add_output(conn, crtc, mode).add_plane(plane, crtc, fbs[0][1])
    req.commit(allow_modeset=True)
    return conn, crtc, plane, mode, fbs


def run_path(card: Card, crtc, plane, fbs, native: bool,
             flips: int) -> tuple[list[float], list[float], list[float]]:
    fb_prop = plane.prop("FB_ID").id
    submit, cycle, cpu = [], [], []
    for i in range(flips):
        fb = fbs[(i + 1) % 2][1]
        c0 = time.thread_time_ns()
        t0 = time.perf_counter_ns()
        if native:
            ret = lib.kms_flip(card.fd, plane.id, fb_prop, fb.id, i + 1)
            if ret < 0:
                raise kms_error("kms_flip", -ret)
        else:
            AtomicRequest(card).add(plane, "FB_ID", fb).commit(nonblock=True, event=True, user_data=i + 1)
        t1 = time.perf_counter_ns()
        c1 = time.thread_time_ns()
        card.wait_events([crtc.id], timeout=2.0)
        t2 = time.perf_counter_ns()
        submit.append((t1 - t0) / 1000)
        cycle.append((t2 - t0) / 1000)
        cpu.append((c1 - c0) / 1000)
    return submit, cycle, cpu


@dataclass
class Row:
    driver: str
    mode: str
    path: str
    submit_p50: float
    submit_p99: float
    event_p50: float
    event_p99: float
    submit_mean: float
    cpu_mean: float      # thread CPU time per submit, us
    flips: int


def measure(flips: int = 300, size: tuple[int, int] | None = None) -> list[Row]:
    """C and Python flips on every card with a connected output: rows in pairs (C, Python)."""
    rows = []
    for path in list_cards():
        try:
            card = Card(path)
        except (DeviceError, KmsError):
            continue
        with card:
            if not card.crtcs or not any(c.connected for c in card.connectors):
                continue
            card.become_master()
            _, crtc, plane, mode, fbs = light(card, size)
            results: dict[bool, tuple[list, list, list]] = {}
            for native in (True, False, True, False):   # interleaved, so drift hits both alike
                got = run_path(card, crtc, plane, fbs, native, flips // 2)
                acc = results.setdefault(native, ([], [], []))
                for mine, new in zip(acc, got, strict=True):
                    mine.extend(new)
            for native in (True, False):
                s, c, cpu = results[native]
                rows.append(Row(card.driver, mode.label(), "C kms_flip" if native else "Python AtomicRequest",
                                pct(s, 0.5), pct(s, 0.99), pct(c, 0.5), pct(c, 0.99), statistics.mean(s),
                                statistics.mean(cpu), len(s)))
            for buf, fb in fbs:   # removing the framebuffer on screen turns the output off
                fb.remove()
                buf.destroy()
    return rows


def print_rows(rows: list[Row], flips: int) -> None:
    print(f"flip hot path (submit only), {flips} flips per path and card, one in flight, times in "
          f"microseconds")
    print(f"{'driver':<11} {'mode':<16} {'path':<21} {'submit p50':>10} {'submit p99':>10} "
          f"{'CPU mean':>9} {'to event p50':>12} {'to event p99':>12}")
    for r in rows:
        print(f"{r.driver:<11} {r.mode:<16} {r.path:<21} {r.submit_p50:>10.1f} {r.submit_p99:>10.1f} "
              f"{r.cpu_mean:>9.1f} {r.event_p50:>12.1f} {r.event_p99:>12.1f}")
    print()
    for i in range(0, len(rows), 2):
        c, py = rows[i], rows[i + 1]
        print(f"{c.driver}: Python submit / C submit = {py.submit_mean / c.submit_mean:.2f}x "
              f"(mean {py.submit_mean:.1f} vs {c.submit_mean:.1f} us)")


def size_arg(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT") from None
    return w, h


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flips", type=int, default=300,
                        help="flips per path and card (default %(default)s)")
    parser.add_argument("--size", type=size_arg, metavar="WxH",
                        help="light this mode size (default: the connector's preferred mode)")
    args = parser.parse_args(argv)
    rows = measure(args.flips, args.size)
    if not rows:
        print("bench_flip: no KMS card with a connected output (run it in the lab: make bench)",
              file=sys.stderr)
        return 2
    print_rows(rows, args.flips)
    return 0


if __name__ == "__main__":
    sys.exit(main())
