"""The lab's launcher inside the guest: ``python -m directflip_tools.lab.guest [options] -- CMD ...``.

Loads the drivers (vgem from the kernel, vkms and the mbochs and mdpy vGPU samples built by the lab,
each after the modules it depends on), waits for their DRM nodes and for the expected monitors, checks
the host channel, then runs CMD with the channel fds in ``$DIRECTFLIP_LAB_CHANNEL`` and exits with its
exit code.

CMD's stdin is /dev/null (the real stdin carries the host's replies) and its stderr goes to stdout, so
the host sees one ordered stream.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from directflip_tools.lab.channel import CHANNEL_ENV, MANIFEST_ENV, SHARED_ENV, ChannelError, HostChannel

KO_PARAMS = {
    "vkms": ["enable_overlay=1", "enable_cursor=1", "enable_writeback=1"],
    "mbochs": [],
    "mdpy": [],
}
WANTED_DRIVERS = ("virtio_gpu", "vkms", "vgem")
MDEV_PARENTS = ("mbochs", "mdpy")  # the VFIO mdev samples: each offers mdev types once loaded


def say(message: str) -> None:
    os.write(1, f"lab-guest: {message}\n".encode())


def drm_driver_name(node: str) -> str:
    """The DRM driver behind a /dev/dri node (DRM_IOCTL_VERSION, through the KMS layer).

    sysfs is not enough: vkms and vgem are bare platform devices with no ``device/driver`` link.
    """
    from compositor.kms import Card, DeviceError

    try:
        with Card(node, kms=False) as card:
            return card.driver
    except DeviceError as exc:
        raise OSError(str(exc)) from None


LAB_DRIVERS = ("virtio_gpu", "vkms", "vgem")  # the cards every boot of the lab has


def lab_cards() -> dict[str, str]:
    """drm_cards(), checked to hold every card of LAB_DRIVERS; RuntimeError naming what is missing
    (outside the lab, all of them)."""
    found = drm_cards()
    missing = [d for d in LAB_DRIVERS if d not in found]
    if missing:
        raise RuntimeError(f"DRM cards missing: {', '.join(missing)} (found {found}); this runs inside the "
                           "lab: python -m directflip_tools.lab test | run -- ...")
    return found


def drm_cards() -> dict[str, str]:
    """Driver name -> primary node (``/dev/dri/cardN``) for every card present."""
    cards: dict[str, str] = {}
    for sys_card in sorted(glob.glob("/sys/class/drm/card[0-9]*")):
        name = os.path.basename(sys_card)
        if "-" in name:
            continue
        node = f"/dev/dri/{name}"
        if not os.path.exists(node):
            continue
        try:
            cards.setdefault(drm_driver_name(node), node)
        except OSError:
            continue
    return cards


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout.strip()}")


def load_modules(kos: dict[str, str]) -> None:
    # uinput: the tests' hotplugged input devices and directflip's own devices for launched vGPU guests
    _run(["modprobe", "-a", "virtio_gpu", "vgem", "uinput"])
    for name, params in KO_PARAMS.items():
        path = kos[name]
        if Path(f"/sys/module/{name}").exists():
            continue
        deps = subprocess.run(["modinfo", "-F", "depends", path], capture_output=True, text=True,
                              check=True).stdout.strip()
        if deps:
            _run(["modprobe", "-a", *deps.split(",")])
        _run(["insmod", path, *params])
    for parent in MDEV_PARENTS:
        types = Path(f"/sys/class/mdev_bus/{parent}/mdev_supported_types")
        if not types.is_dir():
            raise RuntimeError(f"{parent} is loaded but {types} does not exist")


def wait_for(what: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def connector_status(card: str, connector: str) -> str:
    try:
        return Path(f"/sys/class/drm/{card}-{connector}/status").read_text().strip()
    except OSError:
        return "missing"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m directflip_tools.lab.guest")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--shared", required=True)
    parser.add_argument("--heads", type=int, default=1, help="virtio-gpu connectors expected connected")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command")

    # Keep the channel away from the command: it gets copies, marked inheritable.
    rfd, wfd = os.dup(0), os.dup(1)
    os.set_inheritable(rfd, True)
    os.set_inheritable(wfd, True)
    t0 = time.monotonic()
    try:
        manifest = json.loads(Path(args.manifest).read_text())
        load_modules(manifest["kos"])
        wait_for("DRM cards " + ", ".join(WANTED_DRIVERS),
                 lambda: all(d in drm_cards() for d in WANTED_DRIVERS), 30)
        cards = drm_cards()
        for driver, node in sorted(cards.items(), key=lambda kv: kv[1]):
            say(f"{node} = {driver}")
        virtio = os.path.basename(cards["virtio_gpu"])
        heads = [f"Virtual-{i + 1}" for i in range(args.heads)]
        try:
            wait_for(f"{', '.join(heads)} connected",
                     lambda: all(connector_status(virtio, c) == "connected" for c in heads), 30)
        finally:
            say("monitors: " + ", ".join(f"{c} {connector_status(virtio, c)}"
                                         for c in ("Virtual-1", "Virtual-2", "Virtual-3")))
        channel = HostChannel(rfd, wfd)
        t1 = time.monotonic()
        channel.ping()
        t2 = time.monotonic()
        say(f"host channel ok ({(t2 - t1) * 1000:.0f} ms), ready in {t2 - t0:.1f} s")
    except (RuntimeError, OSError, ChannelError, KeyError, ValueError, subprocess.CalledProcessError) as exc:
        say(f"setup failed: {exc}")
        return 98

    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    # `python` in CMD means the interpreter the lab runs on, as on the host.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "/usr/bin:/bin")])
    env[CHANNEL_ENV] = f"{rfd},{wfd}"
    env[SHARED_ENV] = args.shared
    env[MANIFEST_ENV] = args.manifest
    sys.stdout.flush()
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=1, stderr=1, env=env,
                              pass_fds=(rfd, wfd))
    except OSError as exc:
        say(f"cannot run {cmd[0]}: {exc}")
        return 127
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
