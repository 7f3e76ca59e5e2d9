"""What a policy file is told about its problems: one `Diagnostic` per problem, each a single
`file:line:column: message (hint)` line, and `PolicyError` carrying all of them at once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Diagnostic:
    file: str
    line: int
    column: int
    message: str
    hint: str | None = None
    warning: bool = False

    def __str__(self) -> str:
        kind = "warning: " if self.warning else ""
        hint = f" ({self.hint})" if self.hint else ""
        return _one_line(f"{self.file}:{self.line}:{self.column}: {kind}{self.message}{hint}")


def _one_line(text: str) -> str:
    """Escape what would break a diagnostic's line (a key such as "a\\nb", a control character): each
    diagnostic stays one `file:line:column:` line in `check` output and in the log."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


class PolicyError(ValueError):
    """A policy file with errors. `errors` holds all of them, in file order."""

    def __init__(self, errors: list[Diagnostic], warnings: list[Diagnostic] | None = None):
        self.errors = errors
        self.warnings = warnings or []
        super().__init__("\n".join(str(e) for e in errors))
