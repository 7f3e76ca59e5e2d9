"""The frame-socket tests (tests/unit/test_framesocket*.py) once more with the native data plane
serving every version-2 client after its welcome: each message then reaches Python through the data
plane's hand-over (bytes and descriptors as received), and every byte to the client leaves through
its queue. The same checks must hold on both paths (framesocket_env.ON_DATAPLANE)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "tests" / "unit"


def test_the_frame_socket_suite_passes_on_the_data_plane():
    tests = sorted(str(p) for p in UNIT.glob("test_framesocket*.py"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=ROOT, env={**os.environ, "DIRECTFLIP_TEST_DATAPLANE": "1"}, capture_output=True,
                          text=True, timeout=900)
    tail = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, f"frame-socket tests on the data plane:\n{tail}"
    last = proc.stdout.splitlines()[-1]
    summary = re.search(r"^(\d+) passed", last)
    assert summary and int(summary[1]) > 150, tail
    print(f"frame-socket suite on the data plane: {last}")
