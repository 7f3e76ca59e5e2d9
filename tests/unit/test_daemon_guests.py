"""The daemon's guest admission (frame-socket hello) against the policy: who may connect as whom.

The daemon is built on a real policy file and never started: on_hello is pure bookkeeping."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

from compositor.daemon import Daemon
from compositor.sources.framesocket import Peer, Refused

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
