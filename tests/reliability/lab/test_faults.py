"""Faults while three guests flip at 60 flips/s each on virtio-gpu's three heads: a udev storm, the
policy file truncated, deleted and replaced by rename, a guest SIGKILLed mid-flip, a monitor unplugged
mid-commit, DRM master lost to VT switches, and directflip itself SIGKILLed and restarted. After each,
every output the fault spared keeps its picture and every output comes back; pixels are read from QEMU
screendumps. The lab's CPU is emulated on a shared machine, so the tests wait with generous deadlines
(WAIT) and print the times they saw; the promise (back within 2 s) is measured by
bench/bench_reaction.py, which prints it beside its goal.

The guests run with --reconnect, as a VMM launcher would, so a restarted compositor gets them back."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import pyudev
from labkit import Compositor, colour_share, wait_for
from reliakit import (
    HEADS,
    MONITORS,
    SIZES,
    all_back,
    counter,
    dri_debugfs,
    moving,
    sample,
    shows,
    start_guest,
    wait_until,
)

from compositor.session import activate_vt
from directflip_tools.synthetic import guest_colour

OUR_VT = 2          # the compositor holds VT 2 (VT switches pause and resume it)
WAIT = 60.0         # seconds: a generous deadline for anything to come back (not a promise)

POLICY = MONITORS + """guests:
  office: {kind: socket}
  media:  {kind: socket}
  build:  {kind: socket}
placements:
  - {guest: office, monitor: left}
  - {guest: media, monitor: centre}
  - {guest: build, monitor: right, failover: [centre], priority: 10}
"""
PLACED = {"left": "office", "centre": "media", "right": "build"}
SWAPPED = POLICY.replace("{guest: office, monitor: left}", "{guest: office, monitor: centre}") \
                .replace("{guest: media, monitor: centre}", "{guest: media, monitor: left}")


def start_placed(comp: Compositor, monitor: str):
    """The guest PLACED on `monitor`, reconnecting (as a VMM launcher would) across restarts."""
    return start_guest(comp, monitor, PLACED[monitor], "--reconnect")


@pytest.fixture(scope="module")
def comp(cards, host, tmp_path_factory):
    c = Compositor(tmp_path_factory.mktemp("faults"))
    activate_vt(OUR_VT)
    c.start(POLICY, "--vt", str(OUR_VT))
    for monitor in PLACED:
        start_placed(c, monitor)
    for monitor, guest in PLACED.items():
        c.wait_shown(monitor, guest)
    yield c
    code = c.stop()
    print(c.tail(10))
    assert code == 0


def all_live(comp: Compositor, host, placements: dict[str, str] = PLACED) -> None:
    """Each monitor shows its guest (status and screendump) and the frame counter moves."""
    for monitor, guest in placements.items():
        comp.wait_shown(monitor, guest, timeout=WAIT)
        wait_for(f"{guest} on {monitor} (screendump)", lambda m=monitor, g=guest: shows(host, HEADS[m], g),
                 timeout=WAIT)
        moving(host, HEADS[monitor])


def presented(comp: Compositor) -> dict:
    """monitor -> the guest's frame number on screen (-1: not its guest, or nothing yet), for PLACED.
    Frame numbers, not counters: a resumed card gets new pipelines, whose counters start again."""
    outs = {o.get("monitor"): o for o in comp.status()["outputs"]}
    return {m: (outs[m].get("on_screen") or {}).get("frame", -1) if outs.get(m, {}).get("guest") == g
            else -1 for m, g in PLACED.items()}


def errors(comp: Compositor) -> dict:
    return {o["monitor"]: o["errors"] for o in comp.status()["outputs"] if o.get("monitor")}


# --------------------------------------------------------------------------------------- udev

def uevent_files() -> list[Path]:
    """Every drm device's uevent file: the cards and their connectors."""
    return sorted(Path("/sys/class/drm").glob("card*/uevent"))


class HotplugWitness:
    """A listener of our own on the kernel's uevents: when the first real HOTPLUG=1 of a drm card came
    (the storm's synthetic ones carry SYNTH_ARG_HOTPLUG instead)."""

    def __init__(self) -> None:
        self.monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
        self.monitor.filter_by("drm")
        self.monitor.start()
        self.at: float | None = None
        self.lag = 0.0     # how far behind the kernel this listener was when the real event came
        self.written: dict[int, float] = {}   # storm: synthetic event number -> when it was written
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = None
        while not self._stop:
            try:
                device = self.monitor.poll(timeout=0.1)
            except OSError:  # ENOBUFS: the storm overflowed our socket; the real event may be lost
                continue
            if device is None:
                continue
            props = device.properties
            if "SYNTH_ARG_CONNECTOR" in props:
                last = (time.monotonic(), int(props["SYNTH_ARG_CONNECTOR"]))
            elif self.at is None and props.get("HOTPLUG") == "1":
                self.at = time.monotonic()
                if last is not None and last[1] in self.written:
                    self.lag = max(0.0, last[0] - self.written[last[1]])

    def stop(self) -> None:
        self._stop = True
        self._thread.join(timeout=5)


def storm(files: list[Path], count: int, written: dict[int, float]) -> float:
    """Write `count` synthetic `change` uevents as fast as the kernel takes them, round-robin over
    `files`, half of them carrying made-up keys (the kernel passes them on as SYNTH_ARG_*, so none is a
    real HOTPLUG; `written` gets when each of those was written). Returns the seconds it took."""
    fds = [os.open(f, os.O_WRONLY) for f in files]
    try:
        t0 = time.monotonic()
        for i in range(count):
            text = "change" if i % 2 else f"change 00000000-0000-0000-0000-{i:012d} HOTPLUG=1 CONNECTOR={i}"
            os.write(fds[i % len(fds)], text.encode())
            if not i % 2:
                written[i] = time.monotonic()
        return time.monotonic() - t0
    finally:
        for fd in fds:
            os.close(fd)


@contextlib.contextmanager
def udevd_paused():
    """systemd-udevd stopped (SIGSTOP) while inside, continued after. directflip reads the kernel's
    uevents itself; udevd running its rules for a thousand events keeps the lab's two emulated CPUs
    busy for seconds (a failover measured 2.79 s after the unplug's uevent with it running), which a
    real machine does in milliseconds. Its queue is handled once it continues."""
    pids = [int(p) for p in subprocess.run(["pgrep", "-x", "systemd-udevd"], capture_output=True,
                                           text=True).stdout.split()]
    assert pids, "no systemd-udevd in the lab guest"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_a_thousand_udev_events_change_nothing_and_hide_no_real_hotplug(comp, host, debugfs):
    """1000 uevents on the drm devices, with a real unplug of head 2 in the middle of them: the noise
    is coalesced, the unplug is not lost (build fails over to centre), and every other output keeps
    its picture throughout."""
    dri = dri_debugfs(debugfs, "virtio_gpu")
    before = comp.status()
    cpu0 = sample(comp.proc.pid, dri).cpu_s
    left = counter(host, 0)
    files = uevent_files()
    real = HotplugWitness()
    try:
        with udevd_paused(), concurrent.futures.ThreadPoolExecutor(1) as pool:
            noise = pool.submit(storm, files, 1000, real.written)
            time.sleep(0.3)
            host.unplug(2)            # a real hotplug in the middle of the noise
            moved = wait_until(lambda: (o := comp.output("centre")).get("guest") == "build"
                               and o.get("on_screen") is not None, WAIT)
            shown_at, during = time.monotonic(), not noise.done()
            took = noise.result()
        got = wait_for("the storm's events counted", lambda: (s := comp.status())["udev_events"]
                       - before["udev_events"] >= 1000 and s, timeout=30)
        cpu = sample(comp.proc.pid, dri).cpu_s - cpu0
        assert moved is not None, f"the real unplug was lost in the noise: {comp.output('centre')}"
        # The time printed is the compositor's: from the unplug's uevent (seen by a listener of our own,
        # whose lag behind the storm is taken off its time, which only lengthens the figure) to the
        # picture.
        assert real.at is not None, "the kernel sent no HOTPLUG uevent for the unplug (or we lost it)"
        failover = shown_at - (real.at - real.lag)
        print(f"udev storm: 1000 synthetic uevents over {len(files)} drm devices written in {took:.2f} s, "
              f"a real unplug of head 2 among them: {got['udev_events'] - before['udev_events']} events "
              f"received, {got['hotplugs'] - before['hotplugs']} re-probes; build on centre {failover:.2f} s "
              f"after the unplug's uevent ({'while' if during else 'after'} the storm went on; our "
              f"listener {real.lag:.2f} s behind); compositor CPU {cpu:.2f} s meanwhile (TCG)")
        assert got["hotplugs"] - before["hotplugs"] <= 60, "bursts were not coalesced"
        assert comp.proc.poll() is None
        after = counter(host, 0)
        assert after is not None and after > (left or 0), "left stalled in the storm"
        assert shows(host, 1, "build")
    finally:
        real.stop()
        host.plug(2, *SIZES["right"])
    back = wait_until(lambda: all_back(comp, PLACED), WAIT)
    assert back is not None, comp.status()["outputs"]
    print(f"udev storm: head 2 plugged back, every output back {back:.2f} s after the plug returned")
    all_live(comp, host)


# ------------------------------------------------------------------------------------- policy

def test_policy_truncated_deleted_and_replaced_by_rename(comp, host):
    try:
        policy_faults(comp, host)
    finally:
        if not comp.policy.exists() or comp.policy.read_text() != POLICY:
            tmp = comp.policy.with_name("policy.restore")
            tmp.write_text(POLICY)
            os.rename(tmp, comp.policy)


def policy_faults(comp: Compositor, host) -> None:
    policy = comp.policy
    text = policy.read_text()
    gen = comp.status()["policy"]["generation"]

    def unchanged(why: str, says: str) -> dict:
        st = wait_for(f"the edit ({why}) rejected with {says!r}",
                      lambda: says in ((s := comp.status())["policy"]["last_error"] or "") and s,
                      timeout=WAIT)
        assert st["policy"]["generation"] == gen, st["policy"]
        assert {o["monitor"]: o["guest"] for o in st["outputs"]} == PLACED
        for monitor in PLACED:
            moving(host, HEADS[monitor])
        print(f"policy {why}: kept the last good policy; last_error: "
              f"{st['policy']['last_error'].splitlines()[0]}")
        return st

    with policy.open("w"):
        pass                                     # truncated to nothing
    unchanged("truncated to 0 bytes", "the policy is empty")
    policy.write_text(text[: text.index("placements:") + 30])   # cut mid-line
    unchanged("cut mid-line", f"{policy}:11:")
    policy.unlink()
    unchanged("deleted", "file removed")

    tmp = policy.with_name("policy.new")
    tmp.write_text(SWAPPED)
    t0 = time.monotonic()
    os.rename(tmp, policy)
    swapped = {"left": "media", "centre": "office", "right": "build"}
    took = wait_until(lambda: all_back(comp, swapped), WAIT)
    assert took is not None, comp.status()["outputs"]
    st = comp.status()
    assert st["policy"]["generation"] == gen + 1 and st["policy"]["last_error"] is None, st["policy"]
    for monitor, guest in swapped.items():
        wait_for(f"{guest} on {monitor}", lambda m=monitor, g=guest: shows(host, HEADS[m], g), timeout=WAIT)
    print(f"policy replaced by rename: both swapped guests on screen {took:.2f} s after the rename")
    tmp.write_text(POLICY)
    os.rename(tmp, policy)
    took = wait_until(lambda: all_back(comp, PLACED), WAIT)
    assert took is not None, comp.status()["outputs"]
    print(f"policy renamed back: every guest in its place {took:.2f} s after the rename "
          f"({time.monotonic() - t0:.2f} s for both renames)")
    all_live(comp, host)


# ---------------------------------------------------------------------------------- guests, heads

def test_a_guest_killed_mid_flip_leaves_the_others_alone_and_leaks_nothing(comp, host, debugfs):
    dri = dri_debugfs(debugfs, "virtio_gpu")
    before = sample(comp.proc.pid, dri)
    errs = errors(comp)
    proc = next(p for p in comp.guests if "media" in p.args and p.poll() is None)
    others = {m: counter(host, HEADS[m]) for m in ("left", "right")}
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    t0 = time.monotonic()
    slate = wait_until(lambda: comp.output("centre")["path"] == "slate", WAIT)
    assert slate is not None, comp.output("centre")
    assert "media is not running" in comp.output("centre")["reason"]
    assert colour_share(host.screendump(1), guest_colour("media")) < 0.01
    for monitor, value in others.items():
        assert (counter(host, HEADS[monitor]) or 0) > (value or 0), f"{monitor} stalled"
    gone = sample(comp.proc.pid, dri)
    start_placed(comp, "centre")
    # The guest's own start (Python, numpy, its buffers) is not the compositor's: time from its hello.
    # Under TCG it takes ~40 s idle and well over 120 s while another process keeps the cores busy.
    wait_for("media connected again", lambda: any(g["name"] == "media" for g in comp.status()["guests"]),
             timeout=300)
    back = wait_until(lambda: all_back(comp, {"centre": "media"}), WAIT)
    assert back is not None, f"media not shown within {WAIT:.0f} s after it connected"
    all_live(comp, host)
    after = sample(comp.proc.pid, dri)
    print(f"guest killed mid-flip: centre slate {slate:.2f} s after the kill, media shown {back:.2f} s after "
          f"it connected again; descriptors {before.fds} "
          f"-> {gone.fds} while gone -> {after.fds} back; framebuffers {before.framebuffers} -> "
          f"{gone.framebuffers} -> {after.framebuffers}")
    assert gone.fds < before.fds and after.fds == before.fds
    assert after.framebuffers == before.framebuffers
    assert errors(comp) == errs
    print(f"guest killed mid-flip: the whole cycle took {time.monotonic() - t0:.2f} s")


def test_a_monitor_unplugged_mid_commit_fails_over_and_comes_back(comp, host):
    left = counter(host, 0)
    t0 = time.monotonic()
    host.unplug(2)                        # build flips continuously: a commit is in flight or about to be
    try:
        moved = wait_until(lambda: (o := comp.output("centre")).get("guest") == "build"
                           and o.get("on_screen") is not None, WAIT)
        assert moved is not None, comp.status()["outputs"]
        assert shows(host, 1, "build")
        assert (counter(host, 0) or 0) > (left or 0), "left stalled while right was unplugged"
    finally:
        host.plug(2, *SIZES["right"])
    back = wait_until(lambda: all_back(comp, PLACED), WAIT)
    print(f"unplug of head 2 mid-commit: build on centre {moved:.2f} s after the unplug returned; "
          f"plugged back: every output back {back} s after the plug returned "
          f"({time.monotonic() - t0:.2f} s in all)")
    assert back is not None, comp.status()["outputs"]
    all_live(comp, host)
    assert all(not o["in_flight"] or o["presented"] for o in comp.status()["outputs"])


def test_master_lost_to_vt_switches_under_load(comp, host):
    vt = comp.status()["session"]["vt"]
    assert vt == OUR_VT, comp.status()["session"]
    errs = errors(comp)
    times = []
    for _ in range(3):
        activate_vt(1)
        wait_for("every card paused",
                 lambda: len((s := comp.status())["session"]["paused"]) == len(s["cards"]), timeout=WAIT)
        assert not any(c["master"] for c in comp.status()["cards"])
        away = presented(comp)
        activate_vt(vt)
        back = wait_until(lambda a=away: all(n > a[m] for m, n in presented(comp).items()), WAIT)
        assert back is not None, comp.status()
        times.append(back)
    all_live(comp, host)
    print(f"3 VT switches away and back under load: every output presenting again after "
          f"{', '.join(f'{t:.2f}' for t in times)} s")
    assert errors(comp) == errs, "commits failed around the VT switches"
    assert all(c["master"] for c in comp.status()["cards"])


# ------------------------------------------------------------------------------------ directflip

def test_directflip_sigkilled_and_restarted_has_every_output_back(comp, host):
    """Two times are printed: from exec to the new process serving (its control socket answers, its
    sockets are listening; under the lab's TCG mostly Python's imports), and from serving to every
    output presenting its guest again."""
    old = comp.proc
    old.send_signal(signal.SIGKILL)
    old.wait(timeout=10)
    t0 = time.monotonic()
    comp.launch("--vt", str(OUR_VT), append=True)
    started = wait_until(comp.answers, 180, step=0.01)
    assert started is not None, comp.tail()
    back = wait_until(lambda: all_back(comp, PLACED), WAIT, step=0.01)
    if back is None:
        for proc in comp.guests:
            if proc.poll() is not None:
                print(f"guest {proc.args[5:8]} exited {proc.returncode}:\n{proc.stdout.read()}")
            else:
                print(f"guest {proc.args[5:8]} still running")
    assert back is not None, comp.tail()
    for monitor, guest in PLACED.items():
        assert shows(host, HEADS[monitor], guest), f"{monitor} does not show {guest} after the restart"
    all_live(comp, host)
    print(f"directflip SIGKILLed and restarted: the new process serving {started:.2f} s after its exec "
          f"(TCG), every output presenting its guest {back:.2f} s after that "
          f"({started + back:.2f} s from exec)")
    assert sum(p.poll() is None for p in comp.guests) >= 3, "guests did not survive the restart"
    print(f"restart cycle: {time.monotonic() - t0:.2f} s from the kill to every output checked")

