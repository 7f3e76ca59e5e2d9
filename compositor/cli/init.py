"""`directflip init`: its command line. The policy writer (compositor.init) is imported when the
command runs."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Write a policy for the monitors plugged in now (as `directflip probe` sees them), or for a saved
`directflip probe --json` given with --topology: one monitor per connected connector, bound by port
and connector, one placeholder guest per monitor, and commented examples of each guest kind. Edit the
guests, then check the result with `directflip check FILE`."""

EPILOG = """\
examples:
  directflip init                                  # print a policy for this machine
  directflip init -o /etc/directflip/policy.yaml   # write it where directflip.service reads it
  directflip init --topology desk.json -o desk.yaml

exit status: 0 written, 1 no connected monitor, an invalid topology file, or FILE exists (use
--force), 2 usage (bad arguments, unreadable file, no KMS device without --topology)"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("init", help="write a policy for the monitors plugged in now",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", metavar="PROBE.json",
                   help="write it for this saved `directflip probe --json` instead of the live devices")
    p.add_argument("-o", "--output", metavar="FILE", help="write the policy here (default: print it)")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from compositor import init

    return init.run(args)
