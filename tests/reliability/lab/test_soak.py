"""Soak: 100 000 guest flips across three monitors, with one guest restarted along the way so buffers
are imported and dropped, not just reused. At the end the compositor holds as many descriptors and
framebuffers (the kernel's count, from DRM debugfs) as after warm-up (which takes in the first
restart), and its resident memory has not grown. DIRECTFLIP_SOAK_FLIPS sets the count (default
100 000); `make test` runs the default."""

from __future__ import annotations

import os
import signal
import time

from labkit import START_WITHIN, Compositor
from reliakit import HEADS, MONITORS, dri_debugfs, moving, sample, shows, start_guest, total

FLIPS = int(os.environ.get("DIRECTFLIP_SOAK_FLIPS", "100000"))
RESTARTS = 4        # times soak-c is killed and started again during the soak
RSS_GROWTH_KIB = 1024
STALL = 300         # seconds without a new flip that fail the soak (a wedged output, not a slow one)

POLICY = MONITORS + """guests:
  soak-a: {kind: socket}
  soak-b: {kind: socket}
  soak-c: {kind: socket}
placements:
  - {guest: soak-a, monitor: left}
  - {guest: soak-b, monitor: centre}
  - {guest: soak-c, monitor: right}
"""
PLACED = {"left": "soak-a", "centre": "soak-b", "right": "soak-c"}


class Progress:
    """The compositor's flip count, failing the soak once it has not moved for STALL seconds: the
    soak's length is a count of flips, and a count that stops must end it, not hang it."""

    def __init__(self, comp: Compositor) -> None:
        self.comp = comp
        self.last, self.since = -1, time.monotonic()

    def flips(self) -> int:
        status = self.comp.status()
        now, flips = time.monotonic(), total(status, "frames")
        if flips != self.last:
            self.last, self.since = flips, now
        assert now - self.since < STALL, (f"no flip for {STALL} s, stuck at {flips}: "
                                           f"{[o for o in status['outputs'] if o.get('guest')]}")
        return flips


def test_soak_keeps_descriptors_framebuffers_and_memory_flat(cards, host, debugfs, tmp_path):
    dri = dri_debugfs(debugfs, "virtio_gpu")
    comp = Compositor(tmp_path)
    comp.start(POLICY)
    try:
        procs = {m: start_guest(comp, m, g) for m, g in PLACED.items()}
        for monitor, guest in PLACED.items():
            comp.wait_shown(monitor, guest)
        first = max(3000, FLIPS // 20)
        t0 = time.monotonic()
        progress = Progress(comp)
        while progress.flips() < first:
            time.sleep(0.5)
        warm = sample(comp.proc.pid, dri)
        print(f"after {total(comp.status(), 'frames')} flips: {warm}")
        base = base_flips = None

        restart_at = [FLIPS * (k + 1) // (RESTARTS + 1) for k in range(RESTARTS)]
        samples = []
        while (flips := progress.flips()) < FLIPS:
            assert comp.proc.poll() is None, comp.tail()
            if restart_at and flips >= restart_at[0]:
                restart_at.pop(0)
                procs["right"].send_signal(signal.SIGKILL)
                procs["right"].wait(timeout=10)
                procs["right"] = start_guest(comp, "right", PLACED["right"])
                comp.wait_shown("right", "soak-c", timeout=START_WITHIN)
                samples.append(sample(comp.proc.pid, dri))
                if base is None:
                    # Warm-up ends after the first restart: what a guest's coming and going allocates
                    # once (a slate with text, the first new import) is not a leak; what grows with
                    # every further restart and flip is.
                    base, base_flips = samples[-1], total(comp.status(), "frames")
            assert all(p.poll() is None for p in procs.values()), "a guest exited during the soak"
            time.sleep(1.0)
        elapsed = time.monotonic() - t0
        time.sleep(1.0)
        end = sample(comp.proc.pid, dri)
        st = comp.status()
        outs = [o for o in st["outputs"] if o.get("guest")]
        presented, dropped = total(st, "presented"), total(st, "dropped")
        print(f"soak: {flips} flips in {elapsed:.0f} s across {len(outs)} monitors, presented {presented}, "
              f"dropped {dropped}, soak-c restarted {len(samples)} times")
        print(f"  after warm-up ({base_flips} flips, one restart): {base}\n  at the end:    {end}")
        held = [(g["name"], g["buffers"], g["held"]) for g in st["guests"]]
        print(f"  buffers: data plane {st.get('data_plane')}, guests {held}, departed {st.get('departed')}")
        print(f"  RSS growth {end.rss_kib - base.rss_kib} KiB over {flips - base_flips} flips and "
              f"{len(samples) - 1} restarts; RSS after each restart: "
              f"{', '.join(str(s.rss_kib) for s in samples)} KiB (before the first: {warm.rss_kib})")
        assert flips >= FLIPS and len(outs) == 3
        for o in outs:
            assert (o["errors"], o["busy"], o["max_in_flight"], o["max_pending"]) == (0, 0, 1, 1), o
            assert o["presented"] + o["dropped"] + int(o["in_flight"]) <= o["frames"], o
        assert end.fds == base.fds, f"descriptors {base.fds} -> {end.fds}"
        assert end.framebuffers == base.framebuffers, \
            f"the kernel lists {base.framebuffers} -> {end.framebuffers} framebuffers"
        assert end.rss_kib - base.rss_kib <= RSS_GROWTH_KIB, f"RSS {base.rss_kib} -> {end.rss_kib} KiB"
        for monitor, guest in PLACED.items():
            assert shows(host, HEADS[monitor], guest), f"{monitor} does not show {guest} after the soak"
            moving(host, HEADS[monitor])
    finally:
        code = comp.stop()
        print(comp.tail(8))
    assert code == 0, comp.tail()
