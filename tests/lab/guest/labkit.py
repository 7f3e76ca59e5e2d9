"""Running `directflip run` and guests inside the lab, for the guest tests that drive the compositor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compositor.control import request


class Compositor:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.policy = workdir / "policy.yaml"
        self.socket = str(workdir / "frames.sock")
        self.control = str(workdir / "control.sock")
        self.log = workdir / "compositor.log"
        self.proc: subprocess.Popen | None = None
        self.guests: list[subprocess.Popen] = []

    def start(self, text: str, *args: str, env: dict[str, str] | None = None,
              prefix: tuple[str, ...] = ()) -> None:
        """Start `directflip run` with this policy text and extra `args`; `prefix` runs it under
        another command (a session launcher), `env` adds to the environment."""
        self.policy.write_text(text)
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "compositor.cli", "-v", "run", "--policy", str(self.policy),
             "--socket", self.socket, "--control", self.control, *args],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"the compositor exited ({self.proc.returncode}):\n{self.log.read_text()}")
            try:
                self.status()
                return
            except (ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                self.proc.kill()   # it must not hold DRM master over the next test
                self.proc.wait(timeout=10)
                pytest.fail(f"the compositor did not answer within 60 s:\n{self.log.read_text()}")
            time.sleep(0.2)

    def status(self) -> dict:
        return request(self.control, {"cmd": "status"})

    def capture(self, monitor: str, path) -> np.ndarray:
        """What `monitor` scans out, read back through its card's writeback connector."""
        request(self.control, {"cmd": "capture", "monitor": monitor, "path": str(path)})
        return np.asarray(Image.open(path).convert("RGB"))

    def output(self, monitor: str) -> dict:
        st = self.status()
        found = [o for o in st["outputs"] if o.get("monitor") == monitor]
        assert found, f"monitor {monitor} is not lit: {json.dumps(st, indent=1)}"
        return found[0]

    def set_policy(self, text: str, expect_change: bool = True) -> dict:
        if expect_change and self.policy.read_text() == text:
            return self.status()  # already in force: saving it again changes nothing
        before = self.status()["policy"]["generation"]
        tmp = self.policy.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.policy)   # the way editors save
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            st = self.status()
            pol = st["policy"]
            if expect_change and pol["generation"] > before:
                return st
            if not expect_change and pol["last_error"]:
                return st
            time.sleep(0.05)
        pytest.fail(f"the policy edit was not taken up:\n{self.tail()}")

    def guest(self, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "compositor.cli", "guest", "--socket", self.socket,
                                 *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.guests.append(proc)
        return proc

    def wait_shown(self, monitor: str, guest: str, timeout: float = 60, path: str | None = None) -> dict:
        """Until `monitor` shows frames of `guest` (presented ones)."""
        deadline = time.monotonic() + timeout
        out: dict = {}
        while time.monotonic() < deadline:
            for o in self.status()["outputs"]:
                if o.get("monitor") == monitor:
                    out = o
            if out.get("guest") == guest and out.get("on_screen") and (path is None or out["path"] == path):
                return out
            time.sleep(0.2)
        pytest.fail(f"{monitor} does not show {guest}: {out}\n{self.tail()}")

    def wait_frame(self, monitor: str, frame: int, timeout: float = 30) -> dict:
        """Until `monitor` has the guest's frame number `frame` on screen (its flip completed)."""
        deadline = time.monotonic() + timeout
        out: dict = {}
        while time.monotonic() < deadline:
            out = self.output(monitor)
            if (out.get("on_screen") or {}).get("frame") == frame and not out.get("in_flight"):
                return out
            time.sleep(0.1)
        pytest.fail(f"{monitor} never showed frame {frame}: {out}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text().splitlines()[-n:])

    def stop_guests(self) -> None:
        for proc in self.guests:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.guests:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.guests.clear()

    def stop(self) -> int:
        self.stop_guests()
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def wait_for(what: str, check, timeout: float = 30):
    """Until check() returns something other than None or False; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def colour_share(rgb: np.ndarray, colour: tuple[int, int, int], tol: int = 4) -> float:
    """The fraction of pixels within tol of colour."""
    return float(np.mean(np.all(np.abs(rgb.astype(int) - np.array(colour)) <= tol, axis=-1)))


def finish(proc: subprocess.Popen, timeout: float = 60) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"guest exited {proc.returncode}:\n{out}"
    return out
