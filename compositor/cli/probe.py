"""`directflip probe`: its command line. The KMS probe (compositor.probe) is imported when the
command runs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe", help="list KMS devices: connectors, CRTCs, planes and their formats",
        description="Show what each DRM card offers: connectors (status, EDID identity, preferred and "
        "current mode), CRTCs (active, mode) and planes (type, reachable CRTCs, formats with "
        "modifiers). Needs read access to /dev/dri/card*, not DRM master.",
        epilog="The --json document is stable (schema directflip.probe/1, see docs/probe-json.md) and "
        "is what `directflip check --topology` reads. Exit status: 0 when at least one card was "
        "probed (with --libvirt and no card: when a URI was listed), 1 when there is no KMS device.")
    p.add_argument("--device", action="append", metavar="PATH",
                   help="probe only this card (repeatable); default: every /dev/dri/card*")
    p.add_argument("--json", action="store_true", help="print the JSON document instead of a table")
    p.add_argument("--libvirt", action="append", metavar="URI", dest="libvirt_uris",
                   help="also list the domains at this libvirt URI with their D-Bus displays (the "
                   "`kind: libvirt` guests a policy can name; repeatable; e.g. qemu:///system)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from compositor import probe

    return probe.run(args)
