"""compositor.kms.atomic at the libdrm boundary, on tests/fakes/libdrm.py's device: the property ids and
values a request sends, and what becomes of the mode blobs it creates — adopted by the Card after a
real commit that succeeded, kept across TEST_ONLY, destroyed when the commit fails or the request is
dropped."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fakes import libdrm

from compositor.formats import XRGB8888
from compositor.kms import Busy, Card, FlipEvent, KmsError, Mode, NotMaster, Rejected
from compositor.kms.atomic import (
    ALLOW_MODESET,
    NONBLOCK,
    PAGE_FLIP_EVENT,
    TEST_ONLY,
    AtomicRequest,
    BuildError,
    decode_flags,
)
from compositor.kms.card import DumbBuffer, Framebuffer


@dataclass
class Head:
    """The device's one output, as the Card read it, with a framebuffer to show."""

    card: Card
    buffer: DumbBuffer
    fb: Framebuffer

    @property
    def connector(self):
        return self.card.connectors[0]

    @property
    def crtc(self):
        return self.card.crtcs[0]

    @property
    def primary(self):
        return self.card.planes[0]

    @property
    def overlay(self):
        return self.card.planes[1]

    @property
    def mode(self) -> Mode:
        mode = self.connector.preferred_mode
        assert mode is not None
        return mode

    def light(self) -> AtomicRequest:
        return AtomicRequest(self.card).add_output(self.connector, self.crtc, self.mode) \
            .add_plane(self.primary, self.crtc, self.fb)


@pytest.fixture
def head(card: Card) -> Iterator[Head]:
    buf = card.create_dumb(1024, 768)
    head = Head(card, buf, card.dumb_framebuffer(buf, XRGB8888))
    yield head
    # Everything off before the framebuffer goes (removing one on screen is a violation in the fake).
    AtomicRequest(card).add_plane(head.primary, None, None).add_plane(head.overlay, None, None) \
        .add_output(head.connector, head.crtc, None).commit(allow_modeset=True)
    head.fb.remove()
    buf.destroy()


def destroyed(drm: libdrm.FakeDevice) -> list[int]:
    return [args[1] for args in drm.calls_to("drmModeDestroyPropertyBlob")]


def created(drm: libdrm.FakeDevice) -> int:
    return len(drm.calls_to("drmModeCreatePropertyBlob"))


# ------------------------------------------------------------------------- what a request sends

def test_a_modeset_sends_each_property_by_its_id(drm: libdrm.FakeDevice, head: Head) -> None:
    req = head.light()
    req.commit(allow_modeset=True)
    (commit,) = drm.commits
    (blob,) = drm.client_blobs
    conn, crtc, plane = head.connector.id, head.crtc.id, head.primary.id
    assert commit.flags == ALLOW_MODESET and commit.user_data == 0 and commit.error == 0
    assert list(commit.items) == [
        (conn, "CRTC_ID", crtc), (crtc, "MODE_ID", blob), (crtc, "ACTIVE", 1),
        (plane, "FB_ID", head.fb.id), (plane, "CRTC_ID", crtc),
        (plane, "SRC_X", 0), (plane, "SRC_Y", 0), (plane, "SRC_W", 1024 << 16), (plane, "SRC_H", 768 << 16),
        (plane, "CRTC_X", 0), (plane, "CRTC_Y", 0), (plane, "CRTC_W", 1024), (plane, "CRTC_H", 768)]
    (call,) = drm.calls_to("kms_atomic_commit")
    assert [call[3][i] for i in range(call[1])] == [drm.prop_id(name) for _, name, _ in commit.items]
    head.crtc.refresh()
    assert head.crtc.mode == head.mode and head.crtc.active
    head.connector.refresh()
    assert head.connector.crtc is head.crtc


def test_a_placed_plane_sends_fixed_point_source_and_signed_position(drm: libdrm.FakeDevice,
                                                                     head: Head) -> None:
    req = head.light().add_plane(head.overlay, head.crtc, head.fb, src=(1, 2, 30, 20), dst=(-5, 7, 60, 40))
    req.test(allow_modeset=True)
    overlay = {name: value for obj, name, value in drm.commits[0].items if obj == head.overlay.id}
    assert overlay == {"FB_ID": head.fb.id, "CRTC_ID": head.crtc.id, "SRC_X": 1 << 16, "SRC_Y": 2 << 16,
                       "SRC_W": 30 << 16, "SRC_H": 20 << 16, "CRTC_X": (1 << 64) - 5, "CRTC_Y": 7,
                       "CRTC_W": 60, "CRTC_H": 40}
    req.discard()


def test_a_flip_sends_its_flags_and_user_data_and_its_event_arrives(drm: libdrm.FakeDevice,
                                                                    head: Head) -> None:
    head.light().commit(allow_modeset=True)
    seen: list[FlipEvent] = []
    head.card.flip_handlers.append(seen.append)
    flip_request = AtomicRequest(head.card).add(head.primary, "FB_ID", head.fb)
    flip_request.commit(nonblock=True, event=True, user_data=77)
    flip = drm.commits[-1]
    assert flip.flags == NONBLOCK | PAGE_FLIP_EVENT and flip.user_data == 77
    assert flip.items == ((head.primary.id, "FB_ID", head.fb.id),)
    # The kernel has not flipped yet: a second nonblocking commit on the CRTC is EBUSY.
    with pytest.raises(Busy) as busy:
        AtomicRequest(head.card).add(head.primary, "FB_ID", head.fb).commit(nonblock=True, event=True)
    assert busy.value.errno == errno.EBUSY
    assert "flags NONBLOCK|PAGE_FLIP_EVENT, 1 properties" in str(busy.value)
    (queued,) = drm.vblank()
    (event,) = head.card.wait_events([head.crtc.id], timeout=1.0)
    assert event == FlipEvent(head.crtc.id, queued.sequence, queued.timestamp_ns, 77)
    assert seen == [event]


def test_a_commit_without_master_is_not_master(drm: libdrm.FakeDevice, head: Head) -> None:
    drm.master = False
    req = head.light()
    with pytest.raises(NotMaster) as raised:
        req.commit(allow_modeset=True)
    assert (raised.value.op, raised.value.errno) == ("DRM_IOCTL_MODE_ATOMIC", errno.EACCES)
    assert drm.client_blobs == set()
    drm.master = True


def test_decode_flags_names_each_bit() -> None:
    assert decode_flags(TEST_ONLY | ALLOW_MODESET) == "TEST_ONLY|ALLOW_MODESET"
    assert decode_flags(NONBLOCK | PAGE_FLIP_EVENT) == "NONBLOCK|PAGE_FLIP_EVENT"
    assert decode_flags(0) == "0"


def test_dump_names_properties_and_the_mode_of_a_blob(drm: libdrm.FakeDevice, head: Head) -> None:
    req = head.light().add_plane(head.overlay, head.crtc, head.fb, dst=(-5, 0, 10, 10))
    (blob,) = drm.client_blobs
    lines = req.dump().splitlines()
    assert f"  connector {head.connector.id} (Virtual-1) CRTC_ID = {head.crtc.id}" in lines
    assert f"  crtc {head.crtc.id} MODE_ID = blob {blob} (1024x768@60.00)" in lines
    assert f"  plane {head.primary.id} (primary) FB_ID = {head.fb.id}" in lines
    assert f"  plane {head.overlay.id} (overlay) CRTC_X = -5" in lines
    req.add(head.crtc, "NO_SUCH", 1)
    assert req.dump().splitlines()[-1].startswith("  (first build error: building atomic request failed")
    assert AtomicRequest(head.card).dump() == "  (empty)"
    req.discard()


# ------------------------------------------------------------------------------- mode blobs

def test_a_real_commit_hands_its_blob_to_the_card(drm: libdrm.FakeDevice, head: Head) -> None:
    req = head.light()
    (blob,) = drm.client_blobs
    req.commit(allow_modeset=True)
    assert head.card._mode_blobs == {head.crtc.id: blob}
    assert req._blobs == [] and destroyed(drm) == []
    req.discard()   # nothing of the request's is left to destroy
    assert destroyed(drm) == [] and drm.client_blobs == {blob}


def test_the_next_mode_replaces_the_adopted_blob(drm: libdrm.FakeDevice, head: Head) -> None:
    head.light().commit(allow_modeset=True)
    (first,) = drm.client_blobs
    small = next(m for m in head.connector.modes if m.name == "800x600")
    AtomicRequest(head.card).add(head.crtc, "MODE_ID", small).commit(allow_modeset=True)
    (second,) = drm.client_blobs
    assert destroyed(drm) == [first] and head.card._mode_blobs == {head.crtc.id: second}
    head.crtc.refresh()
    assert head.crtc.mode == small


def test_closing_the_card_destroys_the_adopted_blob(drm: libdrm.FakeDevice, card: Card) -> None:
    mode = card.connectors[0].modes[0]
    AtomicRequest(card).add_output(card.connectors[0], card.crtcs[0], mode).commit(allow_modeset=True)
    (blob,) = drm.client_blobs
    AtomicRequest(card).add_output(card.connectors[0], card.crtcs[0], None).commit(allow_modeset=True)
    assert drm.client_blobs == {blob}    # the CRTC is off, but the Card still holds the blob it set
    card.close()
    assert destroyed(drm) == [blob] and drm.client_blobs == set()


def test_a_failed_commit_destroys_the_blobs_it_created(drm: libdrm.FakeDevice, head: Head) -> None:
    drm.refuse = lambda device, state: "this mode does not fit"
    req = head.light()
    (blob,) = drm.client_blobs
    with pytest.raises(Rejected) as raised:
        req.commit(allow_modeset=True)
    assert (raised.value.op, raised.value.errno) == ("DRM_IOCTL_MODE_ATOMIC", errno.EINVAL)
    assert destroyed(drm) == [blob] and drm.client_blobs == set()
    assert head.card._mode_blobs == {} and req._blobs == []
    assert drm.crtc.values["MODE_ID"] == 0 and drm.commits[-1].error == errno.EINVAL
    assert drm.refusals == ["this mode does not fit"]
    drm.refuse = None


def test_test_only_keeps_the_blobs_for_the_real_commit(drm: libdrm.FakeDevice, head: Head) -> None:
    req = head.light()
    (blob,) = drm.client_blobs
    req.test(allow_modeset=True)
    assert drm.commits[-1].test_only and drm.commits[-1].flags == TEST_ONLY | ALLOW_MODESET
    assert drm.crtc.values["MODE_ID"] == 0 and drm.primary.values["FB_ID"] == 0
    assert req._blobs == [(head.crtc.id, blob)] and head.card._mode_blobs == {}
    req.commit(allow_modeset=True)
    assert not drm.commits[-1].test_only and drm.crtc.values["MODE_ID"] == blob
    assert created(drm) == 1 and destroyed(drm) == [] and head.card._mode_blobs == {head.crtc.id: blob}


def test_a_refused_test_only_commit_keeps_the_blobs(drm: libdrm.FakeDevice, head: Head) -> None:
    drm.refuse = lambda device, state: "no"
    req = head.light()
    (blob,) = drm.client_blobs
    with pytest.raises(Rejected):
        req.test(allow_modeset=True)
    assert drm.client_blobs == {blob} and req._blobs == [(head.crtc.id, blob)]
    req.discard()
    assert destroyed(drm) == [blob] and req._blobs == []
    drm.refuse = None


def test_a_request_dropped_unused_destroys_its_blobs(drm: libdrm.FakeDevice, head: Head) -> None:
    with AtomicRequest(head.card) as req:
        req.add(head.crtc, "MODE_ID", head.mode)
        (blob,) = drm.client_blobs
    assert destroyed(drm) == [blob] and drm.client_blobs == set()
    assert drm.calls_to("kms_atomic_commit") == []


# ------------------------------------------------------------------------------ build errors

def test_a_build_error_is_raised_at_commit_and_nothing_is_sent(drm: libdrm.FakeDevice, head: Head) -> None:
    req = head.light()
    (blob,) = drm.client_blobs
    sent = len(req)
    req.add(head.primary, "NO_SUCH_PROP", 1).add(head.primary, "FB_ID", 0)
    assert len(req) == sent
    with pytest.raises(BuildError, match="plane .* has no property 'NO_SUCH_PROP'") as raised:
        req.test(allow_modeset=True)
    assert raised.value.errno == errno.EINVAL and isinstance(raised.value, KmsError)
    assert drm.client_blobs == {blob}   # TEST_ONLY: the request may still be fixed and reused
    with pytest.raises(BuildError):
        req.commit(allow_modeset=True)
    assert drm.calls_to("kms_atomic_commit") == []
    assert destroyed(drm) == [blob] and drm.client_blobs == set()


@pytest.mark.parametrize(("value", "message"), [
    ("Sideways", "property DPMS has no value 'Sideways' \\(it takes On, Standby, Suspend, Off\\)"),
    (1.5, "cannot set property DPMS to 1.5")])
def test_a_value_the_property_cannot_take_is_a_build_error(drm: libdrm.FakeDevice, card: Card,
                                                           value: object, message: str) -> None:
    req = AtomicRequest(card).add(card.connectors[0], "DPMS", value)
    assert len(req) == 0
    with pytest.raises(BuildError, match=message):
        req.commit()
    assert drm.calls_to("kms_atomic_commit") == []


def test_a_mode_blob_the_kernel_refuses_fails_the_request(drm: libdrm.FakeDevice, head: Head) -> None:
    drm.fail("drmModeCreatePropertyBlob", errno.ENOSPC)
    req = head.light()
    assert drm.client_blobs == set() and len(req) == 1   # the connector's CRTC_ID, then nothing
    with pytest.raises(Rejected) as raised:
        req.commit(allow_modeset=True)
    assert (raised.value.op, raised.value.errno) == ("drmModeCreatePropertyBlob", errno.ENOSPC)
    assert "mode 1024x768@60.00" in str(raised.value)
    assert drm.calls_to("kms_atomic_commit") == []
