"""The control socket and `directflip status` / `directflip capture`.

A Unix stream socket, mode 0600 (only the compositor's user, root on a bare console, may ask). One
request per line, one answer per line, both JSON objects:

    {"cmd": "status"}                               → the status document (schema directflip.status/1)
    {"cmd": "capture", "monitor": M, "path": P}     → {"ok": true, "path": P, "width": W, "height": H,
                                                       "monitor", "guest", "frame", "source", "scanout"}
                                                      what monitor M shows, as PNG (P absolute, in a
                                                      directory that exists). "source": "writeback"
                                                      (the card's writeback connector wrote what the
                                                      CRTC scanned out) or "buffer" (no writeback
                                                      connector: the buffer on the plane was read,
                                                      i.e. what was committed); "scanout": zero-copy,
                                                      copy or slate; "frame": {"buffer", "frame"} of
                                                      the guest's frame shown, null for the slate

    {"cmd": "show", "guest": G, "monitor": M}       → {"ok": true, "guest": G, "monitor": M}: show guest G
                                                      on monitor M until reset (a runtime override of the
                                                      plan, never written to the policy; it obeys the
                                                      seats of G's placements)
    {"cmd": "show", "reset": true}                  → {"ok": true, "cleared": [monitors]}
    {"cmd": "focus", "monitor": M}                  → {"ok": true, "seat": S, "monitor": M, "guest": G}:
                                                      seat S's keyboard and pointer go to what M shows

Errors come back as {"ok": false, "error": "..."}; the connection stays usable, except after a
request longer than MAX_REQUEST bytes, which is answered with the error and then closed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from typing import TYPE_CHECKING

from compositor.paths import socket_paths

if TYPE_CHECKING:  # the server runs inside the daemon, which has asyncio loaded already; `status` needs none
    import asyncio

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
        import asyncio

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
            # The compositor writes the file after reading the picture: refuse what cannot be written
            # first, saying which part of the path is wrong.
            problem = _unwritable(path)
            if problem:
                raise ValueError(f'capture: "path" {path!r} {problem}')
            from compositor.capture import CaptureError  # the server side only: it needs numpy

            try:
                return {"ok": True, **await self.daemon.capture(monitor, path)}
            except CaptureError as exc:  # a reason for the caller, not a bug worth a traceback
                return {"ok": False, "error": f"capture: {exc}"}
        if cmd == "show":
            if request.get("reset") is True:
                return {"ok": True, "cleared": self.daemon.reset_overrides()}
            guest, monitor = _string(request, "guest"), _string(request, "monitor")
            try:
                self.daemon.show(guest, monitor)
            except ValueError as exc:  # the operator's mistake, not a bad request
                return {"ok": False, "error": f"show: {exc}"}
            return {"ok": True, "guest": guest, "monitor": monitor}
        if cmd == "focus":
            try:
                return {"ok": True, **self.daemon.focus(_string(request, "monitor"))}
            except ValueError as exc:
                return {"ok": False, "error": f"focus: {exc}"}
        raise ValueError(f"unknown command {cmd!r} (status, capture, show, focus)")


def _unwritable(path: str) -> str | None:
    """Why `path` cannot be the capture's file, or None."""
    if not os.path.isabs(path):
        return "is not absolute (give an absolute path)"
    if os.path.isdir(path):
        return "is a directory (give a file name in it)"
    if not os.path.isdir(os.path.dirname(path)):
        return f"is not a file in an existing directory: {os.path.dirname(path)} does not exist"
    return None


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


def _duration(seconds: float) -> str:
    """An uptime as people read one: the two or three largest units."""
    rest = int(seconds)
    days, rest = divmod(rest, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _session_line(doc: dict) -> str | None:
    """How the screens are held, card by card: active, or paused and why (VT elsewhere, logind)."""
    session = doc.get("session")
    if not session:
        return None
    where = ""
    if session.get("vt") is not None:
        where = f" on VT {session['vt']}"
    elif session.get("session_id") is not None:
        where = f" (logind session {session['session_id']})"
    paused = session.get("paused") or {}
    # "state" is in each card since it was added to directflip.status/1; paused alone says as much.
    cards = [(c["path"], c.get("state") or ("paused" if c["path"] in paused else "active"))
             for c in doc.get("cards", [])]
    states = [f"{path} paused ({paused[path]})" if state == "paused" and path in paused else f"{path} {state}"
              for path, state in cards]
    return f"session {session.get('kind', '?')}{where}: " + (", ".join(states) or "no card")


def _qemu_line(qemu: dict) -> str:
    """A QEMU display's connection: connected (to which VM), waiting for the VM, or the error."""
    error = qemu.get("error")
    # "connection" came later than "state": an older compositor's status has only the latter.
    state = qemu.get("connection") or qemu.get("state") or "?"
    if state == "connected":
        text = f"connected to VM {qemu.get('vm')!r}, console {qemu.get('console') or '?'}"
        if qemu.get("path"):
            text += f", {qemu['path']}"
        if error:
            text += f"; last refused: {error}"
    elif state == "waiting":
        text = "waiting for the VM" + (f" ({error})" if error else "")
    elif state == "error":
        text = f"error: {error}"
    else:
        text = state + (f" ({error})" if error else "")
    line = f"    QEMU display {qemu.get('target', '?')}: {text}"
    lv = qemu.get("libvirt")
    if lv:
        daemon = lv.get("libvirtd") or {}
        line += f"\n    libvirt: domain {lv.get('name') or lv.get('domain')} {lv.get('state') or 'unknown'}"
        if lv.get("display"):
            line += f", D-Bus display {'peer to peer' if lv['display'] == 'p2p' else 'on its bus'}"
        if daemon.get("state") != "connected":
            line += f"; libvirtd {daemon.get('state')}: {daemon.get('error') or ''}".rstrip(": ")
        if lv.get("taken_over"):
            line += f"; {lv['taken_over']}"
    return line


def format_status(doc: dict) -> str:
    lines = _heading_lines(doc)
    lines += _output_table(doc)
    lines += _guest_lines(doc.get("guests"))
    for u in doc.get("unplaced", []):
        lines.append(f"unplaced: {u['guest']}: {u['reason']}")
    lines += _launched_lines(doc.get("launched"))
    if doc.get("overrides"):
        shown = ", ".join(f"{g} on {m}" for m, g in doc["overrides"].items())
        lines.append(f"shown by `directflip show`: {shown} (`directflip show --reset` ends it)")
    lines += _input_lines(doc.get("input"))
    return "\n".join(lines)


def _heading_lines(doc: dict) -> list[str]:
    """The compositor's version and uptime, the session, and the policy in force with the error that
    kept its last edit out."""
    pol = doc["policy"]
    lines = []
    if "version" in doc:
        up = f", up {_duration(doc['uptime_s'])}" if doc.get("uptime_s") is not None else ""
        seat = f", seat {doc['seat']}" if doc.get("seat") else ""
        lines.append(f"directflip {doc['version']}{up}{seat}")
    session = _session_line(doc)
    if session is not None:
        lines.append(session)
    lines.append(f"policy {pol['path']} (generation {pol['generation']})")
    if pol.get("last_error"):
        lines.append("  last edit REJECTED, the previous policy stays in force:")
        lines += ["    " + line for line in pol["last_error"].splitlines()]
    return lines


def _output_table(doc: dict) -> list[str]:
    """One row per output, lit ones then dark ones, in columns as wide as their widest cell; the last
    column (the note) is left ragged."""
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
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1]
            for r in [header, *rows]]


def _guest_lines(guests: list[dict] | None) -> list[str]:
    """Each connected guest's process, buffers and flips, and its QEMU display when it has one."""
    if not guests:
        return []
    lines = ["guests:"]
    for g in guests:
        lines.append(f"  {g['name']}: pid {g['pid']} uid {g['uid']}, {g['buffers']} buffers, "
                     f"{g['flips']} flips, framebuffer {g['framebuffer'] or 'unknown yet'}")
        if g.get("qemu"):
            lines.append(_qemu_line(g["qemu"]))
    return lines


def _launched_lines(launched: dict | None) -> list[str]:
    """The VMMs the compositor started: command, pid, scope, whether it runs and is shown."""
    lines = []
    for name, vmm in (launched or {}).items():
        scope = f" in {vmm['scope']}" if vmm.get("scope") else ""
        state = "running" if vmm.get("running") else "not running"
        att = "shown" if vmm.get("attached") else vmm.get("error") or "not attached"
        lines.append(f"launched: {name}: {vmm.get('command')} pid {vmm.get('pid')}{scope}, {state}; {att}")
    return lines


def _input_lines(inp: dict | None) -> list[str]:
    """The seats' focus and the devices, for `directflip status`."""
    if inp is None:
        return []
    lines = []
    for name, seat in inp.get("seats", {}).items():
        where = seat.get("focused") or "no monitor"
        state = "" if seat.get("grabbed", True) else ", released (Ctrl+Alt+G takes it back)"
        lines.append(f"input: seat {name}: focus on {where} ({seat.get('guest') or 'slate'}){state}")
    devices = [d for d in inp.get("devices", []) if "name" in d]
    if devices:
        lines.append("  devices: " + ", ".join(f"{d['name']} ({'/'.join(d['kinds'])})" for d in devices))
    if inp.get("paused"):
        lines.append(f"  paused: {inp['paused']}")
    return lines


def _control_path(args: argparse.Namespace) -> str:
    return args.control or socket_paths(args.seat)[1]


def status_command(args: argparse.Namespace) -> int:
    try:
        doc = request(_control_path(args), {"cmd": "status"})
    except (ConnectionError, RuntimeError, OSError) as exc:
        print(f"directflip status: {exc}", file=sys.stderr)
        return 2
    doc.pop("ok", None)
    print(json.dumps(doc, indent=2) if args.json else format_status(doc))
    return 0


def capture_command(args: argparse.Namespace) -> int:
    try:
        answer = request(_control_path(args), {"cmd": "capture", "monitor": args.monitor,
                                        "path": os.path.abspath(args.file)}, timeout=120)
    except (ConnectionError, RuntimeError, OSError) as exc:
        print(f"directflip capture: {exc}", file=sys.stderr)
        return 2
    print(f"{args.monitor}: {answer['width']}x{answer['height']} written to {answer['path']} "
          f"({describe_capture(answer)})")
    return 0


def show_command(args: argparse.Namespace) -> int:
    if args.reset == bool(args.guest):
        print("directflip show: give GUEST MONITOR, or --reset", file=sys.stderr)
        return 2
    message = {"cmd": "show", "reset": True} if args.reset else \
        {"cmd": "show", "guest": args.guest, "monitor": args.monitor}
    try:
        answer = request(_control_path(args), message)
    except (ConnectionError, RuntimeError, OSError) as exc:
        print(f"directflip show: {exc}", file=sys.stderr)
        return 2
    if args.reset:
        cleared = answer.get("cleared") or []
        print(f"back to the policy: {', '.join(cleared)}" if cleared else "no override was set")
    else:
        print(f"{args.monitor} shows {args.guest} (until `directflip show --reset`)")
    return 0


def focus_command(args: argparse.Namespace) -> int:
    try:
        answer = request(_control_path(args), {"cmd": "focus", "monitor": args.monitor})
    except (ConnectionError, RuntimeError, OSError) as exc:
        print(f"directflip focus: {exc}", file=sys.stderr)
        return 2
    print(f"seat {answer['seat']}: focus on {answer['monitor']} ({answer.get('guest') or 'a slate'})")
    return 0


def describe_capture(answer: dict) -> str:
    """Where a capture's picture came from, e.g. `buffer: what was committed, guest office frame 17`."""
    source = answer.get("source", "writeback")
    what = {"writeback": "what the CRTC scanned out", "buffer": "what was committed"}.get(source, source)
    frame = answer.get("frame")
    if frame is None:
        shown = "the slate"
    else:
        shown = f"guest {answer.get('guest')} frame {frame.get('frame')}"
        if answer.get("scanout") == "copy":
            shown += " (copied)"
    return f"{source}: {what}, {shown}"
