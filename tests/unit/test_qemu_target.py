"""QemuTarget (compositor.sources.qemu_target) is pure: the policy parses a guest rule's `display:` with
it, and reading a policy must not load the D-Bus library or the display source."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

POLICY = ("monitors: {left: Virtual-1}\nplacements: [{guest: vm, monitor: left}]\nguests:\n"
          "  vm: {kind: qemu-dbus, display: 'qmp:/x'}\n")


@pytest.mark.parametrize("code", [
    "import compositor.sources.qemu_target",
    f"from compositor import policy\nassert policy.parse({POLICY!r}).guests[0].display == 'qmp:/x'",
], ids=["import compositor.sources.qemu_target", "parse a policy with a display"])
def test_the_target_loads_no_dbus(code: str) -> None:
    # A fresh interpreter (this one has dbus_fast from other tests); cwd is the checkout, so it imports
    # this tree's compositor whatever is installed.
    probe = (f"{code}\nimport sys\n"
             "print('loaded:', [m for m in ('dbus_fast', 'asyncio', 'compositor.sources.qemu_dbus') "
             "if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "loaded: []", proc.stdout[-2000:]


def test_the_package_still_offers_the_target() -> None:
    from compositor.sources import qemu_dbus, qemu_target

    assert qemu_dbus.QemuTarget is qemu_target.QemuTarget
    assert qemu_dbus.BUS_NAME == qemu_target.BUS_NAME == "org.qemu"
