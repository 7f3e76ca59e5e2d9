"""The libFuzzer harnesses (atheris) run for a fixed number of inputs each, in a subprocess: exit
status 0 and libFuzzer's own count of the inputs it ran. A crash leaves its input in the test's
tmp_path (the failure message says which file) for `python tests/reliability/fuzz_*.py FILE`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SEEDS = ",".join(str(p) for p in sorted((ROOT / "policies").glob("*.yaml")))
HARNESSES = {  # harness → (runs, extra libFuzzer flags)
    "fuzz_framesocket.py": (10000, []),
    "fuzz_policy.py": (3000, [f"-seed_inputs={SEEDS}"]),
    "fuzz_wire.py": (20000, []),
}


def test_atheris_is_installed():
    # It is in the `test` extra: a missing atheris is a broken test environment, not a reason to skip.
    try:
        import atheris  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"atheris is not importable ({exc}): pip install -e '.[test]'")


@pytest.mark.parametrize("harness", sorted(HARNESSES))
def test_the_harness_runs_clean_for_a_fixed_number_of_inputs(harness, tmp_path):
    runs, flags = HARNESSES[harness]
    proc = subprocess.run([sys.executable, str(HERE / harness), f"-runs={runs}", "-seed=1",
                           f"-artifact_prefix={tmp_path}/", "-max_len=4096", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    tail = proc.stderr[-3000:]
    assert proc.returncode == 0, f"{harness} failed (artifacts in {tmp_path}):\n{tail}"
    done = re.search(r"^Done (\d+) runs in \d+ second", proc.stderr, re.MULTILINE)
    assert done, f"no libFuzzer summary:\n{tail}"
    assert int(done[1]) == runs, f"ran {done[1]} inputs, not {runs}"
    assert not list(tmp_path.iterdir()), "libFuzzer wrote crash artifacts"
