"""`directflip run`: its command line. The compositor itself (compositor.daemon) is imported only
when the command runs."""

from __future__ import annotations

import argparse

from compositor.limits import Limits
from compositor.paths import DEFAULT_FRAME_SOCKET, RUN_DIR, socket_paths

DEFAULT_CONTROL_SOCKET = socket_paths(None)[1]


def register(sub) -> None:
    p = sub.add_parser(
        "run", help="run the compositor: show guests on monitors as the policy says",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Run the direct-flip compositor on the bare console (as root, or a user that may
become DRM master). It takes over every display card, lights the monitors the policy names and shows
each guest's framebuffer on its monitor's plane, zero copy where the card accepts the guest's dma-buf,
copied where it does not, and a slate with the reason where nothing can be shown.

Guests connect to the frame socket (docs/frame-socket.md; `directflip guest` is a synthetic one).
The policy file is watched (inotify): a valid edit is applied as soon as it is saved, touching only
the monitors whose assignment changed; an invalid edit is logged with its errors and the running
policy stays. SIGHUP reloads it too. SIGTERM or Ctrl-C turn every output off, free every buffer
and give the console back.

Session (--session): `direct` is root on the bare console: directflip opens the cards, takes DRM
master itself and, given a VT (--vt), holds it in graphics mode. Switching to another VT (Ctrl-Alt-Fn,
chvt) stops every commit, waits for the flips in flight, drops master and lets the console show;
switching back takes master again, turns every output off once ("reset the world") and shows every
guest again. `logind` runs inside a systemd-logind session (TakeControl/TakeDevice): logind hands over
the cards and pauses/resumes them on VT switches the same way. `auto` is logind when $XDG_SESSION_ID
is set, else direct.

Input: the seat's keyboards, mice, tablets and touchscreens go to the guest on the focused monitor
(policy `seats` and `position`; --no-input takes none). Bare console: opened and grabbed (EVIOCGRAB),
let go while another VT is in front. Ctrl+Alt+N shows the next guest allowed on the focused monitor,
Ctrl+Alt+M moves the focus, Ctrl+Alt+G lets go of the devices and takes them back, Ctrl+Alt+Fn
switches VT (policy `hotkeys`). `directflip show GUEST MONITOR` / `show --reset` and `directflip focus
MONITOR` do the same from a shell. Keys held in a guest are released there before input moves away.
The guest's pointer image goes on the monitor's cursor plane.

Seats (--seat): an instance for one logind seat uses only the cards udev puts on that seat
(ID_SEAT, seat0 when unset) and its own sockets under /run/directflip/SEAT/, so instances for
different seats never touch each other's monitors. Policy seats then split that card's monitors
between guests. Units and udev rules for kiosks and multi-seat rooms are in udev/ (README: Kiosk).

Under systemd (Type=notify) it sends READY=1 once the monitors are lit and WATCHDOG=1 from its
event loop when WatchdogSec is set; STATUS= (the line `systemctl status` shows) says what each
monitor shows, e.g. "3 lit: office→left zero-copy, media→centre copy, right slate", and follows every
plan and guest change. Logging to the journal ($JOURNAL_STREAM is stderr), each line carries its
syslog priority and INFO is logged without -v: guests coming and going, each plan, fallbacks, reloads.

Ask a running compositor with `directflip status` (`--seat NAME` for a seat instance).""",
        epilog="examples:\n  directflip init -o policy.yaml && directflip run --policy policy.yaml\n"
               "  directflip run --policy /etc/directflip/policy.yaml --vt 7\n"
               "  directflip run --seat seat1 --session logind --policy /etc/directflip/seat1.yaml")
    p.add_argument("--policy", required=True, help="policy YAML file (see policies/README.md)")
    p.add_argument("--seat", metavar="NAME",
                   help="run for this logind seat only: its cards (udev ID_SEAT) and sockets under "
                   f"{RUN_DIR}/NAME/ (default: every card, sockets in {RUN_DIR}/)")
    p.add_argument("--session", choices=("auto", "direct", "logind"), default="auto",
                   help="how the screens are held (see above; default: %(default)s)")
    p.add_argument("--vt", default="auto", metavar="N|auto|none",
                   help="direct session: the VT to hold and switch to (auto: the VT on stdin, if it is "
                   "one; none: no VT handling, e.g. on a box with no console; default: %(default)s)")
    p.add_argument("--socket", help=f"frame socket path (default: {DEFAULT_FRAME_SOCKET}, or "
                   f"{RUN_DIR}/SEAT/frames.sock with --seat)")
    p.add_argument("--control", help=f"control socket path, mode 0600 (default: {DEFAULT_CONTROL_SOCKET}, "
                   f"or {RUN_DIR}/SEAT/control.sock with --seat)")
    p.add_argument("--device", action="append", metavar="PATH",
                   help="use only this card (repeatable; default: every /dev/dri/card*)")
    p.add_argument("--no-input", action="store_true",
                   help="take no keyboard, mouse or touch device: display only (see Input above)")
    p.add_argument("--pure-python", action="store_true",
                   help="flip through the Python atomic path and copy (the copy rung) in Python "
                   "instead of native/kms_helpers.c (for comparison)")
    p.add_argument("--data-plane", choices=("native", "python"), default="native",
                   help="who flips the frames of frame-socket guests (protocol version 2) shown zero copy: "
                   "native = the C data plane's thread (native/dataplane.c, docs/data-plane.md), python = "
                   "the daemon's loop, kept for comparison (default: %(default)s; --pure-python implies "
                   "python)")
    limits = p.add_argument_group(
        "limits of frame-socket clients",
        "What clients of the frame socket may hold, so that none can starve the others. Each refusal "
        "names the limit it hit. At start the descriptor limit is raised to cover connections x (17 + "
        "buffers) plus the compositor's own (the unit's LimitNOFILE bounds it).")
    limits.add_argument("--hello-timeout", type=_positive_float, default=Limits.hello_timeout,
                        metavar="SECONDS", help="a client that has not said hello by then is closed "
                        "(default: %(default)s)")
    limits.add_argument("--max-connections", type=_positive_int, default=Limits.connections, metavar="N",
                        help="connections at once, admitted or not; more are refused as they connect "
                        "(default: %(default)s)")
    limits.add_argument("--max-connections-per-user", type=_positive_int, default=Limits.per_user,
                        metavar="N", help="... of one uid (default: %(default)s)")
    limits.add_argument("--max-buffers", type=_positive_int, default=Limits.buffers, metavar="N",
                        help="buffers one guest may have announced at once (default: %(default)s)")
    limits.add_argument("--max-buffer-bytes", type=_positive_int, default=Limits.buffer_bytes, metavar="N",
                        help="bytes the planes of one guest's buffers may span together: what copying "
                        "them may map or read (default: %(default)s, 2 GiB)")
    p.set_defaults(func=_run)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def _run(args: argparse.Namespace) -> int:
    from compositor import daemon

    return daemon.run_command(args)
