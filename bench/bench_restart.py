"""Back after a restart: `directflip run` is SIGKILLed while its VMs run, and started again.

    python -m directflip_tools.lab run -- python bench/bench_restart.py [--restarts N]

Runs in the lab with two guests whose VMs outlive the compositor:

- `vm`: a real nested QEMU (TCG, std VGA, no disk: SeaBIOS's screen) started with
  `-display dbus,p2p=yes`, a `kind: qemu-dbus` guest on head 0;
- `office`: an mbochs vGPU whose VMM (the lab's vGPU guest, drawing one frame) the compositor
  `launch`es; after a restart the new compositor takes the VMM's device fd back (pidfd_getfd).

N times: SIGKILL the compositor, start it again on the same policy and sockets, and time from the
moment its control socket answers (serving) until each guest has a frame on screen again (status
polled every 20 ms). The promise, printed beside the medians and maxima as ratios: every guest still
running is back on its monitor within 2 s of the new process serving. libvirt domains take the same
path once libvirt has handed out the display (tests/lab/guest/test_libvirt.py prints their times).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import labbench as lb  # noqa: E402

from directflip_tools.lab.vgpu_guest import VgpuGuestControl, create_mdev, remove_mdev  # noqa: E402

BACK_GOAL_MS = 2000.0
POLL = 0.02


def policy(qmp: Path, vgpu: str, control: Path) -> str:
    return f"""version: 1
monitors:
  left:  {{connector: Virtual-1, driver: virtio_gpu}}
  wb:    {{connector: "Virtual-*", driver: vkms, mode: match-guest}}
guests:
  vm: {{kind: qemu-dbus, display: "qmp:{qmp}", resize: false}}
  office:
    kind: vfio
    uuid: {vgpu}
    launch: "{sys.executable} -m directflip_tools.lab.vgpu_guest --fd {{fd}} --kind bochs --control {control}"
placements:
  - {{guest: vm, monitor: left}}
  - {{guest: office, monitor: wb}}
"""


def on_screen(comp: lb.Compositor, wanted: dict[str, str]) -> set[str]:
    try:
        outs = comp.outputs()
    except (ConnectionError, OSError):
        return set()
    return {g for m, g in wanted.items() if outs.get(m, {}).get("guest") == g and outs[m].get("on_screen")}


def restart_once(comp: lb.Compositor, wanted: dict[str, str]) -> tuple[dict[str, float], float]:
    """ms from serving to each guest on screen (0: on screen at the first poll), and ms from the new
    process's start to serving."""
    comp.kill()
    spawned = time.monotonic()
    comp.restart()
    serving = time.monotonic()
    back: dict[str, float] = {}
    deadline = serving + 60
    while len(back) < len(wanted):
        now = time.monotonic()
        for guest in on_screen(comp, wanted) - back.keys():
            back[guest] = (now - serving) * 1e3
        if now > deadline:
            raise lb.BenchError(f"not back within 60 s: {sorted(set(wanted.values()) - back.keys())}\n"
                                f"{comp.tail()}")
        time.sleep(POLL)
    return back, (serving - spawned) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = lb.arguments(__doc__)
    parser.add_argument("--restarts", type=int, default=5, help="SIGKILL and restart cycles (5)")
    args = parser.parse_args(argv)
    where, evidence = lb.platform()
    cards = lb.cards()
    work = Path(tempfile.mkdtemp(prefix="directflip-restart-"))
    qmp, control = work / "vm.qmp", work / "office.sock"
    vm = subprocess.Popen([shutil.which("qemu-system-x86_64") or "qemu-system-x86_64", "-nodefaults",
                           "-machine", "pc", "-accel", "tcg", "-m", "32", "-vga", "std", "-display",
                           "dbus,p2p=yes", "-qmp", f"unix:{qmp},server=on,wait=off"],
                          stdout=(work / "vm.log").open("w"), stderr=subprocess.STDOUT)
    vgpu = create_mdev("mbochs", "mbochs-*")
    wanted = {"left": "vm", "wb": "office"}
    comp = None
    results: list[dict[str, float]] = []
    starts: list[float] = []
    try:
        comp = lb.Compositor(policy(qmp, vgpu, control), "--device", cards["virtio_gpu"], "--device",
                             cards["vkms"], "--no-input", name="restart")
        office = VgpuGuestControl(str(control))
        office.mode(640, 480)
        office.draw("office", 1)
        comp.wait_shown(wanted, timeout=240)
        print(f"bench_restart: {args.restarts} SIGKILL/restart cycles ...", flush=True)
        for _ in range(args.restarts):
            back, start = restart_once(comp, wanted)
            results.append(back)
            starts.append(start)
            time.sleep(0.5)
        vmm = comp.status()["launched"]["office"]
    finally:
        if comp is not None:
            comp.stop()
            for rec in (comp.dir / "launched").glob("*.json"):
                pid = json.loads(rec.read_text())["pid"]
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        vm.terminate()
        vm.wait(timeout=30)
        time.sleep(0.5)
        remove_mdev(vgpu)
    print()
    print(f"Back after a restart, milliseconds from the new compositor serving — {where}")
    print(f"  (platform test: {evidence}; status polled every {POLL * 1e3:.0f} ms, the first poll right "
          f"after the control socket answered: 0 means on screen by then; the launched VMM kept pid "
          f"{vmm['pid']} through {args.restarts} restarts: {vmm})")
    print(f"  (the new process's start → its control socket answering: median "
          f"{statistics.median(starts):.0f} ms, max {max(starts):.0f} ms: Python's start and imports, the "
          "cards, the policy)")
    rows = []
    goals = []
    for guest, label in (("vm", "QEMU -display dbus (p2p over QMP)"),
                         ("office", "launched vGPU (pidfd_getfd)")):
        values = sorted(r[guest] for r in results)
        med, top = statistics.median(values), values[-1]
        rows.append([label, str(len(values)), f"{med:.0f}", f"{top:.0f}", f"{values[0]:.0f}"])
        goals.append([f"back: {label}", f"{BACK_GOAL_MS:.0f}", f"{med:.0f}", f"{med / BACK_GOAL_MS:.2f}",
                      f"{top:.0f}", f"{top / BACK_GOAL_MS:.2f}"])
    print(lb.table(["guest", "n", "median", "max", "min"], rows))
    print()
    print("Promises (ratio = measured / goal; ≤ 1.00 keeps the promise)")
    print(lb.table(["promise", "goal ms", "median ms", "ratio", "max ms", "ratio"], goals))
    return 0


if __name__ == "__main__":
    lb.script(main, "bench_restart")
