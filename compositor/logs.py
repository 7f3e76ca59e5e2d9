"""Logging for the `directflip` command: one format for a terminal, another for the systemd journal.

On a terminal a line reads `directflip: WARNING: message` and the default level is WARNING (-v: INFO,
-vv: DEBUG), so interactive commands stay quiet.

Under systemd, stderr is a stream to journald, and systemd says so in $JOURNAL_STREAM ("DEV:INODE" of
that stream, systemd.exec(5)). journald reads a leading `<N>` on each line as the entry's syslog
priority (sd-daemon(3): SD_ERR is "<3>", SD_WARNING "<4>", SD_INFO "<6>", SD_DEBUG "<7>"), which is
what `journalctl -p`, the colours and `LogLevelMax=` go by; without it every line would be "info".
The journal stamps and tags each entry itself, so the line carries neither a time nor the program's
name nor the level's name. The variable alone is not trusted: a process started by the service (a VMM
a policy launches) inherits it while its stderr may go elsewhere, so, as systemd.exec(5) advises, the
prefixes are used only when stderr's own device and inode match it.

In the journal the default level is INFO: what an operator wants to read afterwards (guests coming and
going, each plan applied and what every monitor shows, fallbacks, policy reloads) is logged there
without a flag in the unit, and a reader who wants less filters by priority (`journalctl -p warning`,
or `LogLevelMax=warning` in a drop-in, which drops it before it is stored). -vv still gives DEBUG.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

PLAIN_FORMAT = "directflip: %(levelname)s: %(message)s"


def journal_priority(levelno: int) -> int:
    """The syslog priority for a logging level (sd-daemon(3)); levels in between round down."""
    if levelno >= logging.ERROR:
        return 3  # CRITICAL too: directflip has no use for SD_CRIT's "<2>"
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def stderr_is_journal(fd: int | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """True when `fd` (stderr by default) is the stream $JOURNAL_STREAM names."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not (sep and dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno() if fd is None else fd)
    except (OSError, ValueError, AttributeError):  # stderr closed, or replaced by an object with no fd
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalFormatter(logging.Formatter):
    """`<N>message`, with the prefix on every line: journald makes one entry per line, and a line of a
    traceback or of a multi-line policy error without it would be stored as "info"."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{journal_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


def configure(verbosity: int) -> None:
    """Set up the root logger for the command line: `verbosity` is the count of -v."""
    journal = stderr_is_journal()
    level = logging.WARNING - 10 * verbosity
    if journal:
        level = min(level, logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter("%(message)s") if journal else logging.Formatter(PLAIN_FORMAT))
    # basicConfig, as before: it leaves a root logger that already has handlers (pytest's) alone.
    logging.basicConfig(level=max(level, logging.DEBUG), handlers=[handler])
