"""libvirt domains as guests (`kind: libvirt`): the display of a VM that libvirt runs, reached through
libvirt itself, never through `virsh` output or QEMU's private sockets.

libvirt gives QEMU's D-Bus display (`<graphics type='dbus'/>`, libvirt ≥ 8.x) to a client in one of
two ways, and the domain's XML says which:

- `<graphics type='dbus' p2p='yes'/>`: QEMU runs `-display dbus,p2p=on`; `virDomainOpenGraphicsFD()`
  makes a socket pair, hands QEMU one end (QMP add_client) and the caller the other. That is the same
  peer-to-peer display connection `kind: qemu-dbus` with `qmp:` makes, so the QEMU display source
  (compositor.sources.qemu_dbus) serves it. QEMU keeps one such client: a second opener (virt-viewer,
  another directflip) takes the display over, and the first one's connection stops working.
- `<graphics type='dbus'/>` without p2p: libvirt starts a D-Bus daemon for the domain and QEMU joins
  it as `org.qemu`; the live XML names that bus in the element's `address`. The source connects to
  that bus as for `dbus:ADDRESS`.

Trust: the URI is opened with the compositor's own credentials, so libvirtd decides who may see which
domain; a display handed out by libvirtd (the fd, or the bus address in the live XML of a domain
libvirtd runs) is the domain's.

Lifetime: one `LibvirtHub` per URI, shared by every guest that names it. It keeps a connection to
libvirtd, re-opens it with a growing delay while libvirtd is away (a restart, not installed, not
running), and passes on the domain lifecycle events (started, paused, resumed, shut off, crashed) to
the domains that follow them. libvirt's calls block: they run on the hub's own thread, one at a
time; the events arrive on the compositor's loop through libvirt's asyncio event loop integration
(libvirtaio). A QEMU display connection does not go through libvirtd once it is open, so a libvirtd
restart changes nothing on screen.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

log = logging.getLogger("directflip.libvirt")

DEFAULT_URI = "qemu:///system"
KEEPALIVE = (5, 3)  # seconds between libvirt keepalive probes, probes missed before the link is dead
_UUID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")

# virDomainState, in the words `virsh domstate` uses
_STATES = {0: "starting", 1: "running", 2: "running", 3: "paused", 4: "shutting down", 5: "shut off",
           6: "crashed", 7: "suspended by its guest"}
RUNNING_STATES = frozenset({1, 2})
PAUSED_STATE = 3
# virDomainEventType
EVENT_NAMES = {0: "defined", 1: "undefined", 2: "started", 3: "suspended", 4: "resumed", 5: "stopped",
               6: "shutdown", 7: "pmsuspended", 8: "crashed"}
EVENT_STARTED, EVENT_SUSPENDED, EVENT_RESUMED, EVENT_STOPPED, EVENT_CRASHED = 2, 3, 4, 5, 8
# virErrorNumber values this module tells apart
ERR_NO_DOMAIN = 42
ERR_NO_CONNECT = 5
ERR_SYSTEM_ERROR = 38
ERR_RPC = 39
ERR_AUTH_FAILED = 45
ERR_OPERATION_DENIED = 55
ERR_AUTH_CANCELLED = 79
ERR_ACCESS_DENIED = 88
ERR_AUTH_UNAVAILABLE = 94
FROM_DBUS, FROM_POLKIT = 47, 60  # virErrorDomain values of libvirt's authorization layers
DENIED = frozenset({ERR_AUTH_FAILED, ERR_OPERATION_DENIED, ERR_AUTH_CANCELLED, ERR_ACCESS_DENIED,
                    ERR_AUTH_UNAVAILABLE})

ADD_DBUS = "<graphics type='dbus' p2p='yes'/>"


class LibvirtMissing(RuntimeError):
    """libvirt's Python binding is not installed."""


class DomainError(RuntimeError):
    """A domain that cannot be shown now: absent, not running, without a D-Bus display. `absent`
    says whether it is the normal wait for a VM (not defined yet, shut off) rather than an error."""

    def __init__(self, text: str, absent: bool = False) -> None:
        super().__init__(text)
        self.absent = absent


def load_libvirt() -> Any:
    """The libvirt module, or LibvirtMissing naming what to install."""
    try:
        import libvirt
    except ImportError as exc:
        raise LibvirtMissing("`kind: libvirt` needs libvirt's Python binding: install libvirt-python "
                             "(pip install 'directflip[libvirt]', which builds against libvirt-dev) "
                             f"({exc})") from None
    # libvirt prints every error to stderr by default; here each one is raised, and said once, by name
    libvirt.registerErrorHandler(_quiet, None)
    return libvirt


def _quiet(_ctx: Any, _err: Any) -> None:
    pass


_event_loop: asyncio.AbstractEventLoop | None = None


def _register_event_loop(lib: Any) -> None:
    """libvirt's events (lifecycle, keepalive, connection close) arrive on the running asyncio loop.
    libvirt takes one event loop implementation per process, before the first connection."""
    global _event_loop
    loop = asyncio.get_running_loop()
    if _event_loop is loop:
        return
    if _event_loop is not None and not _event_loop.is_closed():
        raise RuntimeError("libvirt's events are bound to another asyncio loop of this process")
    register = getattr(lib, "virEventRegisterAsyncIOImpl", None)
    if register is None:
        import libvirtaio

        register = libvirtaio.virEventRegisterAsyncIOImpl
    register(loop=loop)
    _event_loop = loop


def describe_error(exc: BaseException, uri: str) -> str:
    """A libvirt error as a user reads it: what failed and, for refusals, who decides."""
    code = _code(exc)
    text = _message(exc)
    # libvirtd asks polkit (over the system bus) whether a user other than root may manage it: where it
    # cannot ask, that user is refused with an error of the D-Bus or polkit layer.
    asked = _domain(exc) in (FROM_DBUS, FROM_POLKIT) and os.getuid() != 0
    if code in DENIED or asked or "Permission denied" in text or "authentication" in text.lower():
        return (f"{uri} may not be opened by this user: {text} (libvirtd decides: run directflip as "
                "root, or give its user access, e.g. the libvirt group or a polkit rule)")
    if code in (ERR_SYSTEM_ERROR, ERR_NO_CONNECT, ERR_RPC) or "connect" in text.lower():
        return f"libvirtd at {uri} is not reachable: {text}"
    return text


def _code(exc: BaseException) -> int | None:
    return _number(exc, "get_error_code")


def _domain(exc: BaseException) -> int | None:
    return _number(exc, "get_error_domain")


def _number(exc: BaseException, getter: str) -> int | None:
    """A number a libvirtError carries (its code, its domain); None for another exception."""
    get = getattr(exc, getter, None)
    try:
        return int(get()) if get is not None else None
    except (TypeError, ValueError):
        return None


def _message(exc: BaseException) -> str:
    get = getattr(exc, "get_error_message", None)
    text = get() if get is not None else None
    return str(text or exc or type(exc).__name__)


def state_text(state: int) -> str:
    return _STATES.get(state, f"in state {state}")


# --------------------------------------------------------------------------------- the domain's XML

@dataclass(frozen=True)
class DbusDisplay:
    """The domain's `<graphics type='dbus'>`: its index among the domain's graphics (for
    openGraphicsFD), whether it is peer to peer, and the bus address (live XML, bus mode only)."""

    index: int
    p2p: bool
    address: str | None


def dbus_display(xml: str, domain: str) -> DbusDisplay:
    """The D-Bus display in a domain's XML, or DomainError naming the element to add."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise DomainError(f"libvirt gave unreadable XML for domain {domain}: {exc}") from None
    graphics = root.findall("./devices/graphics")
    for index, element in enumerate(graphics):
        if element.get("type") == "dbus":
            p2p = element.get("p2p", "no") == "yes"
            return DbusDisplay(index, p2p, None if p2p else element.get("address"))
    have = ", ".join(sorted({g.get("type", "?") for g in graphics})) or "none"
    raise DomainError(f"domain {domain} has no D-Bus display (its graphics: {have}): add {ADD_DBUS} "
                      f"to its <devices> (virsh edit {domain}) and restart it")


# --------------------------------------------------------------------------------- one URI

Watcher = Callable[[str | None, str | None, int, int], None]  # uuid, name, event (-1: link), detail


class LibvirtHub:
    """One libvirt connection (per URI) for the guests that name it, kept open across libvirtd's
    restarts. `watch` hears lifecycle events of every domain (uuid, name, event, detail) and, with
    event -1, the link coming (detail 1) or going (detail 0)."""

    _hubs: dict[str, LibvirtHub] = {}

    def __init__(self, uri: str, lib: Any = None, *, retry_initial: float = 0.5,
                 retry_max: float = 10.0) -> None:
        self.uri = uri
        self.lib = lib
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.conn: Any = None
        self.state = "idle"  # connecting | connected | waiting | closed
        self.last_error: str | None = None
        self.retry_at: float | None = None  # monotonic time of the next attempt while waiting
        self.connects = 0
        self.lost = 0
        self._watchers: list[Watcher] = []
        self._lost = asyncio.Event()
        self.tried = asyncio.Event()  # set once the first attempt to connect has an outcome
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="libvirt")
        self._task: asyncio.Task | None = None
        self._users = 0

    @classmethod
    def get(cls, uri: str, lib: Any = None) -> LibvirtHub:
        """The hub for `uri`, made and started on first use (each get() is paired with a release())."""
        hub = cls._hubs.get(uri)
        if hub is None or hub.state == "closed":
            hub = cls._hubs[uri] = cls(uri, lib)
        hub._users += 1
        hub.start()
        return hub

    def release(self) -> None:
        self._users -= 1
        if self._users <= 0:
            if LibvirtHub._hubs.get(self.uri) is self:
                del LibvirtHub._hubs[self.uri]
            self.close()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"libvirt {self.uri}")

    def close(self) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        if self._task is not None:
            self._task.cancel()
        conn, self.conn = self.conn, None
        if conn is not None:
            self._pool.submit(_close_conn, conn)
        self._pool.shutdown(wait=False)

    def watch(self, fn: Watcher) -> Callable[[], None]:
        self._watchers.append(fn)
        return lambda: self._watchers.remove(fn) if fn in self._watchers else None

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A blocking libvirt call, on the hub's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args))

    def connection(self) -> Any:
        """The open connection, or DomainError saying why there is none."""
        if self.conn is not None:
            return self.conn
        if self.last_error is not None:
            retry = ""
            if self.retry_at is not None:
                retry = f"; retrying in {max(0.0, self.retry_at - time.monotonic()):.0f} s"
            raise DomainError(f"{self.last_error}{retry}")
        raise DomainError(f"connecting to libvirtd at {self.uri}")

    def status(self) -> dict[str, Any]:
        return {"uri": self.uri, "state": self.state, "error": self.last_error, "connects": self.connects,
                "lost": self.lost}

    async def _run(self) -> None:
        delay = self.retry_initial
        reported = None
        try:
            if self.lib is None:
                self.lib = load_libvirt()
            _register_event_loop(self.lib)
            while self.state != "closed":
                self.state = "connecting"
                try:
                    await self._open()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # every way libvirtd can be away or refuse: retried
                    self.last_error = describe_error(exc, self.uri)
                    if self.last_error != reported:
                        log.warning("%s; retrying", self.last_error)
                        reported = self.last_error
                    self.state = "waiting"
                    self.retry_at = time.monotonic() + delay
                    self.tried.set()
                    self._tell(-1, 0)
                    await asyncio.sleep(delay)
                    delay = min(self.retry_max, delay * 2)
                    continue
                reported, self.last_error, self.retry_at = None, None, None
                delay = self.retry_initial
                self.state = "connected"
                self.tried.set()
                self.connects += 1
                log.info("libvirt: connected to %s", self.uri)
                self._tell(-1, 1)
                await self._lost.wait()
                self._lost.clear()
                self.lost += 1
                conn, self.conn = self.conn, None
                if conn is not None:
                    self._pool.submit(_close_conn, conn)
                self.last_error = f"lost the connection to libvirtd at {self.uri}"
                log.warning("libvirt: %s; reconnecting", self.last_error)
                self.state = "waiting"
                self._tell(-1, 0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the binding itself is missing or broken: nothing to retry
            self.last_error = str(exc)
            self.state = "failed"
            self.tried.set()
            log.error("libvirt: %s", exc)
            self._tell(-1, 0)

    async def _open(self) -> None:
        lib = self.lib
        conn = await self.call(lib.open, self.uri)
        try:
            await self.call(conn.registerCloseCallback, self._on_close, None)
            await self.call(conn.setKeepAlive, *KEEPALIVE)
            await self.call(conn.domainEventRegisterAny, None, lib.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                            self._on_event, None)
        except BaseException:
            self._pool.submit(_close_conn, conn)
            raise
        self.conn = conn

    def _on_close(self, conn: Any, reason: int, opaque: Any) -> None:
        if conn is self.conn or self.conn is None:
            self._lost.set()

    def _on_event(self, conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
        try:
            uuid, name = dom.UUIDString(), dom.name()
        except Exception:  # noqa: BLE001 - a domain object gone bad: the event says nothing usable
            return
        log.debug("libvirt: domain %s %s (detail %d)", name, EVENT_NAMES.get(event, event), detail)
        self._tell(event, detail, uuid, name)

    def _tell(self, event: int, detail: int, uuid: str | None = None, name: str | None = None) -> None:
        for fn in list(self._watchers):
            try:
                fn(uuid, name, event, detail)
            except Exception:
                log.exception("libvirt: a watcher of %s failed", self.uri)


def _close_conn(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - closing a dead connection: nothing left to do
        pass


# --------------------------------------------------------------------------------- one domain

class LibvirtDomain:
    """One domain's display, for the QEMU display source: `attach()` gives a connected peer-to-peer
    socket or the address of the domain's bus; `changed` hears the domain's state (its text, as the
    slate shows it, and whether it runs) whenever libvirt says it changed."""

    def __init__(self, uri: str, domain: str, lib: Any = None) -> None:
        self.uri = uri
        self.domain = domain
        self.lib = lib
        self.by_uuid = bool(_UUID.fullmatch(domain))  # the policy named it by UUID (else by name)
        self.uuid: str | None = domain.lower() if self.by_uuid else None
        self.name: str | None = None if self.by_uuid else domain
        self.state: int | None = None
        self.mode: str | None = None  # p2p | bus
        self.takeover: str | None = None  # another client took the display over: why it is not shown
        self.takeover_settle = 3.0  # seconds a closed display waits for libvirt's word that the VM stopped
        self._events = 0  # lifecycle events of this domain seen
        self.changed: Callable[[str, int | None], None] | None = None
        self._hub: LibvirtHub | None = None
        self._unwatch: Callable[[], None] | None = None

    def start(self, changed: Callable[[str, int | None], None]) -> None:
        self.changed = changed
        self._hub = LibvirtHub.get(self.uri, self.lib)
        self._unwatch = self._hub.watch(self._on_event)

    def close(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._hub is not None:
            self._hub.release()
            self._hub = None

    @property
    def linked(self) -> bool:
        """Whether the connection to libvirtd is up."""
        return self._hub is not None and self._hub.conn is not None

    @property
    def label(self) -> str:
        return self.name or self.domain

    def describe(self) -> str:
        return f"libvirt domain {self.domain} at {self.uri}"

    def status(self) -> dict[str, Any]:
        return {"domain": self.domain, "uuid": self.uuid, "name": self.name,
                "state": None if self.state is None else state_text(self.state), "display": self.mode,
                "taken_over": self.takeover, "libvirtd": None if self._hub is None else self._hub.status()}

    async def attach(self) -> tuple[str, Any]:
        """("p2p", connected socket) or ("bus", D-Bus address), or DomainError saying why not."""
        hub = self._hub
        if hub is None:
            raise DomainError("closed")
        if hub.conn is None and hub.state in ("idle", "connecting"):
            await hub.tried.wait()   # the first attempt's outcome, not "connecting" on the slate
        conn = hub.connection()
        lib = hub.lib
        try:
            dom = await hub.call(conn.lookupByUUIDString if self.by_uuid else conn.lookupByName, self.domain)
        except lib.libvirtError as exc:
            if _code(exc) == ERR_NO_DOMAIN:
                raise DomainError(f"libvirt at {self.uri} has no domain {self.domain}", absent=True) from None
            raise DomainError(describe_error(exc, self.uri)) from None
        self.uuid, self.name = (await hub.call(dom.UUIDString)).lower(), await hub.call(dom.name)
        state, _reason = await hub.call(dom.state)
        self.state = state
        if state not in RUNNING_STATES and state != PAUSED_STATE:
            raise DomainError(f"{self.label} is {state_text(state)}", absent=True)
        display = dbus_display(await hub.call(dom.XMLDesc, 0), self.label)
        if display.p2p:
            fd = await hub.call(dom.openGraphicsFD, display.index, 0)
            self.mode = "p2p"
            self.takeover = None
            return "p2p", socket.socket(fileno=fd)
        if not display.address:
            raise DomainError(f"domain {self.label}'s D-Bus display has no bus address in its live XML "
                              "(libvirt too old?): give it p2p='yes'")
        _bus_admits_us(display.address, self.label)
        self.mode = "bus"
        return "bus", display.address

    async def taken_over(self) -> bool:
        """The peer-to-peer display connection closed: whether another client took it over (True, and
        `takeover` says so) rather than the VM stopping. QEMU keeps one such client; libvirt's event
        for a VM that stopped comes a little after its display closes, so wait that long for one, then
        ask libvirt whether the domain still runs."""
        seen = self._events
        deadline = time.monotonic() + self.takeover_settle
        while time.monotonic() < deadline:
            if self._events != seen:
                return False
            await asyncio.sleep(0.05)
        hub = self._hub
        if hub is None or hub.conn is None:
            return False
        try:
            dom = await hub.call(hub.conn.lookupByUUIDString if self.uuid else hub.conn.lookupByName,
                                 self.uuid or self.domain)
            state, _reason = await hub.call(dom.state)
        except Exception:  # noqa: BLE001 - libvirt cannot tell: treat it as the VM having gone
            return False
        self.state = state
        if self._events != seen or state not in RUNNING_STATES and state != PAUSED_STATE:
            return False
        self.takeover = (f"{self.label}'s display was taken over by another client (QEMU keeps one "
                         "peer-to-peer client; virt-viewer or another directflip?): shown again when the "
                         "domain starts again or directflip restarts")
        return True

    def _on_event(self, uuid: str | None, name: str | None, event: int, detail: int) -> None:
        if event == -1:
            if self.changed is not None:
                self.changed("libvirtd connected" if detail else "libvirtd away", None)
            return
        if not self._mine(uuid, name):
            return
        self.uuid, self.name = (uuid or "").lower() or self.uuid, name or self.name
        self._events += 1
        if event == EVENT_STARTED:
            self.takeover = None   # a new QEMU: its display is free
        if event in (EVENT_STARTED, EVENT_RESUMED):
            self.state = 1
        elif event == EVENT_SUSPENDED:
            self.state = PAUSED_STATE
        elif event == EVENT_STOPPED:
            self.state = 5
        elif event == EVENT_CRASHED:
            self.state = 6
        else:
            return
        if self.changed is not None:
            self.changed(f"{self.label} is {state_text(self.state)}", self.state)

    def _mine(self, uuid: str | None, name: str | None) -> bool:
        if self.uuid is not None and uuid is not None:
            return uuid.lower() == self.uuid
        return name is not None and name == self.name


def _bus_admits_us(address: str, domain: str) -> None:
    """The D-Bus daemon libvirt starts for a domain admits only the user it runs as (QEMU's, from
    qemu.conf): say so rather than have the connection reset."""
    if not address.startswith("unix:path="):
        return
    path = address[len("unix:path="):].split(",", 1)[0]
    try:
        owner = os.stat(path).st_uid
    except OSError:
        return   # not there (yet): connecting says so
    if owner != os.getuid():
        raise DomainError(f"domain {domain}'s display is on the D-Bus daemon libvirt started for it "
                          f"({path}), which admits only QEMU's user (uid {owner}), not uid {os.getuid()}: "
                          f"give the domain {ADD_DBUS} (peer to peer), or run QEMU as this user "
                          "(user = in qemu.conf)")


async def list_domains(uri: str, lib: Any = None, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Every domain at `uri` with its state and D-Bus display (for `directflip probe` and `check`);
    raises DomainError when libvirt cannot be asked."""
    lib = lib or load_libvirt()

    def ask() -> list[dict[str, Any]]:
        try:
            conn = lib.open(uri)
        except lib.libvirtError as exc:
            raise DomainError(describe_error(exc, uri)) from None
        try:
            out = []
            for dom in conn.listAllDomains(0):
                name = dom.name()
                try:
                    display: DbusDisplay | None = dbus_display(dom.XMLDesc(0), name)
                except DomainError:
                    display = None
                out.append({"name": name, "uuid": dom.UUIDString(), "state": state_text(dom.state()[0]),
                            "dbus": None if display is None else ("p2p" if display.p2p else "bus")})
            return sorted(out, key=lambda d: d["name"])
        finally:
            _close_conn(conn)

    pool = ThreadPoolExecutor(1, thread_name_prefix="libvirt-probe")
    try:
        return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(pool, ask), timeout)
    except TimeoutError:
        raise DomainError(f"libvirtd at {uri} did not answer within {timeout:.0f} s") from None
    finally:
        pool.shutdown(wait=False)   # a libvirtd that hangs keeps the thread, not the caller
