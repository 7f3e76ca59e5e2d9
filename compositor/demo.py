"""`directflip demo` / `make demo`: the compositor with three synthetic guests under the demo policy.

On a machine with a KMS device it runs `directflip run --policy policies/demo.yaml` there, starts three
synthetic guests (office and media allocate on the display card: zero copy; build-1 allocates on vgem
when it is loaded, which a card that refuses foreign buffers shows through the copy path), lets them
flip for a while, and prints the compositor's status. Without a KMS device it boots the real-kernel
lab and does the same inside it, then has QEMU take a screendump of every monitor from outside.

Screenshots (lab: QEMU screendumps; elsewhere: writeback captures where the card has a writeback
connector), the status table and a pixel verdict per monitor land in out/.
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

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out"
POLICY = ROOT / "policies" / "demo.yaml"
# name, size, where it allocates its buffers (vgem when loaded, to show the copy path)
GUESTS = [("office", "1024x768", "display"), ("media", "800x600", "display"), ("build-1", "640x480", "vgem")]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "compositor.cli", *args]


def _rect_origin(rect: str) -> tuple[int, int]:
    """'640x480+320+272' → (320, 272)."""
    _, x, y = rect.split("+")
    return int(x), int(y)


def verdict(rgb, out: dict) -> str:
    """Whether a screenshot shows the guest the status says: its colour, and a readable frame counter
    where the buffer's top-left is on screen."""
    import numpy as np

    from compositor.sources.synthetic import decode_counter, guest_colour

    guest = out.get("guest")
    if not guest:
        return f"slate ({out.get('reason')})"
    colour = np.array(guest_colour(guest))
    share = float(np.mean(np.all(np.abs(rgb[..., :3].astype(int) - colour) <= 4, axis=-1)))
    src = _rect_origin(out["src"])
    counter = decode_counter(rgb, _rect_origin(out["dst"])) if src == (0, 0) else None
    ok = share > 0.2 and (counter is not None or src != (0, 0))
    what = f"{share:.0%} in {guest}'s colour" + (f", frame counter {counter}" if counter is not None else "")
    return ("shows " if ok else "MISMATCH: ") + what


def run_demo(out_dir: Path, seconds: float, screenshot) -> int:
    from compositor.control import format_status, request
    from compositor.kms import Card, list_cards

    for old in out_dir.glob("*.png"):   # screenshots of an earlier run would mislead
        old.unlink()
    work = Path(tempfile.mkdtemp(prefix="directflip-demo-"))
    control, frames = str(work / "control.sock"), str(work / "frames.sock")
    log = (out_dir / "compositor.log").open("w")
    daemon = subprocess.Popen(_cli("-v", "run", "--policy", str(POLICY), "--socket", frames,
                                   "--control", control), stdout=log, stderr=subprocess.STDOUT)
    guests: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            if daemon.poll() is not None:
                print((out_dir / "compositor.log").read_text(), file=sys.stderr)
                return 1
            try:
                request(control, {"cmd": "status"})
                break
            except (ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise TimeoutError("the compositor did not start within 60 s") from None
                time.sleep(0.2)
        drivers = set()
        for path in list_cards():
            with Card(path, kms=False) as card:
                drivers.add(card.driver)
        for name, size, where in GUESTS:
            where = where if where != "vgem" or "vgem" in drivers else "display"
            guests.append(subprocess.Popen(_cli("guest", "--name", name, "--socket", frames, "--on", where,
                                                "--size", size, "--rate", "60",
                                                "--duration", str(seconds + 30)),
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        deadline = time.monotonic() + 90
        while True:
            status = request(control, {"cmd": "status"})
            shown = [o for o in status["outputs"] if o.get("guest") and o.get("on_screen")]
            if len(shown) == len(GUESTS) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        time.sleep(seconds)
        status = request(control, {"cmd": "status"})
        status.pop("ok", None)
        table = format_status(status)
        print(table)
        lines = ["directflip demo", "", table, ""]
        failures = 0
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
        shown = {o.get("guest") for o in status["outputs"]}
        failures += sum(1 for name, _, _ in GUESTS if name not in shown)
        for line in lines[4:]:
            print(line)
        (out_dir / "status.json").write_text(json.dumps(status, indent=2) + "\n")
        (out_dir / "summary.txt").write_text("\n".join(lines) + "\n")
        print(f"screenshots, status and summary in {out_dir}")
        return 1 if failures else 0
    finally:
        for proc in guests:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in guests:
            try:
                text = proc.communicate(timeout=30)[0].strip()
                if text:
                    print(text.splitlines()[-1])
            except subprocess.TimeoutExpired:
                proc.kill()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def in_lab(out: Path, seconds: float) -> int:
    import numpy as np
    from PIL import Image

    from compositor.lab.channel import HostChannel
    from compositor.probe import format_table, probe_all

    doc = probe_all()
    print(format_table(doc))
    virtio = {c["path"] for c in doc["cards"] if c["driver"] == "virtio_gpu"}
    host = HostChannel.from_env()

    def screenshot(o: dict, control: str):
        if o["card"] not in virtio:
            return None, "not a QEMU head"
        head = int(o["connector"].split("-")[1]) - 1
        dump = host.screendump(head, "png")
        target = out / f"{o['monitor']}-{o['connector']}.png"
        shutil.copyfile(dump["path"], target)
        return np.asarray(Image.open(target).convert("RGB")), target.name

    return run_demo(out, seconds, screenshot)


def on_hardware(out: Path, seconds: float) -> int:
    import numpy as np
    from PIL import Image

    from compositor.control import request

    def screenshot(o: dict, control: str):
        # A writeback capture where the card has one; real monitors cannot be read back otherwise.
        target = out / f"{o['monitor']}-{o['connector']}.png"
        try:
            request(control, {"cmd": "capture", "monitor": o["monitor"], "path": str(target)})
        except RuntimeError as exc:
            return None, f"no screenshot: {exc}"
        return np.asarray(Image.open(target).convert("RGB")), target.name

    return run_demo(out, seconds, screenshot)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compositor.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return _demo(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=OUT, help="where screenshots go (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="how long the guests flip before the screenshots (default: %(default)s)")
    parser.add_argument("--in-lab", action="store_true", help=argparse.SUPPRESS)


def _demo(args: argparse.Namespace) -> int:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.in_lab:
        return in_lab(out, args.seconds)
    from compositor.kms import list_cards
    if list_cards():
        return on_hardware(out, args.seconds)
    print("demo: no KMS device here; booting the real-kernel lab", file=sys.stderr)
    from compositor.lab import cache, vm
    manifest = cache.ensure()
    options = vm.VmOptions(rwdirs=(out,))
    return vm.run([sys.executable, "-m", "compositor.demo", "--in-lab", "--out", str(out),
                   "--seconds", str(args.seconds)], options, manifest)


def register(sub) -> None:
    p = sub.add_parser("demo", help="three synthetic guests on this machine's monitors (or in the lab VM)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_demo)


if __name__ == "__main__":
    sys.exit(main())
