"""The package as a user gets it: an sdist of this tree, a wheel built from that sdist (which compiles
native/ into compositor._native), installed alone into a fresh virtualenv, and the `directflip` it
installs run from a directory outside the checkout.

The builds run without build isolation (`--no-isolation`): isolation would download setuptools, wheel
and cffi from PyPI on every run, which is slow and fails offline. The test environment provides them
instead (the `test` extra lists them beside `build`), and `build` still checks that they satisfy
pyproject's [build-system] requires. The venv sees the test environment's site-packages
(--system-site-packages) for the runtime dependencies; the wheel goes in with --no-deps
--force-reinstall, so the venv's own `directflip` and `compositor` are the wheel's and not the
editable install of the checkout. Needs gcc, pkg-config and libdrm-dev (`make deps`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import compositor

ROOT = Path(__file__).resolve().parents[2]
# Left out of the copy that is packaged: what a fresh clone does not have. In particular a stale
# directflip.egg-info/SOURCES.txt, which setuptools would read back into the sdist's file list, and
# the compiled extension of the editable install.
NOT_SOURCE = shutil.ignore_patterns(".git", "*.egg-info", "build", "dist", "out", "__pycache__", "*.py[cod]",
                                    "*.so", "*.o", "_native.c", ".lab", ".pytest_cache", ".ruff_cache",
                                    ".hypothesis")
# What the sdist must carry besides the Python packages: what setup.py's cffi_modules compiles, and what
# the README points at.
IN_SDIST = ["LICENSE", "README.md", "MANIFEST.in", "native/build.py", "native/kms_helpers.c",
            "native/kms_helpers.h", "docs/status-json.md", "policies/README.md", "policies/kiosk.yaml",
            "udev/directflip.service", "udev/71-directflip-mdev.rules"]
POLICY = ROOT / "tests" / "data" / "policies" / "lab-demo.yaml"
TOPOLOGY = ROOT / "tests" / "data" / "lab-topology.json"

# Run inside the venv: `directflip check` in-process, recording every file opened (the audit hook
# sees open() and the import system's reads of sources and bytecode) and where each module came from.
PROBE = r"""
import json, os, sys
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
# A wheel's user has no tools (tools/, directflip-tools): the checkout's, which this venv would see
# through the system site-packages, are kept out.
sys.modules["directflip_tools"] = None
import compositor._native
from compositor.cli import main
try:
    code = main(sys.argv[2:])
except SystemExit as exc:
    code = exc.code
files = [getattr(m, "__file__", None) for m in list(sys.modules.values())]
where = lambda paths: [os.path.abspath(p) for p in paths if p]  # relative ones are from the cwd
with open(sys.argv[1], "w") as out:
    json.dump({"code": code, "native": compositor._native.__file__, "package": compositor.__file__,
               "files": where(files), "opened": where(opened), "path": where(sys.path)}, out)
"""


def run(argv: list[str | Path], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # Without PYTHONPATH, so nothing points the venv's interpreter back at the checkout.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, (f"{proc.args}: exit {proc.returncode}\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def inside(path: str, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root)


def test_sdist_builds_a_wheel_that_runs_outside_the_checkout(tmp_path: Path) -> None:
    src, dist, venv, elsewhere = (tmp_path / d for d in ("src", "dist", "venv", "elsewhere"))
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    # Neither --sdist nor --wheel: build makes the sdist, unpacks it and builds the wheel from that.
    ok(run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, src], cwd=tmp_path,
           timeout=300))
    (sdist,) = dist.glob("directflip-*.tar.gz")
    (wheel,) = dist.glob("directflip-*.whl")

    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {name.removeprefix(top + "/") for name in tar.getnames()}
    assert not [f for f in IN_SDIST if f not in names], sorted(names)

    with zipfile.ZipFile(wheel) as whl:
        members = whl.namelist()
    assert [m for m in members if m.startswith("compositor/_native") and m.endswith(".so")], members
    # The product only: the lab, the stand-in guests and the demo are directflip-tools (tools/).
    tools = [m for m in members if m.startswith(("directflip_tools/", "compositor/lab/"))
             or m.endswith(("/synthetic.py", "/qemu_peer.py", "/qemu_dbus_peer.py", "/patterns.py",
                            "/demo.py"))]
    assert not tools, tools
    assert "compositor/cli/__init__.py" in members and "compositor/formats.py" in members

    ok(run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=tmp_path))
    python, directflip = venv / "bin" / "python", venv / "bin" / "directflip"
    # The test environment's pip, run by the venv's interpreter, installs into the venv.
    ok(run([python, "-m", "pip", "install", "--no-deps", "--force-reinstall", "--no-index",
            "--disable-pip-version-check", "-q", wheel], cwd=tmp_path))
    assert directflip.exists()

    elsewhere.mkdir()
    shutil.copy(POLICY, elsewhere / POLICY.name)
    shutil.copy(TOPOLOGY, elsewhere / TOPOLOGY.name)

    version = ok(run([directflip, "--version"], cwd=elsewhere))
    assert version.stdout == f"directflip {compositor.__version__}\n"

    check = run([directflip, "check", POLICY.name, "--topology", TOPOLOGY.name], cwd=elsewhere)
    assert check.returncode == 0, check.stderr
    assert f"{POLICY.name}: valid (" in check.stdout

    report = elsewhere / "probe.json"
    ok(run([python, "-c", PROBE, report, "check", POLICY.name, "--topology", TOPOLOGY.name], cwd=elsewhere))
    seen = json.loads(report.read_text())
    assert seen["code"] == 0
    assert inside(seen["package"], venv) and inside(seen["native"], venv), seen
    looked_up = [p for p in seen["files"] + seen["opened"] + seen["path"] if inside(p, ROOT)]
    assert not looked_up, looked_up
