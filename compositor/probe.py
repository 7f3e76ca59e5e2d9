"""`directflip probe`: what the KMS devices offer — connectors, CRTCs, planes — as a table or as the
stable JSON document described in docs/probe-json.md (schema directflip.probe/1)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .formats import fourcc_name, modifier_name
from .kms import Card, DeviceError, KmsError, list_cards

SCHEMA = "directflip.probe/1"


def bus_path(card_path: str) -> str | None:
    """udev's ID_PATH for the card when udev knows it, else the same form derived from sysfs
    (pci-0000:00:02.0, platform-vkms)."""
    name = os.path.basename(card_path)
    try:
        import pyudev
        dev = pyudev.Devices.from_device_file(pyudev.Context(), card_path)
        value = dev.properties.get("ID_PATH")
        if value:
            return value
    except Exception:  # noqa: BLE001 — udev is optional here; sysfs below is the fallback
        pass
    try:
        real = os.path.realpath(f"/sys/class/drm/{name}/device")
    except OSError:
        return None
    parts = real.split("/")
    if "platform" in parts:
        return "platform-" + parts[-1]
    pci = [p for p in parts if p.count(":") == 2 and "." in p]
    return f"pci-{pci[-1]}" if pci else None


def probe_card(card: Card) -> dict:
    crtcs = []
    for c in card.crtcs:
        crtcs.append({"id": c.id, "index": c.index, "active": c.active,
                      "mode": c.mode.to_json() if c.mode else None})
    connectors = []
    for conn in card.connectors:
        edid = conn.edid
        crtc = conn.crtc
        pref = conn.preferred_mode
        connectors.append({
            "id": conn.id, "name": conn.name, "type": conn.type_name, "status": conn.status,
            "edid": edid.to_json() if edid else None,
            "modes": [m.to_json() for m in conn.modes],
            "preferred_mode": pref.to_json() if pref else None,
            "current": ({"crtc": crtc.id, "mode": crtc.mode.to_json() if crtc.mode else None}
                        if crtc else None),
            "link_status": conn.link_status,
            "possible_crtcs": [c.id for c in conn.possible_crtcs],
            "physical_size_mm": list(conn.mm_size),
        })
    planes = []
    for p in card.planes:
        planes.append({
            "id": p.id, "type": p.type, "possible_crtcs": [c.id for c in p.possible_crtcs],
            "formats": {fourcc_name(f): [modifier_name(m) for m in mods] for f, mods in p.formats.items()},
            "zpos": p.zpos,
            "crtc": p.value("CRTC_ID") or None, "fb": p.value("FB_ID") or None,
        })
    return {"path": card.path, "driver": card.driver, "driver_desc": card.driver_desc,
            "bus_path": bus_path(card.path), "caps": card.caps,
            "connectors": connectors, "crtcs": crtcs, "planes": planes}


def probe_path(path: str, *, writeback: bool = True) -> dict:
    """Probe one card; a card that cannot be probed is reported with `error` instead of raising
    (a render-only driver such as vgem sits next to the KMS cards)."""
    try:
        with Card(path, writeback=writeback) as card:
            return probe_card(card)
    except DeviceError as exc:
        if writeback and "writeback" in str(exc):
            return probe_path(path, writeback=False)
        return _card_error(path, str(exc))
    except KmsError as exc:
        return _card_error(path, str(exc))


def _card_error(path: str, message: str) -> dict:
    driver = ""
    try:
        with Card(path, kms=False) as card:
            driver = card.driver
    except DeviceError:
        pass
    return {"path": path, "driver": driver, "driver_desc": "", "bus_path": None, "caps": {},
            "connectors": [], "crtcs": [], "planes": [], "error": message}


def probe_all(paths: list[str] | None = None, libvirt_uris: list[str] | None = None) -> dict:
    """The probe document for the given cards (default: every /dev/dri/card*) and libvirt URIs."""
    from dataclasses import asdict

    from .sources.vfio import discover

    if paths is None:
        paths = list_cards()
    return {"schema": SCHEMA, "cards": [probe_path(p) for p in paths],
            "vgpus": [asdict(m) for m in discover()],
            "libvirt": [probe_libvirt(uri) for uri in (libvirt_uris or [])]}


def probe_libvirt(uri: str) -> dict:
    """The domains at a libvirt URI and their D-Bus displays, or why libvirt could not be asked."""
    import asyncio

    from .sources.libvirt_domain import DomainError, LibvirtMissing, list_domains

    try:
        return {"uri": uri, "domains": asyncio.run(list_domains(uri)), "error": None}
    except (DomainError, LibvirtMissing) as exc:
        return {"uri": uri, "domains": [], "error": str(exc)}


# ------------------------------------------------------------------------------------------ output

def _mode_label(m: dict | None) -> str:
    return f"{m['width']}x{m['height']}@{m['refresh']:.2f}" if m else "-"


def format_table(doc: dict) -> str:
    out: list[str] = []
    for card in doc["cards"]:
        out += _card_lines(card)
        out.append("")
    out += _vgpu_lines(doc.get("vgpus") or [])
    out += _libvirt_lines(doc.get("libvirt") or [])
    return "\n".join(out).rstrip() + "\n"


def _card_lines(card: dict) -> list[str]:
    """A card's heading, then its caps, connectors, CRTCs and planes; a card that could not be
    probed gives only the reason after its heading."""
    caps = card.get("caps") or {}
    flags = [k.replace("_", " ") for k in ("atomic", "prime_import", "prime_export", "addfb2_modifiers",
                                           "writeback") if caps.get(k)]
    out = [f"{card['path']}  {card['driver'] or '?'}"
           f"{' (' + card['driver_desc'] + ')' if card.get('driver_desc') else ''}"
           f"{'  ' + card['bus_path'] if card.get('bus_path') else ''}"]
    if card.get("error"):
        out.append(f"  not usable: {card['error']}")
        return out
    out.append(f"  caps: {', '.join(flags) or 'none'}")
    out += _connector_lines(card["connectors"])
    out.append("  CRTCs:")
    for c in card["crtcs"]:
        out.append(f"    {c['id']:<5} index {c['index']}  {'active  ' if c['active'] else 'inactive'}"
                   f"  {_mode_label(c['mode'])}")
    out += _plane_lines(card["planes"])
    return out


def _connector_lines(connectors: list[dict]) -> list[str]:
    """The connectors as a table: status, EDID identity, preferred and current mode."""
    out = ["  connectors:", f"    {'name':<13} {'status':<13} {'edid':<32} {'preferred':<18} current"]
    for c in connectors:
        e = c["edid"]
        edid = f"{e['identity']} {e['name'] or ''}".strip() if e else "-"
        cur = c["current"]
        current = f"{_mode_label(cur['mode'])} on CRTC {cur['crtc']}" if cur else "-"
        link = f"  link {c['link_status']}" if c["link_status"] not in (None, "good") else ""
        out.append(f"    {c['name']:<13} {c['status']:<13} {edid[:32]:<32} "
                   f"{_mode_label(c['preferred_mode']):<18} {current}{link}")
        if c["modes"] and not c["preferred_mode"]:
            out.append(f"    {'':<13} {len(c['modes'])} modes, none preferred; first "
                       f"{_mode_label(c['modes'][0])}")
    return out


def _plane_lines(planes: list[dict]) -> list[str]:
    """One line a plane: type, reachable CRTCs, zpos range, the CRTC it is on, and its formats with
    their modifiers (LINEAR alone is left unsaid)."""
    out = ["  planes:"]
    for p in planes:
        fmts = []
        for f, mods in p["formats"].items():
            fmts.append(f if mods == ["LINEAR"] else f"{f}({','.join(mods)})")
        z = f" zpos {p['zpos']['min']}..{p['zpos']['max']}" if p.get("zpos") else ""
        on = f" on CRTC {p['crtc']}" if p.get("crtc") else ""
        out.append(f"    {p['id']:<5} {p['type']:<8} CRTCs {','.join(map(str, p['possible_crtcs']))}"
                   f"{z}{on}: {' '.join(fmts)}")
    return out


def _vgpu_lines(vgpus: list[dict]) -> list[str]:
    if not vgpus:
        return []
    out = ["vGPUs (VFIO mediated devices):"]
    for m in vgpus:
        out.append(f"  {m['uuid']}  {m['type']} on {m['parent']}, IOMMU group {m['iommu_group']}")
    return out


def _libvirt_lines(listings: list[dict]) -> list[str]:
    """Each libvirt URI's domains with their D-Bus displays, or why they could not be listed."""
    out = []
    for lv in listings:
        out.append(f"libvirt domains at {lv['uri']}:")
        if lv["error"]:
            out.append(f"  not listed: {lv['error']}")
            continue
        for d in lv["domains"]:
            display = {"p2p": "D-Bus display, peer to peer", "bus": "D-Bus display on its bus",
                       None: "no D-Bus display (add <graphics type='dbus' p2p='yes'/>)"}[d["dbus"]]
            out.append(f"  {d['name']:<16} {d['uuid']}  {d['state']:<10} {display}")
        if not lv["domains"]:
            out.append("  none")
    return out


def run(args: argparse.Namespace) -> int:
    paths = args.device or list_cards()
    if not paths and not args.libvirt_uris:
        print("directflip probe: no KMS device: /dev/dri has no card* node "
              "(no DRM driver loaded, or not a machine with a display device)", file=sys.stderr)
        return 1
    doc = probe_all(paths, args.libvirt_uris)
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_table(doc))
    if args.libvirt_uris and not paths:
        return 0 if any(lv["error"] is None for lv in doc["libvirt"]) else 1
    if not any(not c.get("error") for c in doc["cards"]):
        print("directflip probe: no KMS device could be probed: "
              + "; ".join(c["error"] for c in doc["cards"]), file=sys.stderr)
        return 1
    return 0
