"""`directflip check`: its command line. The checker (compositor.check) is imported when the
command runs."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Validate a directflip policy and print the plan it gives: which guest each monitor shows, in which
mode, through which CRTC and plane, and with which source and destination rectangles.

The plan is made for the live KMS topology (as `directflip probe` sees it), or for a saved
`directflip probe --json` given with --topology. Guests are imagined from the policy (one running
guest per guest rule, shown by its name or pattern, framebuffer size unknown) unless described with
--guest. The PATH column predicts the scanout path: zero-copy, or copy where the card is known to
refuse the planned placement (the compositor then copies each frame into a screen-sized buffer).

A monitor of the policy that matches no connected output is a warning; a policy that lights no
monitor at all is an error (exit 1): `directflip init` writes one for the monitors plugged in.

`kind: libvirt` guests are checked against libvirt when it can be asked (the domain must exist and
have a <graphics type='dbus'> display); when it cannot, a note says why and the check goes on."""

EPILOG = """\
--guest SPEC describes one running guest: NAME[,kind=vfio|qemu-dbus|libvirt|socket][,size=WxH]
[,format=FOURCC][,modifier=MOD][,uuid=UUID] (no kind: any kind). Repeat it for each guest; when
given, only these run.

examples:
  directflip check policies/desk.yaml
  directflip check kiosk.yaml --guest signage,size=1920x1080 --unplug HDMI-A-1
  directflip check multiseat.yaml --topology probe.json --render layout.png

exit status: 0 valid, 1 invalid (policy or topology file) or lights no monitor, 2 usage (bad
arguments, unreadable file, no KMS device without --topology, --render without Pillow)"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check", help="validate a policy and print the plan it gives", description=DESCRIPTION,
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("policy", metavar="POLICY", help="the policy file (YAML)")
    p.add_argument("--topology", metavar="PROBE.json",
                   help="plan for this saved `directflip probe --json` instead of the live devices")
    p.add_argument("--render", metavar="LAYOUT.png", help="also draw the plan into this PNG (needs Pillow)")
    p.add_argument("--guest", metavar="SPEC", action="append", default=[],
                   help="a running guest to plan for (repeatable; see below)")
    p.add_argument("--unplug", metavar="CONNECTOR", action="append", default=[],
                   help="plan as if this connector (NAME or CARD:NAME) were unplugged (repeatable)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from compositor import check

    return check.run(args)
