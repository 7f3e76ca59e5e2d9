"""The `directflip` command line: every subcommand listed and parsed as before, and the light ones
(`--help`, `check`, `status`) starting without the daemon's heavy imports."""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

import compositor
from compositor import cli

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("numpy", "asyncio", "dbus_fast", "PIL")
LAB = ROOT / "tests" / "data" / "lab-topology.json"
LAB_DEMO = ROOT / "tests" / "data" / "policies" / "lab-demo.yaml"

# Runs `directflip ARGS...` in a fresh interpreter and says which heavy modules it imported. The
# marker keeps the answer apart from the command's own output.
PROBE = f"""
import sys
from compositor.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("heavy:", sorted(m for m in {HEAVY!r} if m in sys.modules))
"""


def subcommands(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    """Subcommand name -> its line in the parser's --help, in the order listed."""
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {choice.dest: choice.help for choice in sub._choices_actions}


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["check", "--help"],
    ["status", "--help"],
    ["check", str(LAB_DEMO), "--topology", str(LAB)],
    ["status", "--control", "/nonexistent/control.sock"],  # fails to connect, after the imports
], ids=lambda argv: " ".join(argv[:2]).replace(str(ROOT) + "/", ""))
def test_light_commands_skip_heavy_imports(argv: list[str]) -> None:
    # cwd is the checkout, so `-c` imports this tree's compositor whatever is installed.
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    answer = [line for line in proc.stdout.splitlines() if line.startswith("heavy:")]
    assert answer == ["heavy: []"], (answer, proc.stderr[-2000:])


COMMANDS = ["run", "status", "capture", "show", "focus", "guest", "demo", "probe", "init", "check"]


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    # A subcommand's line is indented by four; its wrapped help further.
    listed = [m.group(1) for m in re.finditer(r"^ {4}(\S+)", out, re.MULTILINE)]
    assert listed == list(subcommands(cli.build_parser())) == COMMANDS


@pytest.mark.parametrize("name", COMMANDS)
def test_subcommand_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([name, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: directflip {name} ")
    assert "options:" in out


def test_tools_missing_say_where_they_come_from(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A `directflip` installed without the checkout's tools lists guest and demo and says how to get
    them, whatever arguments they are given."""
    with_tools = subcommands(cli.build_parser())
    monkeypatch.setattr(cli, "tools", None)
    without = subcommands(cli.build_parser())
    assert list(without) == COMMANDS
    assert without["guest"] == with_tools["guest"] + " [from a checkout]"
    assert cli.main(["guest", "--name", "office", "--rate", "30"]) == 2
    assert "make deps" in capsys.readouterr().err
    assert cli.main(["demo"]) == 2


def test_usage_errors_still_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["bogus"])
    assert info.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["check", "--no-such-option", str(LAB_DEMO)])
    assert info.value.code == 2
    assert cli.main([]) == 2  # no subcommand: the help, and a failure


def test_version(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"directflip {importlib.metadata.version('directflip')}\n"

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert cli.version() == compositor.__version__
