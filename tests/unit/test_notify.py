"""sd_notify over a real AF_UNIX datagram socket standing in for systemd's notify socket."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from compositor.notify import Notifier

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests may themselves run under a service manager: start from none of its variables."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


def receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.bind(address)
    # Ask for the sender's credentials, as systemd does to apply NotifyAccess=main.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    return sock


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify"
    sock = receiver(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def receive(sock: socket.socket, timeout: float = 1.0) -> tuple[str, int]:
    """One datagram and the PID the kernel says sent it."""
    sock.settimeout(timeout)
    data, ancillary, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
    pids = [_UCRED.unpack(cmsg[:_UCRED.size])[0] for level, kind, cmsg in ancillary
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    assert len(pids) == 1, ancillary
    return data.decode(), pids[0]


def drain(sock: socket.socket) -> list[str]:
    """Every datagram waiting now, without blocking."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        return out


def test_ready_status_and_stopping_arrive(notify_socket: socket.socket) -> None:
    n = Notifier.from_env()
    assert n.enabled and not n.watchdog_enabled and n.watchdog_usec is None
    assert n.ready("3 output(s) lit, 2 guest(s)")
    message, pid = receive(notify_socket)
    assert message == f"READY=1\nSTATUS=3 output(s) lit, 2 guest(s)\nMAINPID={os.getpid()}"
    assert pid == os.getpid()  # what NotifyAccess=main checks
    assert n.status("reloading policy")
    assert receive(notify_socket)[0] == "STATUS=reloading policy"
    assert n.stopping()
    assert receive(notify_socket)[0] == "STOPPING=1"
    n.close()


def test_a_status_line_cannot_smuggle_another_assignment(notify_socket: socket.socket) -> None:
    n = Notifier.from_env()
    n.status("left: copy\nREADY=1")
    assert receive(notify_socket)[0] == "STATUS=left: copy READY=1"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"directflip-test-{uuid.uuid4().hex}"
    sock = receiver(b"\0" + name.encode())
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        n = Notifier.from_env()
        assert n.ready("up")
        assert receive(sock)[0] == f"READY=1\nSTATUS=up\nMAINPID={os.getpid()}"
    finally:
        sock.close()


def test_watchdog_pings_from_the_running_loop(notify_socket: socket.socket,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # 0.1 s: a ping every 0.05 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier.from_env()
    assert n.watchdog_enabled and n.watchdog_usec == 100000

    async def body() -> None:
        n.start_watchdog(asyncio.get_running_loop())
        n.start_watchdog(asyncio.get_running_loop())  # a second start does not double the pings
        await asyncio.sleep(0.3)
        pings = drain(notify_socket)
        assert set(pings) == {"WATCHDOG=1"}
        assert 2 <= len(pings) <= 8, pings  # one right away, then every 0.05 s

        # A wedged loop stops the pings: that is what lets systemd notice and restart the service.
        time.sleep(0.3)
        assert drain(notify_socket) == []
        await asyncio.sleep(0.12)
        assert len(drain(notify_socket)) >= 1  # the loop runs again, so do the pings

        n.stop_watchdog()
        await asyncio.sleep(0.2)
        assert drain(notify_socket) == []

    asyncio.run(body())


def test_watchdog_meant_for_another_process_is_not_ours(notify_socket: socket.socket,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))
    n = Notifier.from_env()
    assert n.enabled and not n.watchdog_enabled and n.watchdog_usec is None

    async def body() -> None:
        n.start_watchdog(asyncio.get_running_loop())
        await asyncio.sleep(0.2)

    asyncio.run(body())
    assert drain(notify_socket) == []
    assert n.ready("up")  # the rest still works
    assert receive(notify_socket)[0].startswith("READY=1\n")


def test_without_notify_socket_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    caplog.set_level(logging.DEBUG, logger="directflip.notify")
    n = Notifier.from_env()
    assert not n.enabled and not n.watchdog_enabled
    assert "no NOTIFY_SOCKET" in caplog.text

    async def body() -> None:
        loop = asyncio.get_running_loop()
        n.start_watchdog(loop)
        assert not n.ready("up") and not n.status("x") and not n.stopping()
        n.stop_watchdog()

    asyncio.run(body())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("value", ["", "abc", "0", "-5", "1.5", "+100", " 100", "1_000"])
def test_malformed_watchdog_usec_is_a_clear_error(notify_socket: socket.socket,
                                                  monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", value)
    with pytest.raises(ValueError, match=r"^WATCHDOG_USEC=.*positive integer"):
        Notifier.from_env()


def test_malformed_watchdog_pid_is_a_clear_error(notify_socket: socket.socket,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", "self")
    with pytest.raises(ValueError, match=r"^WATCHDOG_PID='self'"):
        Notifier.from_env()


@pytest.mark.parametrize("value", ["", "@", "run/notify", "vsock:2:1234"])
def test_unsupported_notify_socket_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    with pytest.raises(ValueError, match=r"^NOTIFY_SOCKET="):
        Notifier.from_env()


def test_a_vanished_socket_is_logged_once_and_never_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "notify"
    sock = receiver(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    n = Notifier.from_env()
    sock.close()
    path.unlink()
    with caplog.at_level(logging.DEBUG, logger="directflip.notify"):
        assert not n.ready("up")
        assert not n.status("still nobody")
        assert not n.notify("WATCHDOG=1")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()

    sock = receiver(str(path))  # the manager is back (e.g. after daemon-reexec)
    try:
        assert n.status("back")
        assert receive(sock)[0] == "STATUS=back"
    finally:
        sock.close()
