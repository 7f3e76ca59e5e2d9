"""The `directflip` command. Each subcommand lives in its own module, which provides
`register(subparsers)`; the parser it adds sets `func` to a callable taking the parsed args and
returning the exit code.

Only the module of the subcommand being run is imported. `run` and `guest` need asyncio and dbus-fast
(`guest` numpy too), which `status`, `check` and `--help` have no use for and which would cost them
several times the interpreter's own start-up. So COMMANDS also carries each subcommand's line of
`directflip --help`, which is listed without importing anything; tests/unit/test_cli.py checks that it
is the line the module's register() gives."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# (subcommand, the module whose register(subparsers) adds it, its line in `directflip --help`), in the
# order `--help` lists them. A module that is not there is left out. One module may add several.
COMMANDS = [
    ("run", "compositor.daemon", "run the compositor: show guests on monitors as the policy says"),
    ("status", "compositor.control", "what each monitor shows, how (zero-copy, copy, slate) and how fast"),
    ("capture", "compositor.control", "save what a monitor shows as PNG"),
    ("show", "compositor.control", "show a guest on a monitor now (a runtime override of the plan)"),
    ("focus", "compositor.control", "send a seat's keyboard and pointer to what a monitor shows"),
    ("guest", "compositor.sources.synthetic",
     "run a synthetic guest: flip numbered test frames through the frame socket"),
    ("probe", "compositor.probe", "list KMS devices: connectors, CRTCs, planes and their formats"),
    ("init", "compositor.init", "write a policy for the monitors plugged in now"),
    ("check", "compositor.check", "validate a policy and print the plan it gives"),
    ("demo", "compositor.demo", "three synthetic guests on this machine's monitors (or in the lab VM)"),
]


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


def _present(module: str) -> bool:
    if module in sys.modules:  # also one put there by hand, which find_spec may know no spec for
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def build_parser(full: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """The `directflip` parser. The subcommands named in `full` (all of them when None) are complete:
    their modules are imported and register their parsers. The others are placeholders carrying only
    their name and help line, which is all `directflip --help` shows; a placeholder takes any
    arguments, so a first parse can find out which subcommand was asked for."""
    parser = argparse.ArgumentParser(
        prog="directflip",
        description="Direct-flip compositor: shows each virtual machine's framebuffer on a physical "
        "monitor's hardware plane with atomic KMS, without copying it.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("--version", action=_VersionAction, help="print directflip's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # A module's register() adds all of its subcommands, so `status` brings `capture` along.
    wanted = {module for name, module, _ in COMMANDS if full is None or name in full}
    registered: set[str] = set()
    for name, module_name, help_line in COMMANDS:
        if module_name not in wanted:
            if _present(module_name):
                sub.add_parser(name, help=help_line, add_help=False)
            continue
        if module_name in registered:  # added with an earlier subcommand of the same module
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        registered.add(module_name)
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # First pass with placeholders only: it answers --help, --version and an unknown subcommand by
    # itself, and otherwise says which subcommand to build the real parser for.
    parser = build_parser(full=())
    command = parser.parse_known_args(argv)[0].command
    if command is not None:
        parser = build_parser(full=(command,))
    args = parser.parse_args(argv)
    from compositor import logs  # not before: --help has no use for logging, which costs as much as argparse

    logs.configure(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
