"""`directflip status`, `capture`, `show` and `focus`: their command lines. Each asks the running
compositor over its control socket (compositor.control, imported when the command runs)."""

from __future__ import annotations

import argparse

from compositor.paths import RUN_DIR, socket_paths


def register(sub) -> None:
    default_control = socket_paths(None)[1]

    def where(p: argparse.ArgumentParser) -> None:
        p.add_argument("--seat", metavar="NAME",
                       help=f"ask the instance for this seat ({RUN_DIR}/NAME/control.sock)")
        p.add_argument("--control", help=f"control socket (default: {default_control})")

    p = sub.add_parser("status", help="what each monitor shows, how (zero-copy, copy, slate) and how fast",
                       description="Ask the running compositor what each output shows: the guest, the path "
                       "(zero-copy: the guest's buffer is on the plane; copy: the card refused it and "
                       "directflip copies each frame; slate: nothing to show, with the reason), flips per "
                       "second over the last second, flip latency p50/p99 (from the guest's flip to the "
                       "kernel's flip timestamp), the commit delay p50 in microseconds (from the guest's "
                       "flip to directflip's commit ioctl returning: its own cost per frame) and frames "
                       "dropped because a newer one arrived first. Above that: directflip's version and "
                       "uptime, and the session (each card active, or paused and why: VT switched away, "
                       "logind paused it); below: the guests, a QEMU display's connection (connected, "
                       "waiting for the VM, or the error).")
    p.add_argument("--json", action="store_true", help="the status document (schema directflip.status/1)")
    where(p)
    p.set_defaults(func=_status)

    c = sub.add_parser("capture", help="save what a monitor shows as PNG",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="""Save what MONITOR shows as a PNG of its mode's size.

Where the card has a writeback connector that can reach the monitor's CRTC (vkms, many SoC display
engines), the display engine writes what the CRTC scans out: a real readback of the screen
(source: writeback).

Elsewhere (virtio-gpu, most desktop GPUs) directflip reads the buffer on the monitor's plane, i.e.
what was committed (source: buffer): the guest's dma-buf when it is shown zero copy (mapped
read-only, DMA_BUF_IOCTL_SYNC around the read, the buffer held so the guest does not draw into it
meanwhile), or directflip's own copy or slate buffer. The plane's source rectangle is placed where the
plane shows it, black around it. XRGB8888, ARGB8888 and the other 8-bit RGB formats can be read; a
dma-buf its exporter will not map, or a tiled one, is refused with the reason.

The line printed says which source was used.""",
                       epilog="example:\n  $ directflip capture left /root/left.png\n"
                       "  left: 1024x768 written to /root/left.png (buffer: what was committed, guest office "
                       "frame 17)")
    c.add_argument("monitor", help="the policy's monitor name")
    s = sub.add_parser("show", help="show a guest on a monitor now (a runtime override of the plan)",
                       description="Show GUEST on MONITOR until `directflip show --reset` or the compositor "
                       "restarts. The policy file is not changed. The guest keeps its own placement too, "
                       "and the guest MONITOR showed moves to its failovers. The override obeys the seats "
                       "of the guest's placements, as placements do. `directflip status` lists overrides. "
                       "The next-guest hotkey (default Ctrl+Alt+N) does the same on the focused monitor, "
                       "cycling through the guests the policy could place there.",
                       epilog="examples:\n  directflip show media left\n  directflip show --reset",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("guest", nargs="?", help="a running guest's name")
    s.add_argument("monitor", nargs="?", help="the policy's monitor name")
    s.add_argument("--reset", action="store_true", help="clear every override: back to the policy")
    where(s)
    s.set_defaults(func=_show)
    f = sub.add_parser("focus", help="send a seat's keyboard and pointer to what a monitor shows",
                       description="Move the focus of MONITOR's seat to MONITOR: that seat's keyboard and "
                       "pointer go to the guest shown there, and the pointer jumps to its centre. Keys "
                       "and buttons held in the guest that had the focus are released there first. The "
                       "next-monitor hotkey (default Ctrl+Alt+M) and the pointer crossing a monitor's "
                       "edge move the focus too.")
    f.add_argument("monitor", help="the policy's monitor name")
    where(f)
    f.set_defaults(func=_focus)
    c.add_argument("file", help="PNG file to write (the compositor writes it, as its own user)")
    where(c)
    c.set_defaults(func=_capture)


def _status(args: argparse.Namespace) -> int:
    from compositor import control

    return control.status_command(args)


def _capture(args: argparse.Namespace) -> int:
    from compositor import control

    return control.capture_command(args)


def _show(args: argparse.Namespace) -> int:
    from compositor import control

    return control.show_command(args)


def _focus(args: argparse.Namespace) -> int:
    from compositor import control

    return control.focus_command(args)
