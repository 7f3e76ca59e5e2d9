"""The copy rung's per-frame copy at 1920x1080 XRGB8888: kms_copy_rows (C) against the numpy strided
copy it replaced and the pure-Python copy of `directflip run --pure-python`.

    python bench/bench_copy.py [--runs N]

One copy is what CopyBuffers.copy does per committed frame: the guest's buffer (a mapped memfd here,
as a sealed memfd or a dma-buf is mapped) into a dumb-buffer-like anonymous mapping, row pitch to row
pitch, each call as the daemon makes it (the numpy row includes building the two strided views, the C
row `ffi.from_buffer` and the bounds checks). Two layouts: both pitches equal to the row (7680 bytes:
one contiguous block) and padded pitches (the guest's 8192, ours 7936: 1080 separate rows). The
three copies take turns, run after run, so load elsewhere on the machine falls on all of them alike;
the table gives the median and best µs per frame and the ratios of the medians. Each copy is checked
against the source once before timing. Host only, no KMS device; numpy is needed for its row only
(it is in the `test` extra), and the row says so when it is missing.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compositor.pixelcopy import copy_rows  # noqa: E402

WIDTH, HEIGHT, BPP = 1920, 1080, 4
ROW = WIDTH * BPP
LAYOUTS = [("pitch = row (7680)", ROW, ROW), ("padded (8192 -> 7936)", 8192, 7936)]

Copy = Callable[[], None]


def guest_buffer(stride: int) -> mmap.mmap:
    """A memfd of a 1920x1080 frame with `stride`, mapped read-only as the copy rung maps it."""
    fd = os.memfd_create("bench-copy", os.MFD_CLOEXEC)
    try:
        size = stride * HEIGHT
        os.ftruncate(fd, size)
        os.pwrite(fd, (bytes(range(251)) * (size // 251 + 1))[:size], 0)  # 251: rows differ from each other
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)


def numpy_copy(dst: mmap.mmap, pitch: int, src: mmap.mmap, stride: int) -> Copy | None:
    """The copy as the scanout made it before kms_copy_rows: two strided uint8 views, one assignment."""
    try:
        import numpy as np
    except ImportError:
        return None

    def rows(memory, pitch_: int):
        return np.ndarray((HEIGHT, ROW), np.uint8, buffer=memory, offset=0, strides=(pitch_, 1))

    def run() -> None:
        rows(dst, pitch)[:] = rows(src, stride)
    return run


def paths_for(dst: mmap.mmap, pitch: int, src: mmap.mmap, stride: int) -> dict[str, Copy]:
    """The copies to time, by label; numpy's is left out where numpy is not installed."""
    paths: dict[str, Copy] = {}
    np_run = numpy_copy(dst, pitch, src, stride)
    if np_run is not None:
        paths["numpy strided"] = np_run
    paths["C kms_copy_rows"] = lambda: copy_rows(dst, 0, pitch, src, 0, stride, HEIGHT, ROW)
    paths["Python per row"] = lambda: copy_rows(dst, 0, pitch, src, 0, stride, HEIGHT, ROW, native=False)
    return paths


def check(dst: mmap.mmap, pitch: int, src: mmap.mmap, stride: int, label: str) -> None:
    for y in (0, 1, HEIGHT // 2, HEIGHT - 1):
        if dst[y * pitch:y * pitch + ROW] != src[y * stride:y * stride + ROW]:
            raise SystemExit(f"bench_copy: {label} copied row {y} wrong; no numbers")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=300,
                        help="timed copies per path and layout (default 300)")
    args = parser.parse_args()

    load_before = load()
    results: dict[tuple[str, str], list[float]] = {}
    missing: list[str] = []
    for layout, stride, pitch in LAYOUTS:
        src = guest_buffer(stride)
        dst = mmap.mmap(-1, pitch * HEIGHT)
        paths = paths_for(dst, pitch, src, stride)
        if "numpy strided" not in paths:
            missing.append(layout)
        for label, run in paths.items():
            dst[:] = bytes(len(dst))
            run()
            check(dst, pitch, src, stride, label)
            run()   # warm: the destination's pages are faulted in, as a dumb buffer's mapping is
        for _ in range(args.runs):
            for label, run in paths.items():
                t0 = time.perf_counter_ns()
                run()
                results.setdefault((layout, label), []).append((time.perf_counter_ns() - t0) / 1e3)
        dst.close()
        src.close()

    print(f"copy path: 1920x1080 XRGB8888, {args.runs} copies per path and layout, Python "
          f"{sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load_before} before, "
          f"{load()} after")
    print()
    head = f"{'layout':<22} {'copy':<16} {'median us':>10} {'best us':>9} {'GB/s':>6}"
    print(head)
    print("-" * len(head))
    medians: dict[tuple[str, str], float] = {}
    for (layout, label), times in results.items():
        med = medians[(layout, label)] = statistics.median(times)
        print(f"{layout:<22} {label:<16} {med:>10.1f} {min(times):>9.1f} {ROW * HEIGHT / med / 1e3:>6.2f}")
    print()
    print(f"{'ratio (medians)':<50} {'value':>7}")
    print("-" * 58)
    for layout, _, _ in LAYOUTS:
        c = medians[(layout, "C kms_copy_rows")]
        if (layout, "numpy strided") in medians:
            print(f"{layout + ': C / numpy':<50} {c / medians[(layout, 'numpy strided')]:>6.2f}x")
        print(f"{layout + ': Python / C':<50} {medians[(layout, 'Python per row')] / c:>6.2f}x")
    for layout in missing:
        print(f"{layout}: no numpy row (numpy is not installed: pip install 'directflip[test]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
