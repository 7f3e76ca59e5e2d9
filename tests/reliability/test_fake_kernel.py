"""The real compositor (`directflip run`, its C data plane included) on bench/fakedrm.c's fake display
kernel, on the host: guests killed in mid-flight, restarted, and at the end nothing left behind.

The lab's soak (tests/reliability/lab/test_soak.py) checks the same on real kernels; this runs in
seconds on any machine, so a leak or a descriptor handled twice shows in every `make test`. The fake
kernel is strict where the lab's drivers are: a second nonblocking commit on a busy CRTC is EBUSY, an
unknown framebuffer is EINVAL. What it holds (framebuffers, buffer handles, blobs) is read from its
stats file, as the lab reads DRM debugfs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import labbench as lb  # noqa: E402
from fakedrm import FakeKernel, FakeVgpu  # noqa: E402

MONITORS = 3
FLIPS = int(os.environ.get("DIRECTFLIP_FAKE_SOAK_FLIPS", "6000"))
RESTARTS = 4
DEADLINE = 600.0   # seconds for the whole run: a stall fails it, a busy machine does not
SIZE = "640x480"


@pytest.fixture(scope="module")
def fake():
    with FakeKernel(outputs=MONITORS, delay_us=1000) as kernel:
        yield kernel


def guest(fake: FakeKernel, comp: lb.Compositor, name: str) -> subprocess.Popen:
    """A synthetic guest with its buffers on the fake card (memfds: the compositor imports them)."""
    return subprocess.Popen([sys.executable, "-m", "compositor.cli", "guest", "--name", name, "--socket",
                             comp.socket, "--on", fake.path, "--size", SIZE, "--rate", "240",
                             "--duration", "3600"], env=fake.env(stats=False), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def frames(status: dict) -> int:
    return sum(o.get("frames", 0) for o in status["outputs"] if o.get("guest"))


def holdings(fake: FakeKernel, comp: lb.Compositor) -> tuple[int, dict]:
    """The compositor's descriptors and fake-kernel objects, once three looks 0.3 s apart agree (the
    control connection of the status call just made closes on its own time, and a departed guest's
    buffers are freed as the data plane reports them)."""
    looks: list = []
    for _ in range(100):
        looks = [*looks[-2:], (len(os.listdir(f"/proc/{comp.pid}/fd")), fake.stats())]
        if len(looks) == 3 and looks[0] == looks[1] == looks[2]:
            break
        time.sleep(0.3)
    return looks[-1]


@pytest.mark.parametrize(("data_plane", "path"), [("native", "zero-copy"), ("python", "zero-copy"),
                                                  ("native", "copy")])
def test_guests_killed_in_mid_flight_leave_nothing_behind(fake, data_plane, path):
    # `copy`: the fake card refuses the guests' buffers, as virtio-gpu refuses a foreign dma-buf, so
    # every frame is copied (on the daemon's copy workers) into the compositor's own buffers.
    placed = {f"m{i}": f"g{i}" for i in range(MONITORS)}
    policy = lb.policy({m: f"{{connector: Virtual-{i + 1}, mode: 1280x720}}" for i, m in enumerate(placed)},
                       {g: m for m, g in placed.items()})
    comp = lb.Compositor(policy, "--device", fake.path, "--session", "direct", "--no-input",
                         "--data-plane", data_plane, name="fake-soak",
                         env=fake.env(prime_import=path == "zero-copy"))
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs = {m: guest(fake, comp, g) for m, g in placed.items()}
        comp.wait_shown(placed, timeout=120)
        victim = "m2"
        restart_at = [FLIPS * (k + 1) // (RESTARTS + 1) for k in range(RESTARTS)]
        base = None
        t0 = time.monotonic()
        while (done := frames(comp.status())) < FLIPS:
            assert time.monotonic() - t0 < DEADLINE, f"{done} of {FLIPS} flips in {DEADLINE:.0f} s"
            assert comp.proc.poll() is None, comp.tail()
            if restart_at and done >= restart_at[0]:
                restart_at.pop(0)
                procs[victim].send_signal(signal.SIGKILL)
                procs[victim].wait(timeout=30)
                procs[victim] = guest(fake, comp, placed[victim])
                comp.wait_shown({victim: placed[victim]}, timeout=120)
                if base is None:
                    # after the first restart: what a guest's first coming and going allocates once
                    # (a slate, the label) is not a leak
                    base = holdings(fake, comp)
            time.sleep(0.2)
        elapsed = time.monotonic() - t0
        time.sleep(0.5)
        end = holdings(fake, comp)
        st = comp.status()
        outs = [o for o in st["outputs"] if o.get("guest")]
        print(f"{data_plane} {path}: {frames(st)} flips in {elapsed:.1f} s, {placed[victim]} killed and "
              f"restarted {RESTARTS} times; after the first restart {base}, at the end {end}; "
              f"data plane {st.get('data_plane')}, departed {st.get('departed')}")
        assert not restart_at and base is not None
        fds = sorted(os.listdir(f"/proc/{comp.pid}/fd"), key=int)
        assert end == base, f"descriptors and fake-kernel objects {base} -> {end}; fds {fds}\n{comp.tail(40)}"
        assert st.get("departed") == [], (st.get("departed"), comp.tail(40))
        for o in outs:
            on_dp = data_plane == "native" and path == "zero-copy"
            assert o["path"] == path and o["data_plane"] == on_dp, o
            assert (o["errors"], o["busy"], o["max_in_flight"], o["max_pending"]) == (0, 0, 1, 1), o
        if data_plane == "native" and path == "zero-copy":
            live = sum(g["buffers"] for g in st["guests"])
            assert st["data_plane"]["buffers"] == live, (st["data_plane"], st["guests"])
    finally:
        for p in procs.values():
            p.kill()
            p.wait(timeout=30)
        comp.stop()
    log = comp.log.read_text()
    assert comp.proc.returncode == 0, comp.tail()
    problems = [line for line in log.splitlines() if " ERROR: " in line or "Traceback" in line]
    assert not problems, "\n".join(problems[:20])


def test_cursor_moves_stay_on_the_data_plane_and_ride_with_the_frames(fake):
    # A guest flips and moves its pointer (cursor-move, as fast as it flips). The output stays on the
    # data plane throughout: a move of an image already drawn is the data plane's to commit, with the
    # next frame when one is due, else alone. Read from the fake kernel's log of every commit: the
    # cursor plane ends where the guest last put it, some commits carry a frame and the cursor
    # together, and none was refused.
    from compositor.sources.framesocket import FrameSocketClient, Released

    policy = lb.policy({"m0": "{connector: Virtual-1, mode: 1280x720}"}, {"g0": "m0"})
    env = fake.env()
    env["FAKEDRM_TRACE"] = "1"
    comp = lb.Compositor(policy, "--device", fake.path, "--session", "direct", "--no-input",
                         name="fake-cursor", env=env)
    fds = []
    try:
        client = FrameSocketClient(comp.socket, "g0", version=2)
        for buffer_id in (1, 2, 3):
            fd = os.memfd_create(f"g0-{buffer_id}", os.MFD_CLOEXEC)
            os.ftruncate(fd, 640 * 4 * 480)
            client.announce(buffer_id, fd, "XR24", 640, 480, 640 * 4)
            fds.append(fd)
        client.set_cursor(16, 16, 0, 0, b"\xff\x00\xff\xff" * 256)
        busy: set[int] = set()
        flips = 0
        for i in range(900):
            for ev in client.poll(0):
                if isinstance(ev, Released):
                    busy.discard(ev.id)
            free = [b for b in (1, 2, 3) if b not in busy]
            if free and i % 2 == 0:
                busy.add(free[0])
                client.flip(free[0], frame=flips)
                flips += 1
            client.move_cursor(i % 600, i % 400)
            time.sleep(1 / 600)
        client.move_cursor(100, 50)
        deadline = time.monotonic() + 60
        while True:
            out = comp.outputs()["m0"]
            if out.get("data_plane") and (out.get("cursor") or {}).get("position") == [420, 170]:
                break
            assert time.monotonic() < deadline, out
            time.sleep(0.1)
        time.sleep(0.5)
        out = comp.outputs()["m0"]
        client.close()
    finally:
        for fd in fds:
            os.close(fd)
        comp.stop()
    # while the guest was there: not the slate after it left, nor the commits turning the output off
    served = comp.log.read_text().split("guest g0 disconnected")[0]
    commits = [line for line in served.splitlines()
               if line.startswith("fakedrm:") and " atomic " in line and "flags 0x200 " not in line]
    cursor = [c for c in commits if "; obj 72 " in c]   # Virtual-1's CRTC 10: primary 70, cursor 72
    both = [c for c in cursor if "; obj 70 FB_ID=" in c]
    refused = [c for c in commits if "-> 0;" not in c]
    print(f"{flips} flips; {len(commits)} commits, {len(cursor)} with the cursor plane, {len(both)} of them "
          f"with a frame too; output {out['path']}, data plane {out['data_plane']}, cursor {out['cursor']}")
    assert out["path"] == "zero-copy" and out["data_plane"], out
    assert (out["errors"], out["busy"]) == (0, 0), out
    assert not refused, refused[:5]
    assert cursor and "CRTC_X=420 CRTC_Y=170" in cursor[-1], cursor[-3:]
    assert both, "no commit carried a frame and the cursor together"
    assert comp.proc.returncode == 0, comp.tail()


def test_a_vgpu_is_polled_and_flipped_by_the_data_plane(fake, tmp_path):
    # A VMM hands its vGPU's device over the frame socket; the guest flips between three dma-bufs.
    # Once its monitor is committed from the data plane, the data plane polls the vGPU (the
    # compositor's loop makes no query while the picture stands still) and shows each dma-buf it
    # already has a framebuffer for; the vGPU's display turned off goes back to the compositor,
    # which shows the slate, and the picture coming back goes to the data plane again.
    from compositor.sources.framesocket import FrameSocketClient

    vgpu = FakeVgpu(tmp_path, 1280, 720)
    vgpu.show(1)
    # label: 0: no name on the monitor, whose hiding later would take the monitor back for a moment
    policy = lb.policy({"m0": "{connector: Virtual-1, mode: 1280x720, label: 0}"}, {"vg": "m0"})
    policy = policy.replace("vg: {kind: socket}", "vg: {kind: vfio}")
    comp = lb.Compositor(policy, "--device", fake.path, "--session", "direct", "--no-input",
                         name="fake-vgpu", env=fake.env(vgpu=vgpu))
    device = os.open(vgpu.path, os.O_RDWR | os.O_CLOEXEC)
    try:
        client = FrameSocketClient(comp.socket, "vg")
        client.hand_over_vfio(device)
        comp.wait_shown({"m0": "vg"}, timeout=120)

        def guest() -> dict:
            return next(g for g in comp.status()["guests"] if g["name"] == "vg")

        def wait(what: str, cond, timeout: float = 60.0):
            deadline = time.monotonic() + timeout
            while not (got := cond()):
                assert time.monotonic() < deadline, f"{what}: {comp.outputs()['m0']} {guest()}"
                assert comp.proc.poll() is None, comp.tail()
                time.sleep(0.05)
            return got

        def showing(ident: int) -> bool:
            o = comp.outputs()["m0"]
            return o["data_plane"] and (o.get("on_screen") or {}).get("buffer") == ident

        # The first sight of each dma-buf is the compositor's (it fetches it); after that the data
        # plane flips among the three itself.
        t0 = time.monotonic()
        for ident in (2, 3, 1):
            vgpu.show(ident)
            wait(f"dma-buf {ident} on the data plane", lambda ident=ident: showing(ident)
                 and guest()["polled_by"] == "data plane")
        learnt = time.monotonic() - t0
        polls, queries, commits = guest()["polls"], vgpu.queries(), comp.outputs()["m0"]["commits"]
        t1 = time.monotonic()
        shown = 0
        for _ in range(10):
            for ident in (2, 3, 1):
                vgpu.show(ident)
                wait(f"dma-buf {ident} again", lambda ident=ident: showing(ident))
                shown += 1
        flipping = time.monotonic() - t1
        time.sleep(1.0)   # the picture stands still: the data plane keeps asking, the loop does not
        g, out = guest(), comp.outputs()["m0"]
        print(f"3 dma-bufs learnt in {learnt:.2f} s; {shown} flips shown in {flipping:.2f} s with "
              f"{g['polls'] - polls} polls by the compositor, {vgpu.queries() - queries} plane queries in "
              f"all and {out['commits'] - commits} commits; {g}")
        assert g["polls"] == polls, "the compositor polled a vGPU the data plane polls"
        assert g["polled_by"] == "data plane" and out["data_plane"] and out["path"] == "zero-copy", (g, out)
        assert vgpu.queries() - queries >= shown, "the data plane did not poll the vGPU"
        assert out["commits"] - commits >= shown and (out["errors"], out["busy"]) == (0, 0), out
        assert g["buffers"] == 3, g

        vgpu.show(0)   # no such dma-buf: a display the compositor must look at (here: off)
        fd = os.open(vgpu.path, os.O_WRONLY)
        os.pwrite(fd, bytes(64), 0)
        os.close(fd)
        wait("the slate", lambda: comp.outputs()["m0"]["path"] == "slate")
        assert guest()["polled_by"] == "compositor"
        vgpu.show(2)
        wait("the picture back on the data plane", lambda: showing(2)
             and guest()["polled_by"] == "data plane")
        client.close()
        wait("the guest gone", lambda: not [g for g in comp.status()["guests"] if g["name"] == "vg"])
    finally:
        os.close(device)
        comp.stop()
    log = comp.log.read_text()
    problems = [line for line in log.splitlines() if " ERROR: " in line or "Traceback" in line]
    assert not problems, "\n".join(problems[:20])
    assert comp.proc.returncode == 0, comp.tail()


def test_a_qemu_displays_dma_bufs_are_flipped_by_the_data_plane(fake, tmp_path):
    # A QEMU display (the protocol's peer, serving org.qemu on a private bus as `-display dbus`
    # does) alternates two dma-bufs with ScanoutDMABUF, each followed by UpdateDMABUF. The daemon
    # reads the D-Bus calls and hands each frame to the data plane: the output stays on the data
    # plane while its commits go on, and an in-place update makes no commit.
    bus = tmp_path / "bus"
    daemon = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--nopidfile",
                               f"--address=unix:path={bus}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    peer = subprocess.Popen([sys.executable, "-m", "directflip_tools.qemu_peer", "serve",
                             "--bus", f"unix:path={bus}", "--name", "peer-vm", "--on", "memfd",
                             "--mode", "dmabuf", "--buffers", "2", "--rate", "60"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # label: 0: no name on the monitor, whose hiding later would take the monitor back for a moment
    policy = lb.policy({"m0": "{connector: Virtual-1, mode: 1280x720, label: 0}"}, {"peer": "m0"})
    policy = policy.replace("peer: {kind: socket}",
                            f'peer: {{kind: qemu-dbus, display: "dbus:unix:path={bus}"}}')
    comp = lb.Compositor(policy, "--device", fake.path, "--session", "direct", "--no-input",
                         name="fake-qemu", env=fake.env())
    try:
        comp.wait_shown({"m0": "peer"}, timeout=120)
        deadline = time.monotonic() + 60
        while not (out := comp.outputs()["m0"])["data_plane"]:
            assert time.monotonic() < deadline, out
            assert comp.proc.poll() is None, comp.tail()
            time.sleep(0.05)
        looks = []
        for _ in range(20):
            out = comp.outputs()["m0"]
            calls = next(g for g in comp.status()["guests"] if g["name"] == "peer")["qemu"]["calls"]
            looks.append((out["data_plane"], out["commits"], out["on_screen"], calls.get("ScanoutDMABUF", 0),
                          calls.get("UpdateDMABUF", 0)))
            time.sleep(0.1)
        print(f"peer on m0 ({out['path']}): (data plane, commits, on screen, ScanoutDMABUF, UpdateDMABUF) "
              f"every 0.1 s: {looks}")
        assert all(on_dp for on_dp, *_ in looks), looks
        commits, scanouts, updates = (looks[-1][i] - looks[0][i] for i in (1, 3, 4))
        shown = {(s or {}).get("buffer") for _, _, s, _, _ in looks}
        assert commits >= 10 and len(shown) == 2, looks   # both dma-bufs, flipped in turn
        # one commit per ScanoutDMABUF (another dma-buf each time), none for an UpdateDMABUF
        assert updates >= scanouts - 1 and scanouts - 2 <= commits <= scanouts + 2, looks
        assert out["path"] == "zero-copy" and (out["errors"], out["busy"]) == (0, 0), out
        guest = next(g for g in comp.status()["guests"] if g["name"] == "peer")
        assert guest["qemu"]["path"] == "dmabuf", guest
    finally:
        comp.stop()
        for proc in (peer, daemon):
            proc.terminate()
            proc.wait(timeout=20)
    log = comp.log.read_text()
    problems = [line for line in log.splitlines() if " ERROR: " in line or "Traceback" in line]
    assert not problems, "\n".join(problems[:20])
    assert "from Python" not in log, [line for line in log.splitlines() if "from Python" in line][:5]
    assert comp.proc.returncode == 0, comp.tail()
