"""The deployment files in udev/: systemd units checked by `systemd-analyze verify`, udev rules by a
structural parser and by udev's own parser (`udevadm test`, as root, in a private mount namespace).
Each check is also shown a broken copy, so a check that cannot fail would be noticed."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from compositor.cli import build_parser
from compositor.sources.framesocket import socket_paths

UDEV = Path(__file__).resolve().parents[2] / "udev"
UNITS = ("directflip.service", "directflip@.service")
RULES = ("71-directflip-mdev.rules", "72-directflip-seats.rules")
INSTANCE = "directflip@seat1.service"  # how the template is verified: as one instance
SYSTEM_UNIT_DIRS = ("/usr/lib/systemd/system", "/lib/systemd/system")
EXEC_KEYS = ("ExecStart", "ExecStartPre", "ExecStartPost", "ExecReload", "ExecStop", "ExecStopPost")


def shipped(name: str) -> str:
    return (UDEV / name).read_text()


# ------------------------------------------------------------------------------------------ unit files


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for each assignment of a unit file, continuation lines joined."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def values(text: str, key: str) -> list[str]:
    return [v for _s, k, v in unit_entries(text) if k == key]


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is not installed, so the units in udev/ cannot be verified: "
                    "install the Debian package `systemd` (apt-get install systemd)")
    return path


def unit_root(tmp_path: Path, units: dict[str, str]) -> Path:
    """A root directory for `systemd-analyze verify --root`: this machine's system units (for the
    targets and services ours name), ours in /etc/systemd/system, and the executables our Exec lines
    name. `directflip` itself is a stub in /usr/local/bin, where a root `pip install` puts it, so the
    shipped ExecStart is checked unmodified; any other command must exist on this machine to be
    copied in, so a misspelt path still fails."""
    root = tmp_path / "root"
    copied: set[str] = set()
    for system_dir in SYSTEM_UNIT_DIRS:  # /lib is /usr/lib on merged-/usr systems: copy it once
        if Path(system_dir).is_dir() and os.path.realpath(system_dir) not in copied:
            copied.add(os.path.realpath(system_dir))
            shutil.copytree(system_dir, root / system_dir.lstrip("/"), symlinks=True)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for name, text in units.items():
        (unit_dir / name).write_text(text)
        for key in EXEC_KEYS:
            for value in values(text, key):
                command = shlex.split(value)[0].lstrip("-@:+!")
                if command == "directflip":
                    found: str | None = "/usr/local/bin/directflip"
                elif command.startswith("/"):
                    found = command if os.access(command, os.X_OK) else None
                else:
                    found = shutil.which(command, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin")
                if found is None:
                    continue
                stub = root / found.lstrip("/")
                stub.parent.mkdir(parents=True, exist_ok=True)
                stub.write_text("#!/bin/sh\nexit 0\n")
                stub.chmod(0o755)
    return root


def verify(tmp_path: Path, units: dict[str, str], names: list[str]) -> list[str]:
    """What `systemd-analyze verify` holds against our units: every line of its output that names one
    of them, and its exit status if not 0. Lines about other units of this machine are not ours."""
    root = unit_root(tmp_path, units)
    run = subprocess.run([systemd_analyze(), "verify", f"--root={root}", "--man=no",
                          "--recursive-errors=no", *names],
                         capture_output=True, text=True, timeout=120)
    ours = set(units) | set(names)
    problems = [line for line in (run.stdout + run.stderr).splitlines()
                if any(name in line for name in ours)]
    if run.returncode != 0:
        problems.append(f"systemd-analyze verify exited {run.returncode}")
    return problems


def shipped_units() -> dict[str, str]:
    return {name: shipped(name) for name in UNITS}


def test_the_units_verify(tmp_path: Path) -> None:
    assert verify(tmp_path, shipped_units(), ["directflip.service", INSTANCE]) == []


# Each break is one a real edit could make; the check must see every one.
BREAKS = [
    ("directflip.service", "Type=notify", "Type=notfy"),                       # bad value
    ("directflip.service", "WatchdogSec=10s", "WatchdogSecs=10s"),             # unknown key
    ("directflip.service", "ExecStart=directflip ", "ExecStart=directflip-x "),  # no such command
    ("directflip.service", "ExecReload=/bin/kill", "ExecReload=/bin/kil"),     # no such file
    ("directflip.service", "RuntimeDirectory=directflip", "RuntimeDirectory=/run/directflip"),
    ("directflip@.service", "/etc/directflip/%i.yaml", "/etc/directflip/%Q.yaml"),  # bad specifier
    ("directflip@.service", "Restart=on-failure", "Restart=on-watchdogs"),
]


@pytest.mark.parametrize(("unit", "old", "new"), BREAKS, ids=[b[2] for b in BREAKS])
def test_verify_rejects_a_broken_unit(tmp_path: Path, unit: str, old: str, new: str) -> None:
    units = shipped_units()
    assert old in units[unit]
    units[unit] = units[unit].replace(old, new, 1)
    assert verify(tmp_path, units, ["directflip.service", INSTANCE]) != []


@pytest.mark.parametrize(("unit", "seat"), [("directflip.service", None), ("directflip@.service", "seat1")])
def test_exec_start_is_a_valid_directflip_command(unit: str, seat: str | None) -> None:
    """What verify cannot know: the options exist and mean what the unit wants."""
    [exec_start] = values(shipped(unit), "ExecStart")
    argv = shlex.split(exec_start.replace("%i", seat or "%i"))
    assert argv[0] == "directflip"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run"
    assert args.seat == seat
    if seat is None:
        assert (args.session, args.vt, args.policy) == ("direct", "7", "/etc/directflip/policy.yaml")
    else:
        assert (args.session, args.policy) == ("logind", f"/etc/directflip/{seat}.yaml")


@pytest.mark.parametrize(("unit", "seat"), [("directflip.service", None), ("directflip@.service", "seat1")])
def test_units_give_the_daemon_what_it_expects(unit: str, seat: str | None) -> None:
    text = shipped(unit)
    assert values(text, "Type") == ["notify"]
    assert values(text, "NotifyAccess") == ["main"]  # the compositor itself sends READY/WATCHDOG
    assert values(text, "WatchdogSec") and values(text, "Restart") == ["on-failure"]
    # The runtime directory systemd creates is the one the daemon puts its sockets in by default.
    [runtime] = values(text, "RuntimeDirectory")
    for path in socket_paths(seat):
        assert os.path.dirname(path) == "/run/" + runtime.replace("%i", seat or "%i")
    # /dev is an allow-list that keeps what the compositor opens: the cards, the VT, evdev and
    # uinput, VFIO. PrivateDevices would hide them.
    keys = {k for _s, k, _v in unit_entries(text)}
    assert "PrivateDevices" not in keys
    assert values(text, "DevicePolicy") == ["closed"]
    allowed = {v.split()[0] for v in values(text, "DeviceAllow") if v.split()[1:] == ["rw"]}
    assert {"char-drm", "char-tty", "char-input", "char-vfio", "/dev/vfio/vfio", "/dev/uinput"} <= allowed
    # The descriptor budget of the frame socket's default limits fits the hard limit.
    from compositor.daemon import OWN_DESCRIPTORS
    from compositor.sources.framesocket import DEFAULT_LIMITS
    assert int(values(text, "LimitNOFILE")[0]) >= DEFAULT_LIMITS.descriptors() + OWN_DESCRIPTORS


@pytest.mark.parametrize("unit", ["directflip.service", "directflip@.service"])
def test_the_units_exposure_is_below_5(unit: str, tmp_path: Path) -> None:
    path = tmp_path / unit
    path.write_text(shipped(unit))
    out = subprocess.run([systemd_analyze(), "security", "--offline=true", str(path)], capture_output=True,
                         text=True, timeout=120)
    lines = [line for line in out.stdout.splitlines() if "Overall exposure level" in line]
    assert lines, out.stdout + out.stderr
    exposure = float(lines[0].split(":")[1].split()[0])
    print(f"{unit}: exposure {exposure}")
    assert exposure < 5.0, out.stdout


# ------------------------------------------------------------------------------------------ udev rules

# udev(7) of systemd 252: which keys exist, which take {attribute}, and which operators they allow.
MATCH, ASSIGN = {"==", "!="}, {"=", "+=", "-=", ":="}
UDEV_KEYS: dict[str, tuple[str, set[str]]] = {
    # key: (attribute: "required" | "optional" | "none", operators)
    "ACTION": ("none", MATCH), "DEVPATH": ("none", MATCH), "KERNEL": ("none", MATCH),
    "KERNELS": ("none", MATCH), "SUBSYSTEM": ("none", MATCH), "SUBSYSTEMS": ("none", MATCH),
    "DRIVER": ("none", MATCH), "DRIVERS": ("none", MATCH), "ATTRS": ("required", MATCH),
    "CONST": ("required", MATCH), "TAGS": ("none", MATCH), "TEST": ("optional", MATCH),
    "RESULT": ("none", MATCH), "PROGRAM": ("none", MATCH | ASSIGN),
    "NAME": ("none", MATCH | ASSIGN), "SYMLINK": ("none", MATCH | ASSIGN),
    "ATTR": ("required", MATCH | ASSIGN), "SYSCTL": ("required", MATCH | ASSIGN),
    "ENV": ("required", MATCH | ASSIGN), "TAG": ("none", MATCH | ASSIGN),
    "OWNER": ("none", ASSIGN), "GROUP": ("none", ASSIGN), "MODE": ("none", ASSIGN),
    "SECLABEL": ("required", ASSIGN), "RUN": ("optional", ASSIGN), "LABEL": ("none", {"="}),
    "GOTO": ("none", {"="}), "IMPORT": ("required", MATCH | ASSIGN), "OPTIONS": ("none", ASSIGN),
}
_PAIR = re.compile(r'\s*(?P<key>[A-Z_]+)(?:\{(?P<attr>[^}]*)\})?\s*(?P<op>==|!=|\+=|-=|:=|=)\s*'
                   r'e?"(?P<value>(?:[^"\\]|\\.)*)"\s*(?P<sep>,?)')
# A commented-out example rule ("#TAG==..."), checked like the others so it stays correct.
_EXAMPLE = re.compile(r"#\s?(?=[A-Z_]+(\{[^}]*\})?\s*(==|!=|\+=|-=|:=|=)\s*e?\")")


def rule_lines(text: str) -> list[tuple[int, str]]:
    """(line number, rule) with continuation lines joined; commented-out example rules included."""
    rules: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending:
            example = _EXAMPLE.match(line)
            if example:
                line = line[example.end():]
            elif not line or line.startswith("#"):
                continue
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        rules.append((start, pending + line))
        pending = ""
    if pending:
        rules.append((start, pending))
    return rules


def rule_problems(name: str, text: str) -> list[str]:
    problems: list[str] = []
    labels: set[str] = set()
    gotos: list[tuple[int, str]] = []
    for number, rule in rule_lines(text):
        where = f"{name}:{number}"
        pos = 0
        while pos < len(rule):
            m = _PAIR.match(rule, pos)
            if m is None:
                problems.append(f"{where}: not KEY op \"value\" at {rule[pos:]!r}")
                break
            key, attr, op = m["key"], m["attr"], m["op"]
            if key not in UDEV_KEYS:
                problems.append(f"{where}: unknown key {key}")
            else:
                takes, ops = UDEV_KEYS[key]
                if takes == "required" and not attr:
                    problems.append(f"{where}: {key} needs {{attribute}}")
                if takes == "none" and attr is not None:
                    problems.append(f"{where}: {key} takes no {{attribute}}")
                if op not in ops:
                    problems.append(f"{where}: {key} does not take {op}")
            if key == "LABEL":
                labels.add(m["value"])
            if key == "GOTO":
                gotos.append((number, m["value"]))
            pos = m.end()
            if not m["sep"] and pos < len(rule):
                problems.append(f"{where}: missing comma before {rule[pos:]!r}")
                break
    problems += [f"{name}:{n}: GOTO {label!r} has no LABEL" for n, label in gotos if label not in labels]
    return problems


@pytest.mark.parametrize("name", RULES)
def test_rules_are_key_op_value_pairs_with_known_keys(name: str) -> None:
    text = shipped(name)
    assert len(rule_lines(text)) >= 3
    assert rule_problems(name, text) == []


BROKEN_RULES = [
    'KERNAL=="card[0-9]*", ENV{ID_SEAT}="seat1"',           # unknown key
    'SUBSYSTEM="drm", ENV{ID_SEAT}="seat1"',                # assignment to a match-only key
    'SUBSYSTEM=="drm" ENV{ID_SEAT}="seat1"',                # missing comma
    'SUBSYSTEM=="drm", ENV="seat1"',                        # ENV without {key}
    'SUBSYSTEM==drm, ENV{ID_SEAT}="seat1"',                 # unquoted value
    'ACTION=="remove", GOTO="nowhere"',                     # GOTO without LABEL
    '#SUBSYSTEM=="drm", DRIVER="udl", ENV{ID_SEAT}="seat2"',  # a broken commented-out example
]


@pytest.mark.parametrize("rule", BROKEN_RULES)
def test_the_rule_check_rejects_broken_rules(rule: str) -> None:
    assert rule_problems("broken.rules", rule + "\n") != []


def udevadm_test(rules_dir: Path) -> list[str]:
    """Load every rules file with udev's own parser: `udevadm test` on /dev/null, in a private mount
    namespace whose /etc/udev/rules.d is `rules_dir` and whose /dev and /run are empty tmpfs (with the
    /run/udev it needs made there: a machine where udevd never ran has none), so nothing of the
    machine is touched. Returns the lines that name our files, minus the expected
    "Unknown group 'directflip'" where the group has not been created (README: groupadd)."""
    udevadm, unshare = shutil.which("udevadm"), shutil.which("unshare")
    if udevadm is None or unshare is None or os.geteuid() != 0 or not Path("/sys/class/mem/null").exists():
        pytest.fail("needs root, udevadm (Debian: udev), unshare and /sys/class/mem/null; `make unit` "
                    "installs udev")
    script = (f"mount -t tmpfs tmpfs /run && mkdir /run/udev && mount -t tmpfs tmpfs /dev && "
              f"mount --bind {shlex.quote(str(rules_dir))} /etc/udev/rules.d && "
              f"exec {udevadm} test /sys/class/mem/null")
    run = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    if "Reading rules file: /etc/udev/rules.d/" not in output:
        pytest.fail(f"cannot run udevadm test in a private mount namespace here: {output[-500:]}")
    names = [p.name for p in rules_dir.iterdir()]
    return [line for line in output.splitlines()
            if any(f"/etc/udev/rules.d/{n}:" in line for n in names)
            and "Unknown group 'directflip'" not in line]


def test_rules_pass_udevs_own_parser(tmp_path: Path) -> None:
    for name in RULES:
        shutil.copy(UDEV / name, tmp_path / name)
    assert udevadm_test(tmp_path) == []


def test_udevs_own_parser_rejects_a_broken_rule(tmp_path: Path) -> None:
    text = shipped("72-directflip-seats.rules").replace('SUBSYSTEM=="drm"', 'SUBSYSTEM="drm"', 1)
    (tmp_path / "72-directflip-seats.rules").write_text(text)
    assert udevadm_test(tmp_path) != []
