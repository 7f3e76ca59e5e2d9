"""vGPUs on the lab's real kernel: mbochs (dma-buf planes) and mdpy (region planes) as guests of
`directflip run`, the guest played by directflip_tools.lab.vgpu_guest through the VFIO device, pixels read
back through vkms writeback and QEMU screendumps.

Two ways to hold the device, as in real deployments: directflip opens the vGPU named in the policy
and launches the "VMM" with a duplicate of the device fd (`launch`), or a VMM that holds the device
hands the fd over the frame socket (`vfio-device`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
from labkit import Compositor, colour_share, wait_for

from compositor.control import request
from compositor.kms import Card
from compositor.sources.framesocket import FrameSocketClient
from compositor.sources.vfio import VfioDevice
from directflip_tools.lab.vgpu_guest import BochsGuest, MdpyGuest, VgpuGuestControl, create_mdev, remove_mdev
from directflip_tools.synthetic import (
    decode_counter,
    draw_background,
    draw_bar,
    draw_counter,
    guest_colour,
    ink_colour,
)

SLATE = (0x10, 0x10, 0x18)


def expected(name: str, n: int, w: int, h: int) -> np.ndarray:
    """The RGB picture the guest draws for frame n (background, the counter band, the bar)."""
    background = np.zeros((h, w, 4), np.uint8)
    draw_background(background, name)
    view = background.copy()
    draw_counter(view, n)
    draw_bar(view, n, background, ink_colour(guest_colour(name)))
    return view[..., 2::-1][..., :3].copy()


def whole(what: str, grab, name: str, n: int, w: int, h: int) -> None:
    """Until grab() returns exactly frame n of `name`. A vGPU has no flip signal: the guest draws in
    place while the compositor polls, so one read may catch a frame half drawn (the counter new, the
    bar not yet); the next refresh shows it whole. On timeout, how far the last read was."""
    want = expected(name, n, w, h)
    last: list[np.ndarray] = []

    def check() -> bool:
        last[:] = [grab()]
        return last[0].shape == want.shape and bool((last[0] == want).all())

    def why() -> str:
        rgb = last[0]
        if rgb.shape != want.shape:
            return f"the last read is {rgb.shape[1]}x{rgb.shape[0]}, not {w}x{h}"
        off = float(np.mean(np.any(rgb != want, axis=-1)))
        return (f"the last read shows frame {decode_counter(rgb)}, {off:.4f} of its pixels differ from "
                f"frame {n}")

    wait_for(what, check, why=why)


def policy(vgpu: str, control: str, placements: dict[str, str]) -> str:
    lines = [f"""version: 1
defaults:
  slate: {{text: "no signal", colour: "#101018"}}
monitors:
  left:   {{connector: Virtual-1, driver: virtio_gpu}}
  centre: {{connector: Virtual-2, driver: virtio_gpu}}
  right:  {{connector: Virtual-3, driver: virtio_gpu}}
  wb:     {{connector: "Virtual-*", driver: vkms, mode: match-guest, label: 0}}
guests:
  office:
    kind: vfio
    uuid: {vgpu}
    launch: "{sys.executable} -m directflip_tools.lab.vgpu_guest --fd {{fd}} --kind bochs --control {control}
      --keyboard {{keyboard}}"
  media: {{kind: vfio}}
  build: {{kind: vfio}}
placements:"""]
    for guest, monitor in placements.items():
        lines.append(f"  - {{guest: {guest}, monitor: {monitor}}}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def lab(cards, tmp_path_factory):
    work = tmp_path_factory.mktemp("vfio")
    vgpu = create_mdev("mbochs", "mbochs-*")
    control = str(work / "office.sock")
    comp = Compositor(work)
    comp.vgpu, comp.control_path = vgpu, control
    try:
        comp.start(policy(vgpu, control, {"office": "wb"}))
        try:
            comp.office = VgpuGuestControl(control)
        except TimeoutError as exc:
            pytest.fail(f"{exc}\n{comp.tail(60)}")
        yield comp
        code = comp.stop()
        print(comp.tail(15))
        assert code == 0, f"the compositor exited {code} on SIGTERM:\n{comp.tail()}"
    finally:
        if comp.proc is not None and comp.proc.poll() is None:
            comp.proc.kill()
        remove_mdev(vgpu)


def shown(comp: Compositor, monitor: str, guest: str, mode: str | None = None, path: str | None = None):
    def check():
        out = next((o for o in comp.status()["outputs"] if o.get("monitor") == monitor), {})
        ok = (out.get("guest") == guest and out.get("on_screen")
              and (mode is None or out["mode"].startswith(mode)) and (path is None or out["path"] == path))
        return out if ok else None
    return wait_for(f"{monitor} to show {guest} {mode or ''} {path or ''}", check)


# ------------------------------------------------------------------------------------ acceptance 1

def test_mbochs_on_vkms_zero_copy_follows_the_guests_mode(lab, tmp_path):
    lab.office.mode(640, 480)
    lab.office.draw("office", 1)
    out = shown(lab, "wb", "office", "640x480", "zero-copy")
    # The first writeback may still catch the frame half drawn (the guest draws in place, the
    # compositor polls): wait for the whole frame, as below.
    whole("the 640x480 frame 1 in the writeback", lambda: lab.capture("wb", tmp_path / "a.png"),
          "office", 1, 640, 480)
    print(f"wb: office 640x480 {out['path']}, writeback pixel-exact")

    # Its monitor on the data plane, the data plane polls the vGPU, and the compositor's loop asks it
    # nothing. (A capture takes the monitor back for a moment: the loop polls until it hands the
    # monitor over again.)
    def office() -> dict:
        return next(g for g in lab.status()["guests"] if g["name"] == "office")

    lab.office.draw("office", 9)   # drawn in place: the same dma-buf
    whole("the redrawn frame 9 in the writeback", lambda: lab.capture("wb", tmp_path / "r.png"),
          "office", 9, 640, 480)
    wait_for("the data plane polling office's vGPU", lambda: office()["polled_by"] == "data plane")
    before = office()
    time.sleep(2)
    after = office()
    print(f"wb: redrawn in place; then 2 s with the data plane polling: {after['polls'] - before['polls']} "
          f"polls by the compositor; {after}")
    assert after["polls"] == before["polls"] and after["polled_by"] == "data plane", after
    assert lab.output("wb")["data_plane"]

    lab.office.mode(800, 600)   # a new dma-buf: the data plane hands the vGPU back
    lab.office.draw("office", 2)
    out = shown(lab, "wb", "office", "800x600", "zero-copy")
    whole("the 800x600 frame 2 in the writeback", lambda: lab.capture("wb", tmp_path / "b.png"),
          "office", 2, 800, 600)
    print(f"wb: office followed to 800x600 ({out['mode']}), writeback pixel-exact")


# ------------------------------------------------------------------------------------ acceptance 2, 6

def test_mbochs_on_virtio_gpu_is_copied_and_gets_that_monitors_edid(lab, host, cards):
    lab.set_policy(policy(lab.vgpu, lab.control_path, {"office": "right"}))
    lab.office.mode(640, 480)
    lab.office.draw("office", 3)
    out = shown(lab, "right", "office", path="copy")
    assert "another device" in out["reason"], out["reason"]
    whole("frame 3 on the right head", lambda: host.screendump(2), "office", 3, 640, 480)
    print(f"right: office via {out['path']}: {out['reason']}")

    with Card(cards["virtio_gpu"]) as card:
        monitor_edid = card.connector("Virtual-3").edid_blob
    assert monitor_edid, "the virtio-gpu head has no EDID to pass through"
    seen = wait_for("the guest to see the monitor's EDID",
                    lambda: (e := lab.office.edid()) == monitor_edid and e)
    print(f"office's vGPU shows its guest the {len(seen)}-byte EDID of Virtual-3")


# ------------------------------------------------------------------------------------ acceptance 3

def test_guest_display_off_shows_the_slate_and_back(lab, host):
    lab.set_policy(policy(lab.vgpu, lab.control_path, {"office": "right"}))
    lab.office.mode(640, 480)
    lab.office.draw("office", 4)
    shown(lab, "right", "office")
    lab.office.disable()
    out = wait_for("the slate", lambda: (o := lab.output("right"))["path"] == "slate" and o)
    assert "display is off" in out["reason"], out
    rgb = host.screendump(2)
    assert colour_share(rgb, SLATE) > 0.8, "the disabled guest's monitor does not show the slate"
    lab.office.mode(640, 480)
    lab.office.draw("office", 5)
    whole("the picture back", lambda: host.screendump(2), "office", 5, 640, 480)
    print(f"right: slate while off ({out['reason']}), picture back after re-enable")


# ------------------------------------------------------------------------------------ acceptance 4, 5

def test_device_fd_over_the_frame_socket_mbochs_and_mdpy(lab, host, tmp_path):
    lab.set_policy(policy(lab.vgpu, lab.control_path, {"office": "wb", "media": "centre", "build": "right"}))
    media_uuid = create_mdev("mbochs", "mbochs-*")
    build_uuid = create_mdev("mdpy", "mdpy-vga")
    media_dev = VfioDevice.open(media_uuid)
    build_dev = VfioDevice.open(build_uuid)
    media, build = BochsGuest(media_dev), MdpyGuest(build_dev)
    clients = []
    try:
        media.set_mode(800, 600)
        media.draw("media", 6)
        build.draw("build", 7)
        for name, dev in (("media", media_dev), ("build", build_dev)):
            client = FrameSocketClient(lab.socket, name)
            client.hand_over_vfio(dev.fd)
            clients.append(client)
        centre = shown(lab, "centre", "media", path="copy")
        right = shown(lab, "right", "build", path="copy")
        assert "region" in right["reason"], right["reason"]
        whole("media on centre", lambda: host.screendump(1), "media", 6, 800, 600)
        whole("build on right", lambda: host.screendump(2), "build", 7, 640, 480)
        build.draw("build", 8)  # a region plane is copied every refresh: a redraw shows without a flip
        wait_for("build's redraw", lambda: decode_counter(host.screendump(2)) == 8)
        print(f"centre: media (handed-over mbochs) via {centre['path']}; right: build (mdpy region) via "
              f"{right['path']}: {right['reason']}")
    finally:
        for client in clients:
            client.close()
        # The compositor lets go of the devices with the connections (an mdev cannot be removed while
        # any process holds its device fd).
        wait_for("the guests to leave", lambda: not [g for g in lab.status()["guests"]
                                                     if g["name"] in ("media", "build")])
        time.sleep(1)
        media.close()   # its mappings and the device fd: an mdev waits for every user to let go
        build.close()
        remove_mdev(media_uuid)
        remove_mdev(build_uuid)


def test_a_launched_vgpu_guest_gets_the_seats_keys_through_its_own_keyboard(lab, host):
    """The VMM directflip launched reads the VM's keyboard from the uinput device directflip made for
    it ({keyboard}), as QEMU's input-linux would; the lab keyboard's keys reach it while its monitor
    has the focus, and directflip never takes its own device as seat input."""
    from evdev import ecodes

    lab.office.mode(640, 480)
    lab.office.draw("office", 7)
    shown(lab, "wb", "office")
    st = lab.status()["input"]
    names = [d.get("name") for d in st["devices"]]
    assert "directflip office keyboard" not in names, st["devices"]
    ignored = [d for d in st["devices"] if d.get("ignored") == "directflip's own device for a guest's VM"]
    assert len(ignored) == 2, st["devices"]
    request(lab.control, {"cmd": "focus", "monitor": "wb"})
    before = len(lab.office.keys())
    host.keys("k")
    def read() -> list | None:
        keys = lab.office.keys()[before:]
        return keys if (ecodes.KEY_K, 0) in keys else None

    got = wait_for("KEY_K in the VM's keyboard", read)
    print("the VM's keyboard read:", got)
    assert got == [(ecodes.KEY_K, 1), (ecodes.KEY_K, 0)]
    # mbochs draws no cursor: its cursor plane answers as a disabled plane (or is refused)
    office = next(g for g in lab.status()["guests"] if g["name"] == "office")
    print("office's cursor plane:", office["cursor"])
    assert office["cursor"] == "off" or "refused" in office["cursor"] or "not an ARGB8888" in office["cursor"]



def test_a_launched_vmm_outlives_a_killed_compositor_and_is_shown_again(lab, tmp_path):
    """`launch:` starts the VMM in a session of its own and records it; SIGKILL of the compositor leaves
    it running, and the next compositor takes the vGPU's device fd back from it (pidfd_getfd) and shows
    the guest again, without starting another VMM."""
    lab.office.mode(640, 480)
    lab.office.draw("office", 3)
    shown(lab, "wb", "office")
    rec = lab.vmms()["office"]
    assert lab.status()["launched"]["office"]["running"] is True
    lab.proc.kill()
    lab.proc.wait(timeout=30)
    time.sleep(1)
    assert Path(f"/proc/{rec['pid']}").exists(), "the VMM went with the compositor"
    lab.launch(append=True)
    serving = wait_for("the restarted compositor answering", lambda: lab.answers() and time.monotonic(),
                       timeout=120)
    out = shown(lab, "wb", "office")
    back = time.monotonic() - serving
    vmm = lab.status()["launched"]["office"]
    print(f"office back on wb {back:.2f} s after the new compositor answered (goal 2 s); VMM pid "
          f"{rec['pid']} kept; {vmm}; {out['path']}")
    assert vmm["pid"] == rec["pid"] and vmm["running"] and vmm["attached"], vmm
    lab.office.draw("office", 9)   # the same VMM's next frame reaches the screen, pixel-exact
    whole("frame 9 of the kept VMM in the writeback", lambda: lab.capture("wb", tmp_path / "k.png"),
          "office", 9, 640, 480)
