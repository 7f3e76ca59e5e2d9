"""`directflip check`: exit statuses, the plan table, --render, and the live-probe path."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from compositor import check, cli, policy

ROOT = Path(__file__).resolve().parents[2]
LAB = str(ROOT / "tests" / "data" / "lab-topology.json")
POLICIES = ROOT / "policies"
LAB_POLICIES = ROOT / "tests" / "data" / "policies"
LAB_DEMO = str(LAB_POLICIES / "lab-demo.yaml")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", ["lab-demo", "lab-kiosk", "lab-multiseat"])
def test_lab_policies_check_clean(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The lab's own policies bind every monitor they name on the lab's topology: no warning."""
    code, out, err = run([str(LAB_POLICIES / f"{name}.yaml"), "--topology", LAB], capsys)
    assert (code, err) == (0, "")
    assert f"{name}.yaml: valid" in out


def test_demo_plan_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run([str(LAB_POLICIES / "lab-demo.yaml"), "--topology", LAB,
                        "--guest", "office,size=1920x1080,format=XR24",
                        "--guest", "media,kind=qemu-dbus,size=1280x1024",
                        "--guest", "build-3,kind=socket"], capsys)
    assert code == 0
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("MONITOR"))
    rows = [line.split() for line in lines[header + 1:header + 4]]
    assert [(r[0], r[2], r[6]) for r in rows] == [
        ("left", "Virtual-1", "office"), ("centre", "Virtual-2", "media"), ("right", "Virtual-3", "build-3")]
    # match-guest switched centre to the guest's 1280x1024; left crops the larger office buffer
    assert rows[1][5].startswith("1280x1024")
    assert "left: buffer 1920x1080 cropped to 1024x768" in out
    assert "Virtual-4: not in the policy" in out  # vkms' output: the demo names virtio_gpu ones


def test_unplug_shows_failover(capsys: pytest.CaptureFixture[str]) -> None:
    cards = json.loads(Path(LAB).read_text())["cards"]
    virtio = next(c["path"] for c in cards if c["driver"] == "virtio_gpu")
    code, out, _ = run([str(LAB_POLICIES / "lab-demo.yaml"), "--topology", LAB,
                        "--unplug", f"{virtio}:Virtual-1"], capsys)
    assert code == 0
    centre = next(line for line in out.splitlines() if line.startswith("centre "))
    assert "office" in centre.split()  # office outranks media, which fails over to the right screen
    right = next(line for line in out.splitlines() if line.startswith("right "))
    assert "media" in right.split()
    assert "build-*: right shows media" in out   # the rule's pattern, not an invented name


def test_render_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("PIL")
    from PIL import Image

    png = tmp_path / "layout.png"
    code, out, _ = run([str(LAB_POLICIES / "lab-kiosk.yaml"), "--topology", LAB, "--render", str(png),
                        "--guest", "kiosk-1,kind=qemu-dbus,size=1920x1080"], capsys)
    assert code == 0 and f"layout drawn to {png}" in out
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 600 and img.height > 300


def test_invalid_policy_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("monitors: {a: DP-1}\nplacements: [{guest: x, monitor: a}]\n")
    code, out, err = run([str(bad), "--topology", LAB], capsys)
    assert code == 1 and out == ""
    assert err == f"{bad}:2:22: undefined guest `x` (no guests are defined)\n{bad}: invalid, 1 error\n"


def test_warnings_go_to_stderr_and_do_not_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "w.yaml"
    p.write_text("monitors: {a: Virtual-1}\nguests: {x: }\n")
    code, _, err = run([str(p), "--topology", LAB], capsys)
    assert code == 0
    assert "warning: guest `x` is never placed" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["/nonexistent/policy.yaml", "--topology", LAB], "cannot read /nonexistent/policy.yaml"),
    ([str(LAB_POLICIES / "lab-demo.yaml"), "--topology", "/nonexistent/probe.json"],
     "cannot read /nonexistent/probe.json"),
    ([LAB_DEMO, "--topology", LAB, "--guest", "x,size=big"], "size must be WIDTHxHEIGHT"),
    ([LAB_DEMO, "--topology", LAB, "--guest", "x,kind=vnc"], "kind must be one of"),
    ([LAB_DEMO, "--topology", LAB, "--guest", "x,colour=red"], "expected kind=, size="),
])
def test_usage_problems_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.startswith("directflip check: ") and message in err


def test_argparse_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["check"])
    assert info.value.code == 2
    assert "POLICY" in capsys.readouterr().err


def test_help_explains_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["check", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--topology" in out and "--render" in out and "exit status: 0 valid, 1 invalid" in out


def test_malformed_topology_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"schema": "directflip.probe/1", "cards": [{"path": "/dev/dri/card0"}]}))
    code, _, err = run([str(LAB_POLICIES / "lab-demo.yaml"), "--topology", str(probe)], capsys)
    assert code == 1
    assert f"{probe}: cards[0].driver: missing" in err


def fake_probe(monkeypatch: pytest.MonkeyPatch, probe_all: object) -> None:
    module = types.ModuleType("compositor.probe")
    module.probe_all = probe_all  # type: ignore[attr-defined]
    module.register = lambda subparsers: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "compositor.probe", module)
    import compositor

    monkeypatch.setattr(compositor, "probe", module, raising=False)


def test_no_kms_device_says_to_pass_topology(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    fake_probe(monkeypatch, lambda: {"schema": "directflip.probe/1", "cards": []})
    code, out, err = run([str(LAB_POLICIES / "lab-demo.yaml")], capsys)
    assert code == 2
    assert "lab-demo.yaml: valid" in out  # the policy itself was still checked
    assert "no KMS device found" in err and "pass --topology" in err


def test_probe_failure_is_a_message(monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    def broken() -> dict:
        raise PermissionError(13, "Permission denied")

    fake_probe(monkeypatch, broken)
    code, _, err = run([str(LAB_POLICIES / "lab-demo.yaml")], capsys)
    assert code == 2 and "probing the KMS devices failed" in err and "Traceback" not in err


def test_live_probe_is_planned(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    document = json.loads(Path(LAB).read_text())
    fake_probe(monkeypatch, lambda: document)
    code, out, _ = run([str(LAB_POLICIES / "lab-demo.yaml")], capsys)
    assert code == 0 and "topology: live devices" in out


def test_parse_guest() -> None:
    g = check.parse_guest("win,kind=qemu-dbus,size=1920x1200,format=AR24,modifier=LINEAR")
    assert (g.name, g.kind, g.width, g.height, g.fourcc, g.modifier) == (
        "win", "qemu-dbus", 1920, 1200, "AR24", "LINEAR")
    assert check.parse_guest("plain").kind is None   # no kind given: any kind


def test_imagined_guests_match_their_rules() -> None:
    pol = policy.parse("""
monitors: {a: DP-1}
guests:
  lit: {name: office, kind: socket}
  glob: {name: "build-*"}
  chars: {name: "kiosk-[ab]?"}
  neg: {name: "x[!x]"}
""")
    guests, labels = check.imagined_guests(pol)
    # Patterns that match their own text are the guests' names; the others get a name their rule
    # matches, shown as the pattern. No kind in the rule: any kind.
    assert [(g.name, g.kind) for g in guests] == [("office", "socket"), ("build-*", None),
                                                  ("kiosk-ax", None), ("xy", None)]
    assert labels == {"kiosk-ax": "kiosk-[ab]?", "xy": "x[!x]"}
    for rule, g in zip(pol.guests, guests, strict=True):
        assert rule.matches(g.name, g.kind, g.uuid)


def test_check_shows_patterns_and_any_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A guest rule's pattern is shown as it is written, never an invented instance of it, and a guest
    without a kind is "any kind", whether imagined or described with --guest."""
    p = tmp_path / "p.yaml"
    p.write_text("monitors: {a: Virtual-1, b: Virtual-2, c: Virtual-3}\n"
                 'guests: {bravo: {name: "brav?"}, build: {name: "build-*"}, k: {name: "k[ab]"}}\n'
                 "placements: [{guest: bravo, monitor: a}, {guest: build, monitor: b},"
                 " {guest: k, monitor: c}]\n")
    code, out, err = run([str(p), "--topology", LAB], capsys)
    assert code == 0, err
    assert "guests: brav? (any kind), build-* (any kind), k[ab] (any kind) [one per guest rule" in out
    shows = {line.split()[0]: line.split()[6] for line in out.splitlines() if line[:2] in ("a ", "b ", "c ")}
    assert shows == {"a": "brav?", "b": "build-*", "c": "k[ab]"}
    assert "bravx" not in out and "build-build" not in out and "(vfio)" not in out
    code, out, _ = run([str(p), "--topology", LAB, "--guest", "bravo"], capsys)
    assert code == 0 and "guests: bravo (any kind)" in out


def test_a_policy_that_lights_nothing_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "dark.yaml"
    p.write_text("monitors: {a: DP-1, b: {connector: Virtual-1, driver: vkms}}\nguests: {x: }\n"
                 "placements: [{guest: x, monitor: a, failover: [b]}]\n")
    code, out, err = run([str(p), "--topology", LAB], capsys)
    assert code == 1
    assert f"{p}:1: warning: monitor `a` matches no connected output of {LAB}" in err
    assert f"{p}:1: warning: monitor `b` matches no connected output of {LAB}" in err
    assert f"{p}: lights no monitor on {LAB}: none of its 2 monitors matches a connected output" in err
    assert "card0 Virtual-1, card0 Virtual-2, card0 Virtual-3, card2 Virtual-4" in err
    assert "no monitor is lit" in out


def test_a_monitor_that_binds_nothing_is_a_warning(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "half.yaml"
    p.write_text("monitors:\n  a: Virtual-1\n  b: {connector: Virtual-1, driver: vkms}\nguests: {x: }\n"
                 "placements: [{guest: x, monitor: a, failover: [b]}]\n")
    code, _, err = run([str(p), "--topology", LAB], capsys)
    assert code == 0
    assert err == f"{p}:3: warning: monitor `b` matches no connected output of {LAB}\n"


def test_check_predicts_the_copy_path(capsys: pytest.CaptureFixture[str]) -> None:
    """virtio-gpu's primary plane must cover the CRTC: a centred 1024x600 guest on a 1024x768 head is
    refused zero copy at run time, and check says so in the PATH column and a note."""
    code, out, _ = run([str(LAB_POLICIES / "lab-demo.yaml"), "--topology", LAB,
                        "--guest", "office,size=1024x600", "--guest", "media,size=800x600"], capsys)
    assert code == 0
    rows = {r.split()[0]: r.split() for r in out.splitlines() if r.startswith(("left ", "centre "))}
    assert rows["left"][8] == "copy" and rows["centre"][8] == "zero-copy"
    assert ("left: virtio_gpu's primary plane must cover the whole screen, so a 1024x600 picture on "
            "1024x768 is copied") in out
