"""compositor.kms.card at the libdrm boundary, on tests/fakes/libdrm.py's device: what the Card reads
and frees, which AddFB2 call each modifier takes, how errno becomes an exception, PRIME handles,
dumb buffers, events through the card's (real) descriptor, and closing it."""

from __future__ import annotations

import errno
import os

import pytest
from fakes import libdrm

from compositor.formats import DRM_FORMAT_MOD_INVALID, DRM_FORMAT_MOD_LINEAR, XRGB8888
from compositor.kms import Busy, Card, DeviceError, KmsBug, NotMaster, Rejected, Retry
from compositor.kms.drm import lib

X_TILED = libdrm.I915_X_TILED


# ------------------------------------------------------------------------------------ reading state

def test_the_card_reads_every_object_and_frees_every_struct(drm: libdrm.FakeDevice, card: Card) -> None:
    assert card.driver == "fakedrm" and card.has_atomic
    (conn,) = card.connectors
    assert (conn.id, conn.name, conn.status, conn.mm_size) == (drm.connector.id, "Virtual-1", "connected",
                                                               (300, 200))
    assert [m.name for m in conn.modes] == ["1024x768", "800x600"]
    assert conn.preferred_mode is not None and conn.preferred_mode.name == "1024x768"
    assert conn.preferred_mode.htotal == 1344 and conn.preferred_mode.vtotal == 806
    assert conn.edid is not None and conn.edid.name == "Fake Monitor"
    assert conn.link_status == "good"
    (crtc,) = card.crtcs
    assert crtc.id == drm.crtc.id and crtc.mode is None and not crtc.active
    assert conn.possible_crtcs == [crtc] and conn.crtc is None
    primary, overlay = card.planes
    assert (primary.id, primary.type, overlay.id, overlay.type) == (drm.primary.id, "primary",
                                                                    drm.overlay.id, "overlay")
    assert primary.formats == libdrm.PRIMARY_FORMATS
    assert primary.supports(XRGB8888, X_TILED) and not overlay.supports(XRGB8888, X_TILED)
    assert overlay.zpos == {"min": 0, "max": 3, "value": 1, "immutable": False}
    assert primary.zpos is None
    assert card.planes_for(crtc, "overlay") == [overlay]
    assert drm.structs() == []
    assert len(drm.calls_to("drmModeGetConnector")) == len(drm.calls_to("drmModeFreeConnector")) > 0


def test_property_ids_are_the_devices_and_each_is_asked_for_once(drm: libdrm.FakeDevice,
                                                                   card: Card) -> None:
    for obj, fake in ((card.connectors[0], drm.connector), (card.crtcs[0], drm.crtc),
                      (card.planes[0], drm.primary), (card.planes[1], drm.overlay)):
        assert set(obj.props) == set(fake.values)
        for name in fake.values:
            assert obj.prop(name).id == drm.prop_id(name), name
            assert obj.value(name) == fake.values[name], name
    # CRTC_ID and the plane properties are shared between objects: the Card caches them by id.
    asked = [args[1] for args in drm.calls_to("drmModeGetProperty")]
    assert sorted(asked) == sorted(set(asked)) == sorted(drm.properties)


def test_property_kinds_and_values(card: Card) -> None:
    plane = card.planes[0]
    kinds = {name: plane.prop(name).kind for name in ("FB_ID", "SRC_W", "CRTC_X", "type", "IN_FORMATS")}
    assert kinds == {"FB_ID": "object", "SRC_W": "range", "CRTC_X": "signed_range", "type": "enum",
                     "IN_FORMATS": "blob"}
    assert plane.prop("type").immutable and not plane.prop("FB_ID").immutable
    assert plane.prop("type").describe(1) == "Primary"
    assert plane.prop("CRTC_X").describe((1 << 64) - 5) == "-5"
    assert plane.prop("CRTC_X").encode(-5) == (1 << 64) - 5
    assert card.connectors[0].prop("DPMS").encode("Off") == 3
    with pytest.raises(ValueError, match="DPMS has no value 'Sideways'"):
        card.connectors[0].prop("DPMS").encode("Sideways")


def test_an_unknown_property_name_says_what_the_object_has(card: Card) -> None:
    with pytest.raises(KeyError, match=r"crtc \d+ on fakedrm has no property 'GAMMA_LUT' \(it has ACTIVE, "
                                       r"MODE_ID\)"):
        card.crtcs[0].prop("GAMMA_LUT")


def test_refreshing_properties_rereads_values_not_metadata(drm: libdrm.FakeDevice, card: Card) -> None:
    overlay = card.planes[1]
    asked = len(drm.calls_to("drmModeGetProperty"))
    drm.overlay.values["zpos"] = 2
    overlay.refresh_props()
    assert overlay.values["zpos"] == 2
    assert len(drm.calls_to("drmModeGetProperty")) == asked


# ------------------------------------------------------------------------------------- framebuffers

ADDFB_CASES = [
    # modifier asked for, ADDFB2_MODIFIERS cap, the call made, the modifier the kernel got, Framebuffer's
    (None, 1, "drmModeAddFB2", None, DRM_FORMAT_MOD_INVALID),
    (DRM_FORMAT_MOD_INVALID, 1, "drmModeAddFB2", None, DRM_FORMAT_MOD_INVALID),
    (DRM_FORMAT_MOD_LINEAR, 1, "drmModeAddFB2WithModifiers", DRM_FORMAT_MOD_LINEAR, DRM_FORMAT_MOD_LINEAR),
    (DRM_FORMAT_MOD_LINEAR, 0, "drmModeAddFB2", None, DRM_FORMAT_MOD_INVALID),
    (DRM_FORMAT_MOD_INVALID, 0, "drmModeAddFB2", None, DRM_FORMAT_MOD_INVALID),
    (X_TILED, 1, "drmModeAddFB2WithModifiers", X_TILED, X_TILED),
]


@pytest.mark.parametrize(("modifier", "cap", "call", "sent", "kept"), ADDFB_CASES)
def test_addfb2_with_and_without_modifiers(drm: libdrm.FakeDevice, card: Card, modifier: int | None,
                                           cap: int, call: str, sent: int | None, kept: int) -> None:
    drm.caps[lib.DRM_CAP_ADDFB2_MODIFIERS] = cap
    buf = card.create_dumb(64, 32)
    fb = card.add_framebuffer(64, 32, XRGB8888, [buf.handle], [buf.pitch], [0], modifier)
    other = ({"drmModeAddFB2", "drmModeAddFB2WithModifiers"} - {call}).pop()
    assert drm.calls_to(other) == []
    (args,) = drm.calls_to(call)
    assert list(args[4]) == [buf.handle, 0, 0, 0] and list(args[5]) == [buf.pitch, 0, 0, 0]
    if call == "drmModeAddFB2":
        assert args[8] == 0
    else:
        assert list(args[7]) == [modifier, 0, 0, 0] and args[9] == lib.DRM_MODE_FB_MODIFIERS
    assert (fb.id, fb.width, fb.height, fb.format, fb.modifier) == (args[-2][0], 64, 32, XRGB8888, kept)
    assert drm.fbs[fb.id].modifier == sent
    fb.remove()
    fb.remove()
    assert [a[1] for a in drm.calls_to("drmModeRmFB")] == [args[-2][0]] and fb.id == 0
    assert drm.fbs == {}
    buf.destroy()


def test_a_modifier_goes_to_every_plane_that_has_a_handle(drm: libdrm.FakeDevice, card: Card) -> None:
    buf = card.create_dumb(64, 64)
    fb = card.add_framebuffer(64, 32, XRGB8888, [buf.handle, buf.handle], [buf.pitch, buf.pitch],
                              [0, buf.pitch * 32], X_TILED)
    (args,) = drm.calls_to("drmModeAddFB2WithModifiers")
    assert list(args[7]) == [X_TILED, X_TILED, 0, 0]
    fb.remove()
    buf.destroy()


def test_a_tiled_modifier_without_the_cap_is_refused_before_any_call(drm: libdrm.FakeDevice,
                                                                     card: Card) -> None:
    drm.caps[lib.DRM_CAP_ADDFB2_MODIFIERS] = 0
    buf = card.create_dumb(64, 32)
    with pytest.raises(Rejected, match="fakedrm takes no format modifiers, only linear buffers") as refused:
        card.add_framebuffer(64, 32, XRGB8888, [buf.handle], [buf.pitch], [0], X_TILED)
    assert (refused.value.op, refused.value.errno) == ("drmModeAddFB2WithModifiers", errno.EINVAL)
    assert drm.calls_to("drmModeAddFB2") == drm.calls_to("drmModeAddFB2WithModifiers") == []
    buf.destroy()


def test_a_framebuffer_the_kernel_refuses_is_rejected(drm: libdrm.FakeDevice, card: Card) -> None:
    buf = card.create_dumb(64, 32)
    with pytest.raises(Rejected, match="drmModeAddFB2 failed: EINVAL .*: 128x32 XR24"):
        card.add_framebuffer(128, 32, XRGB8888, [buf.handle], [buf.pitch])   # the pitch is too short
    assert drm.fbs == {}
    buf.destroy()


def test_a_dumb_framebuffer_is_linear(drm: libdrm.FakeDevice, card: Card) -> None:
    buf = card.create_dumb(64, 32)
    fb = card.dumb_framebuffer(buf, XRGB8888)
    assert fb.modifier == DRM_FORMAT_MOD_LINEAR and drm.fbs[fb.id].modifier == DRM_FORMAT_MOD_LINEAR
    fb.remove()
    buf.destroy()


@pytest.mark.parametrize(("answer", "raised"), [(errno.ENOSYS, None), (errno.EOPNOTSUPP, None), (0, None),
                                                (errno.EINVAL, Rejected), (errno.ENOMEM, KmsBug)])
def test_dirty_ignores_only_drivers_without_the_hook(drm: libdrm.FakeDevice, card: Card, answer: int,
                                                     raised: type[Exception] | None) -> None:
    drm.dirty_errno = answer
    buf = card.create_dumb(64, 32)
    fb = card.dumb_framebuffer(buf, XRGB8888)
    if raised is None:
        card.dirty(fb)
    else:
        with pytest.raises(raised, match=f"drmModeDirtyFB failed: {errno.errorcode[answer]}"):
            card.dirty(fb)
    assert [a[1] for a in drm.calls_to("drmModeDirtyFB")] == [fb.id]
    fb.remove()
    buf.destroy()


# ---------------------------------------------------------------------------------- errno → classes

ERRNO_CLASSES = [(errno.EINVAL, Rejected), (errno.ERANGE, Rejected), (errno.ENOSPC, Rejected),
                 (errno.EBUSY, Busy), (errno.EACCES, NotMaster), (errno.EPERM, NotMaster),
                 (errno.EINTR, Retry), (errno.EAGAIN, Retry), (errno.ENOMEM, KmsBug), (errno.EIO, KmsBug)]


@pytest.mark.parametrize(("err", "cls"), ERRNO_CLASSES)
def test_an_errno_returned_negated_becomes_its_class(drm: libdrm.FakeDevice, card: Card, err: int,
                                                     cls: type[Exception]) -> None:
    buf = card.create_dumb(64, 32)
    drm.fail("drmModeAddFB2", err)
    with pytest.raises(cls) as raised:
        card.add_framebuffer(64, 32, XRGB8888, [buf.handle], [buf.pitch])
    assert type(raised.value) is cls
    assert (raised.value.op, raised.value.errno) == ("drmModeAddFB2", err)
    assert str(raised.value).startswith(f"drmModeAddFB2 failed: {errno.errorcode[err]} ")
    buf.destroy()


@pytest.mark.parametrize(("err", "cls"), ERRNO_CLASSES)
def test_an_errno_set_by_a_drmioctl_call_becomes_its_class(drm: libdrm.FakeDevice, card: Card, err: int,
                                                            cls: type[Exception]) -> None:
    buf = card.create_dumb(64, 32)
    drm.fail("drmCloseBufferHandle", err)
    with pytest.raises(cls) as raised:
        card.close_handle(buf.handle)
    assert type(raised.value) is cls and raised.value.errno == err
    assert raised.value.op == "drmCloseBufferHandle"
    buf.destroy()


def test_a_drmioctl_failure_without_errno_is_eio(drm: libdrm.FakeDevice, card: Card) -> None:
    buf = card.create_dumb(64, 32)
    drm.fail("drmCloseBufferHandle", 0)
    with pytest.raises(KmsBug) as raised:
        card.close_handle(buf.handle)
    assert raised.value.errno == errno.EIO
    buf.destroy()


@pytest.mark.parametrize(("err", "seen"), [(errno.ENODEV, errno.ENODEV), (0, errno.ENOENT)])
def test_a_getter_that_returns_null_raises_with_its_errno(drm: libdrm.FakeDevice, card: Card, err: int,
                                                          seen: int) -> None:
    drm.fail("drmModeGetCrtc", err)
    with pytest.raises(KmsBug) as raised:
        card.crtcs[0].refresh()
    assert (raised.value.op, raised.value.errno) == ("drmModeGetCrtc", seen)
    assert f"CRTC {card.crtcs[0].id}" in str(raised.value)


def test_master_is_taken_and_dropped(drm: libdrm.FakeDevice, card: Card) -> None:
    assert card.is_master
    card.become_master()
    assert drm.calls_to("drmSetMaster") == []
    card.drop_master()
    assert not card.is_master and not drm.master
    card.drop_master()
    assert len(drm.calls_to("drmDropMaster")) == 1
    card.become_master()
    assert card.is_master and len(drm.calls_to("drmSetMaster")) == 1


def test_master_held_elsewhere_is_not_master(drm: libdrm.FakeDevice, card: Card) -> None:
    card.drop_master()
    drm.master_elsewhere = True
    with pytest.raises(NotMaster, match="another process .* is DRM master") as raised:
        card.become_master()
    assert (raised.value.op, raised.value.errno) == ("drmSetMaster", errno.EBUSY)


def test_caps_come_from_the_device(drm: libdrm.FakeDevice, card: Card) -> None:
    drm.caps[lib.DRM_CAP_PRIME] = lib.DRM_PRIME_CAP_IMPORT
    del drm.caps[lib.DRM_CAP_CURSOR_WIDTH]
    caps = card.caps
    assert caps["prime_import"] and not caps["prime_export"]
    assert caps["cursor_width"] == 0 and caps["cursor_height"] == 64
    assert caps["addfb2_modifiers"] and caps["dumb_buffer"] and not caps["writeback"]


# --------------------------------------------------------------------------------- buffers and PRIME

def test_a_dumb_buffer_is_created_and_destroyed_once(drm: libdrm.FakeDevice, card: Card) -> None:
    buf = card.create_dumb(100, 10)
    assert (buf.width, buf.height, buf.bpp, buf.pitch, buf.size) == (100, 10, 32, 448, 4480)
    assert drm.handles[buf.handle].origin == "dumb"
    handle = buf.handle
    buf.destroy()
    buf.destroy()
    assert [a[1] for a in drm.calls_to("drmModeDestroyDumbBuffer")] == [handle] and buf.handle == 0


def test_a_prime_import_is_closed_by_its_handle(drm: libdrm.FakeDevice, card: Card) -> None:
    dmabuf = os.memfd_create("guest-buffer")
    try:
        handle = card.import_dmabuf(dmabuf)
        assert drm.handles[handle].origin == "prime"
        ((fd, imported, _),) = drm.calls_to("drmPrimeFDToHandle")
        assert (fd, imported) == (card.fd, dmabuf)
        card.close_handle(handle)
        assert [a[1] for a in drm.calls_to("drmCloseBufferHandle")] == [handle]
        assert handle not in drm.handles
        with pytest.raises(Rejected, match=f"drmCloseBufferHandle failed: EINVAL .*handle {handle}"):
            card.close_handle(handle)
        assert drm.take_violations() == [f"drmCloseBufferHandle: handle {handle} closed again, but it "
                                         f"is not open"]
    finally:
        os.close(dmabuf)


@pytest.mark.parametrize("err", [errno.ENODEV, errno.EOPNOTSUPP])
def test_a_buffer_the_driver_cannot_import_is_rejected_with_why(drm: libdrm.FakeDevice, card: Card,
                                                                err: int) -> None:
    drm.prime_import_errno = err
    with pytest.raises(Rejected, match="fakedrm cannot import a buffer exported by another device; "
                                       "it needs a copy") as raised:
        card.import_dmabuf(7)
    assert (raised.value.op, raised.value.errno) == ("drmPrimeFDToHandle", err)


def test_an_import_failing_otherwise_is_not_a_refusal(drm: libdrm.FakeDevice, card: Card) -> None:
    fd = os.memfd_create("closed")
    os.close(fd)
    with pytest.raises(KmsBug) as raised:
        card.import_dmabuf(fd)
    assert raised.value.errno == errno.EBADF and "needs a copy" not in str(raised.value)
    assert drm.handles == {}


def test_an_export_is_a_new_descriptor_of_the_callers(drm: libdrm.FakeDevice, card: Card) -> None:
    buf = card.create_dumb(64, 32)
    fd = card.export_dmabuf(buf.handle)
    try:
        ((_, handle, flags, _),) = drm.calls_to("drmPrimeHandleToFD")
        assert (handle, flags) == (buf.handle, lib.DRM_CLOEXEC | lib.DRM_RDWR)
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)
    buf.destroy()


# ------------------------------------------------------------------------------ events and lifetime

def test_no_pending_event_reads_nothing(drm: libdrm.FakeDevice, card: Card) -> None:
    assert card.dispatch_events() == []
    assert len(drm.calls_to("kms_drain_events")) == 1
    with pytest.raises(TimeoutError, match=f"no flip event for CRTC\\(s\\) \\[{card.crtcs[0].id}\\]"):
        card.wait_events([card.crtcs[0].id], timeout=0.05)


def test_closing_the_card_closes_its_descriptor_once(drm: libdrm.FakeDevice) -> None:
    with drm.open_card() as card:
        assert drm.fd_open
    assert not drm.fd_open and card.fd == -1
    card.close()
    assert drm.leftovers() == []


def test_a_card_without_atomic_is_refused_and_its_descriptor_closed(drm: libdrm.FakeDevice) -> None:
    drm.client_caps_known.discard(lib.DRM_CLIENT_CAP_ATOMIC)
    with pytest.raises(DeviceError, match="has no atomic modesetting .*needs an atomic KMS driver"):
        drm.open_card()
    assert not drm.fd_open
    assert drm.structs() == []


def test_a_card_that_asked_for_writeback_says_whether_it_has_it(drm: libdrm.FakeDevice) -> None:
    with drm.open_card(writeback="try") as card:
        assert not card.writeback
        (args,) = [a for a in drm.calls_to("drmSetClientCap")
                   if a[1] == lib.DRM_CLIENT_CAP_WRITEBACK_CONNECTORS]
        assert args[2] == 1

