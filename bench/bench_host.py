"""The frame path on the host, without a KMS device or the lab: the native data plane against the
floors of any frame path, in one run.

    python bench/bench_host.py [--seconds S]

What runs: the data plane of native/dataplane.c on its own thread in this process, with real guest
processes (each flips three buffers at a fixed rate over a real socket with version-2 records, and
reads the `presented` and `released` that come back), and a fake card: commits go to /dev/null's
ioctl (the request is built and submitted as for a real card) and the C side's fake kernel thread
writes each commit's flip event into a pipe 1 ms later, which drmHandleEvent reads as a real DRM
fd's. The compositor's CPU is every thread of this process but the fake kernel's (the kernel's work is
not ours), from /proc/self/task/*/schedstat, over the measurement window, divided by the frames
committed in it. Message -> commit is the data plane's own measure: the flip record read to the
commit ioctl returned.

The floors, measured in the same run with the same guest processes: a bare C server (bench/floor.c,
built here with gcc) and a bare Python epoll server that each do one wakeup, one recvmsg and one
send per flip message, nothing else.

Not measured here (printed as n/a): the daemon around the data plane (it needs cards to start, and
no fake of a whole card exists yet), so neither the pure-Python path nor the copy path run here;
`make bench` measures those in the lab.

Goals (issue 17): CPU per frame <= 2x the C floor; 4 outputs x 144 flips/s <= 2 % of one core.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

GOAL_RATIO_TO_FLOOR = 2.0
GOAL_CORE_SHARE = 2.0  # percent of one core, 4 outputs x 144 flips/s
FLIP = struct.Struct("<IIQ")
RECORD_FLIP = 0x80000001


def thread_cpu_ns(pid: int | str = "self", skip: tuple[str, ...] = ()) -> int:
    """CPU time of every thread of `pid` whose name is not in `skip`, in ns (schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().strip() in skip:
                continue
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


# --- the guest: a separate process -------------------------------------------------------------

def guest_main(fd: int, rate: float, seconds: float) -> None:
    """Flip buffers 1, 2, 3 in turn at `rate` per second for `seconds`; read what comes back."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    period = 1.0 / rate
    start = time.monotonic()
    frame = 0
    got = 0
    while True:
        due = start + frame * period
        now = time.monotonic()
        if now - start >= seconds:
            break
        if due > now:
            select.select([sock], [], [], due - now)
            try:
                got += len(sock.recv(65536))
            except BlockingIOError:
                pass
            continue
        try:
            sock.send(FLIP.pack(RECORD_FLIP, frame % 3 + 1, frame))
        except BlockingIOError:
            pass
        frame += 1
    sock.close()
    print(f"{frame} {got}")


def start_guest(sock: socket.socket, rate: float, seconds: float) -> subprocess.Popen:
    fd = sock.fileno()
    return subprocess.Popen([sys.executable, __file__, "--guest", str(fd), "--rate", str(rate),
                             "--seconds", str(seconds)], pass_fds=[fd], stdout=subprocess.PIPE, text=True)


# --- the floors ---------------------------------------------------------------------------------

def python_floor_main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    ep = select.epoll()
    ep.register(fd, select.EPOLLIN)
    reply = bytes(36)
    while True:
        ep.poll()
        try:
            data = sock.recvmsg(4096)[0]
        except BlockingIOError:
            continue
        if not data:
            return
        try:
            sock.send(reply, socket.MSG_DONTWAIT)
        except OSError:
            return


def build_floor(tmp: str) -> str:
    exe = os.path.join(tmp, "floor")
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", exe, str(HERE / "floor.c")],
                   check=True)
    return exe


def floor(cmd: list[str], rate: float, seconds: float) -> float:
    """CPU µs per message of a server process `cmd` + [fd], fed by one guest at `rate`."""
    ours, theirs = socket.socketpair()
    server = subprocess.Popen([*cmd, str(ours.fileno())], pass_fds=[ours.fileno()])
    ours.close()
    time.sleep(0.3)   # started and waiting
    before = thread_cpu_ns(server.pid)
    guest = start_guest(theirs, rate, seconds)
    theirs.close()
    out, _ = guest.communicate(timeout=seconds + 60)
    after = thread_cpu_ns(server.pid)
    server.wait(timeout=30)
    sent = int(out.split()[0])
    return (after - before) / 1000 / sent


# --- the data plane -----------------------------------------------------------------------------

def dataplane_run(outputs: int, rate: float, seconds: float) -> dict:
    from compositor.dataplane import DataPlane

    dp = DataPlane()
    dp.start()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    guests, socks, handles = [], [], []
    try:
        card = dp.add_card(r, fake_write_fd=w, fake_delay_ns=1_000_000)
        for i in range(outputs):
            out = dp.add_output(card, 100 + i, 200 + i, 300)
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
            conn = dp.add_conn(ours.fileno())
            bufs = []
            for buffer_id in (1, 2, 3):
                b = dp.add_buffer(conn, buffer_id, layout=1)
                dp.set_fb(b, out, 1000 * (i + 1) + buffer_id)
                bufs.append(b)
            dp.show(out, conn)
            dp.conn_show(conn)
            dp.flip(conn, bufs[2], 0, time.monotonic_ns())   # the first frame, as the daemon shows it
            socks.append((ours, theirs))
            handles.append(out)
        warm = 0.5
        for _ours, theirs in socks:
            guests.append(start_guest(theirs, rate, seconds + 2 * warm))
            theirs.close()
        time.sleep(warm)
        before_cpu = thread_cpu_ns(skip=("fakekms",))
        before = [dp.stats(o) for o in handles]
        t0 = time.monotonic()
        time.sleep(seconds)
        after_cpu = thread_cpu_ns(skip=("fakekms",))
        after = [dp.stats(o) for o in handles]
        elapsed = time.monotonic() - t0
        for g in guests:
            g.communicate(timeout=seconds + 60)
        commits = sum(a.commits - b.commits for a, b in zip(after, before, strict=True))
        errors = sum(a.errors for a in after)
        delays = sorted(d for a, b in zip(after, before, strict=True)
                        for d, _, _ in DataPlane.samples(a, since=b.presented))
        events = dp.events()
    finally:
        dp.close()
        os.close(r)
        os.close(w)
        for ours, _ in socks:
            ours.close()
    if not commits or errors:
        raise SystemExit(f"bench_host: {outputs}x{rate:g}: {commits} commits, {errors} errors; "
                         f"events {events[:5]}")
    cpu_us = (after_cpu - before_cpu) / 1000
    return {"outputs": outputs, "rate": rate, "commits": commits, "fps": commits / elapsed,
            "cpu_per_frame_us": cpu_us / commits, "core_share": 100 * cpu_us / 1e6 / elapsed,
            "p50_us": delays[len(delays) // 2] / 1000, "p99_us": delays[int(len(delays) * 0.99)] / 1000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0, help="measurement window per row (default 3)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the table gives medians (default 3)")
    ap.add_argument("--guest", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--python-floor", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, default=60.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.guest is not None:
        guest_main(args.guest, args.rate, args.seconds)
        return
    if args.python_floor is not None:
        python_floor_main(args.python_floor)
        return

    print(f"bench_host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"{args.rounds} rounds of {args.seconds:g} s per row")
    rows: dict[tuple[int, float], list[dict]] = {}
    floors: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_floor(tmp)
        for _ in range(args.rounds):
            for rate in (60, 144):
                floors.setdefault(("C", rate), []).append(floor([exe], rate, args.seconds))
                floors.setdefault(("Python", rate), []).append(
                    floor([sys.executable, __file__, "--python-floor"], rate, args.seconds))
            for outputs, rate in ((1, 60), (1, 144), (4, 60), (4, 144)):
                rows.setdefault((outputs, rate), []).append(dataplane_run(outputs, rate, args.seconds))
    floor_us = {key: statistics.median(v) for key, v in floors.items()}
    c_floor = floor_us[("C", 60)]
    py_floor = floor_us[("Python", 60)]
    print()
    print(f"{'path':<34} {'fps':>7} {'CPU µs/frame':>13} {'p50 µs':>8} {'p99 µs':>8} {'core %':>7}")
    med = {}
    for (outputs, rate), runs in rows.items():
        m = {k: statistics.median(r[k] for r in runs) for k in ("fps", "cpu_per_frame_us", "core_share",
                                                                  "p50_us", "p99_us")}
        med[(outputs, rate)] = m
        label = f"C data plane, {outputs} x {rate:g} flips/s"
        print(f"{label:<34} {m['fps']:>7.1f} {m['cpu_per_frame_us']:>13.1f} {m['p50_us']:>8.1f}"
              f" {m['p99_us']:>8.1f} {m['core_share']:>7.2f}")
    for (kind, rate), us in sorted(floor_us.items()):
        print(f"{f'floor: bare {kind} server, {rate}/s':<34} {'':>7} {us:>13.1f}")
    cpu = med[(1, 60)]["cpu_per_frame_us"]
    share = med[(4, 144)]["core_share"]
    print()
    print(f"goals (at 60 flips/s, the floor at the same rate): CPU per frame <= {GOAL_RATIO_TO_FLOOR:g}x "
          f"the C floor: {cpu / c_floor:.2f}x; "
          f"4 x 144 flips/s <= {GOAL_CORE_SHARE:g} % of a core: {share:.2f} %")
    print(f"dataplane: cpu_per_frame_us={cpu:.1f} c_floor_us={c_floor:.1f} "
          f"ratio_to_floor={cpu / c_floor:.2f} "
          f"python_over_c=n/a copy_over_zero_copy=n/a four_x_144_core_share={share:.2f} "
          f"python_floor_us={py_floor:.1f}")


if __name__ == "__main__":
    main()
