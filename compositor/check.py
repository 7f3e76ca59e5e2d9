"""`directflip check POLICY`: validate a policy file and show the plan it gives.

Exit status: 0 the policy is valid and lights at least one monitor of the topology; 1 the policy, or
the topology file given with `--topology`, is invalid, or the policy lights no monitor there; 2 usage:
bad arguments, a file that cannot be read, no KMS device to probe without `--topology`, or `--render`
without Pillow.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

# The planner, the policy parser (YAML) and the topology are imported where they are used, not here:
# `directflip check --help` and the other subcommands' start-up have no use for them, and together they
# cost more than the interpreter's own start.
if TYPE_CHECKING:
    from compositor import planner, policy, topology

EXIT_VALID, EXIT_INVALID, EXIT_USAGE = 0, 1, 2




class _Usage(Exception):
    pass


def parse_guest(spec: str) -> planner.Guest:
    """`office,kind=vfio,size=1920x1080,format=XR24` -> Guest. Raises ValueError with a readable text."""
    from compositor import planner, policy

    name, *fields = [s.strip() for s in spec.split(",")]
    if not name or "=" in name:
        raise ValueError(f"--guest {spec!r}: start with the guest's name")
    values: dict[str, str] = {}
    for f in fields:
        key, sep, value = f.partition("=")
        if not sep or key not in ("kind", "size", "format", "modifier", "uuid"):
            raise ValueError(f"--guest {spec!r}: expected kind=, size=, format=, modifier= or uuid=, "
                             f"got {f!r}")
        values[key] = value
    width = height = None
    if "size" in values:
        w, x, h = values["size"].partition("x")
        if not (x and w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
            raise ValueError(f"--guest {spec!r}: size must be WIDTHxHEIGHT, e.g. 1920x1080")
        width, height = int(w), int(h)
    kind = values.get("kind")
    if kind is not None and kind not in policy.GUEST_KINDS:
        raise ValueError(f"--guest {spec!r}: kind must be one of {', '.join(policy.GUEST_KINDS)}")
    return planner.Guest(name, kind, values.get("uuid"), width, height, values.get("format"),
                         values.get("modifier"))


def imagined_guests(pol: policy.Policy) -> tuple[list[planner.Guest], dict[str, str]]:
    """One running guest per guest rule, of the rule's kind (None: any), and the labels to show for
    them. A guest is named by the rule's pattern where the pattern matches its own text (`build-*`,
    `brav?`); otherwise (`kiosk-[ab]`) by a name the pattern matches, shown as the pattern."""
    from compositor import planner

    guests, labels = [], {}
    for rule in pol.guests:
        pattern = rule.pattern.pattern
        name = pattern
        if not rule.pattern.matches(name):
            name = _instance_of(pattern, rule.name)
            if not rule.pattern.matches(name):
                name = rule.name
            labels[name] = pattern
        guests.append(planner.Guest(name, rule.kind, rule.uuid))
    return guests, labels


def relabel(a: planner.Assignment, labels: dict[str, str]) -> planner.Assignment:
    """The assignment with guests shown by their labels (the patterns they were imagined from)."""
    from dataclasses import replace

    if not labels:
        return a
    return replace(a, outputs=tuple(replace(o, guest=labels.get(o.guest, o.guest)) if o.guest else o
                                    for o in a.outputs),
                   unplaced=tuple(replace(u, guest=labels.get(u.guest, u.guest)) for u in a.unplaced))


def _instance_of(pattern: str, filler: str) -> str:
    """A name matching a shell pattern: `*` -> filler, `?` -> x, `[ab]` -> a."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append(filler)
        elif c == "?":
            out.append("x")
        elif c == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            if body[0] in "!^":  # a negated set: any plain character outside it
                out.append(next((ch for ch in "xyz0123456789" if ch not in body[1:]), "x"))
            else:
                out.append(body[0])
            i = end
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _live_topology() -> topology.Topology:
    from compositor import topology

    try:
        from compositor import probe as probe_module
    except ImportError as exc:
        raise _Usage(f"cannot probe the live devices ({exc}); pass --topology PROBE.json") from None
    try:
        document = probe_module.probe_all()
    except Exception as exc:  # the CLI boundary: any failure to probe becomes a message, not a traceback
        raise _Usage(f"probing the KMS devices failed: {exc}; pass --topology PROBE.json "
                     "(a saved `directflip probe --json`)") from None
    topo = topology.from_probe(document, "live probe")
    if not any(card.error is None for card in topo.cards):
        raise _Usage("no KMS device found to plan for; pass --topology PROBE.json "
                     "(a saved `directflip probe --json`)")
    return topo


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        return _run(args, out, err)
    except _Usage as exc:
        print(f"directflip check: {exc}", file=err)
        return EXIT_USAGE


def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from dataclasses import replace

    from compositor import planner

    try:
        guests = [parse_guest(spec) for spec in args.guest]
    except ValueError as exc:
        raise _Usage(str(exc)) from None

    pol = _valid_policy(args.policy, out, err)
    if pol is None:
        return EXIT_INVALID
    topo = _topology(args, err)
    if topo is None:
        return EXIT_INVALID

    imagined = not guests
    labels: dict[str, str] = {}
    if imagined:
        guests, labels = imagined_guests(pol)
    outputs = topo.outputs()
    assignment = relabel(planner.plan(pol, outputs, guests), labels)
    guests = [replace(g, name=labels.get(g.name, g.name)) for g in guests]
    _warn_unbound_monitors(pol, assignment, args, err)

    source = args.topology or "live devices"
    _print_plan(assignment, topo, outputs, guests, imagined, source, args.unplug, out)
    if not assignment.outputs:
        present = ", ".join(f"{_short(o.card.path)} {o.connector.name}" for o in outputs) or "none"
        print(f"{args.policy}: lights no monitor on {source}: none of its {_count(pol.monitors, 'monitor')} "
              f"matches a connected output (connected: {present}); `directflip init` writes a policy for "
              "the monitors plugged in", file=err)
        return EXIT_INVALID

    if args.render:
        _render(assignment, outputs, guests, args.render, str(args.policy), out)
    return EXIT_VALID


def _valid_policy(path: str, out: TextIO, err: TextIO) -> policy.Policy | None:
    """The policy at `path`, its warnings printed and its libvirt domains checked; None (errors
    printed) when it is invalid. A file that cannot be read is a usage error."""
    from compositor import policy

    try:
        pol = policy.load(path)
    except OSError as exc:
        raise _Usage(f"cannot read {path}: {exc.strerror or exc}") from None
    except policy.PolicyError as exc:
        # Warnings are left out here: on a broken file they are mostly echoes of its errors.
        for d in exc.errors:
            print(d, file=err)
        n = len(exc.errors)
        print(f"{path}: invalid, {n} error{'s' if n != 1 else ''}", file=err)
        return None
    for w in pol.warnings:
        print(w, file=err)
    domain_errors = check_domains(pol, path, out, err)
    if domain_errors:
        print(f"{path}: invalid, {_count(range(domain_errors), 'libvirt domain')} cannot be shown",
              file=err)
        return None
    print(f"{path}: valid ({_count(pol.monitors, 'monitor')}, {_count(pol.guests, 'guest')}, "
          f"{_count(pol.placements, 'placement')})", file=out)
    return pol


def _topology(args: argparse.Namespace, err: TextIO) -> topology.Topology | None:
    """The topology to plan for, less the `--unplug` connectors; None (the error printed) when the
    `--topology` file is not a valid probe document."""
    from compositor import topology

    try:
        topo = topology.load(args.topology) if args.topology else _live_topology()
    except OSError as exc:
        raise _Usage(f"cannot read {args.topology}: {exc.strerror or exc}") from None
    except topology.TopologyError as exc:
        print(exc, file=err)
        print(f"{exc.source or 'topology'}: not a valid `directflip probe --json` document", file=err)
        return None
    if args.unplug:
        topo = topo.without(set(args.unplug))
    return topo


def _warn_unbound_monitors(pol: policy.Policy, assignment: planner.Assignment, args: argparse.Namespace,
                           err: TextIO) -> None:
    """A monitor rule that no output took is likely a typo or a monitor left unplugged: say so."""
    bound = {o.monitor for o in assignment.outputs} | {d.monitor for d in assignment.dark if d.monitor}
    for rule in pol.monitors:
        if rule.name not in bound:
            print(f"{args.policy}:{rule.line}: warning: monitor `{rule.name}` matches no connected output "
                  f"of {args.topology or 'this machine'}", file=err)


def _print_plan(assignment: planner.Assignment, topo: topology.Topology, outputs: Sequence[topology.Output],
                guests: Sequence[planner.Guest], imagined: bool, source: str, unplug: Sequence[str],
                out: TextIO) -> None:
    """What the plan was made for (topology, guests, unplugged connectors), then the plan itself."""
    counts = f"{_count(topo.cards, 'card')}, {_count(outputs, 'monitor')} present"
    print(f"topology: {source} ({counts})", file=out)
    for card in topo.cards:
        if card.error:
            print(f"  {card.path}: not probed: {card.error}", file=out)
    guest_list = ", ".join(f"{g.name} ({g.kind or 'any kind'}{_size(g)})" for g in guests) or "none"
    suffix = " [one per guest rule; describe real ones with --guest]" if imagined else ""
    print(f"guests: {guest_list}{suffix}", file=out)
    if unplug:
        print(f"unplugged: {', '.join(unplug)}", file=out)
    print(file=out)
    print(format_plan(assignment), file=out)


def _render(assignment: planner.Assignment, outputs: Sequence[topology.Output],
            guests: Sequence[planner.Guest], target: str, title: str, out: TextIO) -> None:
    """Draw the plan into `target`; a missing Pillow or an unwritable file is a usage error."""
    from compositor import render

    try:
        render.render(assignment, outputs, guests, Path(target), title=title)
    except render.RenderUnavailable as exc:
        raise _Usage(str(exc)) from None
    except OSError as exc:
        raise _Usage(f"cannot write {target}: {exc.strerror or exc}") from None
    print(f"\nlayout drawn to {target}", file=out)


def check_domains(pol: policy.Policy, path: str, out: TextIO, err: TextIO) -> int:
    """Check each `kind: libvirt` guest's domain against libvirt, where libvirt can be asked: it must
    exist and have a D-Bus display. Prints an error per bad domain (returned: how many) and a note
    per URI that could not be asked (not an error: libvirtd may run later)."""
    rules = [r for r in pol.guests if r.kind == "libvirt" and r.domain is not None and r.uri is not None]
    if not rules:
        return 0
    import asyncio

    from compositor.sources.libvirt_domain import DomainError, LibvirtMissing, list_domains

    bad = 0
    for uri in sorted({r.uri for r in rules if r.uri is not None}):
        try:
            domains = asyncio.run(list_domains(uri))
        except (DomainError, LibvirtMissing) as exc:
            print(f"{path}: note: libvirt domains not checked: {exc}", file=err)
            continue
        for rule in (r for r in rules if r.uri == uri):
            found = [d for d in domains if rule.domain in (d["name"], d["uuid"]) or
                     (rule.domain or "").lower() == d["uuid"].lower()]
            if not found:
                have = ", ".join(d["name"] for d in domains) or "none"
                print(f"{path}:{rule.line}: error: guest {rule.name}: libvirt at {uri} has no domain "
                      f"`{rule.domain}` (domains: {have})", file=err)
                bad += 1
            elif found[0]["dbus"] is None:
                print(f"{path}:{rule.line}: error: guest {rule.name}: domain {found[0]['name']} has no D-Bus "
                      f"display: add <graphics type='dbus' p2p='yes'/> to its <devices> (virsh edit "
                      f"{found[0]['name']})", file=err)
                bad += 1
            else:
                d = found[0]
                print(f"libvirt: guest {rule.name} is domain {d['name']} at {uri} ({d['state']}, D-Bus "
                      f"display {'peer to peer' if d['dbus'] == 'p2p' else 'on its bus'})", file=out)
    return bad


def _count(items: Sequence[object], word: str) -> str:
    return f"{len(items)} {word}{'s' if len(items) != 1 else ''}"


def _size(g: planner.Guest) -> str:
    return f", {g.width}x{g.height}" if g.width else ""


def _short(card: str) -> str:
    return card.rsplit("/", 1)[-1]


def format_plan(a: planner.Assignment) -> str:
    """The assignment as a table, then notes, dark outputs and guests not shown."""
    header = ("MONITOR", "OUTPUT", "CRTC", "PLANE", "MODE", "SHOWS", "SCALING", "PATH",
              "SOURCE -> DESTINATION")
    rows = []
    for o in a.outputs:
        if o.guest is not None:
            shows = o.guest + (" (mirror)" if o.mirror else "")
            rects = f"{o.src} -> {o.dst}"
        else:
            assert o.slate is not None
            shows = f'slate "{o.slate.text}"'
            rects = o.slate.reason
        path = "-" if o.guest is None else "zero-copy" if o.zero_copy else "copy"
        rows.append((o.monitor, f"{_short(o.card)} {o.connector}", str(o.crtc_id), str(o.plane_id),
                     str(o.mode), shows, o.scaling if o.guest else "-", path, rects))
    lines = []
    if rows:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
        for r in [header, *rows]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    else:
        lines.append("no monitor is lit")
    notes = [(o.monitor, n) for o in a.outputs for n in o.notes]
    if notes:
        lines += ["", "notes:"] + [f"  {m}: {n}" for m, n in notes]
    if a.dark:
        lines += ["", "off:"] + [
            f"  {_short(d.card)} {d.connector}: {d.reason}" for d in a.dark]
    if a.unplaced:
        lines += ["", "not shown:"] + [f"  {u.guest}: {u.reason}" for u in a.unplaced]
    return "\n".join(lines)
