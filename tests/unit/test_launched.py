"""Launched VMMs (compositor.launched): started in a session of their own, recorded, and their device
fd taken back by a later compositor, with a real child process and the real pidfd_getfd."""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from typing import Annotated

import pytest
from dbus_fast.annotations import DBusObjectPath, DBusSignature, DBusStr
from dbus_fast.service import ServiceInterface, dbus_method

from compositor import launched


def vmm(tmp_path, fd: int) -> tuple:
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    return launched.spawn("office", argv, dict(os.environ), fd, "0b5d4a9e-7f3c-4c8e-9a1d-2f6e8b3c5d7a")


def test_a_launched_vmm_runs_in_its_own_session_and_its_fd_can_be_taken_back(tmp_path):
    fd = os.memfd_create("vgpu-stand-in")
    proc, rec = vmm(tmp_path, fd)
    try:
        assert os.getsid(proc.pid) == proc.pid != os.getsid(0)   # its own session: our signals miss it
        assert rec.alive() and rec.fd == fd and rec.pid == proc.pid
        registry = launched.Registry(tmp_path / "launched")
        registry.save(rec)
        assert oct((tmp_path / "launched").stat().st_mode & 0o777) == "0o700"
        again = registry.load("office")
        assert again == rec and again.alive()
        deadline = time.monotonic() + 10
        while True:   # the child has the fd once it exec'd
            try:
                taken = launched.take_back(again)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        try:
            assert os.fstat(taken).st_ino == os.fstat(fd).st_ino   # the very file the VMM holds
        finally:
            os.close(taken)
        bad = launched.Launched(**{**rec.__dict__, "fd": 1000})
        with pytest.raises(OSError) as exc:
            launched.take_back(bad)
        assert exc.value.errno == errno.EBADF and "the VMM has no fd 1000 any more" in str(exc.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.close(fd)
    assert not rec.alive()
    with pytest.raises(OSError, match=r"is no longer running"):
        launched.take_back(rec)
    registry.forget("office")
    assert registry.load("office") is None


def test_a_reused_pid_is_not_taken_for_the_vmm(tmp_path):
    rec = launched.Launched("office", os.getpid(), (launched.start_time(os.getpid()) or 0) + 1, 0, ["x"])
    assert not rec.alive()
    (tmp_path / "launched").mkdir()
    (tmp_path / "launched" / "office.json").write_text("{not json")
    assert launched.Registry(tmp_path / "launched").load("office") is None


def test_scope_names_are_unit_names():
    assert launched.scope_name("office") == "directflip-vm-office.scope"
    assert launched.scope_name("my vm/1") == "directflip-vm-my_vm_1.scope"


Props = Annotated[list, DBusSignature("a(sv)")]
AuxUnits = Annotated[list, DBusSignature("a(sa(sv))")]


class FakeSystemd(ServiceInterface):
    """org.freedesktop.systemd1's StartTransientUnit on a private bus: what a scope asks of systemd."""

    def __init__(self) -> None:
        super().__init__("org.freedesktop.systemd1.Manager")
        self.calls: list[tuple] = []

    @dbus_method(name="StartTransientUnit")
    def start_transient_unit(self, name: DBusStr, mode: DBusStr, properties: Props,
                             aux: AuxUnits) -> DBusObjectPath:
        self.calls.append((name, mode, {k: v.value for k, v in properties}, aux))
        return "/org/freedesktop/systemd1/job/1"


def test_a_launched_vmm_is_moved_to_a_scope_of_its_own(private_bus):
    import asyncio

    from dbus_fast.aio import MessageBus

    async def body():
        systemd = FakeSystemd()
        bus = await MessageBus(bus_address=private_bus).connect()
        bus.export("/org/freedesktop/systemd1", systemd)
        await bus.request_name("org.freedesktop.systemd1")
        rec = launched.Launched("office", 4242, 1, 3, ["qemu-system-x86_64"])
        unit = await launched.move_to_scope(rec, private_bus)
        bus.disconnect()
        return unit, systemd.calls
    unit, calls = asyncio.run(body())
    assert unit == "directflip-vm-office.scope"
    assert calls == [("directflip-vm-office.scope", "fail",
                      {"PIDs": [4242], "Description": "directflip guest office: its VMM",
                       "CollectMode": "inactive-or-failed"}, [])]


def test_a_vmm_that_exited_is_not_running_even_before_it_is_reaped(tmp_path):
    fd = os.memfd_create("vgpu-stand-in")
    proc, rec = launched.spawn("office", [sys.executable, "-c", "pass"], dict(os.environ), fd, None)
    os.close(fd)
    try:
        deadline = time.monotonic() + 30
        while rec.alive():   # a zombie (not reaped yet) still has /proc/PID/stat with its start time
            assert time.monotonic() < deadline, "the exited VMM still counts as running"
            time.sleep(0.05)
        assert launched.start_time(proc.pid) == rec.start_time   # not reaped: only its state says so
    finally:
        proc.wait()
