"""The policy file: YAML in, a validated `Policy` out, or every problem in it at once.

The file is composed into PyYAML's node tree rather than loaded into plain dicts, so that every value
keeps the line and column it came from: each problem is reported as `file:line:column: message (hint)`
and the loader carries on to find the next one. Nothing here raises anything but `PolicyError` for a
bad file (and `OSError` for an unreadable one).

The format itself is documented for operators in policies/README.md. In short:

    version: 1
    defaults:   {mode, scaling, slate}
    monitors:   name -> {connector, edid, port, card, driver, logind_seat, mode, scaling, slate}
    guests:     name -> {name, uuid, kind}
    seats:      name -> {monitors, logind, input}
    placements: [{guest, monitor, failover, mirror, priority, seats}]
    hotkeys:    action -> "ctrl+alt+KEY"

Matchers are compiled once here, so the planner only calls `matches()`.

The package reads each section of the file in a module of its own: `reader` holds what all of them
share (the diagnostics, the checks of single nodes), `display`, `monitors`, `guests` (with `libvirt`),
`seats`, `placements` and `hotkeys` one section each, and `document` the file as a whole. `model` is
the validated policy they build, `diagnostics` what is said about a bad file.
"""

from __future__ import annotations

from pathlib import Path

from compositor import policyfile
from compositor.policy.diagnostics import Diagnostic, PolicyError
from compositor.policy.document import Validator
from compositor.policy.model import (
    DEFAULT_LABEL_SECONDS,
    DEFAULT_SLATE_COLOUR,
    DEFAULT_SLATE_TEXT,
    GUEST_KINDS,
    HOTKEY_ACTIONS,
    LIBVIRT_URI,
    RELATIONS,
    SCALING_ALIASES,
    SCALINGS,
    EdidMatch,
    Glob,
    GuestRule,
    InputMatch,
    ModeRequest,
    MonitorRule,
    Placement,
    Policy,
    Position,
    Seat,
    SlateStyle,
)

__all__ = [
    "DEFAULT_LABEL_SECONDS", "DEFAULT_SLATE_COLOUR", "DEFAULT_SLATE_TEXT", "GUEST_KINDS", "HOTKEY_ACTIONS",
    "LIBVIRT_URI", "RELATIONS", "SCALINGS", "SCALING_ALIASES",
    "Diagnostic", "EdidMatch", "Glob", "GuestRule", "InputMatch", "ModeRequest", "MonitorRule", "Placement",
    "Policy", "PolicyError", "Position", "Seat", "SlateStyle",
    "load", "parse",
]


def load(path: str | Path) -> Policy:
    """Read and validate a policy file. Raises `PolicyError` (all problems) or `OSError` (among them
    compositor.policyfile.PolicyFileError: not a regular file, too large, not UTF-8).

    A policy with `launch:` is refused unless nobody but root and the compositor's user could have
    written it or swapped it (compositor.policyfile.unsafe): `launch` runs its command as root."""
    pol = parse(policyfile.read(path), str(path))
    launching = [rule for rule in pol.guests if rule.launch is not None]
    if launching:
        why = policyfile.unsafe(path)
        if why is not None:
            hint = ("launch runs its command as the compositor's user: the policy, every symlink to it "
                    "and every directory above them must be owned by root or that user and writable by "
                    "no one else")
            raise PolicyError([Diagnostic(str(path), rule.line, 1, f"guest {rule.name}: `launch` is refused: "
                                          f"{why}", hint) for rule in launching], list(pol.warnings))
    return pol


def parse(text: str, source: str = "<policy>") -> Policy:
    """Validate policy text; `source` names the file in diagnostics."""
    return Validator(source).run(text)
