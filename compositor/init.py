"""`directflip init`: write a policy for the monitors plugged in now.

One monitor per connected connector, bound by its card's port and connector name (`port:
pci-0000:03:00.0/DP-1`: the physical socket, stable when card numbers change; connector and driver
where the card has no bus path), with the monitor's EDID identity in a comment. One placeholder guest
per monitor, placed on it, and a commented example of each guest kind. The text is validated and
planned before it is written: what `init` writes checks clean and lights every connected monitor of
the topology it was made for.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from compositor import planner, policy, topology

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# Connector kinds of panels built into the machine (laptops, tablets, all-in-ones).
BUILT_IN = frozenset({"eDP", "LVDS", "DSI", "DPI"})



_GUEST_EXAMPLES = """\
  # Each placeholder above is a guest of any kind with that name. Examples of each kind:
  #
  # office:                          # a QEMU VM started with
  #   kind: qemu-dbus                #   -display dbus,p2p=yes -qmp unix:/run/vm/office.qmp,server=on,wait=off
  #   display: qmp:/run/vm/office.qmp
  # desktop:                         # a QEMU VM on a D-Bus bus: -display dbus,addr=ADDRESS
  #   kind: qemu-dbus
  #   display: dbus:unix:path=/run/vm/desktop.bus
  # signage:                         # a mediated vGPU directflip opens itself by its UUID (mbochs, mdpy)
  #   kind: vfio
  #   uuid: 4b20d080-1b54-4048-85b3-a6a62d165c01
  # build:                           # a program handing dma-bufs over the frame socket (docs/frame-socket.md)
  #   kind: socket
  #   users: [builder]               # who may connect as it; default: root only
"""


class _Usage(Exception):
    pass


def monitor_name(output: topology.Output, taken: set[str], several_cards: bool) -> str:
    """A policy name for `output`: `panel` for a built-in panel, else the connector's name in lower
    case (`dp-1`, `hdmi-a-1`), prefixed by the card's node name where several cards are lit."""
    conn = output.connector
    base = "panel" if conn.type in BUILT_IN else conn.name.lower()
    if several_cards:
        base = f"{output.card.path.rsplit('/', 1)[-1]}-{base}"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


def _describe(output: topology.Output) -> str:
    """The comment beside a monitor: what it is, its preferred mode and size."""
    conn = output.connector
    parts = []
    if conn.edid is not None:
        label = conn.edid.name or f"{conn.edid.manufacturer} monitor"
        parts.append(f"{label} ({conn.edid.identity})")
    else:
        parts.append("no EDID")
    if conn.preferred_mode is not None:
        parts.append(f"{conn.preferred_mode} preferred")
    w, h = conn.physical_size_mm
    if w and h:
        parts.append(f"{w}x{h} mm")
    return f"{conn.name} on {output.card.path} ({output.card.driver}): " + ", ".join(parts)


def _binding(output: topology.Output) -> str:
    card, conn = output.card, output.connector
    if card.bus_path:
        return f'port: "{card.bus_path}/{conn.name}"'
    return f'connector: "{conn.name}", driver: "{card.driver}"'


def _mode(output: topology.Output) -> str | None:
    """An explicit mode where the monitor flags no preferred one (`preferred` would take the first
    listed, often the largest): the mode its CRTC runs now, if any."""
    conn = output.connector
    if conn.preferred_mode is not None or not conn.modes:
        return None
    crtc = next((c for c in output.card.crtcs if c.id == conn.current_crtc), None)
    if crtc is None or crtc.mode is None:
        return None
    return f"{crtc.mode.width}x{crtc.mode.height}"


def generate(topo: topology.Topology, source: str, guests: Sequence[str] = ()) -> str:
    """The policy text for every present output of `topo`; `guests` names the placeholder guests in
    monitor order (default vm-1, vm-2, ...). Raises ValueError when no monitor is connected."""
    outputs = [o for o in topo.outputs() if o.card.error is None]
    if not outputs:
        raise ValueError(f"no connected monitor on {source}")
    several = len({o.card.path for o in outputs}) > 1
    taken: set[str] = set()
    names = [monitor_name(o, taken, several) for o in outputs]
    guest_names = list(guests) or [f"vm-{i}" for i in range(1, len(outputs) + 1)]
    lines = [
        f"# directflip policy for the {len(outputs)} monitor{'s' if len(outputs) != 1 else ''} of {source},",
        "# written by `directflip init`.",
        "#",
        "# Name your guests below (each placeholder takes the guest of that name, of any kind), then check",
        "# the plan this file gives on this machine before you install it:",
        "#",
        "#   directflip check THIS_FILE",
        "#   directflip run --policy THIS_FILE          (or copy it to /etc/directflip/policy.yaml)",
        "#",
        "# Monitors are bound by port (the card's udev ID_PATH, a slash, the connector): the physical",
        "# socket, which stays the same when cards are numbered differently. `connector: \"DP-*\"` or",
        "# `edid: {manufacturer: DEL}` bind by kind or by monitor instead; the format is described in",
        "# policies/README.md of directflip's sources.",
        "version: 1",
        "",
        "defaults:",
        "  mode: preferred",
        "  scaling: fit",
        '  slate: {text: "no signal", colour: "#101018"}',
        "",
        "monitors:",
    ]
    for name, out in zip(names, outputs, strict=True):
        lines.append(f"  # {_describe(out)}")
        lines.append(f"  {name}:")
        lines.append(f"    {_binding(out)}")
        if (mode := _mode(out)) is not None:
            lines.append(f"    mode: {mode}  # the monitor flags no preferred mode; the one it runs now")
    lines += ["", "guests:"]
    for g in guest_names:
        lines.append(f"  {g}:")
    lines += [_GUEST_EXAMPLES.rstrip("\n"), "", "placements:"]
    for g, m in zip(guest_names, names, strict=False):
        lines.append(f"  - {{guest: {g}, monitor: {m}}}")
    lines += ["  # - {guest: office, monitor: " + names[0] + ", failover: [" + names[-1] + "], priority: 10}",
              ""]
    return "\n".join(lines)


def _topology(path: str | None) -> tuple[topology.Topology, str]:
    if path is not None:
        try:
            return topology.load(path), path
        except OSError as exc:
            raise _Usage(f"cannot read {path}: {exc.strerror or exc}") from None
    from compositor import probe as probe_module

    try:
        document = probe_module.probe_all()
    except Exception as exc:  # the CLI boundary: any failure to probe becomes a message
        raise _Usage(f"probing the KMS devices failed: {exc}; pass --topology PROBE.json") from None
    topo = topology.from_probe(document, "live probe")
    if not any(card.error is None for card in topo.cards):
        raise _Usage("no KMS device found; pass --topology PROBE.json (a saved `directflip probe --json`)")
    return topo, f"{os.uname().nodename}"


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except _Usage as exc:
        print(f"directflip init: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    try:
        topo, source = _topology(args.topology)
    except topology.TopologyError as exc:
        print(exc, file=sys.stderr)
        print(f"directflip init: {exc.source or 'topology'}: not a valid `directflip probe --json` document",
              file=sys.stderr)
        return EXIT_FAILED
    try:
        text = generate(topo, source)
    except ValueError as exc:
        print(f"directflip init: {exc}: plug a monitor in (and switch it on), or pass --topology FILE",
              file=sys.stderr)
        return EXIT_FAILED
    # What init writes must stand on its own: valid, and lighting every connected monitor.
    pol = policy.parse(text, args.output or "<init>")
    lit = planner.plan(pol, topo.outputs(), [])
    outputs = [o for o in topo.outputs() if o.card.error is None]
    assert len(lit.outputs) == len(outputs), (lit, outputs)
    if args.output is None:
        sys.stdout.write(text)
        return EXIT_OK
    target = Path(args.output)
    if target.exists() and not args.force:
        print(f"directflip init: {target} exists; pass --force to overwrite it", file=sys.stderr)
        return EXIT_FAILED
    try:
        tmp = target.with_name(f".{target.name}.init-tmp")
        tmp.write_text(text)
        os.replace(tmp, target)   # one rename: a watching compositor never reads half a file
    except OSError as exc:
        raise _Usage(f"cannot write {target}: {exc.strerror or exc}") from None
    conns = ", ".join(o.connector.name for o in outputs)
    print(f"wrote {target}: {len(outputs)} monitor{'s' if len(outputs) != 1 else ''} ({conns}), one "
          f"placeholder guest each; name your guests, then: directflip check {target}", file=sys.stderr)
    return EXIT_OK
