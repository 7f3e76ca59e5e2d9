"""libvirt domains as guests: a real libvirtd (Debian's, started here without systemd) runs nested TCG
domains with `<graphics type='dbus'/>`, peer to peer and on the domain's bus. Their SeaBIOS screens
appear pixel-identical on their heads (QMP screendump of our monitor against libvirt's own screenshot of
the domain); `virsh destroy` gives the slate with the domain's state and `virsh start` the picture
again; libvirtd restarted under a running domain changes nothing on screen; directflip killed and
started again gets the domain back. Bad input: a domain that does not exist, one without a D-Bus
display, libvirtd away, a URI the user may not open."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from labkit import Compositor, wait_for
from PIL import Image

URI = "qemu:///system"
POLICY = """version: 1
monitors:
  left:   {connector: Virtual-1, driver: virtio_gpu, scaling: none}
  centre: {connector: Virtual-2, driver: virtio_gpu, scaling: none}
  right:  {connector: Virtual-3, driver: virtio_gpu}
guests:
  p2p:   {kind: libvirt, domain: df-p2p}
  bus:   {kind: libvirt, domain: df-bus, resize: false}
  ghost: {kind: libvirt, domain: df-nosuch}
placements:
  - {guest: p2p, monitor: left}
  - {guest: bus, monitor: centre}
  - {guest: ghost, monitor: right}
"""


def domain_xml(name: str, graphics: str, video: str = "vga") -> str:
    """A domain with no disk: SeaBIOS draws its text screen and waits for a bootable device."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>{shutil.which("qemu-system-x86_64")}</emulator>
    {graphics}
    <video><model type='{video}'/></video>
    <memballoon model='none'/>
  </devices>
</domain>"""


class Libvirtd:
    """libvirtd as root, without systemd: QEMU runs as root (so the domain bus libvirt starts admits
    the compositor) and logs to files (no virtlogd)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.proc: subprocess.Popen | None = None
        with open("/etc/libvirt/qemu.conf", "a") as f:   # /etc is the lab guest's own (a RAM overlay)
            f.write('\nstdio_handler = "file"\nuser = "root"\ngroup = "root"\n')
        for path in Path("/etc/libvirt/qemu/networks/autostart").glob("*"):
            path.unlink()
        Path("/var/log/libvirt/qemu").mkdir(parents=True, exist_ok=True)

    def start(self) -> float:
        """Start it; seconds until qemu:///system answers."""
        from compositor.sources.libvirt_domain import load_libvirt

        libvirt = load_libvirt()   # the binding the compositor uses, its errors not printed

        started = time.monotonic()
        self.proc = subprocess.Popen(["libvirtd"], stdout=(self.work / "libvirtd.log").open("a"),
                                     stderr=subprocess.STDOUT)

        def answers() -> bool:
            try:
                libvirt.open(URI).close()
                return True
            except libvirt.libvirtError:
                return False
        wait_for("libvirtd answering", answers, timeout=120)
        return time.monotonic() - started

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=180)
    if check:
        assert out.returncode == 0, f"virsh {' '.join(args)}: {out.stdout}{out.stderr}"
    return out


def screenshot(domain: str, path: Path) -> np.ndarray:
    """The domain's own picture, as libvirt takes it (QEMU's screendump)."""
    virsh("screenshot", domain, str(path))
    return np.asarray(Image.open(path).convert("RGB"))


def text_pixels(rgb: np.ndarray) -> float:
    return float(np.mean(np.any(rgb > 40, axis=-1)))


def libvirt_state(lab, guest: str) -> dict:
    g = next(g for g in lab.status()["guests"] if g["name"] == guest)
    return g["qemu"]


@pytest.fixture(scope="module")
def lab(cards, tmp_path_factory):
    import libvirt  # noqa: F401 - the binding the compositor uses: its absence fails here, loudly

    work = tmp_path_factory.mktemp("libvirt")
    daemon = Libvirtd(work)
    try:
        yield from served(work, daemon)
    finally:   # no nested VM may go on eating the lab's CPUs after this module
        if daemon.proc is not None and daemon.proc.poll() is None:
            for name in ("df-p2p", "df-bus"):
                virsh("destroy", name, check=False)
        daemon.stop()
        left = subprocess.run(["pkill", "-9", "-e", "-f", "guest=df-|/run/libvirt/qemu/dbus/"],
                              capture_output=True, text=True).stdout.strip()
        if left:
            print(f"killed what libvirt left running: {left}")


def served(work: Path, daemon: Libvirtd):
    took = daemon.start()
    print(f"libvirtd answering {took:.1f} s after its start")
    # df-p2p has a virtio VGA: QEMU passes the monitor's size on to it (SetUIInfo); std VGA takes none
    for name, graphics, video in (("df-p2p", "<graphics type='dbus' p2p='yes'/>", "virtio"),
                                  ("df-bus", "<graphics type='dbus'/>", "vga"),
                                  ("df-vnc", "<graphics type='vnc' socket='/tmp/df-vnc.sock'/>", "vga")):
        xml = work / f"{name}.xml"
        xml.write_text(domain_xml(name, graphics, video))
        virsh("define", str(xml))
    started = time.monotonic()
    virsh("start", "df-p2p")
    virsh("start", "df-bus")
    print(f"two domains started in {time.monotonic() - started:.1f} s")
    comp = Compositor(work)
    comp.start(POLICY)
    comp.work, comp.libvirtd = work, daemon
    yield comp
    code = comp.stop()
    print(comp.tail(30))
    assert code == 0


def lit(lab, monitor: str) -> dict:
    """The monitor's status entry, {} while it is not lit (a compositor starting)."""
    return next((o for o in lab.status()["outputs"] if o.get("monitor") == monitor), {})


def matches(lab, host, head: int, monitor: str, domain: str, name: str) -> float:
    """The share of the domain's pixels our head shows identically (1:1, where the plan put it)."""
    out = lit(lab, monitor)
    if out.get("guest") is None or out["path"] == "slate" or not out.get("dst"):
        return 0.0
    mine = host.screendump(head)
    theirs = screenshot(domain, lab.work / f"{name}.ppm")
    size, x, y = out["dst"].split("+")
    w, h = (int(v) for v in size.split("x"))
    x, y = int(x), int(y)
    if (h, w) != theirs.shape[:2]:
        return 0.0   # the domain changed mode between the two pictures
    return float(np.mean(np.all(mine[y:y + h, x:x + w] == theirs, axis=-1)))


def identical(lab, host, head: int, monitor: str, domain: str, name: str, timeout: float) -> float:
    """Until the head shows the domain's picture (98 % of its pixels identical); that share."""
    return wait_for(f"{domain}'s picture on head {head}",
                    lambda: (s := matches(lab, host, head, monitor, domain, name)) > 0.98 and s,
                    timeout=timeout)


def test_a_p2p_domains_boot_screen_appears_on_its_monitor(lab, host):
    wait_for("SeaBIOS text on df-p2p's screen",
             lambda: text_pixels(screenshot("df-p2p", lab.work / "probe.ppm")) > 0.003, timeout=240)
    share = wait_for("head 0 showing df-p2p's picture",
                     lambda: (s := matches(lab, host, 0, "left", "df-p2p", "p2p")) > 0.98 and s, timeout=120)
    q = wait_for("QEMU told df-p2p's monitor size", lambda: (q := libvirt_state(lab, "p2p"))["resizes"] and q,
                 timeout=60)
    print(f"df-p2p on left: {share:.4f} of its pixels identical; told its monitor is {q['ui_size']} "
          f"({q['resizes']} SetUIInfo answered); {q['libvirt']}")
    assert q["libvirt"]["display"] == "p2p" and q["libvirt"]["state"] == "running"
    mode = [int(v) for v in lit(lab, "left")["mode"].split("@")[0].split("x")]
    assert q["connection"] == "connected" and q["ui_size"] == mode, (q["ui_size"], mode)


def test_the_seats_keys_reach_the_domain_through_its_display(lab, host):
    """Input goes to the domain's console over the connection libvirt handed out: QEMU answers each
    key call (org.qemu.Display1.Keyboard) on it."""
    from compositor.control import request

    wait_for("df-p2p connected", lambda: libvirt_state(lab, "p2p")["connection"] == "connected", timeout=240)
    request(lab.control, {"cmd": "focus", "monitor": "left"})
    before = libvirt_state(lab, "p2p")["input"]
    host.keys("a")
    after = wait_for("QEMU answering the key calls",
                     lambda: (i := libvirt_state(lab, "p2p")["input"])["answered"] >= before["answered"] + 2
                     and i, timeout=60)
    print(f"df-p2p input: {before} -> {after}")
    assert after["refused"] == before["refused"] and after["keyboard"]


def test_a_domain_on_its_own_bus_appears_on_its_monitor(lab, host):
    wait_for("SeaBIOS text on df-bus's screen",
             lambda: text_pixels(screenshot("df-bus", lab.work / "probe-bus.ppm")) > 0.003, timeout=240)
    share = wait_for("head 1 showing df-bus's picture",
                     lambda: (s := matches(lab, host, 1, "centre", "df-bus", "bus")) > 0.98 and s,
                     timeout=120)
    q = libvirt_state(lab, "bus")
    print(f"df-bus on centre: {share:.4f} of its pixels identical; {q['target']}, {q['libvirt']}")
    assert q["libvirt"]["display"] == "bus"


def test_a_domain_that_does_not_exist_is_named_and_the_others_are_served(lab, host):
    out = wait_for("right showing the slate for ghost",
                   lambda: (o := lit(lab, "right")).get("path") == "slate"
                   and "df-nosuch" in (o.get("reason") or "") and o, timeout=60)
    q = libvirt_state(lab, "ghost")
    print(f"ghost: slate {out['reason']!r}; status {q['connection']}: {q['error']}")
    assert out["reason"] == "libvirt at qemu:///system has no domain df-nosuch"
    assert lab.output("left")["path"] != "slate"


def test_another_client_taking_the_display_over_is_said_and_not_fought(lab, host):
    """What virt-viewer does: open the domain's display itself. QEMU keeps one peer-to-peer client and
    drops directflip's connection; directflip says so and does not take it back while the domain runs."""
    import asyncio
    import socket

    from compositor.sources.libvirt_domain import load_libvirt
    from compositor.sources.qemu_dbus import PeerBus

    wait_for("df-p2p on head 0", lambda: matches(lab, host, 0, "left", "df-p2p", "t0") > 0.98, timeout=240)
    libvirt = load_libvirt()
    conn = libvirt.open(URI)
    sock = socket.socket(fileno=conn.lookupByName("df-p2p").openGraphicsFD(0, 0))

    async def authenticate() -> PeerBus:
        return await PeerBus(sock).start()
    loop = asyncio.new_event_loop()
    other = loop.run_until_complete(authenticate())
    try:
        out = wait_for("left saying the display was taken over",
                       lambda: (o := lit(lab, "left")).get("path") == "slate"
                       and "taken over" in (o.get("reason") or "") and o, timeout=60)
        print(f"taken over: slate {out['reason']!r}")
        assert out["reason"].startswith("df-p2p's display was taken over by another client")
        connects = libvirt_state(lab, "p2p")["connects"]
        time.sleep(5)   # many retry periods: directflip leaves the display to the other client
        q = libvirt_state(lab, "p2p")
        assert q["connects"] == connects and q["libvirt"]["taken_over"], q
    finally:
        other.disconnect()
        loop.close()
        conn.close()


def test_destroy_shows_the_state_and_start_brings_the_domains_back(lab, host):
    virsh("destroy", "df-p2p")
    virsh("destroy", "df-bus")
    for monitor, domain in (("left", "df-p2p"), ("centre", "df-bus")):
        out = wait_for(f"{monitor} showing {domain}'s state",
                       lambda m=monitor, d=domain: (o := lit(lab, m)).get("path") == "slate"
                       and o.get("reason") == f"{d} is shut off" and o, timeout=60)
        print(f"after virsh destroy: {monitor} slate {out['reason']!r}")
    assert libvirt_state(lab, "p2p")["libvirt"]["state"] == "shut off"
    virsh("start", "df-p2p")
    virsh("start", "df-bus")
    for head, monitor, domain in ((0, "left", "df-p2p"), (1, "centre", "df-bus")):
        share = identical(lab, host, head, monitor, domain, f"{domain}-2", timeout=240)
        print(f"after virsh start: {share:.4f} of {domain}'s pixels identical on head {head}")
    assert libvirt_state(lab, "p2p")["libvirt"]["taken_over"] is None


def test_a_libvirtd_restart_changes_nothing_on_screen(lab, host):
    identical(lab, host, 0, "left", "df-p2p", "r0", timeout=240)
    identical(lab, host, 1, "centre", "df-bus", "r0b", timeout=240)
    before = {g: libvirt_state(lab, g) for g in ("p2p", "bus")}
    lab.libvirtd.stop()
    away = wait_for("status saying libvirtd is away",
                    lambda: (q := libvirt_state(lab, "p2p"))["libvirt"]["libvirtd"]["state"] != "connected"
                    and q, timeout=60)
    print(f"libvirtd stopped: {away['libvirt']['libvirtd']}")
    assert "not reachable" in (away["libvirt"]["libvirtd"]["error"] or "") or \
        "lost" in (away["libvirt"]["libvirtd"]["error"] or "")
    for monitor in ("left", "centre"):   # the pictures stay: QEMU's display does not go through libvirtd
        assert lit(lab, monitor)["path"] != "slate", lit(lab, monitor)
    took = lab.libvirtd.start()
    wait_for("libvirt connected again",
             lambda: libvirt_state(lab, "p2p")["libvirt"]["libvirtd"]["state"] == "connected", timeout=120)
    for head, monitor, guest, domain in ((0, "left", "p2p", "df-p2p"), (1, "centre", "bus", "df-bus")):
        back = libvirt_state(lab, guest)
        share = matches(lab, host, head, monitor, domain, f"{domain}-r1")
        print(f"{domain}: libvirtd back after {took:.1f} s; {back['libvirt']['libvirtd']}; display connects "
              f"{before[guest]['connects']} -> {back['connects']}; {share:.4f} identical")
        assert back["connects"] == before[guest]["connects"], "the display connection was dropped"
        assert share > 0.98


def test_a_killed_compositor_gets_the_domains_back_when_started_again(lab, host):
    identical(lab, host, 0, "left", "df-p2p", "k0", timeout=240)
    identical(lab, host, 1, "centre", "df-bus", "k0b", timeout=240)
    lab.proc.kill()
    lab.proc.wait(timeout=30)
    lab.launch(append=True)
    serving = wait_for("the new compositor answering", lambda: lab.answers() and time.monotonic(),
                       timeout=120)
    wanted = {"left": "p2p", "centre": "bus"}
    back: dict[str, float] = {}

    def all_back() -> bool:   # each monitor's first frame on screen, timed as it comes
        now = time.monotonic()
        for monitor, guest in wanted.items():
            out = lit(lab, monitor)
            if monitor not in back and out.get("guest") == guest and out.get("on_screen"):
                back[monitor] = now - serving
        return len(back) == len(wanted)
    wait_for("both domains on screen again", all_back, timeout=120)
    for head, monitor, domain in ((0, "left", "df-p2p"), (1, "centre", "df-bus")):
        share = identical(lab, host, head, monitor, domain, f"{domain}-k", timeout=120)
        print(f"{domain} back on {monitor} {back[monitor]:.2f} s after the new compositor answered "
              f"(goal 2 s); {share:.4f} identical")


def test_probe_check_and_bad_input(lab, tmp_path):
    probe = subprocess.run([sys.executable, "-m", "compositor.cli", "probe", "--libvirt", URI],
                           capture_output=True, text=True, timeout=120)
    print(probe.stdout[-900:])
    assert "df-p2p" in probe.stdout and "D-Bus display, peer to peer" in probe.stdout
    assert "df-vnc" in probe.stdout and "no D-Bus display" in probe.stdout
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY.replace("df-bus, resize", "df-vnc, resize"))
    check = subprocess.run([sys.executable, "-m", "compositor.cli", "check", str(policy)],
                           capture_output=True, text=True, timeout=120)
    print(check.stderr)
    assert check.returncode == 1
    assert "libvirt at qemu:///system has no domain `df-nosuch`" in check.stderr
    assert "domain df-vnc has no D-Bus display: add <graphics type='dbus' p2p='yes'/>" in check.stderr
    # A user libvirtd does not let in: the refusal is named (libvirt's own check, in a child as nobody)
    import libvirt

    from compositor.sources.libvirt_domain import describe_error

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:   # pragma: no cover - the child
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                libvirt.open(URI).close()
                text = "opened"
            except libvirt.libvirtError as exc:
                text = describe_error(exc, URI)
            os.write(write, text.encode())
        finally:
            os._exit(0)
    os.close(write)
    text = os.read(read, 65536).decode()
    os.close(read)
    os.waitpid(pid, 0)
    print("as nobody:", text)
    assert text.startswith("qemu:///system may not be opened by this user:"), text
