"""The C helper under AddressSanitizer and UndefinedBehaviorSanitizer: `native/build.py --sanitize`
builds it, and every unit test and the wire-format fuzzer run again with that build loaded in place
of the installed one (tests/unit/native_override.py) and gcc's sanitizer runtimes preloaded. A
canary first proves the sanitizer is live: a read past a buffer must be reported."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "tests" / "unit"
FUZZ_RUNS = 20000


def _runtime(name: str) -> str:
    path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if not os.path.isabs(path):
        pytest.fail(f"gcc has no {name} (Debian: libgcc-12-dev): the sanitizer build cannot run")
    return path


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory) -> dict[str, str]:
    """The environment that runs Python with the sanitizer build of compositor._native."""
    out = tmp_path_factory.mktemp("sanitize")
    proc = subprocess.run([sys.executable, str(ROOT / "native" / "build.py"), "--sanitize", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"the sanitizer build failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    (so,) = out.glob("compositor/_native*.so")
    return {**os.environ, "DIRECTFLIP_NATIVE_SO": str(so),
            "LD_PRELOAD": f"{_runtime('libasan.so')} {_runtime('libubsan.so')}",
            # Python's own allocations outlive it on purpose (and the data plane's live until
            # dp_free); every read and write is still checked.
            "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=86",
            "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=87",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(UNIT)])}


CANARY = """
import os
from native_override import load
assert load() == os.environ["DIRECTFLIP_NATIVE_SO"]
import compositor._native as native
assert native.__file__ == os.environ["DIRECTFLIP_NATIVE_SO"], native.__file__
from compositor._native import ffi, lib
buf = ffi.new("uint8_t[]", 8)
buf[0] = 4
out, used, err = ffi.new("struct fs_record[2]"), ffi.new("size_t *"), ffi.new("int *")
lib.fs_decode(buf, 64, 2, lib.FS_SERVER, out, 2, used, err)   # says 64 bytes; there are 8
print("no report")
"""


def test_the_sanitizer_reports_a_read_past_a_buffer(sanitized):
    proc = subprocess.run([sys.executable, "-c", CANARY], env=sanitized, capture_output=True, text=True,
                          timeout=120)
    assert "AddressSanitizer: heap-buffer-overflow" in proc.stderr and "no report" not in proc.stdout, \
        proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 86


def test_every_unit_test_passes_on_the_sanitizer_build(sanitized):
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(UNIT)],
                          cwd=ROOT, env=sanitized, capture_output=True, text=True, timeout=1200)
    tail = (proc.stdout[-3000:] + proc.stderr[-3000:])
    assert proc.returncode == 0, f"unit tests on the sanitizer build:\n{tail}"
    summary = re.search(r"^(\d+) passed", proc.stdout.splitlines()[-1])
    assert summary and int(summary[1]) > 500, tail
    print(f"sanitizer build: {proc.stdout.splitlines()[-1]}")


def test_the_frame_socket_suite_on_the_data_plane_runs_clean_on_the_sanitizer_build(sanitized):
    """The frame-socket tests again with every version-2 client served by the data plane's thread
    (framesocket_env.ON_DATAPLANE): its reads, hand-overs and writes under both sanitizers."""
    tests = sorted(str(p) for p in UNIT.glob("test_framesocket*.py"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=ROOT, env={**sanitized, "DIRECTFLIP_TEST_DATAPLANE": "1"}, capture_output=True,
                          text=True, timeout=1200)
    tail = (proc.stdout[-3000:] + proc.stderr[-3000:])
    assert proc.returncode == 0, f"frame-socket tests on the data plane, sanitizer build:\n{tail}"
    summary = re.search(r"^(\d+) passed", proc.stdout.splitlines()[-1])
    assert summary and int(summary[1]) > 150, tail
    print(f"frame-socket suite on the data plane, sanitizer build: {proc.stdout.splitlines()[-1]}")


def test_the_wire_fuzzer_runs_clean_on_the_sanitizer_build(sanitized, tmp_path):
    """The fuzzer's coverage comes from the Python definition it checks against, which the sanitizer
    runtimes hide from it: the inputs it grows on the plain build are replayed and mutated on the
    sanitizer build."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    harness = str(ROOT / "tests" / "reliability" / "fuzz_wire.py")
    plain = {k: v for k, v in sanitized.items() if k not in ("LD_PRELOAD", "DIRECTFLIP_NATIVE_SO")}
    for env in (plain, sanitized):
        proc = subprocess.run([sys.executable, harness, str(corpus), f"-runs={FUZZ_RUNS}", "-seed=1",
                               f"-artifact_prefix={tmp_path}/", "-max_len=512"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        tail = proc.stderr[-3000:]
        assert proc.returncode == 0, tail
        done = re.search(r"^Done (\d+) runs", proc.stderr, re.MULTILINE)
        assert done and int(done[1]) == FUZZ_RUNS, tail
    inputs = len(list(corpus.iterdir()))
    assert inputs >= 10, f"the plain run grew only {inputs} inputs"
    assert not [p for p in tmp_path.iterdir() if p.name != "corpus"], "the fuzzer wrote crash artifacts"
    print(f"wire fuzzer: {FUZZ_RUNS} inputs plain, {FUZZ_RUNS} on the sanitizer build from a corpus of "
          f"{inputs}")
