"""Which uevents mean what (compositor.hotplug.classify): pure, on recorded property sets."""

from __future__ import annotations

from compositor.hotplug import Changes, classify


def test_card_hotplug_without_connector_reprobes_the_card():
    c = Changes()
    # virtio-gpu on 6.1: ACTION=change HOTPLUG=1 on card0, no CONNECTOR= (re-probe every connector)
    assert classify(c, "change", "drm", "card0", "/dev/dri/card0", {"HOTPLUG": "1"}) == \
        "/dev/dri/card0: hotplug (connectors)"
    assert c.drm_cards == {"/dev/dri/card0"} and bool(c)


def test_connector_named_when_the_driver_says():
    c = Changes()
    what = classify(c, "change", "drm", "card1", "/dev/dri/card1", {"HOTPLUG": "1", "CONNECTOR": "77"})
    assert what == "/dev/dri/card1: hotplug (connector 77)"


def test_noise_is_ignored():
    c = Changes()
    assert classify(c, "change", "drm", "card0", None, {}) is None          # a change without HOTPLUG
    assert classify(c, "add", "drm", "card0-DP-1", None, {}) is None        # connector devices
    assert classify(c, "add", "drm", "renderD128", None, {}) is None        # render nodes
    assert classify(c, "bind", "mdev", "x", None, {}) is None
    assert not c


def test_cards_and_vgpus_coming_and_going():
    c = Changes()
    classify(c, "add", "drm", "card3", "/dev/dri/card3", {})
    classify(c, "remove", "drm", "card2", None, {})
    classify(c, "add", "mdev", "0b5d4a9e-7f3c-4c8e-9a1d-2f6e8b3c5d7a", None, {})
    classify(c, "remove", "mdev", "1b5d4a9e-7f3c-4c8e-9a1d-2f6e8b3c5d7a", None, {})
    assert c.cards_added == {"/dev/dri/card3"} and c.cards_removed == {"/dev/dri/card2"}
    assert c.mdevs_added == {"0b5d4a9e-7f3c-4c8e-9a1d-2f6e8b3c5d7a"}
    assert c.mdevs_removed == {"1b5d4a9e-7f3c-4c8e-9a1d-2f6e8b3c5d7a"}
