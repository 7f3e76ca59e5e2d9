"""`kind: libvirt` guests against a stand-in for libvirt's Python binding (its calls, errors and
events as libvirt-python has them) and the QEMU display stand-in: the pure logic of attaching,
following a domain's lifecycle and surviving libvirtd's restarts. The real libvirtd, with a real
nested domain, is tests/lab/guest/test_libvirt.py."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import threading

import pytest
from test_qemu_dbus import XRGB8888, Recorder, memfd, run

from compositor.sources import libvirt_domain as lv
from compositor.sources.qemu_dbus import QemuDisplaySource, QemuTarget, wait_for
from directflip_tools.qemu_peer import QemuDisplayPeer

UUID = "5b3f0c1e-8d0a-4c4e-9f57-2c1d3e4f5a6b"
P2P = "<domain><devices><graphics type='vnc'/><graphics type='dbus' p2p='yes'/></devices></domain>"


class libvirtError(Exception):  # noqa: N801 - libvirt's own name
    def __init__(self, code: int, text: str, domain: int = 7) -> None:
        super().__init__(text)
        self.code, self.text, self.domain = code, text, domain

    def get_error_code(self) -> int:
        return self.code

    def get_error_domain(self) -> int:
        return self.domain

    def get_error_message(self) -> str:
        return self.text


class FakeDomain:
    def __init__(self, lib: FakeLibvirt, name: str, xml: str = P2P, state: int = 5) -> None:
        self.lib, self._name, self.xml, self._state = lib, name, xml, state
        self.peer: QemuDisplayPeer | None = None
        self.opened = 0

    def name(self) -> str:
        return self._name

    def UUIDString(self) -> str:  # noqa: N802
        return UUID

    def state(self) -> list[int]:
        return [self._state, 0]

    def XMLDesc(self, flags: int) -> str:  # noqa: N802
        return self.xml

    def openGraphicsFD(self, idx: int, flags: int) -> int:  # noqa: N802
        assert idx == 1, "the index of <graphics type='dbus'> among the domain's graphics"
        ours, theirs = socket.socketpair()
        self.opened += 1
        done = threading.Event()

        def serve() -> None:
            self.peer = QemuDisplayPeer(name=self._name, width=64, height=32)
            asyncio.ensure_future(self.peer.serve_peer(theirs))
            done.set()
        self.lib.loop.call_soon_threadsafe(serve)
        done.wait(5)
        return ours.detach()

    # what `virsh` does, seen through libvirt's events
    def start(self) -> None:
        self._state = 1
        self.lib.event(self, 2)

    def destroy(self) -> None:
        self._state = 5
        if self.peer is not None:
            self.peer.close()
        self.lib.event(self, 5)

    def suspend(self) -> None:
        self._state = 3
        self.lib.event(self, 3)

    def resume(self) -> None:
        self._state = 1
        self.lib.event(self, 4)


class FakeConn:
    def __init__(self, lib: FakeLibvirt) -> None:
        self.lib = lib
        self.close_cb = None
        self.event_cb = None
        self.closed = False

    def registerCloseCallback(self, cb, opaque) -> None:  # noqa: N802
        self.close_cb = cb

    def setKeepAlive(self, interval: int, count: int) -> None:  # noqa: N802
        pass

    def domainEventRegisterAny(self, dom, event_id, cb, opaque) -> int:  # noqa: N802
        assert dom is None and event_id == FakeLibvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE
        self.event_cb = cb
        return 1

    def lookupByName(self, name: str) -> FakeDomain:  # noqa: N802
        if name not in self.lib.domains:
            raise libvirtError(42, f"Domain not found: no domain with matching name '{name}'")
        return self.lib.domains[name]

    def lookupByUUIDString(self, uuid: str) -> FakeDomain:  # noqa: N802
        for dom in self.lib.domains.values():
            if dom.UUIDString() == uuid:
                return dom
        raise libvirtError(42, f"Domain not found: no domain with matching uuid '{uuid}'")

    def listAllDomains(self, flags: int) -> list[FakeDomain]:  # noqa: N802
        return list(self.lib.domains.values())

    def close(self) -> int:
        self.closed = True
        return 0


class FakeLibvirt:
    """What directflip uses of the `libvirt` module."""

    VIR_DOMAIN_EVENT_ID_LIFECYCLE = 0
    libvirtError = libvirtError

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.domains: dict[str, FakeDomain] = {}
        self.down: libvirtError | None = None  # libvirtd not running: open() raises this
        self.conns: list[FakeConn] = []
        self.opens = 0

    def virEventRegisterAsyncIOImpl(self, loop) -> None:  # noqa: N802
        assert loop is self.loop

    def open(self, uri: str) -> FakeConn:
        self.opens += 1
        if self.down is not None:
            raise self.down
        conn = FakeConn(self)
        self.conns.append(conn)
        return conn

    def event(self, dom: FakeDomain, event: int) -> None:
        for conn in self.conns:
            if conn.event_cb is not None and not conn.closed:
                self.loop.call_soon_threadsafe(conn.event_cb, conn, dom, event, 0, None)

    def restart_daemon(self) -> None:
        for conn in self.conns:
            if not conn.closed and conn.close_cb is not None:
                self.loop.call_soon_threadsafe(conn.close_cb, conn, 0, None)
            conn.closed = True


@pytest.fixture(autouse=True)
def fresh_hubs():
    yield
    lv.LibvirtHub._hubs.clear()
    lv._event_loop = None
    gc.collect()


def libvirt_source(lib: FakeLibvirt, domain: str = "win11") -> tuple[QemuDisplaySource, Recorder]:
    rec = Recorder()
    source = QemuDisplaySource("win11", QemuTarget(libvirt=("qemu:///system", domain)), rec,
                               retry_initial=0.05, retry_max=0.4)
    assert source.domain is not None
    source.domain.lib = lib
    return source, rec


async def running() -> tuple[FakeLibvirt, FakeDomain, QemuDisplaySource, Recorder]:
    """A running domain `win11` and a source showing it."""
    lib = FakeLibvirt(asyncio.get_running_loop())
    dom = lib.domains["win11"] = FakeDomain(lib, "win11", state=1)
    source, rec = libvirt_source(lib)
    source.start()
    assert await wait_for(lambda: source.state == "connected", 5)
    return lib, dom, source, rec


def test_the_dbus_display_is_found_in_the_domains_xml():
    assert lv.dbus_display(P2P, "win11") == lv.DbusDisplay(1, True, None)
    bus = "<domain><devices><graphics type='dbus' address='unix:path=/run/libvirt/qemu/dbus/1-w.sock'/>" \
          "</devices></domain>"
    assert lv.dbus_display(bus, "w") == lv.DbusDisplay(0, False, "unix:path=/run/libvirt/qemu/dbus/1-w.sock")
    with pytest.raises(lv.DomainError) as exc:
        lv.dbus_display("<domain><devices><graphics type='spice'/></devices></domain>", "win11")
    text = str(exc.value)
    assert "domain win11 has no D-Bus display (its graphics: spice)" in text
    assert "<graphics type='dbus' p2p='yes'/>" in text and "virsh edit win11" in text
    with pytest.raises(lv.DomainError, match="unreadable XML"):
        lv.dbus_display("<domain", "win11")


def test_libvirt_errors_name_their_cause(monkeypatch):
    denied = lv.describe_error(libvirtError(38, "Failed to connect socket to '/var/run/libvirt/"
                                                "libvirt-sock': Permission denied"), "qemu:///system")
    assert denied.startswith("qemu:///system may not be opened by this user") and "libvirt group" in denied
    away = lv.describe_error(libvirtError(38, "Failed to connect socket to '/var/run/libvirt/"
                                              "libvirt-sock': No such file or directory"), "qemu:///system")
    assert away.startswith("libvirtd at qemu:///system is not reachable: Failed to connect socket")
    # what a user other than root gets where libvirtd cannot ask polkit (no system bus)
    no_polkit = libvirtError(1, "internal error: Unable to get system bus connection: Could not connect: "
                                "No such file or directory", domain=47)
    monkeypatch.setattr(lv.os, "getuid", lambda: 65534)
    assert lv.describe_error(no_polkit, "qemu:///system").startswith("qemu:///system may not be opened by "
                                                                     "this user: internal error")


def test_a_domain_is_shown_from_start_to_shut_off_and_back():
    async def body():
        lib = FakeLibvirt(asyncio.get_running_loop())
        dom = lib.domains["win11"] = FakeDomain(lib, "win11")
        source, rec = libvirt_source(lib)
        source.start()
        assert await wait_for(lambda: rec.blanks, 5)
        assert rec.blanks[-1] == "win11 is shut off", rec.blanks
        assert source.connection == "waiting" and source.status()["libvirt"]["state"] == "shut off"
        fd = memfd(256 * 32)
        for _ in (1, 2):
            dom.start()
            assert await wait_for(lambda: source.state == "connected", 5)
            assert source.status()["libvirt"]["display"] == "p2p" and source.kind == "libvirt"
            listener = await dom.peer.listener()
            await listener.scanout_dmabuf(fd, 64, 32, 256, XRGB8888)
            assert rec.frames and os.fstat(rec.frames[-1].buffer.fd).st_ino == os.fstat(fd).st_ino
            dom.destroy()
            assert await wait_for(lambda: source.state != "connected", 5)
            assert await wait_for(lambda: rec.blanks[-1] == "win11 is shut off", 5), rec.blanks
        assert dom.opened == 2
        source.close()
        os.close(fd)
    run(body())


def test_a_paused_domain_shows_the_slate_and_its_picture_again_when_resumed():
    async def body():
        lib, dom, source, rec = await running()
        listener = await dom.peer.listener()
        fd = memfd(256 * 32)
        await listener.scanout_dmabuf(fd, 64, 32, 256, XRGB8888)
        frames = len(rec.frames)
        dom.suspend()
        assert await wait_for(lambda: rec.blanks and rec.blanks[-1] == "win11 is paused", 5), rec.blanks
        dom.resume()
        assert await wait_for(lambda: len(rec.frames) > frames, 5)
        assert rec.frames[-1].buffer is rec.frames[frames - 1].buffer  # the same picture, not a new one
        assert source.state == "connected" and dom.opened == 1
        source.close()
        os.close(fd)
    run(body())


def test_a_libvirtd_restart_changes_nothing_on_screen():
    async def body():
        lib, dom, source, rec = await running()
        hub = lv.LibvirtHub._hubs["qemu:///system"]
        hub.retry_initial = 0.05
        lib.down = libvirtError(38, "Failed to connect socket to '/var/run/libvirt/libvirt-sock': "
                                    "Connection refused")
        lib.restart_daemon()
        assert await wait_for(lambda: hub.state == "waiting" and hub.last_error, 5)
        status = source.status()["libvirt"]["libvirtd"]
        assert status["state"] == "waiting" and "not reachable" in status["error"], status
        lib.down = None
        assert await wait_for(lambda: hub.state == "connected", 5)
        assert hub.connects == 2 and hub.lost == 1
        assert source.state == "connected" and dom.opened == 1 and not rec.blanks  # never let go
        dom.destroy()   # events come through the new connection
        assert await wait_for(lambda: rec.blanks and rec.blanks[-1] == "win11 is shut off", 5)
        source.close()
    run(body())


def test_bad_domains_are_named_and_libvirtd_is_retried_with_backoff():
    async def body():
        lib = FakeLibvirt(asyncio.get_running_loop())
        lib.domains["plain"] = FakeDomain(lib, "plain", "<domain><devices><graphics type='vnc'/>"
                                                       "</devices></domain>", state=1)
        missing, rec_missing = libvirt_source(lib, "nosuch")
        plain, rec_plain = libvirt_source(lib, "plain")
        missing.start()
        plain.start()
        assert await wait_for(lambda: rec_missing.blanks and rec_plain.blanks, 5)
        assert rec_missing.blanks[-1] == "libvirt at qemu:///system has no domain nosuch"
        assert missing.connection == "waiting"
        assert "domain plain has no D-Bus display" in rec_plain.blanks[-1]
        assert plain.connection == "error" and "<graphics type='dbus' p2p='yes'/>" in plain.last_error
        missing.close()
        plain.close()
        assert "qemu:///system" not in lv.LibvirtHub._hubs   # the last user closed it

        lib.down = libvirtError(38, "Failed to connect socket to '/var/run/libvirt/libvirt-sock': "
                                    "No such file or directory")
        source, rec = libvirt_source(lib)
        source.start()
        assert await wait_for(lambda: rec.blanks, 5)
        assert rec.blanks[-1].startswith("libvirtd at qemu:///system is not reachable"), rec.blanks
        opens = lib.opens
        await asyncio.sleep(1.6)   # 0.5 + 1.0 s: at most two more attempts, not one per source retry
        assert lib.opens - opens <= 3
        source.close()
    run(body())


def test_list_domains_for_probe_and_check():
    async def body():
        lib = FakeLibvirt(asyncio.get_running_loop())
        lib.domains["win11"] = FakeDomain(lib, "win11", state=1)
        lib.domains["old"] = FakeDomain(lib, "old", "<domain><devices/></domain>")
        got = await lv.list_domains("qemu:///system", lib)
        assert got == [{"name": "old", "uuid": UUID, "state": "shut off", "dbus": None},
                       {"name": "win11", "uuid": UUID, "state": "running", "dbus": "p2p"}]
        lib.down = libvirtError(38, "Failed to connect socket to '/x': Permission denied")
        with pytest.raises(lv.DomainError, match="may not be opened by this user"):
            await lv.list_domains("qemu:///system", lib)
    run(body())


def test_without_the_binding_the_error_says_what_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_libvirt(name, *args, **kwargs):
        if name == "libvirt":
            raise ImportError("No module named 'libvirt'")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_libvirt)
    with pytest.raises(lv.LibvirtMissing, match=r"install libvirt-python"):
        lv.load_libvirt()


def test_a_display_another_client_took_over_is_not_taken_back_until_the_domain_restarts():
    async def body():
        lib, dom, source, rec = await running()
        source.domain.takeover_settle = 0.3
        dom.peer.close()   # what QEMU does to the first client when another one opens the display
        assert await wait_for(lambda: rec.blanks, 5)
        assert rec.blanks[-1].startswith("win11's display was taken over by another client"), rec.blanks
        assert source.status()["libvirt"]["taken_over"] == rec.blanks[-1]
        await asyncio.sleep(1.0)   # several retry periods: the other client keeps the display
        assert dom.opened == 1 and source.state == "waiting"
        dom.destroy()
        assert await wait_for(lambda: rec.blanks[-1] == "win11 is shut off", 5), rec.blanks
        dom.start()
        assert await wait_for(lambda: source.state == "connected", 5)
        assert dom.opened == 2 and source.status()["libvirt"]["taken_over"] is None
        source.close()
    run(body())
