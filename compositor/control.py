"""The control socket and `directflip status` / `directflip capture`.

A Unix stream socket, mode 0600 (only the compositor's user, root on a bare console, may ask). One
request per line, one answer per line, both JSON objects:

    {"cmd": "status"}                               → the status document (schema directflip.status/1)
    {"cmd": "capture", "monitor": M, "path": P}     → {"ok": true, "path": P, "width": W, "height": H}
                                                      a writeback of what monitor M scans out, as PNG
                                                      (P absolute, in a directory that exists)

Errors come back as {"ok": false, "error": "..."}; the connection stays usable, except after a
request longer than MAX_REQUEST bytes, which is answered with the error and then closed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys

log = logging.getLogger("directflip.control")

MAX_REQUEST = 64 * 1024


class ControlServer:
    def __init__(self, path: str, daemon) -> None:
        self.path = path
        self.daemon = daemon
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)
        old = os.umask(0o177)  # the socket is born 0600: no window in which others could connect
        try:
            self.server = await asyncio.start_unix_server(self._client, self.path, limit=MAX_REQUEST)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # over the limit: the rest of that line cannot be told from a request
                    writer.write(_answer({"ok": False, "error": f"bad request: longer than {MAX_REQUEST} "
                                          "bytes; closing the connection"}))
                    await writer.drain()
                    return
                if not line:
                    return
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("a request is a JSON object")
                    answer = await self.handle(request)
                except RecursionError:
                    answer = {"ok": False, "error": "bad request: nested too deeply"}
                except (ValueError, KeyError, TypeError) as exc:
                    answer = {"ok": False, "error": f"bad request: {exc}"}
                except Exception as exc:  # noqa: BLE001 — report it to the caller; the daemon goes on
                    log.exception("control request %r failed", line[:200])
                    answer = {"ok": False, "error": str(exc)}
                writer.write(_answer(answer))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(self, request: dict) -> dict:
        cmd = request.get("cmd")
        if cmd == "status":
            return {"ok": True, **self.daemon.status()}
        if cmd == "capture":
            monitor, path = _string(request, "monitor"), _string(request, "path")
            # The compositor writes the file after the writeback: refuse what cannot be written first.
            if not os.path.isabs(path) or not os.path.isdir(os.path.dirname(path)) or os.path.isdir(path):
                raise ValueError(f'capture: "path" {path!r} is not a file in an existing directory '
                                 "(give an absolute path)")
            return {"ok": True, **await self.daemon.capture(monitor, path)}
        raise ValueError(f"unknown command {cmd!r} (status, capture)")


def _string(request: dict, key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str):
        what = f"must be a string, not {type(value).__name__}" if key in request else "is missing"
        raise ValueError(f'{request["cmd"]}: "{key}" {what}')
    return value


def _answer(answer: dict) -> bytes:
    return json.dumps(answer).encode() + b"\n"


# ----------------------------------------------------------------------------------------- client

def request(path: str, message: dict, timeout: float = 10.0) -> dict:
    """One request to a running compositor. Raises ConnectionError with a helpful message."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except FileNotFoundError:
        raise ConnectionError(f"no compositor control socket at {path}: is `directflip run` running?") \
            from None
    except PermissionError:
        raise ConnectionError(f"no permission to use {path}: it is for the compositor's user (root)") \
            from None
    except ConnectionRefusedError:
        raise ConnectionError(f"nothing listens on {path}: the compositor is not running") from None
    with sock:
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the compositor closed the control connection")
            data += chunk
    answer = json.loads(data)
    if not answer.get("ok"):
        raise RuntimeError(answer.get("error", "request failed"))
    return answer


def _num(value, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def format_status(doc: dict) -> str:
    pol = doc["policy"]
    lines = [f"policy {pol['path']} (generation {pol['generation']})"]
    if pol.get("last_error"):
        lines.append("  last edit REJECTED, the previous policy stays in force:")
        lines += ["    " + line for line in pol["last_error"].splitlines()]
    header = ("monitor", "connector", "guest", "path", "mode", "flips/s", "p50 ms", "p99 ms", "commit us",
              "dropped", "note")
    rows = []
    for o in doc["outputs"]:
        lat = o.get("latency_ms") or {}
        delay = o.get("commit_delay_us") or {}
        rows.append((o.get("monitor") or "-", o["connector"], o.get("guest") or "-", o["path"],
                     o.get("mode", "-"), _num(o.get("flips_per_s")), _num(lat.get("p50"), "{:.2f}"),
                     _num(lat.get("p99"), "{:.2f}"), _num(delay.get("p50"), "{:.0f}"),
                     str(o.get("dropped", "-")), o.get("reason") or ""))
    for d in doc.get("dark", []):
        rows.append((d.get("monitor") or "-", d["connector"], "-", "dark", "-", "-", "-", "-", "-", "-",
                     d["reason"]))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for r in [header, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    if doc.get("guests"):
        lines.append("guests:")
        for g in doc["guests"]:
            lines.append(f"  {g['name']}: pid {g['pid']} uid {g['uid']}, {g['buffers']} buffers, "
                         f"{g['flips']} flips, framebuffer {g['framebuffer'] or 'unknown yet'}")
    for u in doc.get("unplaced", []):
        lines.append(f"unplaced: {u['guest']}: {u['reason']}")
    return "\n".join(lines)


def _control_path(args: argparse.Namespace) -> str:
    from compositor.sources.framesocket import socket_paths

    return args.control or socket_paths(args.seat)[1]


def _status(args: argparse.Namespace) -> int:
    try:
        doc = request(_control_path(args), {"cmd": "status"})
    except (ConnectionError, RuntimeError, OSError) as exc:
        print(f"directflip status: {exc}", file=sys.stderr)
        return 2
    doc.pop("ok", None)
    print(json.dumps(doc, indent=2) if args.json else format_status(doc))
    return 0


def _capture(args: argparse.Namespace) -> int:
    try:
        answer = request(_control_path(args), {"cmd": "capture", "monitor": args.monitor,
                                        "path": os.path.abspath(args.file)}, timeout=30)
    except (ConnectionError, RuntimeError, OSError) as exc:
        print(f"directflip capture: {exc}", file=sys.stderr)
        return 2
    print(f"{args.monitor}: {answer['width']}x{answer['height']} written to {answer['path']}")
    return 0


def register(sub) -> None:
    from compositor.daemon import DEFAULT_CONTROL_SOCKET, RUN_DIR

    def where(p: argparse.ArgumentParser) -> None:
        p.add_argument("--seat", metavar="NAME",
                       help=f"ask the instance for this seat ({RUN_DIR}/NAME/control.sock)")
        p.add_argument("--control", help=f"control socket (default: {DEFAULT_CONTROL_SOCKET})")

    p = sub.add_parser("status", help="what each monitor shows, how (zero-copy, copy, slate) and how fast",
                       description="Ask the running compositor what each output shows: the guest, the path "
                       "(zero-copy: the guest's buffer is on the plane; copy: the card refused it and "
                       "directflip copies each frame; slate: nothing to show, with the reason), flips per "
                       "second over the last second, flip latency p50/p99 (from the guest's flip to the "
                       "kernel's flip timestamp), the commit delay p50 in microseconds (from the guest's "
                       "flip to directflip's commit ioctl returning: its own cost per frame) and frames "
                       "dropped because a newer one arrived first.")
    p.add_argument("--json", action="store_true", help="the status document (schema directflip.status/1)")
    where(p)
    p.set_defaults(func=_status)

    c = sub.add_parser("capture", help="save what a monitor scans out as PNG (needs a writeback connector)",
                       description="Have the display engine write what MONITOR scans out into a buffer and "
                       "save it as PNG: a real readback of the screen, available on cards with a writeback "
                       "connector that can reach the monitor's CRTC (vkms, many SoC display engines).")
    c.add_argument("monitor", help="the policy's monitor name")
    c.add_argument("file", help="PNG file to write (the compositor writes it, as its own user)")
    where(c)
    c.set_defaults(func=_capture)
