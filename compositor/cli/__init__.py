"""The `directflip` command.

Each subcommand's command line lives in a module of this package, which provides `register(sub)`;
the parser it adds sets `func` to a callable taking the parsed arguments and returning the exit
status. These modules are light: they import argparse and the few constants their help text names,
and each `func` imports the module that does the work (the daemon, the control client, the probe)
only when its command runs. `run` needs asyncio, dbus-fast and the KMS layer, which `status`,
`check` and `--help` have no use for and which would cost them several times the interpreter's own
start-up (tests/unit/test_cli.py checks that they stay unimported).

`guest` and `demo` are directflip's tools (a synthetic guest, the demo), which run from a checkout:
they come with the separate distribution in tools/ (directflip-tools), and without it the commands
say how to get them.
"""

from __future__ import annotations

import argparse
import sys

from compositor.cli import check, control, init, probe, run

try:  # the tools' command lines, when the checkout's tools are installed (make deps)
    from directflip_tools import cli as tools
except ModuleNotFoundError as exc:
    if exc.name not in ("directflip_tools", "directflip_tools.cli"):
        raise
    tools = None

# The tools' commands and their lines in `--help`, for a `directflip` without the tools installed.
TOOL_COMMANDS = {"guest": "run a synthetic guest: flip numbered test frames through the frame socket",
                 "demo": "three synthetic guests on this machine's monitors (or in the lab VM)"}


def version() -> str:
    """The installed distribution's version; from a checkout that is not installed, the package's own."""
    # Imported here: importlib.metadata costs about as much as the rest of the parser together.
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("directflip")
    except PackageNotFoundError:
        from compositor import __version__

        return __version__


class _VersionAction(argparse.Action):
    """argparse's own "version" action wants the string up front, which would look the version up on
    every run; this one looks it up only when --version is given."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None):
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"directflip {version()}")
        parser.exit()


def _tools_missing(args: argparse.Namespace) -> int:
    print(f"directflip {args.command}: this command is one of directflip's tools, which run from a "
          "checkout of its source: there, `make deps` installs them (pip install -e ./tools)",
          file=sys.stderr)
    return 2


def _register_tools(sub: argparse._SubParsersAction) -> None:
    if tools is not None:
        tools.register(sub)
        return
    for name, help_line in TOOL_COMMANDS.items():
        p = sub.add_parser(name, help=f"{help_line} [from a checkout]", add_help=False)
        p.set_defaults(func=_tools_missing)  # whatever its arguments: see main()


def build_parser() -> argparse.ArgumentParser:
    """The `directflip` parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="directflip",
        description="Direct-flip compositor: shows each virtual machine's framebuffer on a physical "
        "monitor's hardware plane with atomic KMS, without copying it.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("--version", action=_VersionAction, help="print directflip's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run.register(sub)
    control.register(sub)
    _register_tools(sub)
    probe.register(sub)
    init.register(sub)
    check.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "func", None) is _tools_missing:
        return _tools_missing(args)
    if unknown:
        args = parser.parse_args(argv)  # exits with argparse's own message about them
    from compositor import logs  # not before: --help has no use for logging, which costs as much as argparse

    logs.configure(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))
