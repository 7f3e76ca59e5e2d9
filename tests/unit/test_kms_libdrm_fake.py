"""tests/fakes/libdrm.py catches what a KMS bug would do: unknown ids, properties an object lacks,
blobs and framebuffers used after they are gone, handles and structs freed twice, calls on a closed
card, and whatever is left allocated. The KMS tests are only as good as these refusals."""

from __future__ import annotations

import errno
import re

import pytest
from fakes import libdrm

from compositor.formats import XRGB8888
from compositor.kms import Card, Rejected
from compositor.kms import card as card_module
from compositor.kms.atomic import TEST_ONLY, AtomicRequest
from compositor.kms.drm import ffi


def commit(card: Card, obj_id: int, prop_id: int, value: int, flags: int = TEST_ONLY) -> int:
    """One property straight through the (fake) library, as no KMS code would send it."""
    return int(card_module.lib.kms_atomic_commit(card.fd, 1, [obj_id], [prop_id], [value], flags, 0))


def test_every_kms_module_calls_the_fake(drm: libdrm.FakeDevice) -> None:
    import compositor.kms.atomic
    import compositor.kms.drm

    for module in (card_module, compositor.kms.atomic, compositor.kms.drm):
        assert isinstance(module.lib, libdrm.FakeLib), module.__name__
    with pytest.raises(AttributeError, match="the fake libdrm has no drmModeSetCrtc"):
        card_module.lib.drmModeSetCrtc   # noqa: B018


def test_a_property_the_object_does_not_have_is_a_violation(drm: libdrm.FakeDevice, card: Card) -> None:
    assert commit(card, drm.crtc.id, drm.prop_id("FB_ID"), 0) == -errno.ENOENT
    assert drm.take_violations() == [f"atomic commit sets property {drm.prop_id('FB_ID')} (FB_ID) of crtc "
                                     f"{drm.crtc.id}, which has no such property"]
    assert commit(card, drm.crtc.id, 9999, 0) == -errno.ENOENT
    assert "property 9999 (unknown)" in drm.take_violations()[0]


def test_an_unknown_object_is_a_violation(drm: libdrm.FakeDevice, card: Card) -> None:
    assert commit(card, 9999, drm.prop_id("FB_ID"), 0) == -errno.ENOENT
    assert drm.take_violations() == ["atomic commit names object 9999, which does not exist"]
    assert card_module.lib.drmModeGetPlane(card.fd, drm.crtc.id) == ffi.NULL
    assert ffi.errno == errno.ENOENT
    assert drm.take_violations() == [f"drmModeGetPlane: no object {drm.crtc.id} of type 0x"
                                     f"{card_module.lib.DRM_MODE_OBJECT_PLANE:x}"]


def test_an_immutable_property_is_a_violation(drm: libdrm.FakeDevice, card: Card) -> None:
    assert commit(card, drm.primary.id, drm.prop_id("type"), 0) == -errno.EINVAL
    assert drm.take_violations() == [f"atomic commit sets immutable type of plane {drm.primary.id}"]


def test_a_blob_used_after_it_was_destroyed_is_a_violation(drm: libdrm.FakeDevice, card: Card) -> None:
    req = AtomicRequest(card).add(card.crtcs[0], "MODE_ID", card.connectors[0].modes[0])
    (blob,) = drm.client_blobs
    req.discard()
    flags = card_module.lib.DRM_MODE_ATOMIC_ALLOW_MODESET
    assert commit(card, drm.crtc.id, drm.prop_id("MODE_ID"), blob, flags) == -errno.EINVAL
    assert card_module.lib.drmModeDestroyPropertyBlob(card.fd, blob) == -errno.EINVAL
    assert drm.take_violations() == [
        f"atomic commit: MODE_ID = {blob}: blob {blob} used after it was destroyed",
        f"drmModeDestroyPropertyBlob: blob {blob} used after it was destroyed"]
    assert drm.crtc.values["MODE_ID"] == 0


def test_destroying_a_blob_of_the_driver_is_a_violation(drm: libdrm.FakeDevice, card: Card) -> None:
    edid = drm.connector.values["EDID"]
    assert card_module.lib.drmModeDestroyPropertyBlob(card.fd, edid) == -errno.EPERM
    assert drm.take_violations() == [f"drmModeDestroyPropertyBlob: blob {edid} is the driver's"]


def test_a_framebuffer_used_after_rmfb_is_a_violation(drm: libdrm.FakeDevice, card: Card) -> None:
    buf = card.create_dumb(64, 32)
    fb = card.dumb_framebuffer(buf, XRGB8888)
    fb_id = fb.id
    fb.remove()
    with pytest.raises(Rejected):
        AtomicRequest(card).add(card.planes[0], "FB_ID", fb_id).test()
    assert card_module.lib.drmModeRmFB(card.fd, fb_id) == -errno.EINVAL
    assert drm.take_violations() == [f"atomic commit: FB_ID = {fb_id}: framebuffer {fb_id} used after RmFB",
                                     f"drmModeRmFB: framebuffer {fb_id} used after RmFB"]
    buf.destroy()


def test_removing_a_framebuffer_on_screen_is_a_violation(drm: libdrm.FakeDevice, card: Card) -> None:
    conn, crtc, plane = card.connectors[0], card.crtcs[0], card.planes[0]
    buf = card.create_dumb(1024, 768)
    fb = card.dumb_framebuffer(buf, XRGB8888)
    req = AtomicRequest(card).add_output(conn, crtc, conn.modes[0]).add_plane(plane, crtc, fb)
    req.commit(allow_modeset=True)
    fb_id = fb.id
    fb.remove()
    assert drm.take_violations() == [f"RmFB of framebuffer {fb_id} while plane(s) [{plane.id}] show it "
                                     f"(the kernel turns them off)"]
    drm.primary.values.update(FB_ID=0, CRTC_ID=0)   # what the kernel does then
    buf.destroy()


def test_a_handle_closed_twice_and_a_struct_freed_twice_are_violations(drm: libdrm.FakeDevice,
                                                                       card: Card) -> None:
    buf = card.create_dumb(64, 32)
    handle = buf.handle
    buf.destroy()
    assert card_module.lib.drmModeDestroyDumbBuffer(card.fd, handle) == -errno.EINVAL
    crtc = card_module.lib.drmModeGetCrtc(card.fd, drm.crtc.id)
    card_module.lib.drmModeFreeCrtc(crtc)
    card_module.lib.drmModeFreeCrtc(crtc)
    plane = card_module.lib.drmModeGetPlane(card.fd, drm.primary.id)
    card_module.lib.drmModeFreeCrtc(plane)
    violations = drm.take_violations()
    assert violations[0] == f"drmModeDestroyDumbBuffer: handle {handle} closed again, but it is not open"
    assert re.fullmatch(r"drmModeCrtc at 0x[0-9a-f]+ freed, but it is not one handed out \(or it was freed "
                        r"already\)", violations[1])
    assert violations[2] == "a drmModePlane freed as a drmModeCrtc"


def test_test_only_changes_nothing_and_takes_no_event(drm: libdrm.FakeDevice, card: Card) -> None:
    lib = card_module.lib
    flags = TEST_ONLY | lib.DRM_MODE_ATOMIC_ALLOW_MODESET
    assert commit(card, drm.crtc.id, drm.prop_id("ACTIVE"), 0, flags) == 0
    assert commit(card, drm.connector.id, drm.prop_id("DPMS"), 3, 0) == 0
    assert drm.connector.values["DPMS"] == 3
    assert commit(card, drm.connector.id, drm.prop_id("DPMS"), 0, TEST_ONLY) == 0
    assert drm.connector.values["DPMS"] == 3
    assert commit(card, drm.crtc.id, drm.prop_id("ACTIVE"), 0, TEST_ONLY | lib.DRM_MODE_PAGE_FLIP_EVENT) \
        == -errno.EINVAL
    assert drm.take_violations() == ["TEST_ONLY commit asking for a flip event"]
    assert [c.test_only for c in drm.commits] == [True, False, True, True]


def test_a_modeset_without_allow_modeset_is_refused(drm: libdrm.FakeDevice, card: Card) -> None:
    blob = AtomicRequest(card).add(card.crtcs[0], "MODE_ID", card.connectors[0].modes[0])
    (blob_id,) = drm.client_blobs
    assert commit(card, drm.crtc.id, drm.prop_id("MODE_ID"), blob_id) == -errno.EINVAL
    assert drm.violations == []
    blob.discard()


def test_a_call_on_the_closed_card_is_a_violation(drm: libdrm.FakeDevice) -> None:
    card = drm.open_card()
    fd = card.fd
    card.close()
    assert card_module.lib.drmModeGetCrtc(fd, drm.crtc.id) == ffi.NULL
    assert ffi.errno == errno.EBADF
    assert drm.take_violations() == [f"call on descriptor {fd}, which is not the card's open descriptor"]


def test_what_is_left_allocated_fails_the_test(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AssertionError) as failed, libdrm.installed(monkeypatch) as drm:
        card = drm.open_card()
        buf = card.create_dumb(64, 32)
        fb = card.dumb_framebuffer(buf, XRGB8888)
        AtomicRequest(card).add(card.crtcs[0], "MODE_ID", card.connectors[0].modes[0])
        card_module.lib.drmModeGetCrtc(card.fd, drm.crtc.id)
    (blob,) = drm.client_blobs
    lines = str(failed.value).splitlines()
    assert lines[:2] == ["libdrm misused:", "  the test left the card open"]
    assert re.fullmatch(r"  drmModeCrtc at 0x[0-9a-f]+ never freed", lines[2])
    assert lines[3:] == [f"  property blob {blob} never destroyed", f"  framebuffer {fb.id} never removed",
                         f"  GEM handle {buf.handle} (dumb) never closed"]
