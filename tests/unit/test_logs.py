"""Logging (compositor/logs.py): syslog priority prefixes when stderr is the journal's stream, the plain
format elsewhere, and the default level for each.

The command's logging is configured once per process on the root logger, which pytest's own capture
already holds; so the configured logger is looked at in a child process whose stderr is a real file,
and $JOURNAL_STREAM names that file's device and inode exactly as systemd names the journal stream."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compositor import cli, logs

ROOT = Path(__file__).resolve().parents[2]

# What the child does: configure as `directflip` with VERBOSITY -v would, log one of each level, then
# tell its parent the root logger's level.
CHILD = """
import logging, sys
from compositor import logs
logs.configure(int(sys.argv[1]))
log = logging.getLogger("directflip.daemon")
log.debug("frame 12 flipped")
log.info("guest office connected (pid 7, uid 0)")
log.warning("left (Virtual-1): zero-copy → copy: import refused")
log.error("the policy is invalid:\\n  line 3: no monitor `lfet`")
print(logging.getLogger().level)
"""


def child(tmp_path: Path, verbosity: int, journal: str | None) -> tuple[list[str], int]:
    """Run CHILD with stderr in a file; `journal`: "match" for a $JOURNAL_STREAM naming that file,
    "other" for one naming another file (an inherited variable), None for none. Its stderr lines and
    the root level it reports."""
    err = tmp_path / f"stderr-{verbosity}-{journal}"
    other = tmp_path / "elsewhere"
    other.touch()
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with open(err, "wb") as stderr:
        if journal is not None:
            st = os.fstat(stderr.fileno()) if journal == "match" else os.stat(other)
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        out = subprocess.run([sys.executable, "-c", CHILD, str(verbosity)], stdout=subprocess.PIPE,
                             stderr=stderr, env=env, cwd=tmp_path, text=True, timeout=60, check=True)
    return err.read_text().splitlines(), int(out.stdout)


def test_journal_lines_carry_their_priority_and_nothing_else(tmp_path: Path) -> None:
    lines, level = child(tmp_path, 0, "match")
    assert lines == [
        "<6>guest office connected (pid 7, uid 0)",
        "<4>left (Virtual-1): zero-copy → copy: import refused",
        # journald stores each line as an entry: the second line of the error is an error too
        "<3>the policy is invalid:",
        "<3>  line 3: no monitor `lfet`",
    ]
    assert level == logging.INFO  # INFO by default in the journal, without -v


def test_journal_with_vv_adds_debug(tmp_path: Path) -> None:
    lines, level = child(tmp_path, 2, "match")
    assert level == logging.DEBUG
    assert lines[:2] == ["<7>frame 12 flipped", "<6>guest office connected (pid 7, uid 0)"]


def test_a_terminal_keeps_the_plain_format_and_warning_default(tmp_path: Path) -> None:
    lines, level = child(tmp_path, 0, None)
    assert level == logging.WARNING
    assert lines == [
        "directflip: WARNING: left (Virtual-1): zero-copy → copy: import refused",
        "directflip: ERROR: the policy is invalid:",
        "  line 3: no monitor `lfet`",
    ]


def test_v_gives_info_on_a_terminal(tmp_path: Path) -> None:
    lines, level = child(tmp_path, 1, None)
    assert level == logging.INFO
    assert lines[0] == "directflip: INFO: guest office connected (pid 7, uid 0)"


def test_an_inherited_journal_stream_that_is_not_stderr_is_ignored(tmp_path: Path) -> None:
    # A VMM a policy launches inherits $JOURNAL_STREAM from the service; if its stderr goes
    # elsewhere, "<6>" there would be garbage and INFO unasked for.
    lines, level = child(tmp_path, 0, "other")
    assert level == logging.WARNING
    assert lines[0] == "directflip: WARNING: left (Virtual-1): zero-copy → copy: import refused"


@pytest.mark.parametrize("value", ["", "12", "12:", ":34", "a:b", "12:34:56", "-1:5"])
def test_malformed_journal_stream_is_not_the_journal(tmp_path: Path, value: str) -> None:
    with open(tmp_path / "f", "wb") as f:
        assert not logs.stderr_is_journal(f.fileno(), {"JOURNAL_STREAM": value})


def test_stderr_is_journal_compares_device_and_inode(tmp_path: Path) -> None:
    with open(tmp_path / "f", "wb") as f, open(tmp_path / "g", "wb") as g:
        st = os.fstat(f.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert logs.stderr_is_journal(f.fileno(), env)
        assert not logs.stderr_is_journal(g.fileno(), env)
        assert not logs.stderr_is_journal(f.fileno(), {})


@pytest.mark.parametrize(("level", "priority"), [
    (logging.CRITICAL, 3), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6), (logging.DEBUG, 7),
    (logging.INFO + 5, 6), (5, 7),
])
def test_priorities_are_sd_daemons(level: int, priority: int) -> None:
    assert logs.journal_priority(level) == priority


def test_the_command_line_configures_logging_with_its_v_count(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    monkeypatch.setattr(logs, "configure", seen.append)
    assert cli.main(["-vv"]) == 2  # no subcommand: the help, after logging is set up
    assert seen == [2]
