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
import struct
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

    def __init__(self, *, outputs: int = 4, delay_us: int = 1000, prime_import: bool = True,
                 tick_us: int = 4000) -> None:
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
        self.tick_us = tick_us   # how often the fake display engine looks for flip events due

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
        env["FAKEDRM_TICK_US"] = str(self.tick_us)
        env["FAKEDRM_PRIME_IMPORT"] = "1" if override.get("prime_import", self.prime_import) else "0"
        if override.get("vgpu") is not None:
            env["FAKEDRM_VGPU"] = str(override["vgpu"].path)
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


# struct vfio_device_gfx_plane_info: argsz, flags, drm_plane_type, drm_format, drm_format_mod, width,
# height, stride, size, x_pos, y_pos, x_hot, y_hot, dmabuf_id, (padding)
_PLANE = struct.Struct("<IIIIQIIIIIIIIII")
XRGB8888 = 0x34325258


class FakeVgpu:
    """A fake mediated device for the fake kernel (FakeKernel.env(vgpu=...)): `path` is its device
    file; a process given that environment and any descriptor of the file sees a vGPU with dma-buf
    display planes. show(N) puts dma-buf N (a file of its own, made here) on the primary plane."""

    def __init__(self, directory: str | Path, width: int, height: int, ids=(1, 2, 3), *,
                 made: bool = False) -> None:
        """`made`: the files are there already (another process made them): only drive them."""
        self.path = Path(directory) / "vgpu"
        self.width, self.height = width, height
        self.queries_path = Path(f"{self.path}.queries")
        if made:
            return
        self.path.write_bytes(bytes(2 * _PLANE.size))   # both planes off
        for ident in ids:
            with open(f"{self.path}.{ident}", "wb") as f:
                f.truncate(width * height * 4)

    def show(self, dmabuf_id: int) -> None:
        """The guest scans out dma-buf `dmabuf_id` now (XRGB8888, width x height)."""
        w, h = self.width, self.height
        answer = _PLANE.pack(_PLANE.size, 0, 1, XRGB8888, 0, w, h, w * 4, w * h * 4, 0, 0, 0, 0, dmabuf_id, 0)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, answer, 0)   # one write: a query sees the old answer or the new one
        finally:
            os.close(fd)

    def queries(self) -> int:
        """Plane queries answered so far (primary and cursor, by any process)."""
        try:
            return self.queries_path.stat().st_size
        except FileNotFoundError:
            return 0
