"""The data plane polling a vGPU (dp_vgpu_add): bench/fakedrm.c's fake mediated device answers the
VFIO plane queries (a file holds its answer), the card is the data plane's own fake (a pipe its fake
kernel writes flip events into). The C side runs in a child process with the fake preloaded (after
the sanitizer runtimes, when test_sanitized runs this with them).

What the data plane must do: flip a known dma-buf of the same layout itself, do nothing while the
same one stays on the plane, and hand anything else to Python (DP_EV_DATA) and stop polling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from fakedrm import FakeVgpu, build  # noqa: E402

CHILD = r"""
import os, select, sys, time
from native_override import load
load()
from compositor.dataplane import DATA, DataPlane
from fakedrm import FakeVgpu

XR24, W, H = 0x34325258, 64, 32
vgpu = FakeVgpu(os.path.dirname(os.environ["FAKEDRM_VGPU"]), W, H, made=True)
DEADLINE = 10.0

dp = DataPlane()
dp.start()
r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
card = dp.add_card(r, fake_write_fd=w, fake_delay_ns=1_000_000)
out = dp.add_output(card, 40, 31, 20)
device = os.open(vgpu.path, os.O_RDWR | os.O_CLOEXEC)
cursor = sys.argv[1] == "cursor"
conn = dp.add_vgpu(device, 5_000_000, cursor)
handles = {}
for ident, fb in ((1, 101), (2, 102), (3, 103)):
    handles[ident] = h = dp.add_buffer(conn, ident, 1)
    dp.set_fb(h, out, fb)
    dp.buffer_plane(h, XR24, 0, W, H, W * 4)
seen = []

def wait(what, cond):
    deadline = time.monotonic() + DEADLINE
    while not cond():
        st = dp.stats(out)
        assert time.monotonic() < deadline, (f"{what}: events {seen}; on screen {st.on_screen_buffer}, "
                                             f"{st.commits} commits, {st.errors} errors")
        select.select([dp], [], [], 0.01)
        seen.extend(dp.events())

def handed_back():
    return any(e.kind == DATA and e.handle == conn for e in seen)

def on_screen(ident):
    return dp.stats(out).on_screen_buffer == ident

# The first frame is Python's, as the daemon does it; then the data plane polls.
vgpu.show(1)
dp.show(out, conn)
assert dp.conn_show(conn) == 1
dp.flip(conn, handles[1], 0, time.monotonic_ns())
dp.resume(conn, True)
assert dp.send(conn, b"never sent", drained=False) == 0   # a vGPU is told nothing
if cursor:   # the cursor plane's first answer is news to Python: once
    wait("the first cursor answer handed back", handed_back)
    seen.clear()
    dp.resume(conn, True)
for ident in (2, 3, 1, 2):
    vgpu.show(ident)
    wait(f"dma-buf {ident} on screen", lambda: on_screen(ident))
commits, queries = dp.stats(out).commits, vgpu.queries()
time.sleep(0.1)
assert dp.stats(out).commits == commits, "the same dma-buf was committed again"
assert vgpu.queries() >= queries + 5, (queries, vgpu.queries())
assert dp.flips(conn) == 4 and not seen, (dp.flips(conn), seen)

def back(what, change, restore=lambda: vgpu.show(3)):
    # `change` hands the vGPU back to Python, which polls no more here until it resumes (after
    # `restore`: what Python would have made of it)
    seen.clear()
    change()
    wait(what, handed_back)
    q = vgpu.queries()
    time.sleep(0.05)
    assert vgpu.queries() == q, f"{what}: still polled while Python has it"
    restore()
    dp.resume(conn, True)

def off():
    fd = os.open(vgpu.path, os.O_WRONLY)
    os.pwrite(fd, bytes(64), 0)
    os.close(fd)

def other_layout():
    vgpu.width = W // 2
    vgpu.show(1)
    vgpu.width = W

def cursor_moved():
    answer = bytearray(64)
    answer[12:16] = XR24.to_bytes(4, "little")
    answer[36:40] = (5).to_bytes(4, "little")   # x_pos
    fd = os.open(vgpu.path, os.O_WRONLY)
    os.pwrite(fd, bytes(answer), 64)
    os.close(fd)

back("an unknown dma-buf", lambda: vgpu.show(9))
wait("dma-buf 3", lambda: on_screen(3))
vgpu.show(2)
wait("dma-buf 2", lambda: on_screen(2))
back("a known dma-buf in another layout", other_layout)
wait("dma-buf 3", lambda: on_screen(3))
back("the display off", off)
if cursor:
    vgpu.show(2)
    wait("dma-buf 2", lambda: on_screen(2))
    back("the cursor plane changed", cursor_moved)
    wait("dma-buf 3", lambda: on_screen(3))
vgpu.show(2)
wait("dma-buf 2", lambda: on_screen(2))
held = dp.release_output(out)
back("no output shown from here", lambda: None, lambda: None)
for h in (held.on_screen, held.in_flight, held.pending):
    if h >= 0:
        dp.release(h)
dp.remove_conn(conn)
dp.close()
print("vgpu data plane ok")
"""


@pytest.fixture(scope="module")
def fakedrm(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("fakedrm"))


@pytest.mark.parametrize("cursor", ["cursor", "no-cursor"])
def test_the_data_plane_polls_a_vgpu_and_hands_back_what_it_cannot_show(fakedrm, tmp_path, cursor):
    vgpu = FakeVgpu(tmp_path, 64, 32)
    preload = f"{os.environ.get('LD_PRELOAD', '')} {fakedrm}".strip()   # sanitizer runtimes first
    env = {**os.environ, "LD_PRELOAD": preload, "FAKEDRM_VGPU": str(vgpu.path),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "unit"), str(ROOT / "bench")])}
    proc = subprocess.run([sys.executable, "-c", CHILD, cursor], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    print(proc.stdout, proc.stderr[-2000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "vgpu data plane ok" in proc.stdout
