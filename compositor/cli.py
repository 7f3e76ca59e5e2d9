"""The `directflip` command. Each subcommand lives in its own module, which provides
`register(subparsers)`; the parser it adds sets `func` to a callable taking the parsed args and
returning the exit code."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Subcommand modules, in the order `--help` lists them.
COMMANDS = ["compositor.daemon", "compositor.control", "compositor.sources.synthetic", "compositor.probe",
            "compositor.init", "compositor.check", "compositor.demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="directflip",
        description="Direct-flip compositor: shows each virtual machine's framebuffer on a physical "
        "monitor's hardware plane with atomic KMS, without copying it.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="directflip: %(levelname)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
