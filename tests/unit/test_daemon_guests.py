"""The daemon's guest admission (frame-socket hello) against the policy: who may connect as whom; and
what a guest is told about frames that a re-plan shows.

The daemon is built on a real policy file and never started: on_hello is pure bookkeeping. Frames go
through the real planner and scanout pipelines on test_scanout's fake card."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

import pytest
from fakes.card import CONNECTOR, CRTC, PLANE, FakeCard
from test_scanout import (
    H,
    W,
    guest_buffer,
)

from compositor import topology
from compositor.daemon import Daemon
from compositor.kms import FlipEvent
from compositor.output import OutputLayer
from compositor.sources.frame import Frame
from compositor.sources.framesocket import Peer, Refused

# OutputLayer commits on the fake card (tests/unit/conftest.py)
pytestmark = pytest.mark.usefixtures("fake_native_flip")


POLICY = """version: 1
monitors:
  left: {connector: Virtual-1}
guests:
  office: {kind: socket, users: [4242, root]}
  media: {kind: socket}
placements:
  - {guest: office, monitor: left}
  - {guest: media, monitor: left}
"""


@dataclass
class Conn:
    name: str
    peer: Peer
    uuid: str | None = None
    buffers: dict = field(default_factory=dict)
    closed: bool = False
    said: list[tuple] = field(default_factory=list)  # what the daemon told the guest, in order

    def presented(self, buffer_id: int, frame: int, timestamp_ns: int, sequence: int) -> None:
        self.said.append(("presented", buffer_id, frame, timestamp_ns, sequence))

    def released(self, buffer_id: int) -> None:
        self.said.append(("released", buffer_id))

    # compositor.sources.Source
    mdev = None
    dp_conn = -1
    input = None

    def close(self, reason: str) -> None:
        self.closed = True

    def let_go(self) -> None:
        pass

    def evicted(self) -> list:
        return []

    def show_monitor(self, edid: bytes | None) -> None:
        self.said.append(("monitor", edid))

    def guest_status(self) -> dict:
        return {}


@pytest.fixture
def daemon(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return Daemon(path, frame_socket=str(tmp_path / "f.sock"), control_socket=str(tmp_path / "c.sock"))


def test_a_listed_user_may_connect_as_the_guest(daemon):
    daemon.on_hello(Conn("office", Peer(100, 4242, 4242)))
    assert "office" in daemon.guests


def test_an_unlisted_user_is_refused_with_the_uids_allowed(daemon):
    with pytest.raises(Refused, match=r"uid 5000 may not connect as guest office .*0, 4242"):
        daemon.on_hello(Conn("office", Peer(100, 5000, 5000)))
    assert "office" not in daemon.guests


def test_without_users_only_root_and_the_compositors_user(daemon):
    daemon.on_hello(Conn("media", Peer(100, os.getuid(), 0)))
    assert "media" in daemon.guests
    other = 4242 if os.getuid() != 4242 else 4243
    with pytest.raises(Refused, match="may not connect as guest media"):
        daemon.on_hello(Conn("media", Peer(101, other, other)))


def test_a_second_guest_of_the_same_name_is_refused(daemon):
    daemon.on_hello(Conn("office", Peer(100, 0, 0)))
    with pytest.raises(Refused, match=r"already connected \(pid 100\)"):
        daemon.on_hello(Conn("office", Peer(200, 0, 0)))


def test_a_guest_no_rule_names_is_admitted_but_not_shown(daemon, caplog):
    daemon.on_hello(Conn("stranger", Peer(100, 0, 0)))
    assert "no guest rule of the policy matches it" in caplog.text


def test_an_unknown_user_name_in_the_policy_is_an_error(tmp_path):
    from compositor.policy import PolicyError, load

    path = tmp_path / "p.yaml"
    path.write_text(POLICY.replace("[4242, root]", "[no-such-user-here]"))
    with pytest.raises(PolicyError, match="no user `no-such-user-here`"):
        load(path)


# ------------------------------------------------------------------ frames that a re-plan shows

CARD = "/dev/dri/card0"


def fake_topology() -> topology.Topology:
    """What probing the fake card would give: Virtual-1 → its CRTC → a primary plane, one mode."""
    mode = {"name": f"{W}x{H}", "width": W, "height": H, "refresh": 60.0, "clock": 1000, "preferred": True}
    card = {"path": CARD, "driver": "virtio_gpu", "driver_desc": "", "bus_path": None, "caps": {},
            "connectors": [{"id": CONNECTOR, "name": "Virtual-1", "type": "Virtual", "status": "connected",
                            "edid": None, "modes": [mode], "preferred_mode": mode, "possible_crtcs": [CRTC],
                            "current": None, "link_status": None, "physical_size_mm": [0, 0]}],
            "crtcs": [{"id": CRTC, "index": 0, "active": False, "mode": None}],
            "planes": [{"id": PLANE, "type": "primary", "possible_crtcs": [CRTC],
                        "formats": {"XR24": ["LINEAR"]}, "zpos": None, "crtc": None, "fb": None}]}
    return topology.from_probe({"schema": topology.SCHEMA, "cards": [card]})


def test_a_frame_a_replan_shows_is_presented_once(daemon):
    # A guest's first frame, and its first frame of a new size, change the planner's view of the
    # guest: they are not flipped but shown by the re-plan, through the blocking commit that
    # configures the output. The guest is owed `presented` for each all the same (one that flips a
    # single frame waits for nothing else), exactly once, when that commit's flip event is read; and
    # status counts it. `released` is as for any flip: a buffer goes back once another replaced it.
    card = FakeCard()
    daemon.native = False
    daemon.cards, daemon.layers = {CARD: card}, {CARD: OutputLayer(card, native=False)}
    daemon.topology = fake_topology()
    conn = Conn("office", Peer(100, 0, 0))
    big, small = guest_buffer(1), guest_buffer(2, 24, 16)

    def read_events() -> list[FlipEvent]:
        """What the loop does when the card's fd turns readable."""
        events, card.events = card.events, []
        for event in events:
            daemon._flip_event(CARD, event)
        return events

    def left() -> dict:
        """left's entry in `directflip status` (the daemon lists each pipeline's status)."""
        (pipe,) = daemon.pipelines.values()
        return pipe.status()

    async def scenario() -> None:
        await daemon.apply(daemon.plan())        # office not connected yet: left shows its slate
        daemon.on_hello(conn)
        for buffer in (big, small):
            conn.buffers[buffer.id] = buffer
            daemon.on_buffer(conn, buffer)

        daemon.on_flip(conn, Frame(big, seq=0))  # the first frame: a re-plan shows it
        await daemon._replan_task
        assert left()["on_screen"] == {"buffer": 1, "frame": 0} and conn.said == []
        (first,) = read_events()
        assert conn.said == [("presented", 1, 0, first.timestamp_ns, first.sequence)]
        assert left()["presented"] == 1

        daemon.on_flip(conn, Frame(small, seq=1))  # a new size: re-planned, shown the same way
        await daemon._replan_task
        assert left()["on_screen"] == {"buffer": 2, "frame": 1}
        assert conn.said[1:] == [("released", 1)]  # buffer 1 left the screen
        (second,) = read_events()
        assert conn.said[2:] == [("presented", 2, 1, second.timestamp_ns, second.sequence)]
        assert left()["presented"] == 2

        for event in (first, second):             # an event read twice reports nothing again
            daemon._flip_event(CARD, event)
        assert len(conn.said) == 3
        assert card.violations == []

    try:
        asyncio.run(scenario())
    finally:
        for pipe in daemon.pipelines.values():
            pipe.stop()
        big.close()
        small.close()


def test_every_source_and_this_fake_answer_what_the_daemon_asks_of_a_source():
    # The daemon asks no source its type (compositor.sources.Source): a source class missing one of
    # the protocol's members would fail only when a guest of its kind comes or goes.
    from compositor.sources import Source
    from compositor.sources.framesocket import GuestConnection
    from compositor.sources.qemu_dbus import QemuDisplaySource
    from compositor.sources.vfio import VfioGuest

    members = {name for name in vars(Source) if not name.startswith("_")} | set(Source.__annotations__)
    assert {"close", "let_go", "evicted", "show_monitor", "guest_status", "mdev", "name"} <= members
    for cls in (GuestConnection, VfioGuest, QemuDisplaySource, Conn):
        methods = {name for name in members if callable(getattr(Source, name, None))}
        missing = [name for name in methods if not callable(getattr(cls, name, None))]
        assert not missing, f"{cls.__name__} lacks {missing}"
        assert hasattr(cls, "mdev") or "mdev" in getattr(cls, "__annotations__", {}), cls
