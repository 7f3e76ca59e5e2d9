"""sd_notify for a Type=notify service, spoken directly over the notify socket.

The protocol is small enough to carry by hand, so no systemd binding is needed. systemd passes a
datagram socket in $NOTIFY_SOCKET: a filesystem path ("/run/systemd/notify") or an abstract name
written with a leading "@" (the "@" stands for the NUL byte of the kernel's address). Each
notification is one datagram of newline-separated KEY=VALUE assignments:

    READY=1           startup is done: `systemctl start` returns, units ordered after this one start
    STATUS=...        one line shown by `systemctl status`
    MAINPID=...       the service's main process
    STOPPING=1        shutdown has begun
    WATCHDOG=1        the keep-alive ping

The sender's PID reaches systemd through the socket's credentials; with NotifyAccess=main only the
main process is listened to.

Without $NOTIFY_SOCKET the process is not running under a Type=notify service manager, and every
method does nothing: that is sd_notify(3)'s documented behaviour, not an error.

The watchdog. With WatchdogSec= set, systemd exports $WATCHDOG_USEC (and $WATCHDOG_PID, the process
it is meant for) and kills and restarts the service when no WATCHDOG=1 arrives within that time. The
ping is scheduled on the daemon's asyncio loop, every half period, from the loop itself: if the loop
wedges (a blocking call, a busy callback, a deadlock), the pings stop and systemd steps in. A thread
would keep pinging for a dead loop and defeat the purpose. The variables follow sd_watchdog_enabled(3):
WATCHDOG_USEC must be a positive integer; a WATCHDOG_PID naming another process means the watchdog is
not ours (it was inherited), so no pings are sent.

Sending never raises into the daemon. A notify socket that has gone away (systemd re-executing, a
test's fake socket closed) is logged once at warning, later failures at debug until a send works again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger("directflip.notify")

# What systemd exports to the service's main process; children (launched VMMs) must not inherit it.
NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _address(value: str) -> bytes:
    """The kernel address for a $NOTIFY_SOCKET value: a path as is, "@name" as an abstract name."""
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    raise ValueError(f"NOTIFY_SOCKET={value!r}: expected an absolute socket path (/...) or an abstract "
                     "socket name (@name); other address kinds are not supported")


def _positive_int(name: str, value: str) -> int:
    number = int(value) if value.isascii() and value.isdigit() else 0
    if number <= 0:
        raise ValueError(f"{name}={value!r}: expected a positive integer")
    return number


def _one_line(text: str) -> str:
    """A value may not contain a newline: it would start the next assignment."""
    return " ".join(text.splitlines())


class Notifier:
    """Notifications to the service manager. Build it with `from_env()`; with no socket it does nothing.

    `enabled`: there is a notify socket. `watchdog_usec`: the watchdog period in microseconds when
    the watchdog is meant for this process, else None; `watchdog_enabled` says whether
    `start_watchdog` will ping.
    """

    def __init__(self, socket_path: str | None = None, watchdog_usec: int | None = None) -> None:
        self.socket_path = socket_path
        self._address = _address(socket_path) if socket_path is not None else None
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._failing = False
        self._watchdog: asyncio.TimerHandle | None = None

    @classmethod
    def from_env(cls) -> Notifier:
        """Read $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID. Raises ValueError naming the
        variable when one is set but malformed."""
        path = os.environ.get("NOTIFY_SOCKET")
        usec = None
        raw_usec = os.environ.get("WATCHDOG_USEC")
        if raw_usec is not None:
            usec = _positive_int("WATCHDOG_USEC", raw_usec)
            raw_pid = os.environ.get("WATCHDOG_PID")
            if raw_pid is not None:
                pid = _positive_int("WATCHDOG_PID", raw_pid)
                if pid != os.getpid():
                    log.debug("WATCHDOG_PID=%d is not this process (%d): watchdog not ours, no pings",
                              pid, os.getpid())
                    usec = None
        if path is None:
            log.debug("no NOTIFY_SOCKET: not under a Type=notify service manager, notifications are off")
            return cls(None, None)
        notifier = cls(path, usec)
        log.debug("notify socket %s, watchdog %s", path,
                  f"every {usec / 2e6:.3g} s (WATCHDOG_USEC={usec})" if usec else "off")
        return notifier

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_enabled(self) -> bool:
        return self.enabled and self.watchdog_usec is not None

    def notify(self, *assignments: str) -> bool:
        """Send one datagram of KEY=VALUE lines. True when it was sent; False when notifications are
        off or the send failed (logged, never raised)."""
        if self._address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX,
                                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            self._sock.sendto(message, self._address)
        except OSError as exc:
            if not self._failing:
                self._failing = True
                log.warning("cannot notify the service manager at %s (%s); further failures are logged "
                            "at debug", self.socket_path, exc)
            else:
                log.debug("notify %s failed: %s", assignments, exc)
            return False
        if self._failing:
            self._failing = False
            log.info("the service manager's notify socket %s answers again", self.socket_path)
        return True

    def ready(self, status: str) -> bool:
        """Startup is done: READY=1 with a status line and the main PID."""
        return self.notify("READY=1", f"STATUS={_one_line(status)}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def start_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ping now and then every half watchdog period from `loop`, until `stop_watchdog()`. Does
        nothing when the watchdog is off or already running."""
        if not self.watchdog_enabled or self._watchdog is not None:
            return
        assert self.watchdog_usec is not None
        interval = self.watchdog_usec / 2e6

        def ping() -> None:
            self.notify("WATCHDOG=1")
            self._watchdog = loop.call_later(interval, ping)

        log.debug("watchdog: WATCHDOG=1 every %.3g s from the event loop", interval)
        ping()

    def stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def close(self) -> None:
        self.stop_watchdog()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
