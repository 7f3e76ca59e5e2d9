"""VMMs that `launch:` starts, kept out of the compositor's process tree so that they outlive it.

A VMM that `directflip run` starts holds a duplicate of its vGPU's device fd. It must keep running when
the compositor restarts, crashes or is killed by the watchdog, as a VM under virt-viewer or Looking
Glass keeps running when the viewer goes. So:

- It starts in a session of its own (setsid): no signal to the compositor's process group or terminal
  reaches it, and the compositor never stops it.
- Where systemd runs the machine, it is moved into a transient scope unit of its own,
  `directflip-vm-<guest>.scope` (StartTransientUnit over the system bus), out of the compositor's
  cgroup: `systemctl restart directflip` and the unit's KillMode leave it alone, and `systemctl status
  directflip-vm-<guest>.scope` shows it. Without systemd it stays in the cgroup it was started in.
- A record of it (pid, start time, the fd number the device has in it, the scope) is written in the
  instance's run directory (`launched/<guest>.json` next to the control socket), so the next compositor
  knows it.

After a restart the vGPU cannot be opened again: its VFIO group is held by the VMM's duplicate (the
kernel gives a group to one opener). The new compositor takes that duplicate back from the VMM with
pidfd_getfd(2) (Linux 5.6, needs CAP_SYS_PTRACE over the VMM) and shows the guest again. Where the
kernel refuses, or the VMM has closed the fd, the guest cannot be re-attached: status says so and why.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("directflip.launched")

SCOPE = "directflip-vm-{}.scope"
_UNIT_SAFE = re.compile(r"[^A-Za-z0-9:_.-]")
SYS_PIDFD_GETFD = 438  # the same number on every architecture (asm-generic)


@dataclass
class Launched:
    """One launched VMM, as recorded."""

    name: str
    pid: int
    start_time: int  # /proc/PID/stat field 22: tells a VMM from a later process with its pid
    fd: int  # the vGPU's device fd, as numbered in the VMM
    argv: list[str]
    uuid: str | None = None
    scope: str | None = None  # the transient systemd scope it runs in, if any

    def alive(self) -> bool:
        """The recorded process still runs: same start time (not a later process with its pid), and
        not a zombie waiting for its parent."""
        stat = _stat(self.pid)
        return stat is not None and stat[0] != "Z" and stat[1] == self.start_time

    def status(self) -> dict:
        return {"pid": self.pid, "command": self.argv[0] if self.argv else None, "scope": self.scope,
                "running": self.alive()}


def start_time(pid: int) -> int | None:
    stat = _stat(pid)
    return None if stat is None else stat[1]


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a process, from /proc/PID/stat; None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name, in parentheses, may hold spaces and parentheses: fields follow the last ")"
    fields = stat[stat.rindex(")") + 2:].split()
    return (fields[0], int(fields[19])) if len(fields) > 19 else None


def scope_name(guest: str) -> str:
    return SCOPE.format(_UNIT_SAFE.sub("_", guest))


def systemd_runs() -> bool:
    """systemd is the service manager (sd_booted(3))."""
    return os.path.isdir("/run/systemd/system")


class Registry:
    """The records of one instance's launched VMMs (a directory of JSON files)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)

    def save(self, rec: Launched) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.dir / f".{rec.name}.json.tmp"
        tmp.write_text(json.dumps(asdict(rec)))
        tmp.replace(self.dir / f"{rec.name}.json")

    def load(self, name: str) -> Launched | None:
        path = self.dir / f"{name}.json"
        try:
            data = json.loads(path.read_text())
            return Launched(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.warning("%s: unreadable record of a launched VMM (%s): ignored", path, exc)
            return None

    def forget(self, name: str) -> None:
        try:
            (self.dir / f"{name}.json").unlink()
        except FileNotFoundError:
            pass


def spawn(name: str, argv: list[str], env: dict[str, str], fd: int, uuid: str | None) -> tuple[
        subprocess.Popen, Launched]:
    """Start the VMM in a session of its own with `fd` (the vGPU's device fd) kept at its number."""
    proc = subprocess.Popen(argv, pass_fds=(fd,), env=env, start_new_session=True)
    started = start_time(proc.pid)
    rec = Launched(name, proc.pid, started if started is not None else -1, fd, argv, uuid)
    return proc, rec


async def move_to_scope(rec: Launched, bus_address: str | None = None) -> str:
    """Put the launched VMM in a transient scope unit of its own (systemd's StartTransientUnit on the
    system bus, or on `bus_address`), out of the compositor's cgroup. Returns the unit's name; raises
    OSError when systemd says no."""
    from dbus_fast import BusType, Message, MessageType, Variant
    from dbus_fast.aio import MessageBus

    unit = scope_name(rec.name)
    bus = await (MessageBus(bus_address=bus_address) if bus_address else MessageBus(bus_type=BusType.SYSTEM)
                 ).connect()
    try:
        props = [("PIDs", Variant("au", [rec.pid])),
                 ("Description", Variant("s", f"directflip guest {rec.name}: its VMM")),
                 ("CollectMode", Variant("s", "inactive-or-failed"))]
        reply = await bus.call(Message(
            destination="org.freedesktop.systemd1", path="/org/freedesktop/systemd1",
            interface="org.freedesktop.systemd1.Manager", member="StartTransientUnit",
            signature="ssa(sv)a(sa(sv))", body=[unit, "fail", props, []]))
        if reply.message_type == MessageType.ERROR:
            raise OSError(errno.EPERM, f"systemd refused the scope {unit}: {reply.error_name}: "
                          f"{reply.body[0] if reply.body else ''}")
    finally:
        bus.disconnect()
    return unit


def take_back(rec: Launched) -> int:
    """A duplicate of the vGPU's device fd the VMM holds (pidfd_getfd). Raises OSError naming why not."""
    if not rec.alive():
        raise OSError(errno.ESRCH, f"the VMM (pid {rec.pid}) is no longer running")
    try:
        pidfd = os.pidfd_open(rec.pid)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot refer to the VMM (pid {rec.pid}): {exc.strerror}") from None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, rec.fd, 0)
        if fd < 0:
            err = ctypes.get_errno()
            why = {errno.EPERM: "the kernel refuses (CAP_SYS_PTRACE over the VMM is needed)",
                   errno.EBADF: f"the VMM has no fd {rec.fd} any more",
                   errno.ENOSYS: "this kernel has no pidfd_getfd (Linux 5.6)"}.get(err, os.strerror(err))
            raise OSError(err, f"cannot take the vGPU's device fd back from the VMM (pid {rec.pid}): {why}")
        if start_time(rec.pid) != rec.start_time:   # the pid was reused between the check and the call
            os.close(fd)
            raise OSError(errno.ESRCH, f"the VMM (pid {rec.pid}) is no longer running")
        return fd
    finally:
        os.close(pidfd)
