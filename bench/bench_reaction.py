"""Reaction times: a policy edit → the re-plan on screen; a monitor plugged in → the guest's picture.

    python -m directflip_tools.lab run -- python bench/bench_reaction.py [--swaps N] [--plugs N]

Runs in the lab against the real `directflip run`, three light guests flipping at 60/s on the three
virtio-gpu heads (heads 0 and 1 at 1024x768, head 2 at 640x480; every guest's buffers the size of
its heads, so a swap needs no scaling).

Policy reload: the policy file is rewritten (written aside, renamed over it, as editors save) to swap
guests a and b between heads 0 and 1, N times. From the moment the rename returned: until the
compositor had read and validated the edit (its status `policy.loaded_ns`, CLOCK_MONOTONIC like the
bench's clock), until the new plan was on screen (`policy.applied_ns`: both outputs' blocking commits
with the swapped guests had returned), and until the status showed both outputs with their new guest
on screen and a frame of it presented after that (polled every 20 ms).

Hotplug: head 2 (guest c's monitor; its failover is head 1, where c's priority wins over b) is unplugged
and plugged again through QEMU's VNC (a real HOTPLUG uevent), N times. From the moment the unplug call
returned until the output was off (gone from the status) and until c was presenting on its failover
monitor (the promise: within 1 s); from the moment the plug call returned: until the compositor had
re-probed the
connectors (its status `hotplugs` count), until the status showed c on that output with a frame on
screen (both polled every 20 ms; the promise: back within 2 s), and until the first flip event of
c's frames on it (the kernel's timestamp of the flip, sent to the guest in `presented`).

The promises are printed beside the measured medians and maxima as ratios (measured / goal); under
the lab's emulated CPU they are the lab's, and `make bench` prints the host's load average before and
after, which says whether the machine was busy meanwhile.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import labbench as lb  # noqa: E402

from compositor.stats import percentile  # noqa: E402

MONITORS = {"left": "{connector: Virtual-1, driver: virtio_gpu}",
            "centre": "{connector: Virtual-2, driver: virtio_gpu}",
            "right": "{connector: Virtual-3, driver: virtio_gpu}"}
SIZES = {"left": (0, 1024, 768), "centre": (1, 1024, 768), "right": (2, 640, 480)}
POLL = 0.02
FAILOVER_GOAL_MS = 1000.0   # a guest whose monitor goes away is on its failover monitor within 1 s
BACK_GOAL_MS = 2000.0       # and back on its monitor within 2 s of the monitor's return


def reaction_policy(swapped: bool) -> str:
    text = lb.policy(MONITORS, placements(swapped))
    return text.replace("{guest: c, monitor: right}", "{guest: c, monitor: right, failover: [centre], "
                                                      "priority: 10}")


def placements(swapped: bool) -> dict[str, str]:
    return {"a": "centre" if swapped else "left", "b": "left" if swapped else "centre", "c": "right"}


def poll_until(what: str, check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise lb.BenchError(f"timed out waiting for {what}")
        time.sleep(POLL)


def swap_once(comp: lb.Compositor, swapped: bool) -> dict[str, float]:
    want = {m: g for g, m in placements(swapped).items()}
    before = comp.status()
    gen = before["policy"]["generation"]
    saved = comp.set_policy(reaction_policy(swapped))
    seen: dict[str, int] = {}

    def shown():
        st = comp.status()
        outs = {o["monitor"]: o for o in st["outputs"] if o.get("monitor")}
        now = time.monotonic_ns()
        for m in ("left", "centre"):
            o = outs.get(m, {})
            if o.get("guest") != want[m] or not o.get("on_screen"):
                continue
            # The first poll showing the new guest fixes a baseline: a frame presented after it is
            # certainly the new guest's.
            if m not in seen:
                seen[m] = o["presented"]
            elif o["presented"] > seen[m] and f"{m}-flowing" not in seen:
                seen[f"{m}-flowing"] = now
        return st if all(f"{m}-flowing" in seen for m in ("left", "centre")) else None

    st = poll_until("both outputs presenting the swapped guests", shown)
    pol = st["policy"]
    if pol["generation"] != gen + 1 or pol["applied_generation"] != gen + 1:
        raise lb.BenchError(f"policy generation {gen} → {pol['generation']} (applied "
                            f"{pol['applied_generation']}): expected one new generation")
    return {"loaded": (pol["loaded_ns"] - saved) / 1e6, "applied": (pol["applied_ns"] - saved) / 1e6,
            "flowing": (max(seen["left-flowing"], seen["centre-flowing"]) - saved) / 1e6}


def plug_once(comp: lb.Compositor, guest: lb.LightGuest) -> dict[str, float]:
    head, w, h = SIZES["right"]
    t0 = time.monotonic_ns()
    lb.host().unplug(head)
    poll_until("right off after the unplug", lambda: "right" not in comp.outputs())
    off = (time.monotonic_ns() - t0) / 1e6
    base: dict[str, int] = {}

    def on_failover() -> bool:
        o = comp.outputs().get("centre", {})
        if o.get("guest") != "c" or not o.get("on_screen"):
            return False
        base.setdefault("presented", o["presented"])   # a frame presented after this one is c's
        return o["presented"] > base["presented"]

    poll_until("c presenting on its failover monitor", on_failover)
    failover = (time.monotonic_ns() - t0) / 1e6
    time.sleep(0.5)
    probes = comp.status()["hotplugs"]
    lb.host().plug(head, w, h)
    plugged = time.monotonic_ns()
    poll_until("a re-probe after the plug", lambda: comp.status()["hotplugs"] > probes)
    probed = (time.monotonic_ns() - plugged) / 1e6
    poll_until("c on right and b on centre after the plug",
               lambda: (o := comp.outputs()).get("right", {}).get("guest") == "c"
               and o["right"].get("on_screen") and o.get("centre", {}).get("guest") == "b"
               and o["centre"].get("on_screen"))
    picture = (time.monotonic_ns() - plugged) / 1e6
    first = poll_until("a flip event of c after the plug",
                       lambda: next((t for t in list(guest.presented) if t >= plugged), None))
    return {"off": off, "failover": failover, "probed": probed, "picture": picture,
            "flip": (first - plugged) / 1e6}


def summary(label: str, values: list[float]) -> list[str]:
    ordered = sorted(values)
    return [label, str(len(values)), f"{statistics.median(ordered):.1f}",
            f"{percentile(ordered, 0.95):.1f}",
            f"{ordered[-1]:.1f}", f"{ordered[0]:.1f}"]


def main(argv: list[str] | None = None) -> int:
    parser = lb.arguments(__doc__)
    parser.add_argument("--swaps", type=int, default=10, help="policy swaps (10)")
    parser.add_argument("--plugs", type=int, default=5, help="unplug/plug cycles of head 2 (5)")
    parser.add_argument("--rate", type=float, default=60.0, help="guest flips per second (60)")
    args = parser.parse_args(argv)

    where, evidence = lb.platform()
    cards = lb.cards()
    for head, w, h in SIZES.values():
        lb.plug(head, w, h, cards["virtio_gpu"])
    swaps, plugs = [], []
    with lb.Compositor(reaction_policy(False), "--device", cards["virtio_gpu"],
                       name="reaction") as comp:
        guests = {m: lb.LightGuest(g, comp.socket, cards["virtio_gpu"], *SIZES[m][1:])
                  for g, m in placements(False).items()}
        with lb.flipping(comp, guests, args.rate):
            time.sleep(1.0)
            t0 = time.monotonic()
            for _ in range(20):
                comp.status()
            status_ms = (time.monotonic() - t0) / 20 * 1e3
            print(f"bench_reaction: {args.swaps} policy swaps ...", flush=True)
            for i in range(args.swaps):
                swaps.append(swap_once(comp, swapped=(i % 2 == 0)))
                time.sleep(0.3)
            print(f"bench_reaction: {args.plugs} unplug/plug cycles of head 2 ...", flush=True)
            for _ in range(args.plugs):
                plugs.append(plug_once(comp, guests["right"]))
                time.sleep(0.3)
        hotplugs = comp.status()["hotplugs"]
    print()
    print(f"Reaction times, milliseconds — {where}")
    print(f"  (platform test: {evidence}; guests flipping at {args.rate:.0f}/s on 3 heads; "
          f"{hotplugs} re-probes for udev events)")
    print(f"  (poll) rows poll the status every {POLL * 1e3:.0f} ms; one status request takes "
          f"{status_ms:.1f} ms here, which bounds their resolution")
    rows = [
        summary("policy saved → edit loaded (daemon clock)", [s["loaded"] for s in swaps]),
        summary("policy saved → swap on screen (daemon clock)", [s["applied"] for s in swaps]),
        summary("policy saved → both presenting swapped (poll)", [s["flowing"] for s in swaps]),
        summary("unplug returned → output off (poll)", [p["off"] for p in plugs]),
        summary("unplug returned → c presenting on failover (poll)", [p["failover"] for p in plugs]),
        summary("plug returned → compositor re-probed (poll)", [p["probed"] for p in plugs]),
        summary("plug returned → c and b on screen (poll)", [p["picture"] for p in plugs]),
        summary("plug returned → guest's first flip event", [p["flip"] for p in plugs]),
    ]
    print(lb.table(["from → to", "n", "median", "p95", "max", "min"], rows))
    print()
    print("Promises (ratio = measured / goal; ≤ 1.00 keeps the promise)")
    goals = [("failover: unplug → c presenting on its failover monitor", [p["failover"] for p in plugs],
              FAILOVER_GOAL_MS),
             ("back: plug → c and b on their own monitors again", [p["picture"] for p in plugs],
              BACK_GOAL_MS)]
    print(lb.table(["promise", "goal ms", "median ms", "ratio", "max ms", "ratio"],
                   [[label, f"{goal:.0f}", f"{statistics.median(v):.1f}",
                     f"{statistics.median(v) / goal:.2f}", f"{max(v):.1f}", f"{max(v) / goal:.2f}"]
                    for label, v, goal in goals]))
    return 0


if __name__ == "__main__":
    lb.script(main, "bench_reaction")
