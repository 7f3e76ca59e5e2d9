"""libFuzzer harness (atheris) for the policy loader: any text gives a Policy or a PolicyError whose
every line is `file:line:column: message`, and nothing else escapes. The input is the file's bytes
(as UTF-8, invalid sequences replaced), so the shipped policies are good seeds:

    python tests/reliability/fuzz_policy.py -seed_inputs=policies/desk.yaml,policies/kiosk.yaml
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["compositor"]):  # (instrumenting PyYAML breaks its scanner on 3.11)
    from compositor import policy

DIAGNOSTIC = re.compile(r"^fuzz\.yaml:\d+:\d+: ")
LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")  # YAML's


def TestOneInput(data: bytes) -> None:  # noqa: N802 — libFuzzer's name
    text = data.decode("utf-8", "replace")
    try:
        policy.parse(text, "fuzz.yaml")
    except policy.PolicyError as exc:
        assert exc.errors, "a PolicyError without errors"
        last_line = len(LINE_BREAK.findall(text)) + 2
        for diagnostic in exc.errors:
            assert 1 <= diagnostic.line <= last_line, diagnostic
        for line in str(exc).splitlines():
            assert DIAGNOSTIC.match(line), f"not file:line:column: {line!r}"


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
