"""Set up everything the lab VM needs, once, in one cache directory.

`ensure()` is idempotent and cheap when nothing changed: every step leaves a stamp holding the key it
was built from (Debian kernel version, patch contents, ...) and is skipped while the key matches.
Everything is keyed by the kernel ABI name (``6.1.0-56-amd64``), so when Debian ships a new kernel the
next run builds a fresh tree beside the old one and then drops the old one.

Layout of the cache (default ``${XDG_CACHE_HOME:-~/.cache}/directflip-lab``, or ``$DIRECTFLIP_LAB_CACHE``)::

    lab.json                        manifest read by the VM runner
    kernel/<kver>/boot/vmlinuz-<kver>
    kernel/<kver>/lib/modules/<kver>/   the lab kernel's modules, with modules.dep
    source/<kver>/                  the few files taken from linux-source (pristine)
    modules/<kver>/src/             patched copy, built out of tree
    modules/<kver>/{vkms,mbochs,mdpy}.ko

Python packages (virtme-ng, qemu.qmp) are installed by the Makefile; apt packages are installed here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

CACHE_ENV = "DIRECTFLIP_LAB_CACHE"
MANIFEST_NAME = "lab.json"
PATCH_DIR = Path(__file__).with_name("patches")

# Host tools the lab uses. udev makes the guest run systemd-udevd (virtme-ng starts it when present),
# so module autoloading and udev-sourced monitors behave as on a real machine.
APT_PACKAGES = (
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "udev",
    "libdrm-tests",
    "drm-info",
    "make",
    "gcc",
    "patch",
    "xz-utils",
    "systemd",            # systemd-logind and busctl for the logind session tests
    "dbus",               # dbus-daemon and the system bus configuration
)

# Files taken from linux-source: (tar pattern, module that needs it).
SOURCE_PATTERNS = (
    "drivers/gpu/drm/vkms/*",
    "samples/vfio-mdev/mbochs.c",
    "samples/vfio-mdev/mdpy.c",
    "samples/vfio-mdev/mdpy-defs.h",
)


@dataclass(frozen=True)
class ExternalModule:
    """One module built out of tree: where its sources live and the Kbuild that builds it."""

    name: str
    subdir: str
    kbuild: str
    patches: tuple[str, ...] = ()


EXTERNAL_MODULES = (
    # vkms' own Makefile lists its objects under obj-$(CONFIG_DRM_VKMS), which Debian leaves unset.
    ExternalModule("vkms", "drivers/gpu/drm/vkms", "include $(src)/Makefile\nobj-m += vkms.o\n",
                   ("vkms-writeback-clones.patch",)),
    ExternalModule("mbochs", "samples/vfio-mdev", "obj-m += mbochs.o mdpy.o\n", ("mbochs-dmabuf.patch",)),
)
# mdpy is built in the same directory as mbochs.
BUILT_KOS = {"vkms": "drivers/gpu/drm/vkms/vkms.ko", "mbochs": "samples/vfio-mdev/mbochs.ko",
             "mdpy": "samples/vfio-mdev/mdpy.ko"}


class LabError(RuntimeError):
    """A setup or run step failed; the message names the cause."""


@dataclass
class Manifest:
    kver: str  # kernel ABI name, e.g. 6.1.0-56-amd64
    kernel_version: str  # Debian package version, e.g. 6.1.192-2
    source_version: str
    headers_version: str
    kernel_dir: str
    vmlinuz: str
    modules_dir: str  # the lab kernel's /lib/modules/<kver> on the host
    kos: dict[str, str] = field(default_factory=dict)  # name -> built .ko path
    patches: list[str] = field(default_factory=list)
    cache: str = ""

    @classmethod
    def load(cls, cache: Path | None = None) -> Manifest:
        path = cache_dir(cache) / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab manifest at {path}: run `python -m directflip_tools.lab setup` "
                           "first") from None
        except ValueError as exc:
            raise LabError(f"broken lab manifest {path}: {exc}") from None
        return cls(**data)


Log = Callable[[str], None]


def _default_log(line: str) -> None:
    print(f"lab: {line}", flush=True)


def cache_dir(override: Path | str | None = None) -> Path:
    if override:
        return Path(override).expanduser().resolve()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return (Path(base) / "directflip-lab").resolve()


# ---------------------------------------------------------------------------------------------- helpers


def _run(cmd: Sequence[str], *, what: str, cwd: Path | None = None, env: dict[str, str] | None = None,
         stdin=None, stdout=subprocess.PIPE) -> str:
    """Run a command; on failure raise LabError with its last output lines."""
    full_env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
    if env:
        full_env.update(env)
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, env=full_env, stdin=stdin, stdout=stdout,
                              stderr=subprocess.STDOUT if stdout == subprocess.PIPE else subprocess.PIPE,
                              text=True)
    except FileNotFoundError:
        raise LabError(f"{what}: command not found: {cmd[0]}") from None
    if proc.returncode != 0:
        out = (proc.stdout or "") if stdout == subprocess.PIPE else (proc.stderr or "")
        tail = "\n".join(out.strip().splitlines()[-15:])
        raise LabError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc.stdout or ""


class _Step:
    """Times one setup step and logs it as one line."""

    def __init__(self, log: Log, what: str) -> None:
        self.log, self.what, self.note = log, what, "ok"

    def __enter__(self) -> _Step:
        self.t0 = time.monotonic()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        dt = time.monotonic() - self.t0
        if exc is None:
            self.log(f"{self.what}: {self.note} ({dt:.1f} s)")
        else:
            self.log(f"{self.what}: FAILED after {dt:.1f} s")


def _stamp_ok(directory: Path, key: dict) -> bool:
    try:
        return json.loads((directory / ".stamp").read_text()) == key
    except (OSError, ValueError):
        return False


def _write_stamp(directory: Path, key: dict) -> None:
    (directory / ".stamp").write_text(json.dumps(key, sort_keys=True) + "\n")


@contextlib.contextmanager
def _fresh_dir(final: Path) -> Iterator[Path]:
    """Build into a temporary sibling and swap it in only when the build succeeded."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# ---------------------------------------------------------------------------------------------- apt


def installed_version(package: str) -> str | None:
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Version}", package],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.startswith("ii"):
        return None
    return proc.stdout.split()[-1]


def _apt_lists_empty() -> bool:
    lists = Path("/var/lib/apt/lists")
    return not any("_Packages" in p.name for p in lists.glob("*")) if lists.is_dir() else True


_apt_updated = False


def _apt_update(log: Log) -> None:
    global _apt_updated
    if _apt_updated:
        return
    with _Step(log, "apt-get update"):
        _run(["apt-get", "update", "-q"], what="apt-get update")
    _apt_updated = True


def _apt_install(specs: Sequence[str], log: Log) -> None:
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *specs]
    if _apt_lists_empty():
        _apt_update(log)
    try:
        _run(cmd, what="apt-get install")
    except LabError:
        if _apt_updated:
            raise
        _apt_update(log)
        _run(cmd, what="apt-get install")


def _require_root(why: str) -> None:
    if os.geteuid() != 0:
        raise LabError(f"{why} needs root (apt-get/dpkg); run the lab setup as root")


def ensure_apt_packages(log: Log) -> None:
    with _Step(log, "apt packages") as step:
        missing = [p for p in APT_PACKAGES if installed_version(p) is None]
        if not missing:
            step.note = f"{len(APT_PACKAGES)} present"
            return
        _require_root(f"installing {' '.join(missing)}")
        _apt_install(missing, log)
        step.note = f"installed {' '.join(missing)}"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def ensure_python_packages() -> None:
    """The host side needs virtme-ng and qemu.qmp (the guest tests also use pytest, numpy, pyudev)."""
    missing = [name for name, module in (("virtme-ng", "virtme_ng"), ("qemu.qmp", "qemu.qmp"))
               if not _importable(module)]
    if missing:
        raise LabError(f"Python packages missing for the lab: {', '.join(missing)}; install them with "
                       f"`{sys.executable} -m pip install -e '.[test]'` (the Makefile does this)")
    if shutil.which("vng") is None:
        raise LabError("virtme-ng is importable but its `vng` command is not on PATH")


def resolve_kernel(log: Log) -> tuple[str, str]:
    """(ABI name, Debian version) of the kernel linux-image-amd64 currently points at."""

    def query() -> tuple[str, str] | None:
        proc = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                              text=True, env=dict(os.environ, LC_ALL="C"))
        kver = None
        for line in proc.stdout.splitlines():
            m = re.match(r"\s*Depends:\s*linux-image-(\d\S*)$", line)
            if m and not m.group(1).endswith("-unsigned"):
                kver = m.group(1)
                break
        if kver is None:
            return None
        policy = subprocess.run(["apt-cache", "policy", f"linux-image-{kver}"], capture_output=True,
                                text=True, env=dict(os.environ, LC_ALL="C")).stdout
        m = re.search(r"Candidate:\s*(\S+)", policy)
        if not m or m.group(1) == "(none)":
            return None
        return kver, m.group(1)

    with _Step(log, "resolve kernel") as step:
        found = query()
        if found is None:
            _require_root("refreshing the apt lists")
            _apt_update(log)
            found = query()
        if found is None:
            raise LabError("cannot resolve the kernel: `apt-cache depends linux-image-amd64` names no "
                           "linux-image-<abi> package with a candidate version (is this Debian?)")
        step.note = f"linux-image-{found[0]} {found[1]}"
    return found


def _download(package: str, version: str, into: Path, log: Log) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    spec = f"{package}={version}"
    # _apt cannot write into root's cache: download as root without the sandbox warning.
    cmd = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", spec]
    try:
        _run(cmd, what=f"apt-get download {spec}", cwd=into)
    except LabError:
        if _apt_updated:
            raise
        _apt_update(log)
        try:
            _run(cmd, what=f"apt-get download {spec}", cwd=into)
        except LabError as exc:
            raise LabError(f"{package} version {version} is not downloadable from the configured apt "
                           f"sources (it must match the lab kernel's version)\n{exc}") from None
    debs = sorted(into.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
    if not debs:
        raise LabError(f"apt-get download {spec} left no {package}_*.deb in {into}")
    deb = debs[-1]
    got = _run(["dpkg-deb", "-f", str(deb), "Version"], what="dpkg-deb -f").strip()
    if got != version:
        raise LabError(f"{deb.name} is version {got}, expected {version}")
    return deb


# ---------------------------------------------------------------------------------------------- steps


def ensure_kernel(cache: Path, kver: str, version: str, log: Log) -> Path:
    kdir = cache / "kernel" / kver
    key = {"package": f"linux-image-{kver}", "version": version}
    with _Step(log, f"kernel {kver}") as step:
        if _stamp_ok(kdir, key) and (kdir / "boot" / f"vmlinuz-{kver}").is_file():
            step.note = "cached"
            return kdir
        with _fresh_dir(kdir) as tmp:
            deb = _download(f"linux-image-{kver}", version, cache / "debs", log)
            _run(["dpkg-deb", "-x", str(deb), str(tmp)], what=f"dpkg -x {deb.name}")
            # The package ships no modules.dep; vng hands the guest this tree and modprobe needs it.
            _run(["depmod", "-b", str(tmp), kver], what="depmod")
            if not (tmp / "boot" / f"vmlinuz-{kver}").is_file():
                raise LabError(f"{deb.name} has no boot/vmlinuz-{kver}")
            _write_stamp(tmp, key)
            deb.unlink()
        step.note = f"extracted {version}"
    return kdir


def ensure_headers(kver: str, version: str, log: Log) -> str:
    package = f"linux-headers-{kver}"
    with _Step(log, package) as step:
        have = installed_version(package)
        if have != version:
            _require_root(f"installing {package}")
            _apt_install([f"{package}={version}"], log)
            have = installed_version(package)
            step.note = f"installed {have}"
        else:
            step.note = f"{have} present"
        if have != version:
            raise LabError(f"{package} is {have}, the lab kernel is {version}")
        build = Path("/lib/modules") / kver / "build"
        if not (build / "Makefile").is_file():
            raise LabError(f"{package} {have} is installed but {build}/Makefile is missing")
    return version


def ensure_source(cache: Path, kver: str, version: str, log: Log) -> Path:
    series = ".".join(kver.split(".")[:2])  # 6.1.0-56-amd64 -> 6.1
    package = f"linux-source-{series}"
    sdir = cache / "source" / kver
    key = {"package": package, "version": version, "files": list(SOURCE_PATTERNS)}
    with _Step(log, f"{package} files") as step:
        if _stamp_ok(sdir, key):
            step.note = "cached"
            return sdir
        with _fresh_dir(sdir) as tmp:
            deb = _download(package, version, cache / "debs", log)
            top = f"linux-source-{series}"
            members = [f"{top}/{p}" for p in SOURCE_PATTERNS]
            # The .deb holds one big tarball; stream it and keep only the few files the modules need.
            deb_cmd = ["dpkg-deb", "--fsys-tarfile", str(deb)]
            inner_cmd = ["tar", "-xO", f"./usr/src/{top}.tar.xz"]
            with subprocess.Popen(deb_cmd, stdout=subprocess.PIPE) as deb_tar, \
                    subprocess.Popen(inner_cmd, stdin=deb_tar.stdout, stdout=subprocess.PIPE) as inner:
                assert deb_tar.stdout is not None
                deb_tar.stdout.close()
                _run(["tar", "-xJ", "--strip-components=1", "--wildcards", *members], stdin=inner.stdout,
                     what=f"extract {package}", cwd=tmp)
            if deb_tar.returncode or inner.returncode:
                raise LabError(f"reading {deb.name} failed "
                               f"(dpkg-deb {deb_tar.returncode}, tar {inner.returncode})")
            _write_stamp(tmp, key)
            deb.unlink()
        step.note = f"extracted {version}"
    return sdir


def _patch_key() -> dict[str, str]:
    patches = sorted(PATCH_DIR.glob("*.patch"))
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in patches}


def ensure_modules(cache: Path, kver: str, version: str, source: Path, log: Log) -> dict[str, str]:
    mdir = cache / "modules" / kver
    key = {"version": version, "patches": _patch_key(),
           "kbuild": {m.name: m.kbuild for m in EXTERNAL_MODULES}}
    kos = {name: str(mdir / f"{name}.ko") for name in BUILT_KOS}
    with _Step(log, "build vkms, mbochs, mdpy") as step:
        if _stamp_ok(mdir, key) and all(Path(p).is_file() for p in kos.values()):
            step.note = "cached"
            return kos
        build = Path("/lib/modules") / kver / "build"
        with _fresh_dir(mdir) as tmp:
            src = tmp / "src"
            shutil.copytree(source, src, ignore=shutil.ignore_patterns(".stamp"))
            for module in EXTERNAL_MODULES:
                for name in module.patches:
                    with open(PATCH_DIR / name) as patch:
                        _run(["patch", "-p1", "--forward", "--batch", "-d", str(src)], stdin=patch,
                             what=f"patch {name}")
                (src / module.subdir / "Kbuild").write_text(module.kbuild)
                jobs = str(os.cpu_count() or 1)
                _run(["make", "-s", f"-j{jobs}", "-C", str(build), f"M={src / module.subdir}", "modules"],
                     what=f"build {module.name}")
            for name, rel in BUILT_KOS.items():
                shutil.copy2(src / rel, tmp / f"{name}.ko")
                ko = tmp / f"{name}.ko"
                vermagic = _run(["modinfo", "-F", "vermagic", str(ko)], what="modinfo").split()
                if not vermagic or vermagic[0] != kver:
                    raise LabError(f"{name}.ko was built for {vermagic[:1]}, not {kver}")
            _write_stamp(tmp, key)
        step.note = f"built {', '.join(BUILT_KOS)}"
    return kos


def _prune(cache: Path, kver: str, log: Log) -> None:
    for sub in ("kernel", "source", "modules"):
        for old in (cache / sub).glob("*"):
            if old.is_dir() and old.name != kver and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
                log(f"removed old {sub}/{old.name}")
    for deb in (cache / "debs").glob("*.deb"):
        deb.unlink()


def ensure(cache: Path | str | None = None, log: Log = _default_log) -> Manifest:
    """Make the lab ready to boot; returns the manifest it wrote."""
    root = cache_dir(cache)
    t0 = time.monotonic()
    ensure_python_packages()
    with _locked(root):
        ensure_apt_packages(log)
        kver, version = resolve_kernel(log)
        kdir = ensure_kernel(root, kver, version, log)
        headers_version = ensure_headers(kver, version, log)
        source = ensure_source(root, kver, version, log)
        kos = ensure_modules(root, kver, version, source, log)
        manifest = Manifest(
            kver=kver, kernel_version=version, source_version=version, headers_version=headers_version,
            kernel_dir=str(kdir), vmlinuz=str(kdir / "boot" / f"vmlinuz-{kver}"),
            modules_dir=str(kdir / "lib" / "modules" / kver), kos=kos,
            patches=sorted(p.name for p in PATCH_DIR.glob("*.patch")), cache=str(root))
        path = root / MANIFEST_NAME
        text = json.dumps(asdict(manifest), indent=2, sort_keys=True) + "\n"
        if not path.is_file() or path.read_text() != text:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.rename(path)
        _prune(root, kver, log)
    log(f"ready: kernel {kver} ({version}), cache {root} ({time.monotonic() - t0:.1f} s)")
    return manifest
