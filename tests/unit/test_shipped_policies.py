"""What each shipped policy lights on real machines' topologies, and what `directflip init` writes for
them. The saved topologies (tests/data/*-topology.json, `directflip probe --json` documents): the
lab's (virtio-gpu with three heads, vkms), a laptop on i915 (eDP panel, DP and HDMI monitors, a
second DP socket empty) and a desktop on amdgpu (DP-1 2560x1440@144 GSM, DP-2 unplugged, DP-3
3840x2160 DEL, HDMI-A-1 1920x1080 AUS)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from compositor import check, init, planner, policy, topology

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
TOPOLOGIES = {name: DATA / f"{name}-topology.json" for name in ("lab", "laptop-i915", "desktop-amdgpu")}


def lit(policy_path: Path, topo: str, *unplug: str,
        capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, tuple[str, str]]]:
    """`directflip check` on a topology: its exit status and monitor -> (connector, what it shows)."""
    args = argparse.Namespace(policy=str(policy_path), topology=str(TOPOLOGIES[topo]), guest=[],
                              unplug=list(unplug), render=None)
    code = check.run(args)
    out = capsys.readouterr().out
    rows = {}
    lines = out.splitlines()
    if any(line.startswith("MONITOR ") for line in lines):
        start = next(i for i, line in enumerate(lines) if line.startswith("MONITOR ")) + 1
        for line in lines[start:]:
            if not line.strip():
                break
            cells = line.split()
            shows = "slate" if cells[6] == "slate" else cells[6] + (" mirror" if "(mirror)" in line else "")
            rows[cells[0]] = (cells[2], shows)
    return code, rows


# (policy, topology, unplugged connectors) -> what lights: monitor -> (connector, guest or slate).
# None: the policy lights nothing there, and check exits 1.
CASES = {
    ("desk", "laptop-i915", ()): {"panel": ("eDP-1", "build-*"), "main": ("DP-1", "office"),
                                  "second": ("HDMI-A-1", "media")},
    ("desk", "desktop-amdgpu", ()): {"main": ("DP-1", "office"), "third": ("DP-3", "build-*"),
                                     "second": ("HDMI-A-1", "media")},
    # DP-1 unplugged: `main` binds the first DisplayPort monitor still there (DP-3), so office keeps a
    # DP monitor; `third` binds nothing and build's failover (the panel) is absent: build waits.
    ("desk", "desktop-amdgpu", ("DP-1",)): {"main": ("DP-3", "office"), "second": ("HDMI-A-1", "media")},
    ("desk", "lab", ()): None,
    ("laptop", "laptop-i915", ()): {"panel": ("eDP-1", "chat"), "dock": ("DP-1", "work"),
                                    "tv": ("HDMI-A-1", "slate")},
    # On the road: the work VM takes the panel, the chat VM waits.
    ("laptop", "laptop-i915", ("DP-1", "HDMI-A-1")): {"panel": ("eDP-1", "work")},
    ("laptop", "desktop-amdgpu", ()): {"dock": ("DP-1", "work"), "tv": ("HDMI-A-1", "chat")},
    ("laptop", "lab", ()): None,
    ("kiosk", "laptop-i915", ()): {"front": ("eDP-1", "service"), "side": ("DP-1", "signage"),
                                   "rear": ("HDMI-A-1", "signage mirror")},
    ("kiosk", "desktop-amdgpu", ()): {"front": ("DP-1", "service"), "side": ("DP-3", "signage"),
                                      "rear": ("HDMI-A-1", "signage mirror")},
    # The QEMU heads report an EDID; vkms' output does not and stays off.
    ("kiosk", "lab", ()): {"front": ("Virtual-1", "service"), "side": ("Virtual-2", "signage"),
                           "rear": ("Virtual-3", "signage mirror")},
    ("multiseat", "laptop-i915", ()): {"a-main": ("DP-1", "alice"), "b-main": ("HDMI-A-1", "bob")},
    ("multiseat", "desktop-amdgpu", ()): {"a-main": ("DP-1", "alice"), "b-side": ("DP-3", "bob-chat"),
                                          "b-main": ("HDMI-A-1", "bob")},
    ("multiseat", "lab", ()): None,
}


@pytest.mark.parametrize(("name", "topo", "unplug"), list(CASES),
                         ids=[f"{n}-{t}" + "".join(f"-no-{u}" for u in up) for n, t, up in CASES])
def test_what_each_shipped_policy_lights(name: str, topo: str, unplug: tuple[str, ...],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, rows = lit(ROOT / "policies" / f"{name}.yaml", topo, *unplug, capsys=capsys)
    want = CASES[(name, topo, unplug)]
    if want is None:
        assert code == 1 and rows == {}
    else:
        assert code == 0
        assert rows == want


def test_every_shipped_policy_lights_a_real_desk() -> None:
    """No shipped example is for the lab alone: each lights monitors on both real machines."""
    for path in sorted((ROOT / "policies").glob("*.yaml")):
        pol = policy.load(path)
        for topo in ("laptop-i915", "desktop-amdgpu"):
            t = topology.load(TOPOLOGIES[topo])
            guests, _ = check.imagined_guests(pol)
            a = planner.plan(pol, t.outputs(), guests)
            assert len([o for o in a.outputs if o.guest]) >= 2, (path.name, topo, a)


@pytest.mark.parametrize("topo", list(TOPOLOGIES))
def test_init_writes_a_policy_that_lights_every_connected_monitor(
        topo: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from compositor import cli

    target = tmp_path / "policy.yaml"
    assert cli.main(["init", "--topology", str(TOPOLOGIES[topo]), "-o", str(target)]) == 0
    err = capsys.readouterr().err
    connected = [o.connector.name for o in topology.load(TOPOLOGIES[topo]).outputs()]
    assert f"wrote {target}: {len(connected)} monitor" in err
    text = target.read_text()
    pol = policy.load(target)
    assert not pol.warnings
    code, rows = lit(target, topo, capsys=capsys)
    assert code == 0
    # Every connected monitor is lit, each showing its own placeholder guest.
    assert sorted(conn for conn, _ in rows.values()) == sorted(connected)
    assert sorted(shows for _, shows in rows.values()) == [f"vm-{i}" for i in range(1, len(connected) + 1)]
    # Bound by port and connector, the EDID identity in a comment beside it.
    t = topology.load(TOPOLOGIES[topo])
    for out in t.outputs():
        assert f'port: "{out.card.bus_path}/{out.connector.name}"' in text
        if out.connector.edid is not None:
            assert out.connector.edid.identity in text
    for kind in ("kind: qemu-dbus", "kind: vfio", "kind: socket"):
        assert f"#   {kind}" in text   # a commented example of each guest kind


def test_init_names_monitors_by_kind_and_card() -> None:
    laptop = init.generate(topology.load(TOPOLOGIES["laptop-i915"]), "laptop")
    assert [line.strip() for line in laptop.splitlines() if line.startswith("  ") and line.endswith(":")
            and not line.strip().startswith("#")][:3] == ["panel:", "dp-1:", "hdmi-a-1:"]
    lab = init.generate(topology.load(TOPOLOGIES["lab"]), "lab")
    assert "  card0-virtual-1:" in lab and "  card2-virtual-4:" in lab   # two cards: names say which


def test_init_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from compositor import cli

    target = tmp_path / "policy.yaml"
    target.write_text("mine\n")
    assert cli.main(["init", "--topology", str(TOPOLOGIES["lab"]), "-o", str(target)]) == 1
    assert f"{target} exists; pass --force to overwrite it" in capsys.readouterr().err
    assert target.read_text() == "mine\n"
    assert cli.main(["init", "--topology", str(TOPOLOGIES["lab"]), "-o", str(target), "--force"]) == 0
    assert policy.load(target).monitors


def test_init_prints_without_output(capsys: pytest.CaptureFixture[str]) -> None:
    from compositor import cli

    assert cli.main(["init", "--topology", str(TOPOLOGIES["desktop-amdgpu"])]) == 0
    out = capsys.readouterr().out
    assert policy.parse(out, "<stdout>").monitors[0].name == "dp-1"


def test_init_with_no_connected_monitor_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from compositor import cli

    dark = tmp_path / "dark.json"
    t = topology.load(TOPOLOGIES["desktop-amdgpu"])
    doc = json.loads(TOPOLOGIES["desktop-amdgpu"].read_text())
    for conn in doc["cards"][0]["connectors"]:
        conn.update(status="disconnected", modes=[], preferred_mode=None, edid=None)
    dark.write_text(json.dumps(doc))
    assert t.outputs()   # the original has monitors; the copy has none
    assert cli.main(["init", "--topology", str(dark), "-o", str(tmp_path / "p.yaml")]) == 1
    err = capsys.readouterr().err
    assert f"no connected monitor on {dark}" in err and "plug a monitor in" in err
    assert not (tmp_path / "p.yaml").exists()
