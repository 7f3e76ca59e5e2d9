"""Descriptors from guests: what each one is, told without calling into its filesystem, and how the ones
the compositor refuses are let go without ever waiting on whoever serves them.

A peer that passes a descriptor over a Unix socket chooses its file. Most system calls on a file call
into the filesystem it lives on, and a FUSE filesystem is served by a process: `fstat` may wait for a
GETATTR answer, `lseek(SEEK_END)` too, and *every* `close` sends a FLUSH and waits for its answer with
no timeout and no signal able to end the wait (the request is "forced": not even SIGKILL interrupts
it). A guest that served its own FUSE mount and never answered could so freeze the compositor, and
keep it in D state through the watchdog's SIGABRT.

So a descriptor is classified first, from what the kernel itself says about the open file:
`/proc/self/fdinfo/N` (written by the VFS and, for a dma-buf, by the dma-buf core: never by FUSE) and
the link `/proc/self/fd/N` (a path, or a pseudo name such as `anon_inode:[vfio-device]` that no real
file can have, since real paths begin with `/`):

- a **dma-buf**: its fdinfo has the dma-buf core's `exp_name:` line;
- a **memfd**: its fdinfo's `mnt_id` is the kernel's internal shmem mount (the one a memfd made here
  reports) and its link reads `/memfd:NAME (deleted)`;
- a **VFIO device**: its link reads `anon_inode:[vfio-device]`.

Only these are ever kept; touching them never blocks. Anything else is refused with what it is, and
handed to `discard`: a thread of its own closes it, and if it lives on FUSE, first aborts that FUSE
connection through fusectl (`/sys/fs/fuse/connections/N/abort`), so the close cannot wait. The
compositor runs as root and never waits on a guest: a guest that passes it a file of its own FUSE
mount loses that mount. The one call made on such a file before the abort is
`statx(AT_STATX_DONT_SYNC, mask 0)`, which FUSE answers from its cache, to learn its device.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

FUSECTL = "/sys/fs/fuse/connections"


class Kind(enum.Enum):
    DMABUF = "dma-buf"
    MEMFD = "memfd"
    VFIO_DEVICE = "VFIO device"
    OTHER = "other"


@dataclass(frozen=True)
class Described:
    kind: Kind
    link: str  # what /proc/self/fd/N reads: a path or a pseudo name

    def __str__(self) -> str:
        if self.kind is not Kind.OTHER:
            return f"a {self.kind.value}"
        return self.link or "of unknown kind"


class BadDescriptor(Exception):
    """A descriptor of a kind the receiver does not take (the message names what it is)."""


_shm_mnt_id: int | None = None


def _fdinfo(fd: int) -> dict[str, str]:
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
        text = f.read(65536).decode("utf-8", "replace")
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key not in fields:
            fields[key] = value.strip()
    return fields


def _memfd_mount() -> int:
    global _shm_mnt_id
    if _shm_mnt_id is None:
        probe = os.memfd_create("directflip-probe", os.MFD_CLOEXEC)
        try:
            _shm_mnt_id = int(_fdinfo(probe)["mnt_id"])
        finally:
            os.close(probe)
    return _shm_mnt_id


def classify(fd: int) -> Described:
    """What `fd` is, without any call into its filesystem. OSError if it is not an open descriptor."""
    info = _fdinfo(fd)
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        link = ""
    if "exp_name" in info:
        return Described(Kind.DMABUF, link)
    if link == "anon_inode:[vfio-device]":
        return Described(Kind.VFIO_DEVICE, link)
    if link.startswith("/memfd:") and info.get("mnt_id") == str(_memfd_mount()):
        return Described(Kind.MEMFD, link)
    return Described(Kind.OTHER, link)


def expect(fd: int, allowed: frozenset[Kind] | set[Kind], what: str) -> Kind:
    """The kind of `fd` if it is one of `allowed`; BadDescriptor naming what it is otherwise (`what`:
    how the message calls it, "the descriptor"). The caller
    still owns `fd` either way (and lets a refused one go through `discard`)."""
    try:
        described = classify(fd)
    except OSError as exc:
        raise BadDescriptor(f"{what} cannot be inspected ({exc.strerror})") from None
    if described.kind in allowed:
        return described.kind
    raise BadDescriptor(f"{what} is {described}, not {wanted(allowed)}")


def wanted(allowed: frozenset[Kind] | set[Kind]) -> str:
    """"a dma-buf or memfd": the kinds in `allowed`, for an error message."""
    names = [k.value for k in Kind if k in allowed]
    return "a " + (", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0])


# --- letting refused descriptors go -----------------------------------------------------------------

_AT_EMPTY_PATH = 0x1000
_AT_STATX_DONT_SYNC = 0x4000
_libc = ctypes.CDLL(None, use_errno=True)


def _device(fd: int) -> tuple[int, int] | None:
    """(major, minor) of the filesystem `fd` lives on, asked so that FUSE answers from its cache."""
    buf = ctypes.create_string_buffer(256)
    if _libc.statx(fd, b"", _AT_EMPTY_PATH | _AT_STATX_DONT_SYNC, 0, buf) != 0:
        return None
    major = int.from_bytes(buf.raw[136:140], "little")
    minor = int.from_bytes(buf.raw[140:144], "little")
    return major, minor


def _mount(mnt_id: int) -> tuple[int, str, str] | None:
    """(device, filesystem type, superblock options) of mount `mnt_id` in this mount namespace."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if not fields or fields[0] != str(mnt_id) or "-" not in fields:
                continue
            major, _, minor = fields[2].partition(":")
            rest = fields[fields.index("-") + 1:]
            return (int(major) << 20) | int(minor), rest[0], rest[2] if len(rest) > 2 else ""
    return None


def _fuse_connection(fd: int, uid: int | None) -> tuple[int, bool] | None:
    """(connection, whether to abort it at once) if `fd` is a FUSE file, None otherwise. At once: a
    mount its sender owns, or one this namespace cannot see (made in a namespace of the sender's);
    another user's mount is left alone unless the compositor is stopping (then a close waiting on it
    would keep the process from ending)."""
    mnt_id = int(_fdinfo(fd).get("mnt_id", "-1"))
    mount = _mount(mnt_id)
    if mount is not None:
        dev, fstype, options = mount
        if fstype != "fuse" and not fstype.startswith(("fuse.", "fuseblk")):
            return None
        owner = next((o.partition("=")[2] for o in options.split(",") if o.startswith("user_id=")), None)
        return dev, uid is not None and owner == str(uid)
    device = _device(fd)
    if device is None:
        return None
    dev = (device[0] << 20) | device[1]
    ctl = _fusectl()
    return (dev, True) if ctl and os.path.isdir(f"{ctl}/{dev}") else None


def _fusectl() -> str | None:
    """fusectl's directory, mounted if it is not (as systemd does at boot); None where it cannot be."""
    if not os.path.isdir(FUSECTL):
        return None
    if os.path.ismount(FUSECTL):
        return FUSECTL
    if _libc.mount(b"fusectl", FUSECTL.encode(), b"fusectl", 0, None) == 0:
        log.info("mounted fusectl on %s to abort FUSE connections of refused descriptors", FUSECTL)
        return FUSECTL
    return None


class Quarantine:
    """Closes refused descriptors on a thread of its own, never on the caller's."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[int, str, int | None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.discarded = 0
        self.aborted = 0  # FUSE connections aborted
        self.pending = 0
        self._closing: int | None = None  # the FUSE connection a close on the thread may be waiting on
        self._stopping = False

    def discard(self, fd: int, who: str, uid: int | None = None) -> None:
        """Let `fd` go: closed at once if it is a kind whose close never waits, on the quarantine thread
        otherwise. `who` sent it, as user `uid` (None: not known). Takes ownership of `fd`."""
        try:
            described = classify(fd)
        except OSError:
            return  # not open: nothing to close
        if described.kind is not Kind.OTHER or described.link.startswith("pipe:["):
            os.close(fd)  # closing these never waits: none has a flush to wait on
            return
        with self._lock:
            self.pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fd-quarantine", daemon=True)
                self._thread.start()
        self._queue.put((fd, who, uid))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fd, who, uid = item
            try:
                self._let_go(fd, who, uid)
            except Exception:  # a thread that dies would leave every later descriptor open
                log.exception("quarantine: closing descriptor %d of %s failed", fd, who)
            with self._lock:
                self.pending -= 1
                self.discarded += 1

    def _let_go(self, fd: int, who: str, uid: int | None) -> None:
        fuse = _fuse_connection(fd, uid)
        with self._lock:
            self._closing = fuse[0] if fuse else None
            now = fuse is not None and (fuse[1] or self._stopping)
        if fuse is not None and now:
            whose = "its own FUSE mount" if fuse[1] else "another user's FUSE mount, as the compositor stops"
            self._abort(fuse[0], f"{who} passed a descriptor of a file on {whose}")
        try:
            os.close(fd)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                log.debug("quarantine: close of a descriptor of %s said %s", who, exc.strerror)
        with self._lock:
            self._closing = None

    def _abort(self, conn: int, why: str) -> None:
        ctl = _fusectl()
        try:
            if ctl is None:
                raise FileNotFoundError(errno.ENOENT, f"no fusectl at {FUSECTL}")
            with open(f"{ctl}/{conn}/abort", "w") as f:
                f.write("1")
            self.aborted += 1
            log.warning("%s (connection %d): the connection is aborted, since closing the descriptor "
                        "would wait on that mount's server", why, conn)
        except OSError as exc:
            log.warning("%s (connection %d) that cannot be aborted (%s): closing it may wait on that "
                        "mount's server", why, conn, exc.strerror)

    def stop(self) -> None:
        """The compositor is ending: a close still waiting on another user's FUSE server would keep the
        process from ending (that wait ignores every signal), so that connection is aborted, as is that
        of every refused descriptor still to be closed."""
        with self._lock:
            self._stopping = True
            conn = self._closing
        if conn is not None:
            self._abort(conn, "stopping, a refused descriptor's close still waits on a FUSE mount")

    def wait_idle(self, timeout: float) -> bool:
        """For tests: True once every discarded descriptor is closed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.pending == 0:
                    return True
            time.sleep(0.01)
        return False


QUARANTINE = Quarantine()


def discard(fd: int, who: str, uid: int | None = None) -> None:
    QUARANTINE.discard(fd, who, uid)
