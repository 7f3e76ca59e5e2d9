"""Security of the host side (issue 8): who may reach the sockets, and who may be which guest.

- The frame socket has the daemon's mode (0660) and the control socket 0600, each from the moment the
  file exists: whatever the umask, there is no window in which either is more open.
- Guests are admitted by their real credentials: a forked child that drops to `nobody` talks to a real
  FrameSocketServer whose handler is a real Daemon (built on a policy file, never started: admission
  needs no card). SO_PEERCRED is what the daemon checks, so the child cannot claim another uid; it may
  be only the guests the policy lets its uid be, and never a guest that is already connected.
- Guests stay within their seats: the planner's property test (tests/unit/test_planner_properties.py,
  check_assignment) asserts every lit output of a guest lies inside the seats its placement allows,
  mirrors included, for any valid policy, topology and set of guests.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from compositor import control, topology
from compositor.daemon import Daemon
from compositor.sources.framesocket import Decoder, FrameSocketServer, encode
from compositor.sources.vfio import VfioError

NOBODY = 65534
POLICY = """version: 1
monitors:
  left: {connector: Virtual-1}
guests:
  office: {kind: socket, users: [nobody]}     # nobody may be office
  media: {kind: socket}                       # root only (and the compositor's own user)
  build:
    name: "build-*"                           # nobody may be any build-* guest...
    kind: socket
    users: [nobody]
  build-gpu:                                  # ...but this vGPU the compositor opens itself
    kind: vfio
    uuid: 4b20d080-1b54-4048-85b3-a6a62d165c01
placements:
  - {guest: office, monitor: left}
  - {guest: media, monitor: left}
  - {guest: build, monitor: left}
  - {guest: build-gpu, monitor: left}
"""

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="dropping to another uid needs root")


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    yield
    os.umask(old)


def birth_modes(monkeypatch) -> dict[str, int]:
    """Record the mode each file had just before the code under test chmods it: its mode at birth."""
    seen: dict[str, int] = {}
    real_chmod = os.chmod

    def spy(path, mode, *args, **kwargs):
        if isinstance(path, str) and os.path.exists(path):
            seen.setdefault(path, stat.S_IMODE(os.lstat(path).st_mode))
        return real_chmod(path, mode, *args, **kwargs)
    monkeypatch.setattr(os, "chmod", spy)
    return seen


class Handler:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args: None


def test_the_frame_socket_is_born_with_its_mode_whatever_the_umask(tmp_path, monkeypatch, umask_zero):
    # The daemon creates its FrameSocketServer without a mode: the default 0660 is what it gets.
    births = birth_modes(monkeypatch)
    path = str(tmp_path / "frames.sock")
    loop = asyncio.new_event_loop()
    server = FrameSocketServer(path, Handler())
    try:
        server.start(loop)
        assert server.mode == 0o660
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
        assert births[path] == 0o660, f"born {births[path]:o}: others could connect before the chmod"
    finally:
        server.close()
        loop.close()


def test_the_control_socket_is_born_0600_whatever_the_umask(tmp_path, monkeypatch, umask_zero):
    births = birth_modes(monkeypatch)
    path = str(tmp_path / "control.sock")
    loop = asyncio.new_event_loop()
    server = control.ControlServer(path, Handler())
    try:
        loop.run_until_complete(server.start())
        assert stat.S_ISSOCK(os.lstat(path).st_mode) and stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert births[path] == 0o600, f"born {births[path]:o}"
        assert os.umask(0) == 0, "the umask was not given back"
    finally:
        loop.run_until_complete(server.close())
        loop.close()


# ---------------------------------------------------------------------------------- as another uid

def _child_hello(path: str, name: str) -> dict[str, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(path)
    except OSError as exc:
        return {"connect": exc.errno, "sock": sock}
    sock.sendall(encode({"type": "hello", "version": 1, "name": name}))
    decoder, messages = Decoder(), []
    while not any(m["type"] in ("welcome", "error") for m in messages):
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            break
        messages.extend(decoder.feed(data))
    return {"messages": messages, "sock": sock}


class Child:
    """A forked process that drops to `uid`, connects to the frame socket as `name`, reports what the
    server said and, if welcomed, stays connected until released."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: str, name: str, uid: int = NOBODY) -> None:
        self.loop = loop
        result_r, result_w = os.pipe()
        self._release_r, self._release_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: nothing here may return into pytest
            try:
                os.close(result_r)
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                outcome = _child_hello(path, name)
                sock = outcome.pop("sock")
                outcome["uid"] = os.getuid()
                os.write(result_w, json.dumps(outcome).encode())
                os.close(result_w)
                os.read(self._release_r, 1)
                sock.close()
            finally:
                os._exit(0)
        os.close(result_w)
        os.close(self._release_r)
        self.result = loop.run_until_complete(asyncio.wait_for(self._read(result_r), 10))

    async def _read(self, fd: int) -> dict[str, Any]:
        ready = self.loop.create_future()
        self.loop.add_reader(fd, ready.set_result, None)
        try:
            await ready
        finally:
            self.loop.remove_reader(fd)
        data = os.read(fd, 65536)
        os.close(fd)
        return json.loads(data)

    @property
    def answer(self) -> dict[str, Any]:
        assert self.result["uid"] == NOBODY
        assert "messages" in self.result, f"could not connect: errno {self.result.get('connect')}"
        return self.result["messages"][-1]

    def release(self) -> None:
        os.write(self._release_w, b"x")
        os.close(self._release_w)
        self.loop.run_until_complete(asyncio.wait_for(asyncio.to_thread(os.waitpid, self.pid, 0), 10))


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A directory anyone may traverse (pytest's own are 0700): only the socket's mode decides."""
    path = Path(tempfile.mkdtemp(prefix="directflip-security-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path)


@contextmanager
def served(tmp_path: Path, sockets: Path, *,
           mode: int) -> Iterator[tuple[asyncio.AbstractEventLoop, Daemon, str, list[Child]]]:
    """A real Daemon admitting guests on a real frame socket (never started: no card needed)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    path = str(sockets / "frames.sock")
    daemon = Daemon(policy, frame_socket=path, control_socket=str(sockets / "control.sock"))
    daemon.topology = topology.from_probe({"schema": topology.SCHEMA, "cards": []}, "no cards")
    loop = asyncio.new_event_loop()
    server = FrameSocketServer(path, daemon, mode=mode)
    server.start(loop)
    children: list[Child] = []
    try:
        yield loop, daemon, path, children
    finally:
        for child in children:
            child.release()

        async def shut_down() -> None:
            server.close()  # on the loop: the daemon re-plans for the guests that leave
            await asyncio.sleep(0.01)
        loop.run_until_complete(shut_down())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def test_a_user_the_policy_does_not_list_is_refused_by_its_real_uid(tmp_path, reachable):
    # The socket is opened to everyone here, so that only the daemon's check stands in the way.
    with served(tmp_path, reachable, mode=0o666) as (loop, daemon, path, children):
        child = Child(loop, path, "media")
        children.append(child)
        assert child.answer["type"] == "error"
        assert f"uid {NOBODY} may not connect as guest media" in child.answer["reason"]
        assert "media" not in daemon.guests


def test_a_name_no_rule_gives_is_for_root_only(tmp_path, reachable):
    with served(tmp_path, reachable, mode=0o666) as (loop, daemon, path, children):
        child = Child(loop, path, "stranger")
        children.append(child)
        assert child.answer["type"] == "error" and f"uid {NOBODY} may not connect" in child.answer["reason"]
        assert daemon.guests == {}


def test_a_listed_user_is_admitted_with_the_credentials_the_kernel_gives(tmp_path, reachable):
    with served(tmp_path, reachable, mode=0o666) as (loop, daemon, path, children):
        child = Child(loop, path, "office")
        children.append(child)
        assert child.answer["type"] == "welcome"
        peer = daemon.guests["office"].conn.peer
        assert (peer.pid, peer.uid, peer.gid) == (child.pid, NOBODY, NOBODY)


def test_a_connected_guest_cannot_be_claimed_by_a_second_client(tmp_path, reachable):
    with served(tmp_path, reachable, mode=0o666) as (loop, daemon, path, children):
        first = Child(loop, path, "office")
        children.append(first)
        assert first.answer["type"] == "welcome"
        second = Child(loop, path, "office")
        children.append(second)
        assert second.answer["type"] == "error"
        assert f"a guest named office is already connected (pid {first.pid})" in second.answer["reason"]
        assert daemon.guests["office"].conn.peer.pid == first.pid


def test_without_the_sockets_group_nobody_cannot_even_connect(tmp_path, reachable):
    # The daemon's default mode: root:root 0660. The control socket is 0600.
    with served(tmp_path, reachable, mode=0o660) as (loop, daemon, path, children):
        child = Child(loop, path, "office")
        children.append(child)
        assert child.result == {"connect": errno.EACCES, "uid": NOBODY}
    path = str(reachable / "control.sock")
    loop = asyncio.new_event_loop()
    server = control.ControlServer(path, Handler())
    loop.run_until_complete(server.start())
    try:
        child = Child(loop, path, "status")
        child.release()
        assert child.result == {"connect": errno.EACCES, "uid": NOBODY}
    finally:
        loop.run_until_complete(server.close())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def test_a_user_cannot_take_the_name_of_a_guest_the_daemon_opens_itself(tmp_path, reachable, monkeypatch):
    opened: list[str] = []

    def record_open(uuid: str, *args: Any) -> None:
        opened.append(uuid)
        raise VfioError(errno.ENOENT, "no vGPU here")

    with served(tmp_path, reachable, mode=0o666) as (loop, daemon, path, children):
        child = Child(loop, path, "build-gpu")
        children.append(child)
        welcomed = child.answer["type"] == "welcome"
        monkeypatch.setattr("compositor.daemon.VfioDevice.open", record_open)
        daemon.open_vfio_guests()
        # While the squatter is connected, the daemon does not even try to open the vGPU.
        assert not welcomed and opened, (welcomed, opened)
