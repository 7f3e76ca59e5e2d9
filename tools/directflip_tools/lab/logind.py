"""A systemd-logind session inside the lab guest:
``python -m directflip_tools.lab.logind session --vt N -- CMD``.

The lab guest has systemd-udevd but no systemd as PID 1, so nothing there creates logind sessions.
This launcher builds just enough of a logind machine around one command:

1. a system bus (``dbus-daemon --system``) at ``/run/dbus/system_bus_socket``;
2. a stand-in for the parts of ``org.freedesktop.systemd1`` that logind calls while it creates and
   ends a session (`SystemdStandIn`): jobs for ``StartUnit``/``StopUnit``/``StartTransientUnit``
   announced with ``JobRemoved``, unit states for the ``ActiveState`` logind polls, and the session's
   scope as a real cgroup (``/sys/fs/cgroup/user.slice/user-0.slice/session-cN.scope``) holding the
   session's leader, so a process's session can be found from its cgroup as on a real machine;
3. ``systemd-logind`` itself (from Debian's ``systemd`` package), which finds seat0 through udev.

Each is started only when it is not running already. Then it does what ``pam_systemd`` does at a
login: ``CreateSession`` for uid 0 on seat0 and VT N (``--seat SEAT`` without ``--vt`` for a seat
without VTs), with the command's process as the session leader, keeps the session's fifo open while
the command runs, and runs the command with ``XDG_SESSION_ID``, ``XDG_SEAT``, ``XDG_VTNR`` (with a
VT), ``XDG_SESSION_TYPE`` and ``XDG_SESSION_CLASS`` set. SIGTERM, SIGINT and
SIGHUP are passed on to the command. When it exits the session is closed (logind restores the VT),
everything the launcher started is stopped, and the launcher exits with the command's exit code (128+N
when signal N killed it).

Needs root. ``--debug`` runs logind with ``SYSTEMD_LOG_LEVEL=debug`` and logs every call the stand-in
answers; logind's messages go to this launcher's stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compositor.session import LOGIND, LOGIND_PATH, MANAGER_IFACE, MAX_VT

SYSTEM_BUS = "/run/dbus/system_bus_socket"
LOGIND_BINARIES = ("/lib/systemd/systemd-logind", "/usr/lib/systemd/systemd-logind")
SYSTEMD = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
SYSTEMD_MANAGER = "org.freedesktop.systemd1.Manager"
UNIT_PREFIX = "/org/freedesktop/systemd1/unit/"
JOB_PREFIX = "/org/freedesktop/systemd1/job/"
PROPERTIES = "org.freedesktop.DBus.Properties"
CGROUP_ROOT = Path("/sys/fs/cgroup")
START_TIMEOUT = 20.0      # seconds for the bus and logind to come up
GONE_TIMEOUT = 5.0        # seconds for logind to drop the session once its fifo is closed
# The command's first process: it reads the session's variables from the pipe whose fd is its first
# argument, closes it and becomes the command. As the session's leader it is the process logind knows
# the session by, before and after the exec.
SHIM = ('fd=$1; shift; IFS=" " read -r XDG_SESSION_ID XDG_SEAT XDG_VTNR XDG_SESSION_TYPE <&"$fd" '
        '|| exit 125; eval "exec $fd<&-"; unset fd; '
        'export XDG_SESSION_ID XDG_SEAT XDG_VTNR XDG_SESSION_TYPE XDG_SESSION_CLASS=user; '
        '[ "$XDG_VTNR" != 0 ] || unset XDG_VTNR; exec "$@"')


class LogindSetupError(RuntimeError):
    """Something the session needs is missing or failed; the message says what and how to fix it."""


def say(message: str) -> None:
    print(f"logind-session: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ systemd1 stand-in

def unit_path(name: str) -> str:
    """systemd's object path for a unit: every byte outside [A-Za-z0-9] as _xx (lowercase hex)."""
    if not name:
        return UNIT_PREFIX + "_"
    return UNIT_PREFIX + "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):02x}" for c in name)


def slice_cgroup(slice_name: str) -> str:
    """The cgroup path of a slice unit: user-0.slice → user.slice/user-0.slice, -.slice → ''."""
    stem = slice_name.removesuffix(".slice")
    if stem in ("", "-"):
        return ""
    parts = stem.split("-")
    return "/".join("-".join(parts[:i + 1]) + ".slice" for i in range(len(parts)))


@dataclass
class Unit:
    name: str
    state: str = "inactive"            # ActiveState
    cgroup: Path | None = None         # created for transient scopes
    abandoned: bool = False

    @property
    def path(self) -> str:
        return unit_path(self.name)

    def pids(self) -> list[int]:
        if self.cgroup is None:
            return []
        try:
            return [int(p) for p in (self.cgroup / "cgroup.procs").read_text().split()]
        except OSError:
            return []


@dataclass
class Job:
    id: int
    unit: str
    type: str

    @property
    def path(self) -> str:
        return f"{JOB_PREFIX}{self.id}"


@dataclass
class SystemdStandIn:
    """Answers what logind asks of ``org.freedesktop.systemd1`` on a machine without systemd as PID 1.

    Units only have a state: a start makes a unit active and a stop inactive, each through a job that
    completes at once (the reply carries the job's path, then ``JobRemoved`` says "done"). A transient
    scope gets its cgroup and its ``PIDs`` moved in. Calls it does not know are logged and refused.
    """

    bus: Any
    debug: bool = False
    units: dict[str, Unit] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    next_job: int = 1
    refused: list[str] = field(default_factory=list)

    def handle(self, msg) -> Any:
        from dbus_fast import Message, MessageFlag, MessageType

        if msg.message_type != MessageType.METHOD_CALL or not (msg.path or "").startswith(SYSTEMD_PATH):
            return False
        name = f"{msg.interface}.{msg.member}"
        if self.debug:
            say(f"systemd1 stand-in: {name}{tuple(msg.body)!r} on {msg.path}")
        try:
            reply = self._dispatch(msg)
        except _Refused as exc:
            reply = Message.new_error(msg, exc.error, exc.text)
        if reply is None:
            self.refused.append(name)
            say(f"systemd1 stand-in: {name} on {msg.path} is not implemented; refused")
            reply = Message.new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod",
                                      f"the lab's systemd1 stand-in does not implement {name}")
        if msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return True    # done; the bus would refuse a reply nobody asked for (logind's Subscribe)
        return reply

    # -- dispatch ------------------------------------------------------------------------------

    _RESTARTS = ("StartUnit", "RestartUnit", "TryRestartUnit", "ReloadOrRestartUnit",
                 "ReloadOrTryRestartUnit", "ReloadUnit")

    def _dispatch(self, msg):
        """The reply to a method call, or None when the stand-in does not implement it."""
        iface = msg.interface
        if iface in ("org.freedesktop.DBus.Peer", "org.freedesktop.DBus.Introspectable"):
            return self._bus_basics(msg)
        if iface == PROPERTIES:
            return self._properties(msg)
        if msg.path == SYSTEMD_PATH and iface in (SYSTEMD_MANAGER, None):
            return self._manager(msg)
        if msg.path.startswith(UNIT_PREFIX):
            return self._unit_call(msg)
        return None

    def _bus_basics(self, msg):
        """org.freedesktop.DBus.Peer and Introspectable, which every object answers."""
        from dbus_fast import Message

        if msg.member == "Ping":
            return Message.new_method_return(msg)
        if msg.member == "GetMachineId":
            return Message.new_method_return(msg, "s", [_machine_id()])
        if msg.interface == "org.freedesktop.DBus.Introspectable" and msg.member == "Introspect":
            return Message.new_method_return(msg, "s", ["<node/>"])
        return None

    def _manager(self, msg):
        """org.freedesktop.systemd1.Manager's methods that logind calls."""
        from dbus_fast import Message

        member, body = msg.member, msg.body
        if member in ("Subscribe", "Unsubscribe", "Reload"):
            return Message.new_method_return(msg)
        if member in self._RESTARTS:
            return self._job(msg, body[0], "start", "active")
        if member == "StopUnit":
            return self._job(msg, body[0], "stop", "inactive")
        if member == "StartTransientUnit":
            return self._start_transient(msg, body[0], body[2])
        if member == "KillUnit":
            self._kill(self._unit(body[0]), int(body[2]))
            return Message.new_method_return(msg)
        if member == "AbandonScope":
            self._abandon(self._unit(body[0]))
            return Message.new_method_return(msg)
        if member in ("GetUnit", "LoadUnit"):
            unit = self.units.get(body[0])
            if unit is None and member == "GetUnit":
                raise _Refused("org.freedesktop.systemd1.NoSuchUnit", f"Unit {body[0]} not loaded.")
            return Message.new_method_return(msg, "o", [unit_path(body[0])])
        return None

    def _unit_call(self, msg):
        """Methods of a unit's own object: a scope's Abandon, a unit's Kill."""
        from dbus_fast import Message

        unit = self._unit_at(msg.path)
        if msg.interface == "org.freedesktop.systemd1.Scope" and msg.member == "Abandon":
            self._abandon(unit)
            return Message.new_method_return(msg)
        if msg.interface == "org.freedesktop.systemd1.Unit" and msg.member in ("Kill", "KillUnit"):
            self._kill(unit, int(msg.body[1]))
            return Message.new_method_return(msg)
        return None

    def _unit(self, name: str) -> Unit:
        unit = self.units.get(name)
        if unit is None:
            raise _Refused("org.freedesktop.systemd1.NoSuchUnit", f"Unit {name} not loaded.")
        return unit

    def _unit_at(self, path: str) -> Unit:
        for unit in self.units.values():
            if unit.path == path:
                return unit
        raise _Refused("org.freedesktop.systemd1.NoSuchUnit", f"No unit at {path}.")

    # -- jobs and units ----------------------------------------------------------------------------

    def _job(self, msg, name: str, kind: str, state: str):
        from dbus_fast import Message

        unit = self.units.setdefault(name, Unit(name))
        job = Job(self.next_job, name, kind)
        self.next_job += 1
        self.jobs[job.path] = job
        # The reply goes out first (it is returned from the handler), the job ends right after it.
        asyncio.get_running_loop().call_soon(self._finish, job, unit, state)
        return Message.new_method_return(msg, "o", [job.path])

    def _finish(self, job: Job, unit: Unit, state: str) -> None:
        self.jobs.pop(job.path, None)
        self._signal(SYSTEMD_PATH, SYSTEMD_MANAGER, "JobRemoved", "uoss",
                     [job.id, job.path, unit.name, "done"])
        self._set_state(unit, state)

    def _set_state(self, unit: Unit, state: str) -> None:
        if unit.state == state:
            return
        unit.state = state
        from dbus_fast import Variant

        self._signal(unit.path, PROPERTIES, "PropertiesChanged", "sa{sv}as",
                     ["org.freedesktop.systemd1.Unit",
                      {"ActiveState": Variant("s", state), "SubState": Variant("s", _sub_state(unit))}, []])
        if state == "inactive":
            self._remove_cgroup(unit)
            self.units.pop(unit.name, None)
            self._signal(SYSTEMD_PATH, SYSTEMD_MANAGER, "UnitRemoved", "so", [unit.name, unit.path])

    def _start_transient(self, msg, name: str, props: list):
        values = {key: variant.value for key, variant in props}
        unit = self.units.setdefault(name, Unit(name))
        if name.endswith(".scope"):
            unit.cgroup = self._make_cgroup(values.get("Slice", "-.slice"), name)
            pids = list(values.get("PIDs", []))
            for pid in pids:
                self._move(unit, pid)
        return self._job(msg, name, "start", "active")

    def _make_cgroup(self, slice_name: str, scope: str) -> Path | None:
        if not (CGROUP_ROOT / "cgroup.procs").exists():
            say(f"no cgroup2 hierarchy at {CGROUP_ROOT}: {scope} has no cgroup")
            return None
        path = CGROUP_ROOT / slice_cgroup(slice_name) / scope
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            say(f"cannot create the cgroup of {scope} ({exc.strerror})")
            return None
        return path

    def _move(self, unit: Unit, pid: int) -> None:
        if unit.cgroup is None:
            return
        try:
            (unit.cgroup / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            say(f"cannot move pid {pid} into {unit.name} ({exc.strerror})")

    def _abandon(self, unit: Unit) -> None:
        """logind lets go of a session's scope: it ends once no process is left in it."""
        unit.abandoned = True
        self._reap(unit)

    def _reap(self, unit: Unit) -> None:
        if self.units.get(unit.name) is not unit or unit.state != "active":
            return
        if unit.pids():
            asyncio.get_running_loop().call_later(0.2, self._reap, unit)
            return
        self._set_state(unit, "inactive")

    def _kill(self, unit: Unit, signo: int) -> None:
        for pid in unit.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signo)

    def _remove_cgroup(self, unit: Unit) -> None:
        if unit.cgroup is None:
            return
        path = unit.cgroup
        unit.cgroup = None
        # The scope, then its slices while they are empty (user-0.slice, user.slice).
        while path != CGROUP_ROOT and path.is_relative_to(CGROUP_ROOT):
            try:
                path.rmdir()
            except OSError:
                return
            path = path.parent

    def close(self) -> None:
        for unit in list(self.units.values()):
            self._remove_cgroup(unit)

    # -- properties ------------------------------------------------------------------------------------

    def _properties(self, msg):
        from dbus_fast import Message, Variant

        path = msg.path
        if path.startswith(JOB_PREFIX):
            job = self.jobs.get(path)
            if job is None:
                raise _Refused("org.freedesktop.DBus.Error.UnknownObject", f"Unknown object '{path}'.")
            props = {"Id": Variant("u", job.id), "JobType": Variant("s", job.type),
                     "State": Variant("s", "running"),
                     "Unit": Variant("(so)", [job.unit, unit_path(job.unit)])}
        elif path.startswith(UNIT_PREFIX):
            unit = self._unit_at(path)
            job = next((j for j in self.jobs.values() if j.unit == unit.name), None)
            props = {"Id": Variant("s", unit.name), "LoadState": Variant("s", "loaded"),
                     "ActiveState": Variant("s", unit.state), "SubState": Variant("s", _sub_state(unit)),
                     "Job": Variant("(uo)", [job.id, job.path] if job else [0, "/"]),
                     "ControlGroup": Variant("s", "/" + str(unit.cgroup.relative_to(CGROUP_ROOT))
                                             if unit.cgroup is not None else "")}
        elif path == SYSTEMD_PATH:
            props = {"Version": Variant("s", "lab stand-in"), "Virtualization": Variant("s", "qemu"),
                     "SystemState": Variant("s", "running")}
        else:
            return None
        if msg.member == "GetAll":
            return Message.new_method_return(msg, "a{sv}", [props])
        if msg.member == "Get":
            if msg.body[1] not in props:
                raise _Refused("org.freedesktop.DBus.Error.UnknownProperty",
                               f"the lab's systemd1 stand-in has no property {msg.body[1]}")
            return Message.new_method_return(msg, "v", [props[msg.body[1]]])
        return None

    def _signal(self, path: str, interface: str, member: str, signature: str, body: list) -> None:
        from dbus_fast import Message

        self.bus.send(Message.new_signal(path, interface, member, signature, body))


class _Refused(Exception):
    def __init__(self, error: str, text: str) -> None:
        super().__init__(text)
        self.error, self.text = error, text


def _sub_state(unit: Unit) -> str:
    if unit.state != "active":
        return "dead"
    return "abandoned" if unit.abandoned else "running"


def _machine_id() -> str:
    try:
        return Path("/etc/machine-id").read_text().strip()
    except OSError:
        return "0" * 32


# -------------------------------------------------------------------------------------- services

def find_logind() -> str:
    for path in LOGIND_BINARIES:
        if os.access(path, os.X_OK):
            return path
    raise LogindSetupError(f"systemd-logind not found (looked for {', '.join(LOGIND_BINARIES)}): "
                           f"apt-get install systemd")


def find_dbus_daemon() -> str:
    path = shutil.which("dbus-daemon")
    if path is None:
        raise LogindSetupError("dbus-daemon not found: apt-get install dbus-daemon")
    return path


def bus_listening(path: str = SYSTEM_BUS) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


async def _poll(what: str, check, timeout: float, proc: subprocess.Popen | None = None):
    """Until the coroutine function `check` returns something true; stops early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise LogindSetupError(f"{what}: {proc.args[0]} exited with status {proc.returncode} "
                                   f"(its messages are above)")
        if time.monotonic() > deadline:
            raise LogindSetupError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)


class Services:
    """The system bus, the systemd1 stand-in and logind: each started here only when it is absent."""

    def __init__(self, debug: bool = False) -> None:
        self.debug = debug
        self.dbus: subprocess.Popen | None = None
        self.logind: subprocess.Popen | None = None
        self.bus = None
        self.standin: SystemdStandIn | None = None

    async def start(self) -> None:
        try:
            import dbus_fast  # noqa: F401
        except ImportError:
            raise LogindSetupError("the dbus-fast Python package is missing: pip install dbus-fast") from None
        if "DIRECTFLIP_LAB_CHANNEL" not in os.environ:
            raise LogindSetupError("this launcher is for the lab guest only (it starts its own system bus "
                                   "and systemd-logind): run it through `python -m directflip_tools.lab run`")
        if os.geteuid() != 0:
            raise LogindSetupError("a logind session needs root (CreateSession is root's, and so are "
                                   "the system bus and logind started here)")
        if not bus_listening():
            daemon = find_dbus_daemon()
            os.makedirs(os.path.dirname(SYSTEM_BUS), exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(SYSTEM_BUS)   # a socket left by a bus that is gone
            self.dbus = subprocess.Popen([daemon, "--system", "--nofork", "--nopidfile"])

            async def listening():
                return bus_listening()

            await _poll(f"the system bus at {SYSTEM_BUS}", listening, START_TIMEOUT, self.dbus)
            say(f"system bus started (dbus-daemon pid {self.dbus.pid})")
        from dbus_fast import BusType, RequestNameReply
        from dbus_fast.aio import MessageBus

        self.bus = await MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect()
        if not await self.has_owner(SYSTEMD):
            self.standin = SystemdStandIn(self.bus, debug=self.debug)
            self.bus.add_message_handler(self.standin.handle)
            reply = await self.bus.request_name(SYSTEMD)
            if reply != RequestNameReply.PRIMARY_OWNER:
                raise LogindSetupError(f"cannot own {SYSTEMD} on the system bus ({reply.name})")
            say(f"{SYSTEMD} stand-in on the bus")
        if not await self.has_owner(LOGIND):
            binary = find_logind()
            env = {**os.environ, "SYSTEMD_LOG_TARGET": "console",
                   "SYSTEMD_LOG_LEVEL": "debug" if self.debug else "info"}
            self.logind = subprocess.Popen([binary], env=env, stdout=sys.stderr)

            async def owned():
                return await self.has_owner(LOGIND)

            await _poll(f"{binary} on the system bus", owned, START_TIMEOUT, self.logind)
            say(f"systemd-logind started (pid {self.logind.pid})")

    async def has_owner(self, name: str) -> bool:
        reply = await self.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                                "NameHasOwner", "s", [name])
        return bool(reply.body[0])

    async def call(self, destination: str, path: str, interface: str, member: str, signature: str = "",
                   body: list | None = None, check: bool = True):
        from dbus_fast import Message, MessageType

        reply = await self.bus.call(Message(destination=destination, path=path, interface=interface,
                                            member=member, signature=signature, body=body or []))
        if check and reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply.body else ""
            raise LogindSetupError(f"{member}: {reply.error_name}: {detail}")
        return reply

    async def stop(self) -> None:
        if self.logind is not None:
            await _terminate(self.logind)
            self.logind = None
        if self.bus is not None:
            self.bus.disconnect()
            self.bus = None
        if self.standin is not None:
            self.standin.close()
            if self.standin.refused:
                say(f"calls the systemd1 stand-in refused: {', '.join(sorted(set(self.standin.refused)))}")
            self.standin = None
        if self.dbus is not None:
            await _terminate(self.dbus)
            self.dbus = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(SYSTEM_BUS)


async def _terminate(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            say(f"{proc.args[0]} (pid {proc.pid}) ignored SIGTERM; killing it")
            proc.kill()
            proc.wait()
            return
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------------- session

@dataclass
class CreatedSession:
    id: str
    path: str
    runtime_path: str
    fifo: int
    uid: int
    seat: str
    vtnr: int
    existing: bool


async def create_session(services: Services, leader: int, vt: int | None, seat: str) -> CreatedSession:
    """logind's CreateSession as pam_systemd calls it for a root login on a text console (`vt`), or
    for a service on a seat without VTs (no `vt`)."""
    async def seat_known():
        reply = await services.call(LOGIND, LOGIND_PATH, MANAGER_IFACE, "GetSeat", "s", [seat], check=False)
        return reply.error_name is None

    try:
        await _poll(f"logind's {seat}", seat_known, 5.0, services.logind)
    except LogindSetupError:
        raise LogindSetupError(f"logind has no {seat}: no DRM card is tagged master-of-seat by udev "
                               f"(udevadm info /dev/dri/card0 | grep TAGS)") from None
    reply = await services.call(
        LOGIND, LOGIND_PATH, MANAGER_IFACE, "CreateSession", "uusssssussbssa(sv)",
        [0, leader, "directflip", session_type(vt), "user", "", seat, vt or 0, f"tty{vt}" if vt else "",
         "", False, "", "", []])
    sid, path, runtime, fd_index, uid, got_seat, vtnr, existing = reply.body
    fifo = reply.unix_fds[fd_index]
    for extra in reply.unix_fds:
        if extra != fifo:
            os.close(extra)
    os.set_inheritable(fifo, False)
    return CreatedSession(sid, path, runtime, fifo, uid, got_seat, vtnr, existing)


async def session_gone(services: Services, sid: str) -> bool:
    reply = await services.call(LOGIND, LOGIND_PATH, MANAGER_IFACE, "GetSession", "s", [sid], check=False)
    return reply.error_name is not None


def session_type(vt: int | None) -> str:
    return "tty" if vt else "unspecified"


async def run_session(cmd: list[str], vt: int | None, seat: str, debug: bool = False) -> int:
    loop = asyncio.get_running_loop()
    services = Services(debug=debug)
    child: asyncio.subprocess.Process | None = None
    stop_signal: list[int] = []

    def forward(signo: int) -> None:
        stop_signal.append(signo)
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signo)

    for signo in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signo, forward, signo)
    try:
        await services.start()
        if stop_signal:
            return 128 + stop_signal[0]
        rfd, wfd = os.pipe()
        try:
            child = await asyncio.create_subprocess_exec("/bin/sh", "-c", SHIM, "directflip-session",
                                                         str(rfd), *cmd, pass_fds=(rfd,))
        finally:
            os.close(rfd)
        try:
            session = await create_session(services, child.pid, vt, seat)
        except BaseException:
            os.close(wfd)
            await child.wait()
            raise
        where = f"{session.seat} VT {session.vtnr}" if session.vtnr else session.seat
        say(f"session {session.id} on {where} ({session.path}), leader pid {child.pid}: {' '.join(cmd)}")
        os.write(wfd, f"{session.id} {session.seat} {session.vtnr} {session_type(vt)}\n".encode())
        os.close(wfd)
        if stop_signal:
            child.send_signal(stop_signal[0])
        code = await child.wait()
        os.close(session.fifo)   # the login ends: logind stops the session and gives the VT back
        try:
            await _poll(f"logind to end session {session.id}", lambda: session_gone(services, session.id),
                        GONE_TIMEOUT, services.logind)
        except LogindSetupError as exc:
            say(str(exc))
        return code if code >= 0 else 128 - code
    finally:
        if child is not None and child.returncode is None:
            child.kill()
            await child.wait()
        await services.stop()
        for signo in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m directflip_tools.lab.logind",
                                     description="Run a command in a systemd-logind session (lab guest).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("session", help="create a logind session on a VT and run CMD in it")
    p.add_argument("--vt", type=int,
                   help=f"the session's VT (1..{MAX_VT}); seat0 needs one, other seats have none")
    p.add_argument("--seat", default="seat0")
    p.add_argument("--debug", action="store_true", help="logind's debug log and every stand-in call")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("session needs a command: session --vt N -- CMD [ARGS...]")
    if args.vt is not None and not 1 <= args.vt <= MAX_VT:
        parser.error(f"--vt: VTs are numbered 1..{MAX_VT}")
    try:
        return asyncio.run(run_session(cmd, args.vt, args.seat, args.debug))
    except LogindSetupError as exc:
        say(f"error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
