"""libFuzzer harness (atheris) for the frame socket's wire format: the C decoder (native/fs_codec.c)
through its cffi binding, for both readers and both protocol versions, against the format's plain
Python definition (tests/unit/wire_reference.py). Any difference, and any crash, is a finding; run
under the sanitizer build (`make sanitize`), a read outside the input is one too.

    python tests/reliability/fuzz_wire.py -runs=100000        # or without -runs: until stopped
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from native_override import load  # noqa: E402  (`make sanitize`: the sanitizer build of the helper)

load()

with atheris.instrument_imports(include=["compositor", "wire_reference"]):
    from wire_reference import reference

    from compositor.sources.fswire import CLIENT, SERVER, split


def TestOneInput(data: bytes) -> None:  # noqa: N802 — libFuzzer's name
    if not data:
        return
    reader = SERVER if data[0] & 1 else CLIENT
    stream = data[1:]
    for version in (1, 2):
        got = split(stream, version, reader)
        if version == 1:
            # Version 1 has no records: a word with its top bit set is a bad length.
            want = reference(stream, reader, records=False)
        else:
            want = reference(stream, reader)
        assert got == want, f"version {version}, reader {reader}: C {got!r:.300} != definition {want!r:.300}"


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
