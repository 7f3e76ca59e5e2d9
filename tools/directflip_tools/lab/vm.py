"""Boot the lab VM with virtme-ng and serve the guest's requests while its command runs.

The VM is a Debian kernel under QEMU TCG (KVM does not run stock kernels on our machines) with the
host's root as its read-only root, plus:

- ``virtio-gpu-pci`` with three heads: head 0 connected at boot, heads 1 and 2 plugged through VNC
  right after QEMU starts when ``connect_all_heads`` (the guest's driver usually sees them at probe);
- a QMP socket for ``screendump`` and one VNC socket per head for SetDesktopSize (plug/unplug);
- a virtio keyboard, mouse and tablet, driven from here with QMP ``input-send-event``: the guest
  kernel sees real evdev devices (``QEMU Virtio Keyboard`` …), as a desk's USB devices would be;
- a run directory shared read-write with the guest at the same path (screendumps land there).

The guest runs ``python -m directflip_tools.lab.guest`` (see there), which talks to `_Services` through the
line protocol of `directflip_tools.lab.channel`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from directflip_tools.lab import cache
from directflip_tools.lab.cache import LabError, Manifest
from directflip_tools.lab.channel import encode_reply, split_request
from directflip_tools.lab.progress import Progress
from directflip_tools.lab.vnc import VncError, set_desktop_size

REPO = Path(__file__).resolve().parents[3]
HEADS = 3
# Heads 1 and 2 are no larger than head 0: fbcon sizes its framebuffer from the heads it sees at probe,
# and a head plugged later with a larger mode would be lit at a smaller one. Distinct sizes let a test
# tell the heads apart.
DEFAULT_HEAD_SIZES = ((1024, 768), (800, 600), (640, 480))
# The lab's input devices (QMP id → QEMU model). QEMU routes `key` events to the keyboard the guest
# activated last, `rel` to the relative pointer and `abs` to the tablet.
INPUT_DEVICES = {"kbd0": "virtio-keyboard-pci", "mouse0": "virtio-mouse-pci", "tablet0": "virtio-tablet-pci"}
_INPUT_EVENT_TYPES = ("key", "btn", "rel", "abs")
_SHELL_SAFE = re.compile(r"^[A-Za-z0-9_./+=:,@-]+$")


@dataclass
class VmOptions:
    connect_all_heads: bool = True
    head_sizes: tuple[tuple[int, int], ...] = DEFAULT_HEAD_SIZES
    cpus: int = 2
    memory: str = "2G"
    boot_timeout: float = 240.0  # until the guest launcher's first request
    timeout: float = 1200.0  # the whole run
    cwd: Path = REPO
    rwdirs: tuple[Path, ...] = ()  # more host directories the guest may write (same path inside)


def _log(message: str) -> None:
    print(f"lab: {message}", file=sys.stderr, flush=True)


def _shell_safe(path: Path | str, what: str) -> str:
    # vng re-joins its arguments into a shell command line without quoting --rwdir and --qemu-opts.
    text = str(path)
    if not _SHELL_SAFE.match(text):
        raise LabError(f"{what} path {text!r} has characters vng cannot pass through its shell")
    return text


def compile_repo(root: Path) -> None:
    """Byte-compile the tree on the host: the guest sees it read-only, so its pyc files would be lost."""
    targets = [str(root / d) for d in ("compositor", "tools", "tests", "bench") if (root / d).is_dir()]
    if targets:
        subprocess.run([sys.executable, "-m", "compileall", "-q", *targets], check=False,
                       stdout=subprocess.DEVNULL)


def vng_command(manifest: Manifest, run_dir: Path, guest_cmd: Sequence[str], options: VmOptions) -> list[str]:
    vng = shutil.which("vng")
    if vng is None:
        raise LabError("`vng` (virtme-ng) is not on PATH; install the test extras: pip install -e '.[test]'")
    d = _shell_safe(run_dir, "run directory")
    w0, h0 = options.head_sizes[0]
    qemu_opts = [
        f"-device virtio-gpu-pci,id=gpu0,max_outputs={HEADS},xres={w0},yres={h0}",
        f"-qmp unix:{d}/qmp.sock,server=on,wait=off",
        *(f"-vnc unix:{d}/vnc{n}.sock,id=vnc{n},display=gpu0,head={n}" for n in range(HEADS)),
        *(f"-device {model},id={dev}" for dev, model in INPUT_DEVICES.items()),
    ]
    heads = HEADS if options.connect_all_heads else 1
    launcher = [sys.executable, "-m", "directflip_tools.lab.guest", "--manifest",
                str(Path(manifest.cache) / cache.MANIFEST_NAME), "--shared", d, "--heads", str(heads),
                "--", *guest_cmd]
    return [
        vng, "-v", "-r", _shell_safe(manifest.vmlinuz, "kernel"),
        "--disable-kvm", "--disable-microvm",
        "--cpus", str(options.cpus), "--memory", options.memory,
        f"--rwdir={d}",
        *(f"--rwdir={_shell_safe(p, 'shared directory')}" for p in options.rwdirs),
        f"--qemu-opts={' '.join(qemu_opts)}",
        "--exec", "exec env PYTHONUNBUFFERED=1 " + shlex.join(launcher),
    ]


class _Services:
    """The host side of the channel: QMP for screendumps, VNC for hotplug."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._qmp: Any = None
        self._dumps = 0
        self.progress = Progress()

    async def _socket(self, name: str, timeout: float = 30.0) -> str:
        path = self.run_dir / name
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise LabError(f"QEMU did not create {path}")
            await asyncio.sleep(0.05)
        return str(path)

    async def qmp(self) -> Any:
        if self._qmp is None:
            from qemu.qmp import QMPClient

            client = QMPClient("directflip-lab")
            await client.connect(await self._socket("qmp.sock"))
            self._qmp = client
        return self._qmp

    async def close(self) -> None:
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                await self._qmp.disconnect()

    def _head(self, request: dict[str, Any]) -> int:
        head = request.get("head")
        if not isinstance(head, int) or not 0 <= head < HEADS:
            raise ValueError(f"head must be an integer in 0..{HEADS - 1}, got {head!r}")
        return head

    async def set_size(self, head: int, width: int, height: int) -> dict[str, Any]:
        status = await set_desktop_size(await self._socket(f"vnc{head}.sock"), width, height)
        return {"head": head, "width": width, "height": height, "status": status}

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "ping":
            return {"pong": True, "time": time.time()}
        if op == "progress":
            return self.progress.note(request)
        if op == "screendump":
            head = self._head(request)
            fmt = request.get("format", "ppm")
            if fmt not in ("ppm", "png"):
                raise ValueError(f"format must be ppm or png, got {fmt!r}")
            self._dumps += 1
            path = self.run_dir / f"dump-{self._dumps:04d}-head{head}.{fmt}"
            qmp = await self.qmp()
            await qmp.execute("screendump", {"filename": str(path), "device": "gpu0", "head": head,
                                             "format": fmt})
            return {"path": str(path), "size": path.stat().st_size, "format": fmt, "head": head}
        if op == "plug":
            width, height = request.get("width"), request.get("height")
            if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
                raise ValueError(f"plug needs positive integer width and height, got {width!r}x{height!r}")
            return await self.set_size(self._head(request), width, height)
        if op == "unplug":
            return await self.set_size(self._head(request), 0, 0)
        if op == "input":
            events = request.get("events")
            if not isinstance(events, list) or not events or not all(
                    isinstance(e, dict) and e.get("type") in _INPUT_EVENT_TYPES for e in events):
                raise ValueError(f"input needs a list of QMP InputEvents ({', '.join(_INPUT_EVENT_TYPES)})")
            qmp = await self.qmp()
            t0 = time.monotonic()
            await qmp.execute("input-send-event", {"events": events})
            return {"sent": len(events), "ms": round((time.monotonic() - t0) * 1000, 1)}
        raise ValueError(f"unknown operation {op!r}")


class LabVM:
    """One boot of the lab: runs a command in the guest and serves its requests."""

    def __init__(self, manifest: Manifest, options: VmOptions | None = None) -> None:
        self.manifest = manifest
        self.options = options or VmOptions()
        self.console_tail: collections.deque[str] = collections.deque(maxlen=60)

    def run(self, guest_cmd: Sequence[str]) -> int:
        compile_repo(self.options.cwd)
        run_dir = Path(tempfile.mkdtemp(prefix="directflip-lab-"))
        try:
            return asyncio.run(self._run(run_dir, guest_cmd))
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)

    async def _run(self, run_dir: Path, guest_cmd: Sequence[str]) -> int:
        cmd = vng_command(self.manifest, run_dir, guest_cmd, self.options)
        console_path = run_dir / "console.log"
        services = _Services(run_dir)
        t0 = time.monotonic()
        _log(f"booting {self.manifest.kver} under QEMU TCG ({self.options.cpus} cpus, {self.options.memory})")
        with open(console_path, "wb") as console:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=console,
                cwd=self.options.cwd, start_new_session=True, limit=64 << 20)
        # SIGTERM (a CI timeout, kill) must not leave QEMU behind: treat it like ctrl-C.
        main_task = asyncio.current_task()
        assert main_task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
        tasks: list[asyncio.Task] = []
        try:
            if self.options.connect_all_heads:
                tasks.append(asyncio.create_task(self._plug_at_boot(services)))
            try:
                return await asyncio.wait_for(self._serve(proc, services, t0), self.options.timeout)
            except TimeoutError:
                self._show_console(console_path)
                for line in services.progress.report():
                    _log(line)
                raise LabError(f"the lab run took longer than {self.options.timeout:.0f} s; "
                               "stopped it") from None
            except _BootFailure as exc:
                self._show_console(console_path)
                raise LabError(str(exc)) from None
        finally:
            for task in tasks:
                task.cancel()
            await services.close()
            await self._stop(proc)

    async def _plug_at_boot(self, services: _Services) -> None:
        for head in range(1, HEADS):
            width, height = self.options.head_sizes[head]
            try:
                await services.set_size(head, width, height)
                _log(f"head {head} plugged at {width}x{height}")
            except (VncError, LabError) as exc:
                _log(f"could not connect head {head} at boot: {exc}")

    async def _serve(self, proc: asyncio.subprocess.Process, services: _Services, t0: float) -> int:
        assert proc.stdout is not None and proc.stdin is not None
        out = sys.stdout.buffer
        booted = False
        boot_deadline = t0 + self.options.boot_timeout
        while True:
            try:
                timeout = None if booted else max(boot_deadline - time.monotonic(), 0.0)
                line = await asyncio.wait_for(proc.stdout.readline(), timeout)
            except TimeoutError:
                raise _BootFailure(f"the guest launcher did not come up within "
                                   f"{self.options.boot_timeout:.0f} s") from None
            if not line:
                break
            text, request = split_request(line)
            if text:
                out.write(text)
                out.flush()
            if request is None:
                continue
            if not booted:
                booted = True
                _log(f"guest up after {time.monotonic() - t0:.1f} s")
            try:
                result = await asyncio.wait_for(services.handle(request), 60)
                reply = encode_reply(request.get("id"), result=result)
            except Exception as exc:  # every failure goes back to the guest, which raises it
                reply = encode_reply(request.get("id"), error=f"{type(exc).__name__}: {exc}")
            proc.stdin.write(reply)
            try:
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                break
        rc = await proc.wait()
        if not booted:
            raise _BootFailure(f"the VM stopped (vng exit {rc}) before the guest launcher came up")
        _log(f"guest command exited {rc}; whole run {time.monotonic() - t0:.1f} s")
        return rc

    async def _stop(self, proc: asyncio.subprocess.Process) -> None:
        """End vng and QEMU: QEMU is vng's grandchild, so signal the session we started vng in and
        wait until no process of it is left."""

        def group_alive() -> bool:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True

        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
            deadline = time.monotonic() + (1.0 if sig is None else 5.0)
            while time.monotonic() < deadline:
                if proc.returncode is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proc.wait(), 0.1)
                elif not group_alive():
                    return
                else:
                    await asyncio.sleep(0.05)

    def _show_console(self, console_path: Path) -> None:
        try:
            lines = console_path.read_text(errors="replace").splitlines()[-40:]
        except OSError:
            lines = []
        _log("last lines of the VM console:")
        for line in lines:
            print(f"  | {line}", file=sys.stderr)
        sys.stderr.flush()


class _BootFailure(Exception):
    pass


def run(guest_cmd: Sequence[str], options: VmOptions | None = None, manifest: Manifest | None = None) -> int:
    """Boot the lab (setting it up if needed), run guest_cmd inside, return its exit code."""
    if manifest is None:
        manifest = cache.ensure()
    return LabVM(manifest, options).run(guest_cmd)
