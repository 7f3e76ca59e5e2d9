"""The KMS layer on real drivers (virtio-gpu, vkms, vgem), checked by reading the pixels back: QEMU's
screendump of each virtio-gpu head from outside the VM, and vkms writeback inside it."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from compositor import _native
from compositor.formats import XRGB8888
from compositor.kms import Card, Rejected
from compositor.kms.atomic import AtomicRequest
from compositor.kms.writeback import add_writeback
from directflip_tools.patterns import PatternHead, light_patterns, mismatch, pattern, read_xrgb

HEAD_MODES = ["1024x768", "800x600", "640x480"]   # the lab plugs each head at one size: a swap shows


def directflip(*args: str) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "directflip")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "compositor.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


def assert_screen(host, head: int, expected: np.ndarray) -> None:
    problem = mismatch(host.screendump(head), expected)
    assert problem is None, f"head {head}: {problem}"


@pytest.fixture
def virtio(cards):
    with Card(cards["virtio_gpu"]) as card:
        card.become_master()
        yield card
        card.drop_master()


@pytest.fixture
def three_heads(virtio, host):
    specs = [(f"Virtual-{i + 1}", HEAD_MODES[i], i) for i in range(3)]
    for conn in virtio.connectors:
        assert conn.status == "connected", f"{conn.name} is {conn.status}: the lab should plug all heads"
    heads, expected, count = light_patterns(virtio, specs)
    assert count == 3 * len(specs) + 10 * len(specs)
    return heads, expected


# ------------------------------------------------------------------------------------ acceptance 1

def test_probe_json_lists_virtio_connectors_and_vkms_planes(cards):
    result = directflip("probe", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema"] == "directflip.probe/1"
    by_driver = {c["driver"]: c for c in doc["cards"]}
    virtio = by_driver["virtio_gpu"]
    assert [c["name"] for c in virtio["connectors"]] == ["Virtual-1", "Virtual-2", "Virtual-3"]
    assert len(virtio["crtcs"]) == 3
    assert sorted(p["type"] for p in virtio["planes"]) == ["cursor"] * 3 + ["primary"] * 3
    assert all(p["formats"] for p in virtio["planes"])
    edid = virtio["connectors"][0]["edid"]
    assert edid and len(edid["manufacturer"]) == 3
    vkms = by_driver["vkms"]
    types = [p["type"] for p in vkms["planes"]]
    assert len(types) == 10 and types.count("overlay") == 8 and types.count("cursor") == 1
    assert vkms["caps"]["writeback"] is True
    assert "Writeback" in [c["type"] for c in vkms["connectors"]]
    assert "error" in by_driver["vgem"], "vgem has no KMS: probe must say so, not fail"
    # The table form names the same things.
    table = directflip("probe")
    assert table.returncode == 0
    assert "Virtual-3" in table.stdout and "overlay" in table.stdout


# ------------------------------------------------------------------------------------ acceptance 2

def test_one_commit_lights_three_heads_pixel_exact(three_heads, host):
    heads, expected = three_heads
    for i in range(3):
        assert_screen(host, i, expected[i])
    # Each head's CRTC now reports the mode we set.
    for head in heads:
        head.crtc.refresh()
        assert head.crtc.mode.width == head.mode.width and head.crtc.active


# ------------------------------------------------------------------------------------ acceptance 3

def test_nonblocking_flip_event_through_asyncio(three_heads, virtio, host):
    heads, expected = three_heads
    head = heads[0]
    fb, new_rgb = head.framebuffer(7)
    fb2, rgb2 = head.framebuffer(5)

    async def flip_twice():
        virtio.attach()
        try:
            # Python path: AtomicRequest, NONBLOCK | PAGE_FLIP_EVENT, event through the loop.
            fut = virtio.expect_flip(head.crtc.id)
            AtomicRequest(virtio).add(head.plane, "FB_ID", fb).commit(nonblock=True, event=True,
                                                                      user_data=4242)
            ev1 = await asyncio.wait_for(fut, 5)
            # Native hot path: the same flip through kms_helpers.c.
            fut = virtio.expect_flip(head.crtc.id)
            ret = _native.lib.kms_flip(virtio.fd, head.plane.id, head.plane.prop("FB_ID").id, fb2.id, 99)
            assert ret == 0, os.strerror(-ret)
            ev2 = await asyncio.wait_for(fut, 5)
            return ev1, ev2
        finally:
            virtio.detach()

    ev1, ev2 = asyncio.run(flip_twice())
    assert (ev1.crtc_id, ev1.user_data) == (head.crtc.id, 4242)
    assert (ev2.crtc_id, ev2.user_data) == (head.crtc.id, 99)
    assert ev2.timestamp_ns >= ev1.timestamp_ns > 0
    assert_screen(host, 0, rgb2)
    # The other heads were not touched.
    assert_screen(host, 1, expected[1])


# ------------------------------------------------------------------------------------ acceptance 4

def test_refused_test_only_commit_changes_nothing(three_heads, virtio, host):
    heads, expected = three_heads
    head = heads[1]
    fb, _ = head.framebuffer(3)
    w, h = head.mode.width, head.mode.height
    # virtio-gpu's primary plane cannot be positioned or scaled: it must cover the whole CRTC.
    req = AtomicRequest(virtio).add_plane(head.plane, head.crtc, fb, src=(0, 0, w // 2, h // 2),
                                    dst=(100, 100, w // 2, h // 2))
    with pytest.raises(Rejected) as info:
        req.test()
    assert info.value.errno in (errno.EINVAL, errno.ERANGE)
    assert "TEST_ONLY" in str(info.value)
    for i in range(3):
        assert_screen(host, i, expected[i])


def test_unknown_property_fails_at_commit_not_at_add(virtio):
    plane = virtio.planes[0]
    req = AtomicRequest(virtio).add(plane, "NO_SUCH_PROP", 1).add(plane, "FB_ID", 0)
    assert len(req) == 0, "adds after the first failure are no-ops"
    with pytest.raises(Exception, match="has no property 'NO_SUCH_PROP'"):
        req.commit()


# ------------------------------------------------------------------------------------ acceptance 5

def test_prime_self_import_gives_the_same_handle(virtio):
    buf = virtio.create_dumb(64, 64)
    fd = virtio.export_dmabuf(buf.handle)
    try:
        assert virtio.import_dmabuf(fd) == buf.handle
    finally:
        os.close(fd)
        buf.destroy()


def test_vgem_buffer_into_virtio_is_refused_with_the_cause(virtio, cards):
    with Card(cards["vgem"], kms=False) as vgem:
        buf = vgem.create_dumb(64, 64)
        fd = vgem.export_dmabuf(buf.handle)
        try:
            with pytest.raises(Rejected) as info:
                virtio.import_dmabuf(fd)
        finally:
            os.close(fd)
            buf.destroy()
    assert info.value.errno == errno.ENODEV
    assert "virtio_gpu cannot import a buffer exported by another device" in str(info.value)


# ------------------------------------------------------------------------------------ acceptance 6

def test_vkms_writeback_reads_back_the_committed_pattern(cards):
    with Card(cards["vkms"], writeback=True) as card:
        card.become_master()
        crtc = card.crtcs[0]
        # Connector numbers are global: vkms' virtual connector follows virtio-gpu's three.
        monitor = next(c for c in card.connectors if c.type_name == "Virtual")
        wb = next(c for c in card.connectors if c.is_writeback)
        head = PatternHead(card, monitor.name, crtc, "800x600")
        fb, _ = head.framebuffer(2)
        img = pattern(800, 600, 2)
        out = card.create_dumb(800, 600)
        out.map()[:] = b"\0" * out.size
        out_fb = card.dumb_framebuffer(out, XRGB8888)
        req = AtomicRequest(card).add_output(monitor, crtc, head.mode).add_plane(head.plane, crtc, fb)
        job = add_writeback(req, wb, crtc, out_fb)
        req.commit(allow_modeset=True)
        job.wait(timeout=5)
        got = read_xrgb(out.map(), 800, 600, out.pitch)
        problem = mismatch(got, img)
        assert problem is None, f"writeback: {problem}"


# ------------------------------------------------------------------------------------ acceptance 7

def test_host_plug_gives_uevent_and_probe_shows_new_mode(host):
    import pyudev

    ctx = pyudev.Context()
    monitor = pyudev.Monitor.from_netlink(ctx, source="kernel")
    monitor.filter_by("drm")
    monitor.start()

    def hotplug_event(timeout=10.0):
        while True:
            dev = monitor.poll(timeout=timeout)
            assert dev is not None, "no drm uevent within the timeout"
            if dev.action == "change" and dev.properties.get("HOTPLUG") == "1":
                return dev

    host.unplug(1)
    hotplug_event()
    doc = json.loads(directflip("probe", "--json", "--device", "/dev/dri/card0").stdout)
    assert doc["cards"][0]["connectors"][1]["status"] == "disconnected"

    host.plug(1, 832, 624)
    dev = hotplug_event()
    assert dev.sys_name.startswith("card")
    doc = json.loads(directflip("probe", "--json", "--device", "/dev/dri/card0").stdout)
    conn = doc["cards"][0]["connectors"][1]
    assert conn["name"] == "Virtual-2" and conn["status"] == "connected"
    assert (conn["preferred_mode"]["width"], conn["preferred_mode"]["height"]) == (832, 624)
    host.plug(1, 800, 600)   # leave the head as the lab plugged it at boot
    hotplug_event()
