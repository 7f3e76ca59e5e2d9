"""`make demo` / `python -m compositor.demo`: show what directflip sees and can light.

On a machine with a KMS device it probes the cards. Without one it boots the real-kernel lab and,
inside it, probes the cards, lights the three virtio-gpu monitors with three different test
patterns in ONE atomic commit, and has the host take a screendump of every monitor. Screenshots and
a summary land in out/. (The flip engine with synthetic guests replaces the patterns when it lands.)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "out"
HEAD_MODES = ["1024x768", "800x600", "640x480"]


def in_lab(out: Path) -> int:
    import numpy as np

    from compositor.kms import Card
    from compositor.lab.channel import HostChannel
    from compositor.patterns import light_patterns, mismatch
    from compositor.probe import format_table, probe_all

    doc = probe_all()
    table = format_table(doc)
    print(table)
    host = HostChannel.from_env()
    card_path = next(c["path"] for c in doc["cards"] if c["driver"] == "virtio_gpu")
    lines = ["directflip demo (lab)", "", table]
    with Card(card_path) as card:
        card.become_master()
        specs = [(conn.name, HEAD_MODES[i], i) for i, conn in enumerate(card.connectors)]
        heads, rgbs, _ = light_patterns(card, specs)
        expected = [(h.connector.name, h.mode, rgb) for h, rgb in zip(heads, rgbs, strict=True)]
        failures = 0
        for head, (name, mode, rgb) in enumerate(expected):
            dump = host.screendump(head, "png")
            target = out / f"head{head}-{name}.png"
            shutil.copyfile(dump["path"], target)
            from PIL import Image
            got = np.asarray(Image.open(target).convert("RGB"))
            problem = mismatch(got, rgb)
            failures += problem is not None
            verdict = "pixels match the committed pattern" if problem is None else f"MISMATCH: {problem}"
            line = f"head {head} {name} {mode.label()}: {target.name}: {verdict}"
            print(line)
            lines.append(line)
        card.drop_master()
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print(f"screenshots and summary in {out}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compositor.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT, help="where screenshots go (default: %(default)s)")
    parser.add_argument("--in-lab", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if args.in_lab:
        return in_lab(out)
    from compositor.kms import list_cards
    if list_cards():
        from compositor.probe import format_table, probe_all
        print(format_table(probe_all()))
        return 0
    print("demo: no KMS device here; booting the real-kernel lab", file=sys.stderr)
    from compositor.lab import cache, vm
    out.mkdir(parents=True, exist_ok=True)
    manifest = cache.ensure()
    options = vm.VmOptions(rwdirs=(out,))
    return vm.run([sys.executable, "-m", "compositor.demo", "--in-lab", "--out", str(out)], options, manifest)


if __name__ == "__main__":
    sys.exit(main())
