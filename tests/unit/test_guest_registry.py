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


def rule(uids=None):
    return SimpleNamespace(uids=uids)


@pytest.fixture
def registry():
    freed: list = []
    reg = GuestRegistry(freed.append)
    reg.freed_buffers = freed
    yield reg
    reg.close_all("test over")


def test_admission_names_the_reason_for_each_refusal(registry):
    registry.admit(Conn("office"), [rule()], None)
    with pytest.raises(Refused, match="already connected .pid 4242"):
        registry.admit(Conn("office"), [rule()], None)
    with pytest.raises(Refused, match="uid 54321 may not connect as guest media"):
        registry.admit(Conn("media", uid=54321), [rule()], None)   # no `users`: root and us only
    with pytest.raises(Refused, match="uid 1000 may not .* allows uid 1001[)]"):   # every rule must admit
        registry.admit(Conn("media", uid=1000), [rule((1000, 1001)), rule((1001,))], None)
    with pytest.raises(Refused, match="allows uid none"):
        registry.admit(Conn("media", uid=1000), [rule((1000,)), rule((1001,))], None)
    with pytest.raises(Refused, match="is the vGPU 1234, which directflip opens itself"):
        registry.admit(Conn("kiosk"), [rule()], "vGPU 1234")
    gs = registry.admit(Conn("media", uid=1000), [rule((1000,))], None)
    assert registry.get("media") is gs and gs.guest == Guest("media", "socket", None)
    assert sorted(registry.guests) == ["media", "office"]


def showing_one_of_two(registry):
    """A guest with buffers 1 and 2: 1 its latest frame and on a screen."""
    conn = Conn()
    gs = registry.admit(conn, [rule()], None)
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
    gs = registry.admit(conn, [rule()], None)
    one = guest_buffer(1)
    conn.buffers = {1: one}
    registry.new_latest(gs, Frame(one, seq=1))
    registry.close_all("bye")
    assert conn.closed and one.fd == -1 and registry.guests == {} and registry.freed_buffers == [one]
