"""The fake display kernel of bench/fakedrm.c, for running the real compositor on a machine without a
KMS device: build it, and the environment that makes a process see a card at `FakeKernel.path`.

    with FakeKernel(outputs=4) as fake:
        subprocess.Popen([... "directflip", "run", "--device", fake.path, ...], env=fake.env())
        fake.stats()   # {"framebuffers": 5, "handles": 8, "blobs": 4}: what the compositor holds

Only the kernel is faked: libdrm, the compositor's C helpers and its Python run unchanged on top of it.
The fake answers a process that opens `path` (one opener at a time); any other process given the same
environment (a synthetic guest allocating its buffers "on" the card) gets a kernel of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "fakedrm.c"


def build(directory: str | Path) -> Path:
    """Compile fakedrm.c into `directory`/fakedrm.so (warnings are errors); its path."""
    out = Path(directory) / "fakedrm.so"
    cflags = subprocess.run(["pkg-config", "--cflags", "libdrm"], check=True, capture_output=True,
                            text=True).stdout.split()
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", *cflags, "-o", str(out),
                    str(SOURCE), "-ldl", "-lpthread"], check=True)
    return out


class FakeKernel:
    """A built fake kernel and its card path, in a temporary directory removed on close()."""

    def __init__(self, *, outputs: int = 4, delay_us: int = 1000, prime_import: bool = True) -> None:
        if not 1 <= outputs <= 8:
            raise ValueError(f"the fake card has 1 to 8 outputs, not {outputs}")
        self.dir = Path(tempfile.mkdtemp(prefix="directflip-fakedrm-"))
        try:
            self.library = build(self.dir)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.path = str(self.dir / "card0")
        Path(self.path).touch()   # stat() works; udev knows nothing of it (seat0, as a bare card)
        self.stats_path = self.dir / "stats"
        self.outputs, self.delay_us, self.prime_import = outputs, delay_us, prime_import

    def env(self, base: dict[str, str] | None = None, **override) -> dict[str, str]:
        """`base` (default: this process's environment) with the fake preloaded. Keyword arguments
        override the card for this process: outputs, delay_us, prime_import, and stats=False for a
        process whose holdings stats() must not report (a guest allocating on the card)."""
        env = dict(os.environ if base is None else base)
        preload = env.get("LD_PRELOAD", "")
        env["LD_PRELOAD"] = f"{self.library} {preload}".strip()
        env["FAKEDRM_PATH"] = self.path
        env["FAKEDRM_OUTPUTS"] = str(override.get("outputs", self.outputs))
        env["FAKEDRM_DELAY_US"] = str(override.get("delay_us", self.delay_us))
        env["FAKEDRM_PRIME_IMPORT"] = "1" if override.get("prime_import", self.prime_import) else "0"
        if override.get("stats", True):
            env["FAKEDRM_STATS"] = str(self.stats_path)
        else:
            env.pop("FAKEDRM_STATS", None)
        return env

    def stats(self) -> dict[str, int]:
        """What the process that opened the card holds in the fake kernel right now (framebuffers,
        buffer handles, property blobs); empty before it made any."""
        try:
            words = self.stats_path.read_text().split()
        except FileNotFoundError:
            return {}
        return {words[i]: int(words[i + 1]) for i in range(0, len(words) - 1, 2)}

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> FakeKernel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
