"""Start-up cost of the `directflip` command: how long `--help`, `check --help` and `status --help` take
from exec to exit, next to a bare `python -c pass`.

    python bench/bench_startup.py [--runs N]

The goal is at most 2x `python -c pass` for each: `status` and `check` are what people (and scripts
that poll the compositor) run by hand, so they should cost about an interpreter start, not the
daemon's imports. Each command runs N times as a fresh process, the commands taking turns so that a
burst of load elsewhere on the machine falls on all of them alike; the table gives the median and the
best. The command line is the one pip's `directflip` script runs (`from compositor.cli import main`),
started with this interpreter from the checkout, so the numbers are those of this tree whatever is
installed. Bytecode goes to a scratch PYTHONPYCACHEPREFIX that the warm-up runs fill: an installed
directflip has its .pyc files compiled at install, so compiling sources on every run (what
PYTHONDONTWRITEBYTECODE with stale .pyc files would do) is not part of its start-up. No KMS device is
needed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = 2.0
# What pip's console script for `directflip` does, so the import cost is the installed command's.
SCRIPT = "import re, sys; from compositor.cli import main; sys.exit(main())"
COMMANDS = [
    ("python -c pass", [sys.executable, "-c", "pass"]),
    ("directflip --help", [sys.executable, "-c", SCRIPT, "--help"]),
    ("directflip check --help", [sys.executable, "-c", SCRIPT, "check", "--help"]),
    ("directflip status --help", [sys.executable, "-c", SCRIPT, "status", "--help"]),
]


def once(argv: list[str], env: dict[str, str]) -> float:
    """Wall time of one run in ms. Output goes to /dev/null: a terminal's speed is not the command's."""
    t0 = time.perf_counter_ns()
    proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = (time.perf_counter_ns() - t0) / 1e6
    if proc.returncode != 0:  # a failing command would time its error path, not its start-up
        raise SystemExit(f"{argv[3:] or argv}: exit {proc.returncode}: {proc.stderr.decode().strip()}")
    return elapsed


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="runs per command (default 15)")
    args = parser.parse_args()

    load_before = load()
    times: dict[str, list[float]] = {label: [] for label, _ in COMMANDS}
    with tempfile.TemporaryDirectory(prefix="directflip-bench-pyc-") as pycache:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = pycache
        for _ in range(2):  # fill the page cache and the scratch .pyc tree; not counted
            for _label, argv in COMMANDS:
                once(argv, env)
        for _ in range(args.runs):
            for label, argv in COMMANDS:
                times[label].append(once(argv, env))

    base = statistics.median(times[COMMANDS[0][0]])
    print(f"start-up: {args.runs} runs per command, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load average {load_before} before, {load()} after")
    print()
    head = f"{'command':<26} {'median ms':>10} {'best ms':>8} {'x python -c pass':>17} {'goal':>6} {'':>4}"
    print(head)
    print("-" * len(head))
    for label, _ in COMMANDS:
        med = statistics.median(times[label])
        ratio = med / base
        if label == COMMANDS[0][0]:
            goal = verdict = ""
        else:
            goal, verdict = f"<= {GOAL:g}x", "ok" if ratio <= GOAL else "OVER"
        print(f"{label:<26} {med:>10.1f} {min(times[label]):>8.1f} {ratio:>16.2f}x {goal:>6} {verdict:>4}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
