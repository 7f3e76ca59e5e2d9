"""`directflip demo` / `make demo`: the compositor with synthetic guests on every monitor plugged in.

It writes a policy for the monitors connected now (as `directflip init` does: one monitor per
connected connector, bound by port) with a guest placed on each of the first three, runs `directflip
run` on it, and starts those guests: office and media allocate on the display card (zero copy);
build-1 allocates on vgem when it is loaded, which a card that refuses foreign buffers shows through
the copy path. The guests flip until the demo stops them. The demo waits until every guest is on
screen (a generous deadline, reported when it runs out), lets them flip a few seconds more, takes a
screenshot of each monitor and judges it: the guest's colour over its picture and its frame counter.
Without a KMS device it boots the real-kernel lab and does the same inside it, the screenshots then
taken by QEMU from outside.

Screenshots (lab: QEMU screendumps; elsewhere: `directflip capture`), the policy, the status table and
a verdict per monitor land in ./out (--out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path("out")   # under the current directory, never inside the installed package
# name, size, where it allocates its buffers (vgem when loaded, to show the copy path)
GUESTS = [("office", "1024x768", "display"), ("media", "800x600", "display"), ("build-1", "640x480", "vgem")]
SHOWN_WITHIN = 300.0   # seconds for every guest to be on screen: generous, an emulated CPU is slow


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "compositor.cli", *args]


def _rect(rect: str) -> tuple[int, int, int, int]:
    """'640x480+320+272' → (320, 272, 640, 480)."""
    size, x, y = rect.split("+")
    w, h = size.split("x")
    return int(x), int(y), int(w), int(h)


def verdict(rgb, out: dict) -> str:
    """Whether a screenshot shows the guest the status says: its colour over the picture's rectangle
    on screen, and a readable frame counter where the buffer's top-left is on screen 1:1."""
    import numpy as np

    from directflip_tools.synthetic import decode_counter, guest_colour

    guest = out.get("guest")
    if not guest:
        return f"slate ({out.get('reason')})"
    colour = np.array(guest_colour(guest))
    x, y, w, h = _rect(out["dst"])
    picture = rgb[y:y + h, x:x + w, :3]
    share = float(np.mean(np.all(np.abs(picture.astype(int) - colour) <= 4, axis=-1))) if picture.size \
        else 0.0
    sx, sy, sw, sh = _rect(out["src"])
    readable = (sx, sy) == (0, 0) and (sw, sh) == (w, h)   # the counter is drawn at the buffer's origin
    counter = decode_counter(rgb, (x, y)) if readable else None
    ok = share > 0.5 and (counter is not None or not readable)
    what = f"{share:.0%} of its {w}x{h} picture in {guest}'s colour"
    if counter is not None:
        what += f", frame counter {counter}"
    return ("shows " if ok else "MISMATCH: ") + what


def demo_policy(out_dir: Path) -> tuple[Path, list[tuple[str, str, str]]]:
    """A policy for the monitors connected now, with a demo guest on each of the first three; written
    to out_dir/policy.yaml. Returns its path and the guests to start."""
    from compositor import init, probe, topology

    topo = topology.from_probe(probe.probe_all(), "live probe")
    monitors = [o for o in topo.outputs() if o.card.error is None]
    guests = GUESTS[:max(1, min(len(GUESTS), len(monitors)))]
    text = init.generate(topo, f"this machine ({len(monitors)} connected)", [g[0] for g in guests])
    path = out_dir / "policy.yaml"
    path.write_text(text)
    return path, guests


def _wait_for_compositor(daemon: subprocess.Popen, control: str, log_path: Path) -> bool:
    """Until the control socket answers: False when the compositor exited first (its log printed)."""
    from compositor.control import request

    deadline = time.monotonic() + 60
    while True:
        if daemon.poll() is not None:
            print(log_path.read_text(), file=sys.stderr)
            return False
        try:
            request(control, {"cmd": "status"})
            return True
        except (ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise TimeoutError("the compositor did not start within 60 s") from None
            time.sleep(0.2)


def _start_guests(demo_guests: list[tuple[str, str, str]], frames: str,
                  guests: list[subprocess.Popen]) -> None:
    """One `directflip guest` per demo guest, into `guests` as each starts (so that all started are
    stopped, whatever fails); vgem's falls back to the display card where vgem is not loaded."""
    from compositor.kms import Card, list_cards

    drivers = set()
    for path in list_cards():
        with Card(path, kms=False) as card:
            drivers.add(card.driver)
    for name, size, where in demo_guests:
        where = where if where != "vgem" or "vgem" in drivers else "display"
        guests.append(subprocess.Popen(_cli("guest", "--name", name, "--socket", frames, "--on", where,
                                            "--size", size, "--rate", "60"),
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))


def _wait_until_shown(control: str, names: set[str], guests: list[subprocess.Popen], t0: float) -> None:
    """Until every guest is on screen, one of them exits, or SHOWN_WITHIN runs out (said, not fatal:
    the screenshots show what there is)."""
    from compositor.control import request

    while True:
        status = request(control, {"cmd": "status"})
        shown = {o["guest"] for o in status["outputs"] if o.get("guest") and o.get("on_screen")
                 and o.get("presented")}
        if names <= shown:
            print(f"demo: every guest on screen {time.monotonic() - t0:.1f} s after they were started")
            return
        ended = [p for p in guests if p.poll() is not None]
        if ended or time.monotonic() - t0 > SHOWN_WITHIN:
            why = (f"guest {ended[0].args[ended[0].args.index('--name') + 1]} exited "
                   f"{ended[0].returncode}" if ended else f"the deadline of {SHOWN_WITHIN:.0f} s ran out")
            print(f"demo: {why} with {', '.join(sorted(names - shown))} not on screen; taking the "
                  "screenshots anyway", file=sys.stderr)
            return
        time.sleep(0.3)


def _judge(status: dict, names: set[str], control: str, screenshot) -> tuple[list[str], int]:
    """A line per monitor (its screenshot's verdict) and per guest on no monitor, and the failures."""
    lines, failures = [], 0
    for o in status["outputs"]:
        if o.get("path") == "failed":
            failures += 1
            lines.append(f"{o['connector']}: FAILED: {o['reason']}")
            continue
        rgb, where = screenshot(o, control)
        if rgb is None:
            lines.append(f"{o['monitor']} ({o['connector']}): {where}")
            continue
        text = verdict(rgb, o)
        failures += text.startswith("MISMATCH")
        lines.append(f"{o['monitor']} ({o['connector']}, {o['mode']}): {where}: {text}")
    missing = sorted(names - {o.get("guest") for o in status["outputs"]})
    if missing:
        failures += len(missing)
        lines.append(f"not on any monitor: {', '.join(missing)}")
    return lines, failures


def _report(out_dir: Path, control: str, names: set[str], screenshot) -> int:
    """The status table and a verdict per monitor, printed and written to out_dir: the exit status."""
    from compositor.control import format_status, request

    status = request(control, {"cmd": "status"})
    status.pop("ok", None)
    table = format_status(status)
    print(table)
    verdicts, failures = _judge(status, names, control, screenshot)
    for line in verdicts:
        print(line)
    (out_dir / "status.json").write_text(json.dumps(status, indent=2) + "\n")
    (out_dir / "summary.txt").write_text("\n".join(["directflip demo", "", table, "", *verdicts]) + "\n")
    print(f"screenshots, status and summary in {out_dir}")
    return 1 if failures else 0


def _stop(guests: list[subprocess.Popen], daemon: subprocess.Popen) -> None:
    """SIGTERM to the guests (each prints its summary line, the last line shown here), then to the
    compositor; whatever does not end in time is killed."""
    for proc in guests:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in guests:
        try:
            text = proc.communicate(timeout=60)[0].strip()
            if text:
                print(text.splitlines()[-1])
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(timeout=30)
    except subprocess.TimeoutExpired:
        daemon.kill()


def run_demo(out_dir: Path, seconds: float, screenshot) -> int:
    for old in out_dir.glob("*.png"):   # screenshots of an earlier run would mislead
        old.unlink()
    try:
        policy, demo_guests = demo_policy(out_dir)
    except ValueError as exc:
        print(f"demo: {exc}: plug a monitor in", file=sys.stderr)
        return 1
    print(f"demo: policy for the monitors connected now: {policy}")
    work = Path(tempfile.mkdtemp(prefix="directflip-demo-"))
    control, frames = str(work / "control.sock"), str(work / "frames.sock")
    log_path = out_dir / "compositor.log"
    log = log_path.open("w")
    daemon = subprocess.Popen(_cli("-v", "run", "--policy", str(policy), "--socket", frames,
                                   "--control", control), stdout=log, stderr=subprocess.STDOUT)
    guests: list[subprocess.Popen] = []
    try:
        if not _wait_for_compositor(daemon, control, log_path):
            return 1
        # The guests flip until the demo stops them: how long each takes to start and connect depends
        # on the machine, and none may be gone before the last one is on screen.
        t0 = time.monotonic()
        _start_guests(demo_guests, frames, guests)
        names = {name for name, _, _ in demo_guests}
        _wait_until_shown(control, names, guests, t0)
        time.sleep(seconds)
        return _report(out_dir, control, names, screenshot)
    finally:
        _stop(guests, daemon)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def in_lab(out: Path, seconds: float) -> int:
    import numpy as np
    from PIL import Image

    from compositor.probe import format_table, probe_all
    from directflip_tools.lab.channel import HostChannel

    doc = probe_all()
    print(format_table(doc))
    virtio = {c["path"] for c in doc["cards"] if c["driver"] == "virtio_gpu"}
    host = HostChannel.from_env()

    def screenshot(o: dict, control: str):
        if o["card"] not in virtio:
            return capture(out, o, control)   # vkms: its writeback connector
        head = int(o["connector"].split("-")[1]) - 1
        dump = host.screendump(head, "png")
        target = out / f"{o['monitor']}-{o['connector']}.png"
        shutil.copyfile(dump["path"], target)
        return np.asarray(Image.open(target).convert("RGB")), target.name

    return run_demo(out, seconds, screenshot)


def capture(out: Path, o: dict, control: str):
    """`directflip capture` of one monitor: what its card's writeback connector reads back where it has
    one, else the buffer on the monitor's plane (what was committed)."""
    import numpy as np
    from PIL import Image

    from compositor.control import request

    target = out / f"{o['monitor']}-{o['connector']}.png"
    try:
        request(control, {"cmd": "capture", "monitor": o["monitor"], "path": str(target)}, timeout=120)
    except RuntimeError as exc:
        return None, f"no screenshot: {exc}"
    return np.asarray(Image.open(target).convert("RGB")), target.name


def on_hardware(out: Path, seconds: float) -> int:
    return run_demo(out, seconds, lambda o, control: capture(out, o, control))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m directflip_tools.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=OUT, help="where screenshots go (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="how long the guests flip before the screenshots (default: %(default)s)")
    parser.add_argument("--in-lab", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """`directflip demo` / `python -m directflip_tools.demo` with its parsed arguments: the exit status."""
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.in_lab:
        return in_lab(out, args.seconds)
    from compositor.kms import list_cards
    if list_cards():
        return on_hardware(out, args.seconds)
    print("demo: no KMS device here; booting the real-kernel lab", file=sys.stderr)
    from directflip_tools.lab import cache, vm
    manifest = cache.ensure()
    options = vm.VmOptions(rwdirs=(out,))
    return vm.run([sys.executable, "-m", "directflip_tools.demo", "--in-lab", "--out", str(out),
                   "--seconds", str(args.seconds)], options, manifest)


if __name__ == "__main__":
    sys.exit(main())
