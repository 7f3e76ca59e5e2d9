"""The lab half of the reliability suite runs inside the lab VM, like tests/lab/guest, and uses the
same fixtures (`host`, `cards`, `debugfs`) and helpers (`labkit`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_GUEST = Path(__file__).resolve().parents[2] / "lab" / "guest"
if str(_GUEST) not in sys.path:
    sys.path.insert(0, str(_GUEST))

_spec = importlib.util.spec_from_file_location("lab_guest_fixtures", _GUEST / "conftest.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)
host, cards, debugfs = _fixtures.host, _fixtures.cards, _fixtures.debugfs
no_compositor_outlives_its_module = _fixtures.no_compositor_outlives_its_module
