"""The line protocol between the guest and the host that booted it.

The only pipes between a virtme-ng guest and its host are the ``--exec`` command's stdin and stdout, so
the lab multiplexes a request channel onto them:

- guest -> host, on the guest's stdout: one line ``@@directflip-lab {"id": 7, "op": "screendump",
  "head": 0}``. The prefix may follow other output on the same line (pytest prints progress without a
  newline); everything before it is ordinary output.
- host -> guest, on the guest's stdin: exactly one JSON line per request,
  ``{"id": 7, "ok": true, "result": {...}}`` or ``{"id": 7, "ok": false, "error": "message"}``.

Every other stdout line is forwarded by the host to its own stdout as it arrives. Requests are served
one at a time, in order; a guest has at most one outstanding request.

Operations: ``ping``; ``screendump {head, format}`` -> ``{path, size, format}`` (a file in the shared
directory, same path in guest and host); ``plug {head, width, height}``; ``unplug {head}``;
``input {events}``; ``progress {event, test, …}`` (the lab's pytest plugin, `directflip_tools.lab.progress`).

pytest captures fds 0 to 2, so the guest launcher duplicates them first and passes the copies to the
command as ``DIRECTFLIP_LAB_CHANNEL=<read fd>,<write fd>``.
"""

from __future__ import annotations

import json
import os
import select
import threading
import time
from typing import Any

PREFIX = "@@directflip-lab "
CHANNEL_ENV = "DIRECTFLIP_LAB_CHANNEL"
SHARED_ENV = "DIRECTFLIP_LAB_SHARED"
MANIFEST_ENV = "DIRECTFLIP_LAB_MANIFEST"


class ChannelError(RuntimeError):
    """The channel is missing or broken, or the host answered a request with an error."""


def encode_request(request_id: int, op: str, args: dict[str, Any]) -> bytes:
    return (PREFIX + json.dumps({"id": request_id, "op": op, **args}, separators=(",", ":")) + "\n").encode()


def split_request(line: bytes) -> tuple[bytes, dict[str, Any] | None]:
    """Split one stdout line into (ordinary output before the request, request or None)."""
    at = line.find(PREFIX.encode())
    if at < 0:
        return line, None
    try:
        request = json.loads(line[at + len(PREFIX):])
    except ValueError:
        return line, None
    if not isinstance(request, dict) or "op" not in request:
        return line, None
    return line[:at], request


def encode_reply(request_id: Any, result: dict[str, Any] | None = None, error: str | None = None) -> bytes:
    if error is not None:
        body: dict[str, Any] = {"id": request_id, "ok": False, "error": error}
    else:
        body = {"id": request_id, "ok": True, "result": result or {}}
    return (json.dumps(body, separators=(",", ":")) + "\n").encode()


class HostChannel:
    """Guest side: send a request, wait for its reply."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._rfd, self._wfd = read_fd, write_fd
        self._buf = b""
        self._next_id = 1
        self._lock = threading.Lock()

    _shared: dict[str, HostChannel] = {}

    @classmethod
    def from_env(cls) -> HostChannel:
        """The process's one channel on the fds in $DIRECTFLIP_LAB_CHANNEL: every caller shares it, so
        its lock keeps one request outstanding and replies cannot reach the wrong caller."""
        value = os.environ.get(CHANNEL_ENV)
        if not value:
            raise ChannelError(f"${CHANNEL_ENV} is not set: these tests run inside the lab VM; "
                               "run them through `python -m directflip_tools.lab test`")
        try:
            rfd, wfd = (int(part) for part in value.split(","))
            os.fstat(rfd)
            os.fstat(wfd)
        except (ValueError, OSError) as exc:
            raise ChannelError(f"${CHANNEL_ENV}={value!r} does not name two open fds: {exc}") from None
        if value not in cls._shared:
            cls._shared[value] = cls(rfd, wfd)
        return cls._shared[value]

    def call(self, op: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
        with self._lock:
            request_id = self._next_id
            self._next_id += 1
            os.write(self._wfd, encode_request(request_id, op, args))
            deadline = time.monotonic() + timeout
            while True:
                reply = self._read_line(deadline, op)
                try:
                    body = json.loads(reply)
                except ValueError:
                    continue  # not ours: the channel carries nothing else, but never trip on noise
                if body.get("id") != request_id:
                    continue
                if not body.get("ok"):
                    raise ChannelError(f"host {op} failed: {body.get('error')}")
                return body.get("result") or {}

    def _read_line(self, deadline: float, op: str) -> bytes:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelError(f"no reply from the host to {op!r}")
            ready, _, _ = select.select([self._rfd], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._rfd, 65536)
            if not chunk:
                raise ChannelError(f"host channel closed while waiting for {op!r}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    # Convenience wrappers: one per host operation.
    def ping(self) -> dict[str, Any]:
        return self.call("ping")

    def screendump(self, head: int, fmt: str = "ppm") -> dict[str, Any]:
        return self.call("screendump", head=head, format=fmt)

    def plug(self, head: int, width: int, height: int) -> dict[str, Any]:
        return self.call("plug", head=head, width=width, height=height)

    def input(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        return self.call("input", events=events)

    def unplug(self, head: int) -> dict[str, Any]:
        return self.call("unplug", head=head)
