"""The per-flip hot path: native/kms_helpers.c against the same flip built in Python.

Needs a KMS device: run it in the lab with `make bench` (or `python -m compositor.lab run -- python
bench/bench_flip.py`). For each display card it lights one output with two dumb framebuffers and
flips between them, one flip in flight at a time, first through `kms_flip` (C: ids resolved once, one
ioctl) and then through `AtomicRequest` (Python: property lookup, cffi arrays, the generic commit).
Printed per path: the time to submit a flip (the CPU the compositor spends per frame) and the time
from submit to the flip event (what the driver and display take), as p50 / p99, and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from compositor.kms import Card, DeviceError, KmsError, list_cards
from compositor.kms.card import lib
from compositor.kms.errors import kms_error
from compositor.kms.fourcc import XRGB8888
from compositor.kms.mode import default_mode


def light(card: Card):
    conn = next(c for c in card.connectors if c.connected and not c.is_writeback)
    crtc = conn.possible_crtcs[0]
    plane = card.planes_for(crtc, "primary")[0]
    mode = default_mode(conn.modes)
    fbs = []
    for shade in (0x40, 0xC0):
        buf = card.create_dumb(mode.width, mode.height)
        buf.map()[:] = bytes([shade]) * buf.size
        fbs.append((buf, card.dumb_framebuffer(buf, XRGB8888)))
    req = card.atomic().add_output(conn, crtc, mode).add_plane(plane, crtc, fbs[0][1])
    req.commit(allow_modeset=True)
    return conn, crtc, plane, mode, fbs


def run_path(card: Card, crtc, plane, fbs, native: bool, flips: int) -> tuple[list[float], list[float]]:
    fb_prop = plane.prop("FB_ID").id
    submit, cycle = [], []
    for i in range(flips):
        fb = fbs[(i + 1) % 2][1]
        t0 = time.perf_counter_ns()
        if native:
            ret = lib.kms_flip(card.fd, plane.id, fb_prop, fb.id, i + 1)
            if ret < 0:
                raise kms_error("kms_flip", -ret)
        else:
            card.atomic().add(plane, "FB_ID", fb).commit(nonblock=True, event=True, user_data=i + 1)
        t1 = time.perf_counter_ns()
        card.wait_events([crtc.id], timeout=2.0)
        t2 = time.perf_counter_ns()
        submit.append((t1 - t0) / 1000)
        cycle.append((t2 - t0) / 1000)
    return submit, cycle


def pct(data: list[float], q: float) -> float:
    data = sorted(data)
    return data[min(len(data) - 1, int(q * len(data)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flips", type=int, default=300,
                        help="flips per path and card (default %(default)s)")
    args = parser.parse_args(argv)
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
            _, crtc, plane, mode, fbs = light(card)
            results = {}
            for native in (True, False, True, False):   # interleaved, so drift hits both alike
                s, c = run_path(card, crtc, plane, fbs, native, args.flips // 2)
                acc = results.setdefault(native, ([], []))
                acc[0].extend(s)
                acc[1].extend(c)
            for native in (True, False):
                s, c = results[native]
                rows.append((card.driver, mode.label(), "C kms_flip" if native else "Python AtomicRequest",
                             pct(s, 0.5), pct(s, 0.99), pct(c, 0.5), pct(c, 0.99), statistics.mean(s)))
            for buf, fb in fbs:   # removing the framebuffer on screen turns the output off
                fb.remove()
                buf.destroy()
    if not rows:
        print("bench_flip: no KMS card with a connected output (run it in the lab: make bench)",
              file=sys.stderr)
        return 2
    print(f"flip hot path, {args.flips} flips per path and card, one in flight, times in microseconds")
    print(f"{'driver':<11} {'mode':<16} {'path':<21} {'submit p50':>10} {'submit p99':>10} "
          f"{'to event p50':>12} {'to event p99':>12}")
    for r in rows:
        print(f"{r[0]:<11} {r[1]:<16} {r[2]:<21} {r[3]:>10.1f} {r[4]:>10.1f} {r[5]:>12.1f} {r[6]:>12.1f}")
    print()
    for i in range(0, len(rows), 2):
        c, py = rows[i], rows[i + 1]
        print(f"{c[0]}: Python submit / C submit = {py[7] / c[7]:.2f}x (mean {py[7]:.1f} vs {c[7]:.1f} us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
