"""The guest registry alone (compositor.guests): admission, holds and releases, forgotten buffers,
departed guests. No daemon, no card: a connection that records what it is told."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from test_scanout import guest_buffer

from compositor.guests import GuestRegistry
from compositor.planner import Guest
from compositor.sources.frame import Frame
from compositor.sources.framesocket import Peer, Refused


class Conn:
    def __init__(self, name: str = "office", uid: int = 0) -> None:
        self.name, self.uuid, self.peer = name, None, Peer(4242, uid, uid)
        self.buffers: dict = {}
        self.closed = False
        self.said: list = []
        self.dp_conn = -1

    def released(self, buffer_id: int) -> None:
        self.said.append(("released", buffer_id))

    def presented(self, buffer_id: int, seq: int, ts: int, sequence: int) -> None:
        self.said.append(("presented", buffer_id, seq))

    def evicted(self) -> list:
        return []

    def close(self, reason: str) -> None:
        self.closed = True


def rule(uids=None, name="r"):
    return SimpleNamespace(uids=uids, name=name)


@pytest.fixture
def registry():
    freed: list = []
    reg = GuestRegistry(freed.append)
    reg.freed_buffers = freed
    yield reg
    reg.close_all("test over")


def test_admission_names_the_reason_for_each_refusal(registry):
    registry.admit(Conn("office"), rule(), rule(), None)
    with pytest.raises(Refused, match="already connected .pid 4242"):
        registry.admit(Conn("office"), rule(), rule(), None)
    with pytest.raises(Refused, match="uid 54321 may not connect as guest media"):
        registry.admit(Conn("media", uid=54321), rule(), rule(), None)   # no `users`: root and us only
    with pytest.raises(Refused, match="uid 1000 may not .*rule that would show it, b, allows uid 1001"):
        registry.admit(Conn("media", uid=1000), rule((1000, 1001), "a"), rule((1001,), "b"), None)
    with pytest.raises(Refused, match="the first guest rule its name matches, a, allows uid 1001[)]"):
        registry.admit(Conn("media", uid=1000), rule((1001,), "a"), rule((1000,), "b"), None)
    with pytest.raises(Refused, match="no guest rule matches it, allows uid 0"):
        registry.admit(Conn("media", uid=1000), None, None, None)
    with pytest.raises(Refused, match="is the vGPU 1234, which directflip opens itself"):
        registry.admit(Conn("kiosk"), rule(), rule(), "vGPU 1234")
    gs = registry.admit(Conn("media", uid=1000), rule((1000,)), rule((1000,)), None)
    assert registry.get("media") is gs and gs.guest == Guest("media", "socket", None)
    assert sorted(registry.guests) == ["media", "office"]


def showing_one_of_two(registry):
    """A guest with buffers 1 and 2: 1 its latest frame and on a screen."""
    conn = Conn()
    gs = registry.admit(conn, rule(), rule(), None)
    one, two = guest_buffer(1), guest_buffer(2)
    conn.buffers = {1: one, 2: two}
    registry.new_latest(gs, Frame(one, seq=1))
    registry.hold(gs, one)                          # a pipeline shows it
    return conn, gs, one, two


def test_the_last_release_tells_the_guest_and_frees_only_forgotten_buffers(registry):
    conn, gs, one, two = showing_one_of_two(registry)
    registry.new_latest(gs, Frame(two, seq=2))      # one is no longer the latest: one hold left
    assert (one.holds, two.holds, conn.said) == (1, 1, [])
    registry.present(Frame(one, seq=1), SimpleNamespace(timestamp_ns=5, sequence=6))
    registry.release(Frame(one, seq=1))
    assert conn.said == [("presented", 1, 1), ("released", 1)] and one.fd >= 0

    registry.hold(gs, two)
    registry.forget(gs, conn.buffers.pop(2))        # held twice: kept, not closed
    assert two.forgotten and gs.forgotten == {two} and two.fd >= 0
    registry.release(Frame(two, seq=2))
    assert two.fd >= 0 and registry.freed_buffers == []
    registry.release(Frame(two, seq=2))             # the last hold: freed, and not `released`
    assert two.fd == -1 and registry.freed_buffers == [two] and gs.forgotten == set()
    assert ("released", 2) not in conn.said
    registry.release(Frame(two, seq=2))             # once more: nothing (it is gone)
    assert registry.freed_buffers == [two]


def test_a_departed_guest_stays_until_nothing_holds_its_buffers(registry):
    conn, gs, one, two = showing_one_of_two(registry)
    registry.depart(gs)
    assert "office" not in registry.guests and registry.departed == [gs]
    assert two.fd == -1 and one.fd >= 0 and gs.forgotten == {one}   # two was held by nothing
    registry.sweep()
    assert registry.departed == [gs]               # one is still on screen
    registry.release(Frame(one, seq=1))
    assert one.fd == -1 and registry.freed_buffers == [two, one]
    registry.sweep()
    assert registry.departed == [] and registry.all() == []
    assert conn.said == []


def test_closing_frees_every_buffer_held_or_not(registry):
    conn = Conn()
    gs = registry.admit(conn, rule(), rule(), None)
    one = guest_buffer(1)
    conn.buffers = {1: one}
    registry.new_latest(gs, Frame(one, seq=1))
    registry.close_all("bye")
    assert conn.closed and one.fd == -1 and registry.guests == {} and registry.freed_buffers == [one]


# --- admission as a table: policies/README.md, "Who may connect over the frame socket"

ADMISSION_POLICY = """version: 1
monitors:
  left: {connector: DP-1}
guests:
  office:                      # the office VM, which says its UUID; root runs it
    uuid: 8d3c1c1e-0000-4000-8000-000000000001
    users: [root]
  builds:
    name: "build-*"
    users: [nobody, root]
  anyone:                      # a catch-all for nobody
    name: "*"
    users: [nobody]
placements:
  - {guest: office, monitor: left}
  - {guest: builds, monitor: left}
  - {guest: anyone, monitor: left}
"""
UUID = "8d3c1c1e-0000-4000-8000-000000000001"
OTHER_UUID = "8d3c1c1e-0000-4000-8000-0000000000ff"
NOBODY = 65534

ADMISSION = [  # (uid, name, claimed uuid) → admitted, or the words of the refusal
    (0, "office", UUID, True),
    (0, "office", None, "rule that would show it, anyone"),   # office binds only its UUID; anyone is nobody's
    (NOBODY, "office", None, "first guest rule its name matches, office"),   # omitting the UUID: no way in
    (NOBODY, "office", UUID, "first guest rule its name matches, office"),
    (NOBODY, "office", OTHER_UUID, "first guest rule its name matches, office"),   # nor a wrong one
    (NOBODY, "build-7", None, True),
    (0, "build-7", OTHER_UUID, True),                     # a UUID claim changes nothing for builds
    (NOBODY, "kiosk", None, True),                        # the catch-all
    (0, "kiosk", None, "first guest rule its name matches, anyone"),   # users: lists only nobody
    (1000, "build-7", None, "first guest rule its name matches, builds"),
]


@pytest.mark.parametrize("uid, name, uuid, expect", ADMISSION)
def test_admission_table(registry, uid, name, uuid, expect):
    from compositor import policy
    from compositor.guests import deciding_rules

    rules = policy.parse(ADMISSION_POLICY).guests
    conn = Conn(name, uid=uid)
    conn.uuid = uuid
    if expect is True:
        registry.admit(conn, *deciding_rules(rules, name, uuid), None)
        assert registry.get(name) is not None
    else:
        with pytest.raises(Refused, match=f"uid {uid} may not connect as guest {name} .*{expect}"):
            registry.admit(conn, *deciding_rules(rules, name, uuid), None)
