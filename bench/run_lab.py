"""Every lab benchmark in one boot of the lab, one interpreter, one after the other.

    python -m directflip_tools.lab run --timeout 1800 -- python bench/run_lab.py [--seconds S]

`make bench` runs this (after bench_planner.py on the host). In order: bench_flip_path.py (the
compositor's flip path at 1920x1080, C vs Python vs copy, and bench_flip.py's submit-only
microbenchmark), bench_sustained.py (four outputs at 60 and 144 flips/s), bench_reaction.py (policy
edit and hotplug to picture), bench_input.py (an evdev event to the guest's message; a 1000 Hz
mouse's cost) and bench_restart.py (SIGKILL and restart with VMs running: each back on screen). A
bench that fails says why and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_flip_path  # noqa: E402
import bench_input  # noqa: E402
import bench_reaction  # noqa: E402
import bench_restart  # noqa: E402
import bench_sustained  # noqa: E402
import labbench as lb  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=None,
                        help="measured window of the flip-path and sustained benches (default: theirs)")
    parser.add_argument("--swaps", type=int, default=None, help="policy swaps of bench_reaction")
    parser.add_argument("--plugs", type=int, default=None, help="plug cycles of bench_reaction")
    args = parser.parse_args(argv)
    window = [] if args.seconds is None else ["--seconds", str(args.seconds)]
    reaction = ([] if args.swaps is None else ["--swaps", str(args.swaps)]) + \
               ([] if args.plugs is None else ["--plugs", str(args.plugs)])

    where, evidence = lb.platform()
    print(f"lab benches: {where}; {evidence}; kernel {platform.release()}; Python "
          f"{platform.python_version()}; pid {os.getpid()}", flush=True)
    failed = []
    for name, module, bench_args in (("bench_flip_path", bench_flip_path, window),
                                     ("bench_sustained", bench_sustained, window),
                                     ("bench_reaction", bench_reaction, reaction),
                                     ("bench_input", bench_input, []),
                                     ("bench_restart", bench_restart, [])):
        print(f"\n===== {name} {' '.join(bench_args)}".rstrip(), flush=True)
        t0 = time.monotonic()
        try:
            code = module.main(bench_args)
        except lb.BenchError as exc:
            print(f"{name}: error: {exc}", flush=True)
            code = 1
        except Exception:  # noqa: BLE001 — one bench's bug must not hide the others' numbers
            traceback.print_exc(file=sys.stdout)
            code = 1
        print(f"===== {name}: {'done' if code == 0 else f'FAILED ({code})'} in {time.monotonic() - t0:.0f} s",
              flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"\nlab benches failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
