"""Command line of the lab: ``python -m directflip_tools.lab {setup,run,test}``."""

from __future__ import annotations

import argparse
import sys

from directflip_tools.lab import cache, vm

LAB_TESTS = ["tests/lab/guest", "tests/reliability/lab"]   # what `test` runs unless tests are named

DESCRIPTION = """\
The real-kernel lab: a Debian kernel booted under QEMU (TCG) with a three-head virtio-gpu, vkms
(overlays, cursor, writeback), vgem and mbochs (VFIO mdev). Inside, tests reach host services
(screendumps through QMP, monitor plug/unplug through VNC) over the command's stdin/stdout.
"""

EPILOG = """\
examples:
  python -m directflip_tools.lab setup                      prepare the cache (kernel, modules, packages)
  python -m directflip_tools.lab test -x -k hotplug         run the guest tests, extra args go to pytest
  python -m directflip_tools.lab test tests/reliability/lab/test_faults.py     one file of them
  python -m directflip_tools.lab run -- modetest -M vkms    any command in the guest, exit code passed back
  python -m directflip_tools.lab run --no-connect-all -- sh -c 'cat /sys/class/drm/*/status'

cache: ${DIRECTFLIP_LAB_CACHE:-${XDG_CACHE_HOME:-~/.cache}/directflip-lab}
"""


FAULT_DUMP = 900


def _vm_options(args: argparse.Namespace) -> vm.VmOptions:
    return vm.VmOptions(connect_all_heads=not args.no_connect_all, timeout=args.timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m directflip_tools.lab", description=DESCRIPTION,
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{setup,run,test}")
    sub.add_parser("setup", help="install/download/build what the lab needs (idempotent, fast when done)",
                   description="Install the apt packages, fetch the current bookworm kernel, its headers "
                               "and sources, and build vkms/mbochs/mdpy with the lab's patches.")
    for name, help_text in (("run", "boot the lab and run a command in the guest"),
                            ("test", "boot the lab and run pytest in the guest on tests/lab/guest and "
                                     "tests/reliability/lab (or the tests named)")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--no-connect-all", action="store_true",
                       help="leave virtio-gpu heads 1 and 2 disconnected at boot (default: all three "
                            "monitors connected)")
        # The whole guest suite takes ~30 min on an idle machine and up to ~75 min while another
        # process keeps the cores busy; the timeout is for a VM that hangs, not a slow one.
        p.add_argument("--timeout", type=float, default=1200.0 if name == "run" else 5400.0, metavar="S",
                       help="stop the VM after S seconds (default: %(default)s)")
        if name == "run":
            p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
        else:
            p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra pytest arguments")
    # Options the lab does not know belong to pytest (`test -x -k name`).
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if args.command != "test":
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.pytest_args = [*unknown, *args.pytest_args]

    try:
        manifest = cache.ensure()
        if args.command == "setup":
            return 0
        if args.command == "run":
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not cmd:
                parser.error("run needs a command: run -- CMD [ARGS...]")
        else:
            extra = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
            # Default to the whole guest suite unless the arguments name tests themselves.
            named = [a for a in extra if not a.startswith("-") and (vm.REPO / a.split("::")[0]).exists()]
            # A test still running after FAULT_DUMP seconds has every thread's traceback printed (and
            # goes on): a wait that never ends shows where it is before the VM's timeout kills it.
            # The progress plugin tells the host which test runs, for a run stopped by its timeout.
            cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                   "-p", "directflip_tools.lab.progress",
                   "-o", f"faulthandler_timeout={FAULT_DUMP}", "--durations=10",
                   *([] if named else LAB_TESTS), *extra]
        return vm.run(cmd, _vm_options(args), manifest)
    except cache.LabError as exc:
        print(f"lab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
