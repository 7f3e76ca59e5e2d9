"""Running `directflip run` and guests inside the lab, for the guest tests that drive the compositor."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compositor.control import request
from compositor.daemon import card_seat
from compositor.session import activate_vt
from directflip_tools.synthetic import decode_counter, guest_colour

CONSOLE_GREY = (170, 170, 170)      # fbcon's default foreground
# Deadlines, not promises: the lab's CPU is emulated on a machine that may be busy with other work, and
# a Python process (a compositor, a guest) takes seconds to start there; how long things took is
# printed by the tests and measured by bench/.
# The lab's four monitors as the lab tests name them: the three virtio-gpu heads and vkms' output.
# vkms has free overlay planes, where a guest's name would show for a moment over the picture that
# tests compare pixel for pixel: `label: 0` (test_input.py turns it on to test it).
LAB_MONITORS = """monitors:
  left:   {connector: Virtual-1, driver: virtio_gpu}
  centre: {connector: Virtual-2, driver: virtio_gpu}
  right:  {connector: Virtual-3, driver: virtio_gpu}
  wb:     {connector: "Virtual-*", driver: vkms, label: 0}
"""
START_WITHIN = 180.0
STATUS_WITHIN = 60.0   # a status answer from a compositor on an emulated CPU that is kept busy
_LAUNCHED: list[subprocess.Popen] = []   # every compositor process started, for kill_leftovers()
CAPTURE_WITHIN = 120.0   # a capture reads, composes and encodes a PNG in the emulated CPU
DRM_IOCTL_SET_MASTER = 0x641E
DRM_IOCTL_DROP_MASTER = 0x641F


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
        self.launch(*args, env=env, prefix=prefix)
        deadline = time.monotonic() + START_WITHIN
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"the compositor exited ({self.proc.returncode}):\n{self.log.read_text()}")
            if self.answers():
                return
            if time.monotonic() > deadline:
                self.proc.kill()   # it must not hold DRM master over the next test
                self.proc.wait(timeout=10)
                pytest.fail(f"the compositor did not answer within {START_WITHIN:.0f} s:\n"
                            f"{self.log.read_text()}")
            time.sleep(0.2)

    def launch(self, *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = (),
               append: bool = False) -> None:
        """Spawn `directflip run` on the policy file as it is, without waiting for it; `append` keeps
        the log of an earlier process."""
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "compositor.cli", "-v", "run", "--policy", str(self.policy),
             "--socket", self.socket, "--control", self.control, *args],
            stdout=self.log.open("a" if append else "w"), stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})})
        _LAUNCHED.append(self.proc)

    def answers(self) -> bool:
        """Whether its control socket answers."""
        try:
            self.status()
            return True
        except (ConnectionError, OSError):
            return False

    def status(self) -> dict:
        return request(self.control, {"cmd": "status"}, timeout=STATUS_WITHIN)

    def capture(self, monitor: str, path) -> np.ndarray:
        """What `monitor` scans out, read back through its card's writeback connector."""
        request(self.control, {"cmd": "capture", "monitor": monitor, "path": str(path)},
                timeout=CAPTURE_WITHIN)
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

    def wait_shown(self, monitor: str, guest: str, timeout: float = 180, path: str | None = None) -> dict:
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

    def wait_frame(self, monitor: str, frame: int, timeout: float = 120) -> dict:
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
            code = self.proc.returncode if self.proc else 0
        else:
            self.proc.send_signal(signal.SIGTERM)
            code = self.proc.wait(timeout=30)
        self.stop_vmms()
        return code

    def vmms(self) -> dict[str, dict]:
        """The records of the VMMs the compositor launched (they outlive it), by guest."""
        out = {}
        for path in (self.dir / "launched").glob("*.json"):
            out[path.stem] = json.loads(path.read_text())
        return out

    def stop_vmms(self) -> None:
        """Stop the VMMs the compositor launched: they outlive it by design, and a vGPU they hold can
        be neither removed nor opened by the next test."""
        from compositor.launched import Launched

        for rec in (Launched(**r) for r in self.vmms().values()):
            if not rec.alive():
                continue
            os.kill(rec.pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while rec.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            if rec.alive():
                os.kill(rec.pid, signal.SIGKILL)


def wait_for(what: str, check, timeout: float = 90, why=None):
    """Until check() returns something other than None or False; that value. On timeout the failure
    says what was awaited and, with `why`, why() (what the last check saw)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}" + (f": {why()}" if why is not None else ""))
        time.sleep(0.2)


def colour_share(rgb: np.ndarray, colour: tuple[int, int, int], tol: int = 4) -> float:
    """The fraction of pixels within tol of colour."""
    return float(np.mean(np.all(np.abs(rgb.astype(int) - np.array(colour)) <= tol, axis=-1)))


def read_until(proc: subprocess.Popen, text: str, timeout: float = 90) -> list[str]:
    """The guest's output lines up to and including the first that contains `text`, read with a
    deadline (a bare readline() waits for ever on a guest that stalls without printing). Ends early,
    with what it read, when the guest closes its output; fails naming what it saw at the deadline."""
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf, lines = b"", []
    while True:
        while b"\n" in buf:
            line, _, buf = buf.partition(b"\n")
            lines.append(line.decode(errors="replace") + "\n")
            if text in lines[-1]:
                return lines
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no {text!r} from the guest within {timeout:.0f} s; it printed:\n{''.join(lines)}"
                        f"{buf.decode(errors='replace')}")
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return lines + ([buf.decode(errors="replace")] if buf else [])
            buf += chunk


def finish(proc: subprocess.Popen, timeout: float = 60) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"guest exited {proc.returncode}:\n{out}"
    return out


# --- VT switches -----------------------------------------------------------------------------------

def console_text() -> None:
    """Fill tty1 with '#': the console's picture, easy to tell from any guest's."""
    fd = os.open("/dev/tty1", os.O_WRONLY | os.O_NOCTTY)
    try:
        os.write(fd, b"\033[H\033[2J" + (b"#" * 120 + b"\r\n") * 40)
    finally:
        os.close(fd)


def set_master_works(path: str) -> None:
    """Become master of `path` from a new descriptor and drop it again: raises (EBUSY) while another
    open file of the card is master."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, DRM_IOCTL_SET_MASTER)
        fcntl.ioctl(fd, DRM_IOCTL_DROP_MASTER)
    finally:
        os.close(fd)


def frames_on_screen(comp: Compositor) -> dict:
    return {o["monitor"]: (o.get("on_screen") or {}).get("frame") for o in comp.status()["outputs"]}


def switch_away(comp: Compositor, host) -> dict:
    """Switch to VT 1 (tty1, with console_text on it) and check the compositor let go: every card
    paused, no master held (another descriptor can take it), the console on head 0, no commits while
    away. Returns the status with every card paused."""
    activate_vt(1)
    st = wait_for("every card paused", lambda: (s := comp.status())["session"]["paused"].keys()
                  == {c["path"] for c in s["cards"]} and s, timeout=20)
    assert not any(c["master"] for c in st["cards"]), st["cards"]

    def console_on_screen():
        rgb = host.screendump(0)
        grey, guest = colour_share(rgb, CONSOLE_GREY, tol=8), colour_share(rgb, guest_colour("office"))
        return grey > 0.05 and guest < 0.001

    wait_for("the console on head 0 (screendump)", console_on_screen)
    for card in st["cards"]:
        set_master_works(card["path"])
    before = frames_on_screen(comp)
    time.sleep(1.0)
    assert frames_on_screen(comp) == before
    return st


def switch_back(comp: Compositor, host, vt: int, shown) -> dict:
    """Switch back to `vt` and check every guest of `shown` ((monitor, guest, head), ...) is on its
    head again (screendumps), the vkms mirror too, and frames move. Returns the status."""
    activate_vt(vt)
    wait_for("every card resumed", lambda: comp.status()["session"]["paused"] == {}, timeout=20)
    for monitor, name, head in shown:
        comp.wait_shown(monitor, name, timeout=30)
        wait_for(f"{name} on head {head} (screendump)",
                 lambda head=head, name=name: colour_share(host.screendump(head), guest_colour(name)) > 0.2)
    comp.wait_shown("wb", "office", timeout=30)
    first = decode_counter(host.screendump(2))     # build fills head 2 (640x480), counter at its corner
    assert first is not None
    wait_for("build's counter moving", lambda: decode_counter(host.screendump(2)) not in (None, first))
    st = comp.status()
    assert all(c["master"] for c in st["cards"]), st["cards"]
    assert st["session"]["switches"] >= 4      # a pause and a resume per card
    return st


# --- seats -----------------------------------------------------------------------------------------

def udev(*args: str) -> None:
    subprocess.run(["udevadm", *args], check=True, timeout=60)


@contextlib.contextmanager
def vkms_on_seat1(cards: dict[str, str], rule: Path):
    """The vkms card on seat1 while inside, the way `loginctl attach` does it: a udev rule setting
    ID_SEAT. Yields the card's path."""
    vkms = cards["vkms"]
    rule.write_text('SUBSYSTEM=="drm", KERNEL=="card[0-9]*", KERNELS=="vkms", '
                    'ENV{ID_SEAT}="seat1", TAG+="seat"\n')
    udev("control", "--reload")
    udev("trigger", "--subsystem-match=drm", "--action=change")
    udev("settle")
    assert card_seat(vkms) == "seat1", "the udev rule did not put the vkms card on seat1"
    try:
        yield vkms
    finally:
        rule.unlink()
        udev("control", "--reload")
        udev("trigger", "--subsystem-match=drm", "--action=change")
        udev("settle")
    assert card_seat(vkms) == "seat0"


def kill_leftovers() -> list[int]:
    """Kill every compositor a test started and did not stop (a fixture that failed between its
    start and its yield never reaches its teardown): one left running would keep DRM master and
    fail every later test with EBUSY. The pids killed."""
    killed = []
    for proc in _LAUNCHED:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
            killed.append(proc.pid)
    _LAUNCHED.clear()
    return killed
