"""`directflip run` starts without numpy: the copy rung's strided copy is kms_copy_rows in C, and what
else of the daemon uses numpy (capture's pixel conversion) imports it when it runs. numpy was a third
of the daemon's import time (issue 15)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("code", [
    "import compositor.daemon",
    # What `directflip run` imports before it parses its arguments, down to run's own --help.
    "from compositor.cli import main\ntry:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass",
], ids=["import compositor.daemon", "directflip run --help"])
def test_the_daemon_does_not_import_numpy(code: str) -> None:
    # A fresh interpreter (this one has numpy from other tests); cwd is the checkout, so it imports
    # this tree's compositor whatever is installed.
    probe = f"{code}\nimport sys\nprint('numpy loaded:', 'numpy' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "numpy loaded: False", proc.stdout[-2000:]
