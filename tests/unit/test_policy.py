"""The policy loader: what valid files mean, and the exact messages for broken ones."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compositor import policy
from compositor.cli import check as check_cli
from compositor.policy import Glob, ModeRequest, PolicyError, SlateStyle

DATA = Path(__file__).resolve().parents[1] / "data"
BROKEN = sorted((DATA / "broken").glob("*.yaml"))


def errors(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        policy.parse(text, "p.yaml")
    return [str(e) for e in info.value.errors]


# --- the broken-policy corpus ---------------------------------------------------------------------


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_corpus(path: Path, monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str]) -> None:
    """`directflip check` prints exactly the messages in NAME.expected for NAME.yaml, and exits 1."""
    monkeypatch.chdir(path.parent)
    parser = check_parser()
    args = parser.parse_args(["check", path.name, "--topology", str(DATA / "lab-topology.json")])
    assert args.func(args) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == path.with_suffix(".expected").read_text()


def test_corpus_covers_the_issue() -> None:
    # unknown keys, wrong types, undefined names, impossible combinations, each with a hint
    text = "".join(p.with_suffix(".expected").read_text() for p in BROKEN)
    for needle in ("did you mean `failover`?", "must be an integer", "undefined monitor", "undefined guest",
                   "undefined seat", "duplicate key", "already placed", "matches nothing", "YAML syntax"):
        assert needle in text, needle


def check_parser():  # noqa: ANN201 - argparse types are private
    import argparse

    parser = argparse.ArgumentParser(prog="directflip")
    check_cli.register(parser.add_subparsers())
    return parser


# --- valid files ----------------------------------------------------------------------------------


def test_minimal_policy() -> None:
    p = policy.parse("monitors: {left: DP-1}\nguests: {office: }\n"
                     "placements: [{guest: office, monitor: left}]")
    (m,) = p.monitors
    assert m.connector == Glob("DP-1")
    assert (m.mode, m.scaling, m.slate) == (ModeRequest("preferred"), "fit", SlateStyle())
    (g,) = p.guests
    assert g.pattern == Glob("office") and g.kind is None
    (pl,) = p.placements
    assert (pl.guest, pl.monitor, pl.candidates, pl.priority) == ("office", "left", ("left",), 0)
    assert not p.warnings


def test_defaults_apply_and_monitors_override() -> None:
    p = policy.parse("""
defaults: {mode: match-guest, scaling: integer, slate: {text: "off air", colour: "#AABBCC"}}
monitors:
  a: DP-1
  b: {connector: DP-2, mode: 1920x1080@59.94, scaling: center, slate: "b is idle"}
""")
    a, b = p.monitors
    assert (a.mode, a.scaling) == (ModeRequest("match-guest"), "integer")
    assert a.slate == SlateStyle("off air", "#aabbcc")
    assert b.mode == ModeRequest("size", 1920, 1080, 59.94)
    assert str(b.mode) == "1920x1080@59.94"
    assert b.scaling == "none"  # `centre`/`center` are the same as `none`
    assert b.slate == SlateStyle("b is idle", "#aabbcc")  # text replaced, colour inherited


def test_edid_forms() -> None:
    p = policy.parse("""
monitors:
  a: {edid: {manufacturer: del, product: 0xA0C1, serial: 12, name: "U27*", serial_string: "CN0*"}}
  b: {edid: "GSM:*"}
""")
    a, b = p.monitors
    assert a.edid is not None and (a.edid.manufacturer, a.edid.product, a.edid.serial) == ("DEL", 0xA0C1, 12)
    assert b.edid is not None and b.edid.identity == Glob("GSM:*")


def test_anchors_and_merge_keys() -> None:
    # operators share settings with YAML anchors; positions still point into the file
    p = policy.parse("""
monitors:
  a: &big {connector: DP-1, mode: 2560x1440, scaling: fill}
  b:
    <<: *big
    connector: DP-2
""")
    a, b = p.monitors
    assert (b.connector, b.mode, b.scaling) == (Glob("DP-2"), a.mode, "fill")


def test_placement_lists_and_seats() -> None:
    p = policy.parse("""
monitors: {a: DP-1, b: DP-2, c: DP-3, d: HDMI-A-1}
seats:
  desk: {monitors: [b, a]}
  lobby: {monitors: d, logind: seat1}
guests: {x: , y: , z: }
placements:
  - {guest: x, monitor: a, failover: b, mirror: [b, c], priority: -2}
  - {guest: y, seats: [desk]}
  - {guest: z, seats: lobby}
""")
    x, y, z = p.placements
    assert (x.candidates, x.mirror, x.priority) == (("a", "b"), ("b", "c"), -2)
    assert y.candidates == ("b", "a")  # the seat's own order
    # a seat that also takes monitors by logind seat may get any monitor at run time
    assert z.candidates == ("d", "a", "b", "c")
    assert p.monitor_seats == {"a": frozenset({"desk"}), "b": frozenset({"desk"}), "d": frozenset({"lobby"})}
    assert p.logind_seats == {"seat1": frozenset({"lobby"})}


def test_warnings_do_not_fail() -> None:
    p = policy.parse("monitors: {a: DP-1, b: DP-2}\nguests: {x: , y: }\nplacements: [{guest: x, monitor: a}]",
                     "w.yaml")
    assert [str(w) for w in p.warnings] == [
        "w.yaml:1:21: warning: no placement uses monitor `b`; it will only show its slate",
        "w.yaml:2:15: warning: guest `y` is never placed (add a placement, or remove the guest)",
    ]


def test_shipped_and_lab_policies_are_valid_without_warnings() -> None:
    paths = [*sorted((DATA.parent.parent / "policies").glob("*.yaml")),
             *sorted((DATA / "policies").glob("*.yaml"))]
    assert len(paths) >= 7
    for path in paths:
        p = policy.load(path)
        assert not p.warnings, (path, p.warnings)


# --- messages -------------------------------------------------------------------------------------


def test_all_errors_at_once_in_file_order() -> None:
    got = errors("""
placements:
  - {guest: nobody, monitor: nowhere}
monitors:
  a: {connector: 7}
""")
    assert got == [
        "p.yaml:3:13: undefined guest `nobody` (no guests are defined)",
        "p.yaml:3:30: undefined monitor `nowhere` (monitors defined: `a`)",
        "p.yaml:5:18: `connector` must be a string, got the number `7`",
    ]


def test_unknown_key_without_a_close_match_lists_the_keys() -> None:
    assert errors("monitors: {a: DP-1}\nzzz: 1") == [
        "p.yaml:2:1: unknown key `zzz` in the policy "
        "(expected one of: version, defaults, monitors, guests, seats, placements, hotkeys)"]


def test_booleans_are_not_integers() -> None:
    text = "monitors: {a: DP-1}\nguests: {x: }\nplacements: [{guest: x, monitor: a, priority: yes}]"
    assert errors(text) == ["p.yaml:3:47: `priority` must be an integer, got the boolean `yes`"]


def test_parse_never_raises_anything_else() -> None:
    # a handful of hostile inputs: every one is a PolicyError with a position
    for text in ["[", "a: b: c", "!!python/object:os.system {}", "monitors: {a: *x}", "\t- x", "---\n---\n",
                 "monitors: {? [a, b] : c}", "monitors:\n  a:\n    mode: {x: 1}\n    slate: [1]",
                 "version: !!int abc", "monitors: {a: {edid: {product: !!int x}}}", "monitors: {a: {<<: 1}}"]:
        with pytest.raises(PolicyError) as info:
            policy.parse(text, "h.yaml")
        assert info.value.errors and all(str(e).startswith("h.yaml:") for e in info.value.errors), text


SHIPPED = (DATA / "policies" / "lab-demo.yaml").read_text()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mangled_policies_give_messages_not_tracebacks(data: st.DataObject) -> None:
    # cut, duplicate and splice pieces of a real policy: whatever comes out, the loader answers
    # with a valid Policy or a PolicyError, never with another exception
    text = SHIPPED
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 40)))
        piece = data.draw(st.sampled_from([
            "", text[i:j], ":", "- ", "[", "]", "{", "}", "\n  ", "&a ", "*a", "<<: ", "!!int ", "~", "'",
            "\t", "0x10", "-1", "true", "monitor", "failover: [x]", "\n    - guest: ", "seats: [",
            "edid: {"]))
        text = text[:i] + piece + text[j:]
    try:
        policy.parse(text, "m.yaml")
    except PolicyError as exc:
        assert exc.errors and all(str(e).startswith("m.yaml:") for e in exc.errors)


def test_qemu_dbus_display_and_console() -> None:
    base = "monitors: {left: Virtual-1}\nplacements: [{guest: vm, monitor: left}]\nguests:\n"
    p = policy.parse(base + "  vm: {kind: qemu-dbus, display: 'qmp:/run/vm/vm.qmp', console: 1}\n", "p.yaml")
    rule = p.guests[0]
    assert (rule.kind, rule.display, rule.console) == ("qemu-dbus", "qmp:/run/vm/vm.qmp", 1)
    on_bus = policy.parse(base + "  vm: {kind: qemu-dbus, display: 'dbus:unix:path=/b'}\n").guests[0]
    assert on_bus.console == 0
    for bad, why in (("{kind: qemu-dbus, display: '/run/vm/vm.qmp'}", "write qmp:PATH"),
                     ("{kind: socket, display: 'qmp:/x'}", "`display` needs `kind: qemu-dbus`"),
                     ("{kind: qemu-dbus, display: 'qmp:/x', console: -1}", "console number"),
                     ("{kind: qemu-dbus, display: 'qmp:/x', console: one}", "console number"),
                     ("{name: 'vm-*', kind: qemu-dbus, display: 'qmp:/x'}", "cannot be a pattern")):
        with pytest.raises(PolicyError, match=why):
            policy.parse(base + f"  vm: {bad}\n", "p.yaml")
    p = policy.parse(base + "  vm: {kind: qemu-dbus}\n", "p.yaml")   # allowed, but it never runs: said so
    assert any("no `display`" in w.message for w in p.warnings)


LIBVIRT = """version: 1
monitors:
  desk: {connector: HDMI-A-1}
guests:
%s
placements:
  - {guest: win11, monitor: desk}
"""


def test_libvirt_guests_name_a_domain() -> None:
    pol = policy.parse(LIBVIRT % "  win11: {kind: libvirt}")
    rule = pol.guests[0]
    assert (rule.domain, rule.uri, rule.resize) == ("win11", "qemu:///system", True)
    assert rule.qemu_target == ("libvirt", "qemu:///system", "win11")
    pol = policy.parse(LIBVIRT % "  win11: {kind: libvirt, domain: 5b3f0c1e-8d0a-4c4e-9f57-2c1d3e4f5a6b, "
                       "uri: 'qemu+ssh://root@host/system', resize: false, console: 1}")
    rule = pol.guests[0]
    assert (rule.domain, rule.uri, rule.resize, rule.console) == (
        "5b3f0c1e-8d0a-4c4e-9f57-2c1d3e4f5a6b", "qemu+ssh://root@host/system", False, 1)


def test_libvirt_keys_are_checked() -> None:
    assert errors(LIBVIRT % "  win11: {kind: qemu-dbus, display: 'qmp:/x', domain: win11}") == [
        "p.yaml:5:55: `domain` needs `kind: libvirt` (it names the libvirt domain whose display directflip "
        "shows)"]
    pol = policy.parse(LIBVIRT % "  win11: {kind: libvirt, name: 'win*'}", "p.yaml")
    assert [str(w) for w in pol.warnings] == [
        "p.yaml:5:32: warning: guest `win11` has `kind: libvirt` and a pattern for a name (`win*`): it names "
        "no domain, so directflip never shows one (give `domain: NAME` (or UUID), or drop `name`)"]
    assert errors(LIBVIRT % "  win11: {kind: libvirt, name: 'win*', domain: w}") == [
        "p.yaml:5:32: guest `win11` names one libvirt domain, so its `name` cannot be a pattern (`win*`) "
        "(give the guest's name, or drop `name`)"]
    assert errors(LIBVIRT % "  win11: {kind: libvirt, uri: system}") == [
        "p.yaml:5:31: `uri` `system` is not a libvirt URI (e.g. qemu:///system (the default) or "
        "qemu:///session)"]
    assert errors(LIBVIRT % "  win11: {kind: libvirt, resize: sometimes}") == [
        'p.yaml:5:34: `resize` must be true or false, got the string "sometimes"']
    assert errors(LIBVIRT % "  win11: {kind: socket, resize: false}") == [
        "p.yaml:5:33: `resize` needs `kind: qemu-dbus` or `kind: libvirt` (it tells a QEMU guest its "
        "monitor's size)"]
