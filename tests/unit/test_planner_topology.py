"""The planner's input side: `topology.from_probe` reads `directflip probe --json` documents."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from compositor import topology
from compositor.topology import TopologyError

LAB = Path(__file__).resolve().parents[1] / "data" / "lab-topology.json"


def lab() -> dict:
    return json.loads(LAB.read_text())


def by_driver(topo: topology.Topology, driver: str) -> topology.Card:
    return next(c for c in topo.cards if c.driver == driver)


def test_lab_topology() -> None:
    # Only what the lab machine is known to have: card paths, object ids and mode lists may differ
    # in a real saved probe.
    topo = topology.from_probe(lab())
    virtio, vkms = by_driver(topo, "virtio_gpu"), by_driver(topo, "vkms")
    # the three QEMU monitors and vkms' Virtual-1; its writeback connector is not a monitor
    assert sorted((o.card.driver, o.connector.name) for o in topo.outputs()) == [
        ("virtio_gpu", "Virtual-1"), ("virtio_gpu", "Virtual-2"), ("virtio_gpu", "Virtual-3"),
        ("vkms", "Virtual-4")]   # connector numbers are global: vkms loads after virtio-gpu
    v1 = virtio.connectors[0]
    assert v1.edid is not None and v1.edid.manufacturer == "RHT"
    assert v1.preferred_mode in v1.modes and v1.preferred_mode.preferred
    assert [p.type for p in vkms.planes].count("overlay") == 8
    assert all(not p.can_scale for c in topo.cards for p in c.planes)  # neither driver scales
    assert virtio.seat == "seat0"  # not in probe/1 yet: the default


def test_problems_are_all_reported_with_paths() -> None:
    doc = lab()
    doc["cards"][0]["connectors"][1]["modes"][2]["width"] = "1920"
    doc["cards"][0]["connectors"][2]["status"] = "plugged"
    del doc["cards"][1]["driver"]
    doc["cards"][0]["planes"][0]["possible_crtcs"] = [37, True]
    with pytest.raises(TopologyError) as info:
        topology.from_probe(doc, "saved.json")
    assert info.value.problems == [
        'cards[0].connectors[1].modes[2].width: expected an integer, got "1920"',
        'cards[0].connectors[2].status: expected "connected", "disconnected" or "unknown", got "plugged"',
        "cards[0].planes[0].possible_crtcs[1]: expected an integer, got a boolean",
        "cards[1].driver: missing",
    ]
    assert str(info.value).startswith("saved.json: cards[0]")


@pytest.mark.parametrize(("document", "problem"), [
    ([], "expected a probe object, got a list"),
    ({"cards": []},
     'schema: expected "directflip.probe/1", got null (is this the output of `directflip probe --json`?)'),
    ({"schema": "directflip.probe/2", "cards": []},
     'schema: expected "directflip.probe/1", got "directflip.probe/2"'),
    ({"schema": "directflip.probe/1", "cards": {}}, "cards: expected a list, got an object"),
    ({"schema": "directflip.probe/1", "cards": [1]}, "cards[0]: expected an object, got the number 1"),
])
def test_bad_documents(document: object, problem: str) -> None:
    with pytest.raises(TopologyError) as info:
        topology.from_probe(document)
    assert info.value.problems == [problem]


def test_added_fields_are_ignored() -> None:
    # the schema may grow within /1: unknown fields must not break older readers
    doc = lab()
    doc["generated_by"] = "a later directflip"
    doc["cards"][0]["connectors"][0]["vrr_capable"] = True
    doc["cards"][0]["seat"] = "seat1"
    topo = topology.from_probe(doc)
    assert topo.cards[0].seat == "seat1"


def test_card_that_could_not_be_probed() -> None:
    doc = {"schema": "directflip.probe/1", "cards": [
        {"path": "/dev/dri/card2", "driver": "", "driver_desc": "", "bus_path": None, "caps": {},
         "connectors": [], "crtcs": [], "planes": [], "error": "not a KMS device"}]}
    (card,) = topology.from_probe(doc).cards
    assert card.error == "not a KMS device" and not card.connectors


def test_not_json(tmp_path: Path) -> None:
    bad = tmp_path / "probe.json"
    bad.write_text('{"schema": ')
    with pytest.raises(TopologyError) as info:
        topology.load(bad)
    assert info.value.problems == ["1:12: not JSON: Expecting value"]


def test_without_unplugs() -> None:
    topo = topology.from_probe(lab())
    virtio = by_driver(topo, "virtio_gpu").path
    smaller = topo.without({f"{virtio}:Virtual-2", "Virtual-1", "Virtual-4"})
    # a bare connector name unplugs it on whichever card has it (Virtual-4 is vkms')
    assert [o.label for o in smaller.outputs()] == [f"{virtio}:Virtual-3"]


def test_present() -> None:
    doc = lab()
    conn = doc["cards"][0]["connectors"][0]
    unknown_with_modes = copy.deepcopy(conn) | {"status": "unknown"}
    unknown_without = copy.deepcopy(conn) | {"status": "unknown", "modes": [], "preferred_mode": None}
    doc["cards"][0]["connectors"] = [unknown_with_modes, unknown_without]
    topo = topology.from_probe(doc)
    assert [c.present for c in topo.cards[0].connectors] == [True, False]


def test_scaling_drivers() -> None:
    doc = lab()
    doc["cards"][0]["driver"] = "i915"
    card = topology.from_probe(doc).cards[0]
    assert [(p.type, p.can_scale) for p in card.planes[:2]] == [("primary", True), ("cursor", False)]
