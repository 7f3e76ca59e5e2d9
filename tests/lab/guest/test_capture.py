"""`directflip capture` on every card: on virtio-gpu, which has no writeback connector, the picture
is read from the buffer the plane scans out (source "buffer": what was committed) and must equal, pixel
for pixel, QEMU's screendump of the same head taken while the frame does not change; on vkms the
writeback connector still answers (source "writeback").

One compositor serves the module. left shows a synthetic guest zero copy (its buffers on virtio-gpu),
right one whose buffers are on vgem, which virtio-gpu refuses to import, so it is copied; centre's
guest never comes, so it shows its slate, and so does wb (vkms). The guests flip a fixed number of
frames and then hold the connection without flipping, so the frame on screen stays put while the
screendumps and captures are taken.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from labkit import LAB_MONITORS, Compositor, colour_share, wait_for
from PIL import Image

from compositor.control import request
from directflip_tools.synthetic import decode_counter

POLICY = """version: 1
defaults:
  slate: {text: "no signal", colour: "#101018"}
""" + LAB_MONITORS + """guests:
  office: {kind: socket}
  media:  {kind: socket}
  vg:     {kind: socket}
  build:  {kind: socket, name: "build-*"}
placements:
  - {guest: office, monitor: left}
  - {guest: media, monitor: centre}
  - {guest: vg, monitor: right}
  - {guest: build, monitor: wb}
"""

FRAMES = 20           # each guest flips this many frames, then holds its last one
LAST = FRAMES - 1
SLATE_RGB = (0x10, 0x10, 0x18)


@pytest.fixture(scope="module")
def lab(cards, tmp_path_factory):
    comp = Compositor(tmp_path_factory.mktemp("capture"))
    comp.start(POLICY)
    # Both guests at once: each takes seconds to start under the lab's emulated CPU.
    comp.guest("--name", "office", "--on", "display", "--size", "1024x768", "--rate", "30",
               "--frames", str(FRAMES), "--hold", "600")
    comp.guest("--name", "vg", "--on", "vgem", "--size", "640x480", "--rate", "30",
               "--frames", str(FRAMES), "--hold", "600")
    yield comp
    code = comp.stop()
    print(comp.tail(15))
    assert code == 0, f"the compositor exited {code} on SIGTERM:\n{comp.tail()}"


def capture(lab: Compositor, monitor: str) -> tuple[dict, np.ndarray]:
    path = lab.dir / f"{monitor}.png"
    answer = request(lab.control, {"cmd": "capture", "monitor": monitor, "path": str(path)}, timeout=60)
    return answer, np.asarray(Image.open(path).convert("RGB"))


def same_as_the_screen(lab: Compositor, host, monitor: str, head: int) -> dict:
    """Capture `monitor` between two screendumps of `head`; the dumps must agree (the frame did not
    change meanwhile) and the capture must equal them pixel for pixel. Returns the answer."""
    before = host.screendump(head)
    answer, shot = capture(lab, monitor)
    after = host.screendump(head)
    assert np.array_equal(before, after), f"head {head} changed while {monitor} was captured"
    assert shot.shape == before.shape, f"capture {shot.shape[1::-1]}, screen {before.shape[1::-1]}"
    differ = np.any(shot != before, axis=-1)
    if differ.any():
        y, x = np.argwhere(differ)[0]
        pytest.fail(f"{monitor}: {int(differ.sum())} of {differ.size} pixels differ from the screendump "
                    f"of head {head}; the first at {x},{y}: capture {shot[y, x]}, screen {before[y, x]}")
    return answer


def test_zero_copy_guest_is_read_from_its_dmabuf(lab, host):
    out = lab.wait_shown("left", "office", timeout=180)
    assert out["path"] == "zero-copy", out
    lab.wait_frame("left", LAST, timeout=120)
    answer = same_as_the_screen(lab, host, "left", 0)
    assert (answer["source"], answer["scanout"], answer["width"], answer["height"]) == \
        ("buffer", "zero-copy", 1024, 768), answer
    assert answer["guest"] == "office" and answer["frame"]["frame"] == LAST, answer
    assert decode_counter(host.screendump(0)) == LAST
    print(f"left: capture == screendump of head 0, 1024x768, {answer}")


def test_copied_guest_is_read_from_the_copy_buffer(lab, host):
    out = lab.wait_shown("right", "vg", timeout=180)
    assert out["path"] == "copy", out
    lab.wait_frame("right", LAST, timeout=120)
    answer = same_as_the_screen(lab, host, "right", 2)
    assert (answer["source"], answer["scanout"], answer["frame"]["frame"]) == ("buffer", "copy", LAST), answer
    print(f"right: capture == screendump of head 2, 640x480, {answer}")


def test_slate_is_read_from_the_slate_buffer(lab, host):
    wait_for("centre lit with its slate", lambda: lab.output("centre")["path"] == "slate")
    answer = same_as_the_screen(lab, host, "centre", 1)
    assert (answer["source"], answer["scanout"], answer["frame"], answer["guest"]) == \
        ("buffer", "slate", None, None), answer
    assert colour_share(host.screendump(1), SLATE_RGB) > 0.5
    print(f"centre: capture == screendump of head 1, 800x600, {answer}")


def test_vkms_still_captures_through_its_writeback_connector(lab):
    wait_for("wb lit with its slate", lambda: lab.output("wb")["path"] == "slate")
    answer, shot = capture(lab, "wb")
    assert (answer["source"], answer["scanout"]) == ("writeback", "slate"), answer
    assert colour_share(shot, SLATE_RGB) > 0.5, "the writeback does not show wb's slate"
    print(f"wb: {answer}")


def test_the_cli_says_which_source_it_used(lab):
    lab.wait_frame("left", LAST, timeout=120)
    target = lab.dir / "cli-left.png"
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "compositor.cli", "capture", "--control", lab.control,
                           "left", str(target)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"left: 1024x768 written to {target} (buffer: what was committed, "
                                   f"guest office frame {LAST})"), done.stdout
    print(f"{done.stdout.strip()} ({time.monotonic() - t0:.1f} s with the CLI's start)")


@pytest.mark.parametrize("monitor, name, reason", [
    ("nowhere", "a.png", "monitor 'nowhere' is not lit: the policy has no monitor of that name"),
    ("left", "no-such-dir/a.png", "does not exist"),
])
def test_a_capture_that_cannot_be_made_says_why(lab, monitor, name, reason):
    with pytest.raises(RuntimeError, match=reason):
        request(lab.control, {"cmd": "capture", "monitor": monitor, "path": str(lab.dir / name)})
    assert lab.status()["outputs"], "the compositor still answers"
